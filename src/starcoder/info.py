"""`starcoder info`: what a model is, read from its config and file headers without loading the weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointReader, dtype_name, load_config, weight_files
from .paths import resolve_model


def model_info(path_or_id: str | os.PathLike, allow_pickle: bool = False,
               cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    model_dir = resolve_model(path_or_id, cache_dir)
    if model_dir.suffix == ".gguf":
        from .gguf_weights import GGUFSource

        reader = GGUFSource(model_dir)
        config, files = reader.config, [model_dir]
        dtypes = reader.kinds()
        quantization = None if set(dtypes) <= {"F32", "F16", "BF16"} else f"GGUF {', '.join(dtypes)}"
        itemsize = reader.dtype.itemsize
        quant = None
    else:
        config = load_config(model_dir)
        files = weight_files(model_dir, allow_pickle)
        reader = CheckpointReader(files)
        dtypes = sorted({dtype_name(t.dtype) for t in reader})
        floats = [t.dtype.itemsize for t in reader if t.dtype.is_floating_point]
        itemsize = max(floats) if floats else 4
        from .linears.gptq_layout import read_quant_config

        quant = read_quant_config(model_dir)
        quantization = None
    if quant is not None:
        q = quant.settings
        quantization = (f"GPTQ {q.bits}-bit, group {'per channel' if q.group_size == -1 else q.group_size}"
                        f"{', act-order' if q.act_order else ''}{', symmetric' if q.sym else ', asymmetric'} "
                        f"({q.checkpoint_format})")
        itemsize = 2  # runs in bfloat16
    return {
        "path": str(model_dir),
        "family": config.family,
        "model_type": config.model_type,
        "head": config.head,
        "parameters": config.num_parameters(),
        "layers": config.n_layer,
        "hidden_size": config.n_embd,
        "heads": config.n_head,
        "kv_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "attention": config.attention_kind,
        "positions": "learned" if config.learned_positions else f"rotary (theta {config.rope_theta:g})",
        "context": config.max_positions,
        "sliding_window": config.sliding_window,
        "vocab_size": config.vocab_size,
        "dtype": ",".join(dtypes),
        "quantization": quantization,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(itemsize),
        "weight_files": [p.name for p in files],
        "file_bytes": sum(Path(p).stat().st_size for p in files),
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_info(info: dict[str, Any]) -> str:
    def size(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1024
        return str(n)

    rows = [
        ("model", info["path"]),
        ("family", f"{info['family']}, {info['head'].replace('_', ' ')}"),
        ("parameters", f"{info['parameters']:,} ({_count(info['parameters'])})"),
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("heads", f"{info['heads']} query, {info['kv_heads']} KV ({info['attention']}), head dim {info['head_dim']}"),
        ("positions", info["positions"]),
        ("context", f"{info['context']:,} tokens"),
        ("sliding window", f"{info['sliding_window']:,} tokens" if info["sliding_window"] else "none (full causal)"),
        ("vocabulary", f"{info['vocab_size']:,}"),
        ("dtype", info["dtype"]),
        *([("quantization", info["quantization"])] if info.get("quantization") else []),
        ("KV cache", f"{size(info['kv_cache_bytes_per_token'])} per token"),
        ("weights", f"{size(info['file_bytes'])} in {len(info['weight_files'])} file(s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
