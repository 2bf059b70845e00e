"""Where a checkpoint's bytes become our modules, in one place.

A weight source (checkpoint.CheckpointReader: safetensors files; gguf_weights.GGUFSource: a GGUF file; both
memory-mapped) gives named tensors under Hugging Face names. build() makes the model on the meta device and
assigns them: each block linear becomes what the linear factory says (dense, packed for oneDNN, or a quantized
kind built from GPTQ tensors or GGUF integer blocks); every other tensor is converted to our names (convert.py)
and assigned as it is, without a copy where dtype and device allow. Then one check for missing tensors, one tie
of the head, eval mode. `dtype`, `device` and `pack` mean the same for every kind of checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import torch
from torch import nn

from .checkpoint import CheckpointReader, StoredTensor, load_config, parse_dtype, weight_files
from .config import Config
from .convert import IGNORED_HF_TENSORS, convert_hf_tensor, expected_hf_shapes, hf_name, split_c_attn
from .errors import CheckpointError, StarCoderError
from .linears.dense import Linear, can_pack, compute_dtype, pack_weight
from .linears.gptq_layout import (
    LINEARS,
    QuantFile,
    QuantizedWeight,
    from_gptq_tensors,
    hf_module,
    read_quant_config,
    split_qkv,
    stack_outputs,
)
from .linears.quantized import (
    DecodeHead,
    DequantizedLinear,
    QuantLinear,
    Scratch,
    WidenedLinear,
    head_kernels,
    quantized_linear,
)
from .memory import return_freed_memory
from .model import build_model
from .paths import resolve_model

log = logging.getLogger(__name__)
QKV = ("attn.q", "attn.k", "attn.v")


def load_model(path_or_id: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "cpu",
               allow_pickle: bool = False, cache_dir: str | os.PathLike | None = None,
               revision: str | None = None, pack: bool = False) -> nn.Module:
    """Load a Hugging Face StarCoder / StarCoder2 / StarEncoder directory, hub id or GGUF file as our model, in eval
    mode.

    dtype None or "auto" keeps the stored dtype (for GPTQ files, whose float weights are float16, bfloat16: the
    CPU computes it much faster). The head (causal LM or sequence classification) follows the config's
    `architectures`. pack=True stores the dense linear weights in oneDNN's blocked layout for fast CPU inference
    (about 1.5x faster decoding); such a model cannot be trained or saved.
    """
    location = resolve_model(path_or_id, cache_dir, revision)
    if location.suffix == ".gguf":
        from .gguf_weights import GGUFSource

        source = GGUFSource(location)
        return build(source.config, source, parse_dtype(dtype) or source.dtype, device, pack,
                     source if source.quantized else None)
    config = load_config(location)
    reader = CheckpointReader(weight_files(location, allow_pickle))
    quant = read_quant_config(location)
    gptq = None if quant is None else GPTQLinears(quant, reader)
    return build(config, reader, parse_dtype(dtype), device, pack, gptq)


class QuantizedLinears(Protocol):
    def linear(self, config: Config, module: str) -> tuple[QuantizedWeight, torch.Tensor | None,
                                                           list[StoredTensor]] | None:
        """The quantized weight, bias and used file tensors of a HF module; None where it is stored as floats."""


def build(config: Config, reader: CheckpointReader, dtype: torch.dtype | None = None, device: str = "cpu",
          pack: bool = False, quant: QuantizedLinears | None = None) -> nn.Module:
    """Our model from a source's tensors (checked against the config: names, shapes, kinds); `quant` gives the
    linears the source holds quantized (GPTQ tensors, GGUF integer blocks)."""
    pack = pack and not config.encoder  # encoders run whole inputs: the plain layout serves them as well
    if quant is not None:
        if torch.device(device).type != "cpu":
            raise StarCoderError(f"quantized models run on the CPU only, not {device}")
        dtype = _quantized_dtype(dtype, reader)
    with torch.device("meta"):
        model = build_model(config)
    quantized, claimed = _quantized_linears(config, quant, reader, dtype, pack) if quant is not None else ({}, set())
    for name, module in quantized.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if attribute == "qkv":
            parent.use_qkv(module)
        else:
            setattr(parent, attribute, module)
    inside = tuple(f"{name}." for name in quantized)
    expected = expected_hf_shapes(config, [(n, p.shape) for n, p in model.state_dict(keep_vars=True).items()
                                           if not n.startswith(inside)])
    _check_names(config, reader, expected, claimed)
    tied_head = config.tied_head == "lm_head.weight"
    # A quantized model's head decodes with our kernels (DecodeHead), from the embedding: no packed copy.
    head_isa = head_kernels(dtype) if quant is not None else None
    state: dict[str, torch.Tensor] = {}
    for stored in reader:
        if stored.name not in expected:
            continue
        if tuple(expected[stored.name]) != stored.shape:
            raise CheckpointError(
                f"{stored.file}: tensor {stored.name!r} has shape {list(stored.shape)} but config.json describes "
                f"{list(expected[stored.name])} (does the config match the weights?)")
        if not stored.dtype.is_floating_point:
            raise CheckpointError(f"{stored.file}: tensor {stored.name!r} is {stored.dtype}, not floating point")
        source = reader.read(stored)
        converted = convert_hf_tensor(config, stored.name, source.to(device=device, dtype=dtype or stored.dtype))
        if pack:
            converted = _packed(converted, tied_head and head_isa is None)
        if all(not _shares_memory(t, source) for _, t in converted):
            reader.release(stored)
        state.update(converted)
    # A tied head is not in the files: it becomes the embedding parameter itself once loading is done.
    missing = [n for n in model.load_state_dict(state, strict=False, assign=True).missing_keys
               if not n.startswith(inside) and n != config.tied_head]
    if missing:  # unreachable after _check_names, kept as a guard
        raise CheckpointError(f"internal: weights not loaded: {missing}")
    for parameter in model.parameters():
        if parameter.is_mkldnn:
            parameter.requires_grad_(False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if pack and quant is None and _widens(model):
        _widen(model)
    elif pack:
        for block in model.model.layers:
            if block.attn.qkv is None and isinstance(block.attn.q, Linear) and can_pack(block.attn.q.weight):
                block.attn.fuse_qkv()
    if quant is not None:
        if head_isa is not None and hasattr(model, "lm_head") and not model.lm_head.weight.is_mkldnn:
            model.lm_head = DecodeHead(model.lm_head.weight, head_isa)
        return_freed_memory()
    return model.eval()


def _widens(model: nn.Module) -> bool:
    """Whether a causal LM's head and every linear of its blocks take WidenedLinear on this machine."""
    if not hasattr(model, "lm_head"):
        return False
    linears = [m for m in model.model.layers[0].modules() if isinstance(m, Linear)]
    return all(WidenedLinear.accepts(m.weight) for m in [model.lm_head, *linears])


def _widen(model: nn.Module) -> None:
    """A half-precision model whose dtype this CPU does not compute in natively (see WidenedLinear) computes in
    float32 with its weights as stored: the block linears and the head read their 2-byte weights with our
    kernels; the norms, biases and position embeddings (a small share of the bytes) become float32. The token
    embedding stays as stored: it is the tied head, and its rows are widened as they are looked up."""
    for block in model.model.layers:
        block.attn.fuse_qkv(WidenedLinear)
        for parent, name in ((block.attn, "o"), (block.mlp, "fc"), (block.mlp, "proj")):
            linear = getattr(parent, name)
            bias = None if linear.bias is None else linear.bias.detach()
            setattr(parent, name, WidenedLinear(linear.weight.detach(), bias))
    model.lm_head = DecodeHead(model.lm_head.weight, "avx2", quantized=False)
    stay = {id(model.model.embed.weight), id(model.lm_head.weight)}
    for module in model.modules():
        if isinstance(module, WidenedLinear):
            continue
        for name, tensor in module.named_parameters(recurse=False):
            if id(tensor) not in stay and tensor.dtype != torch.float32:
                setattr(module, name, nn.Parameter(tensor.detach().float(), requires_grad=False))


def _quantized_dtype(asked: torch.dtype | None, reader: CheckpointReader) -> torch.dtype:
    """The activations' dtype of a quantized model: as asked, else the stored one, but half-precision files (GPTQ
    files are float16) compute in bfloat16 where the CPU has it natively, else in float32 (float16 is slow on CPUs,
    and bfloat16 without AVX512-BF16 is emulated: prefill ran 3x slower than in float32 on an AVX2 EPYC). Only
    the embeddings and norms take the wider dtype's memory; the linears stay integers."""
    if asked is not None:
        return asked
    stored = next((t.dtype for t in reader if t.dtype.is_floating_point and t.name.endswith("weight")), None)
    return compute_dtype() if stored in (None, torch.float16, torch.bfloat16) else stored


class GPTQLinears:
    """The block linears of an AutoGPTQ checkpoint: qweight, qzeros, scales and g_idx per HF module."""

    def __init__(self, quant: QuantFile, reader: CheckpointReader):
        self.quant, self.reader = quant, reader
        self.stored = {t.name: t for t in reader}

    def linear(self, config: Config, module: str) -> tuple[QuantizedWeight, torch.Tensor | None, list[StoredTensor]]:
        names = {key: f"{module}.{key}" for key in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        if names["qweight"] not in self.stored:
            raise CheckpointError(f"{self.reader.files[0].parent}: {module}.qweight is missing: the files do not "
                                  f"match the quantization settings in {self.quant.source}")
        used = {key: self.stored[name] for key, name in names.items() if name in self.stored}
        tensors = {key: self.reader.read(t) for key, t in used.items()}
        settings = self.quant.settings
        weight = from_gptq_tensors(tensors, settings.bits, settings.group_size, settings.checkpoint_format, module)
        return weight, tensors.get("bias"), list(used.values())


def _quantized_linears(config: Config, source: QuantizedLinears, reader: CheckpointReader, dtype: torch.dtype,
                       fuse_qkv: bool = False) -> tuple[dict[str, QuantLinear], set[str]]:
    """Every block linear the source holds quantized, as a layer (our module name -> layer), and the file tensors
    they took. Linears the source holds as floats are left to the dense path. fuse_qkv: q, k and v stored alike
    become one layer, attn.qkv (one kernel call per token instead of three, as packed dense models do)."""
    scratch = Scratch()  # one for the model: its layers run one at a time
    layers: dict[str, QuantLinear] = {}
    claimed: set[str] = set()
    for layer in range(config.n_layer):
        weights: dict[str, tuple[QuantizedWeight, torch.Tensor | None]] = {}
        used: list[StoredTensor] = []
        fused = None
        for linear in LINEARS:
            module = hf_module(config, layer, linear)
            shared = config.model_type == "gpt_bigcode" and linear in QKV
            if not shared or fused is None:
                found = source.linear(config, module)
                if found is None:
                    continue
                weight, bias, tensors = found
                used += tensors
                if shared:  # the fused c_attn, split once into q, k and v
                    fused = list(zip(split_qkv(config, weight),
                                     split_c_attn(config, bias) if bias is not None else [None] * 3, strict=True))
            if shared:
                weight, bias = fused["qkv".index(linear[-1])]
            expected = _linear_shape(config, linear)
            if weight.shape != expected:
                raise CheckpointError(f"{module}: quantized weight is {list(weight.shape)} but the config "
                                      f"describes {list(expected)}")
            weights[linear] = weight, bias
        if fuse_qkv:
            weights = _fused_qkv(weights)
        for linear, (weight, bias) in weights.items():
            layers[f"model.layers.{layer}.{linear}"] = quantized_linear(weight, bias, dtype, scratch)
        claimed.update(t.name for t in used)
        for t in used:  # the layers hold their own copies: the file pages can go (a view still pointing
            reader.release(t)  # there reads them back from the file)
    dequantized = [layer for layer in layers.values() if isinstance(layer, DequantizedLinear)]
    if dequantized:
        log.warning("%d of %d quantized linears are kept as %s matrices: no integer kernel of this machine takes "
                    "their shape (%d-bit, %d inputs); they take %.0f MB", len(dequantized), len(layers), dtype,
                    dequantized[0].bits, dequantized[0].in_features, sum(x.nbytes for x in dequantized) / 1e6)
    return layers, claimed


def _fused_qkv(weights: dict[str, tuple[QuantizedWeight, torch.Tensor | None]]
               ) -> dict[str, tuple[QuantizedWeight, torch.Tensor | None]]:
    """A block's quantized weights with q, k and v as one "attn.qkv" where all three are there and stored alike."""
    if not all(linear in weights for linear in QKV):
        return weights
    parts, biases = zip(*(weights[linear] for linear in QKV), strict=True)
    if any(b is None for b in biases) != all(b is None for b in biases):
        return weights
    stacked = stack_outputs(list(parts))
    if stacked is None:
        return weights
    bias = None if biases[0] is None else torch.cat(biases)
    return {"attn.qkv": (stacked, bias), **{k: v for k, v in weights.items() if k not in QKV}}


def _linear_shape(config: Config, linear: str) -> tuple[int, int]:
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"attn.q": (q_dim, config.n_embd), "attn.k": (kv_dim, config.n_embd), "attn.v": (kv_dim, config.n_embd),
            "attn.o": (config.n_embd, q_dim), "mlp.fc": (config.n_inner, config.n_embd),
            "mlp.proj": (config.n_embd, config.n_inner)}[linear]


def _packed(converted: list[tuple[str, torch.Tensor]], tied_head: bool) -> list[tuple[str, torch.Tensor]]:
    """Linear weights in oneDNN's inference layout; a tied lm_head gets a packed copy of the embedding, which
    itself must stay readable for lookups. q, k and v stay readable: they are packed together (fuse_qkv)."""
    out = []
    for name, t in converted:
        is_linear = (name.endswith(".weight") and not name.startswith(("model.embed", "model.pos"))
                     and not name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")))
        out.append((name, pack_weight(t) if is_linear and can_pack(t) else t))
        if tied_head and name == "model.embed.weight" and can_pack(t):
            out.append(("lm_head.weight", pack_weight(t)))
    return out


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_mkldnn or b.is_mkldnn:  # oneDNN's packed layout is always a copy
        return False
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_names(config: Config, reader: CheckpointReader, expected: dict[str, torch.Size], claimed: set[str]) -> None:
    present = {t.name: t.file for t in reader}
    missing = [n for n in expected if n not in present]
    if missing:
        files = ", ".join(str(f) for f in reader.files)
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {files}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tied_head = hf_name(config, config.tied_head) if config.tied_head else None  # some files hold a copy
    unexpected = [n for n in present if n not in expected and n not in claimed and not IGNORED_HF_TENSORS.search(n)
                  and n != tied_head]
    if unexpected:
        raise CheckpointError(f"{present[unexpected[0]]}: tensor {unexpected[0]!r} is not part of the model that "
                              f"config.json describes ({config.n_layer} layers, {config.model_type}); "
                              "does the config match the weights?")
