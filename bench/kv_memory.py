"""The generator's paged KV cache against one preallocated max_batch x max_len block (issue 15).

    python bench/kv_memory.py [--preset starcoderbase-1b] [--batch 8] [--steps 5] [--repeats 5]

1. Memory: rows of 100, 200, ... tokens held by each layout (max_len = the model's context), and a sliding-window
   model (the embedded one) after a prompt of three windows and one decode step.
2. Speed: one decode step of the same rows in both layouts (the paged one gathers every row's blocks per layer),
   at batch 1 and --batch, alternating, best of --repeats.
"""

from __future__ import annotations

import time

from common import make_checkpoint
from common import parser as common_parser


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    import starcoder

    torch.set_grad_enabled(False)
    model = starcoder.load(make_checkpoint(args.preset, args.dtype)).model
    context = model.config.max_positions

    def filled(paged: bool, batch: int, length) -> object:
        cache = model.new_cache(batch, context, paged=paged)
        for row in range(batch):
            model(torch.full((1, length(row)), 100 + row), cache=cache.rows(row))
        return cache

    print(f"1. memory; {args.preset}, {args.dtype}, {args.batch} rows of 100, 200, ... tokens, max_len {context}")
    for paged in (False, True):
        cache = filled(paged, args.batch, lambda row: 100 * (row + 1))
        print(f"   {'paged' if paged else 'preallocated':>12}: {cache.nbytes / 2**20:8.1f} MiB")
    small = starcoder.load().model
    window = small.config.sliding_window
    cache = small.new_cache(1, small.config.max_positions, paged=True)
    small(torch.full((1, 3 * window), 5), cache=cache)
    small(torch.full((1, 1), 5), cache=cache)
    per_position = small.new_cache(1, 1).nbytes
    print(f"   embedded model, window {window}: after {3 * window + 1} positions it holds "
          f"{cache.nbytes // per_position} positions' keys and values")

    print(f"2. decode step; rows of 100, 103, 106, ... tokens; alternating, best of {args.repeats}")
    for batch in (1, args.batch):
        caches = {paged: filled(paged, batch, lambda row: 100 + 3 * row) for paged in (False, True)}
        token = torch.full((batch, 1), 42)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for paged, cache in caches.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(token, cache=cache)
                best[paged] = min(best[paged], (time.perf_counter() - start) / args.steps)
                cache.lengths -= args.steps  # the same positions again next time
        print(f"   batch {batch:2d}: preallocated {best[False] * 1e3:6.1f} ms, paged {best[True] * 1e3:6.1f} ms, "
              f"paged speed {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
