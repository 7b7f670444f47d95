"""The ``elastic-compile`` command line: one module per subcommand, each exposing ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import ElasticCompileError

SUBCOMMANDS = ("demo", "inspect", "record", "train", "export", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-compile", description="Make a Diffusion Transformer elastic (E-DiT).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the transform finds")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.handler(args) or 0)
    except ElasticCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


