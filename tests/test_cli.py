"""The command line: init, info and bench, and clear errors instead of tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from starcoder.__main__ import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init", "--out", str(out), "--preset", "tiny-starcoder2"]) == 0
    assert (out / "tokenizer.json").is_file()
    return out


def test_init_then_info(tiny, capsys):
    assert main(["info", "--model", str(tiny)]) == 0
    text = capsys.readouterr().out
    assert "StarCoder2" in text and "4 query, 2 KV (grouped-query)" in text and "128 tokens" in text
    assert main(["info", "--model", str(tiny), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert info["parameters"] == 3_237_504 and info["dtype"] == "float32"


def test_init_refuses_to_overwrite(tiny, capsys):
    assert main(["init", str(tiny)]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err


def test_bench(tiny, capsys):
    assert main(["bench", "--model", str(tiny), "--prompt-tokens", "16", "--new-tokens", "4", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["prefill_tokens_per_second"] > 0 and m["decode_tokens_per_second"] > 0
    assert m["dtype"] == m["compute_dtype"] == "float32"  # (a bfloat16 model widened on AVX2: float32 computing)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), "header length 16"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "model_type 'llama' is not supported"),
])
def test_damaged_model_is_a_clear_error(tiny, tmp_path, capsys, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    damage(copy)
    assert main(["info", "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("starcoder: error:")


def test_console_script_resolves_a_hub_id_from_the_cache(tiny, tmp_path):
    commit = "f" * 40
    repo = tmp_path / "hub" / "models--bigcode--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    import shutil

    shutil.copytree(tiny, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "starcoder", "info", "--model", "bigcode/tiny", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["path"] == str(repo / "snapshots" / commit)
    missing = subprocess.run([sys.executable, "-m", "starcoder", "info", "--model", "bigcode/absent"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "not in the Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_complete_from_stdin(tiny, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):"))
    assert main(["complete", "-", "--model", str(tiny), "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    from starcoder import load_tokenizer

    assert out["prompt_tokens"] == len(load_tokenizer(tiny).encode("def add(a, b):"))
    assert 1 <= out["completion_tokens"] <= 5


def test_complete_streams_the_same_text_as_json(tiny, capsys):
    args = ["complete", "x = ", "--model", str(tiny), "--max-new-tokens", "9", "--temperature", "0.9", "--seed", "4"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n"


@pytest.mark.parametrize("speculation", [["--speculate", "ngram"], ["--draft-model", "EMBEDDED"]])
def test_speculation_gives_the_same_text(speculation, capsys):
    """The embedded model drafting for itself accepts every greedy draft; either way the text is plain decoding's."""
    from starcoder.api import default_model_dir

    speculation = [str(default_model_dir()) if a == "EMBEDDED" else a for a in speculation]
    args = ["complete", "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):", "--max-new-tokens", "24", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)["text"]
    assert main([*args, *speculation]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == plain
    assert main([*args, "--speculate", "ngram", "--draft-model", speculation[-1]]) == 2
    assert "speculate='draft'" in capsys.readouterr().err


def test_infill_from_a_file_with_a_cursor(tiny, tmp_path, capsys):
    source = tmp_path / "a.py"
    source.write_text("def f(x):\n    <|cursor|>\n")
    assert main(["infill", "--file", str(source), "--model", str(tiny), "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 3
    source.write_text("no marker here")
    assert main(["infill", "--file", str(source), "--model", str(tiny)]) == 2
    assert "needs the cursor marker '<|cursor|>' exactly once, found 0" in capsys.readouterr().err


def test_chat_from_a_pipe(tiny, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nwrite a loop\n"))
    assert main(["chat", "--model", str(tiny), "--max-new-tokens", "6", "--temperature", "1", "--seed", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # two replies


def test_bad_sampling_flag_is_one_clear_line(tiny, capsys):
    assert main(["complete", "x", "--model", str(tiny), "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "starcoder: error: top_p must be in (0, 1], got 1.5"


@pytest.mark.parametrize("command", ["info", "init", "bench", "complete", "infill", "chat", "train-tokenizer"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: starcoder " + command in capsys.readouterr().out


def test_commands_use_the_embedded_model_by_default(capsys):
    assert main(["complete", "import os\n", "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] >= 1
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "starcoder2"


@pytest.mark.parametrize("flag, message", [
    ("--cache-reuse=-1", "cache_reuse must be 0 (off) or a number of tokens, not -1"),
    ("--prefill-chunk=-3", "prefill_chunk must be a positive number of tokens"),
])
def test_bad_serving_settings_are_refused_before_listening(flag, message, capsys):
    assert main(["serve", flag, "--port", "1"]) == 2
    assert message in capsys.readouterr().err
