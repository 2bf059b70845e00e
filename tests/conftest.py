"""Tiny random transformers models, built in-process: the reference oracle for every model test."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def needs(available: bool, what: str) -> None:
    """Skip a test whose tool is not on this machine, saying how to get it; fail instead where the suite must run
    whole (STARCODER_TESTS_NEED_ALL=1, as the README's test command and CI set it)."""
    if not available:
        (pytest.fail if os.environ.get("STARCODER_TESTS_NEED_ALL") == "1" else pytest.skip)(what)


def hf_gpt_bigcode(multi_query: bool = True, vocab_size: int = VOCAB, weight_std: float | None = None, **overrides):
    config = transformers.GPTBigCodeConfig(**{
        **dict(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
               multi_query=multi_query, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
               eos_token_id=0, pad_token_id=0),
        **overrides,
    })
    return _random(transformers.GPTBigCodeForCausalLM, config, weight_std)


def hf_starcoder2(n_kv_head: int = 2, use_bias: bool = True, sliding_window: int | None = None,
                  vocab_size: int = VOCAB, weight_std: float | None = None, **overrides):
    config = transformers.Starcoder2Config(**{
        **dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=n_kv_head, max_position_embeddings=64, use_bias=use_bias,
               sliding_window=sliding_window, rope_theta=10000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        **overrides,
    })
    return _random(transformers.Starcoder2ForCausalLM, config, weight_std)


def _random(cls, config, weight_std: float | None = None):
    torch.manual_seed(0)
    model = cls(config).eval()
    # Non-trivial LayerNorm and bias values, so that a wrongly mapped norm or bias cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.1)
            elif weight_std is not None:
                p.normal_(0.0, weight_std)
    return model


HF_MODELS = {
    "gpt_bigcode-mqa": lambda: hf_gpt_bigcode(multi_query=True),
    "gpt_bigcode-mha": lambda: hf_gpt_bigcode(multi_query=False),
    "starcoder2-gqa": lambda: hf_starcoder2(n_kv_head=2),
    "starcoder2-mha": lambda: hf_starcoder2(n_kv_head=4),
    "starcoder2-mqa": lambda: hf_starcoder2(n_kv_head=1),
    "starcoder2-nobias": lambda: hf_starcoder2(use_bias=False),
    "starcoder2-window": lambda: hf_starcoder2(sliding_window=8),
}


@pytest.fixture(params=sorted(HF_MODELS))
def hf_model(request):
    return HF_MODELS[request.param]()


def ours_from_hf(hf_model, tmp_path):
    """Our model loaded from the directory transformers saved."""
    from starcoder import load_model

    hf_model.save_pretrained(tmp_path / "hf")
    return load_model(tmp_path / "hf")


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- live servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """An app served by uvicorn on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory):
    """A tiny random StarCoder2 with the shipped StarCoder2 tokenizer (49,152 tokens) and a 1,024 context."""
    from starcoder.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("served")
    hf_starcoder2(vocab_size=49152, max_position_embeddings=1024, weight_std=1.0).save_pretrained(path)
    Tokenizer.for_family("starcoder2").save(path)
    return path
