"""starcoder.load(): complete, infill, chat and their streams on a tiny model the test creates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import starcoder
from starcoder.__main__ import main
from starcoder.chat import chat_prompt


@pytest.fixture(scope="module")
def sc(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "tiny"
    assert main(["init", str(out), "--preset", "tiny-starcoder2"]) == 0
    return starcoder.load(out)


def test_complete_and_stream_agree(sc):
    done = sc.complete("def add(a, b):", max_new_tokens=12, ignore_eos=True)
    assert done.finish_reason == "length" and len(done.token_ids) == 12
    assert "".join(sc.stream("def add(a, b):", max_new_tokens=12, ignore_eos=True)) == done.text


def test_infill_uses_the_fim_prompt(sc):
    done = sc.infill("def f(x):\n    ", "\n", max_new_tokens=5)
    assert done.prompt_tokens == len(sc.tokenizer.encode(sc.infill_prompt("def f(x):\n    ", "\n")))


def test_chat_prompt_and_reply(sc):
    prompt = chat_prompt([{"role": "user", "content": "Hello?"}])
    assert prompt.endswith("Human: Hello?\n\nAssistant:") and "-----" in prompt
    reply = sc.chat([{"role": "user", "content": "Hello?"}], max_new_tokens=8, temperature=1.0, seed=0)
    assert reply.text == reply.text.strip() and "\nHuman:" not in reply.text


def test_chat_errors():
    with pytest.raises(starcoder.StarCoderError, match="last message of a chat must be the user's"):
        chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(starcoder.StarCoderError, match="message 0: role must be one of"):
        chat_prompt([{"role": "robot", "content": "a"}])


def test_the_embedded_model_is_the_default():
    from starcoder.api import default_model_dir

    assets = default_model_dir()
    assert sum(p.stat().st_size for p in assets.iterdir()) <= 30 * 1024**2  # it ships inside the package
    sc = starcoder.load()
    assert sc.config.model_type == "starcoder2" and sc.format.fim_prefix == "<fim_prefix>"
    done = sc.complete("def add(a, b):\n", max_new_tokens=24)
    assert done.token_ids and done.finish_reason in ("length", "eos")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(assets)  # a Hugging Face directory like any other
    assert hf.config.model_type == "starcoder2"


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    from types import SimpleNamespace

    monkeypatch.setattr(starcoder.paths, "resources", SimpleNamespace(files=lambda _: tmp_path))
    with pytest.raises(starcoder.StarCoderError, match="no embedded default model"):
        starcoder.load()


def _thp_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise (on request) or never; none without THP."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text.split("[", 1)[1].split("]", 1)[0]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_starcoder_first_puts_large_tensors_on_huge_pages(preset, expected):
    """Imported before torch, starcoder asks PyTorch for 2 MB pages (decoding streams the weights from them
    faster), unless the user said otherwise; a 64 MB tensor then lies on huge pages where the kernel offers them."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import os, starcoder, torch; x = torch.ones(1 << 24); print(os.environ['THP_MEM_ALLOC_ENABLE']); "
            "print(next((l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')),"
            " 'none'))")
    setting, huge_kb = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()
    assert setting == expected
    if expected == "1" and _thp_mode() in ("always", "madvise"):
        assert int(huge_kb) >= 32 * 1024
    if expected == "0" and _thp_mode() == "madvise":
        assert int(huge_kb) == 0
