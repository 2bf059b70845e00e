"""Pure conversion between Hugging Face tensor names/layouts and ours, used by the loader, the saver and tests.

Ours: model.embed, model.pos_embed, model.layers.{i}.{attn_norm, attn.q/k/v/o, mlp_norm, mlp.fc/proj}, model.norm,
lm_head / score; the encoder (bert) adds model.type_embed, model.embed_norm, model.pooler and its heads mlm.*, nsp,
classifier. The only layout change is gpt_bigcode's fused c_attn, which we keep as separate q, k, v:
  multi_query: rows are [q (n_head*hd) | k (hd) | v (hd)]
  multi-head:  rows are per head, [q_h | k_h | v_h] for h = 0..n_head-1 (transformers views them as (H, 3*hd))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .config import Config

_GPT_BIGCODE = {  # HF suffix after "transformer." -> ours after "model."
    "wte.weight": "embed.weight",
    "wpe.weight": "pos_embed.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
}
_GPT_BIGCODE_LAYER = {  # HF suffix after "transformer.h.{i}." -> ours after "model.layers.{i}."
    "ln_1": "attn_norm",
    "attn.c_proj": "attn.o",
    "ln_2": "mlp_norm",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
_STARCODER2 = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_STARCODER2_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "post_attention_layernorm": "mlp_norm",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
_BERT = {
    **{f"embeddings.{hf}.weight": f"{ours}.weight" for hf, ours in (
        ("word_embeddings", "embed"), ("position_embeddings", "pos_embed"), ("token_type_embeddings", "type_embed"))},
    **{f"{hf}.{kind}": f"{ours}.{kind}" for hf, ours in (("embeddings.LayerNorm", "embed_norm"),
                                                          ("pooler.dense", "pooler")) for kind in ("weight", "bias")},
}
_BERT_LAYER = {  # post-LayerNorm: attention.output.LayerNorm follows the attention, output.LayerNorm the MLP
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.fc",
    "output.dense": "mlp.proj",
    "output.LayerNorm": "mlp_norm",
}
_DECODER_HEADS = {"lm_head.weight": "lm_head.weight", "score.weight": "score.weight"}
_BERT_HEADS = {  # full HF names -> ours
    "cls.predictions.bias": "mlm.decoder.bias",
    "cls.predictions.decoder.weight": "mlm.decoder.weight",
    **{f"{hf}.{kind}": f"{ours}.{kind}" for hf, ours in (
        ("cls.predictions.transform.dense", "mlm.dense"), ("cls.predictions.transform.LayerNorm", "mlm.norm"),
        ("cls.seq_relationship", "nsp"), ("classifier", "classifier")) for kind in ("weight", "bias")},
}

# Tensors some checkpoints carry that are derived state or a second name of a weight: skipped on load.
IGNORED_HF_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq|embeddings\.position_ids"
                                r"|cls\.predictions\.decoder\.bias)$")


def _tables(config: Config) -> tuple[str, dict[str, str], str, dict[str, str], dict[str, str]]:
    if config.model_type == "gpt_bigcode":
        return "transformer.", _GPT_BIGCODE, "transformer.h.", _GPT_BIGCODE_LAYER, _DECODER_HEADS
    if config.encoder:
        return "bert.", _BERT, "bert.encoder.layer.", _BERT_LAYER, _BERT_HEADS
    return "model.", _STARCODER2, "model.layers.", _STARCODER2_LAYER, _DECODER_HEADS


def hf_name(config: Config, ours: str) -> str:
    """The HF name of one of our tensors that is stored whole (not a piece of a fused one)."""
    prefix, top, layer_prefix, layer, heads = _tables(config)
    inverse = lambda table: {v: k for k, v in table.items()}  # noqa: E731
    rest = ours.removeprefix("model.")
    if ours in heads.values():
        return inverse(heads)[ours]
    if rest in top.values():
        return prefix + inverse(top)[rest]
    i, module, kind = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", rest).groups()
    return f"{layer_prefix}{i}.{inverse(layer)[module]}.{kind}"


def convert_hf_tensor(config: Config, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """One HF tensor -> our (name, tensor) pairs (several for a fused c_attn). Unknown names give []."""
    prefix, top, layer_prefix, layer, heads = _tables(config)
    if name in heads:
        return [(heads[name], tensor)]
    if not name.startswith(prefix):
        name = prefix + name  # a checkpoint of the bare base model has no prefix
    rest = name[len(prefix):]
    if rest in top:
        return [("model." + top[rest], tensor)]
    match = re.fullmatch(re.escape(layer_prefix) + r"(\d+)\.(.+)\.(weight|bias)", name)
    if not match:
        return []
    i, module, kind = match.groups()
    ours = f"model.layers.{i}."
    if module == "attn.c_attn" and config.model_type == "gpt_bigcode":
        q, k, v = split_c_attn(config, tensor)
        return [(ours + f"attn.{p}.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    if module in layer:
        return [(ours + f"{layer[module]}.{kind}", tensor)]
    return []


def split_c_attn(config: Config, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """gpt_bigcode's fused (q|k|v) weight (out, in) or bias (out,) -> q, k, v (views where the layout allows)."""
    H, hd, d = config.n_head, config.head_dim, config.n_embd
    if config.n_kv_head == 1:
        return fused[:d], fused[d : d + hd], fused[d + hd :]
    per_head = fused.view(H, 3, hd, *fused.shape[1:])  # (H, 3, hd[, in])
    return tuple(per_head[:, j].reshape(H * hd, *fused.shape[1:]) for j in range(3))


def join_c_attn(config: Config, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The inverse of split_c_attn."""
    if config.n_kv_head == 1:
        return torch.cat((q, k, v), dim=0)
    H, hd = config.n_head, config.head_dim
    rest = q.shape[1:]
    return torch.stack([t.reshape(H, hd, *rest) for t in (q, k, v)], dim=1).reshape(3 * H * hd, *rest)


def hf_to_ours(config: Config, hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    ours: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        ours.update(convert_hf_tensor(config, name, tensor))
    return ours


def ours_to_hf(config: Config, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> HF names and layouts. A tied head is left out, as transformers saves it."""
    layer_prefix = _tables(config)[2]
    hf: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == config.tied_head:
            continue
        fused = re.fullmatch(r"model\.layers\.(\d+)\.attn\.([qkv])\.(weight|bias)", name)
        if config.model_type == "gpt_bigcode" and fused:
            i, part, kind = fused.groups()
            if part == "q":
                parts = [state[f"model.layers.{i}.attn.{p}.{kind}"] for p in "qkv"]
                hf[f"{layer_prefix}{i}.attn.c_attn.{kind}"] = join_c_attn(config, *parts)
            continue
        hf[hf_name(config, name)] = tensor
    return hf


def expected_hf_shapes(config: Config, our_shapes: Iterable[tuple[str, torch.Size]]) -> dict[str, torch.Size]:
    """The HF tensor names and shapes a checkpoint of this config must hold (computed on the meta device)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in our_shapes}
    return {name: t.shape for name, t in ours_to_hf(config, meta).items()}
