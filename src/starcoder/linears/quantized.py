"""Linear layers with 4- or 8-bit weights for CPU inference: one class per way of storing the integers, behind
one interface (forward, dequantize, nbytes); quantized_linear() picks the fastest one this machine and these
shapes allow.

Act-order is handled once, at load: the input rows are sorted by group so that groups are contiguous, and the
activations are permuted the same way at run time. The kinds, in order of preference:

  NativeInt4Linear, NativeInt8Linear  bfloat16 models on AVX512-BF16 CPUs: our kernels (native.py,
            kernels_avx512.cpp) decode from one byte per weight (int8, on int8 activations with integer dot
            products where the CPU has AVX512-VNNI, see native.py) or half a byte (int4, on bfloat16 activations:
            the exact path) at close to memory bandwidth; long prompts dequantize the layer once per call (into a
            buffer the model's layers share) and run one oneDNN matmul.
  Avx2Int4Linear, Avx2Int8Linear  int4 on every CPU with AVX2 (long prompts of bfloat16 models on AVX512-BF16
            CPUs as above), int8 for float32 models on AVX2 CPUs and for groups (llama.cpp's Q8_0 blocks, GPTQ's)
            on every CPU (kernels_avx2.cpp): int8 activations, 8-bit weights in groups.
  Int4Linear, Int8Linear  PyTorch's kernels: `_weight_int4pack_mm_for_cpu` for decoding (long prompts
            dequantize from its layout block by block), `_weight_int8pack_mm` for 8 bits.
  DequantizedLinear  shapes none of those takes: the weight is kept dequantized (correct, not compact).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .dense import NATIVE_ACTIVATIONS, activation_function, matmul, onednn_supports, refuse_training
from .gptq_layout import QuantizedWeight

DECODE_ROWS = 8  # up to this many input rows, the decode kernels; beyond, dequantize and run one matmul
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes PyTorch's int4 kernel takes
INNER_K_TILES = 2


def _stock_kernels() -> bool:
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch, "_weight_int8pack_mm")


@functools.cache
def int4_block() -> int | None:
    """How many output channels PyTorch's int4 layout packs together on this CPU (64 with AVX-512, 32 with AVX2),
    found on a probe; None if the layout is none that unpack_int4() reads (then long inputs use PyTorch's kernel
    too, only slower)."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
    for block in (64, 32):
        if torch.equal(unpack_int4(packed, 128, 64, block).to(torch.int32), q.view(128 // block, block, 64).mT):
            return block
    return None


def unpack_int4(packed: Tensor, N: int, K: int, block: int) -> Tensor:
    """The kernel's packed bytes (N, K/2) -> the integers as (N/block, K, block): block b holds output channels
    block*b .. block*b + block-1 (byte j of a row = channel j in the low nibble, channel j + block/2 in the high
    one)."""
    blocks = packed.view(N // block, K, block // 2)
    return torch.cat((blocks & 15, blocks >> 4), dim=-1)


class Scratch:
    """One growable buffer for the layers of one model, which run one at a time: where a long input's layer is
    dequantized before its matmul."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.bfloat16)

    def matrix(self, N: int, K: int, dtype: torch.dtype) -> Tensor:
        if self.buffer.numel() < N * K or self.buffer.dtype != dtype:
            self.buffer = torch.empty(N * K, dtype=dtype)
        return self.buffer[: N * K].view(N, K)

    def product(self, layer: QuantLinear, x: Tensor, activation: str | None) -> Tensor:
        """A long input through `layer`: its weight dequantized here (layer._dequantize_into), then one matmul."""
        w = self.matrix(layer.out_features, layer.in_features, layer.dtype)
        layer._dequantize_into(w)
        return matmul(x, w, layer.bias, activation)


class QuantLinear(nn.Module):
    """Drop-in for a dense Linear at inference: forward(x, activation=None). Subclasses store the integers."""

    mode = ""  # the storage's name, shown in the module's repr
    needs_scratch = False  # whether long inputs dequantize into the model's shared buffer (a Scratch argument)
    int8_activations = False  # whether decoding quantizes the activations for integer dot products

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features, self.bits, self.dtype = K, N, weight.bits, dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        order = torch.argsort(weight.g_idx, stable=True)
        self.perm = None if torch.equal(order, torch.arange(K)) else order
        if self.perm is not None:
            weight = QuantizedWeight(weight.q[:, order], weight.scales, weight.zeros, weight.g_idx[order],
                                     weight.bits, weight.group_size)
        self._store(weight)

    @staticmethod
    def group_size(weight: QuantizedWeight) -> int | None:
        """The one size of every group once sorted (K for a single group), or None when groups differ."""
        sizes = torch.bincount(weight.g_idx.long())
        size = weight.shape[1] if weight.group_size == -1 else int(sizes[0])
        return size if bool((sizes == size).all()) else None

    def _store(self, weight: QuantizedWeight) -> None:
        """Keep the weight (inputs sorted by group) in this kind's layout."""
        raise NotImplementedError

    def product(self, x: Tensor, activation: str | None) -> Tensor:
        """activation(x @ W^T + bias) for x (M, K) in the layer's dtype and input order."""
        raise NotImplementedError

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        # (conversions only where needed: a no-op .to() costs microseconds, and decoding calls every layer per token)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        if self.perm is not None:
            x2 = x2[:, self.perm]  # (faster than index_select along the last dimension)
        y = self.product(x2, activation).view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _finish(self, y: Tensor, activation: str | None) -> Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y if activation is None else activation_function(activation)(y)

    def dequantize(self) -> Tensor:
        """The weight (N, K) in the layer's dtype and the original input order: the layer applied to the unit
        vectors, a block of them at a time (a whole K x K identity would be gigabytes for a large layer)."""
        K, block = self.in_features, 1024
        w = torch.empty(self.out_features, K, dtype=self.dtype)
        biases = {name: getattr(self, name) for name in ("bias", "native_bias") if hasattr(self, name)}
        try:
            for name in biases:  # (the kernels read their float32 copy of the bias)
                setattr(self, name, None)
            for start in range(0, K, block):
                rows = min(block, K - start)
                units = torch.zeros(rows, K, dtype=self.dtype)
                units[torch.arange(rows), torch.arange(start, start + rows)] = 1
                w[:, start : start + rows] = self(units).T
        finally:
            for name, value in biases.items():
                setattr(self, name, value)
        return w

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def extra_repr(self) -> str:
        kind = self.mode + (", int8 activations" if self.int8_activations else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {kind}"


class _KernelProduct:
    """Our kernels' way to compute a layer: decoding in one call that also adds the bias and applies the
    activation; long inputs through _matmul."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    bias: Tensor | None
    native_bias: Tensor | None  # the bias as float32, for the kernels

    def product(self, x: Tensor, activation: str | None) -> Tensor:
        if x.shape[0] <= DECODE_ROWS and activation in NATIVE_ACTIVATIONS:
            return self._matvec(x if x.is_contiguous() else x.contiguous(), self.native_bias,
                                NATIVE_ACTIVATIONS[activation])
        return self._matmul(x, activation)

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        raise NotImplementedError

    def _matmul(self, x: Tensor, activation: str | None) -> Tensor:
        raise NotImplementedError


def _activated(y: Tensor, activation: str | None) -> Tensor:
    return y if activation is None else activation_function(activation)(y)


class _NativeLinear(_KernelProduct, QuantLinear):
    """Our kernels over integer weights (`isa`: which build, native.BUILDS)."""

    isa: str

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype):
        super().__init__(weight, bias, dtype)
        self.native = native.kernels(self.isa)
        # (from the bias as the layer holds it, in its dtype: every path adds the same bias)
        self.register_buffer("native_bias", None if self.bias is None else self.bias.float().contiguous())


class _Avx512Linear(_NativeLinear):
    """The AVX-512 kinds compute long inputs by dequantizing the layer into the model's scratch buffer (bfloat16)
    for one oneDNN matmul, which runs bfloat16 natively on those CPUs."""

    isa, needs_scratch = "avx512", True

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype, scratch: Scratch):
        super().__init__(weight, bias, dtype)
        self.scratch = scratch

    def _matmul(self, x: Tensor, activation: str | None) -> Tensor:
        return self.scratch.product(self, x, activation)

    def _dequantize_into(self, w: Tensor) -> None:
        raise NotImplementedError


class NativeInt4Linear(_Avx512Linear):
    """int4 for bfloat16 activations (the exact path, STARCODER_INT8_ACTIVATIONS=0, or an AVX-512 CPU without
    VNNI): bfloat16 products of the weights as they are stored, 2.8x the AVX2 kernels' exact float32 path there."""

    mode = "native-int4"

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        size = cls.group_size(weight)
        return (weight.bits == 4 and dtype == torch.bfloat16 and native.kernels() is not None
                and not native.int8_activations() and weight.shape[1] % 64 == 0 and size is not None
                and size % 64 == 0)

    def _store(self, weight: QuantizedWeight) -> None:
        N, K = weight.shape
        size = self.kernel_group = self.group_size(weight)
        blocks = weight.q.view(N, K // 64, 2, 32).to(torch.uint8)  # the kernels' layout: k0 + j low, k0 + 32 + j high
        self.register_buffer("native_packed", (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2))
        chunk_group = weight.g_idx[::size]
        scales = weight.scales.float()[chunk_group]  # (G, N)
        # (N, G): a row's scales and offsets share a cache line instead of G lines N * 4 bytes apart.
        self.register_buffer("native_scales", scales.T.contiguous())
        self.register_buffer("native_offsets", (-weight.zeros.float()[chunk_group] * scales).T.contiguous())

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        return self.native.int4_matvec(x, self.native_packed, self.native_scales, self.native_offsets,
                                       self.kernel_group, bias, activation)

    def _dequantize_into(self, w: Tensor) -> None:
        self.native.int4_dequantize(self.native_packed, self.native_scales, self.native_offsets, self.kernel_group, w)


def _signed_levels(weight: QuantizedWeight) -> Tensor:
    """8-bit levels q as int8 q - 128: q with its top bit flipped, no wider temporary."""
    return (weight.q.to(torch.uint8) ^ 0x80).view(torch.int8).contiguous()


def _int8_storage(layer: QuantLinear, weight: QuantizedWeight, group: int) -> tuple[Tensor, Tensor]:
    """8-bit weights (inputs sorted by group) as int8 q - 128, and the scale and offset of each (output channel,
    group) as float32 [N, G]; (q - zero) * scale = (q - 128) * scale + (128 - zero) * scale."""
    layer.register_buffer("int8_weight", _signed_levels(weight))
    chunk_group = weight.g_idx[::group]
    scale = weight.scales.float()[chunk_group]
    return scale.T.contiguous(), ((128 - weight.zeros.float()[chunk_group]) * scale).T.contiguous()


def _stored_groups(weight: QuantizedWeight, group: int) -> tuple[Tensor, Tensor]:
    """Each group's scale as float16 and zero as uint8 (G, N), as checkpoints hold them, for the AVX2 kernels,
    which form the offsets themselves (3 bytes per group and channel instead of 8)."""
    chunk_group = weight.g_idx[::group]
    return weight.scales[chunk_group].half(), weight.zeros[chunk_group].to(torch.uint8)


class NativeInt8Linear(_Avx512Linear):
    mode = "native-int8"

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return (weight.bits == 8 and weight.group_size == -1 and dtype == torch.bfloat16
                and native.kernels() is not None and weight.shape[1] % 16 == 0)

    def _store(self, weight: QuantizedWeight) -> None:
        scale, offset = _int8_storage(self, weight, self.in_features)
        self.register_buffer("native_scales", scale.view(-1))
        self.register_buffer("native_offsets", offset.view(-1))
        self.int8_activations = native.int8_activations() and self.in_features % 64 == 0

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        matvec = self.native.int8_matvec_i8 if self.int8_activations else self.native.int8_matvec
        return matvec(x, self.int8_weight, self.native_scales, self.native_offsets, bias, activation)

    def _dequantize_into(self, w: Tensor) -> None:
        self.native.int8_dequantize(self.int8_weight, self.native_scales, self.native_offsets, w)


def as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class _Avx2Kernels:
    """What the AVX2 kernels take: float32 or bfloat16 models (they compute in float32), groups of 32 inputs or a
    multiple, a number of inputs that their blocks divide. Decoding quantizes the activations to int8 unless
    STARCODER_INT8_ACTIVATIONS=0 (then float32 products, exact); long inputs dequantize the weights panel by panel
    inside the kernel (no float copy of the layer), or run on int8 activations too (int4)."""

    isa = "avx2"
    bits: int
    inputs_multiple: int

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.int8_activations = native.int8_activations_allowed()

    def _kernel_input(self, x: Tensor) -> Tensor:
        """x as the decode kernels take it: bfloat16 as it is on int8 activations (the kernels quantize it and
        answer in bfloat16: no conversion on either side), else float32."""
        return x if self.int8_activations and x.dtype == torch.bfloat16 else as_float32(x)

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        size = cls.group_size(weight)
        # (scales exact in float16, zeros in a byte: what every checkpoint holds, and what the kernels store)
        return (weight.bits == cls.bits and dtype in (torch.float32, torch.bfloat16)
                and native.avx2_kernels() is not None and weight.shape[1] % cls.inputs_multiple == 0
                and size is not None and size % 32 == 0
                and torch.equal(weight.scales.half().float(), weight.scales.float())
                and int(weight.zeros.min()) >= 0 and int(weight.zeros.max()) <= 255)


class Avx2Int4Linear(_Avx2Kernels, _NativeLinear):
    """The AVX2 kernels, with int8 activations, on their own packing: 8 output rows interleaved
    (kernels_avx2.cpp). bfloat16 models on AVX512-BF16 CPUs take them too, for decoding (their interleaved rows
    stream 14% faster there than the AVX-512 kernel's rows one by one did, as llama.cpp repacks Q4_0 8 rows
    together), with long inputs dequantized into the model's scratch buffer (int4x8_dequantize, AVX-512) for one
    oneDNN bfloat16 matmul."""

    mode, bits, inputs_multiple, needs_scratch = "avx2-int4", 4, 32, True

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype, scratch: Scratch):
        super().__init__(weight, bias, dtype)
        self.scratch = scratch
        self.avx512 = native.kernels("avx512") if dtype == torch.bfloat16 and onednn_supports(dtype) else None

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return super().accepts(weight, dtype) and weight.shape[0] % 8 == 0

    def _store(self, weight: QuantizedWeight) -> None:
        N, K = weight.shape
        size = self.kernel_group = self.group_size(weight)
        # Each byte pairs input k0 + 8 step + i (low nibble) with k0 + 8 step + 4 + i (high), then a step's 4 bytes
        # move as one word: (row group, row, block, step) -> (row group, block, step, row). Pairing first moves half
        # the bytes, and moving words copies a quarter of the elements (1.5x faster than moving bytes one by one).
        q = weight.q.to(torch.uint8).view(N, K // 32, 4, 2, 4)
        steps = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).view(torch.int32).view(N // 8, 8, K // 32, 4)
        self.register_buffer("native_packed", steps.permute(0, 2, 3, 1).contiguous().view(torch.uint8).view(N, K // 2))
        for name, t in zip(("native_scales", "native_zeros"), _stored_groups(weight, size), strict=True):
            self.register_buffer(name, t.view(t.shape[0], N // 8, 8).transpose(0, 1).contiguous())  # (N / 8, G, 8)

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        return self.native.int4_matvec(self._kernel_input(x), self.native_packed, self.native_scales, self.native_zeros,
                                       self.kernel_group, bias, activation, self.int8_activations, native.vnni())

    def _matmul(self, x: Tensor, activation: str | None) -> Tensor:
        if self.avx512 is not None:
            return self.scratch.product(self, x, activation)
        if self.int8_activations and activation in NATIVE_ACTIVATIONS:
            # Long inputs on int8 activations too, as llama.cpp computes prompts: the decode kernel over blocks of
            # 8 rows, each 8 output rows' weights read from the cache for 256 input rows, 1.3-1.8x the float32
            # product of the weights dequantized panel by panel (integer dot products do 4x the work per
            # instruction); that product stays the exact path.
            return self._matvec(x.contiguous(), self.native_bias, NATIVE_ACTIVATIONS[activation])
        return _activated(self.native.int4_matmul(as_float32(x).contiguous(), self.native_packed, self.native_scales,
                                                  self.native_zeros, self.kernel_group, self.native_bias), activation)

    def _dequantize_into(self, w: Tensor) -> None:
        self.avx512.int4x8_dequantize(self.native_packed, self.native_scales, self.native_zeros, self.kernel_group, w)


class Avx2Int8Linear(_Avx2Kernels, _NativeLinear):
    """8-bit weights with a scale and offset per group of 32 inputs or a multiple (Q8_0's blocks, GPTQ's groups)
    or per channel, on the AVX2 kernels."""

    mode, bits, inputs_multiple = "avx2-int8", 8, 32

    def _store(self, weight: QuantizedWeight) -> None:
        self.kernel_group = self.group_size(weight)
        self.register_buffer("int8_weight", _signed_levels(weight))
        for name, t in zip(("native_scales", "native_zeros"), _stored_groups(weight, self.kernel_group), strict=True):
            self.register_buffer(name, t.T.contiguous())  # (N, G)

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        return self.native.int8_matvec(self._kernel_input(x), self.int8_weight, self.native_scales, self.native_zeros,
                                       self.kernel_group, bias, activation, self.int8_activations)

    def _matmul(self, x: Tensor, activation: str | None) -> Tensor:
        return _activated(self.native.int8_matmul(as_float32(x).contiguous(), self.int8_weight, self.native_scales,
                                                  self.native_zeros, self.kernel_group, self.native_bias), activation)


class WidenedLinear(_KernelProduct, nn.Module):
    """Half-precision weights (bfloat16, float16) for float32 activations, on CPUs that do not compute in the
    weights' dtype natively (bfloat16 without AVX512-BF16: emulated, prefill 5x slower than float32; float16 on
    any CPU): decoding reads the 2-byte weights at memory bandwidth and widens them in registers (the AVX2
    kernels' half_matvec); long inputs widen them panel by panel inside the kernel's matmul (half_matmul). The
    sums are float32's, as a float32 model holding the same weights computes them."""

    mode, packed = "widened", True  # q, k and v fused, float32 biases: an inference-only layout (is_packed)

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype, self.native = torch.float32, native.kernels("avx2")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)

    @classmethod
    def accepts(cls, weight: Tensor) -> bool:
        """Whether this machine runs a layer of this weight better widened than in its own dtype."""
        emulated = weight.dtype == torch.float16 or (weight.dtype == torch.bfloat16
                                                     and not onednn_supports(torch.bfloat16))
        return emulated and weight.is_cpu and weight.shape[1] % 16 == 0 and native.kernels("avx2") is not None

    @property
    def native_bias(self) -> Tensor | None:
        return self.bias

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        refuse_training(x)
        y = self.product(as_float32(x.reshape(-1, self.in_features)), activation)
        return y.view(*x.shape[:-1], self.out_features)

    def _matvec(self, x: Tensor, bias: Tensor | None, activation: int) -> Tensor:
        return self.native.half_matvec(x, self.weight, bias, activation)

    def _matmul(self, x: Tensor, activation: str | None) -> Tensor:
        return _activated(self.native.half_matmul(x.contiguous(), self.weight, self.bias), activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype} weights"


class Int4Linear(QuantLinear):
    """PyTorch's int4 kernel for decoding; long inputs dequantize its layout block by block."""

    mode = "int4"

    @classmethod
    def kernel_group_of(cls, weight: QuantizedWeight) -> int | None:
        size, K = cls.group_size(weight), weight.shape[1]
        return None if size is None else next((g for g in KERNEL_GROUPS if size % g == 0 and K % g == 0), None)

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return (weight.bits == 4 and _stock_kernels() and weight.shape[0] % 64 == 0  # 64: the widest layout block
                and cls.kernel_group_of(weight) is not None)

    def _store(self, weight: QuantizedWeight) -> None:
        g = self.kernel_group = self.kernel_group_of(weight)
        chunk_group = weight.g_idx[::g]  # the GPTQ group of each run of g input rows
        scales = weight.scales.float()[chunk_group]  # (K / g, N)
        # The kernel computes (q - 8) * scale + offset; GPTQ's (q - zero) * scale needs offset = (8 - zero) * scale.
        offsets = (8 - weight.zeros.float()[chunk_group]) * scales
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weight.q.to(torch.int32).contiguous(), INNER_K_TILES))
        self.register_buffer("scales_and_zeros", torch.stack((scales, offsets), dim=-1).to(self.dtype).contiguous())

    def product(self, x: Tensor, activation: str | None) -> Tensor:
        if x.shape[0] <= DECODE_ROWS or int4_block() is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.kernel_group,
                                                          self.scales_and_zeros)
        else:
            y = self._dequantized_matmul(x)
        return self._finish(y, activation)

    def _dequantized_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) @ W^T for long inputs: W rebuilt in the layer's dtype from the packed bytes, a layout block of
        channels at a time (64, or 32 on AVX2), each block's matmul one slice of a batched matmul."""
        N, K, g, B = self.out_features, self.in_features, self.kernel_group, int4_block()
        q = unpack_int4(self.packed, N, K, B)  # (N/B, K, B) uint8
        sz = self.scales_and_zeros.view(K // g, N // B, B, 2).transpose(0, 1)  # (N/B, K/g, B, 2)
        scale, offset = sz[..., 0].unsqueeze(2), sz[..., 1].unsqueeze(2)  # (N/B, K/g, 1, B)
        # (q - 8) * scale + offset = q * scale + (offset - 8 * scale)
        w = torch.empty(N // B, K // g, g, B, dtype=self.dtype)
        torch.addcmul(offset - 8 * scale, q.view(N // B, K // g, g, B), scale, out=w)
        y = torch.matmul(x.unsqueeze(0), w.view(N // B, K, B))  # (N/B, M, B)
        return y.transpose(0, 1).reshape(x.shape[0], N)


class Int8Linear(QuantLinear):
    """PyTorch's per-channel int8 kernel; the zero point becomes an offset per channel times the sum of the
    inputs."""

    mode = "int8"

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return weight.bits == 8 and weight.group_size == -1 and _stock_kernels()

    def _store(self, weight: QuantizedWeight) -> None:
        scale, offset = _int8_storage(self, weight, self.in_features)
        self.register_buffer("int8_scale", scale.view(-1).to(self.dtype))
        self.register_buffer("int8_offset", None if bool((offset == 0).all()) else offset.view(-1).to(self.dtype))

    def product(self, x: Tensor, activation: str | None) -> Tensor:
        y = torch._weight_int8pack_mm(x.contiguous(), self.int8_weight, self.int8_scale)
        if self.int8_offset is not None:
            y = y + x.sum(dim=1, keepdim=True) * self.int8_offset
        return self._finish(y, activation)


class DequantizedLinear(QuantLinear):
    mode = "dequantized"

    @classmethod
    def accepts(cls, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return True

    def _store(self, weight: QuantizedWeight) -> None:
        self.register_buffer("weight", weight.dequantize(self.dtype))

    def product(self, x: Tensor, activation: str | None) -> Tensor:
        return self._finish(F.linear(x, self.weight), activation)


KINDS = (NativeInt4Linear, NativeInt8Linear, Avx2Int4Linear, Avx2Int8Linear, Int4Linear, Int8Linear,
         DequantizedLinear)  # most preferred first


def quantized_linear(weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype = torch.bfloat16,
                     scratch: Scratch | None = None) -> QuantLinear:
    """The first kind in KINDS that takes this weight on this machine."""
    kind = next(k for k in KINDS if k.accepts(weight, dtype))
    if kind.needs_scratch:
        return kind(weight, bias, dtype, scratch or Scratch())
    return kind(weight, bias, dtype)


class DecodeHead(nn.Module):
    """The lm_head (usually tied to the embedding) of a model whose linears run on our kernels: decoding reads it
    with them too (`isa`, a build in native.BUILDS). A quantized model (quantized=True) whose decoding uses int8
    activations reads an int8 copy of the head (per row, symmetric; a quarter of float32's bytes, half of
    bfloat16's: the float head is a large part of what a 4-bit model reads per token), as llama.cpp keeps its
    output matrix quantized; else the matrix in place: bfloat16 under bfloat16 activations (AVX-512), or half
    precision widened for float32 ones (AVX2, the widened models). Long inputs use the float matrix."""

    def __init__(self, weight: nn.Parameter, isa: str, quantized: bool = True):
        super().__init__()
        self.weight, self.isa, self.kernels = weight, isa, native.kernels(isa)
        allowed = native.int8_activations_allowed() if isa == "avx2" else native.int8_activations()
        self.int8_activations = quantized and allowed and weight.shape[1] % 64 == 0
        if self.int8_activations:
            q8, scale = self.kernels.int8_rows(weight.contiguous())
            # derived from the weight: not part of the model's state (saving, exporting)
            self.register_buffer("q8", q8, persistent=False)
            if isa == "avx2":  # float16 scales and uint8 zeros (128: q8 is symmetric), as the AVX2 kernels take them
                self.register_buffer("q8_scale", scale.half(), persistent=False)
                self.register_buffer("q8_zero", torch.full_like(scale, 128, dtype=torch.uint8), persistent=False)
            else:
                self.register_buffer("q8_scale", scale, persistent=False)
                self.register_buffer("q8_offset", torch.zeros_like(scale), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        half = self.weight.dtype in (torch.bfloat16, torch.float16)
        widened = self.isa == "avx2" and half and x2.dtype == torch.float32 and x2.shape[1] % 16 == 0
        if x2.shape[0] > DECODE_ROWS and widened:
            y = self.kernels.half_matmul(x2.contiguous(), self.weight, None)
        elif x2.shape[0] > DECODE_ROWS:
            y = matmul(x2, self.weight.to(x2.dtype))
        elif self.int8_activations and self.isa == "avx2":
            y = self.kernels.int8_matvec(x2.float().contiguous(), self.q8, self.q8_scale, self.q8_zero,
                                         x2.shape[1], None, 0, True)
        elif self.int8_activations:
            y = self.kernels.int8_matvec_i8(x2.contiguous(), self.q8, self.q8_scale, self.q8_offset, None, 0,
                                            float_out=True)
        elif self.isa == "avx512" and x2.dtype == self.weight.dtype == torch.bfloat16:
            y = self.kernels.bf16_matvec(x2.contiguous(), self.weight)
        elif widened:
            y = self.kernels.half_matvec(x2.contiguous(), self.weight, None, 0)
        else:
            y = matmul(x2, self.weight.to(x2.dtype))
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def head_kernels(dtype: torch.dtype) -> str | None:
    """Which build of our kernels decodes a quantized model's head in `dtype` on this machine (None: none does)."""
    if dtype == torch.bfloat16 and native.kernels("avx512") is not None:
        return "avx512"
    if dtype in (torch.float32, torch.bfloat16) and native.avx2_kernels() is not None:
        return "avx2"
    return None
