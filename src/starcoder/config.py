"""The model configuration: one dataclass for both decoder families and the encoder (StarEncoder, StarPII: BERT),
read from and written to Hugging Face config.json.

Field names follow GPT-2 / nanoGPT (n_embd, n_layer, n_head). Missing optional fields take the defaults of
transformers' own config classes, so a config.json means the same model here as it does there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # for loading: auto keeps the stored dtype

SUPPORTED_MODEL_TYPES = ("gpt_bigcode", "starcoder2", "bert")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu", "silu")
DECODER_HEADS = ("causal_lm", "sequence_classification")
ENCODER_HEADS = ("pretraining", "masked_lm", "token_classification")  # MLM + next-sentence, MLM alone, per token
HEADS = DECODER_HEADS + ENCODER_HEADS

# transformers class names <-> our head names, per family.
_ARCHITECTURES = {
    ("gpt_bigcode", "causal_lm"): "GPTBigCodeForCausalLM",
    ("gpt_bigcode", "sequence_classification"): "GPTBigCodeForSequenceClassification",
    ("starcoder2", "causal_lm"): "Starcoder2ForCausalLM",
    ("starcoder2", "sequence_classification"): "Starcoder2ForSequenceClassification",
    ("bert", "pretraining"): "BertForPreTraining",
    ("bert", "masked_lm"): "BertForMaskedLM",
    ("bert", "token_classification"): "BertForTokenClassification",
}


@dataclass
class Config:
    model_type: str  # "gpt_bigcode" (StarCoder, StarCoderBase, SantaCoder), "starcoder2" or "bert" (StarEncoder)
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int  # 1 = multi-query (StarCoder), < n_head = grouped-query (StarCoder2), n_head = multi-head
    n_inner: int  # MLP width
    max_positions: int  # learned position table size (gpt_bigcode, bert) or trained context (starcoder2)
    head_dim: int = 0  # 0: n_embd // n_head
    rope_theta: float | None = None  # None: learned absolute positions
    sliding_window: int | None = None  # key j visible to query i iff 0 <= i - j < sliding_window
    bias: bool = True
    norm_eps: float = 1e-5
    activation: str = "gelu_pytorch_tanh"
    tie_embeddings: bool = True
    scale_attn_weights: bool = True  # gpt_bigcode only; False means no 1/sqrt(head_dim)
    head: str = "causal_lm"  # one of HEADS: the decoder's or the encoder's
    type_vocab_size: int = 0  # bert: token-type (segment) embeddings
    num_labels: int = 2
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None
    # The config.json this came from, kept so that saving writes back every field we do not model.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.n_embd // max(self.n_head, 1)
        self.validate()

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", "n_inner", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be a multiple of the KV heads ({self.n_kv_head})")
        if self.model_type == "gpt_bigcode" and self.n_embd != self.n_head * self.head_dim:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.rope_theta is not None and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        heads = ENCODER_HEADS if self.encoder else DECODER_HEADS
        if self.head not in heads:
            raise ConfigError(f"head {self.head!r} is not supported for {self.model_type}; "
                              f"supported: {', '.join(heads)}")
        if self.encoder and (self.rope_theta is not None or self.n_kv_head != self.n_head or self.type_vocab_size <= 0):
            raise ConfigError("bert has learned positions, one KV head per head and token types")

    # ------------------------------------------------------------------ derived facts
    @property
    def learned_positions(self) -> bool:
        return self.rope_theta is None

    @property
    def encoder(self) -> bool:
        """A bidirectional encoder (post-LayerNorm blocks, token types) rather than a causal decoder."""
        return self.model_type == "bert"

    @property
    def tied_head(self) -> str | None:
        """Our name of the output matrix that is the token embedding itself (not stored in files), if any."""
        if not self.tie_embeddings:
            return None
        return {"causal_lm": "lm_head.weight", "pretraining": "mlm.decoder.weight",
                "masked_lm": "mlm.decoder.weight"}.get(self.head)

    @property
    def family(self) -> str:
        return {"gpt_bigcode": "StarCoder (gpt_bigcode)", "starcoder2": "StarCoder2",
                "bert": "StarEncoder (bert)"}[self.model_type]

    @property
    def attention_kind(self) -> str:
        if self.n_kv_head == 1 and self.n_head > 1:
            return "multi-query"
        return "multi-head" if self.n_kv_head == self.n_head else "grouped-query"

    def require_causal_lm(self, where: str | object, job: str) -> None:
        """A clear error where a job that generates text is given another kind of model (an encoder, a classifier)."""
        if self.head != "causal_lm":
            raise ConfigError(f"{where}: {job} needs a causal language model (StarCoder, StarCoder2); this is a "
                              f"{self.family} model with a {self.head} head")

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        """Keys and values of every layer for one token: only the KV heads are stored."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_value

    def num_parameters(self) -> int:
        d, kv = self.n_embd, self.n_kv_head * self.head_dim
        q = self.n_head * self.head_dim
        b = 1 if self.bias else 0
        attn = d * (q + 2 * kv) + b * (q + 2 * kv) + q * d + b * d
        mlp = 2 * d * self.n_inner + b * (self.n_inner + d)
        norms = 2 * 2 * d
        per_layer = attn + mlp + norms
        total = self.vocab_size * d + self.n_layer * per_layer + 2 * d
        if self.learned_positions:
            total += self.max_positions * d
        if self.encoder:  # token types (its embeddings' norm is counted as the final norm); the MLM head, the pooler
            total += self.type_vocab_size * d
            if self.head != "token_classification":
                total += d * d + 3 * d + self.vocab_size + (d * d + d + 2 * d + 2 if self.head == "pretraining" else 0)
        if self.head in ("sequence_classification", "token_classification"):
            total += d * self.num_labels + (self.num_labels if self.encoder else 0)
        elif not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> Config:
        """Build a Config from a parsed config.json; `source` names the file in error messages."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        reader = _FieldReader(hf, source)
        if model_type == "gpt_bigcode":
            if reader.get("add_cross_attention", False):
                raise ConfigError(f"{source}: add_cross_attention is not supported (StarCoder models are decoders)")
            n_embd = reader.int("n_embd", 768, "hidden_size")
            n_head = reader.int("n_head", 12, "num_attention_heads")
            n_inner = reader.get("n_inner")
            kwargs: dict[str, Any] = dict(
                vocab_size=reader.int("vocab_size", 50257),
                n_embd=n_embd,
                n_layer=reader.int("n_layer", 12, "num_hidden_layers"),
                n_head=n_head,
                n_kv_head=1 if reader.get("multi_query", True) else n_head,
                n_inner=4 * n_embd if n_inner is None else reader.int("n_inner", 0),
                max_positions=reader.int("n_positions", 1024, "max_position_embeddings"),
                norm_eps=float(reader.get("layer_norm_epsilon", 1e-5)),
                activation=reader.get("activation_function", "gelu_pytorch_tanh"),
                scale_attn_weights=bool(reader.get("scale_attn_weights", True)),
                bos_token_id=reader.get("bos_token_id", 50256),
                eos_token_id=reader.get("eos_token_id", 50256),
            )
        elif model_type == "bert":
            if reader.get("position_embedding_type", "absolute") != "absolute":
                raise ConfigError(f"{source}: position_embedding_type {reader.get('position_embedding_type')!r} is "
                                  "not supported (only absolute, as StarEncoder)")
            if reader.get("is_decoder", False) or reader.get("add_cross_attention", False):
                raise ConfigError(f"{source}: a bert decoder is not supported (StarEncoder is an encoder)")
            n_head = reader.int("num_attention_heads", 12)
            kwargs = dict(
                vocab_size=reader.int("vocab_size", 30522),
                n_embd=reader.int("hidden_size", 768),
                n_layer=reader.int("num_hidden_layers", 12),
                n_head=n_head,
                n_kv_head=n_head,
                n_inner=reader.int("intermediate_size", 3072),
                max_positions=reader.int("max_position_embeddings", 512),
                type_vocab_size=reader.int("type_vocab_size", 2),
                norm_eps=float(reader.get("layer_norm_eps", 1e-12)),
                activation=reader.get("hidden_act", "gelu"),
                bos_token_id=reader.get("bos_token_id"),
                eos_token_id=reader.get("eos_token_id"),
            )
        else:
            n_head = reader.int("num_attention_heads", 24)
            kwargs = dict(
                vocab_size=reader.int("vocab_size", 49152),
                n_embd=reader.int("hidden_size", 3072),
                n_layer=reader.int("num_hidden_layers", 30),
                n_head=n_head,
                n_kv_head=reader.int("num_key_value_heads", 2),
                n_inner=reader.int("intermediate_size", 12288),
                max_positions=reader.int("max_position_embeddings", 4096),
                head_dim=reader.get("head_dim") or 0,
                rope_theta=_rope_theta(reader),
                sliding_window=reader.get("sliding_window"),
                bias=bool(reader.get("use_bias", True)),
                norm_eps=float(reader.get("norm_epsilon", 1e-5)),
                activation=reader.get("hidden_act", "gelu_pytorch_tanh"),
                bos_token_id=reader.get("bos_token_id", 50256),
                eos_token_id=reader.get("eos_token_id", 50256),
            )
        kwargs["tie_embeddings"] = bool(reader.get("tie_word_embeddings", True))
        kwargs["pad_token_id"] = reader.get("pad_token_id")
        kwargs["head"] = _head_from_architectures(reader, model_type)
        id2label = reader.get("id2label")
        kwargs["num_labels"] = len(id2label) if isinstance(id2label, dict) else reader.int("num_labels", 2)
        try:
            return cls(model_type=model_type, hf_config=copy.deepcopy(hf), **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json transformers reads as this same model; unknown fields of the source are kept."""
        if self.model_type == "gpt_bigcode":
            if self.n_kv_head not in (1, self.n_head):
                raise ConfigError("gpt_bigcode supports one KV head (multi_query) or one per head, nothing between")
            ours = dict(
                vocab_size=self.vocab_size,
                n_positions=self.max_positions,
                n_embd=self.n_embd,
                n_layer=self.n_layer,
                n_head=self.n_head,
                n_inner=self.n_inner,
                multi_query=self.n_kv_head == 1,
                activation_function=self.activation,
                layer_norm_epsilon=self.norm_eps,
                scale_attn_weights=self.scale_attn_weights,
            )
        elif self.encoder:
            ours = dict(
                vocab_size=self.vocab_size,
                hidden_size=self.n_embd,
                num_hidden_layers=self.n_layer,
                num_attention_heads=self.n_head,
                intermediate_size=self.n_inner,
                max_position_embeddings=self.max_positions,
                type_vocab_size=self.type_vocab_size,
                layer_norm_eps=self.norm_eps,
                hidden_act=self.activation,
                position_embedding_type="absolute",
            )
        else:
            ours = dict(
                vocab_size=self.vocab_size,
                hidden_size=self.n_embd,
                intermediate_size=self.n_inner,
                num_hidden_layers=self.n_layer,
                num_attention_heads=self.n_head,
                num_key_value_heads=self.n_kv_head,
                max_position_embeddings=self.max_positions,
                rope_theta=self.rope_theta,
                sliding_window=self.sliding_window,
                use_bias=self.bias,
                norm_epsilon=self.norm_eps,
                hidden_act=self.activation,
            )
            if self.head_dim != self.n_embd // self.n_head:
                ours["head_dim"] = self.head_dim
        hf = copy.deepcopy(self.hf_config)
        hf.pop("rope_parameters", None)  # rope_theta above is read by every transformers version
        hf.update(ours)
        hf.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type, self.head]],
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.head in ("sequence_classification", "token_classification"):
            hf["id2label"] = {str(i): hf.get("id2label", {}).get(str(i), f"LABEL_{i}") for i in range(self.num_labels)}
            hf["label2id"] = {label: int(i) for i, label in hf["id2label"].items()}
        if dtype is not None:
            hf["torch_dtype"] = dtype
            hf.pop("dtype", None)
        return hf

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a model directory needs a config.json)")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_config(hf, source=str(path))

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_config"}


class _FieldReader:
    """Reads config.json fields with type checks whose errors name the file and the field."""

    def __init__(self, hf: dict[str, Any], source: str):
        self.hf, self.source = hf, source

    def get(self, name: str, default: Any = None) -> Any:
        value = self.hf.get(name)
        return default if value is None else value

    def int(self, name: str, default: int, alias: str | None = None) -> int:
        value = self.hf.get(name)
        if value is None and alias is not None:
            value, name = self.hf.get(alias), alias if alias in self.hf else name
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.source}: field {name!r} must be an integer, got {value!r}")
        return value


def _rope_theta(reader: _FieldReader) -> float:
    # transformers 5 nests RoPE settings under rope_parameters; earlier versions and the real
    # StarCoder2 checkpoints keep rope_theta (and rope_scaling) at the top level.
    params = reader.get("rope_parameters") or {}
    scaling = reader.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"{reader.source}: RoPE scaling {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta") or reader.get("rope_theta", 10000.0))


def _head_from_architectures(reader: _FieldReader, model_type: str) -> str:
    architectures = reader.get("architectures") or []
    for (mtype, head), name in _ARCHITECTURES.items():
        if mtype == model_type and name in architectures:
            return head
    return "pretraining" if model_type == "bert" else "causal_lm"


# Shapes of the published checkpoints (random weights made from these are what benchmarks use) and tiny ones for
# tests and the first-run demo. Vocabulary 49152 (49156 for the encoders) so the real tokenizers fit every preset.
_BERT = dict(model_type="bert", vocab_size=49156, type_vocab_size=2, norm_eps=1e-12, activation="gelu",
             head="pretraining", bos_token_id=None, eos_token_id=None)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-starcoder": dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4, n_kv_head=1, n_inner=256,
                           max_positions=512),
    "tiny-starencoder": dict(**_BERT, n_embd=64, n_layer=2, n_head=4, n_kv_head=4, n_inner=256, max_positions=128),
    "starencoder": dict(**_BERT, n_embd=768, n_layer=12, n_head=12, n_kv_head=12, n_inner=3072,
                        max_positions=1024),  # bigcode/starencoder, and StarPII's body
    "tiny-starcoder2": dict(model_type="starcoder2", n_embd=64, n_layer=2, n_head=4, n_kv_head=2, n_inner=256,
                            max_positions=512, rope_theta=10000.0, sliding_window=128),
    "tiny_starcoder_py": dict(model_type="gpt_bigcode", n_embd=768, n_layer=20, n_head=12, n_kv_head=1,
                              n_inner=3072, max_positions=8192),  # bigcode/tiny_starcoder_py, 164M: a draft model
    "starcoderbase-1b": dict(model_type="gpt_bigcode", n_embd=2048, n_layer=24, n_head=16, n_kv_head=1,
                             n_inner=8192, max_positions=8192),
    "starcoderbase-3b": dict(model_type="gpt_bigcode", n_embd=2816, n_layer=36, n_head=22, n_kv_head=1,
                             n_inner=11264, max_positions=8192),
    "starcoderbase-7b": dict(model_type="gpt_bigcode", n_embd=4096, n_layer=42, n_head=32, n_kv_head=1,
                             n_inner=16384, max_positions=8192),
    "starcoder-15b": dict(model_type="gpt_bigcode", n_embd=6144, n_layer=40, n_head=48, n_kv_head=1,
                          n_inner=24576, max_positions=8192),
    "starcoder2-3b": dict(model_type="starcoder2", n_embd=3072, n_layer=30, n_head=24, n_kv_head=2, n_inner=12288,
                          max_positions=16384, rope_theta=999999.4420358813, sliding_window=4096),
    "starcoder2-7b": dict(model_type="starcoder2", n_embd=4608, n_layer=32, n_head=36, n_kv_head=4, n_inner=18432,
                          max_positions=16384, rope_theta=1000000.0, sliding_window=4096),
    "starcoder2-15b": dict(model_type="starcoder2", n_embd=6144, n_layer=40, n_head=48, n_kv_head=4, n_inner=24576,
                           max_positions=16384, rope_theta=100000.0, sliding_window=4096),
}


def preset(name: str, **overrides: Any) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return Config(**{"vocab_size": 49152, **PRESETS[name], **overrides})
