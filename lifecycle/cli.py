"""The `lmforge` console command.

Each package lists its subcommands in `<package>/commands.py` as `COMMANDS`: functions that add
one subparser and set `func` on it. `lmforge` shows all of them; `python -m lifecycle|quant|serve`
shows that package's own. User errors (`LmforgeError`) print one line and exit 2; any other
exception prints one line too, and the traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from lifecycle.errors import LmforgeError

PACKAGES = ("lifecycle", "quant", "serve")

EPILOG = """\
examples:
  lmforge demo                                   # the whole lifecycle on the embedded default
  lmforge curate run data/ -o curated/ --workers 2   # language id, quality, PII, dedup -> shards + report
  lmforge tokenizer train corpus.jsonl -o tok/   # byte-level BPE with chat template
  lmforge pretrain --preset small --data corpus.jsonl --tokenizer tok/ --output-dir runs/small
  lmforge plan --preset base --seq-len 2048 --micro-batch-size 4
  lmforge checkpoint verify runs/small/final
  lmforge quantize runs/small/final -o runs/small/quant --compare gptq:4:32,rtn:4:32,int8,nf4
  lmforge serve --model runs/small/final --port 50051
  lmforge chat --target 127.0.0.1:50051
  lmforge eval --target grpc://127.0.0.1:50051 --task arc_easy --data-root ../shared/data

Every subcommand has its own --help with an example.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps examples in descriptions/epilogs as written."""


def build_parser(packages: Sequence[str] = PACKAGES, prog: str = "lmforge") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="lmforge: curate data, train, export, quantize, serve and evaluate language models.",
        epilog=EPILOG if prog == "lmforge" else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-V", "--version", action="version", version=f"lmforge {_version()}")
    sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", dest="subcommand")
    for package in packages:
        for spec in importlib.import_module(f"{package}.commands").COMMANDS:
            module_name, func_name = spec.split(":")
            getattr(importlib.import_module(module_name), func_name)(sub)
    return parser


def _version() -> str:
    from lifecycle import __version__

    return __version__


def add_subcommand(sub: argparse._SubParsersAction, name: str, *, help: str, example: str,
                   description: str | None = None) -> argparse.ArgumentParser:
    """Create a subparser whose help ends with a worked example (every subcommand has one)."""
    parser = sub.add_parser(
        name,
        help=help,
        description=(description or help),
        epilog=f"example:\n  {example}",
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(_parser=parser, func=None)
    return parser


def main(argv: Sequence[str] | None = None, packages: Sequence[str] = PACKAGES, prog: str = "lmforge") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(packages, prog)
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LMFORGE_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if debug:  # our loggers only: third-party DEBUG output (matplotlib's font search...) drowns the signal
        for package in PACKAGES:
            logging.getLogger(package).setLevel(logging.DEBUG)
    if getattr(args, "func", None) is None:
        # A group (e.g. `lmforge tokenizer`) without its action: show that group's help.
        (getattr(args, "_parser", None) or parser).print_help()
        return 0 if args.subcommand is None else 2
    try:
        result = args.func(args)
        return int(result or 0)
    except LmforgeError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lmforge plan | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence for people, not for tests
        if debug:
            traceback.print_exc()
        print(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
