"""Commands that run models: info, init, complete, infill, chat, serve, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cache import PREFIX_CACHE_MB
from ..config import DTYPE_CHOICES, PRESETS
from ..errors import StarCoderError
from ..speculate import MODES as SPECULATE_MODES
from .table import ALLOW_PICKLE, DTYPE, JSON, MODEL, SEED, OneOf, command, flag

SPECULATE = flag("--speculate", default="none", choices=SPECULATE_MODES, help="draft tokens and check several at "
                 "once, same output: ngram by prompt lookup (fast where the text repeats its input), draft by "
                 "--draft-model (default none)")
DRAFT_MODEL = flag("--draft-model", help="a smaller model with the same tokenizer that drafts tokens (implies "
                   "--speculate draft)")


@command("info", "describe a model: family, size, heads, context, KV-cache cost", MODEL, JSON, ALLOW_PICKLE)
def info(args: argparse.Namespace) -> None:
    from ..info import format_info, model_info
    from ..paths import default_model_dir

    described = model_info(args.model or default_model_dir(), allow_pickle=args.allow_pickle)
    print(json.dumps(described, indent=2) if args.json else format_info(described))


@command("init", "write a randomly initialised model directory, with a tokenizer",
         flag("out", nargs="?", help="output directory"),
         flag("--out", dest="out_flag", metavar="DIR", help="output directory (instead of the positional one)"),
         OneOf((flag("--preset", default="tiny-starcoder", choices=sorted(PRESETS), help="model shape"),
                flag("--config", help="a Hugging Face config.json to take the shape from"))),
         flag("--dtype", default="float32", choices=DTYPE_CHOICES), SEED,
         flag("--force", action="store_true", help="overwrite a non-empty output directory"))
def init(args: argparse.Namespace) -> None:
    """A randomly initialised model directory, from a preset or a config.json."""
    import torch

    from ..checkpoint import parse_dtype, save_model
    from ..config import Config, preset
    from ..model import build_model, init_weights
    from ..tokenizer import Tokenizer

    if (args.out is None) == (args.out_flag is None):
        raise StarCoderError("give the output directory once: init DIR or init --out DIR")
    out = Path(args.out or args.out_flag)
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
    tokenizer = Tokenizer.for_family(config.model_type)
    if tokenizer.vocab_size > config.vocab_size:
        raise StarCoderError(f"vocab_size {config.vocab_size} is smaller than the shipped {config.model_type} "
                             f"tokenizer's {tokenizer.vocab_size} tokens")
    save_model(model, out)
    tokenizer.save(out)
    print(f"wrote a random {config.family} model ({config.num_parameters():,} parameters) with a tokenizer to {out}")


def _generation_flags() -> argparse.ArgumentParser:
    """The model and sampling flags of complete, infill and chat."""
    generation = argparse.ArgumentParser(add_help=False)
    g = generation.add_argument_group("model")
    for f in (MODEL, DTYPE, ALLOW_PICKLE, SPECULATE, DRAFT_MODEL):
        g.add_argument(*f.names, **f.options)
    g = generation.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                   "probabilities reach p (1 = all)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already seen")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from generated tokens")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per use of generated tokens")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same sample")
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")
    g.add_argument("--truncate", action="store_true", help="drop the start of a prompt too long for the context")
    g.add_argument("--json", action="store_true", help="print the finished result as JSON instead of streaming")
    return generation


GENERATION = _generation_flags()


def _load(args: argparse.Namespace):
    from ..api import load

    return load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle, speculate=args.speculate,
                draft_model=args.draft_model)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed, stop=tuple(args.stop),
                truncate=args.truncate)


def _show(pieces, as_json: bool, completion_of) -> None:
    """Stream text to the terminal as it comes; with --json, print the finished completion instead."""
    if as_json:
        c = completion_of()
        print(json.dumps({"text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                          "completion_tokens": len(c.token_ids), "seed": c.seed}, ensure_ascii=False))
        return
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@command("complete", "continue a prompt", flag("prompt", help="the text to continue; - reads it from standard input"),
         parents=[GENERATION])
def complete(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sc = _load(args)
    _show(sc.stream(prompt, **_sampling(args)), args.json, lambda: sc.complete(prompt, **_sampling(args)))


@command("infill", "fill in the middle between a prefix and a suffix",
         flag("--prefix", help="the text before the gap"), flag("--suffix", help="the text after the gap"),
         flag("--file", help="a file with a cursor marker where the gap is (instead of --prefix/--suffix)"),
         flag("--cursor", default="<|cursor|>", help="the marker in --file (default <|cursor|>)"),
         flag("--mode", default="psm", choices=["psm", "spm"], help="prompt layout (default psm)"),
         parents=[GENERATION])
def infill(args: argparse.Namespace) -> None:
    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise StarCoderError("give either --file or --prefix/--suffix, not both")
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StarCoderError(f"{args.file}: cannot read ({e})") from None
        if text.count(args.cursor) != 1:
            raise StarCoderError(f"{args.file}: needs the cursor marker {args.cursor!r} exactly once, found "
                                 f"{text.count(args.cursor)}")
        prefix, suffix = text.split(args.cursor)
    else:
        if args.prefix is None:
            raise StarCoderError("give --prefix (and --suffix), or --file with a cursor marker")
        prefix, suffix = args.prefix, args.suffix or ""
    sc = _load(args)
    _show(sc.stream_infill(prefix, suffix, args.mode, **_sampling(args)), args.json,
          lambda: sc.infill(prefix, suffix, args.mode, **_sampling(args)))


@command("chat", "talk with the model as a technical assistant",
         flag("--system", help="replace the assistant's preamble"), parents=[GENERATION],
         defaults={"max_new_tokens": 512})
def chat(args: argparse.Namespace) -> None:
    """An interactive session; from a pipe, each input line is one message."""
    sc = _load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if interactive:
        print("Chat with the model. /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write("assistant> ")
        reply = ""
        for piece in sc.stream_chat(messages, **_sampling(args)):
            piece = piece.lstrip() if not reply else piece
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})


@command(
    "serve", "serve OpenAI- and TGI-compatible HTTP APIs and a playground", MODEL, DTYPE,
    flag("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"),
    flag("--port", type=int, default=8000),
    flag("--api-key", help="require Authorization: Bearer KEY on every route but /health and the playground page "
         "(default: $STARCODER_API_KEY)"),
    flag("--max-body-mb", type=float, default=4.0, help="largest request body accepted (default 4 MB; larger ones "
         "get 413)"),
    flag("--prefix-cache-mb", type=float, default=PREFIX_CACHE_MB, help="memory for keys and values of earlier "
         "prompts, so that a prompt starting as one of them did is computed only from where it differs (default "
         f"{PREFIX_CACHE_MB:g}; 0 turns reuse off)"),
    flag("--fim-mode", default="psm", choices=["psm", "spm"], help="layout of the infilling prompts the server "
         "builds; spm puts the prefix last, so that typing only extends the prompt and every keystroke reuses what "
         "came before (default psm, the published layout)"),
    flag("--speculate", default="none", choices=SPECULATE_MODES, help="drafts checked several at a time while one "
         "sequence decodes alone: ngram by prompt lookup, draft by --draft-model (default none)"),
    DRAFT_MODEL,
    flag("--prefill-chunk", type=int, default=0, help="prompt tokens computed between two decode steps, so that a "
         "long prompt never stalls running streams (default 0: as many as take about two decode steps' time while "
         "others decode, whole prompts when none does)"),
    flag("--cache-reuse", type=int, default=0, metavar="N", help="also reuse the kept prompt's tokens after an "
         "edit, at their new positions, when at least N of them match (llama.cpp's --cache-reuse; StarCoder2 only: "
         "rotary keys are re-rotated). Approximate: those tokens' keys and values saw the text before the edit "
         "(default 0: off, exact)"),
    flag("--max-batch", type=int, default=8, help="sequences generated together (default 8)"),
    flag("--max-queue", type=int, default=64, help="requests that may wait for a slot (default 64)"),
    flag("--timeout", type=float, default=600.0, help="seconds a request may wait for its next token"),
    flag("--attribution-index", help="index for POST /v1/attribution (default: the embedded corpus's, built on "
         "the first request)"))
def serve(args: argparse.Namespace) -> None:
    try:
        from ..server.app import serve
    except ImportError as e:
        raise StarCoderError(f"the server needs its extra: pip install 'starcoder[serve]' ({e})") from None
    serve(args.model, args.host, args.port, args.dtype, api_key=args.api_key or os.environ.get("STARCODER_API_KEY"),
          max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout, max_body_mb=args.max_body_mb,
          prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=args.prefill_chunk or None, speculate=args.speculate,
          draft_model=args.draft_model, fim_mode=args.fim_mode, cache_reuse=args.cache_reuse,
          attribution_index=Path(args.attribution_index) if args.attribution_index else None)


@command("bench", "measure load, prefill and decode speed of a model on this machine", MODEL,
         flag("--prompt-tokens", type=int, default=512), flag("--new-tokens", type=int, default=32),
         flag("--dtype", default="auto", choices=DTYPE_CHOICES), JSON)
def bench(args: argparse.Namespace) -> None:
    from ..bench import format_measurement, measure
    from ..paths import default_model_dir

    m = measure(args.model or default_model_dir(), args.prompt_tokens, args.new_tokens, args.dtype)
    print(json.dumps(m, indent=2) if args.json else format_measurement(m))
