"""Dense linear layers: nn.Linear whose CPU inference runs on oneDNN where the CPU supports the dtype, with the
activation fused into the matmul, and optionally with the weight packed in oneDNN's blocked layout."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import StarCoderError
from . import native

# oneDNN names for the activations it can fuse into a matmul's epilogue: (attr, algorithm).
FUSABLE = {"gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}
NATIVE_ACTIVATIONS = {None: 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # what our kernels apply in their epilogue
PACKED_DECODE_ROWS = 6  # up to this many input rows, a packed bfloat16 weight decodes on our kernel (_packed_decode)


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs this dtype on this CPU: float32 wherever oneDNN is built in; bfloat16 only
    where the CPU has the instructions (AVX-512 BF16, AVX-NE-CONVERT, AMX). Elsewhere (AVX2-only CPUs) oneDNN
    refuses bfloat16 outright, so those take F.linear."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype() -> torch.dtype:
    """The dtype models compute fastest in here when their files do not say: bfloat16 where the CPU has it natively,
    else float32 (bfloat16 on an AVX2-only CPU is emulated and many times slower)."""
    return torch.bfloat16 if onednn_supports(torch.bfloat16) else torch.float32


class Linear(nn.Linear):
    """nn.Linear whose CPU inference runs on oneDNN, optionally with the activation fused into the matmul.

    On CPUs where MKL takes a slow path (AMD EPYC, this project's machines), oneDNN's float32 matmul is 2-3x
    faster than the sgemm behind F.linear, and about as fast in bfloat16; fusing GELU saves a pass over the
    MLP's widest tensor. Results equal F.linear's to float32 rounding. Training (gradients needed), other
    dtypes and other devices take the ordinary path.

    A packed Linear (see pack_weight) holds its weight in oneDNN's blocked layout: decoding reads it at close to
    memory bandwidth, about 1.5x the plain layout (in bfloat16 with our kernel, see _packed_decode), but it is
    opaque, so such a layer serves inference only.
    """

    use_onednn = True  # where onednn_supports(dtype); tests turn it off to compare with F.linear bit for bit

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        w = self.weight
        if w.is_mkldnn:
            refuse_training(x)
            decode = self._packed_decode(w)
            if (decode is not None and x.dtype == torch.bfloat16 and 0 < x.numel() <= PACKED_DECODE_ROWS * w.shape[1]
                    and activation in NATIVE_ACTIVATIONS):
                y = decode.kernel(x.reshape(-1, w.shape[1]).contiguous(), decode.address, w.shape[0], decode.bias,
                                  NATIVE_ACTIVATIONS[activation])
                return y.view(*x.shape[:-1], w.shape[0])
            return matmul(x, w, self.bias, activation)  # (oneDNN: matmul sees the packed layout)
        onednn = self.use_onednn and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        return matmul(x, w, self.bias, activation, onednn)

    def _packed_decode(self, w: Tensor) -> PackedDecode | None:
        """How a few bfloat16 rows (decoding) take our kernel on the packed bytes, where pack_weight found their
        layout readable: 1.1-1.4x faster than oneDNN's own matvec, one copy of the weight serving both. Worked out
        once per weight, with the bias as float32: per call (the layout's entry, the address, the bias widened in
        the kernel), that took 4% of a decode step of the 1B shape (alternating, one process)."""
        decode = self.__dict__.get("_decode")
        if decode is None or decode.weight is not w or decode.bias_source is not self.bias:
            if not _decodes_packed.get((w.dtype, *w.shape)):
                return None
            bias = None if self.bias is None else self.bias.detach().float().contiguous()
            decode = PackedDecode(native.kernels("avx512").bf16_packed_matvec, w, torch.ops.mkldnn.data_ptr(w), bias,
                                  self.bias)
            self.__dict__["_decode"] = decode
        return decode


class PackedDecode(NamedTuple):
    kernel: Callable  # kernels_avx512's bf16_packed_matvec
    weight: Tensor  # the packed weight it reads
    address: int  # of its bytes
    bias: Tensor | None  # float32, as the kernel reads it
    bias_source: Tensor | None  # the layer's bias it was made from

    def __deepcopy__(self, memo) -> None:
        return None  # a copied layer's weight lies at another address: it works out its own


def refuse_training(x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise StarCoderError("this model's weights are packed for CPU inference; load it without pack=True to train it")


def matmul(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None,
           onednn: bool = True) -> Tensor:
    """activation(x @ w^T + bias): on oneDNN where it can (asked, on the CPU, a dtype this CPU runs there, or a
    packed weight), with the bias and a GELU fused into the matmul; else F.linear and the activation after it."""
    if w.is_mkldnn or (onednn and x.is_cpu and onednn_supports(x.dtype) and w.dtype == x.dtype
                       and (bias is None or bias.dtype == x.dtype)):
        attr, algorithm = FUSABLE.get(activation, ("none", ""))
        y = torch.ops.mkldnn._linear_pointwise(x, w, bias, attr, [], algorithm)
        return y if activation is None or activation in FUSABLE else activation_function(activation)(y)
    y = F.linear(x, w, bias)
    return y if activation is None else activation_function(activation)(y)


def can_pack(weight: Tensor) -> bool:
    return onednn_supports(weight.dtype) and weight.is_cpu and weight.dim() == 2


def pack_weight(weight: Tensor) -> Tensor:
    """The weight (out, in) in oneDNN's blocked layout, tuned for one row of input (decoding), which is also
    as fast as the plain layout for long prompts. The result has the same shape but is not readable as such."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    key = (weight.dtype, *weight.shape)
    if key not in _decodes_packed:
        _decodes_packed[key] = _our_kernel_reads(weight.contiguous(), packed)
    return packed


# (dtype, out, in) -> whether our decode kernel reads oneDNN's packed layout of weights of that shape on this
# machine, found by pack_weight from the first weight of each shape it packed
_decodes_packed: dict[tuple, bool] = {}


def _our_kernel_reads(weight: Tensor, packed: Tensor) -> bool:
    kernels = native.kernels("avx512") if weight.dtype == torch.bfloat16 else None
    return kernels is not None and kernels.bf16_packed_layout_matches(weight, torch.ops.mkldnn.data_ptr(packed),
                                                                      torch.ops.mkldnn._nbytes(packed))


def activation_function(name: str):
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":  # GPT-2's formula, written out as transformers does (not bit-equal to the tanh kernel)
        return lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu_fast":
        return lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    return {"relu": F.relu, "silu": F.silu}[name]


def is_packed(model: nn.Module) -> bool:
    """Whether some layer holds its weight in a layout for CPU inference only (a packed Linear, a widened layer:
    `packed` True), which training and saving refuse."""
    return any(getattr(m, "packed", None) is True for m in model.modules())
