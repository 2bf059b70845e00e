"""Quantized linear layers: every runtime path against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from starcoder.linears import native
from starcoder.linears.quantized import DecodeHead, int4_block, quantized_linear
from test_quantize_gptq import random_weight

SHAPES = [(4, -1, 128, 512), (4, 64, 128, 256), (4, 128, 192, 256), (4, 32, 128, 256), (8, -1, 64, 256),
          (4, 32, 48, 64)]


def reference(weight, bias, x):
    return x.double() @ weight.dequantize().double().T + bias.double()


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits, group_size, N, K", SHAPES)
def test_float32_paths_equal_the_reference(bits, group_size, N, K, act_order, monkeypatch):
    """Without our kernels (no compiler, STARCODER_NATIVE_KERNELS=0), float32 models take PyTorch's kernels (or
    keep the dequantized weight): tight agreement with and without act-order (a g_idx that spreads the groups over
    the inputs in a random order) and groups."""
    monkeypatch.setattr(native, "avx2_kernels", lambda: None)
    weight, bias = random_weight(N, K, bits, group_size, act_order=act_order), torch.randn(N)
    layer = quantized_linear(weight, bias, torch.float32)
    expected_mode = {(4, 48): "dequantized"}.get((bits, N), "int4" if bits == 4 else "int8")
    assert layer.mode == expected_mode
    for rows in (1, 3, 40):  # decode kernels and the long-prompt path
        x = torch.randn(2, rows, K)
        torch.testing.assert_close(layer(x).double(), reference(weight, bias, x).view(2, rows, N), rtol=2e-5,
                                   atol=2e-5 * float(reference(weight, bias, x).abs().max()))


def test_pytorch_packs_int4_the_way_we_read_it():
    assert int4_block() in (64, 32)  # AVX-512 and AVX2 layouts


needs_native = pytest.mark.skipif(native.kernels() is None, reason="no AVX512-BF16 CPU or no compiler")


@needs_native
@pytest.mark.parametrize("int8_activations", ["1", "0"])
@pytest.mark.parametrize("bits, group_size, N, K", SHAPES[:5])
def test_native_kernels_equal_the_reference(bits, group_size, N, K, int8_activations, monkeypatch):
    """Our kernels on bfloat16 activations: float32 accumulation of exact products, so they agree with a float64
    reference up to the final rounding to bfloat16. int4 on int8 activations takes the AVX2 kernels' layout, whose
    long inputs dequantize it exactly."""
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", int8_activations)
    weight, bias = random_weight(N, K, bits, group_size), torch.zeros(N)
    layer = quantized_linear(weight, bias, torch.bfloat16)
    assert (layer.perm is not None) == (group_size != -1)  # act-order: inputs sorted by group at load
    exact_int4 = not native.int8_activations() and group_size != 32
    assert layer.mode == ("native-int8" if bits == 8 else "native-int4" if exact_int4 else "avx2-int4")
    kernels = native.kernels()
    if layer.mode.startswith("native"):
        for rows in (1, 2, 5, 8):
            x = torch.randn(rows, K).bfloat16()
            xp = (x if layer.perm is None else x.index_select(1, layer.perm)).contiguous()
            if bits == 4:
                y = kernels.int4_matvec(xp, layer.native_packed, layer.native_scales, layer.native_offsets,
                                        layer.kernel_group, None, 0)
            else:
                y = kernels.int8_matvec(xp, layer.int8_weight, layer.native_scales, layer.native_offsets, None, 0)
            expected = reference(weight, bias, x.float())
            # float32 sums of exact products, rounded once to bfloat16 (relative error <= 2^-9)
            torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-4 * float(expected.abs().max()))
    if bits == 4:  # the long-prompt path's dequantized weight is the weight, rounded to bfloat16
        w = torch.empty(N, K, dtype=torch.bfloat16)
        if layer.mode == "native-int4":
            kernels.int4_dequantize(layer.native_packed, layer.native_scales, layer.native_offsets,
                                    layer.kernel_group, w)
        else:
            kernels.int4x8_dequantize(layer.native_packed, layer.native_scales, layer.native_zeros,
                                      layer.kernel_group, w)
        sorted_weight = weight.dequantize()[:, layer.perm] if layer.perm is not None else weight.dequantize()
        torch.testing.assert_close(w.float(), sorted_weight.bfloat16().float(), rtol=0, atol=1e-6)
    # decode and long inputs agree through the layer itself (the long path rounds the weight to bfloat16), with
    # the bias and the activation done in the kernel's epilogue or after the matmul
    x = torch.randn(12, K).bfloat16()
    layer.bias = torch.nn.Parameter(torch.randn(N).bfloat16(), requires_grad=False)
    layer.native_bias = layer.bias.float()
    for activation in (None, "gelu_pytorch_tanh", "gelu"):
        short, long = layer(x[:3], activation).float(), layer(x, activation)[:3].float()
        assert float((short - long).abs().max() / long.abs().max()) < 2e-2, activation


@needs_native
@pytest.mark.skipif(not native.int8_activations(), reason="no AVX512-VNNI (or STARCODER_INT8_ACTIVATIONS=0)")
@pytest.mark.parametrize("N, K", [(64, 256), (96, 192)])
def test_integer_kernels_equal_their_contract_and_stay_close_to_exact(N, K, monkeypatch):
    """The AVX-512 int8-activation kernel against the same arithmetic in float64 (activations quantized per block
    of 64): equal up to float32 sums and the final bfloat16. Against the exact product the error is what int8
    activations cost; the bfloat16-activation kernel stays selectable."""
    bits, group_size = 8, -1
    weight, bias = random_weight(N, K, bits, group_size), torch.randn(N)
    layer = quantized_linear(weight, bias, torch.bfloat16)
    assert layer.int8_activations and "int8 activations" in repr(layer)
    kernels, contract = native.kernels(), ReferenceKernels()
    args = (layer.int8_weight, layer.native_scales, layer.native_offsets)

    def integer(kernels, x, activation):
        return kernels.int8_matvec_i8(x, *args, layer.native_bias, activation).double()

    for rows, activation in ((1, 0), (2, 1), (5, 2), (8, 0)):
        x = torch.randn(rows, K).bfloat16()
        x[:, 7] = 30.0  # an outlier channel, as real activations have
        got, want = integer(kernels, x, activation), integer(contract, x, activation)
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))
    x = torch.randn(4, K).bfloat16()
    exact = reference(weight, bias, x.float())
    error = float((layer(x).double() - exact).abs().max() / exact.abs().max())
    assert 0 < error < 2e-2, error
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", "0")
    exact_layer = quantized_linear(weight, bias, torch.bfloat16)
    assert not exact_layer.int8_activations
    assert float((exact_layer(x).double() - exact).abs().max() / exact.abs().max()) < 2**-7


@needs_native
@pytest.mark.parametrize("int8_activations", ["1", "0"])
def test_decode_head_reads_the_embedding_in_place(int8_activations, monkeypatch):
    """The head of a quantized model: decoding reads an int8 copy of the embedding (int8 activations) or the
    bfloat16 embedding in place; logits stay float32; long inputs use the embedding."""
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", int8_activations)
    embedding = torch.nn.Parameter(torch.randn(320, 128).bfloat16(), requires_grad=False)
    head = DecodeHead(embedding, "avx512")
    assert head.int8_activations == (int8_activations == "1" and native.int8_activations())
    x = torch.randn(1, 3, 128).bfloat16()
    expected = x.double() @ embedding.double().T
    got = head(x).double()
    assert float((got - expected).abs().max() / expected.abs().max()) < (3e-2 if head.int8_activations else 1e-2)
    if head.int8_activations:  # the int8 copy: per row, symmetric, and the kernel is its contract
        q8, scale = ReferenceKernels().int8_rows(embedding)
        assert torch.equal(head.q8, q8) and torch.equal(head.q8_scale, scale)
        contract = ReferenceKernels().int8_matvec_i8(x[0], head.q8, head.q8_scale, head.q8_offset, None, 0, True)
        raw = native.kernels().int8_matvec_i8(x[0], head.q8, head.q8_scale, head.q8_offset, None, 0, float_out=True)
        assert raw.dtype == torch.float32
        torch.testing.assert_close(raw.double(), contract.double(), rtol=1e-4, atol=1e-4 * float(contract.abs().max()))
    y = native.kernels().bf16_matvec(x[0].contiguous(), embedding)
    assert float((y.double() - expected[0]).abs().max() / expected.abs().max()) < 1e-5
    torch.testing.assert_close(head(torch.randn(1, 20, 128).bfloat16()).shape, torch.Size([1, 20, 320]))
class ReferenceKernels:
    """The native kernels' functions written in PyTorch from their documented layouts: lets the layers that call them
    (their packing, scales, offsets, bias and activation epilogue, the long-input path) be checked on any CPU."""

    @staticmethod
    def _int4_weight(packed, scales, offsets, group):
        N, K = packed.shape[0], packed.shape[1] * 2
        chunks = packed.view(N, K // 64, 32)  # byte j of a 64-input chunk: input j low, input 32 + j high
        q = torch.stack((chunks & 15, chunks >> 4), dim=2).view(N, K).float()
        groups = torch.arange(K) // group
        return q * scales[:, groups] + offsets[:, groups]

    @staticmethod
    def _int8_activations(x, block=64):
        """The integer kernels' activations: int8 per block of 64 (32 for the AVX2 kernels; scale max|x| / 127,
        x times the scale's inverse rounded half to even), back as the values they stand for."""
        M, K = x.shape
        blocks = x.float().view(M, K // block, block)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        return (torch.round(blocks * inverse) * scale).view(M, K).double()

    def int8_matvec_i8(self, x, q8, scale, offset, bias, activation, float_out=False):
        y = self._int8_activations(x) @ (q8.double() * scale[:, None]).T + x.double().sum(-1, keepdim=True) * offset
        y = self._epilogue(y.float(), bias, activation)
        return y if float_out else y.bfloat16()

    @staticmethod
    def _epilogue(y, bias, activation):
        y = y if bias is None else y + bias
        return {0: y, 1: torch.nn.functional.gelu(y, approximate="tanh"), 2: torch.nn.functional.gelu(y)}[activation]

    def int4_matvec(self, x, packed, scales, offsets, group, bias, activation):
        return self._epilogue(x.float() @ self._int4_weight(packed, scales, offsets, group).T, bias,
                              activation).bfloat16()

    def int4_dequantize(self, packed, scales, offsets, group, w):
        w.copy_(self._int4_weight(packed, scales, offsets, group))
        return w

    def int8_matvec(self, x, q8, scale, offset, bias, activation):
        return self._epilogue(x.float() @ (q8.float() * scale[:, None] + offset[:, None]).T, bias,
                              activation).bfloat16()

    def int8_dequantize(self, q8, scale, offset, w):
        w.copy_(q8.float() * scale[:, None] + offset[:, None])
        return w

    def int8_rows(self, w):
        scale = w.float().abs().amax(1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return [torch.round(w.float() * (1 / scale)[:, None]).to(torch.int8), scale]

    def bf16_matvec(self, x, w):
        return x.float() @ w.float().T


# int4 takes the AVX-512 kind on bfloat16 activations only (int8 ones go to the AVX2 kernels' layout,
# test_avx2_kernels_...)
@pytest.mark.parametrize("bits, group_size, N, K, int8_activations",
                         [(*shape, False) for shape in SHAPES[:3]]
                         + [(8, -1, N, K, int8) for N, K in ((64, 256), (96, 192)) for int8 in (False, True)])
def test_native_layers_on_reference_kernels(bits, group_size, N, K, int8_activations, monkeypatch):
    """The native layer kinds, on the native kernels' contract written in PyTorch: packing, act-order, scales and
    offsets, the bias and activation epilogue, and the long-input path through the model's shared buffer; with
    bfloat16 activations and with the integer kernels' int8 ones (whose rounding widens the bound on decoding)."""
    monkeypatch.setattr(native, "kernels", lambda isa="avx512": ReferenceKernels())
    monkeypatch.setattr(native, "avx2_kernels", lambda: None)
    monkeypatch.setattr(native, "int8_activations", lambda: int8_activations)
    weight, bias = random_weight(N, K, bits, group_size), torch.randn(N)
    layer = quantized_linear(weight, bias, torch.bfloat16)
    assert layer.mode == f"native-int{bits}" and layer.int8_activations == int8_activations
    for rows, activation in ((1, None), (3, "gelu_pytorch_tanh"), (8, "gelu"), (20, None), (20, "gelu")):
        x = torch.randn(rows, K).bfloat16()
        y = reference(weight, bias, x.float())
        if activation:
            y = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_pytorch_tanh" else "none")
        got = layer(x, activation).double()
        bound = 5e-2 if layer.int8_activations and rows <= 8 else 2e-2
        assert float((got - y).abs().max() / y.abs().max()) < bound, (rows, activation)
    expected = weight.dequantize()  # the weight back, to bfloat16 arithmetic
    torch.testing.assert_close(layer.dequantize().float(), expected, rtol=2**-8,
                               atol=2**-7 * float(expected.abs().max()))
    assert layer.nbytes < N * K * (bits / 8 + 0.2) + 16 * N  # stored compact, not as floats


needs_avx2 = pytest.mark.skipif(native.kernels("avx2") is None, reason="no AVX2 CPU or no compiler")


def int8_blocks_of_32(x):
    return ReferenceKernels._int8_activations(x, block=32)


def avx2_int4_layout(layer):
    """An AVX2 int4 layer's stored integers (N, K) and its scales and offsets (N, G), read from the documented
    layout (kernels_avx2.cpp): 8 rows interleaved, in 4 steps of 32 bytes per block of 32 inputs, byte 4r + i of
    step s holding inputs 8s + i (low nibble) and 8s + 4 + i (high)."""
    N, K = layer.out_features, layer.in_features
    steps = layer.native_packed.reshape(N // 8, K // 32, 4, 8, 4)  # (row group, block, step, row, input)
    q = torch.stack((steps & 15, steps >> 4), dim=-1)  # (..., row, input, nibble)
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(N, K)  # (row group, row, block, step, nibble, input)
    by_rows = lambda t: t.transpose(1, 2).reshape(N, -1)  # noqa: E731  (N / 8, G, 8) -> (N, G)
    scales = by_rows(layer.native_scales).float()
    return q, scales, -by_rows(layer.native_zeros).float() * scales


def avx2_contract(layer, x, activation):
    """What an AVX2 layer's decode kernel computes, in float64 from the layer's stored integers (inputs sorted by
    group): the integer part on int8 activations, the offsets on the exact group sums."""
    K = layer.in_features
    x = x.float() if layer.perm is None else x.float()[:, layer.perm]
    if layer.bits == 4:
        q, scales, offsets = avx2_int4_layout(layer)
    else:
        scales = layer.native_scales.float()  # (the stored scales and zeros: float16 and uint8)
        q, offsets = layer.int8_weight.float(), (128 - layer.native_zeros.float()) * scales
    G = scales.shape[1]
    groups = torch.arange(K) // (K // G)
    y = int8_blocks_of_32(x) @ (q.double() * scales.double()[:, groups]).T
    y += x.double().view(x.shape[0], G, -1).sum(-1) @ offsets.double().T
    return ReferenceKernels._epilogue(y, None if layer.bias is None else layer.bias.double(), activation)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, group_size, N, K", [(4, 32, 128, 256), (4, -1, 128, 512), (4, 128, 192, 256),
                                                    (4, 32, 40, 96), (8, 32, 64, 256), (8, -1, 96, 192),
                                                    (8, 64, 48, 128)])
def test_avx2_kernels_equal_their_contract_and_stay_close_to_exact(bits, group_size, N, K, dtype, monkeypatch):
    """The AVX2 layers (float32 models, groups of 32 on every CPU): the decode kernels equal their contract up to
    float32 sums; against the exact product the error is what int8 activations cost; long inputs run the same
    contract (int4) or dequantize exactly (int8); STARCODER_INT8_ACTIVATIONS=0 computes with the exact float32
    products."""
    build = native.kernels  # (on AVX512-BF16 CPUs bfloat16 models prefer the AVX-512 kinds: set those aside)
    monkeypatch.setattr(native, "kernels", lambda isa="avx512": None if isa == "avx512" else build(isa))
    weight, bias = random_weight(N, K, bits, group_size), torch.randn(N)
    layer = quantized_linear(weight, bias, dtype)
    assert layer.mode == f"avx2-int{bits}" and layer.int8_activations
    assert (layer.perm is not None) == (group_size != -1)  # act-order: inputs sorted by group at load
    for rows, activation in ((1, 0), (2, 1), (5, 2), (8, 0)):
        x = torch.randn(rows, K).to(dtype)
        x[:, 7] = 30.0  # an outlier channel, as real activations have
        name = (None, "gelu_pytorch_tanh", "gelu")[activation]
        got = layer(x, name).double()
        want = avx2_contract(layer, x, activation)
        torch.testing.assert_close(got, want.to(dtype).double(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5 * float(want.abs().max()))
        x = torch.randn(rows, K).to(dtype)  # without the outlier: the error int8 activations cost
        exact = reference(weight, bias, x.float())
        if name:
            exact = torch.nn.functional.gelu(exact, approximate="tanh" if activation == 1 else "none")
        assert float((layer(x, name).double() - exact).abs().max() / exact.abs().max()) < 2e-2
    if bits == 4 and native.vnni():  # 512-bit integer dot products: the same integer sums, so the same floats
        for rows in (1, 3, 8):
            args = (layer._kernel_input(torch.randn(rows, K).to(dtype)), layer.native_packed, layer.native_scales,
                    layer.native_zeros, layer.kernel_group, layer.native_bias, 1, True)
            assert torch.equal(layer.native.int4_matvec(*args, True), layer.native.int4_matvec(*args, False))
    x = torch.randn(37, K).to(dtype)  # long inputs
    if bits == 4:  # int4: the decode kernel over blocks of 8 rows, on int8 activations
        want = avx2_contract(layer, x, 1)
        torch.testing.assert_close(layer(x, "gelu_pytorch_tanh").double(), want.to(dtype).double(),
                                   rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5 * float(want.abs().max()))
    else:  # int8: the weight dequantized panel by panel inside the kernel
        expected = reference(weight, bias, x.float())
        torch.testing.assert_close(layer(x).double(), expected, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5,
                                   atol=(2e-2 if dtype == torch.bfloat16 else 1e-5) * float(expected.abs().max()))
    torch.testing.assert_close(layer.dequantize().double(), weight.dequantize().to(dtype).double(),
                               rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert layer.nbytes < N * K * (bits / 8 + 0.3) + 16 * N
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", "0")  # the exact path: float32 products, decoding too
    exact = quantized_linear(weight, bias, dtype)
    assert exact.mode == f"avx2-int{bits}" and not exact.int8_activations
    for rows, activation in ((1, None), (3, "gelu_pytorch_tanh"), (8, "gelu"), (37, "gelu")):  # 37: long inputs
        x = torch.randn(rows, K).to(dtype)
        want = reference(weight, bias.to(dtype).float(), x.float())  # (the bias as the layer holds it)
        if activation:
            want = torch.nn.functional.gelu(want, approximate="tanh" if activation.endswith("tanh") else "none")
        torch.testing.assert_close(exact(x, activation).double(), want.to(dtype).double(),
                                   rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-5 * float(want.abs().max()))


@needs_avx2
def test_avx2_decode_head_reads_an_int8_copy():
    """A quantized float32 model's head on AVX2: an int8 copy of the embedding (per row, symmetric, the scale
    stored as float16) for decoding, float32 logits; long inputs use the embedding."""
    embedding = torch.nn.Parameter(torch.randn(320, 128), requires_grad=False)
    head = DecodeHead(embedding, "avx2")
    q8, scale = ReferenceKernels().int8_rows(embedding)
    scale = scale.half().float()
    assert head.int8_activations and torch.equal(head.q8, q8) and torch.equal(head.q8_scale.float(), scale)
    x = torch.randn(1, 3, 128)
    contract = int8_blocks_of_32(x[0]) @ (q8.double() * scale.double()[:, None]).T
    torch.testing.assert_close(head(x)[0].double(), contract, rtol=1e-5, atol=1e-5 * float(contract.abs().max()))
    long = torch.randn(1, 20, 128)
    torch.testing.assert_close(head(long), long @ embedding.T)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K, bias", [(96, 256, True), (50, 48, False), (40, 528, True)])
def test_widened_layers_compute_in_float32_from_half_precision_weights(dtype, N, K, bias):
    """A half-precision weight under float32 activations (CPUs that emulate its dtype): decoding rows (1-8, with
    the fused bias and activations) and long inputs equal float32 arithmetic on the widened weight; the head of
    such a model reads its half-precision matrix in place (no int8 copy)."""
    from starcoder.linears.quantized import WidenedLinear

    weight = torch.randn(N, K).to(dtype)
    b = torch.randn(N) if bias else None
    layer = WidenedLinear(weight, b)
    assert layer.weight.dtype == dtype and layer.weight.data_ptr() == weight.data_ptr()  # held as stored
    wide = weight.double()
    for rows, activation in ((1, None), (2, "gelu_pytorch_tanh"), (5, "gelu"), (8, None), (20, None),
                             (37, "gelu_pytorch_tanh")):
        x = torch.randn(1, rows, K)
        want = x.double() @ wide.T + (0 if b is None else b.double())
        if activation:
            want = torch.nn.functional.gelu(want, approximate="tanh" if activation.endswith("tanh") else "none")
        got = layer(x, activation)
        assert got.dtype == torch.float32 and got.shape == (1, rows, N)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    head = DecodeHead(torch.nn.Parameter(weight, requires_grad=False), "avx2", quantized=False)
    assert not head.int8_activations and not hasattr(head, "q8")
    for rows in (1, 3, 20):
        x = torch.randn(1, rows, K)
        want = x.double() @ wide.T
        torch.testing.assert_close(head(x).double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, -1), (8, 32)])
def test_decode_kernels_cover_every_output_when_threads_take_each_others_work(bits, group_size):
    """The decode kernels hand out their output rows while they run (a thread done early takes rows from the back
    of another's share): with more threads than cores, threads are preempted and take each other's rows all the
    time, and every output must still be computed once, as one thread computes it."""
    if native.kernels() is None and native.avx2_kernels() is None:
        pytest.skip("no native kernels on this machine")
    weight, bias = random_weight(1024, 256, bits, group_size), torch.randn(1024)
    dtype = torch.bfloat16 if native.kernels() is not None else torch.float32
    layer = quantized_linear(weight, bias, dtype)
    threads = torch.get_num_threads()
    try:
        for _ in range(30):
            x = torch.randn(1, 256).to(dtype)
            torch.set_num_threads(7)
            shared = layer(x, "gelu_pytorch_tanh")
            torch.set_num_threads(1)
            assert torch.equal(shared, layer(x, "gelu_pytorch_tanh"))
    finally:
        torch.set_num_threads(threads)
