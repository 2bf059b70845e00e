"""Model core benchmark: load time, peak RSS and forward throughput, ours against transformers in the same run.

    python bench/model_core.py [--preset starcoderbase-1b] [--dtype bfloat16] [--tokens 512] [--repeats 3]

Writes a random checkpoint of the preset's shape once (kept under bench/results/), then measures each side in
its own fresh process, so peak RSS is that side's alone. Targets (issue 2): peak RSS <= 1.3x the checkpoint's
bytes, load time <= transformers', forward tokens/s >= 1.0x transformers'.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import RESULTS, make_checkpoint, peak_rss, run_child
from common import parser as common_parser


def child(side: str, model_dir: str, tokens: int, repeats: int, dtype_name: str) -> dict:
    """Runs in a fresh process: load, then time forward passes over a random prompt."""
    import torch

    rss_before = peak_rss()
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    if side == "ours":
        from starcoder import load_model

        model = load_model(model_dir, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    load_seconds = time.perf_counter() - start
    peak_load = peak_rss()
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        logits = model(ids).logits  # warm-up (kernels, allocator)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    torch.save(logits[0, -8:].float().clone(), Path(model_dir) / f".logits-{side}.pt")
    return {
        "peak_rss_bytes": peak_rss(),
        "load_seconds": load_seconds,
        "rss_after_import_bytes": rss_before,
        "peak_rss_load_bytes": peak_load,
        "forward_seconds": min(times),
        "forward_tokens_per_second": tokens / min(times),
    }


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.tokens, args.repeats, args.dtype)))
        return

    import torch

    model_dir = make_checkpoint(args.preset, args.dtype)
    checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    results = {}
    for side in ("transformers", "ours"):  # alternate order does not matter: each is a fresh process
        results[side] = run_child(__file__, side, ["--model-dir", str(model_dir), "--tokens", str(args.tokens),
                                                   "--repeats", str(args.repeats), "--dtype", args.dtype])
    ours, hf = results["ours"], results["transformers"]
    diff = (torch.load(model_dir / ".logits-ours.pt") - torch.load(model_dir / ".logits-transformers.pt")).abs().max()

    gib = 1024**3
    threads = torch.get_num_threads()
    print(f"{args.preset}, {args.dtype}, checkpoint {checkpoint_bytes / gib:.2f} GiB, {threads} threads")
    print(f"{'':24}{'ours':>12}{'transformers':>14}{'ratio':>9}")
    rows = [
        ("load (s)", ours["load_seconds"], hf["load_seconds"], hf["load_seconds"] / ours["load_seconds"], "x faster"),
        ("peak RSS load (GiB)", ours["peak_rss_load_bytes"] / gib, hf["peak_rss_load_bytes"] / gib,
         ours["peak_rss_load_bytes"] / checkpoint_bytes, "x ckpt (ours)"),
        ("peak RSS +forward (GiB)", ours["peak_rss_bytes"] / gib, hf["peak_rss_bytes"] / gib,
         ours["peak_rss_bytes"] / checkpoint_bytes, "x ckpt (ours)"),
        (f"forward {args.tokens} tok/s", ours["forward_tokens_per_second"], hf["forward_tokens_per_second"],
         ours["forward_tokens_per_second"] / hf["forward_tokens_per_second"], "x transformers"),
    ]
    for name, a, b, ratio, unit in rows:
        print(f"{name:24}{a:12.2f}{b:14.2f}{ratio:9.2f} {unit}")
    print(f"peak RSS with forward, transformers / checkpoint: {hf['peak_rss_bytes'] / checkpoint_bytes:.2f}x; "
          f"RSS after importing torch: {ours['rss_after_import_bytes'] / gib:.2f} GiB")
    print(f"max |logit difference| on the last 8 positions ({args.dtype}): {float(diff):.4f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_core.json").write_text(json.dumps(
        {"preset": args.preset, "dtype": args.dtype, "checkpoint_bytes": checkpoint_bytes, **results}, indent=2))


if __name__ == "__main__":
    main()
