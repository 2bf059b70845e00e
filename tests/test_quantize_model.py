"""Quantizing whole models: files, reloading, generating, and every bad input."""

from __future__ import annotations

import json
import json.decoder
import json.encoder
import shutil
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from starcoder import StarCoderError, load, load_model
from starcoder.__main__ import main
from starcoder.api import default_model_dir
from starcoder.errors import CheckpointError
from starcoder.linears.quantized import QuantLinear
from starcoder.quantize.gptq import QuantSettings
from starcoder.quantize.run import quantize_model


@pytest.fixture(scope="module", params=["tiny-starcoder", "tiny-starcoder2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    assert main(["init", str(path), "--preset", request.param, "--seed", "0"]) == 0
    return path


def read_all(out):
    """Every tensor of a (sharded) quantized directory, and which shard holds each."""
    tensors, where = {}, {}
    for shard in sorted(out.glob("model-*.safetensors")):
        for name, tensor in load_file(shard).items():
            tensors[name], where[name] = tensor, shard
    return tensors, where


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / a.float().norm())


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("bits, group_size, act_order", [(4, -1, True), (4, 32, False), (4, 32, True), (8, -1, False)])
def test_quantize_reload_and_generate(tiny, tmp_path, bits, group_size, act_order):
    out = tmp_path / "q"
    quantize_model(str(tiny), out, QuantSettings(bits=bits, group_size=group_size, act_order=act_order),
                   n_samples=4, seq_len=64, progress=False)
    quant = json.loads((out / "quantize_config.json").read_text())
    assert quant | {"bits": bits, "group_size": group_size, "desc_act": act_order, "quant_method": "gptq"} == quant
    assert json.loads((out / "config.json").read_text())["quantization_config"] == quant
    assert len(list(out.glob("model-*.safetensors"))) == 3  # one shard per block, then the rest
    tensors, _ = read_all(out)
    family = json.loads((tiny / "config.json").read_text())["model_type"]
    first = "transformer.h.0.attn.c_attn" if family == "gpt_bigcode" else "model.layers.0.self_attn.q_proj"
    assert tensors[f"{first}.qweight"].dtype == torch.int32 and tensors[f"{first}.scales"].dtype == torch.float16
    assert f"{first}.g_idx" in tensors and not any(n.startswith("lm_head") and "qweight" in n for n in tensors)

    model = load_model(out, dtype="float32")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 6 * 2
    original = load_model(tiny, dtype="float32")
    ids = torch.randint(0, 1000, (2, 24))
    error = relative_error(logits(original, ids), logits(model, ids))
    assert error < (0.01 if bits == 8 else 0.2), error  # 8 bits: close to the original
    completion = load(str(out), dtype="float32").complete("def add(a, b):", max_new_tokens=8)
    assert len(completion.token_ids) == 8
    assert main(["info", "--model", str(out)]) == 0


@pytest.mark.parametrize("int8_activations", ["1", "0"])
def test_int4_kernel_path_on_the_embedded_model(tmp_path, monkeypatch, int8_activations):
    """The embedded model's shapes take the int4 kernel everywhere; act-order and groups, both prompt paths, with
    the activations quantized for integer dot products (where the CPU has them) and kept in bfloat16."""
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", int8_activations)
    out = tmp_path / "q"
    assert main(["quantize", "--out", str(out), "--group-size", "128", "--act-order", "--n-samples", "8",
                 "--seq-len", "128"]) == 0
    model = load_model(out)
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    # ours on AVX2 CPUs (AVX-512 ones too; their exact path: native-int4), PyTorch's elsewhere
    assert modes in ({"int4"}, {"native-int4"}, {"avx2-int4"})
    integer = {m.int8_activations for m in model.modules() if isinstance(m, QuantLinear)}
    assert integer == {modes == {"avx2-int4"} and int8_activations == "1"}
    original = load_model(default_model_dir())
    ids = torch.randint(100, 16000, (1, 40))
    assert relative_error(logits(original, ids), logits(model, ids)) < 0.15
    # decoding with the cache (the int4 kernel) agrees with the long-prompt path (dequantized matmul); int8
    # activations add their own rounding (what it costs in perplexity is in BENCHMARKS.md: under 0.1%)
    full = logits(model, ids)[0, -1]
    cache = model.new_cache(1, 64)
    with torch.inference_mode():
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache).logits[0, -1]
    assert relative_error(full, step) < (0.05 if integer == {True} else 0.02)


def test_readers_accept_thebloke_v2_meta_and_missing_g_idx(tiny, tmp_path):
    out = tmp_path / "q"
    quantize_model(str(tiny), out, QuantSettings(group_size=32), n_samples=4, seq_len=64, progress=False)
    reference = logits(load_model(out, dtype="float32"), ids := torch.randint(0, 1000, (1, 16)))

    bloke = tmp_path / "bloke"  # TheBloke: one gptq_model-4bit-32g.safetensors, settings only in quantize_config.json
    shutil.copytree(out, bloke)
    tensors, _ = read_all(bloke)
    for stale in [*bloke.glob("model-*.safetensors"), bloke / "model.safetensors.index.json"]:
        stale.unlink()
    config = json.loads((bloke / "config.json").read_text())
    del config["quantization_config"]
    (bloke / "config.json").write_text(json.dumps(config))
    save_file({n: t for n, t in tensors.items() if not n.endswith("g_idx")}, bloke / "gptq_model-4bit-32g.safetensors")
    torch.testing.assert_close(logits(load_model(bloke, dtype="float32"), ids), reference)

    nested = tmp_path / "nested"  # GPTQModel: some settings under "meta"
    shutil.copytree(out, nested)
    config = json.loads((nested / "config.json").read_text())
    q = config.pop("quantization_config")
    config["quantization_config"] = {"bits": q["bits"], "group_size": q["group_size"], "quant_method": "gptq",
                                     "meta": {"desc_act": q["desc_act"], "sym": q["sym"]}}
    (nested / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits(load_model(nested, dtype="float32"), ids), reference)

    v2 = tmp_path / "v2"
    quantize_model(str(tiny), v2, QuantSettings(group_size=32, checkpoint_format="gptq_v2"), n_samples=4,
                   seq_len=64, progress=False)
    torch.testing.assert_close(logits(load_model(v2, dtype="float32"), ids), reference)


def test_damaged_or_inconsistent_quantized_checkpoints(tiny, tmp_path):
    out = tmp_path / "q"
    quantize_model(str(tiny), out, QuantSettings(group_size=32), n_samples=4, seq_len=64, progress=False)
    _, where = read_all(out)
    name = next(n for n in where if n.endswith(".qzeros"))
    shard = where[name]
    tensors = load_file(shard)

    broken = dict(tensors)
    del broken[name]
    save_file(broken, shard)
    with pytest.raises(CheckpointError, match="without qzeros"):
        load_model(out)

    broken = dict(tensors, **{name.replace("qzeros", "scales"): tensors[name.replace("qzeros", "scales")][:1]})
    save_file(broken, shard)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(out)

    save_file(tensors, shard)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # settings that do not match the tensors
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(out)
    config["quantization_config"]["bits"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="3-bit weights are not supported"):
        load_model(out)


def test_bad_settings_fail_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = tmp_path / "code"  # a small calibration set: reading the whole standard library is not the point here
    code.mkdir()
    for module in (textwrap, json.decoder, json.encoder):
        shutil.copy(module.__file__, code)
    cases = [
        (["--group-size", "100"], "group size must be one of"),
        (["--group-size", "256"], "group size 256 does not divide"),
        (["--bits", "8", "--group-size", "32"], "use --group-size -1"),
        (["--n-samples", "100000", "--seq-len", "64", "--calibration", str(code)], "lower --n-samples"),
        (["--damp", "2"], "damp must be in (0, 1)"),
    ]
    for extra, message in cases:
        assert main(["quantize", "--model", str(tiny), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err, extra
        assert not out.exists()
    quantize_model(str(tiny), out, QuantSettings(), [code], n_samples=4, seq_len=64, progress=False)
    with pytest.raises(StarCoderError, match="already quantized"):
        quantize_model(str(out), tmp_path / "again", QuantSettings(), n_samples=4, seq_len=64)
    assert main(["quantize", "--model", str(tiny), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(StarCoderError, match="is quantized"):
        from starcoder import save_model

        save_model(load_model(out), tmp_path / "resaved")


def test_calibration_from_a_given_directory(tiny, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "q"
    quantize_model(str(tiny), out, QuantSettings(), calibration=[code], n_samples=2, seq_len=64, progress=False)
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(StarCoderError, match="has .* tokens; 50 samples of 64 need 3,200"):
        quantize_model(str(tiny), tmp_path / "q2", QuantSettings(), calibration=[code], n_samples=50, seq_len=64)


def test_rtn_rounds_each_weight_alone_without_calibration(tiny, tmp_path, monkeypatch):
    """--method rtn reads no calibration data and runs no block: its files are each weight rounded on its own."""
    from starcoder.quantize.gptq import rtn

    def no_forward(*args, **kwargs):
        raise AssertionError("round-to-nearest ran a module")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_forward)
    settings = QuantSettings(group_size=32)
    out = tmp_path / "q"
    stats = quantize_model(str(tiny), out, settings, calibration=[tmp_path / "nothing-here"], method="rtn",
                           progress=False)
    assert stats["gptq_loss"] == {}
    monkeypatch.undo()
    original = load_model(tiny, dtype="float32")
    quantized = load_model(out, dtype="float32")
    for name in ("attn.q", "mlp.proj"):
        want = rtn(original.model.layers[1].get_submodule(name).weight.detach(), settings).dequantize(torch.float32)
        got = quantized.model.layers[1].get_submodule(name).dequantize().float()
        torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-7)  # the file keeps the scales in float16


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, -1)])
def test_packed_quantized_models_read_q_k_v_as_one_layer(tiny, tmp_path, bits, group_size):
    """Loaded for inference (pack=True, as starcoder.load does), q, k and v stored alike become one quantized layer
    (one kernel call per token instead of three), with the logits of the three apart, decoding and prompt alike;
    loaded for saving or exporting (pack=False) they stay three."""
    out = tmp_path / "q"
    quantize_model(str(tiny), out, QuantSettings(bits=bits, group_size=group_size), method="rtn", progress=False)
    apart, together = load_model(out, dtype="float32"), load_model(out, dtype="float32", pack=True)
    attention = together.model.layers[0].attn
    assert isinstance(attention.qkv, QuantLinear) and not hasattr(attention, "q")
    assert attention.qkv.out_features == sum(attention.widths)
    assert apart.model.layers[0].attn.qkv is None and isinstance(apart.model.layers[0].attn.q, QuantLinear)
    ids = torch.randint(0, 1000, (1, 24))
    torch.testing.assert_close(logits(together, ids), logits(apart, ids), rtol=1e-4, atol=1e-4)
    caches = [model.new_cache(1, 32) for model in (apart, together)]
    with torch.inference_mode():
        for model, cache in zip((apart, together), caches, strict=True):
            model(ids[:, :20], cache=cache)
        steps = [model(ids[:, 20:21], cache=cache).logits for model, cache in zip((apart, together), caches,
                                                                                   strict=True)]
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
