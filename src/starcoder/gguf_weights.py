"""GGUF weights in and out: a GGUF file as a weight source for the one loader (loader.build), and a model written
as a GGUF file that llama.cpp, Ollama, LM Studio and Tabby run.

Reading: float tensors (F32, F16, BF16) are views of the privately mapped file, as with safetensors. Q8_0 and Q4_0
block linears become QuantizedWeights straight from their integers (groups of 32, w = d * (q - zero)), and the
linear factory picks their layer: the AVX2 kernels' 4- and 8-bit layers take them without a float detour. Every
other block format gguf-py knows (K-quants, Q4_1, Q5_0, Q5_1) is dequantized at load. Dequantizing costs float
memory, and the log says so.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, quants
from gguf import GGMLQuantizationType as Kind
from torch import Tensor, nn

from .checkpoint import CheckpointReader, StoredTensor
from .config import Config
from .errors import CheckpointError, StarCoderError
from .files import atomic
from .gguf_file import ARCHITECTURES, gguf_name, hf_name, open_gguf, read_config, write_config, write_tokenizer
from .kquants import SUPER, q4_k_m_kind, quantize_q4_k, quantize_q6_k
from .linears.dense import compute_dtype
from .linears.gptq_layout import QuantizedWeight

log = logging.getLogger(__name__)

FLOATS = {Kind.F32: torch.float32, Kind.F16: torch.float16, Kind.BF16: torch.bfloat16}
INTEGER_BLOCKS = {Kind.Q8_0: (8, 128), Kind.Q4_0: (4, 8)}  # bits, and the zero point: w = d * (q - zero)
BLOCK = 32  # weights per Q8_0 / Q4_0 block, one fp16 scale each
_RAW = torch.uint8  # the dtype a block-quantized linear is listed with: no float form until a layer takes it
EXPORT_TYPES = {"f32": Kind.F32, "f16": Kind.F16, "bf16": Kind.BF16, "q8_0": Kind.Q8_0, "q4_0": Kind.Q4_0,
                "q4_k_m": Kind.Q4_K}  # Q4_K_M: Q4_K, with Q6_K where llama-quantize gives more bits (kquants.py)


@functools.cache
def _dequantizable(kind: Kind) -> bool:
    try:
        quants.dequantize(np.zeros(quants.quant_shape_to_byte_shape((256,), kind), np.uint8), kind)
        return True
    except (NotImplementedError, KeyError, ValueError, TypeError):
        return False


class GGUFSource(CheckpointReader):
    """The tensors of a GGUF file under their Hugging Face names, with the model's Config read from its metadata."""

    def __init__(self, path: Path):
        self.files, self._maps, self._pickled = [path], {}, {}
        self.file = open_gguf(path)
        self.config = read_config(self.file, path)
        self.tensors, self._gguf = [], {}
        dequantized = {"linears": 0, "others": 0}  # weights, by whether an integer layer could have taken them
        for t in self.file.tensors:
            name = hf_name(self.config.model_type, t.name)
            if name is None:
                raise CheckpointError(f"{path}: tensor {t.name!r} is not part of llama.cpp's "
                                      f"{ARCHITECTURES[self.config.model_type]} layout")
            kind = Kind(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if kind in FLOATS:
                dtype = FLOATS[kind]
            elif kind in INTEGER_BLOCKS and name.startswith(("transformer.h.", "model.layers.")):
                dtype = _RAW  # its integers go to the linear factory
            elif _dequantizable(kind):
                dtype = torch.float32
                in_block = name.startswith(("transformer.h.", "model.layers."))
                dequantized["linears" if in_block else "others"] += int(t.n_elements)
            else:
                raise CheckpointError(f"{path}: tensor {t.name!r} is stored as {kind.name}, which this package does "
                                      "not read (F32, F16, BF16, Q8_0, Q4_0 and the formats gguf-py dequantizes)")
            self.tensors.append(StoredTensor(path, name, dtype, shape, int(t.data_offset), int(t.n_bytes)))
            self._gguf[name] = t
        self._stored = {t.name: t for t in self.tensors}
        if dequantized["linears"]:  # K-quants and the like: no layer of ours takes their blocks as they are
            log.warning("%s: %.1f M weights of the linear layers are stored in %s blocks, which are dequantized at "
                        "load: they take 2 bytes each in bfloat16 (4 in float32) instead of 0.5-1 byte in the "
                        "file, and decode slower (Q4_0 and Q8_0 files load as integers)",
                        path, dequantized["linears"] / 1e6,
                        "/".join(k for k in self.kinds() if k not in ("F32", "F16", "BF16", "Q4_0", "Q8_0")))
        if dequantized["others"]:
            log.info("%s: the embeddings (%.1f M weights) are dequantized at load", path, dequantized["others"] / 1e6)

    @property
    def quantized(self) -> bool:
        """Whether any linear is stored as integer blocks (then the model is a quantized one)."""
        return any(t.dtype == _RAW for t in self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """One dtype for the model when none is asked: the token embedding's where it is a float, else what this
        CPU computes fastest."""
        stored = self._gguf[hf_name(self.config.model_type, "token_embd.weight")]
        return FLOATS.get(Kind(stored.tensor_type)) or compute_dtype()

    def kinds(self) -> list[str]:
        """The storage types the file's tensors use (F32, Q4_0, Q6_K, ...)."""
        return sorted({Kind(t.tensor_type).name for t in self._gguf.values()})

    def read(self, stored: StoredTensor) -> Tensor:
        if stored.dtype == _RAW:
            raise CheckpointError(f"{stored.file}: {stored.name} is block-quantized and is read by its layer")
        kind = Kind(self._gguf[stored.name].tensor_type)
        if kind in FLOATS:
            tensor = super().read(stored)
        else:
            tensor = torch.from_numpy(quants.dequantize(self._bytes(stored).numpy(), kind)).view(stored.shape)
        return _hf_rows(self.config, stored.name, tensor)

    def _bytes(self, stored: StoredTensor) -> Tensor:
        """A block-quantized tensor's bytes, one row of blocks per output row: a view of the same private mapping
        the float tensors come from, so release() hands its pages back once a layer holds its own copy (gguf-py's
        own mapping is only read for the header)."""
        raw = torch.frombuffer(self._map(stored.file), dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        return raw.view(math.prod(stored.shape[:-1]), -1)

    def linear(self, config: Config, module: str) -> tuple[QuantizedWeight, Tensor | None, list[StoredTensor]] | None:
        """A block-quantized linear (HF module name) as a QuantizedWeight, its bias and the tensors it used; None
        where the linear is stored as floats (it loads as a dense one)."""
        stored = self._stored.get(f"{module}.weight")
        if stored is None or stored.dtype != _RAW:
            return None
        weight = integer_blocks(self._bytes(stored), Kind(self._gguf[stored.name].tensor_type), *stored.shape)
        rows = _hf_rows(config, stored.name, torch.arange(weight.shape[0]))
        if not torch.equal(rows, torch.arange(weight.shape[0])):
            weight = QuantizedWeight(weight.q[rows], weight.scales[:, rows], weight.zeros[:, rows], weight.g_idx,
                                     weight.bits, weight.group_size)
        bias = self._stored.get(f"{module}.bias")
        return weight, None if bias is None else self.read(bias), [stored] + ([bias] if bias is not None else [])


def integer_blocks(data: Tensor, kind: Kind, N: int, K: int) -> QuantizedWeight:
    """Q8_0 / Q4_0 bytes (N rows of K / 32 blocks) -> the integers, scales and zero points they hold.

    Q8_0 block: fp16 d, 32 int8 (w = d * q; stored here as q + 128 with zero 128). Q4_0 block: fp16 d, 16 bytes
    whose low nibbles are weights 0-15 and high nibbles 16-31 (w = d * (q - 8))."""
    bits, zero = INTEGER_BLOCKS[kind]
    G = K // BLOCK
    blocks = data.reshape(N, G, -1)
    scales = blocks[..., :2].contiguous().view(torch.float16).view(N, G)
    payload = blocks[..., 2:]
    # Q8_0: int8 bytes -> q + 128 in [0, 256) by flipping the top bit; Q4_0: low nibbles, then high ones.
    q = payload ^ 0x80 if kind == Kind.Q8_0 else torch.cat((payload & 15, payload >> 4), dim=-1)
    zeros = torch.full((G, N), zero, dtype=torch.int32)
    return QuantizedWeight(q.reshape(N, K).contiguous(), scales.T.contiguous(), zeros,
                           torch.arange(K, dtype=torch.int32) // BLOCK, bits, BLOCK)


def _hf_rows(config: Config, name: str, tensor: Tensor) -> Tensor:
    """GGUF's fused attn_qkv is [q | k | v]; transformers' multi-head c_attn interleaves them per head."""
    if config.model_type != "gpt_bigcode" or config.n_kv_head == 1 or ".attn.c_attn." not in name:
        return tensor
    return tensor[_per_head_rows(config)]


def _per_head_rows(config: Config) -> Tensor:
    """Row r of the per-head layout is row order[r] of the [q | k | v] one."""
    return torch.arange(3 * config.n_head * config.head_dim).view(3, config.n_head, config.head_dim).transpose(0, 1) \
        .reshape(-1)


# ---------------------------------------------------------------------------------------------- writing
def export_model(location: str | Path, out: Path, quant: str = "bf16") -> Path:
    """A model directory, hub id or GGUF file, with its tokenizer, written as a GGUF file."""
    from .loader import load_model
    from .paths import resolve_model
    from .tokenizer import load_tokenizer

    location = resolve_model(location)
    model = load_model(location, pack=False)
    model.config.require_causal_lm(location, "a GGUF export (llama.cpp runs decoders)")
    if _quantized_layers(model):
        log.warning("%s is quantized: its weights are dequantized and quantized again as %s, so they are rounded "
                    "twice (export the unquantized model for the best %s file)", location, quant, quant)
    return export_gguf(model, load_tokenizer(location), out, quant, name=location.stem)


def export_gguf(model: nn.Module, tokenizer, out: Path, quant: str = "bf16", name: str = "starcoder") -> Path:
    """Write `model` (with its tokenizer) as a GGUF file for llama.cpp: `quant` is the type of the matrices (norms
    and biases stay F32). A quantized (GPTQ) model is dequantized first, so its weights are rounded twice."""
    from gguf import GGUFWriter

    if quant not in EXPORT_TYPES:
        raise StarCoderError(f"unknown GGUF type {quant!r}; choose one of {', '.join(EXPORT_TYPES)}")
    config: Config = model.config
    tensors = _gguf_tensors(model)
    output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    plan = {n: _export_kind(n, t, quant, config, output) for n, t in tensors.items()}
    with atomic(Path(out)) as tmp:
        writer = GGUFWriter(tmp, ARCHITECTURES[config.model_type])
        write_config(writer, config, name)
        writer.add_file_type(_FILE_TYPES[quant])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer)
        for n, t in tensors.items():  # every type by its byte shape: what _encode gives, written as raw bytes
            shape = quants.quant_shape_to_byte_shape(tuple(t.shape), plan[n])
            writer.add_tensor_info(n, shape, np.uint8, int(np.prod(shape)), raw_dtype=plan[n])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, t in tensors.items():  # one tensor at a time: the quantized copies never pile up
            writer.write_tensor_data(_encode(t, plan[n]))
        writer.close()
    return Path(out)


_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_*


def _gguf_tensors(model: nn.Module) -> dict[str, Tensor]:
    """GGUF name -> float tensor: quantized layers dequantized, q/k/v fused as [q | k | v] for `starcoder`, and
    zero biases where a bias-free StarCoder2 has none (llama.cpp's starcoder2 requires them)."""
    from .convert import ours_to_hf

    config: Config = model.config
    quantized = _quantized_layers(model)
    inside = tuple(f"{name}." for name in quantized)
    state = {n: t for n, t in model.state_dict().items() if not n.startswith(inside)}
    for name, layer in quantized.items():
        state[f"{name}.weight"] = layer.dequantize()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach()
    if config.model_type == "starcoder2" and not config.bias:
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and hasattr(module, "out_features"):
                state.setdefault(f"{name}.bias", torch.zeros(module.out_features))
    order = torch.argsort(_per_head_rows(config)) if config.model_type == "gpt_bigcode" and config.n_kv_head != 1 \
        else None
    out = {}
    for name, tensor in ours_to_hf(config, state).items():
        tensor = tensor.detach()
        if order is not None and ".attn.c_attn." in name:
            tensor = tensor[order]
        out[gguf_name(config.model_type, name)] = tensor
    return out


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from .linears.quantized import QuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _export_kind(name: str, tensor: Tensor, quant: str, config: Config, output: str) -> Kind:
    """The GGUF type of one tensor, as llama.cpp's tools choose: vectors stay F32; the position table stays float
    (F16) under integer types; below 8 bits the output matrix (`output`: the token embedding where the head is
    tied to it) gets Q6_K, as llama-quantize gives it; matrices whose rows do not split into the type's blocks
    fall back to Q8_0 (K-quants) or F16."""
    if tensor.dim() == 1:
        return Kind.F32
    asked = EXPORT_TYPES[quant]
    if asked in (Kind.F32, Kind.F16, Kind.BF16):
        return asked
    if name == "position_embd.weight" or tensor.shape[-1] % BLOCK:
        return Kind.F16
    if asked == Kind.Q8_0:
        return asked
    if tensor.shape[-1] % SUPER and (quant == "q4_k_m" or name == output):
        return Kind.Q8_0
    if name == output:
        return Kind.Q6_K
    return Kind[q4_k_m_kind(name, config.n_layer)] if quant == "q4_k_m" else asked


def _encode(tensor: Tensor, kind: Kind) -> np.ndarray:
    if kind == Kind.F32:
        return tensor.float().contiguous().numpy()
    if kind == Kind.F16:
        return tensor.half().contiguous().numpy()
    if kind == Kind.BF16:
        return tensor.bfloat16().contiguous().view(torch.uint8).numpy()
    if kind in K_QUANTIZERS:
        return K_QUANTIZERS[kind](tensor)
    return quants.quantize(tensor.float().contiguous().numpy(), kind)


K_QUANTIZERS = {Kind.Q4_K: quantize_q4_k, Kind.Q6_K: quantize_q6_k}  # gguf-py reads these, but does not write them
