"""Config from the config.json files of the published checkpoints, and back."""

from __future__ import annotations

import pytest

from starcoder import Config, ConfigError, preset
from starcoder.config import PRESETS

# Abridged from the published config.json files (field names and values as released).
STARCODER_15B = {
    "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode", "activation_function": "gelu_pytorch_tanh",
    "attention_softmax_in_fp32": True, "bos_token_id": 0, "eos_token_id": 0, "inference_runner": 0,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_batch_size": None, "max_sequence_length": None,
    "multi_query": True, "n_embd": 6144, "n_head": 48, "n_inner": 24576, "n_layer": 40, "n_positions": 8192,
    "scale_attn_weights": True, "vocab_size": 49152, "torch_dtype": "float32",
}
STARCODER2_3B = {
    "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "attention_dropout": 0.1,
    "bos_token_id": 0, "embedding_dropout": 0.1, "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 3072, "initializer_range": 0.018042, "intermediate_size": 12288, "max_position_embeddings": 16384,
    "mlp_type": "default", "norm_epsilon": 1e-05, "norm_type": "layer_norm", "num_attention_heads": 24,
    "num_hidden_layers": 30, "num_key_value_heads": 2, "residual_dropout": 0.1, "rope_theta": 999999.4420358813,
    "sliding_window": 4096, "use_bias": True, "use_cache": True, "vocab_size": 49152, "torch_dtype": "bfloat16",
}


def test_starcoder_15b():
    c = Config.from_hf_config(STARCODER_15B)
    assert (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim) == (6144, 40, 48, 1, 128)
    assert c.learned_positions and c.sliding_window is None and c.attention_kind == "multi-query"
    assert c.kv_cache_bytes_per_token(2) == 20 * 1024
    assert abs(c.num_parameters() - 15.5e9) < 0.1e9


def test_starcoder2_3b():
    c = Config.from_hf_config(STARCODER2_3B)
    assert (c.n_head, c.n_kv_head, c.sliding_window, c.max_positions) == (24, 2, 4096, 16384)
    assert c.rope_theta == pytest.approx(999999.4420358813) and c.bias and c.attention_kind == "grouped-query"
    assert abs(c.num_parameters() - 3.03e9) < 0.05e9


def test_rope_parameters_of_transformers_5():
    hf = {**STARCODER2_3B, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    del hf["rope_theta"]
    assert Config.from_hf_config(hf).rope_theta == 100000.0


def test_rope_scaling_is_refused():
    with pytest.raises(ConfigError, match="RoPE scaling 'linear' is not supported"):
        Config.from_hf_config({**STARCODER2_3B, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_multi_head_gpt_bigcode():
    c = Config.from_hf_config({**STARCODER_15B, "multi_query": False})
    assert c.n_kv_head == 48 and c.attention_kind == "multi-head"


def test_round_trip_keeps_unknown_fields():
    for hf in (STARCODER_15B, STARCODER2_3B):
        out = Config.from_hf_config(hf).to_hf_config()
        assert Config.from_hf_config(out) == Config.from_hf_config(hf)
        assert out["initializer_range"] == hf["initializer_range"]


def test_classification_head_from_architectures():
    c = Config.from_hf_config({**STARCODER_15B, "architectures": ["GPTBigCodeForSequenceClassification"],
                               "id2label": {"0": "bad", "1": "good", "2": "ugly"}})
    assert c.head == "sequence_classification" and c.num_labels == 3
    assert c.to_hf_config()["id2label"] == {"0": "bad", "1": "good", "2": "ugly"}


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported; supported: gpt_bigcode, starcoder2"),
    ({"num_attention_heads": 24, "num_key_value_heads": 5}, r"n_head \(24\) must be a multiple of the KV heads \(5\)"),
    ({"hidden_act": "swiglu"}, "activation 'swiglu' is not supported"),
    ({"sliding_window": -1}, "sliding_window must be positive"),
    ({"hidden_size": 0}, "n_embd must be a positive integer"),
])
def test_bad_configs(bad, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_hf_config({**STARCODER2_3B, **bad}, source="x/config.json")


def test_not_an_object():
    with pytest.raises(ConfigError, match="config.json: expected a JSON object"):
        Config.from_hf_config([1, 2])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    c = preset(name)
    assert Config.from_hf_config(c.to_hf_config()) == c


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
