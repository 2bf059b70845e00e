"""Linear layers with 4- or 8-bit weights for CPU inference.

Act-order is handled once, at load: the input rows are sorted by group so that groups are contiguous, and the
activations are permuted the same way at run time. Then, by what the machine and the shapes allow:

  native    bfloat16 models on AVX512-BF16 CPUs: our kernels (native.py, kernels.cpp) decode from half a byte
            (or one byte) per weight at close to memory bandwidth; long prompts dequantize the layer to
            bfloat16 once per call and run one oneDNN matmul.
  stock     PyTorch's kernels: `_weight_int4pack_mm_for_cpu` for decoding (long prompts dequantize from its
            layout block by block), `_weight_int8pack_mm` for 8 bits.
  dequantized  shapes neither takes: the weight is kept dequantized (correct, not compact).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import _FUSABLE, _activation, onednn_supports
from . import native
from .pack import QuantizedWeight

DECODE_ROWS = 8  # up to this many input rows, the decode kernels; beyond, dequantize and run one matmul
_NATIVE_ACTIVATIONS = {None: 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # what kernels.cpp applies itself
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernel takes
INNER_K_TILES = 2


def _kernels_available() -> bool:
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


class QuantLinear(nn.Module):
    """Drop-in for model.Linear at inference: forward(x, activation=None)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        N, K = weight.shape
        self.in_features, self.out_features, self.bits, self.dtype = K, N, weight.bits, dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        order = torch.argsort(weight.g_idx, stable=True)
        self.perm = None if torch.equal(order, torch.arange(K)) else order
        sorted_groups = weight.g_idx[order].long()
        q = weight.q[:, order]
        self.mode = "dequantized"
        self.native = native.kernels() if dtype == torch.bfloat16 else None
        if self.native is not None and bias is not None:
            self.register_buffer("native_bias", bias.float().contiguous())
        if self.native is not None:
            if weight.bits == 4:
                self._setup_native_int4(q, weight, sorted_groups)
            elif weight.bits == 8 and weight.group_size == -1:
                self._setup_native_int8(q, weight)
        if self.mode == "dequantized" and _kernels_available():
            if weight.bits == 4:
                self._setup_int4(q, weight, sorted_groups)
            elif weight.bits == 8 and weight.group_size == -1:
                self._setup_int8(q, weight)
        if self.mode == "dequantized":
            sorted_weight = QuantizedWeight(q, weight.scales, weight.zeros, sorted_groups, weight.bits,
                                            weight.group_size)
            self.register_buffer("weight", sorted_weight.dequantize(dtype))

    def _setup_native_int4(self, q: Tensor, weight: QuantizedWeight, groups: Tensor) -> None:
        N, K = q.shape
        sizes = torch.bincount(groups)
        size = K if weight.group_size == -1 else int(sizes[0])
        if K % 64 or size % 64 or not bool((sizes == size).all()):
            return
        blocks = q.view(N, K // 64, 2, 32).to(torch.uint8)  # kernels.cpp's layout: k0 + j low, k0 + 32 + j high
        self.register_buffer("native_packed", (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2))
        chunk_group = groups[::size]
        scales = weight.scales.float()[chunk_group]  # (G, N)
        # (N, G): a row's scales and offsets share a cache line instead of G lines N * 4 bytes apart.
        self.register_buffer("native_scales", scales.T.contiguous())
        self.register_buffer("native_offsets", (-weight.zeros.float()[chunk_group] * scales).T.contiguous())
        self.kernel_group = size
        self.mode = "native-int4"

    def _setup_native_int8(self, q: Tensor, weight: QuantizedWeight) -> None:
        # q - 128 as int8 is q with its top bit flipped: no wider temporary
        self.register_buffer("int8_weight", (q.to(torch.uint8) ^ 0x80).view(torch.int8).contiguous())
        scale = weight.scales.float()[0].contiguous()
        self.register_buffer("native_scales", scale)
        self.register_buffer("native_offsets", ((128 - weight.zeros.float()[0]) * scale).contiguous())
        self.mode = "native-int8"

    def _setup_int4(self, q: Tensor, weight: QuantizedWeight, groups: Tensor) -> None:
        N, K = q.shape
        sizes = torch.bincount(groups)
        size = K if weight.group_size == -1 else int(sizes[0])
        kernel_group = next((g for g in KERNEL_GROUPS if size % g == 0 and K % g == 0), None)
        if kernel_group is None or N % 64 or not bool((sizes == size).all()):  # 64: the widest layout block
            return
        chunk_group = groups[::kernel_group]  # the GPTQ group of each run of kernel_group input rows
        scales = weight.scales.float()[chunk_group]  # (K / kernel_group, N)
        # The kernel computes (q - 8) * scale + offset; GPTQ's (q - zero) * scale needs offset = (8 - zero) * scale.
        offsets = (8 - weight.zeros.float()[chunk_group]) * scales
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), INNER_K_TILES))
        self.register_buffer("scales_and_zeros", torch.stack((scales, offsets), dim=-1).to(self.dtype).contiguous())
        self.kernel_group = kernel_group
        self.mode = "int4"

    def _setup_int8(self, q: Tensor, weight: QuantizedWeight) -> None:
        # (q - zero) * scale = (q - 128) * scale + (128 - zero) * scale: int8 weights, per-channel scale, and an
        # offset per channel that multiplies the sum of the inputs.
        # q - 128 as int8 is q with its top bit flipped: no wider temporary
        self.register_buffer("int8_weight", (q.to(torch.uint8) ^ 0x80).view(torch.int8).contiguous())
        scale = weight.scales.float()[0]
        self.register_buffer("int8_scale", scale.to(self.dtype))
        offset = (128 - weight.zeros.float()[0]) * scale
        self.register_buffer("int8_offset", None if bool((offset == 0).all()) else offset.to(self.dtype))
        self.mode = "int8"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {self.mode}"

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.perm is not None:
            x2 = x2[:, self.perm]  # (faster than index_select along the last dimension)
        if self.mode.startswith("native") and x2.shape[0] <= DECODE_ROWS and activation in _NATIVE_ACTIVATIONS:
            # Decoding: one call does the product, the bias and the activation, and writes bfloat16.
            bias = None if self.bias is None else self.native_bias
            if self.mode == "native-int4":
                y = self.native.int4_matvec(x2.contiguous(), self.native_packed, self.native_scales,
                                            self.native_offsets, self.kernel_group, bias,
                                            _NATIVE_ACTIVATIONS[activation])
            else:
                y = self.native.int8_matvec(x2.contiguous(), self.int8_weight, self.native_scales,
                                            self.native_offsets, bias, _NATIVE_ACTIVATIONS[activation])
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.mode in ("native-int4", "native-int8"):
            # Long inputs: the layer dequantized to bfloat16 (into a reused buffer), then one oneDNN matmul with
            # the bias and the activation fused into it.
            w = _scratch(self.out_features, self.in_features)
            if self.mode == "native-int4":
                self.native.int4_dequantize(self.native_packed, self.native_scales, self.native_offsets,
                                            self.kernel_group, w)
            else:
                self.native.int8_dequantize(self.int8_weight, self.native_scales, self.native_offsets, w)
            y = _matmul(x2, w, self.bias, activation)
            return y.view(*shape[:-1], self.out_features).to(x.dtype)
        if self.mode == "int4":
            if x2.shape[0] <= DECODE_ROWS or int4_block() is None:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.kernel_group,
                                                              self.scales_and_zeros)
            else:
                y = self._dequantized_matmul(x2)
        elif self.mode == "int8":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.int8_weight, self.int8_scale)
            if self.int8_offset is not None:
                y = y + x2.sum(dim=1, keepdim=True) * self.int8_offset
        else:
            y = F.linear(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if activation is None else _activation(activation)(y)

    def _dequantized_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) @ W^T for long inputs on the stock layout: W rebuilt in bfloat16 from the packed bytes, 64
        channels a block (32 on AVX2), each block's matmul one slice of a batched matmul."""
        N, K, g, B = self.out_features, self.in_features, self.kernel_group, int4_block()
        q = unpack_int4(self.packed, N, K, B)  # (N/B, K, B) uint8
        sz = self.scales_and_zeros.view(K // g, N // B, B, 2).transpose(0, 1)  # (N/B, K/g, B, 2)
        scale, offset = sz[..., 0].unsqueeze(2), sz[..., 1].unsqueeze(2)  # (N/B, K/g, 1, B)
        # (q - 8) * scale + offset = q * scale + (offset - 8 * scale)
        w = torch.empty(N // B, K // g, g, B, dtype=self.dtype)
        torch.addcmul(offset - 8 * scale, q.view(N // B, K // g, g, B), scale, out=w)
        y = torch.matmul(x.unsqueeze(0), w.view(N // B, K, B))  # (N/B, M, B)
        return y.transpose(0, 1).reshape(x.shape[0], N)


def _matmul(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """activation(x (M, K) @ w (N, K)^T + bias) on oneDNN where it can (much faster than MKL's path on AMD
    CPUs), with the bias and a GELU fused into the matmul."""
    if onednn_supports(x.dtype) and w.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        attr, algorithm = _FUSABLE.get(activation, ("none", ""))
        y = torch.ops.mkldnn._linear_pointwise(x, w, bias, attr, [], algorithm)
        return y if activation is None or activation in _FUSABLE else _activation(activation)(y)
    y = F.linear(x, w, bias)
    return y if activation is None else _activation(activation)(y)


_scratch_buffer: Tensor | None = None


def _scratch(N: int, K: int) -> Tensor:
    """A bfloat16 (N, K) view of one buffer shared by every layer (they run one at a time), grown as needed."""
    global _scratch_buffer
    if _scratch_buffer is None or _scratch_buffer.numel() < N * K:
        _scratch_buffer = torch.empty(N * K, dtype=torch.bfloat16)
    return _scratch_buffer[: N * K].view(N, K)


class DecodeHead(nn.Module):
    """The (unquantized, usually tied) lm_head of a quantized bfloat16 model: our bf16 matrix-vector kernel for
    decoding reads the embedding matrix in place, where oneDNN would need a packed copy of it to be as fast."""

    packed = False  # for CausalLM.tie_weights, which re-ties a plain head

    def __init__(self, weight: nn.Parameter, kernels):
        super().__init__()
        self.weight, self.kernels = weight, kernels

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= DECODE_ROWS and x2.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16:
            y = self.kernels.bf16_matvec(x2.contiguous(), self.weight).to(x.dtype)
        else:
            y = _matmul(x2, self.weight.to(x2.dtype))
        return y.view(*x.shape[:-1], -1)
