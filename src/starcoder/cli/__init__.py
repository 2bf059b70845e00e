"""The `starcoder` command: the table of commands (table.py), filled by inference.py (commands that run models: info,
init, complete, infill, chat, serve, bench) and make.py (commands that make and measure them: tokenizers, data,
training, quantization, evaluation, attribution)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import StarCoderError
from . import inference, make  # noqa: F401 (they fill the table, in this order)
from .table import COMMANDS, OneOf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starcoder", description="StarCoder and StarCoder2 code models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, **c.options)
        for f in c.flags:
            if isinstance(f, OneOf):
                group = p.add_mutually_exclusive_group()
                for member in f.flags:
                    group.add_argument(*member.names, **member.options)
            else:
                p.add_argument(*f.names, **f.options)
        p.set_defaults(func=c.run, **c.defaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except StarCoderError as e:
        print(f"starcoder: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"starcoder: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
