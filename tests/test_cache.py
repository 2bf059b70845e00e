"""KV cache slots: rows of different lengths decode together exactly as each would alone."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import HF_MODELS, ours_from_hf, random_ids
from starcoder import StarCoderError


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-gqa", "starcoder2-window"])
@torch.no_grad()
def test_rows_of_different_lengths_decode_together(name, tmp_path):
    model = ours_from_hf(HF_MODELS[name](), tmp_path)
    prompts = [random_ids(1, 5, seed=1), random_ids(1, 11, seed=2), random_ids(1, 2, seed=3)]
    continuation = random_ids(3, 12, seed=4)  # 11 + 12 tokens runs past the window of 8
    cache = model.new_cache(batch_size=3, max_len=24)
    for row, prompt in enumerate(prompts):
        model(prompt, cache=cache.rows(row))  # each prompt prefilled alone into its slot
    assert cache.lengths.tolist() == [5, 11, 2]
    steps = [model(continuation[:, t : t + 1], cache=cache).logits for t in range(12)]
    together = torch.cat(steps, dim=1)  # (3, 12, V)
    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, continuation[row : row + 1]], dim=1)).logits[:, prompt.shape[1] :]
        assert_close(together[row : row + 1], alone)


@torch.no_grad()
def test_copied_row_continues_like_the_original(tmp_path):
    model = ours_from_hf(HF_MODELS["starcoder2-window"](), tmp_path)
    prompt = random_ids(1, 10)
    cache = model.new_cache(batch_size=3, max_len=20)
    model(prompt, cache=cache.rows(0))
    cache.copy_row(0, 2)
    cache.clear(1)
    assert cache.lengths.tolist() == [10, 0, 10]
    token = random_ids(3, 1, seed=5)
    token[2] = token[0]
    model(token[1:2], cache=cache.rows(1))  # row 1 gets an unrelated one-token prompt
    out = model(token, cache=cache).logits
    assert_close(out[2], out[0])


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
