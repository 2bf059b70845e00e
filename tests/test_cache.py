"""KV cache slots: rows of different lengths decode together exactly as each would alone."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import HF_MODELS, ours_from_hf, random_ids
from starcoder import StarCoderError


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-gqa", "starcoder2-window"])
@torch.no_grad()
def test_rows_of_different_lengths_decode_together(name, paged, tmp_path):
    model = ours_from_hf(HF_MODELS[name](), tmp_path)
    prompts = [random_ids(1, 5, seed=1), random_ids(1, 11, seed=2), random_ids(1, 2, seed=3)]
    continuation = random_ids(3, 12, seed=4)  # 11 + 12 tokens runs past the window of 8
    cache = model.new_cache(batch_size=3, max_len=24, paged=paged)
    for row, prompt in enumerate(prompts):
        model(prompt, cache=cache.rows(row))  # each prompt prefilled alone into its slot
    assert cache.lengths.tolist() == [5, 11, 2]
    steps = [model(continuation[:, t : t + 1], cache=cache).logits for t in range(12)]
    together = torch.cat(steps, dim=1)  # (3, 12, V)
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, continuation[row : row + 1]], dim=1)).logits[:, prompt.shape[1] :]
        assert_close(together[row : row + 1], alone)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@torch.no_grad()
def test_a_moved_row_continues_like_the_original(paged, tmp_path):
    model = ours_from_hf(HF_MODELS["starcoder2-window"](), tmp_path)
    prompt, other = random_ids(1, 10), random_ids(1, 3, seed=7)
    cache = model.new_cache(batch_size=3, max_len=20, paged=paged)
    model(prompt, cache=cache.rows(0))
    model(prompt, cache=cache.rows(2))
    model(other, cache=cache.rows(1))
    token = random_ids(3, 1, seed=5)
    expected = model(token[:1], cache=cache.rows(0)).logits
    cache.move_row(2, 0)  # row 2's copy of the prompt takes the place of row 0 (which went on)
    assert cache.lengths.tolist() == [10, 3, 0]
    out = model(token[:2], cache=cache.rows(0, 2)).logits
    assert_close(out[:1], expected)
    assert_close(out[1:], model(torch.cat([other, token[1:2]], 1)).logits[:, -1:])


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-window"])
@torch.no_grad()
def test_a_paged_row_holds_its_tokens_and_a_windowed_one_only_the_window(name, tmp_path, monkeypatch):
    """Blocks follow the tokens a row holds; under a sliding window a row generating three windows' worth keeps
    about one window of blocks, and its logits stay those of the whole sequence computed at once."""
    import starcoder.cache

    monkeypatch.setattr(starcoder.cache, "BLOCK", 4)
    model = ours_from_hf(HF_MODELS[name](), tmp_path)
    window = model.config.sliding_window
    ids = random_ids(1, 60, seed=3)
    full = model(ids).logits
    cache = model.new_cache(batch_size=2, max_len=64, paged=True)
    model(ids[:, :5], cache=cache.rows(1))  # a short neighbour
    prompt = model(ids[:, :6], cache=cache.rows(0)).logits
    held = []
    steps = []
    for t in range(6, 60):
        steps.append(model(ids[:, t : t + 1], cache=cache.rows(0)).logits)
        held.append(len(cache.state[0].blocks))
    assert_close(torch.cat([prompt, *steps], 1), full)
    block_bytes = cache.nbytes // sum(len(s.blocks) for s in cache.state)
    if window:
        assert 3 * window <= 60 and max(held) <= window // 4 + 2  # about the window, however long the row runs
    else:
        assert held[-1] == 15 and cache.nbytes == (15 + 2) * block_bytes  # 60 and 5 tokens in blocks of 4
    cache.clear(0)
    assert cache.nbytes == 2 * block_bytes


def test_cache_overflow_is_a_clear_error(tmp_path):
    model = ours_from_hf(HF_MODELS["gpt_bigcode-mqa"](), tmp_path)
    cache = model.new_cache(batch_size=1, max_len=4)
    with pytest.raises(StarCoderError, match="the KV cache holds 4 positions; 0 used, 5 more asked"):
        model(random_ids(1, 5), cache=cache)


def test_prefix_store_longest_match_replacement_and_lru_budget():
    from starcoder.cache import PrefixStore

    def kv(n):  # (n_layer, n_kv, n, hd) float32: 2 * 4 * n * 4 bytes each
        return torch.arange(2 * n * 4, dtype=torch.float32).reshape(2, 1, n, 4), torch.zeros(2, 1, n, 4)

    store = PrefixStore(max_bytes=20 * 2 * (2 * 1 * 4 * 4))  # room for 20 positions of keys and values
    store.put([1, 2, 3, 4], *kv(4))
    store.put([1, 2, 3, 4, 5, 6], *kv(6))  # supersedes its own prefix
    assert len(store.entries) == 1
    prefix, n = store.longest([1, 2, 3, 9])
    assert n == 3 and prefix.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.equal(prefix.k, kv(6)[0])  # a copy of what was given
    store.put([7, 8] * 4, *kv(8))
    store.longest([1, 2])  # used: the other one is now the least recently used
    store.put([9] * 8, *kv(8))  # over the budget: the least recently used goes
    assert store.longest([7, 8])[1] == 0 and store.longest([1, 2])[1] == 2 and store.nbytes <= store.max_bytes
    store.put(list(range(30)), *kv(30))  # larger than the whole budget: not kept, nothing lost
    assert store.longest(list(range(30)))[1] == 0 and len(store.entries) == 2
