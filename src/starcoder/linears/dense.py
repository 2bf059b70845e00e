"""Dense linear layers: nn.Linear whose CPU inference runs on oneDNN where the CPU supports the dtype, with the
activation fused into the matmul, and optionally with the weight packed in oneDNN's blocked layout."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import StarCoderError
from . import native

# oneDNN names for the activations it can fuse into a matmul's epilogue: (attr, algorithm).
FUSABLE = {"gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}
NATIVE_ACTIVATIONS = {None: 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # what our kernels apply in their epilogue
PACKED_DECODE_ROWS = 6  # up to this many input rows, a packed bfloat16 weight decodes on our kernel (see matmul)


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
    memory bandwidth, about 1.5x the plain layout (in bfloat16 with our kernel, see matmul), but it is opaque, so
    such a layer serves inference only.
    """

    use_onednn = True  # where onednn_supports(dtype); tests turn it off to compare with F.linear bit for bit

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def forward(self, x: Tensor, activation: str | None = None) -> Tensor:
        if self.packed:
            refuse_training(x)
        # (a packed weight takes oneDNN whatever this says: matmul sees its layout)
        onednn = self.use_onednn and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        return matmul(x, self.weight, self.bias, activation, onednn)


def refuse_training(x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise StarCoderError("this model's weights are packed for CPU inference; load it without pack=True to train it")


def matmul(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None,
           onednn: bool = True) -> Tensor:
    """activation(x @ w^T + bias): on oneDNN where it can (asked, on the CPU, a dtype this CPU runs there), with
    the bias and a GELU fused into the matmul; else F.linear and the activation after it. A packed weight takes
    oneDNN, except that a few bfloat16 rows (decoding) take our kernel on the same bytes where their layout is
    known (pack_weight checked it): 1.1-1.4x faster than oneDNN's own matvec, one copy of the weight serving both."""
    if (w.is_mkldnn and _decodes_packed.get((w.dtype, *w.shape)) and x.dtype == torch.bfloat16
            and 0 < x.numel() <= PACKED_DECODE_ROWS * w.shape[1] and activation in NATIVE_ACTIVATIONS):
        x2 = x.reshape(-1, w.shape[1]).contiguous()
        y = native.kernels("avx512").bf16_packed_matvec(x2, torch.ops.mkldnn.data_ptr(w), w.shape[0], bias,
                                                       NATIVE_ACTIVATIONS[activation])
        return y.view(*x.shape[:-1], w.shape[0])
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
