"""Training benchmark: tokens/s and peak memory of our loop against transformers on the same model and data.

    python bench/training.py [--steps 12] [--micro-batch 16] [--seq-len 512]

Both sides start from the embedded model's weights and shape (see recipes/embedded), train on the same
FIM-transformed batches of the same tokenized data (a slice of the Python standard library), with AdamW, warmup +
cosine, gradient clipping and bfloat16 autocast, each in its own fresh process. Ours is `starcoder train`'s own
loop (data, FIM, logging included); transformers' is the same steps written around
Starcoder2ForCausalLM. Throughput counts the steps after the first two. Target (issue 4): >= 1.0x.
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
import time
from pathlib import Path

from common import RESULTS, peak_rss, run_child
from common import parser as common_parser

WARMUP = 2


def child_ours(model_dir: str, data: str, steps: int, micro_batch: int, seq_len: int) -> dict:
    from starcoder.train.loop import TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model=model_dir, data=data, out=out, seq_len=seq_len, micro_batch=micro_batch,
                             max_steps=steps, warmup_steps=2, eval_every=10**6, save_every=10**6)
        history = train(config, progress=False)["history"]
    timed = history[WARMUP:]
    return {"tokens_per_second": sum(micro_batch * seq_len for _ in timed) /
            sum(micro_batch * seq_len / h["tokens_per_second"] for h in timed),
            "peak_rss_bytes": peak_rss(), "losses": [h["loss"] for h in history]}


def child_transformers(model_dir: str, data: str, steps: int, micro_batch: int, seq_len: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from starcoder.tokenizer import Tokenizer
    from starcoder.train.data import TokenDataset
    from starcoder.train.loop import TrainConfig, learning_rate

    torch.manual_seed(0)
    config = TrainConfig(model=model_dir, data=data, out="-", seq_len=seq_len, micro_batch=micro_batch,
                         max_steps=steps, warmup_steps=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    tokenizer = Tokenizer.from_dir(Path(data) / "tokenizer")
    dataset = TokenDataset(Path(data) / "train", seq_len, tokenizer, config.fim_rate, config.spm_rate, config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                                  betas=(config.beta1, config.beta2), foreach=True)
    times, losses = [], []
    for step in range(steps):
        start = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = torch.from_numpy(np.stack([dataset.global_sample(step * micro_batch + i)
                                           for i in range(micro_batch)]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.monotonic() - start)
    timed = times[WARMUP:]
    return {"tokens_per_second": len(timed) * micro_batch * seq_len / sum(timed), "peak_rss_bytes": peak_rss(),
            "losses": losses}


def make_data(tokenizer_dir: Path) -> Path:
    """A slice of the standard library, tokenized with the model's tokenizer (written once)."""
    from starcoder.tokenizer import Tokenizer
    from starcoder.train.data import read_corpus, tokenize_corpus

    out = RESULTS / "training-data"
    if not (out / "train" / "index.json").exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        documents = read_corpus([stdlib / "json", stdlib / "email", stdlib / "asyncio"], {"python"})
        tokenize_corpus(documents, Tokenizer.from_dir(tokenizer_dir), out, 0.05, 0.0)
    return out


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.child:
        run = child_ours if args.child == "ours" else child_transformers
        print(json.dumps(run(args.model_dir, args.data, args.steps, args.micro_batch, args.seq_len)))
        return

    from starcoder.api import default_model_dir

    model_dir = default_model_dir()
    data = make_data(model_dir)
    child_args = ["--model-dir", str(model_dir), "--data", str(data), "--steps", str(args.steps),
                  "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len)]
    hf = run_child(__file__, "transformers", child_args)
    ours = run_child(__file__, "ours", child_args)
    gib = 1024**3
    print(f"embedded model shape, micro-batch {args.micro_batch} x {args.seq_len} tokens, bf16 autocast, AdamW, "
          f"{args.steps} steps ({WARMUP} not timed)")
    print(f"{'':22}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    print(f"{'tokens/s':22}{ours['tokens_per_second']:10.0f}{hf['tokens_per_second']:14.0f}"
          f"{ours['tokens_per_second'] / hf['tokens_per_second']:7.2f}x")
    print(f"{'peak RSS (GiB)':22}{ours['peak_rss_bytes'] / gib:10.2f}{hf['peak_rss_bytes'] / gib:14.2f}"
          f"{ours['peak_rss_bytes'] / hf['peak_rss_bytes']:7.2f}x")
    print(f"first losses, ours {[round(x, 3) for x in ours['losses'][:4]]}, "
          f"transformers {[round(x, 3) for x in hf['losses'][:4]]}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps({"ours": ours, "transformers": hf}, indent=2))


if __name__ == "__main__":
    main()
