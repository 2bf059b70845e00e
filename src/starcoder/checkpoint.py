"""Hugging Face checkpoint files in and out: which files hold the weights, reading their tensors (safetensors,
single or sharded, memory-mapped; pickles only when allowed) and writing them. loader.py builds models from them.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DTYPE_CHOICES, Config
from .convert import ours_to_hf
from .errors import CheckpointError, StarCoderError
from .files import atomic, write_text_atomic
from .linears.dense import is_packed
from .linears.quantized import QuantLinear

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin.index.json", "pytorch_model.bin")
DEFAULT_SHARD_BYTES = 5 * 1024**3

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto" keeps the checkpoint's own dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPE_NAMES:
        raise StarCoderError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPE_NAMES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory, safetensors preferred; pickle files only when allowed."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        return _files_from_index(index)
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [model_dir / SAFETENSORS_SINGLE]
    others = sorted(model_dir.glob("*.safetensors"))
    if len(others) == 1:  # e.g. TheBloke's gptq_model-4bit--1g.safetensors
        return others
    if len(others) > 1:
        raise CheckpointError(f"{model_dir}: several .safetensors files and no {SAFETENSORS_INDEX} to say which "
                              f"tensors each holds: {', '.join(p.name for p in others)}")
    pickles = [model_dir / n for n in PICKLE_FILES if (model_dir / n).is_file()]
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]}: refusing to load a pickle checkpoint. Pickle files can run arbitrary code when "
                "loaded; convert the model to safetensors, or, if you trust this file, pass allow_pickle=True "
                "(--allow-pickle on the command line)")
        return _files_from_index(pickles[0]) if pickles[0].name.endswith(".json") else pickles
    raise CheckpointError(f"{model_dir}: no weights found (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
    return files


# ---------------------------------------------------------------------------------------------- reading tensors
@dataclass
class StoredTensor:
    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file (safetensors); -1 for pickled tensors
    nbytes: int


def read_safetensors_index(path: Path) -> list[StoredTensor]:
    """Parse and check a safetensors header: a damaged or truncated file fails here, naming file and tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8 or header_len > 100 * 1024**2:
            raise CheckpointError(f"{path}: header length {header_len} does not fit a {size}-byte file "
                                  "(truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors, expected_begin = [], 0
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin != expected_begin:
                raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} for "
                                      f"shape {list(shape)} {info['dtype']} (damaged file)")
            if data_start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the "
                                      f"file has {size} bytes")
            tensors.append(StoredTensor(path, name, dtype, shape, data_start + begin, end - begin))
            expected_begin = end
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header ({type(e).__name__}: {e})") from None
    if data_start + expected_begin != size:
        raise CheckpointError(f"{path}: {size - data_start - expected_begin} bytes after the last tensor "
                              "(damaged file)")
    return tensors


class CheckpointReader:
    """The tensors of a set of weight files.

    safetensors files are mapped privately (copy-on-write): a tensor used as stored is a view of the file's
    pages, shared with the page cache, so the weights exist once on the whole machine and loading costs no
    copy. Writing to such a tensor (training) copies just the pages written. A tensor that has to be converted
    (another dtype, a layout change) is copied, and the file pages it was read from are released again.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors: list[StoredTensor] = []
        for path in files:
            if path.suffix == ".safetensors":
                self.tensors.extend(read_safetensors_index(path))
            else:
                self.tensors.extend(self._index_pickle(path))

    def _index_pickle(self, path: Path) -> list[StoredTensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        self._pickled[path] = state
        return [StoredTensor(path, n, t.dtype, tuple(t.shape), -1, t.nbytes) for n, t in state.items()]

    def read(self, stored: StoredTensor) -> torch.Tensor:
        """The tensor as stored: a view of the mapped file where its offset is aligned, else a copy."""
        if stored.offset < 0:
            return self._pickled[stored.file][stored.name]
        if stored.nbytes == 0:
            return torch.empty(stored.shape, dtype=stored.dtype)
        raw = torch.frombuffer(self._map(stored.file), dtype=torch.uint8, count=stored.nbytes, offset=stored.offset)
        if stored.offset % stored.dtype.itemsize:  # safetensors does not promise alignment; copy when it is off
            raw = raw.clone()
        return raw.view(stored.dtype).view(stored.shape)

    def release(self, stored: StoredTensor) -> None:
        """Drop the file pages of a tensor that was copied out, so they stop counting in this process's RSS."""
        mapped = self._maps.get(stored.file)
        if mapped is None or stored.offset < 0:
            return
        page = mmap.PAGESIZE
        start = -(-stored.offset // page) * page  # whole pages inside the tensor only
        end = (stored.offset + stored.nbytes) // page * page
        if end > start:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return self._maps[path]

    def __iter__(self) -> Iterator[StoredTensor]:
        return iter(self.tensors)


# ---------------------------------------------------------------------------------------------- load
def load_config(location: Path) -> Config:
    """The config of a model directory (config.json) or of a GGUF file (its metadata)."""
    if location.suffix == ".gguf":
        from .gguf_file import open_gguf, read_config

        return read_config(open_gguf(location), location)
    return Config.from_file(location / "config.json")


# ---------------------------------------------------------------------------------------------- save
def save_model(model: nn.Module, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a Hugging Face directory (config.json + safetensors, sharded above max_shard_bytes).

    Every file is written under a temporary name and renamed, and stale shards of an earlier save are removed
    only after the new ones are in place, so an interrupted save never leaves a mix that loads.
    """
    if is_packed(model):
        raise StarCoderError("this model's weights are packed for CPU inference and cannot be saved; load it "
                             "without pack=True to save it")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise StarCoderError("this model is quantized; its directory already holds it (starcoder quantize writes "
                             "quantized models)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: Config = model.config
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in ours_to_hf(config, model.state_dict()).items()}
    dtype = next(iter(tensors.values())).dtype
    write_tensors(out, tensors, max_shard_bytes)
    write_text_atomic(out / "config.json", json.dumps(config.to_hf_config(dtype_name(dtype)), indent=2))
    return out


def write_tensors(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """model.safetensors, or shards and their index above max_shard_bytes; each file written atomically, and
    stale shards of an earlier save removed only after the new ones are in place."""
    from safetensors.torch import save_file

    shards = _plan_shards(tensors, max_shard_bytes)
    names = [SAFETENSORS_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with atomic(out / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards, strict=True) for t in shard}}
        write_text_atomic(out / SAFETENSORS_INDEX, json.dumps(index, indent=2))
    else:
        (out / SAFETENSORS_INDEX).unlink(missing_ok=True)
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards
