"""Quantized model directories: AutoGPTQ-compatible files, read and written.

A quantized directory is a Hugging Face directory whose linear layers (every block's attention and MLP
projections; never the embeddings or lm_head) are stored as qweight / qzeros / scales / g_idx (+ bias), with the
settings in `quantize_config.json` and, for transformers, as `quantization_config` inside config.json. Readers
accept the settings at the top level or under `meta` (GPTQModel), v1 and v2 tensors, files without g_idx, and
TheBloke's naming (`gptq_model-4bit--1g.safetensors` next to `quantize_config.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import SAFETENSORS_INDEX, CheckpointReader
from ..config import Config
from ..convert import convert_hf_tensor, join_c_attn, ours_to_hf, split_c_attn
from ..errors import CheckpointError
from ..files import atomic, write_text_atomic
from ..memory import return_freed_memory
from ..model import build_model
from . import native
from .gptq import QuantSettings
from .linear import DecodeHead, QuantLinear
from .pack import FORMATS, QuantizedWeight, from_gptq_tensors, to_gptq_tensors

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


# ---------------------------------------------------------------------------------------------------- writing
class QuantizedWriter:
    """Writes a quantized directory as the quantization goes: one shard per block as soon as the block is done
    (so a 15B model's integer weights never pile up in memory), then the remaining tensors, the shard index and
    the configs. Each file is written atomically; until the index is there, the directory does not load."""

    def __init__(self, out: Path, config: Config, settings: QuantSettings, model_name: str):
        self.out, self.config, self.settings, self.model_name = out, config, settings, model_name
        self.shards = [f"model-{i + 1:05d}-of-{config.n_layer + 1:05d}.safetensors" for i in range(config.n_layer + 1)]
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        out.mkdir(parents=True, exist_ok=True)

    def write_block(self, layer: int, quantized: dict[str, QuantizedWeight], state: dict[str, torch.Tensor]) -> None:
        """`quantized`: the block's linear names (ours, e.g. attn.q) -> integer weights; `state`: the block's other
        tensors (norms, biases) under our names relative to the block."""
        prefix = f"model.layers.{layer}."
        tensors = ours_to_hf(self.config, {prefix + n: t for n, t in state.items()
                                           if not _is_block_linear_weight(prefix + n)})
        for linear in LINEARS:
            if self.config.model_type == "gpt_bigcode" and linear in ("attn.k", "attn.v"):
                continue  # written with attn.q as the fused c_attn
            weight = quantized[linear]
            if self.config.model_type == "gpt_bigcode" and linear == "attn.q":
                weight = _join_qkv(self.config, [quantized[f"attn.{p}"] for p in "qkv"])
            for key, tensor in to_gptq_tensors(weight, self.settings.checkpoint_format).items():
                tensors[f"{hf_module(self.config, layer, linear)}.{key}"] = tensor
        self._write(self.shards[layer], tensors)

    def finish(self, state: dict[str, torch.Tensor]) -> None:
        """The tensors outside the blocks (embeddings, final norm, an untied head), the index and the configs."""
        outside = {n: t for n, t in state.items() if not n.startswith("model.layers.")}
        self._write(self.shards[-1], ours_to_hf(self.config, outside))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        quant = quant_config_dict(self.settings, self.model_name)
        hf_config = self.config.to_hf_config(str(state["model.embed.weight"].dtype).removeprefix("torch."))
        hf_config["quantization_config"] = quant
        write_text_atomic(self.out / QUANT_CONFIG, json.dumps(quant, indent=2))
        write_text_atomic(self.out / "config.json", json.dumps(hf_config, indent=2))
        write_text_atomic(self.out / SAFETENSORS_INDEX, json.dumps(index, indent=2))  # last: now it loads

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in tensors.items()}
        with atomic(self.out / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        self.weight_map.update({n: name for n in tensors})
        self.total_bytes += sum(t.nbytes for t in tensors.values())


def _is_block_linear_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(tuple(f".{lin}.weight" for lin in LINEARS))


def _join_qkv(config: Config, parts: list[QuantizedWeight]) -> QuantizedWeight:
    q, k, v = parts
    return QuantizedWeight(join_c_attn(config, q.q, k.q, v.q), join_c_attn(config, q.scales.T, k.scales.T,
                                                                           v.scales.T).T.contiguous(),
                           join_c_attn(config, q.zeros.T, k.zeros.T, v.zeros.T).T.contiguous(), q.g_idx, q.bits,
                           q.group_size)


def _split_qkv(config: Config, fused: QuantizedWeight) -> list[QuantizedWeight]:
    qs, ss, zs = (split_c_attn(config, t) for t in (fused.q, fused.scales.T, fused.zeros.T))
    return [QuantizedWeight(q.contiguous(), s.T.contiguous(), z.T.contiguous(), fused.g_idx, fused.bits,
                            fused.group_size) for q, s, z in zip(qs, ss, zs, strict=True)]


# ---------------------------------------------------------------------------------------------------- reading
def load_quantized(config: Config, quant: QuantFile, reader: CheckpointReader, dtype: torch.dtype) -> nn.Module:
    """Our model with QuantLinear layers, from a quantized directory's tensors (checked for consistency)."""
    settings = quant.settings
    stored = {t.name: t for t in reader}

    def read(name: str) -> torch.Tensor | None:
        return reader.read(stored[name]) if name in stored else None

    with torch.device("meta"):
        model = build_model(config)
    used: set[str] = set()
    for layer in range(config.n_layer):
        fused: list[tuple[QuantizedWeight, torch.Tensor | None]] | None = None
        for linear in LINEARS:
            module = hf_module(config, layer, linear)
            names = {key: f"{module}.{key}" for key in ("qweight", "qzeros", "scales", "g_idx", "bias")}
            if names["qweight"] not in stored:
                raise CheckpointError(f"{reader.files[0].parent}: {module}.qweight is missing: the files do not "
                                      f"match the quantization settings in {quant.source}")
            used.update(n for n in names.values() if n in stored)
            shared = config.model_type == "gpt_bigcode" and linear in ("attn.q", "attn.k", "attn.v")
            if not shared or fused is None:
                tensors = {key: read(name) for key, name in names.items() if name in stored}
                weight = from_gptq_tensors(tensors, settings.bits, settings.group_size,
                                           settings.checkpoint_format, module)
                bias = tensors.get("bias")
                if shared:  # the fused c_attn, split once into q, k and v
                    fused = list(zip(_split_qkv(config, weight),
                                     split_c_attn(config, bias) if bias is not None else [None] * 3, strict=True))
            if shared:
                weight, bias = fused["qkv".index(linear[-1])]
            expected = _expected_shape(config, linear)
            if weight.shape != expected:
                raise CheckpointError(f"{module}: quantized weight is {list(weight.shape)} but config.json "
                                      f"describes {list(expected)}")
            model.set_submodule(f"model.layers.{layer}.{linear}", QuantLinear(weight, bias, dtype))
            for name in names.values():  # QuantLinear holds its own copies: the file pages can go (a view
                if name in stored:  # still pointing there reads them back from the file)
                    reader.release(stored[name])
    state = {}
    for name, t in stored.items():
        if name in used:
            continue
        source = reader.read(t)
        for ours, tensor in convert_hf_tensor(config, name, source):
            state[ours] = tensor.to(dtype)
        if source.dtype != dtype:
            reader.release(t)
    result = model.load_state_dict(state, strict=False, assign=True)
    quantized = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, QuantLinear))
    missing = [m for m in result.missing_keys if not m.startswith(quantized)
               and (m != "lm_head.weight" or not config.tie_embeddings)]
    if missing:
        raise CheckpointError(f"{reader.files[0].parent}: tensors missing from the quantized checkpoint: "
                              f"{', '.join(missing[:5])}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    kernels = native.kernels() if dtype == torch.bfloat16 else None
    if kernels is not None and hasattr(model, "lm_head"):
        model.lm_head = DecodeHead(model.lm_head.weight, kernels)
    return_freed_memory()
    return model.eval()


def _expected_shape(config: Config, linear: str) -> tuple[int, int]:
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"attn.q": (q_dim, config.n_embd), "attn.k": (kv_dim, config.n_embd), "attn.v": (kv_dim, config.n_embd),
            "attn.o": (config.n_embd, q_dim), "mlp.fc": (config.n_inner, config.n_embd),
            "mlp.proj": (config.n_embd, config.n_inner)}[linear]
