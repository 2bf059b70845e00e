"""AutoGPTQ's files: their settings (quantize_config.json), which module holds which layer, and the integer tensor
layout both ways (pure functions, used by the writer, the loader and the tests).

A QuantizedWeight is the integer form of one linear layer's weight W (N outputs, K inputs):

    W[n, k] ~= scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n])

AutoGPTQ "gptq" files store, per layer (bits b, f = 32 / b values per int32 word, G groups):
    qweight  int32 [K / f, N]   f consecutive input rows per word, the lowest row in the lowest bits
    qzeros   int32 [G, N / f]   f consecutive output columns per word; v1 stores zero - 1, v2 the zero itself
    scales   fp16  [G, N]
    g_idx    int32 [K]          the group of each input row (absent in old files: row // group_size)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Config
from ..convert import ours_to_hf, split_c_attn
from ..errors import CheckpointError, StarCoderError

SUPPORTED_BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")  # v1 (AutoGPTQ, transformers) and v2 (GPTQModel's internal format)


@dataclass
class QuantizedWeight:
    q: Tensor  # (N, K) integers in [0, 2**bits)
    scales: Tensor  # (G, N) float
    zeros: Tensor  # (G, N) integers
    g_idx: Tensor  # (K,) int32, the group of each input column
    bits: int
    group_size: int  # -1: one group for all K inputs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (N, K) this stands for."""
        g = self.g_idx.long()
        scales = self.scales.float()[g].T  # (N, K)
        zeros = self.zeros.float()[g].T
        return (scales * (self.q.float() - zeros)).to(dtype)


def stack_outputs(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Several layers' weights over the same inputs as one (their outputs one after another), or None where they
    are not stored alike (bits, groups, input order)."""
    first = weights[0]
    if any(w.bits != first.bits or w.group_size != first.group_size or not torch.equal(w.g_idx, first.g_idx)
           for w in weights[1:]):
        return None
    return QuantizedWeight(torch.cat([w.q for w in weights]), torch.cat([w.scales for w in weights], 1),
                           torch.cat([w.zeros for w in weights], 1), first.g_idx, first.bits, first.group_size)


def _per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{bits}-bit weights are not supported; supported: {SUPPORTED_BITS}")
    return 32 // bits


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """(R, C) integers in [0, 2**bits) -> int32 (R / f, C): f consecutive rows per word, lowest row lowest. The
    words are assembled as bytes (see unpack_columns), never as shifted 64-bit fields."""
    f = _per_word(bits)
    _little_endian()
    rows = values.to(torch.uint8).reshape(-1, f, values.shape[1])  # (R/f, f, C)
    if bits == 4:
        rows = rows[:, 0::2] | (rows[:, 1::2] << 4)  # (R/f, 4, C): byte j holds rows 2j (low nibble) and 2j + 1
    return rows.transpose(1, 2).reshape(-1, 4).view(torch.int32).view(-1, values.shape[1])


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """The inverse of pack_rows: int32 (R / f, C) -> uint8 (R, C)."""
    return unpack_columns(words.T.contiguous(), bits).T.contiguous()


def pack_columns(values: Tensor, bits: int) -> Tensor:
    """(R, C) -> int32 (R, C / f): f consecutive columns per word."""
    return pack_rows(values.T.contiguous(), bits).T.contiguous()


def unpack_columns(words: Tensor, bits: int) -> Tensor:
    """The inverse of pack_columns: int32 (R, C / f) -> uint8 (R, C). On a little-endian host (the files' order) a
    word's bytes hold its columns in order, a 4-bit pair per byte, low nibble first: the values are read from the
    bytes, 4x less data than shifting every field out of 32-bit words (loading a 3B model spent 12 s there)."""
    _per_word(bits)
    _little_endian()
    data = words.to(torch.int32).contiguous().view(torch.uint8)  # (R, C * bits / 8)
    if bits == 8:
        return data
    return torch.stack((data & 0x0F, data >> 4), dim=-1).reshape(words.shape[0], -1)


def _little_endian() -> None:
    if sys.byteorder != "little":  # (a word's bytes would hold its values in the reverse order)
        raise CheckpointError("packed GPTQ weights are read and written on little-endian hosts only")


def to_gptq_tensors(weight: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, Tensor]:
    """qweight, qzeros, scales and g_idx as AutoGPTQ writes them (v1) or GPTQModel's v2."""
    N, K = weight.shape
    f = _per_word(weight.bits)
    if K % f or N % f:
        raise CheckpointError(f"a {N}x{K} weight cannot be packed {f} values per word: both sides must divide by {f}")
    zeros = weight.zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        # v1 stores zero - 1 (an off-by-one every reader undoes), so it cannot hold a zero of 0: the quantizer
        # keeps zeros >= 1 when it writes v1.
        if bool((zeros < 1).any()):
            raise CheckpointError("a zero point of 0 cannot be stored in the gptq (v1) format; use gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack_rows(weight.q.T.contiguous(), weight.bits),
        "qzeros": pack_columns(zeros, weight.bits),
        "scales": weight.scales.to(torch.float16),
        "g_idx": weight.g_idx.to(torch.int32),
    }


def from_gptq_tensors(tensors: dict[str, Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq",
                      name: str = "") -> QuantizedWeight:
    """The inverse of to_gptq_tensors, checking every shape against the others (a damaged or inconsistent file
    is an error naming the layer, never a wrong model)."""
    f = _per_word(bits)
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise CheckpointError(f"{name}: quantized layer without {', '.join(missing)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(f"{name}: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    K, N = qweight.shape[0] * f, qweight.shape[1]
    if checkpoint_format not in FORMATS:
        raise CheckpointError(f"{name}: checkpoint_format {checkpoint_format!r} is not one of {FORMATS}")
    G = K if group_size == -1 else group_size
    groups = 1 if group_size == -1 else -(-K // group_size)
    if tuple(scales.shape) != (groups, N) or tuple(qzeros.shape) != (groups, N // f):
        raise CheckpointError(
            f"{name}: scales {list(scales.shape)} and qzeros {list(qzeros.shape)} do not fit a {K}x{N} layer with "
            f"group size {group_size} and {bits} bits (expected scales [{groups}, {N}], qzeros [{groups}, {N // f}])")
    g_idx = tensors.get("g_idx")
    if g_idx is None:  # old files: groups in row order
        g_idx = torch.arange(K, dtype=torch.int32) // G
    elif tuple(g_idx.shape) != (K,):
        raise CheckpointError(f"{name}: g_idx has shape {list(g_idx.shape)}, expected [{K}]")
    g_idx = g_idx.to(torch.int32)
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise CheckpointError(f"{name}: g_idx points outside the {groups} groups")
    zeros = unpack_columns(qzeros, bits).to(torch.int32)
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # as AutoGPTQ's and transformers' kernels read v1 (a stored 0xF means 16)
    q = unpack_columns(qweight.T.contiguous(), bits)  # (N, K): the file's rows are inputs, packed down columns
    return QuantizedWeight(q, scales.float(), zeros, g_idx, bits, group_size)


GROUP_SIZES = (-1, 32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSettings:
    bits: int = 4
    group_size: int = -1
    act_order: bool = False  # desc_act
    sym: bool = True
    damp: float = 0.01  # damp_percent: a fraction of the mean of diag(H)
    static_groups: bool = False
    true_sequential: bool = True
    block_size: int = 128
    checkpoint_format: str = "gptq"  # v1: zeros are kept >= 1 so that zero - 1 can be stored

    def check(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise StarCoderError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise StarCoderError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if not 0 < self.damp < 1:
            raise StarCoderError(f"damp must be in (0, 1), got {self.damp}")
        if self.bits == 8 and self.group_size != -1:
            raise StarCoderError("8-bit weights run on PyTorch's per-channel int8 kernel: use --group-size -1")

    def check_layer(self, name: str, in_features: int) -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise StarCoderError(f"group size {self.group_size} does not divide {name}'s {in_features} inputs")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")  # per block, ours
QUANT_CONFIG = "quantize_config.json"


@dataclass(frozen=True)
class QuantFile:
    settings: QuantSettings
    source: str  # where the settings were read, for error messages


def read_quant_config(model_dir: Path) -> QuantFile | None:
    """The GPTQ settings of a directory, or None when it is not quantized."""
    config_path = model_dir / "config.json"
    found: tuple[dict[str, Any], str] | None = None
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if isinstance(hf, dict) and isinstance(hf.get("quantization_config"), dict):
            found = hf["quantization_config"], f"{config_path} (quantization_config)"
        elif (model_dir / QUANT_CONFIG).is_file():
            found = json.loads((model_dir / QUANT_CONFIG).read_text(encoding="utf-8")), str(model_dir / QUANT_CONFIG)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{model_dir}: unreadable quantization settings ({e})") from None
    if found is None:
        return None
    raw, source = found
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    flat = {**raw.get("meta", {}), **{k: v for k, v in raw.items() if k != "meta"}}
    method = flat.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method {method!r} is not supported (only gptq)")
    checkpoint_format = flat.get("checkpoint_format", "gptq")
    if checkpoint_format not in FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format {checkpoint_format!r} is not one of {FORMATS}")
    try:
        settings = QuantSettings(bits=int(flat["bits"]), group_size=int(flat.get("group_size", -1)),
                                 act_order=bool(flat.get("desc_act", False)), sym=bool(flat.get("sym", True)),
                                 damp=float(flat.get("damp_percent", 0.01)),
                                 static_groups=bool(flat.get("static_groups", False)),
                                 true_sequential=bool(flat.get("true_sequential", True)),
                                 checkpoint_format=checkpoint_format)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad GPTQ settings ({type(e).__name__}: {e})") from None
    if settings.bits not in (4, 8):
        raise CheckpointError(f"{source}: {settings.bits}-bit weights are not supported (4 or 8)")
    return QuantFile(settings, source)


def quant_config_dict(settings: QuantSettings, model_name: str) -> dict[str, Any]:
    return {"bits": settings.bits, "group_size": settings.group_size, "damp_percent": settings.damp,
            "desc_act": settings.act_order, "static_groups": settings.static_groups, "sym": settings.sym,
            "true_sequential": settings.true_sequential, "model_name_or_path": model_name,
            "model_file_base_name": "model", "quant_method": "gptq",
            "checkpoint_format": settings.checkpoint_format}


def hf_module(config: Config, layer: int, linear: str) -> str:
    """Our block linear -> the HF module name that holds it (q, k and v of gpt_bigcode share c_attn)."""
    if config.model_type == "gpt_bigcode" and linear in ("attn.q", "attn.k", "attn.v"):
        return f"transformer.h.{layer}.attn.c_attn"
    meta = {f"model.layers.{layer}.{linear}.weight": torch.empty(0, device="meta")}
    (name,) = ours_to_hf(config, meta)
    return name.removesuffix(".weight")


def split_qkv(config: Config, fused: QuantizedWeight) -> list[QuantizedWeight]:
    qs, ss, zs = (split_c_attn(config, t) for t in (fused.q, fused.scales.T, fused.zeros.T))
    return [QuantizedWeight(q.contiguous(), s.T.contiguous(), z.T.contiguous(), fused.g_idx, fused.bits,
                            fused.group_size) for q, s, z in zip(qs, ss, zs, strict=True)]
