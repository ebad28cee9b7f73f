"""`python -m serve`: the serve subcommands of `lmforge`."""

import sys

from lifecycle.cli import main

if __name__ == "__main__":
    sys.exit(main(packages=("serve",), prog="python -m serve"))
