"""GGUF in and out: round trips through our writer and loader against transformers, the integer blocks against
gguf-py's own dequantization, the tokenizer rebuilt from the file, damaged files, and llama.cpp's own converter."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hf_gpt_bigcode, hf_starcoder2
from starcoder import load_model
from starcoder.__main__ import main
from starcoder.errors import CheckpointError, ConfigError, StarCoderError
from starcoder.gguf_file import hf_name, open_gguf
from starcoder.gguf_weights import export_gguf, export_model
from starcoder.linears.quantized import QuantLinear
from starcoder.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 49152  # the shipped tokenizers': a GGUF file carries its vocabulary
FAMILIES = {
    "gpt_bigcode-mqa": lambda: hf_gpt_bigcode(vocab_size=VOCAB, n_embd=64, n_inner=128),
    "gpt_bigcode-mha": lambda: hf_gpt_bigcode(vocab_size=VOCAB, n_embd=64, n_inner=128, multi_query=False),
    "starcoder2-window": lambda: hf_starcoder2(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               sliding_window=8),
    "starcoder2-nobias": lambda: hf_starcoder2(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               use_bias=False, rope_theta=100000.0),
    # Rows of 256 and more: K-quant blocks
    "gpt_bigcode-wide": lambda: hf_gpt_bigcode(vocab_size=VOCAB, n_embd=256, n_inner=512, n_layer=3),
}
CODE = ("<repo_name>acme/tools<file_sep>util.py\n<fim_prefix>def área(r):\n    return 3.14159 * r ** 2  # 12345\n"
        "<fim_suffix>\n\tprint(área(2))\n<fim_middle>    \n<|endoftext|>")


def _model_dir(name: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    hf = FAMILIES[name]()
    path = tmp_path / name
    hf.save_pretrained(path)
    Tokenizer.for_family(hf.config.model_type).save(path)
    return hf, path


def _ids(length: int = 24) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", [n for n in sorted(FAMILIES) if "wide" not in n])
def test_f32_round_trip_gives_the_hf_logits(name, tmp_path):
    hf, path = _model_dir(name, tmp_path)
    out = export_model(path, tmp_path / "model.gguf", "f32")
    ours = load_model(out)
    assert ours.config.model_type == hf.config.model_type
    assert ours.config.sliding_window == getattr(hf.config, "sliding_window", None)
    ids = _ids(20)  # longer than the window of starcoder2-window
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "quant"), [("gpt_bigcode-mqa", "q8_0"), ("gpt_bigcode-mqa", "q4_0"),
                                             ("starcoder2-window", "q8_0"), ("starcoder2-window", "q4_0"),
                                             ("gpt_bigcode-wide", "q4_k_m")])
def test_blocks_load_as_gguf_py_dequantizes_them(name, quant, tmp_path, monkeypatch):
    hf, path = _model_dir(name, tmp_path)
    out = export_model(path, tmp_path / f"model-{quant}.gguf", quant)
    monkeypatch.setenv("STARCODER_INT8_ACTIVATIONS", "0")  # the exact products: int8 activations approximate them
    ours = load_model(out, dtype="float32")
    # The reference: transformers' model holding gguf-py's dequantization of every tensor in the file.
    state = {hf_name(hf.config.model_type, t.name): torch.from_numpy(
        gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tuple(reversed(t.shape.tolist())))
        for t in open_gguf(out).tensors}
    hf.load_state_dict(state, strict=False)
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=1e-4, rtol=1e-4)
    kinds = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    if quant == "q4_k_m":  # Q6_K where llama-quantize gives more bits (the output; of 3 layers, the last one's)
        assert kinds["blk.0.ffn_up.weight"] == "Q4_K" and kinds["blk.1.ffn_down.weight"] == "Q4_K"
        assert kinds["blk.2.ffn_down.weight"] == "Q6_K"
        assert kinds["output.weight" if "output.weight" in kinds else "token_embd.weight"] == "Q6_K"
        return
    # The blocks became integer layers, read from the integers (not from floats).
    fc = ours.model.layers[0].mlp.fc
    assert isinstance(fc, QuantLinear) and fc.bits == (4 if quant == "q4_0" else 8)


def test_k_quant_writers_give_llama_quantizes_bytes():
    """tests/data/llamacpp_kquants.npz: the first 32 rows of the embedded model's blk.0.ffn_up (Q4_K, from
    llama-quantize Q4_K_M) and token_embd (Q6_K, from llama-quantize Q4_0, which gives the tied output Q6_K), as
    llama.cpp 0.3.36's llama-quantize wrote them from its own bf16 conversion (bench/gguf_files.py makes both)."""
    from starcoder.kquants import quantize_q4_k, quantize_q6_k
    from starcoder.paths import default_model_dir

    theirs = np.load(Path(__file__).parent / "data" / "llamacpp_kquants.npz")
    model = load_model(default_model_dir())
    assert np.array_equal(quantize_q4_k(model.model.layers[0].mlp.fc.weight[:32].float()), theirs["q4_k"])
    assert np.array_equal(quantize_q6_k(model.model.embed.weight[:32].float()), theirs["q6_k"])


def test_k_quant_writers_round_trip_through_gguf_py():
    from starcoder.kquants import quantize_q4_k, quantize_q6_k

    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    w[5, 17], w[9, 300:310] = 0.6, 0.0  # an outlier, and a silent stretch

    def error(data, kind):
        back = torch.from_numpy(gguf.quants.dequantize(data, kind)).view(w.shape)
        return float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())

    kind = gguf.GGMLQuantizationType
    q4_0 = error(gguf.quants.quantize(w.numpy(), kind.Q4_0), kind.Q4_0)
    assert error(quantize_q4_k(w), kind.Q4_K) < q4_0 < 0.1  # per-sub-block minima beat symmetric blocks of 32
    assert error(quantize_q6_k(w), kind.Q6_K) < q4_0 / 3
    zero = torch.zeros(2, 256)
    for writer, k in ((quantize_q4_k, kind.Q4_K), (quantize_q6_k, kind.Q6_K)):
        assert not gguf.quants.dequantize(writer(zero), k).any()


def test_bf16_export_writes_the_weights_unchanged(tmp_path):
    _, path = _model_dir("starcoder2-window", tmp_path)
    source = load_model(path, dtype="bfloat16")
    out = export_gguf(source, load_tokenizer(path), tmp_path / "model.gguf", "bf16")
    again = load_model(out)
    assert again.model.embed.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(source.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a.float(), b.float()), name
    ids = _ids()
    torch.testing.assert_close(_logits(again, ids), _logits(source, ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt_bigcode", "starcoder2"])
def test_tokenizer_and_special_ids_survive_the_file(family, tmp_path):
    name = {"gpt_bigcode": "gpt_bigcode-mqa", "starcoder2": "starcoder2-window"}[family]
    _, path = _model_dir(name, tmp_path)
    out = export_model(path, tmp_path / "model.gguf", "q4_0")
    original, rebuilt = Tokenizer.for_family(family), load_tokenizer(out)
    text = CODE + "".join(SPECIAL_TOKENS[family]) + "x = [1, 22, 333]\r\n\u00e9\u4e2d\U0001f600  \n"
    assert rebuilt.encode(text) == original.encode(text)
    assert rebuilt.decode(original.encode(text)) == text
    assert rebuilt.special_ids == original.special_ids and rebuilt.eos_id == original.eos_id
    fields = open_gguf(out).fields

    def value(key):
        return fields[key].contents() if key in fields else None

    assert value("tokenizer.ggml.pre") == "starcoder"
    for key, text in [("fim_pre", "<fim_prefix>"), ("fim_suf", "<fim_suffix>"), ("fim_mid", "<fim_middle>"),
                      ("fim_pad", "<fim_pad>")]:
        assert value(f"tokenizer.ggml.{key}_token_id") == original.token_id(text)
    if family == "starcoder2":  # llama.cpp's converter finds neither; <file_sep> is an end-of-generation id
        assert value("tokenizer.ggml.fim_rep_token_id") == original.token_id("<repo_name>")
        assert value("tokenizer.ggml.fim_sep_token_id") == original.token_id("<file_sep>")
        assert value("starcoder2.attention.sliding_window") == 8
        assert value("starcoder2.rope.freq_base") == 10000.0
    else:
        assert value("tokenizer.ggml.fim_rep_token_id") == original.token_id("<reponame>")


def test_a_gptq_model_exports_with_a_warning(tmp_path, caplog):
    from starcoder.linears.gptq_layout import QuantSettings
    from starcoder.quantize.run import quantize_model

    _, path = _model_dir("starcoder2-window", tmp_path)
    quantize_model(str(path), tmp_path / "gptq", QuantSettings(bits=4, group_size=32), method="rtn", progress=False)
    with caplog.at_level(logging.WARNING):
        out = export_model(tmp_path / "gptq", tmp_path / "model.gguf", "q4_0")
    assert "rounded twice" in caplog.text
    gptq, again = load_model(tmp_path / "gptq", dtype="float32"), load_model(out, dtype="float32")
    ids = _ids()
    # Requantizing the dequantized 4-bit grid to Q4_0 moves the weights a little, never far.
    assert (_logits(again, ids) - _logits(gptq, ids)).abs().max() < 0.1 * _logits(gptq, ids).abs().max()


# ---------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def good_file(tmp_path) -> Path:
    _, path = _model_dir("starcoder2-window", tmp_path)
    return export_model(path, tmp_path / "good.gguf", "q8_0")


def test_damaged_files_fail_naming_the_file(good_file, tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="weights.gguf: not a GGUF file"):
        load_model(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good_file.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="cut.gguf: .*truncated"):
        load_model(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good_file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="header.gguf"):
        load_model(header_only)
    version = bytearray(good_file.read_bytes())
    version[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v7.gguf").write_bytes(version)
    with pytest.raises(CheckpointError, match="v7.gguf: GGUF version 7"):
        load_model(tmp_path / "v7.gguf")


def test_other_architectures_and_storage_types_are_refused(tmp_path, monkeypatch):
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="llama.gguf: GGUF architecture 'llama' is not a StarCoder model"):
        load_model(tmp_path / "llama.gguf")

    from starcoder import gguf_weights

    # A file whose ffn_up is stored as plain int8 values, a type no layer here reads.
    kind, encode = gguf_weights._export_kind, gguf_weights._encode
    int8 = gguf.GGMLQuantizationType.I8
    monkeypatch.setattr(gguf_weights, "_export_kind",
                        lambda n, t, *rest: int8 if n == "blk.0.ffn_up.weight" else kind(n, t, *rest))
    monkeypatch.setattr(gguf_weights, "_encode", lambda t, k: t.to(torch.int8).numpy() if k == int8 else encode(t, k))
    _, path = _model_dir("starcoder2-window", tmp_path)
    odd = export_model(path, tmp_path / "int8.gguf", "f32")
    with pytest.raises(CheckpointError, match="int8.gguf: tensor 'blk.0.ffn_up.weight' is stored as I8"):
        load_model(odd)
    with pytest.raises(StarCoderError, match="unknown GGUF type 'q2_k'"):
        export_model(path, tmp_path / "x.gguf", "q2_k")


def test_cli_exports_and_runs_a_gguf_file(tmp_path, capsys):
    _, path = _model_dir("gpt_bigcode-mqa", tmp_path)
    out = tmp_path / "model.gguf"
    assert main(["export", str(path), "--format", "gguf", "--out", str(out), "--quant", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(path), "--out", str(out)]) != 0  # exists: --force to replace
    assert "exists" in capsys.readouterr().err
    assert main(["info", "--model", str(out)]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert main(["complete", "def add(a, b):", "--model", str(out), "--max-new-tokens", "4"]) == 0


# ---------------------------------------------------------------------------------------------- llama.cpp's files
def _llamacpp_converter() -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist the benchmarks unpack (never downloaded here)."""
    found = sorted((Path(__file__).parents[1] / "bench" / "results" / "llamacpp").glob(
        "llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


@pytest.mark.parametrize("name", ["gpt_bigcode-mqa", "starcoder2-window"])
def test_llamacpp_conversion_loads_with_the_hf_logits(name, tmp_path):
    if _llamacpp_converter() is None:
        pytest.skip("llama.cpp's converter is not unpacked here (python bench/llamacpp.py unpacks it)")
    hf, path = _model_dir(name, tmp_path)
    out = tmp_path / "llamacpp.gguf"
    bench = Path(__file__).parents[1] / "bench"
    subprocess.run([sys.executable, str(bench / "llamacpp.py"), "--convert", str(path), str(out), "--outtype", "f32"],
                   check=True, cwd=bench, capture_output=True)
    ours = load_model(out)
    ids = _ids(6)  # within the window: llama.cpp's converter writes none, so the file attends to everything
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), atol=1e-5, rtol=1e-5)
    tokenizer = load_tokenizer(out)
    assert tokenizer.encode(CODE) == Tokenizer.for_family(hf.config.model_type).encode(CODE)


def test_a_gguf_file_of_a_hub_repository_loads_from_the_cache(good_file, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-GGUF"
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(good_file, repo / "snapshots" / commit / "tiny.Q8_0.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ours = load_model("someone/tiny-GGUF/tiny.Q8_0.gguf", cache_dir=tmp_path / "cache")
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(load_model(good_file), ids), atol=0, rtol=0)
    with pytest.raises(StarCoderError, match="someone/tiny-GGUF/other.gguf is not a local directory"):
        load_model("someone/tiny-GGUF/other.gguf", cache_dir=tmp_path / "cache")


def test_our_faster_reader_reads_what_gguf_py_reads(good_file):
    ours, theirs = open_gguf(good_file), gguf.GGUFReader(good_file)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert (mine.types, mine.data, mine.contents()) == (field.types, field.data, field.contents()), key
        assert [(p.dtype, p.tobytes()) for p in mine.parts] == [(p.dtype, p.tobytes()) for p in field.parts], key
    assert [(t.name, t.data_offset, t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.data_offset, t.data.tobytes()) for t in theirs.tensors]
