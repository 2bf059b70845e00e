"""The `starcoder` command: a table of verbs, each handed to one module's entry function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import StarCoderError


def cmd_info(args: argparse.Namespace) -> None:
    from .info import format_info, model_info

    info = model_info(args.model, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_init(args: argparse.Namespace) -> None:
    """A randomly initialised model directory, from a preset or a config.json."""
    import torch

    from .checkpoint import parse_dtype, save_model
    from .config import Config, preset
    from .model import build_model, init_weights

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise StarCoderError(f"{out} exists and is not empty; pass --force to overwrite the model in it")
    config = Config.from_file(args.config) if args.config else preset(args.preset)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device="cpu")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    init_weights(model)
    dtype = parse_dtype(args.dtype)
    if dtype is not None:
        model = model.to(dtype)
    save_model(model, out)
    print(f"wrote a random {config.family} model ({config.num_parameters():,} parameters) to {out}")


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .tokenizer import read_text_files, train_tokenizer

    texts = read_text_files(args.input, tuple(args.suffix), tuple(args.exclude))
    tokenizer = train_tokenizer(texts, args.family, args.vocab_size, show_progress=sys.stderr.isatty())
    tokenizer.save(args.out)
    print(f"wrote a {args.family} tokenizer of {tokenizer.vocab_size:,} tokens to {args.out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import format_measurement, measure

    m = measure(args.model, args.prompt_tokens, args.new_tokens, args.dtype)
    print(json.dumps(m, indent=2) if args.json else format_measurement(m))


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import DTYPE_CHOICES
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="starcoder", description="StarCoder and StarCoder2 code models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model: family, size, heads, context, KV-cache cost")
    p.add_argument("--model", required=True, help="model directory or hub id (org/name)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (pickle) checkpoints")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised model directory")
    p.add_argument("out", help="output directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny-starcoder", choices=sorted(PRESETS), help="model shape")
    source.add_argument("--config", help="a Hugging Face config.json to take the shape from")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train-tokenizer", help="train a StarCoder-style byte-level BPE tokenizer on source files")
    p.add_argument("--input", nargs="+", required=True, help="files or directories of training text")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json (+ configs) into")
    p.add_argument("--family", default="starcoder2", choices=["gpt_bigcode", "starcoder2"],
                   help="whose special tokens, in whose order")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--suffix", nargs="+", default=[".py"], help="file endings to read inside directories")
    p.add_argument("--exclude", nargs="*", default=[], help="directory names to skip (e.g. site-packages)")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("bench", help="measure load, prefill and decode speed of a model on this machine")
    p.add_argument("--model", required=True, help="model directory or hub id (org/name)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
