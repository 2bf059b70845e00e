"""GPTQ: quality on the embedded model, speed and memory on a StarCoderBase-1B-shaped model.

    python bench/quantization.py quality     # held-out perplexity: bf16 vs GPTQ vs round-to-nearest 4-bit
    python bench/quantization.py speed       # 1B shape: decode / prefill tokens/s, resident memory, quantize time
    python bench/quantization.py activations # what int8 activations (decoding, int4 prompts) cost in perplexity

quality: the embedded model's held-out code (the CPython files of its test split, as its manifest records them)
is scored in 512-token windows: bfloat16, then GPTQ and round-to-nearest at 4 bits for group sizes -1 and 128,
calibrated on 128 x 512 tokens of its training split.

speed: a random checkpoint of StarCoderBase-1B's shape in bfloat16 (loaded as `starcoder.load` does, weights
packed for oneDNN) against GPTQ int4 (group 128, act-order; quantized here with 16 x 512 calibration tokens, timed)
and int8 (per channel): each side in a fresh process, best of 3 runs, alternating. Resident memory is the
process's RSS after loading minus before (the model's own memory).

activations: the embedded model quantized (GPTQ int4 g128 act-order, round-to-nearest int8), scored one token
at a time through the decode kernels (256-token windows of the held-out code), with int8 activations and with
exact ones (STARCODER_INT8_ACTIVATIONS=0: bfloat16 on AVX512-BF16 CPUs, float32 on AVX2 ones), each in a fresh
process; bfloat16 weights as the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import starcoder  # noqa: F401  (before torch, as the CLI imports it: it asks torch for 2 MB pages)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, make_checkpoint, peak_rss, run_child  # noqa: E402

EMBEDDED = Path(__file__).parents[1] / "src" / "starcoder" / "assets" / "model"


# ---------------------------------------------------------------------------------------------------- quality
def cpython_split(split: str) -> list[Path]:
    """This interpreter's standard-library files that the embedded model's manifest puts in `split`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = [json.loads(line) for line in (EMBEDDED / "manifest.jsonl").read_text().splitlines() if line.strip()]
    files = [stdlib / r["path"] for r in rows if r["repo"].startswith("cpython") and r["split"] == split]
    return [f for f in files if f.is_file()]


def windows(tokenizer, files: list[Path], seq_len: int) -> torch.Tensor:
    """The files' tokens, each file ended by the end token, cut into (n, seq_len) windows."""
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")) + [tokenizer.eos_id]
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


def calibration_file(directory: Path) -> Path:
    """The embedded model's training split of CPython as JSONL (GPTQ's calibration data)."""
    out = directory / "calibration.jsonl"
    out.write_text("".join(json.dumps({"content": f.read_text(encoding="utf-8", errors="replace")}) + "\n"
                           for f in cpython_split("train")))
    return out


def perplexity(model, tokenizer, files: list[Path], seq_len: int = 512) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in windows(tokenizer, files, seq_len).split(8):
            logits = model(batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return math.exp(total / count)


def scored_perplexity(path: str, how: str, count: int = 40, seq_len: int = 256) -> dict:
    """Perplexity of held-out windows scored one token at a time with the cache (how="decode": every linear runs
    its decode kernel), or each window as one prompt (how="prompt": the long-input kernels)."""
    from starcoder import load_model, load_tokenizer

    model, tokenizer = load_model(path), load_tokenizer(EMBEDDED)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for window in windows(tokenizer, cpython_split("test"), seq_len)[:count]:
            if how == "prompt":
                logits = model(window[None, :-1]).logits[0].float()
            else:
                cache = model.new_cache(1, seq_len)
                logits = torch.cat([model(window[None, i : i + 1], cache=cache).logits[0].float()
                                    for i in range(seq_len - 1)])
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            tokens += seq_len - 1
    return {"perplexity": math.exp(total / tokens), "tokens": tokens}


HOW = ("decode", "prompt")


def activations() -> None:
    from starcoder.quantize.gptq import QuantSettings
    from starcoder.quantize.run import quantize_model

    rows = [("bfloat16 weights", str(EMBEDDED), {})]
    with tempfile.TemporaryDirectory() as tmp:
        calibration = calibration_file(Path(tmp))
        gptq4 = QuantSettings(bits=4, group_size=128, act_order=True)
        for name, settings, method in (("GPTQ int4 g128", gptq4, "gptq"), ("RTN int8", QuantSettings(bits=8), "rtn")):
            out = Path(tmp) / method
            quantize_model(str(EMBEDDED), out, settings, [calibration], n_samples=128, seq_len=512, method=method,
                           progress=False)
            rows += [(f"{name}, int8 activations", str(out), {"STARCODER_INT8_ACTIVATIONS": "1"}),
                     (f"{name}, exact activations", str(out), {"STARCODER_INT8_ACTIVATIONS": "0"})]
        results = [(name, *(run_child(__file__, f"{how}-perplexity", ["--path", path], env) for how in HOW))
                   for name, path, env in rows]
    print(f"embedded model, held-out CPython code, {results[0][1]['tokens']} tokens scored one at a time through the "
          "decode kernels, and as 40 prompts through the long-input kernels")
    print(f"{'':<36}" + "".join(f"{how + ' scored':>20}" for how in HOW))
    for name, *scored in results:
        print(f"{name:<36}" + "".join(f"{r['perplexity']:>11.3f}{r['perplexity'] / base['perplexity'] - 1:>+9.2%}"
                                      for r, base in zip(scored, results[0][1:], strict=True)))


def quality() -> None:
    from starcoder import load_model, load_tokenizer
    from starcoder.quantize.gptq import QuantSettings
    from starcoder.quantize.run import quantize_model

    tokenizer = load_tokenizer(EMBEDDED)
    held_out = cpython_split("test")
    with tempfile.TemporaryDirectory() as tmp:
        calibration = calibration_file(Path(tmp))
        rows = [("bfloat16", "", perplexity(load_model(EMBEDDED), tokenizer, held_out), None)]
        for group in (-1, 128):
            for method in ("rtn", "gptq"):
                out = Path(tmp) / f"{method}{group}"
                start = time.perf_counter()
                quantize_model(str(EMBEDDED), out, QuantSettings(bits=4, group_size=group, act_order=True),
                               [calibration], n_samples=128, seq_len=512, method=method, progress=False)
                seconds = time.perf_counter() - start
                rows.append((f"4-bit {method.upper()}", f"{group}",
                             perplexity(load_model(out), tokenizer, held_out), seconds))
    base = rows[0][2]
    print(f"embedded model, held-out CPython code ({len(held_out)} files), 512-token windows")
    print(f"{'weights':<16}{'group':>7}{'perplexity':>12}{'vs bf16':>9}{'quantize s':>12}")
    for name, group, ppl, seconds in rows:
        print(f"{name:<16}{group:>7}{ppl:>12.3f}{ppl / base:>8.3f}x{'' if seconds is None else f'{seconds:12.1f}'}")
    for group in ("-1", "128"):
        r = next(p for n, g, p, _ in rows if g == group and "RTN" in n)
        g = next(p for n, gg, p, _ in rows if gg == group and "GPTQ" in n)
        print(f"group {group}: GPTQ closes {(r - g) / (r - base):.0%} of round-to-nearest's perplexity gap")


# ---------------------------------------------------------------------------------------------------- speed
def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def child(path: str, prompt_tokens: int, new_tokens: int) -> dict:
    from starcoder import load

    before = rss()
    start = time.perf_counter()
    sc = load(path)
    load_seconds = time.perf_counter() - start
    model_bytes = rss() - before
    model = sc.model
    ids = torch.randint(100, 40000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :16], cache=model.new_cache(1, 32))  # warm up
        start = time.perf_counter()
        cache = model.new_cache(1, prompt_tokens + new_tokens + 8)
        model(ids, cache=cache, logits_to_keep=1)
        prefill = prompt_tokens / (time.perf_counter() - start)
        token = ids[:, -1:]
        for _ in range(4):
            model(token, cache=cache, logits_to_keep=1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            model(token, cache=cache, logits_to_keep=1)
        decode = new_tokens / (time.perf_counter() - start)
    return {"load_seconds": load_seconds, "model_bytes": model_bytes, "prefill": prefill, "decode": decode,
            "peak_rss": peak_rss()}


def speed(rounds: int, requantize: bool) -> None:
    from starcoder.quantize.gptq import QuantSettings
    from starcoder.quantize.run import quantize_model

    bf16 = make_checkpoint("starcoderbase-1b", "bfloat16")
    sides = {"bfloat16": bf16, "int4 (GPTQ g128 act-order)": RESULTS / "starcoderbase-1b-gptq4-g128-act",
             "int8 (per channel)": RESULTS / "starcoderbase-1b-int8-rtn"}
    timing = {}
    for name, settings, method, samples in [
        ("int4 (GPTQ g128 act-order)", QuantSettings(bits=4, group_size=128, act_order=True), "gptq", 16),
        ("int8 (per channel)", QuantSettings(bits=8), "rtn", 1),  # its speed does not depend on the method
    ]:
        out = sides[name]
        if requantize or not (out / "quantize_config.json").exists():
            stats = quantize_model(str(bf16), out, settings, n_samples=samples, seq_len=512, method=method,
                                   progress=False)
            timing[name] = stats["seconds"]
            (out / "bench_quantize.json").write_text(json.dumps({"seconds": stats["seconds"],
                                                                 "block_peak_rss": stats["block_peak_rss"]}))
        else:
            timing[name] = json.loads((out / "bench_quantize.json").read_text())["seconds"]
    peaks = json.loads((sides["int4 (GPTQ g128 act-order)"] / "bench_quantize.json").read_text())["block_peak_rss"]
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, path in sides.items():
            r = run_child(__file__, "speed", ["--path", str(path)])
            for key, value in r.items():
                keep = min if key in ("load_seconds", "model_bytes") else max
                best.setdefault(name, {})[key] = keep(value, best.get(name, {}).get(key, value))
    base = best["bfloat16"]
    print(f"StarCoderBase-1B shape, random weights; prompt 512 tokens, 64 new tokens, batch 1, 2 cores; best of "
          f"{rounds}")
    print(f"{'weights':<28}{'decode tok/s':>13}{'vs bf16':>9}{'prefill tok/s':>15}{'vs bf16':>9}{'model MB':>10}"
          f"{'vs bf16':>9}{'load s':>8}{'quantize s':>12}")
    print(f"GPTQ peak resident memory per block (process, MB): max {max(peaks) / 2**20:.0f}, "
          f"blocks {', '.join(f'{p / 2**20:.0f}' for p in peaks[:4])}, ...")
    for name, r in best.items():
        q = f"{timing[name]:12.0f}" if name in timing else ""
        print(f"{name:<28}{r['decode']:>13.1f}{r['decode'] / base['decode']:>8.2f}x{r['prefill']:>15.1f}"
              f"{r['prefill'] / base['prefill']:>8.2f}x{r['model_bytes'] / 2**20:>10.0f}"
              f"{r['model_bytes'] / base['model_bytes']:>8.2f}x{r['load_seconds']:>8.1f}{q}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=["quality", "speed", "activations"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requantize", action="store_true", help="quantize the 1B checkpoint again (and time it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--prompt", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--new", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child in ("decode-perplexity", "prompt-perplexity"):
        print(json.dumps(scored_perplexity(args.path, args.child.split("-")[0])))
    elif args.child:
        print(json.dumps(child(args.path, args.prompt, args.new)))
    elif args.part == "quality":
        quality()
    elif args.part == "activations":
        activations()
    else:
        speed(args.rounds, args.requantize)


if __name__ == "__main__":
    main()
