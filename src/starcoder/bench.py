"""`starcoder bench`: how fast this machine runs a model: load, prompt processing (prefill) and decoding."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from .checkpoint import dtype_name
from .errors import StarCoderError
from .loader import load_model


@torch.inference_mode()
def measure(path_or_id: str | os.PathLike, prompt_tokens: int = 512, new_tokens: int = 32,
            dtype: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Load the model, prefill a random prompt, then decode greedily with the KV cache."""
    start = time.perf_counter()
    model = load_model(path_or_id, dtype=dtype, pack=True)
    load_seconds = time.perf_counter() - start
    config = model.config
    total = prompt_tokens + new_tokens
    if config.learned_positions and total > config.max_positions:
        raise StarCoderError(f"prompt + new tokens ({total}) exceed the model's {config.max_positions} positions")
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), generator=generator)
    cache = model.new_cache(1, total)

    start = time.perf_counter()
    logits = model(prompt, cache=cache, logits_to_keep=1).logits
    prefill_seconds = time.perf_counter() - start

    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    decode_seconds = time.perf_counter() - start
    return {
        "dtype": dtype_name(model.model.embed.weight.dtype),  # the weights as stored
        "compute_dtype": dtype_name(model.model.norm.weight.dtype),  # float32 where the CPU lacks the weights' dtype
        "threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_per_second": prompt_tokens / prefill_seconds,
        "new_tokens": new_tokens,
        "decode_tokens_per_second": new_tokens / decode_seconds if new_tokens else 0.0,
        "kv_cache_bytes": cache.nbytes,
    }


def format_measurement(m: dict[str, Any]) -> str:
    computing = "" if m["compute_dtype"] == m["dtype"] else f" (computing in {m['compute_dtype']})"
    return (f"dtype {m['dtype']}{computing}, {m['threads']} threads\n"
            f"load      {m['load_seconds']:.2f} s\n"
            f"prefill   {m['prefill_tokens_per_second']:.1f} tokens/s ({m['prompt_tokens']} tokens)\n"
            f"decode    {m['decode_tokens_per_second']:.1f} tokens/s ({m['new_tokens']} tokens, KV cache "
            f"{m['kv_cache_bytes'] / 1024**2:.1f} MiB)")
