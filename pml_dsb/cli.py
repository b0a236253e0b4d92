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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
