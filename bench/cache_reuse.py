"""Reusing the text after the cursor at its new positions (--cache-reuse) while typing, against the common prefix
alone (issue 15).

    python bench/cache_reuse.py [--preset starcoder2-3b] [--keystrokes 10] [--rounds 2]

The keystroke prompts of bench/editor.py (PSM fill-in-the-middle, ~1,200 prefix tokens ending in the line typed
so far, ~200 suffix tokens), one after another on one in-process generator, so every prompt after the first finds
the previous one kept. Reported per keystroke: prompt tokens computed and the time to the first new token (what
reuse changes), median over the keystrokes, best of --rounds, sides alternating. Random weights of a StarCoder2
shape (rotary keys are what can move; StarCoder's learned positions cannot).
"""

from __future__ import annotations

import statistics
import textwrap
import time
from pathlib import Path

from common import make_checkpoint
from common import parser as common_parser
from editor import keystroke_prompts


def replay(sc, prompts: list[list[int]], cache_reuse: int) -> tuple[float, float]:
    """Median prompt tokens computed and median seconds to the first token, over the keystrokes after the first."""
    from starcoder.generate import Generator, SamplingParams

    generator = Generator(sc.model, sc.tokenizer, max_batch=1, cache_reuse=cache_reuse)
    computed, seconds = [], []
    for ids in prompts:
        reused = generator.reused_tokens
        start = time.perf_counter()
        generator.add(ids, SamplingParams(max_new_tokens=1))
        seconds.append(time.perf_counter() - start)
        computed.append(len(ids) - (generator.reused_tokens - reused))
        while generator.active:
            generator.step()
    return statistics.median(computed[1:]), statistics.median(seconds[1:])


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.set_defaults(preset="starcoder2-3b")
    parser.add_argument("--keystrokes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-reuse", type=int, default=4)
    args = parser.parse_args()
    import torch

    import starcoder

    torch.set_grad_enabled(False)
    sc = starcoder.load(make_checkpoint(args.preset, args.dtype))
    prompts = keystroke_prompts(sc.tokenizer, Path(textwrap.__file__), args.keystrokes)
    best = {0: (0.0, float("inf")), args.cache_reuse: (0.0, float("inf"))}
    for _ in range(args.rounds):
        for reuse in best:
            result = replay(sc, prompts, reuse)
            best[reuse] = min(best[reuse], result, key=lambda r: r[1])
    print(f"{args.preset}, random, {args.dtype}; typing a line of textwrap.py, {args.keystrokes} keystrokes, "
          f"prompts of ~{len(prompts[0])} tokens; medians, best of {args.rounds}")
    print(f"{'':28}{'tokens computed':>16}{'first token (s)':>17}")
    for reuse, (computed, seconds) in best.items():
        label = "common prefix only" if reuse == 0 else f"--cache-reuse {reuse}"
        print(f"{label:28}{computed:16.0f}{seconds:17.3f}")
    print(f"speedup of the first token: {best[0][1] / best[args.cache_reuse][1]:.2f}x")


if __name__ == "__main__":
    main()
