"""The ``pml-dsb`` command line: ``pml-dsb bench`` and ``pml-dsb analyze``.

Each subcommand lives in its own subpackage, which provides
``register(subparsers)``: it adds its parser and sets ``func`` (called with
the parsed arguments, returning an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand modules, each with register(subparsers)
SUBCOMMANDS = ("pml_dsb.runner.cli", "pml_dsb.analysis.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pml-dsb",
        description="Dynamic Semantic-Scale-Balanced learning for pytorch-metric-learning.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


#: What a subcommand raises for bad input, missing data or a missing extra
#: (ImportError: pml_dsb._optional names the pip command), with a message
#: that says what to fix: reported without a traceback (exit code 2).
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError, ImportError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        logging.getLogger("pml_dsb").error(
            "%s: %s (pml-dsb -v %s ... shows the traceback)", type(err).__name__, message, args.command)
        return 2


if __name__ == "__main__":
    sys.exit(main())
