"""Our decoder against transformers: logits, padding, caching, loss, hidden states, classification."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import HF_MODELS, hf_gpt_bigcode, hf_starcoder2, ours_from_hf, random_ids, transformers
from starcoder import KVCache, load_model, model
from starcoder.linears import native


@torch.no_grad()
def test_logits_match_transformers(hf_model, tmp_path):
    ours = ours_from_hf(hf_model, tmp_path)
    ids = random_ids(2, 20)  # longer than the sliding window of the windowed model
    assert_close(ours(ids).logits, hf_model(ids).logits)


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-gqa"])
@torch.no_grad()
def test_long_prompts_match_transformers_with_queries_in_chunks(name, tmp_path):
    """A prompt longer than CAUSAL_QUERY_CHUNK, on heads 1024 wide, takes its attention a chunk of queries at a time
    (the last chunk shorter): the logits are still transformers'."""
    width = dict(n_embd=1024, n_head=8) if name.startswith("gpt") else dict(hidden_size=1024, num_attention_heads=8)
    hf_model = (hf_gpt_bigcode(n_positions=160, n_layer=1, **width) if name.startswith("gpt")
                else hf_starcoder2(max_position_embeddings=160, num_hidden_layers=1, **width))
    ours = ours_from_hf(hf_model, tmp_path)
    ids = random_ids(2, 150)
    assert ids.shape[1] > 2 * model.CAUSAL_QUERY_CHUNK
    assert_close(ours(ids).logits, hf_model(ids).logits)


@pytest.mark.parametrize("length", [1, 2, 3, 5])
@torch.no_grad()
def test_short_prompts_match_transformers(hf_model, length, tmp_path):
    ours = ours_from_hf(hf_model, tmp_path)
    ids = random_ids(2, length)
    assert_close(ours(ids).logits, hf_model(ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-gqa", "starcoder2-window"])
@torch.no_grad()
def test_padded_batch_matches_transformers(name, side, tmp_path):
    hf = HF_MODELS[name]()
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(3, 16)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 5), (2, 11)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, -pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    # Positions as generation uses them: counted over real tokens only.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    got = ours(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert_close(got[real], expected[real])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_reference_formula_bit_for_bit(dtype):
    """apply_rotary's rolled form gives transformers' x cos + rotate_half(x) sin exactly, in the model's dtype."""
    x = torch.randn(2, 5, 3, 16).to(dtype)
    cos, sin = model.rotary_cos_sin(torch.arange(7, 12)[None].expand(2, 5), 16, 10000.0, dtype)
    half = x.shape[-1] // 2
    reference = x * cos[:, :, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, :, None]
    assert torch.equal(model.apply_rotary(x, *model.rotation(cos, sin)), reference)


@torch.no_grad()
def test_padded_row_equals_the_row_alone(tmp_path):
    ours = ours_from_hf(hf_starcoder2(sliding_window=6), tmp_path)
    ids = random_ids(1, 12)
    alone = ours(ids).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    got = ours(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert_close(got[:, 4:], alone)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
@torch.no_grad()
def test_cached_decoding_equals_full_forward(name, tmp_path):
    ours = ours_from_hf(HF_MODELS[name](), tmp_path)
    ids = random_ids(2, 24)  # 24 > 3x the window of starcoder2-window: decoding runs far past it
    full = ours(ids).logits
    cache = ours.new_cache(batch_size=2, max_len=24)
    steps = [ours(ids[:, :5], cache=cache).logits]  # a prefill, then one token at a time
    for t in range(5, 24):
        steps.append(ours(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 24
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
@torch.no_grad()
def test_batches_computed_together_equal_each_alone(name, tmp_path):
    """Decode rows of a paged cache at different lengths and a prompt chunk in another cache, in one pass: the
    logits and what each cache holds afterwards are those of computing each batch on its own."""
    ours = ours_from_hf(HF_MODELS[name](), tmp_path)
    ids = random_ids(3, 30)

    def caches():
        rows, prompt = ours.new_cache(2, 30, paged=True), ours.new_cache(1, 30)
        for row, length in enumerate((9, 21)):  # rows at different lengths, past starcoder2-window's window
            ours(ids[row : row + 1, :length], cache=rows.rows(row))
        ours(ids[2:, :4], cache=prompt)
        return rows, prompt

    decode = torch.stack([ids[0, 9], ids[1, 21]])[:, None]  # (2, 1)
    rows, prompt = caches()
    alone = [ours(decode, cache=rows).logits, ours(ids[2:, 4:17], cache=prompt).logits]
    rows_together, prompt_together = caches()
    together = ours.forward_together([(decode, rows_together, 1), (ids[2:, 4:17], prompt_together, 0)])
    for got, want in zip(together, alone, strict=True):
        assert_close(got, want)
    assert rows_together.lengths.tolist() == [10, 22] and prompt_together.length == 17
    more = torch.tensor([[5], [6]])
    assert_close(ours(more, cache=rows_together).logits, ours(more, cache=rows).logits)
    assert_close(ours(more[:1], cache=prompt_together).logits, ours(more[:1], cache=prompt).logits)


@pytest.mark.skipif(native.avx2_kernels() is None, reason="the AVX2 kernels need an AVX2 CPU and a compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, KV, G, T, S, hd", [(1, 1, 16, 1, 700, 128), (2, 2, 3, 4, 37, 64), (3, 1, 1, 2, 130, 8),
                                               (1, 4, 2, 1, 1000, 24)])
@torch.no_grad()
def test_decoding_attention_kernel_equals_exact_attention(B, KV, G, T, S, hd, dtype):
    """Decoding's attention by our kernel (keys split among the threads, merged) equals attention computed in
    float64 (PyTorch's, which our kernel does not take) up to the rounding of its output, on a cache view with rows
    apart, with and without a mask; a NaN query gives NaN, as PyTorch's does."""
    q = torch.randn(B, T, KV * G, hd).to(dtype)
    k, v = (torch.randn(B, KV, S + 5, hd).to(dtype)[:, :, :S] for _ in range(2))  # rows apart, like a cache
    mask = torch.rand(B, 1, T, S) > 0.4
    mask[..., -1] = True  # a query always sees itself
    for pattern in (model.ALL_KEYS, mask):
        got = model.attend(q, k, v, pattern, 0.3)
        want = model.attend(q.double(), k.double(), v.double(), pattern, 0.3)
        assert got.dtype == dtype
        assert_close(got.double(), want, rtol=2**-8 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    q[0, 0, 0, 0] = float("nan")
    assert torch.isnan(model.attend(q, k, v, model.ALL_KEYS, 0.3)[0, 0, :hd]).all()


@pytest.mark.skipif(native.kernels("avx512") is None, reason="the prompt kernel needs AVX512-BF16 and a compiler")
@pytest.mark.parametrize("B, KV, G, T, S, hd", [(1, 1, 16, 203, 1403, 128), (2, 2, 3, 37, 100, 64),
                                               (1, 4, 2, 70, 70, 32), (3, 1, 1, 5, 130, 96)])
@torch.no_grad()
def test_prompt_attention_kernel_equals_exact_attention(B, KV, G, T, S, hd):
    """A bfloat16 prompt's attention by our kernel (keys in blocks with a running maximum; blocks nobody sees
    skipped) equals attention computed in float64 up to bfloat16 rounding: causal over the last T of S keys, a
    sliding window, a random mask; a NaN query gives NaN in its own row only."""
    q = torch.randn(B, T, KV * G, hd).bfloat16()
    k, v = (torch.randn(B, KV, S + 5, hd).bfloat16()[:, :, :S] for _ in range(2))  # rows apart, like a cache
    causal = model.last_queries_causal(T, S, "cpu")
    positions = torch.arange(S)
    window = causal & (positions[None, :] > positions[S - T :, None] - 17)
    random = (torch.rand(B, 1, T, S) > 0.4) | (positions[None, :] == positions[S - T :, None])  # sees itself
    for pattern in (causal[None, None], window[None, None], random):
        got = model._native_prompt_attention(q, k, v, pattern, 0.3)
        want = model.attend(q.double(), k.double(), v.double(), pattern, 0.3)
        assert_close(got.double(), want, rtol=2**-7, atol=2**-7)
    if T == S:  # the kernel's own causal pattern: no mask
        assert_close(model._native_prompt_attention(q, k, v, model.CAUSAL, 0.3).double(),
                     model.attend(q.double(), k.double(), v.double(), model.CAUSAL, 0.3), rtol=2**-7, atol=2**-7)
    q[0, -1, 0, 0] = float("nan")
    got = model.attend(q, k, v, causal[None, None], 0.3)
    assert torch.isnan(got[0, -1, :hd]).all() and not torch.isnan(got[0, :-1]).any()


@torch.no_grad()
def test_cached_decoding_with_left_padding(tmp_path):
    ours = ours_from_hf(hf_starcoder2(sliding_window=6), tmp_path)
    ids = random_ids(2, 14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = ours(ids, attention_mask=mask, position_ids=positions).logits
    cache = ours.new_cache(2, 14)
    steps = [ours(ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], cache=cache).logits]
    for t in range(6, 14):
        steps.append(ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                          cache=cache).logits)
    got = torch.cat(steps, dim=1)
    assert_close(got[mask.bool()], full[mask.bool()])


def test_cache_stores_only_kv_heads():
    from starcoder import preset

    mqa = preset("starcoder-15b")
    cache = KVCache(preset("tiny-starcoder"), batch_size=1, max_len=10, dtype=torch.float32)
    assert cache.k.shape == (2, 1, 1, 10, 16)  # (layers, B, one KV head, positions, head_dim)
    assert mqa.kv_cache_bytes_per_token(2) == 40 * 2 * 128 * 2  # 20 KiB/token, as published
    multi_head = mqa.with_changes(n_kv_head=mqa.n_head)
    assert multi_head.kv_cache_bytes_per_token(2) == mqa.n_head * mqa.kv_cache_bytes_per_token(2)


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-gqa"])
def test_loss_and_gradients_match_transformers(name, tmp_path):
    hf = HF_MODELS[name]()
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[0, :4] = -100
    hf_out = hf(ids, labels=labels)
    our_out = ours(ids, labels=labels)
    assert_close(our_out.loss, hf_out.loss)
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_embed = hf.get_input_embeddings().weight.grad
    assert_close(ours.model.embed.weight.grad, hf_embed)


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-window"])
@torch.no_grad()
def test_hidden_states_match_transformers(name, tmp_path):
    hf = HF_MODELS[name]()
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(1, 10)
    expected = hf(ids, output_hidden_states=True).hidden_states
    got = ours(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == hf.config.num_hidden_layers + 1
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


@pytest.mark.parametrize("family", ["gpt_bigcode", "starcoder2"])
@torch.no_grad()
def test_sequence_classification_matches_transformers(family, tmp_path):
    if family == "gpt_bigcode":
        hf_causal = hf_gpt_bigcode()
        cls = transformers.GPTBigCodeForSequenceClassification
    else:
        hf_causal = hf_starcoder2()
        cls = transformers.Starcoder2ForSequenceClassification
    hf_causal.config.num_labels = 3
    torch.manual_seed(1)
    hf = cls(hf_causal.config).eval()
    hf.save_pretrained(tmp_path / "cls")
    ours = load_model(tmp_path / "cls")
    assert type(ours).__name__ == "SequenceClassifier"
    ids = random_ids(3, 10)
    ids[1, 7:] = 0  # right padding (pad_token_id 0)
    ids[2, :3] = 0  # left padding
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    hf_out = hf(ids, attention_mask=mask, labels=labels)
    our_out = ours(ids, attention_mask=mask, labels=labels)
    assert our_out.logits.shape == (3, 3)
    assert_close(our_out.logits, hf_out.logits)
    assert_close(our_out.loss, hf_out.loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_close_to_transformers(dtype, tmp_path):
    hf = hf_starcoder2(sliding_window=8)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=dtype)
    assert ours.model.embed.weight.dtype == dtype
    ids = random_ids(1, 16)
    expected = hf.to(dtype)(ids).logits.float()
    got = ours(ids).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@torch.no_grad()
def test_learned_positions_past_the_table_is_a_clear_error(tmp_path):
    ours = ours_from_hf(hf_gpt_bigcode(), tmp_path)
    with pytest.raises(Exception, match="past the model's 64 learned positions"):
        ours(random_ids(1, 65))


@pytest.mark.parametrize("name", sorted(set(HF_MODELS) - {"gpt_bigcode-mqa"}))
@torch.no_grad()
def test_reference_kernels_are_bit_exact(name, tmp_path, monkeypatch):
    """With F.linear instead of oneDNN, the logits are transformers' to the last bit.

    Not for gpt_bigcode MQA: transformers computes q|k|v there in one GEMM of width n_embd + 2 head_dim, and the
    BLAS picks kernels by width, so our separate q, k, v products round differently (within float32 tolerance).
    """
    from starcoder.linears.dense import Linear

    monkeypatch.setattr(Linear, "use_onednn", False)
    hf = HF_MODELS[name]()
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(2, 20)
    assert torch.equal(ours(ids).logits, hf(ids).logits)


def test_onednn_linear_is_used_for_cpu_inference_only(monkeypatch):
    from starcoder.linears.dense import Linear, onednn_supports

    F = torch.nn.functional
    layer = Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh")
    plain = []  # which path ran: F.linear calls are counted
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *args, **kwargs: plain.append(1) or linear(*args, **kwargs))
    with torch.no_grad():
        assert_close(layer(x, activation="gelu_pytorch_tanh"), expected)
        assert_close(layer(x, activation="silu"), F.silu(layer(x)))
    assert len(plain) == (0 if onednn_supports(torch.float32) else 3)  # inference: oneDNN where it runs
    y = layer(x)  # gradients needed: the ordinary path, which has a backward
    assert len(plain) == (1 if onednn_supports(torch.float32) else 4)
    y.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-window"])
@torch.no_grad()
def test_packed_weights_give_the_same_logits(name, tmp_path):
    hf = HF_MODELS[name]()
    hf.save_pretrained(tmp_path / "hf")
    plain, packed = load_model(tmp_path / "hf"), load_model(tmp_path / "hf", pack=True)
    from starcoder.linears.dense import is_packed

    assert is_packed(packed) and not is_packed(plain)
    # q, k and v in one packed layer: one call per token instead of three
    assert all(b.attn.qkv is not None and not hasattr(b.attn, "q") for b in packed.model.layers)
    ids = random_ids(2, 12)
    assert_close(packed(ids).logits, plain(ids).logits)
    cache = packed.new_cache(2, 12)
    steps = [packed(ids[:, :4], cache=cache).logits] + [packed(ids[:, t : t + 1], cache=cache).logits
                                                         for t in range(4, 12)]
    assert_close(torch.cat(steps, 1), plain(ids).logits)


@pytest.mark.parametrize("activation", [None, "gelu_pytorch_tanh", "gelu"])
@torch.no_grad()
def test_packed_bfloat16_weights_decode_on_our_kernel_where_it_reads_onednns_layout(activation, monkeypatch):
    """Up to PACKED_DECODE_ROWS bfloat16 rows against a packed weight run our kernel on oneDNN's own bytes, where
    pack_weight saw their layout match; more rows, and layouts it does not know, run oneDNN. Both give the same
    results to bfloat16 rounding, and ours gives a row the same bits alone or among others."""
    from starcoder.linears import dense, native

    kernels = native.kernels("avx512")
    if kernels is None or not dense.onednn_supports(torch.bfloat16):
        pytest.skip("no AVX512-BF16 kernels on this CPU")
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def bf16_packed_matvec(self, *args):
            calls.append(args[0].shape[0])
            return kernels.bf16_packed_matvec(*args)

    monkeypatch.setattr(native, "kernels", lambda isa="avx512": Spy())
    w, bias = torch.randn(192, 96).bfloat16(), torch.randn(192).bfloat16()
    layer = model._packed_linear(w, bias)
    assert dense._decodes_packed[(torch.bfloat16, 192, 96)]
    for rows in range(1, dense.PACKED_DECODE_ROWS + 3):
        x = torch.randn(1, rows, 96).bfloat16()
        ours = layer(x, activation)
        onednn = dense.matmul(x, layer.weight, bias, activation)  # (a packed weight's own product)
        assert ours.shape == onednn.shape == (1, rows, 192) and ours.dtype == torch.bfloat16
        assert_close(ours.float(), onednn.float(), atol=0.02, rtol=0.02)
        if rows <= dense.PACKED_DECODE_ROWS:  # each row's sums run alike whatever rows come with it
            assert torch.equal(ours[:, -1:], layer(x[:, -1:], activation))
    assert calls == [n for rows in range(1, dense.PACKED_DECODE_ROWS + 1) for n in (rows, 1)]  # all, last alone
    layer.bias = torch.nn.Parameter(torch.zeros(192).bfloat16(), requires_grad=False)  # a new bias is read anew
    onednn = dense.matmul(x[:, :1], layer.weight, layer.bias, activation)
    assert_close(layer(x[:, :1], activation).float(), onednn.float(), atol=0.02, rtol=0.02)
    # a plain weight's bytes are not the packed layout; oneDNN pads 100 outputs to 128, which the kernel does not read
    assert not kernels.bf16_packed_layout_matches(w, w.data_ptr(), w.numel() * 2)
    calls.clear()
    odd = model._packed_linear(torch.randn(100, 64).bfloat16(), None)
    assert dense._decodes_packed[(torch.bfloat16, 100, 64)] is False
    assert odd(torch.randn(1, 1, 64).bfloat16()).shape == (1, 1, 100) and calls == []  # (oneDNN's)


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_models_compute_in_float32_where_the_cpu_emulates_their_dtype(name, dtype, tmp_path):
    """bfloat16 on a CPU without AVX512-BF16, float16 on any: the packed model keeps its weights as stored and
    computes in float32 (WidenedLinear), giving the float32 model's logits for the same weights, prompt and
    cached decoding alike, with a float32 cache; it refuses saving and training like any packed model."""
    from starcoder import StarCoderError, save_model
    from starcoder.linears.dense import is_packed
    from starcoder.linears.quantized import DecodeHead, WidenedLinear

    HF_MODELS[name]().to(dtype).save_pretrained(tmp_path / "hf")
    packed = load_model(tmp_path / "hf", pack=True)
    if not WidenedLinear.accepts(packed.model.embed.weight):
        pytest.skip(f"this CPU computes {dtype} natively (or has no AVX2 kernels)")
    wide = load_model(tmp_path / "hf", dtype="float32")
    block = packed.model.layers[0]
    assert all(isinstance(layer, WidenedLinear) for layer in (block.attn.qkv, block.attn.o, block.mlp.fc,
                                                                block.mlp.proj))
    assert isinstance(packed.lm_head, DecodeHead) and packed.model.embed.weight.dtype == dtype
    assert block.attn_norm.weight.dtype == torch.float32 and is_packed(packed)
    ids = random_ids(2, 12)
    assert_close(packed(ids).logits, wide(ids).logits)
    cache = packed.new_cache(2, 12)
    assert cache.k[0].dtype == torch.float32
    steps = [packed(ids[:, :4], cache=cache).logits] + [packed(ids[:, t : t + 1], cache=cache).logits
                                                         for t in range(4, 12)]
    assert_close(torch.cat(steps, 1), wide(ids).logits)
    with pytest.raises(StarCoderError, match="cannot be saved; load it without pack=True"):
        save_model(packed, tmp_path / "out")
    with torch.enable_grad(), pytest.raises(StarCoderError, match="packed for CPU inference"):
        block.mlp.fc(torch.randn(1, 2, block.mlp.fc.in_features, requires_grad=True))


def test_packed_models_refuse_training_and_saving(tmp_path):
    from starcoder import StarCoderError, save_model

    HF_MODELS["starcoder2-gqa"]().save_pretrained(tmp_path / "hf")
    packed = load_model(tmp_path / "hf", pack=True)
    with pytest.raises(StarCoderError, match="cannot be saved; load it without pack=True"):
        save_model(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    x = packed.model.embed(random_ids(1, 4)).requires_grad_()
    with pytest.raises(StarCoderError, match="packed for CPU inference"):
        packed.model.layers[0].mlp.fc(x)
