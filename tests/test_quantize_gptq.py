"""GPTQ's algorithm and AutoGPTQ's tensor layout."""

from __future__ import annotations

import pytest
import torch

from starcoder import StarCoderError
from starcoder.errors import CheckpointError
from starcoder.linears.gptq_layout import (
    QuantizedWeight,
    from_gptq_tensors,
    pack_columns,
    pack_rows,
    to_gptq_tensors,
    unpack_columns,
    unpack_rows,
)
from starcoder.quantize.gptq import Hessian, QuantSettings, gptq, rtn


def random_weight(N, K, bits, group_size, seed=0, act_order=True):
    """A random quantized weight; with act_order, the groups are spread over the inputs in a random order."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else K // group_size
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    return QuantizedWeight(
        q=torch.randint(0, 2**bits, (N, K), generator=g).to(torch.uint8),
        scales=(torch.rand(groups, N, generator=g) + 0.01).half().float(),
        zeros=torch.randint(1, 2**bits, (groups, N), generator=g).to(torch.int32),
        g_idx=(g_idx[torch.randperm(K, generator=g)] if act_order else g_idx).int(),
        bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trips(bits):
    values = torch.randint(0, 2**bits, (64, 48), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits), values)
    assert torch.equal(unpack_columns(pack_columns(values, bits), bits), values)


def test_the_bit_layout_is_autogptqs():
    q = torch.arange(8, dtype=torch.int32).reshape(8, 1)  # rows 0..7 of one column
    (word,) = pack_rows(q, 4).flatten().tolist()
    assert word == 0x76543210  # the lowest row in the lowest nibble
    weight = random_weight(16, 64, 4, -1)
    weight.zeros.fill_(8)  # symmetric 4-bit
    tensors = to_gptq_tensors(weight, "gptq")
    assert tensors["qzeros"].flatten().tolist() == [0x77777777] * 2  # v1 stores zero - 1
    assert to_gptq_tensors(weight, "gptq_v2")["qzeros"].flatten().tolist() == [0x88888888 - 2**32] * 2
    assert tensors["qweight"].shape == (8, 16) and tensors["scales"].dtype == torch.float16


@pytest.mark.parametrize("bits, group_size", [(4, -1), (4, 32), (8, -1), (8, 16)])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_tensors_round_trip(bits, group_size, checkpoint_format):
    weight = random_weight(32, 64, bits, group_size)
    back = from_gptq_tensors(to_gptq_tensors(weight, checkpoint_format), bits, group_size, checkpoint_format)
    assert torch.equal(back.q, weight.q) and torch.equal(back.zeros, weight.zeros)
    assert torch.equal(back.g_idx, weight.g_idx)
    torch.testing.assert_close(back.dequantize(), weight.dequantize(), rtol=0, atol=0)


def test_old_files_without_g_idx_and_damaged_files():
    weight = random_weight(16, 64, 4, 32)
    weight.g_idx = torch.arange(64, dtype=torch.int32) // 32
    tensors = to_gptq_tensors(weight)
    del tensors["g_idx"]
    assert torch.equal(from_gptq_tensors(tensors, 4, 32).g_idx, weight.g_idx)
    with pytest.raises(CheckpointError, match="layer.c_fc: scales .* do not fit"):
        from_gptq_tensors(tensors, 4, 16, name="layer.c_fc")
    with pytest.raises(CheckpointError, match="without qzeros"):
        from_gptq_tensors({"qweight": tensors["qweight"], "scales": tensors["scales"]}, 4, 32)
    bad = dict(tensors, g_idx=torch.full((64,), 5, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="g_idx points outside"):
        from_gptq_tensors(bad, 4, 32)
    with pytest.raises(CheckpointError, match="3-bit weights are not supported"):
        from_gptq_tensors(tensors, 3, 32)


def correlated_inputs(K, rows=2048, seed=0):
    """Activations whose features are strongly correlated, with a few much louder than the rest, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(K // 4, K, generator=g)
    x = torch.randn(rows, K // 4, generator=g) @ basis + 0.1 * torch.randn(rows, K, generator=g)
    return x * (1 + 4 * (torch.rand(K, generator=g) > 0.95))


@pytest.mark.parametrize("group_size, act_order, static_groups", [
    (-1, False, False), (-1, True, False), (32, False, False), (32, True, False), (32, True, True)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(group_size, act_order, static_groups):
    torch.manual_seed(0)
    N, K = 64, 128
    W = torch.randn(N, K)
    X = correlated_inputs(K)
    hessian = Hessian(K)
    for chunk in X.split(512):
        hessian.add(chunk)
    torch.testing.assert_close(hessian.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    settings = QuantSettings(bits=4, group_size=group_size, act_order=act_order, static_groups=static_groups)
    q_gptq, _ = gptq(W, hessian.H, settings)
    q_rtn = rtn(W, settings)

    def error(q):
        return float(((X @ W.T - X @ q.dequantize().T) ** 2).mean())

    assert error(q_gptq) < 0.8 * error(q_rtn), (error(q_gptq), error(q_rtn))
    assert q_gptq.q.max() <= 15 and q_gptq.scales.shape == (1 if group_size == -1 else K // group_size, N)
    g_idx = q_gptq.g_idx
    if act_order and group_size != -1 and not static_groups:
        assert not torch.equal(g_idx, torch.sort(g_idx).values)  # groups follow the act order
        assert torch.equal(torch.bincount(g_idx), torch.full((K // group_size,), group_size))
    else:
        assert torch.equal(g_idx, torch.arange(K, dtype=torch.int32) // (K if group_size == -1 else group_size))


def test_dead_inputs_and_ill_conditioned_hessians():
    K = 64
    X = correlated_inputs(K)
    X[:, 5] = 0  # an input that never fires
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(16, K)
    q, _ = gptq(W, H, QuantSettings())
    assert torch.all(q.dequantize()[:, 5] == 0)
    rank_one = torch.ones(K, K)  # singular: needs more damping, which is retried automatically
    q, _ = gptq(W, rank_one, QuantSettings())
    assert torch.isfinite(q.dequantize()).all()


def test_settings_are_checked():
    with pytest.raises(StarCoderError, match="bits must be one of"):
        QuantSettings(bits=3).check()
    with pytest.raises(StarCoderError, match="group size must be one of"):
        QuantSettings(group_size=100).check()
    with pytest.raises(StarCoderError, match="does not divide model.layers.0.mlp.fc's 96 inputs"):
        QuantSettings(group_size=64).check_layer("model.layers.0.mlp.fc", 96)
