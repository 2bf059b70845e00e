"""Writing quantized model directories: AutoGPTQ-compatible files (the layout and settings are in
linears/gptq_layout.py, which the loader reads them with).

A quantized directory is a Hugging Face directory whose linear layers (every block's attention and MLP
projections; never the embeddings or lm_head) are stored as qweight / qzeros / scales / g_idx (+ bias), with the
settings in `quantize_config.json` and, for transformers, as `quantization_config` inside config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import SAFETENSORS_INDEX
from ..config import Config
from ..convert import join_c_attn, ours_to_hf
from ..files import atomic, write_text_atomic
from ..linears.gptq_layout import (
    LINEARS,
    QUANT_CONFIG,
    QuantizedWeight,
    QuantSettings,
    hf_module,
    quant_config_dict,
    to_gptq_tensors,
)


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


