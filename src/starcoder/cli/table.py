"""The command table: each command is registered with its flags right above its body.

    @command("info", "describe a model", MODEL, JSON)
    def info(args): ...
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import DTYPE_CHOICES


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    options: dict = field(default_factory=dict)


def flag(*names: str, **options) -> Flag:
    return Flag(names, options)


@dataclass(frozen=True)
class OneOf:
    """Flags of which at most one may be given."""

    flags: tuple[Flag, ...]


# Flags several commands share.
MODEL = flag("--model", help="model directory, .gguf file or hub id (org/name); default: the embedded model")
DTYPE = flag("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as stored)")
ALLOW_PICKLE = flag("--allow-pickle", action="store_true", help="allow pytorch_model.bin (pickle) checkpoints")
JSON = flag("--json", action="store_true", help="print JSON")
PROGRESS = flag("--progress", action="store_true", help="show progress bars even when not on a terminal")
SEED = flag("--seed", type=int, default=0)


@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], None]
    flags: tuple[Flag | OneOf, ...]
    options: dict  # for add_parser: description, parents
    defaults: dict


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *flags: Flag | OneOf, defaults: dict | None = None, **options):
    """Register the decorated function as `starcoder NAME`, with these flags."""
    def register(run: Callable[[argparse.Namespace], None]):
        COMMANDS[name] = Command(name, help, run, flags, options, defaults or {})
        return run
    return register
