"""Generation against transformers' generate, and the generator's own promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_gpt_bigcode, hf_starcoder2
from starcoder import StarCoderError, load_model
from starcoder.fim import PromptFormat
from starcoder.generate import Request, SamplingParams, generate, stream
from starcoder.tokenizer import Tokenizer

# Weights of std 1: with transformers' 0.02 init a tiny model repeats one token whatever the context, and
# token-for-token comparisons would prove little.
FAMILIES = {
    "gpt_bigcode": lambda: hf_gpt_bigcode(vocab_size=49152, n_positions=128, weight_std=1.0),
    "starcoder2": lambda: hf_starcoder2(vocab_size=49152, sliding_window=16, max_position_embeddings=128,
                                        weight_std=1.0),
}
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model, tokenizer) with the same random weights."""
    hf = FAMILIES[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path), Tokenizer.for_family(request.param)


def hf_greedy(hf, tokenizer, ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch, new tokens only, cut at our stop tokens."""
    stops = [tokenizer.token_id(t) for t in PromptFormat.for_tokenizer(tokenizer).stop_tokens]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = hf.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=stops, pad_token_id=0)
    results = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


def our_greedy(model, tokenizer, ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [c[0].token_ids for c in generate(model, tokenizer, [Request(x, params) for x in ids])]


def test_greedy_equals_transformers_plain_prompt(pair):
    hf, ours, tok = pair
    ids = [tok.encode(CODE)]
    ours_out = our_greedy(ours, tok, ids, 24)
    assert len(set(ours_out[0])) > 8  # the output depends on context: the comparison means something
    assert ours_out == hf_greedy(hf, tok, ids, 24)


def test_greedy_equals_transformers_fim_prompt(pair):
    hf, ours, tok = pair
    prompt = PromptFormat.for_tokenizer(tok).infill("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n")
    ids = [tok.encode(prompt)]
    assert ids[0][0] == tok.token_id("<fim_prefix>")
    assert our_greedy(ours, tok, ids, 16) == hf_greedy(hf, tok, ids, 16)


def test_greedy_equals_transformers_left_padded_batch(pair):
    hf, ours, tok = pair
    ids = [tok.encode(CODE), tok.encode("import os\n"), tok.encode("class Stack:\n    def push(self, x):")]
    assert our_greedy(ours, tok, ids, 12) == hf_greedy(hf, tok, ids, 12)


def test_greedy_past_the_sliding_window(pair):
    hf, ours, tok = pair
    ids = [tok.encode(CODE)[:10]]
    assert our_greedy(ours, tok, ids, 60) == hf_greedy(hf, tok, ids, 60)  # 70 positions, window 16


def test_a_windowed_model_holds_about_the_window_for_a_three_window_generation(pair, monkeypatch):
    """The generator's paged slots give back what falls out of the sliding window (blocks of 4 here): the KV
    memory of a 70-position greedy run stays near the window of 16, and its tokens stay transformers'."""
    import starcoder.cache
    from starcoder.generate import Generator

    hf, ours, tok = pair
    window = ours.config.sliding_window
    if window is None:
        pytest.skip("no sliding window in this family")
    monkeypatch.setattr(starcoder.cache, "BLOCK", 4)
    ids = tok.encode(CODE)[:10]
    generator = Generator(ours, tok, max_batch=2, prefix_cache_mb=0)
    events = generator.add(ids, SamplingParams(max_new_tokens=60))
    config, item = ours.config, generator.cache.pool.k.element_size()
    position_bytes = 2 * config.n_layer * config.n_kv_head * config.head_dim * item  # keys and values
    held = []
    while generator.active:
        events += generator.step()
        held.append(generator.cache.nbytes // position_bytes)
    assert max(held) <= window + 2 * 4 < 70  # the window and at most a block on either side
    tokens = next(e.completion.token_ids for e in events if e.completion is not None)
    assert tokens == hf_greedy(hf, tok, [ids], 60)[0]


def test_batch_equals_each_prompt_alone(pair):
    _, ours, tok = pair
    prompts = [tok.encode(CODE), tok.encode("x = 1"), tok.encode("# a comment\n")]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    together = [c[0].token_ids for c in generate(ours, tok, [Request(p, params) for p in prompts], max_batch=3)]
    alone = [generate(ours, tok, [Request(p, params)])[0][0].token_ids for p in prompts]
    assert together == alone


def test_seeded_sampling_is_reproducible_and_samples_differ(pair):
    _, ours, tok = pair
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    first = generate(ours, tok, [Request(tok.encode(CODE), params, n=3)])[0]
    again = generate(ours, tok, [Request(tok.encode(CODE), params, n=3)])[0]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) == 3
    assert [c.seed for c in first] == [7, 8, 9]


def test_n_samples_share_one_prefill(pair, monkeypatch):
    _, ours, tok = pair
    prompt_lengths = []
    original = ours.forward

    def counting(input_ids, *args, **kwargs):
        prompt_lengths.append(input_ids.shape[1])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(ours, "forward", counting)
    ids = tok.encode(CODE)
    generate(ours, tok, [Request(ids, SamplingParams(max_new_tokens=3, temperature=1.0, seed=0), n=4)])
    assert prompt_lengths.count(len(ids)) == 1  # one prefill; every later call is one token per sequence
    assert set(prompt_lengths) == {len(ids), 1}


def test_finish_reasons_and_stop_strings(pair):
    _, ours, tok = pair
    ids = tok.encode(CODE)
    free = generate(ours, tok, [Request(ids, SamplingParams(max_new_tokens=20, ignore_eos=True))])[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    # A stop string made of the middle of the free text, so it is likely to span token boundaries.
    text = free.text
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    if len(stop) < 2 or text.find(stop) == 0:
        pytest.skip("random text too short to cut a stop string from")
    stopped = generate(ours, tok, [Request(ids, SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                               stop=(stop, "never-seen")))])[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]


def test_streamed_text_is_the_completion_text(pair):
    _, ours, tok = pair
    params = SamplingParams(max_new_tokens=25, temperature=1.0, seed=1, stop=("\n\n",))
    pieces, completion = [], None
    for event in stream(ours, tok, [Request(tok.encode(CODE), params)]):
        pieces.append(event.text)
        completion = event.completion or completion
    assert "".join(pieces) == completion.text
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in tok.decode(completion.token_ids)


@pytest.mark.parametrize("family, stop_token", [("gpt_bigcode", "<|endoftext|>"), ("starcoder2", "<file_sep>"),
                                               ("starcoder2", "<fim_pad>")])
def test_end_tokens_end_generation(family, stop_token):
    from starcoder.generate import Sequence

    tok = Tokenizer.for_family(family)
    stops = {tok.token_id(t) for t in PromptFormat.for_tokenizer(tok).stop_tokens}
    seq = Sequence(tok.encode("x = "), SamplingParams(max_new_tokens=10), tok, stops)
    logits = torch.zeros(tok.vocab_size)
    logits[tok.token_id("1")] = 5.0
    assert seq.append(seq.choose(logits)) == "1" and seq.finish_reason is None
    logits[tok.token_id(stop_token)] = 10.0
    assert seq.append(seq.choose(logits)) == "" and seq.finish_reason == "eos"
    assert seq.completion().text == "1"


def test_logprobs_with_alternatives(pair):
    _, ours, tok = pair
    c = generate(ours, tok, [Request(tok.encode(CODE), SamplingParams(max_new_tokens=4, logprobs=3))])[0][0]
    for t in c.tokens:
        assert t.logprob is not None and t.logprob <= 0 and len(t.top) == 3
        assert t.top[0][2] >= t.top[1][2] >= t.top[2][2]
        assert t.top[0][0] == t.id  # greedy picks the most likely token
        assert t.logprob == pytest.approx(t.top[0][2])


def test_penalties_change_greedy_output(pair):
    _, ours, tok = pair
    ids = tok.encode(CODE)
    plain = generate(ours, tok, [Request(ids, SamplingParams(max_new_tokens=30, ignore_eos=True))])[0][0]
    penalised = generate(ours, tok, [Request(ids, SamplingParams(max_new_tokens=30, ignore_eos=True,
                                                                 frequency_penalty=2.0, presence_penalty=2.0))])[0][0]
    repeats = len(plain.token_ids) - len(set(plain.token_ids))
    if repeats == 0:
        pytest.skip("no repetition to penalise in this random output")
    assert len(penalised.token_ids) - len(set(penalised.token_ids)) < repeats


def test_context_overflow(pair):
    _, ours, tok = pair
    long_prompt = tok.encode(CODE * 20)[:120]
    with pytest.raises(StarCoderError, match=r"the prompt \(120 tokens\) plus max_new_tokens \(20\) exceeds the "
                                             r"context of 128 tokens"):
        generate(ours, tok, [Request(long_prompt, SamplingParams(max_new_tokens=20))])
    done = generate(ours, tok, [Request(long_prompt, SamplingParams(max_new_tokens=20, truncate=True))])[0][0]
    assert done.prompt_tokens == 108


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(stop=("",)), "stop must be non-empty strings"),
    (dict(logprobs=50), r"logprobs must be in \[0, 20\]"),
])
def test_bad_sampling_params(bad, message):
    with pytest.raises(StarCoderError, match=message):
        SamplingParams(**bad)


def test_a_failing_sequence_fails_alone(pair):
    """A sequence whose sampling breaks ends with an error event; the sequences beside it are unchanged."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    prompts = [tokenizer.encode(p) for p in ("import os\n", CODE, "class A:\n")]
    alone = [c[0].token_ids for c in generate(model, tokenizer, [Request(p, SamplingParams(max_new_tokens=8))
                                                                  for p in (prompts[0], prompts[2])])]
    generator = Generator(model, tokenizer, max_batch=4)
    bad = SamplingParams(max_new_tokens=8, temperature=1.0, repetition_penalty=1e-300)  # seen scores -> inf
    events = []
    for i, (ids, params) in enumerate(zip(prompts, (SamplingParams(max_new_tokens=8), bad,
                                                    SamplingParams(max_new_tokens=8)), strict=True)):
        events += generator.add(ids, params, request=i)
    while generator.active:
        events += generator.step()
    failed = [e for e in events if e.error is not None]
    assert [e.request for e in failed] == [1] and "sampling failed" in str(failed[0].error)
    done = {e.request: e.completion.token_ids for e in events if e.completion is not None}
    assert [done[0], done[2]] == alone
    with pytest.raises(StarCoderError, match="sampling failed"):  # the plain stream raises it
        list(stream(model, tokenizer, [Request(prompts[1], bad)]))


def test_tiny_temperature_and_top_p_and_the_largest_seed(pair):
    _, model, tokenizer = pair
    ids = tokenizer.encode(CODE)
    greedy = generate(model, tokenizer, [Request(ids, SamplingParams(max_new_tokens=6))])[0][0].token_ids
    tiny = SamplingParams(max_new_tokens=6, temperature=1e-31, seed=2**64 - 1)
    assert generate(model, tokenizer, [Request(ids, tiny)])[0][0].token_ids == greedy
    top1 = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-45, seed=2**64 - 1)  # rounds to 0 in float32
    assert generate(model, tokenizer, [Request(ids, top1, n=2)])[0][0].token_ids == greedy
    with pytest.raises(StarCoderError, match="seed"):
        SamplingParams(seed=2**64)


def feed(sequence, text: str) -> str:
    """Append the tokens of `text` one by one, as if the model chose them; the text shown."""
    shown = ""
    for token in sequence.tokenizer.encode(text):
        if sequence.finish_reason is not None:
            break
        from starcoder.generate import TokenInfo

        shown += sequence.append(TokenInfo(token, sequence.tokenizer.decode([token])))
    return shown


def test_min_indent_cuts_the_first_line_indented_less(pair):
    from starcoder.generate import Sequence

    _, _, tokenizer = pair
    params = SamplingParams(max_new_tokens=100, min_indent=4)
    seq = Sequence([1], params, tokenizer, set())
    shown = feed(seq, "x + 1\n    return x\n  y = 2\nprint(y)\n")
    # Lines indented enough go on; the first line indented less ends it, its indentation kept (as llama.cpp
    # does, which also counts an empty line as indented less)
    assert seq.finish_reason == "length" and seq.text == shown == "x + 1\n    return x\n  "
    blank = Sequence([1], params, tokenizer, set())
    assert feed(blank, "x\n    y\n\n    z\n") == "x\n    y\n"


def test_time_limit_ends_at_the_next_line_break(pair):
    from starcoder.generate import Sequence

    _, _, tokenizer = pair
    seq = Sequence([1], SamplingParams(max_new_tokens=100, time_limit=1e-9), tokenizer, set())
    feed(seq, "a = 1\nb = 2\n")
    assert seq.finish_reason == "length" and seq.text == "a = 1\n"
    unhurried = Sequence([1], SamplingParams(max_new_tokens=100, time_limit=60), tokenizer, set())
    feed(unhurried, "a = 1\nb = 2\n")
    assert unhurried.finish_reason is None


def test_non_finite_logits_fail_their_row_only(pair, monkeypatch):
    from starcoder.errors import ModelOutputError
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    generator = Generator(model, tokenizer, max_batch=2)
    for request in (0, 1):
        generator.add(tokenizer.encode(CODE), SamplingParams(max_new_tokens=4), request=request)
    forward = model.forward

    def nan_in_row_1(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[1:2] = float("nan")
        return out

    monkeypatch.setattr(model, "forward", nan_in_row_1)
    events = generator.step()
    assert isinstance(events[1].error, ModelOutputError) and events[0].error is None
    assert [seq.request for seq in generator.active] == [0]


# ------------------------------------------------------------------------------------------- prefix reuse, chunks
def run(generator, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[list[int]]:
    """Each prompt through the generator one after another (submitted, then stepped to the end)."""
    out = []
    for request, ids in enumerate(prompts):
        generator.submit(ids, params, n, request)
        done: dict[int, list[int]] = {}
        while generator.pending or generator.active:
            for event in generator.step():
                assert event.error is None
                if event.completion is not None:
                    done[event.sample] = event.completion.token_ids
        out += [done[s] for s in range(n)]
    return out


def test_prefix_reuse_and_chunked_prefill_give_the_same_tokens(pair):
    """Keystrokes in a fill-in-the-middle prompt (the prefix grows at its end, the suffix stays): with the prefix
    store and chunked prefill, every answer equals the one computed from scratch, past the sliding window."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    fmt = PromptFormat.for_tokenizer(tokenizer)
    typed = "    total = sum(values)"
    prompts = [tokenizer.encode(fmt.infill(CODE + typed[:i], "\n    return total\n")) for i in range(8, len(typed), 3)]
    params = SamplingParams(max_new_tokens=6)
    plain = run(Generator(model, tokenizer, max_batch=2, prefix_cache_mb=0), prompts, params)
    cached = Generator(model, tokenizer, max_batch=3, prefix_cache_mb=64, prefill_chunk=7)
    assert run(cached, prompts, params) == plain
    assert cached.reused_tokens > sum(len(p) for p in prompts[1:]) // 2  # most of each later prompt was reused
    assert run(cached, prompts[-1:], params, n=3) == plain[-1:] * 3  # n samples of a cached prompt


def test_requests_join_and_leave_while_a_long_prompt_is_chunked(pair, monkeypatch):
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    long_prompt, short = tokenizer.encode(CODE * 2), tokenizer.encode("import os\n")
    alone = generate(model, tokenizer, [Request(long_prompt, SamplingParams(max_new_tokens=8)),
                                        Request(short, SamplingParams(max_new_tokens=20))])
    generator = Generator(model, tokenizer, max_batch=2, prefill_chunk=4)
    generator.submit(short, SamplingParams(max_new_tokens=20), request=1)
    events = generator.step()  # the short prompt is done in one chunk and decodes from here on
    generator.submit(long_prompt, SamplingParams(max_new_tokens=8), request=0)
    passes = []
    for method in ("forward", "forward_together"):
        original = getattr(model, method)
        monkeypatch.setattr(model, method, lambda *a, _f=original, _m=method, **k: passes.append(_m) or _f(*a, **k))
    steps_while_prefilling = 0
    while generator.pending or generator.active:
        steps_while_prefilling += bool(generator.pending)
        events += generator.step()
    done = {e.request: e.completion.token_ids for e in events if e.completion is not None}
    assert [done[0], done[1]] == [alone[0][0].token_ids, alone[1][0].token_ids]
    assert steps_while_prefilling == -(-len(long_prompt) // 4)  # one chunk per step, the short one decoding
    # Each chunk rode along with the short one's decode step: one pass, one read of the weights.
    assert passes[:steps_while_prefilling] == ["forward_together"] * steps_while_prefilling
    assert set(passes[steps_while_prefilling:]) == {"forward"}


def test_a_prompt_chunk_grows_at_most_twofold(pair):
    """Chunks sized by time (no fixed prefill_chunk) at most double from one to the next: a step measured faster than
    the average made prompt tokens look free, and a whole long prompt went in one step, stalling the others."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    generator = Generator(model, tokenizer, max_batch=2)
    generator.add(tokenizer.encode("import os\n"), SamplingParams(max_new_tokens=20, ignore_eos=True), request=1)
    ids = tokenizer.encode(CODE * 8)[:120]
    generator.submit(ids, SamplingParams(max_new_tokens=1), request=0)
    sizes, job = [], generator.pending[0]
    while generator.pending:
        generator._step_seconds, generator._token_seconds = 0.1, 0.0  # a prompt token seen to cost nothing
        done = job.done
        generator.step()
        sizes.append(job.done - done)
    assert len(ids) > 64 and sizes == [64, len(ids) - 64]  # twice a first chunk's 32 tokens, then the rest


def test_a_prompt_computed_beside_decoding_is_scored_and_fails_alone(pair, monkeypatch):
    """Prompt logprobs of a prompt computed in chunks beside a running sequence equal those computed alone; a
    pass that fails together is retried apart, so only the prompt that cannot be computed fails."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    ids = tokenizer.encode(CODE * 2)
    scored = SamplingParams(max_new_tokens=8, prompt_logprobs=0)
    (alone,) = generate(model, tokenizer, [Request(ids, scored)])
    generator = Generator(model, tokenizer, max_batch=3, prefill_chunk=5)
    generator.add(tokenizer.encode("import os\n"), SamplingParams(max_new_tokens=30, ignore_eos=True), request=1)
    generator.submit(ids, scored, request=0)
    events = []
    while generator.pending:
        events += generator.step()
    (first,) = [e for e in events if e.request == 0]
    got, want = generator.active[1].prompt_logprobs, alone[0].prompt_logprobs
    assert [t.id for t in got] == [t.id for t in want]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=1e-4)  # other GEMM shapes
    assert first.token.id == alone[0].token_ids[0]

    def failing(*args, **kwargs):
        raise RuntimeError("a pass that cannot be computed")

    def prompts_fail(ids, *args, _forward=model.forward, **kwargs):  # decoding (one token per row) still works
        return failing() if ids.shape[1] > 1 else _forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward_together", failing)
    monkeypatch.setattr(model, "forward", prompts_fail)
    running = [s.request for s in generator.active]
    generator.submit(tokenizer.encode("class Stack:\n    pass\n"), SamplingParams(max_new_tokens=2), request=2)
    events = generator.step()
    assert sorted(e.request for e in events) == sorted(running + [2])  # a token each, and one event for 2:
    assert [e.request for e in events if e.finish_reason == "error"] == [2]  # its error
    assert not generator.pending and [s.request for s in generator.active] == running


def test_a_cancelled_prompt_leaves_what_was_computed(pair):
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    ids = tokenizer.encode(CODE * 2)
    generator = Generator(model, tokenizer, max_batch=1, prefill_chunk=8)
    generator.submit(ids, SamplingParams(max_new_tokens=4), request=5)
    generator.step()
    generator.step()
    generator.cancel(5)
    assert not generator.pending and generator.free_slots == 1
    prefix, n = generator.prefixes.longest(ids)
    assert n == 16 and len(prefix.tokens) == 16
    alone = generate(model, tokenizer, [Request(ids, SamplingParams(max_new_tokens=4))])[0][0].token_ids
    assert generator.add(ids, SamplingParams(max_new_tokens=4)) and generator.reused_tokens == 16
    while generator.active:
        generator.step()
    assert run(generator, [ids], SamplingParams(max_new_tokens=4)) == [alone]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_p=0.95, seed=11)])
def test_speculation_changes_nothing_but_speed(pair, sampling):
    """Drafted tokens are kept only as far as they equal the sequence's own choice, with its own random draws in
    the same order: greedy and seeded sampling give plain decoding's tokens, whatever the drafts."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    ids = tokenizer.encode(CODE * 2)
    params = SamplingParams(max_new_tokens=40, **sampling)
    (plain,) = run(Generator(model, tokenizer, max_batch=1), [ids], params)

    class HalfRight:  # right for two tokens, then wrong: both the taking and the refusing are exercised
        def draft(self, history, k):
            ahead = plain[len(history) - len(ids) : len(history) - len(ids) + k]
            return ahead[:2] + [(t + 1) % 49152 for t in ahead[2:]]

    speculative = Generator(model, tokenizer, max_batch=1, speculate=HalfRight())
    assert run(speculative, [ids], params) == [plain]
    assert 0 < speculative.accepted_tokens < speculative.drafted_tokens
    with pytest.raises(StarCoderError, match="unknown speculation"):
        Generator(model, tokenizer, speculate="medusa")
    with pytest.raises(StarCoderError, match="needs a draft model"):
        Generator(model, tokenizer, speculate="draft")


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_p=0.95, seed=11)])
def test_a_draft_model_changes_nothing_but_speed(pair, sampling, tmp_path):
    """A draft model that agrees (the model itself) and one that does not (other random weights): plain
    decoding's tokens either way, with requests joining and leaving (drafts only while one sequence decodes),
    past the sliding window."""
    from starcoder.generate import Generator
    from starcoder.speculate import DraftModel

    hf, model, tokenizer = pair
    family = hf.config.model_type
    other = FAMILIES[family]()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    other.save_pretrained(tmp_path)
    prompts = [tokenizer.encode(CODE * 2), tokenizer.encode("import os\n")]
    params = SamplingParams(max_new_tokens=40, **sampling)
    plain = run(Generator(model, tokenizer, max_batch=2), prompts, params)
    for draft_model, agrees in ((model, True), (load_model(tmp_path), False)):
        generator = Generator(model, tokenizer, max_batch=2, speculate=DraftModel(draft_model))
        assert run(generator, prompts, params) == plain
        together = generate(model, tokenizer, [Request(p, params) for p in prompts],
                            speculate=DraftModel(draft_model))
        assert [c[0].token_ids for c in together] == plain
        if agrees and not sampling:
            assert generator.accepted_tokens == generator.drafted_tokens > 0
        else:
            assert generator.accepted_tokens < generator.drafted_tokens


def test_prompt_lookup_drafts_from_finished_sequences(pair):
    """Prompt lookup also searches what finished sequences wrote: asked the same again (as an editor asks after
    each keystroke), the model's last answer is the draft, and it is taken; the tokens stay plain decoding's."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    prompts = [tokenizer.encode(CODE), tokenizer.encode("import os\n")]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = run(Generator(model, tokenizer, max_batch=1), [*prompts, prompts[0]], params)
    speculative = Generator(model, tokenizer, max_batch=1, speculate="ngram")
    assert run(speculative, prompts, params) == plain[:2]
    answer = plain[0]
    assert speculative.drafter.draft(prompts[0] + answer[:1], 8) == answer[1:9]
    drafted, accepted = speculative.drafted_tokens, speculative.accepted_tokens
    assert run(speculative, prompts[:1], params) == plain[2:]
    # every draft taken, and most of the 23 tokens after the first came from them
    assert speculative.accepted_tokens - accepted == speculative.drafted_tokens - drafted >= 16


def test_a_draft_model_must_share_the_tokenizer(tmp_path):
    from starcoder.speculate import DraftModel

    with pytest.raises(StarCoderError, match="draft model's tokenizer differs"):
        DraftModel(None, Tokenizer.for_family("gpt_bigcode"), Tokenizer.for_family("starcoder2"))


def test_ngram_draft_and_back_off():
    from starcoder.speculate import DraftLength, ngram_draft

    history = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert ngram_draft(history, 3) == [8, 9, 1]  # the tokens after the earlier "5 6 7"
    assert ngram_draft([1, 2, 3, 4], 3) == [] and ngram_draft(history, 0) == []
    earlier = [np.array([9, 3, 4]), np.array([2, 3, 4, 5, 6]), np.array([3, 4, 7])]  # newest first
    assert ngram_draft([1, 2, 3, 4], 3, earlier) == [5, 6]  # the longest n-gram wins over the newest text
    assert ngram_draft([8, 3, 4], 3, earlier) == [5, 6]  # the newest has "3 4" only at its end
    assert ngram_draft(history, 3, earlier) == [8, 9, 1]  # the sequence's own text first
    length = DraftLength(4)
    length.update(4, 4)
    assert length.value == 8
    for drafted in (8, 4, 2):
        length.update(drafted, 0)
    assert length.value == 1 and length.next() == 1
    length.update(1, 0)  # refused even at one token: a rest, longer each time
    assert [length.next() for _ in range(3)] == [0, 0, 1]
    length.update(1, 0)
    assert [length.next() for _ in range(5)] == [0, 0, 0, 0, 1]
    length.update(1, 1)
    assert length.value == 2 and length.next() == 2


def test_a_running_sequence_gets_a_token_every_step_while_a_long_prompt_is_computed(pair):
    """Automatic chunks: while a sequence decodes, a long prompt is computed a part per step (the running
    sequence's gap stays about three steps); with nothing decoding, a prompt is computed whole."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    generator = Generator(model, tokenizer, max_batch=2)
    generator.submit(tokenizer.encode("import os\n"), SamplingParams(max_new_tokens=60, ignore_eos=True), request=1)
    generator.step()  # alone: computed whole, then decoding
    long_prompt = tokenizer.encode(CODE * 2)[:100]
    generator.submit(long_prompt, SamplingParams(max_new_tokens=4), request=0)
    steps = 0
    while generator.pending:
        events = generator.step()
        steps += 1
        assert [e.request for e in events].count(1) == 1  # the running sequence never waits a step out
    assert 2 <= steps < len(long_prompt)
    assert generator._chunk() >= 16


def test_spm_layout_lets_typing_reuse_the_whole_prompt(pair):
    """With the suffix first and the prefix last, a keystroke only extends the prompt: all of it is reused."""
    from starcoder.generate import Generator

    _, model, tokenizer = pair
    fmt = PromptFormat.for_tokenizer(tokenizer)
    prompts = [tokenizer.encode(fmt.infill(CODE + "    total = "[:i], "\n    return total\n", "spm"))
               for i in range(4, 12)]
    generator = Generator(model, tokenizer, max_batch=1)
    plain = run(Generator(model, tokenizer, max_batch=1, prefix_cache_mb=0), prompts, SamplingParams(max_new_tokens=4))
    assert run(generator, prompts, SamplingParams(max_new_tokens=4)) == plain
    computed = sum(map(len, prompts)) - generator.reused_tokens
    assert computed <= len(prompts[0]) + 3 * (len(prompts) - 1)  # the first prompt, then a few tokens a keystroke


@pytest.mark.parametrize("family", ["gpt_bigcode", "starcoder2"])
def test_cache_reuse_takes_the_text_after_an_edit_at_its_new_positions(family, tmp_path):
    """Typing into the middle of a prompt: with cache_reuse the kept prompt's tail is taken at its new positions
    (rotary keys re-rotated) instead of computed. In a one-layer model keys and values depend only on the token
    and its position, so moving them is exact there: the same greedy tokens as computing the prompt whole. Keys
    of learned positions (StarCoder) cannot move: only the common prefix is reused."""
    from starcoder.cache import common_prefix
    from starcoder.generate import Generator

    if family == "starcoder2":
        hf = hf_starcoder2(vocab_size=49152, num_hidden_layers=1, sliding_window=16, max_position_embeddings=128,
                           weight_std=1.0)
    else:
        hf = hf_gpt_bigcode(vocab_size=49152, n_layer=1, n_positions=128, weight_std=1.0)
    hf.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path), Tokenizer.for_family(family)
    before, after = tok.encode("def area(r):\n    return "), tok.encode("\n\n\nprint(area(2.0))\n" * 2)
    first, second = before + tok.encode("3.14") + after, before + tok.encode("3.14159 * r * r") + after

    def greedy(generator, ids):
        events = generator.add(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
        while generator.active:
            events += generator.step()
        return next(e.completion.token_ids for e in events if e.completion is not None)

    generator = Generator(model, tok, max_batch=1, cache_reuse=4)
    greedy(generator, first)
    reused = generator.reused_tokens
    tokens = greedy(generator, second)
    shared = common_prefix(first, second)
    moved = len(after) - 1 if family == "starcoder2" else 0
    assert generator.reused_tokens - reused == shared + moved
    assert tokens == greedy(Generator(model, tok, max_batch=1, prefix_cache_mb=0), second)


def test_a_costly_drafter_drafts_only_while_it_pays():
    """A draft model's tokens cost time: at a low acceptance it rests (probing one token now and then), at a high
    one it drafts; a free drafter (prompt lookup) keeps its length whatever the acceptance."""
    from starcoder.speculate import DraftLength

    length = DraftLength(4)
    for _ in range(10):
        length.update(4, 0)
    lengths = [length.next(cost=0.3) for _ in range(40)]
    assert lengths.count(0) >= 30 and set(lengths) <= {0, 1}  # resting, with one-token probes
    length = DraftLength(4)
    for _ in range(10):
        length.update(4, 4)
    assert length.next(cost=0.3) >= 4
    length = DraftLength(8)
    for _ in range(5):
        length.update(8, 3)  # 0.375 kept: a cheap drafter should still draft, a costly one draft little
    assert length.next(cost=0.0) == length.value and length.next(cost=0.15) < length.value
