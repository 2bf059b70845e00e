"""Prefill and batch-1 decode against llama.cpp's llama-bench on the same weights, at every precision (issue 17).

    python bench/vs_llamacpp.py [--presets starcoderbase-1b starcoder2-3b] [--rounds 2] [--prompt 512] [--new 64]
                                [--rows bf16 int4 ...]

For each preset a random bfloat16 checkpoint of its shape is made once; llama.cpp (built from the
llama-cpp-python sdist with the native CPU flags, see llamacpp.py) converts it with its own convert_hf_to_gguf.py
to bf16 and q8_0, and llama-quantize makes q4_0 and q4_k_m from the bf16 file. Ours: the same checkpoint loaded
as `starcoder.load` does, and round-to-nearest int8 (per channel) and int4 (group 128) made by `starcoder
quantize --method rtn` (both timed, as llama-quantize is). Our int8/int4 rows run twice: with int8 activations and
integer dot products (the default) and with exact activations (STARCODER_INT8_ACTIVATIONS=0: bfloat16 on
AVX512-BF16 CPUs, float32 on AVX2 ones).

Every measurement is a fresh process (llama-bench with -r 1; ours through bench/quantization.py's child), sides
alternating, best of --rounds. Both sides decode after the prompt (llama-bench `-d`), so each step's attention
reads as many cached tokens on both. Decode bandwidth is the weights' file size times tokens/s, against this machine's
read bandwidth measured by bench/membw.c.

The machines this runs on (2-core cloud VMs) switch between bandwidth regimes for tens of seconds to minutes at a
time (the probe reading ~62 and ~36 GB/s; two copies of a model in one process slowed and recovered together), so
a side's best round can come from a fast minute the other side never saw. The probe therefore also runs right
before and after every measurement, and each round's decode ratio is printed with those readings; the summary line
takes the median ratio over the rounds whose four readings agree within 15% (both sides in the same regime).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import llamacpp
from common import RESULTS, make_checkpoint, run_child
from common import parser as common_parser
from generation import build_membw, memory_bandwidth

# (row name, our weights, our environment, llama.cpp's file type)
ROWS = [
    ("bf16", "bf16", {}, "bf16"),
    ("int8 / q8_0", "int8", {}, "q8_0"),
    ("int8 (exact activations) / q8_0", "int8", {"STARCODER_INT8_ACTIVATIONS": "0"}, "q8_0"),
    ("int4 g128 / q4_0", "int4", {}, "q4_0"),
    ("int4 g128 (exact activations) / q4_0", "int4", {"STARCODER_INT8_ACTIVATIONS": "0"}, "q4_0"),
    ("int4 g128 / q4_k_m", "int4", {}, "q4_k_m"),
]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def our_weights(preset: str) -> tuple[dict[str, Path], dict[str, float]]:
    """The bf16 checkpoint and its int8 and int4 round-to-nearest quantizations (made once, timed then)."""
    from starcoder.quantize.gptq import QuantSettings
    from starcoder.quantize.run import quantize_model

    bf16 = make_checkpoint(preset, "bfloat16")
    paths, seconds = {"bf16": bf16}, {}
    for name, settings in (("int8", QuantSettings(bits=8)), ("int4", QuantSettings(bits=4, group_size=128))):
        out = paths[name] = RESULTS / f"{preset}-{name}-rtn"
        timing = out / "bench_quantize.json"
        if not timing.exists():
            stats = quantize_model(str(bf16), out, settings, method="rtn", progress=False)
            timing.write_text(json.dumps({"seconds": stats["seconds"]}))
        seconds[name] = json.loads(timing.read_text())["seconds"]
    return paths, seconds


def llama_weights(preset: str, bf16: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """llama.cpp's own files of the same checkpoint: converted (bf16, q8_0) and quantized (q4_0, q4_k_m)."""
    files, seconds = {}, {}
    for kind in ("bf16", "q8_0"):
        files[kind] = llamacpp.convert(bf16, RESULTS / f"{preset}-{kind}.gguf", kind)
    for kind in ("q4_0", "q4_k_m"):
        out = files[kind] = RESULTS / f"{preset}-{kind}.gguf"
        if not out.exists():
            program = llamacpp.build() / "llama-quantize"  # (built first: the build is not the quantizing)
            start = time.perf_counter()
            subprocess.run([str(program), str(files["bf16"]), str(out), kind.upper()], check=True, capture_output=True)
            seconds[kind] = time.perf_counter() - start
    return files, seconds


def llama_bench(gguf: Path, prompt: int, new: int, threads: int) -> dict:
    """llama-bench's prompt of `prompt` tokens, and its `new` tokens decoded after that many (`-d`): ours decodes
    after its prompt, and each step's attention reads the cache (llama-bench's own tg test starts from nothing)."""
    def avg_tokens_per_second(*flags: str) -> float:
        out = subprocess.run([str(llamacpp.build() / "llama-bench"), "-m", str(gguf), *flags, "-t", str(threads),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]["avg_ts"]

    return {"prefill": avg_tokens_per_second("-p", str(prompt), "-n", "0"),
            "decode": avg_tokens_per_second("-p", "0", "-n", str(new), "-d", str(prompt))}


def ours(path: Path, env: dict, prompt: int, new: int) -> dict:
    return run_child(str(Path(__file__).with_name("quantization.py")), "speed",
                     ["--path", str(path), "--prompt", str(prompt), "--new", str(new)], env)


def best(runs: list[dict]) -> dict:
    return {key: max(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["starcoderbase-1b"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rows", nargs="+", help="only the rows whose name starts with one of these")
    args = parser.parse_args()
    rows = [row for row in ROWS if not args.rows or row[0].startswith(tuple(args.rows))]
    import torch

    threads = torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory()  # (removed when the run ends)
    membw = build_membw(tmp.name)
    bandwidth = sorted(memory_bandwidth(membw, threads) for _ in range(3))[1]  # it drifts: the median of 3
    print(f"machine read bandwidth {bandwidth / 1e9:.1f} GB/s ({threads} threads)")

    def probed(measure, *args) -> dict:
        """measure(*args) with the machine's read bandwidth (GB/s) just before and after it."""
        before = memory_bandwidth(membw, threads, 512) / 1e9
        run = measure(*args)
        return {**run, "probe": (before, memory_bandwidth(membw, threads, 512) / 1e9)}

    for preset in args.presets:
        paths, our_seconds = our_weights(preset)
        files, llama_seconds = llama_weights(preset, paths["bf16"])
        results: dict[str, dict[str, list]] = {name: {"ours": [], "llama.cpp": []} for name, *_ in rows}
        for round_ in range(args.rounds):
            for name, weights, env, kind in rows:
                sides = ("ours", "llama.cpp") if round_ % 2 == 0 else ("llama.cpp", "ours")
                for side in sides:
                    if side == "ours":
                        run = probed(ours, paths[weights], env, args.prompt, args.new)
                    else:
                        run = probed(llama_bench, files[kind], args.prompt, args.new, threads)
                    results[name][side].append(run)
                    print(preset, name, side, json.dumps(run), flush=True)
        print(f"\n{preset}, random weights; {threads} threads, prompt {args.prompt} tokens, {args.new} new tokens, "
              f"batch 1; fresh process per measurement, best of {args.rounds}, sides alternating")
        print(f"{'weights (ours / llama.cpp)':<38}{'prefill tok/s':>20}{'ratio':>8}{'decode tok/s':>18}{'ratio':>8}"
              f"{'decode GB/s (share of bandwidth)':>36}")
        for name, weights, _, kind in rows:
            o, ll = best(results[name]["ours"]), best(results[name]["llama.cpp"])
            ours_gbs, llama_gbs = o["decode"] * size(paths[weights]) / 1e9, ll["decode"] * size(files[kind]) / 1e9
            print(f"{name:<38}{o['prefill']:>9.0f} / {ll['prefill']:<8.0f}{o['prefill'] / ll['prefill']:>7.2f}x"
                  f"{o['decode']:>8.1f} / {ll['decode']:<7.1f}{o['decode'] / ll['decode']:>7.2f}x"
                  f"{ours_gbs:>14.1f} ({ours_gbs * 1e9 / bandwidth:.0%}) / {llama_gbs:.1f} "
                  f"({llama_gbs * 1e9 / bandwidth:.0%})")
        print("decode ratio round by round (probe GB/s before and after ours; llama.cpp's):")
        for name, *_ in rows:
            pairs = list(zip(results[name]["ours"], results[name]["llama.cpp"], strict=True))
            shown = [f"{o['decode'] / ll['decode']:.2f}x ({'-'.join(f'{b:.0f}' for b in o['probe'])}; "
                     f"{'-'.join(f'{b:.0f}' for b in ll['probe'])})" for o, ll in pairs]
            matched = sorted(o["decode"] / ll["decode"] for o, ll in pairs
                             if max(o["probe"] + ll["probe"]) <= 1.15 * min(o["probe"] + ll["probe"]))
            median = f"{statistics.median(matched):.2f}x over {len(matched)}" if matched else "none"
            print(f"  {name:<38} {', '.join(shown)}; same regime: {median}")
        quantized = ", ".join(f"ours {k} {v:.0f} s" for k, v in our_seconds.items())
        made = ", ".join(f"llama-quantize {k} {v:.0f} s" for k, v in llama_seconds.items())
        print(f"quantizing (first run only): {quantized}{'; ' + made if made else ''}")


if __name__ == "__main__":
    main()
