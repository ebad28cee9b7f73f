"""`python -m quant`: the quant subcommands of `lmforge`."""

import sys

from lifecycle.cli import main

if __name__ == "__main__":
    sys.exit(main(packages=("quant",), prog="python -m quant"))
