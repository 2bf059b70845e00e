"""Checkpoints: round trips with transformers, shards, the HF cache, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from conftest import HF_MODELS, hf_gpt_bigcode, hf_starcoder2, random_ids, transformers
from starcoder import CheckpointError, ConfigError, StarCoderError, load_model, save_model
from starcoder.checkpoint import read_safetensors_index
from starcoder.convert import hf_to_ours, ours_to_hf


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_conversion_is_a_bijection(name):
    hf = HF_MODELS[name]()
    from starcoder.config import Config

    config = Config.from_hf_config(hf.config.to_dict())
    hf_state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    back = ours_to_hf(config, hf_to_ours(config, hf_state))
    assert back.keys() == hf_state.keys()
    for key in hf_state:
        assert torch.equal(back[key], hf_state[key]), key


@pytest.mark.parametrize("name", sorted(HF_MODELS))
@torch.no_grad()
def test_our_save_loads_in_transformers(name, tmp_path):
    hf = HF_MODELS[name]()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = random_ids(2, 16)
    assert_close(reloaded(ids).logits, hf(ids).logits)
    assert_close(load_model(tmp_path / "ours")(ids).logits, hf(ids).logits)


@torch.no_grad()
def test_sharded_checkpoints_both_ways(tmp_path):
    hf = hf_gpt_bigcode()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "ours").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    ids = random_ids(1, 12)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert_close(reloaded(ids).logits, hf(ids).logits)
    # Saving again unsharded replaces the shards instead of leaving a mix behind.
    save_model(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "ours" / "model.safetensors.index.json").exists()
    assert_close(load_model(tmp_path / "ours")(ids).logits, hf(ids).logits)


def test_untied_lm_head_round_trip(tmp_path):
    hf = hf_starcoder2(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.lm_head.weight.data_ptr() != ours.model.embed.weight.data_ptr()
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits)


def test_tied_lm_head_is_one_parameter(tmp_path):
    hf_gpt_bigcode().save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed.weight
    assert len(list(ours.parameters())) == len(ours.state_dict()) - 1  # lm_head.weight is shared


def _hub_cache(tmp_path, repo_id="bigcode/tiny-test"):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    hf_starcoder2().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return tmp_path / "cache", snapshot


def test_hub_id_resolves_through_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache, snapshot = _hub_cache(tmp_path)
    ours = load_model("bigcode/tiny-test", cache_dir=cache)
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert_close(ours(ids).logits, load_model(snapshot)(ids).logits)


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StarCoderError, match="bigcode/not-cached is not a local directory.*HF_HUB_OFFLINE"):
        load_model("bigcode/not-cached", cache_dir=tmp_path)


def test_dtype_auto_keeps_the_stored_dtype(tmp_path):
    hf_starcoder2().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    assert load_model(tmp_path / "hf").model.embed.weight.dtype == torch.bfloat16
    assert load_model(tmp_path / "hf", dtype="float32").model.embed.weight.dtype == torch.float32
    with pytest.raises(StarCoderError, match="unknown dtype 'int3'"):
        load_model(tmp_path / "hf", dtype="int3")


# ------------------------------------------------------------------------------------------- bad input, one by one
@pytest.fixture
def model_dir(tmp_path):
    hf_gpt_bigcode().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_model_type(model_dir):
    _edit_config(model_dir, model_type="llama")
    with pytest.raises(ConfigError, match=r"config.json: model_type 'llama' is not supported; supported: gpt_bigcode"):
        load_model(model_dir)


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config.json: no such file"):
        load_model(model_dir)


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        load_model(model_dir)


def test_config_field_of_wrong_type(model_dir):
    _edit_config(model_dir, n_layer="two")
    with pytest.raises(ConfigError, match=r"config.json: field 'n_layer' must be an integer, got 'two'"):
        load_model(model_dir)


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found \(expected model.safetensors"):
        load_model(model_dir)


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at byte"):
        load_model(model_dir)


def test_truncated_inside_the_header(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model.safetensors: header length \d+ does not fit a 50-byte file"):
        load_model(model_dir)


def test_corrupted_header(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[9:14] = b"\xff\xfe{{{"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: damaged safetensors header"):
        load_model(model_dir)


def _rewrite_tensors(model_dir, edit):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(model_dir):
    _rewrite_tensors(model_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.1.mlp.c_fc.weight' is missing from .*model"):
        load_model(model_dir)


def test_tensor_of_wrong_shape(model_dir):
    def edit(t):
        t["transformer.h.0.ln_2.bias"] = torch.zeros(31)

    _rewrite_tensors(model_dir, edit)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'transformer.h.0.ln_2.bias' has shape "
                                              r"\[31\] but config.json describes \[32\]"):
        load_model(model_dir)


def test_config_with_fewer_layers_than_the_weights(model_dir):
    _edit_config(model_dir, n_layer=1)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.1\..*' is not part of the model that config"):
        load_model(model_dir)


def test_config_with_more_layers_than_the_weights(model_dir):
    _edit_config(model_dir, n_layer=3)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.2\..*' is missing"):
        load_model(model_dir)


def test_config_with_other_attention_than_the_weights(model_dir):
    _edit_config(model_dir, multi_query=False)
    message = r"tensor 'transformer.h.0.attn.c_attn.(weight|bias)' has shape \[48(, 32)?\] but config.json describes"
    with pytest.raises(CheckpointError, match=message):
        load_model(model_dir)


def test_missing_shard(tmp_path):
    hf_gpt_bigcode().save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard listed in model.safetensors.index.json is missin"):
        load_model(tmp_path / "m")


def test_pickle_refused_unless_allowed(tmp_path, model_dir):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled)
    torch.save(load_file(model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refusing to load a pickle checkpoint.*arbitrary"):
        load_model(pickled)
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert_close(load_model(pickled, allow_pickle=True)(ids).logits, load_model(model_dir)(ids).logits)


def test_not_a_directory(tmp_path, model_dir):
    with pytest.raises(StarCoderError, match=r"is a file; pass the model directory"):
        load_model(model_dir / "config.json")
    with pytest.raises(StarCoderError, match=r"no such model directory"):
        load_model(tmp_path / "nowhere" / "at" / "all")


def test_header_reader_accepts_what_safetensors_writes(model_dir):
    from safetensors import safe_open

    ours = {t.name: (t.shape, t.dtype) for t in read_safetensors_index(model_dir / "model.safetensors")}
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        theirs = {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118
    assert ours == theirs
