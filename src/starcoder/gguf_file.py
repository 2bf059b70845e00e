"""GGUF files (llama.cpp's format) for the two StarCoder families: opening one safely, and the parts that are not
weights, both ways: the model's config as llama.cpp's metadata keys, the tokenizer as its `gpt2` vocabulary, and
the tensor names. No torch here: gguf_weights.py moves the tensors.

llama.cpp names the families `starcoder` (gpt_bigcode: learned positions, one fused attn_qkv) and `starcoder2`
(RoPE in the NEOX layout, separate attn_q/k/v). Its own converter writes no sliding window and does not mark
StarCoder2's <repo_name> / <file_sep>; we write both, and read files that lack them.
"""

from __future__ import annotations

import logging
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Config
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from gguf import GGUFReader, GGUFWriter

    from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCHITECTURES = {"gpt_bigcode": "starcoder", "starcoder2": "starcoder2"}  # our model_type -> llama.cpp's name
_MODEL_TYPES = {arch: model_type for model_type, arch in ARCHITECTURES.items()}

# GGUF tensor name <-> Hugging Face name, per family ("{i}" is the block). One table serves reading and writing.
_TOP = {
    "gpt_bigcode": {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
                    "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
                    "output.weight": "lm_head.weight"},
    "starcoder2": {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output_norm.bias": "model.norm.bias", "output.weight": "lm_head.weight"},
}
_BLOCK = {
    "gpt_bigcode": {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "starcoder2": {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                   "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                   "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}
_BLOCK_PREFIX = {"gpt_bigcode": "transformer.h.", "starcoder2": "model.layers."}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Token types of llama.cpp's vocabulary (gguf.TokenType): NORMAL 1, CONTROL 3 (special), USER_DEFINED 4 (added).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
# The special ids llama.cpp reads, by the token text that holds them (first one the vocabulary has).
_SPECIAL_IDS = {
    "tokenizer.ggml.fim_pre_token_id": ("<fim_prefix>", "<fim-prefix>"),
    "tokenizer.ggml.fim_suf_token_id": ("<fim_suffix>", "<fim-suffix>"),
    "tokenizer.ggml.fim_mid_token_id": ("<fim_middle>", "<fim-middle>"),
    "tokenizer.ggml.fim_pad_token_id": ("<fim_pad>", "<fim-pad>"),
    "tokenizer.ggml.fim_rep_token_id": ("<repo_name>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<file_sep>",),  # llama.cpp ends generation at it (end-of-generation id)
}


def hf_name(model_type: str, gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for a name this family does not have."""
    if gguf_name in _TOP[model_type]:
        return _TOP[model_type][gguf_name]
    match = _GGUF_BLOCK.match(gguf_name)
    if match is None or match[2] not in _BLOCK[model_type]:
        return None
    return f"{_BLOCK_PREFIX[model_type]}{match[1]}.{_BLOCK[model_type][match[2]]}.{match[3]}"


def gguf_name(model_type: str, hf: str) -> str:
    """The inverse of hf_name."""
    for ours, theirs in _TOP[model_type].items():
        if theirs == hf:
            return ours
    rest = hf.removeprefix(_BLOCK_PREFIX[model_type])
    layer, _, module = rest.partition(".")
    module, _, kind = module.rpartition(".")
    for ours, theirs in _BLOCK[model_type].items():
        if theirs == module:
            return f"blk.{layer}.{ours}.{kind}"
    raise CheckpointError(f"tensor {hf!r} has no GGUF name in llama.cpp's {ARCHITECTURES[model_type]} layout")


# ---------------------------------------------------------------------------------------------- opening
def open_gguf(path: Path) -> GGUFReader:
    """The file's metadata and tensor index (memory-mapped, copy-on-write); damaged files fail here, named."""
    from gguf import GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        """gguf-py's reader, faster where a file is large: it reads every value through a slice of a numpy memmap
        (~10 us each, as the memmap subclass is slow to slice) and every string of an array as a value of its
        own; a vocabulary and its merges are 100k strings, 10-15 s. Here the slices come from a plain array over
        the same mapping, and string arrays are walked in one loop, into the same parts gguf-py makes."""

        def _get(self, *args, **kwargs):
            if type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)  # the mapping stays alive as the view's base
            return super()._get(*args, **kwargs)

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            item = GGUFValueType(int(item_type[0]))
            scalar = self.gguf_scalar_to_np.get(item)
            if item != GGUFValueType.STRING and scalar is None:  # arrays of arrays
                return super()._get_field_parts(orig_offs, raw_type)
            data, offs = self.data, orig_offs + 12
            parts, indices = [item_type, count], []
            for _ in range(int(count[0])):
                if scalar is None:  # a string: its length, then its bytes
                    (length,) = struct.unpack_from("<Q", data, offs)
                    parts.append(data[offs : offs + 8].view(np.uint64))
                    offs += 8
                else:
                    length = np.dtype(scalar).itemsize
                parts.append(data[offs : offs + length] if scalar is None else data[offs : offs + length].view(scalar))
                indices.append(len(parts) - 1)
                offs += length
            return offs - orig_offs, parts, indices, [GGUFValueType.ARRAY, item]

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (little-endian versions 2 and 3 "
                              "are)")
    try:
        reader = Reader(path, "c")
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path}: unreadable GGUF file, damaged or truncated ({type(e).__name__}: {e})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {tensor.name!r} ends at byte "
                                  f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes")
    return reader


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---------------------------------------------------------------------------------------------- config
def read_config(reader: GGUFReader, path: Path) -> Config:
    """Our Config from llama.cpp's metadata keys (through the config.json transformers would have)."""
    arch = _field(reader, "general.architecture")
    if arch not in _MODEL_TYPES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not a StarCoder model; supported: "
                          f"{', '.join(_MODEL_TYPES)}")
    model_type = _MODEL_TYPES[arch]
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise ConfigError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    n_embd, vocab = (int(d) for d in names["token_embd.weight"].shape[:2])
    # The MLP width from its weights: llama.cpp's converter writes 4 * n_embd for `starcoder` whatever n_inner is.
    up = names.get("blk.0.ffn_up.weight")
    n_inner = int(up.shape[1]) if up is not None else int(key("feed_forward_length"))
    n_head = int(key("attention.head_count"))
    n_kv_head = int(key("attention.head_count_kv", n_head))
    bos, eos = _bos_eos(reader)
    common = dict(vocab_size=vocab, tie_word_embeddings="output.weight" not in names, bos_token_id=bos,
                  eos_token_id=eos)
    if model_type == "gpt_bigcode":
        if n_kv_head not in (1, n_head):
            raise ConfigError(f"{path}: {n_kv_head} KV heads for {n_head} heads; gpt_bigcode has 1 or {n_head}")
        hf = dict(model_type=model_type, architectures=["GPTBigCodeForCausalLM"], n_embd=n_embd,
                  n_layer=int(key("block_count")), n_head=n_head, n_inner=n_inner,
                  n_positions=int(key("context_length")), multi_query=n_kv_head == 1,
                  layer_norm_epsilon=float(key("attention.layer_norm_epsilon", 1e-5)), **common)
    else:
        window = _field(reader, f"{arch}.attention.sliding_window")
        if window is None:
            log.info("%s: no sliding window in the metadata (llama.cpp's converter writes none): attending to the "
                     "whole context, as llama.cpp does", path)
        hf = dict(model_type=model_type, architectures=["Starcoder2ForCausalLM"], hidden_size=n_embd,
                  num_hidden_layers=int(key("block_count")), num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                  intermediate_size=n_inner, max_position_embeddings=int(key("context_length")),
                  norm_epsilon=float(key("attention.layer_norm_epsilon", 1e-5)),
                  rope_theta=float(key("rope.freq_base", 10000.0)), sliding_window=window,
                  use_bias="blk.0.attn_q.bias" in names, **common)
        head_dim = _field(reader, f"{arch}.attention.key_length")
        if head_dim is not None and int(head_dim) != n_embd // n_head:
            hf["head_dim"] = int(head_dim)
    return Config.from_hf_config(hf, source=str(path))


def _bos_eos(reader: GGUFReader) -> tuple[int | None, int | None]:
    return _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")


def write_config(writer: GGUFWriter, config: Config, name: str) -> None:
    """llama.cpp's metadata keys for this config (the architecture itself was given to the writer)."""
    writer.add_name(name)
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_eps(config.norm_eps)
    if config.model_type == "starcoder2":
        writer.add_rope_freq_base(config.rope_theta)  # llama.cpp applies it NEOX-style for this architecture
        if config.head_dim != config.n_embd // config.n_head:
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        if config.sliding_window is not None:
            writer.add_sliding_window(config.sliding_window)


# ---------------------------------------------------------------------------------------------- tokenizer
def write_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` vocabulary with the `starcoder` pre-tokenizer (digits one by one,
    then the GPT-2 split), and every special id a client needs."""
    backend = tokenizer.backend
    model = backend.model
    if type(model).__name__ != "BPE":
        raise CheckpointError(f"{tokenizer.source}: a {type(model).__name__} tokenizer has no GGUF form here "
                              "(StarCoder tokenizers are byte-level BPE)")
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, index in vocab.items():
        tokens[index] = text
    added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    types = [NORMAL if t not in added else CONTROL if added[t] else USER_DEFINED for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("starcoder")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(backend))
    writer.add_bos_token_id(tokenizer.eos_id)  # StarCoder models have one <|endoftext|> for both
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)
    for key, texts in _SPECIAL_IDS.items():
        found = next((vocab[t] for t in texts if t in vocab), None)
        if found is not None:
            writer.add_uint32(key, found)


def _merges(backend) -> list[str]:
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def read_tokenizer(reader: GGUFReader, path: Path) -> Tokenizer:
    """The tokenizer rebuilt from a GGUF vocabulary: the same ids and text as the tokenizer.json it came from."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from .tokenizer import Tokenizer

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (StarCoder's is 'gpt2')")
    if pre not in ("starcoder", "default"):
        log.warning("%s: pre-tokenizer %r read as 'starcoder' (digits one by one, then the GPT-2 split)", path, pre)
    tokens, merges = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: the file holds no tokenizer (tokenizer.ggml.tokens / .merges)")
    types = _field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                 merges=[tuple(m.split(" ", 1)) for m in merges]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    added = [(AddedToken(t, special=kind == CONTROL, normalized=False), kind)
             for t, kind in zip(tokens, types, strict=True) if kind in (CONTROL, USER_DEFINED)]
    backend.add_special_tokens([t for t, kind in added if kind == CONTROL])
    backend.add_tokens([t for t, kind in added if kind == USER_DEFINED])
    eos_id = _bos_eos(reader)[1]
    eos = tokens[eos_id] if eos_id is not None and 0 <= eos_id < len(tokens) else "<|endoftext|>"
    return Tokenizer(backend, eos, str(path))
