"""The KV cache: keys and values of every layer, preallocated, storing only the KV heads.

Each row of the cache is a slot with its own length. A batch whose rows are all at the same length reads and
writes plain slices (a prompt being prefilled, a batch decoding in step); rows at different lengths (sequences
of different prompt lengths decoding together) write their one new token each at its own position. So prompts
need no padding: each is prefilled alone into its slot, then all slots decode together.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import Config
from .errors import StarCoderError


class KVCache:
    """(n_layer, B, n_kv_head, max_len, head_dim) keys and values, plus the filled length of each row.

    A multi-query model's cache is therefore 1/n_head of what a multi-head model of the same width would need.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # positions filled, per row (kept on the CPU)

    @classmethod
    def _view(cls, k: Tensor, v: Tensor, lengths: Tensor) -> KVCache:
        view = cls.__new__(cls)
        view.k, view.v, view.lengths = k, v, lengths
        return view

    def rows(self, start: int, stop: int | None = None) -> KVCache:
        """Rows [start, stop) as a cache of their own that shares this one's memory (prefill one slot)."""
        stop = start + 1 if stop is None else stop
        return self._view(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        """The common length of all rows."""
        first = int(self.lengths[0])
        if not bool((self.lengths == first).all()):
            raise StarCoderError(f"cache rows have different lengths: {self.lengths.tolist()}")
        return first

    def copy_row(self, source: int, target: int) -> None:
        """Give row `target` the contents of row `source` (a finished sequence's hole filled by the last row)."""
        self.load(target, *self.keys_values(source, int(self.lengths[source])))

    def clear(self, row: int) -> None:
        self.lengths[row] = 0  # stale keys past a row's length are never visible

    def start_positions(self, T: int) -> int | Tensor:
        """Where T new tokens go: one int when all rows are at the same length, else each row's (B,) length."""
        lengths = self.lengths
        first = int(lengths[0])
        uniform = bool((lengths == first).all())
        longest = first if uniform else int(lengths.max())
        if longest + T > self.max_len:
            raise StarCoderError(f"the KV cache holds {self.max_len} positions; {longest} used, {T} more asked")
        if uniform:
            return first
        if T != 1:
            raise StarCoderError("rows at different lengths can only take one new token each at a time")
        return lengths.to(self.k.device)

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values (B, n_kv, T, hd) at `start` and return every row's keys so far (B, n_kv, S, hd)."""
        if isinstance(start, int):
            end = start + k.shape[2]
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, start] = k[:, :, 0]  # (B, n_kv, hd) at each row's own position
            self.v[layer][rows, :, start] = v[:, :, 0]
            end = int(start.max()) + 1
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.lengths += T

    # ------------------------------------------------------------------ prefixes kept for reuse
    def keys_values(self, row: int, n: int) -> tuple[Tensor, Tensor]:
        """The first n positions of a row: (n_layer, n_kv, n, hd) keys and values (views, not copies)."""
        return self.k[:, row, :, :n], self.v[:, row, :, :n]

    def load(self, row: int, k: Tensor, v: Tensor) -> None:
        """Make a row hold exactly these keys and values (a prefix kept from an earlier prompt)."""
        n = k.shape[2]
        self.k[:, row, :, :n] = k
        self.v[:, row, :, :n] = v
        self.lengths[row] = n


def common_prefix(a, b) -> int:
    """How many leading tokens two token sequences share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(differ[0]) if len(differ) else m


@dataclass
class Prefix:
    tokens: np.ndarray  # (L,) the prompt tokens whose keys and values these are
    k: Tensor  # (n_layer, n_kv, L, hd)
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class PrefixStore:
    """Keys and values of earlier prompts, so that a prompt that starts as one of them did is computed only from
    where it differs (a request per keystroke in an editor, n samples, an evaluation's shared preamble).

    Lookup is by the longest common token prefix (llama.cpp's slot reuse, without its fixed slots); the least
    recently used prompts go first when the store is over its byte budget. Positions are absolute, so a reused
    prefix is valid for both families (learned and rotary positions) and under a sliding window.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Prefix] = OrderedDict()
        self.nbytes = 0
        self._keys = itertools.count()

    def longest(self, ids: list[int]) -> tuple[Prefix | None, int]:
        """The kept prompt sharing the longest token prefix with `ids`, and that length."""
        query = np.asarray(ids, dtype=np.int64)
        best, best_key, best_n = None, None, 0
        for key, entry in self.entries.items():
            if min(len(entry.tokens), len(query)) <= best_n:
                continue
            n = common_prefix(entry.tokens, query)
            if n > best_n:
                best, best_key, best_n = entry, key, n
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, best_n

    def put(self, ids: list[int], k: Tensor, v: Tensor) -> None:
        """Keep a copy of a prompt's keys and values (and drop kept prompts that are a prefix of it)."""
        if not ids or k.nbytes + v.nbytes > self.max_bytes:
            return
        tokens = np.asarray(ids, dtype=np.int64)
        entry = Prefix(tokens, k.clone(), v.clone())
        for key, old in list(self.entries.items()):
            if len(old.tokens) <= len(tokens) and np.array_equal(old.tokens, tokens[: len(old.tokens)]):
                self._drop(key)
        self.entries[next(self._keys)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
