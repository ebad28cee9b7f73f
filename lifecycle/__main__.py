"""`python -m lifecycle`: the lifecycle subcommands of `lmforge`."""

import sys

from lifecycle.cli import main

if __name__ == "__main__":
    sys.exit(main(packages=("lifecycle",), prog="python -m lifecycle"))
