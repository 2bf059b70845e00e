"""Generation benchmark: prefill and decode speed, ours against transformers' generate and the memory roofline.

    python bench/generation.py [--preset starcoderbase-1b] [--dtype bfloat16] [--prompt 512] [--new 32]

On a random checkpoint of the preset's shape (written once under bench/results/), each side in its own fresh
process, greedy decoding:
  prefill      a 512-token prompt, tokens/s (ours: Generator.add; transformers: generate with 1 new token)
  decode b1    one sequence, tokens/s after the prompt
  decode b8    eight sequences together, total tokens/s
  roofline     peak read bandwidth (bench/membw.c, built and run here) / bytes one decode step must read
Each figure is the best of 3 runs.
Targets (issue 3): decode b1 >= 1.0x transformers and >= 80% of the roofline; decode b8 >= 1.3x transformers;
prefill >= 1.0x.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import RESULTS, make_checkpoint, run_child
from common import parser as common_parser

REPEATS = 3  # every figure is the best of this many runs: memory bandwidth on a shared machine is noisy


def child_ours(model_dir: str, prompt: int, new: int) -> dict:
    import torch

    from starcoder import load_model, load_tokenizer
    from starcoder.generate import Generator, SamplingParams

    model = load_model(model_dir, pack=True)
    generator = Generator(model, load_tokenizer(model_dir), max_batch=8, max_len=prompt + new + 1)
    prompts = torch.randint(100, 49000, (8, prompt), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=new + 1, ignore_eos=True)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def decode(batch: int) -> float:
        for i in range(batch):
            generator.add(prompts[i], params, request=i)
        seconds = timed(lambda: [generator.step() for _ in range(new)])
        for i in range(batch):
            generator.cancel(i)
        return seconds

    generator.add(prompts[0], params)  # warm-up: first touch of the mapped weights, kernel selection
    generator.cancel(0)
    prefill = min(timed(lambda: (generator.add(prompts[0], params), generator.cancel(0))) for _ in range(REPEATS))
    decode_1 = min(decode(1) for _ in range(REPEATS))
    decode_8 = min(decode(8) for _ in range(REPEATS))
    linear_bytes = sum(m.weight.element_size() * m.weight.numel() + (m.bias.nbytes if m.bias is not None else 0)
                       for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    kv_read = config.kv_cache_bytes_per_token(model.lm_head.weight.element_size()) * (prompt + new // 2)
    return {"prefill_tps": prompt / prefill, "decode_1_tps": new / decode_1, "decode_8_tps": 8 * new / decode_8,
            "bytes_per_decode_step": linear_bytes + kv_read}


def child_transformers(model_dir: str, prompt: int, new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompts = torch.randint(100, 49000, (8, prompt), generator=torch.Generator().manual_seed(0))

    def timed_generate(ids, tokens) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=0)
        return time.perf_counter() - start

    timed_generate(prompts[:1], 2)  # warm-up
    prefill = min(timed_generate(prompts[:1], 1) for _ in range(REPEATS))
    decode_1 = min(timed_generate(prompts[:1], new + 1) for _ in range(REPEATS)) - prefill
    prefill_8 = min(timed_generate(prompts, 1) for _ in range(REPEATS))
    decode_8 = min(timed_generate(prompts, new + 1) for _ in range(REPEATS)) - prefill_8
    return {"prefill_tps": prompt / prefill, "decode_1_tps": new / decode_1, "decode_8_tps": 8 * new / decode_8}


def build_membw(tmp: str) -> Path:
    binary = Path(tmp) / "membw"
    source = Path(__file__).parent / "membw.c"
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(source), "-o", str(binary)], check=True)
    return binary


def memory_bandwidth(binary: Path, threads: int, megabytes: int = 2048) -> float:
    """Peak read bandwidth in bytes/s, measured by bench/membw.c built for this machine over a buffer this large."""
    out = subprocess.run([str(binary), str(megabytes)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return float(out.stdout.split()[0]) * 1e9


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    if args.child:
        run = child_ours if args.child == "ours" else child_transformers
        print(json.dumps(run(args.model_dir, args.prompt, args.new)))
        return

    import torch

    model_dir = make_checkpoint(args.preset, args.dtype)
    child_args = ["--model-dir", str(model_dir), "--prompt", str(args.prompt), "--new", str(args.new)]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        membw = build_membw(tmp)
        # Bandwidth on a shared machine drifts: probe before, between and after, and take the median.
        bandwidths = [memory_bandwidth(membw, threads)]
        hf = run_child(__file__, "transformers", child_args)
        bandwidths.append(memory_bandwidth(membw, threads))
        ours = run_child(__file__, "ours", child_args)
        bandwidths.append(memory_bandwidth(membw, threads))
    bandwidth = sorted(bandwidths)[1]
    roofline = bandwidth / ours["bytes_per_decode_step"]

    print(f"{args.preset}, {args.dtype}, {torch.get_num_threads()} threads, prompt {args.prompt} tokens, "
          f"{args.new} new tokens, greedy")
    probes = ", ".join(f"{b / 1e9:.1f}" for b in bandwidths)
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (median of {probes}); a decode step reads "
          f"{ours['bytes_per_decode_step'] / 1e9:.2f} GB -> roofline {roofline:.1f} tokens/s at batch 1")
    print(f"{'tokens/s':18}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    for key, name in (("prefill_tps", "prefill"), ("decode_1_tps", "decode batch 1"),
                      ("decode_8_tps", "decode batch 8")):
        print(f"{name:18}{ours[key]:10.1f}{hf[key]:14.1f}{ours[key] / hf[key]:7.2f}x")
    print(f"decode batch 1: {ours['decode_1_tps'] / roofline:.0%} of the roofline")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(
        {"preset": args.preset, "dtype": args.dtype, "bandwidths": bandwidths, "roofline_tps": roofline,
         "ours": ours, "transformers": hf}, indent=2))


if __name__ == "__main__":
    main()
