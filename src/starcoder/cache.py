"""The KV cache: keys and values of every layer, preallocated, storing only the KV heads.

Each row of the cache is a slot with its own length. A batch whose rows are all at the same length reads and
writes plain slices (a prompt being prefilled, a batch decoding in step); rows at different lengths (sequences
of different prompt lengths decoding together) write their one new token each at its own position. So prompts
need no padding: each is prefilled alone into its slot, then all slots decode together.
"""

from __future__ import annotations

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
        """Give row `target` the contents of row `source` (n samples sharing one prefilled prompt)."""
        n = int(self.lengths[source])
        self.k[:, target, :, :n] = self.k[:, source, :, :n]
        self.v[:, target, :, :n] = self.v[:, source, :, :n]
        self.lengths[target] = n

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
