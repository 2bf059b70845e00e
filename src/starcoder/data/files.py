"""The files of a `starcoder prepare` run: the filter step's signatures, numpy arrays and shards, each written by
rename so that a half-written file is never taken for a finished one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic
from .dedup import BANDS, NUM_PERM, keys_of


class SignatureFiles:
    """The filter step's signature files (raw uint32 rows of NUM_PERM), read without mapping them into memory:
    band keys in chunks, and single rows (for the candidate pairs) by positioned reads. So the dedup step holds
    only the keys, hashes and cluster arrays, a few hundred bytes per file."""

    ROW_BYTES = NUM_PERM * 4

    def __init__(self, paths: list[Path]):
        self.files = [open(path, "rb") for path in paths]  # noqa: SIM115 (closed by close())
        counts = [path.stat().st_size // self.ROW_BYTES for path in paths]
        self.offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)

    def band_keys(self, chunk_rows: int = 16384) -> np.ndarray:
        keys = np.zeros((int(self.offsets[-1]), BANDS), dtype=np.uint64)
        for f, start in zip(self.files, self.offsets[:-1], strict=True):
            f.seek(0)
            while True:
                chunk = np.fromfile(f, dtype=np.uint32, count=chunk_rows * NUM_PERM)
                if not chunk.size:
                    break
                rows = chunk.reshape(-1, NUM_PERM)
                keys[start : start + len(rows)] = keys_of(rows)
                start += len(rows)
        return keys

    def row(self, index: int) -> np.ndarray:
        rank = int(np.searchsorted(self.offsets, index, side="right")) - 1
        data = os.pread(self.files[rank].fileno(), self.ROW_BYTES, int(index - self.offsets[rank]) * self.ROW_BYTES)
        return np.frombuffer(data, dtype=np.uint32)

    def close(self) -> None:
        for f in self.files:
            f.close()


def save_arrays(path: Path, array: np.ndarray | None = None, **arrays: np.ndarray) -> None:
    """np.save / np.savez by rename."""
    with atomic(path) as tmp, open(tmp, "wb") as f:
        if arrays:
            np.savez(f, **arrays)
        else:
            np.save(f, array)


class ShardWriter:
    """Rows to a JSONL or Parquet file, streamed (Parquet in row groups of 1,000 rows)."""

    def __init__(self, path: Path, output_format: str):
        self.path, self.format, self.pending = path, output_format, []
        if output_format == "jsonl":
            self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("content", pa.string()), ("repository_name", pa.string()),
                                     ("path", pa.string()), ("language", pa.string()),
                                     ("licenses", pa.list_(pa.string())), ("stars", pa.int64())])
            self.file = pq.ParquetWriter(path, self.schema)

    def write(self, row: dict) -> None:
        if self.format == "jsonl":
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        self.pending.append(row)
        if len(self.pending) >= 1000:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.file.write_table(pa.Table.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.format == "parquet":
            self._flush()
        self.file.close()

