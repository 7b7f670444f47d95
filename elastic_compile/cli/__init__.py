"""The ``elastic-compile`` command line: one module per subcommand, each exposing ``register(subparsers)``.

Conventions (every subcommand): ``--version``; ``--help`` shows each option's default; ``-v`` before or after
the subcommand; ``--json`` (inspect, export, run) prints one JSON object on stdout instead of prose. Exit codes:
0 done, 1 an error the toolkit names (typed errors, a missing or unreadable file: one line on stderr, no
traceback), 2 a usage error (argparse's message).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from ..errors import ElasticCompileError
from ..version import __version__

SUBCOMMANDS = ("demo", "inspect", "record", "train", "export", "run")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth showing (not None, not a flag's
    False) and the help does not state it already."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if ("default" in help_text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction,
                                       argparse._HelpAction))):
            return help_text
        return f"{help_text} (default: %(default)s)"


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def print_json(data: dict) -> None:
    print(json.dumps(data, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-compile", description="Make a Diffusion Transformer elastic (E-DiT).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"elastic-compile {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the transform finds")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue
            raise
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.formatter_class = HelpFormatter
        # after the subcommand too; SUPPRESS: absent here leaves what was given before the subcommand
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="log what the transform finds")
    return parser


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.handler(args) or 0)
    except ElasticCompileError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing, unreadable or unwritable file named on the command line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or one_line(exc)}{where}", file=sys.stderr)
        return 1


