"""KV caches: keys and values of every layer, storing only the KV heads; and the store of earlier prompts' ones.

Each row of a cache is a slot with its own length, so prompts need no padding: each is prefilled alone, then all
slots decode together, each writing its new tokens at its own position.

- KVCache is one preallocated block per row: plain slices, the layout for computing a prompt (and for tests).
- PagedKVCache holds each row in blocks of BLOCK positions from a shared pool that grows as rows do, so memory
  follows the tokens actually held, not max_batch x max_len; under a sliding window a row gives back the blocks
  that fell out of the window, so it holds about the window however long it runs (exact past it).
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

    def move_row(self, source: int, target: int) -> None:
        """Give row `target` the contents of row `source`, which is left empty (a finished sequence's hole
        filled by the last row)."""
        self.load(target, *self.keys_values(source, int(self.lengths[source])))
        self.clear(source)

    def key_positions(self) -> Tensor | None:
        """Keys are stored at their positions: the attention pattern follows from the lengths alone."""
        return None

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
        keys, values = self.k[layer], self.v[layer]
        if isinstance(start, int):  # (narrow and copy_: half the cost of slice assignment, paid per layer and token)
            end = start + k.shape[2]
            keys.narrow(2, start, k.shape[2]).copy_(k)
            values.narrow(2, start, k.shape[2]).copy_(v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            keys[rows, :, start] = k[:, :, 0]  # (B, n_kv, hd) at each row's own position
            values[rows, :, start] = v[:, :, 0]
            end = int(start.max()) + 1
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, T: int) -> None:
        self.lengths += T

    # ------------------------------------------------------------------ prefixes kept for reuse
    def keys_values(self, row: int, n: int) -> tuple[Tensor, Tensor]:
        """The first n positions of a row: (n_layer, n_kv, n, hd) keys and values (views, not copies)."""
        return self.k[:, row, :, :n], self.v[:, row, :, :n]

    def load(self, row: int, k: Tensor, v: Tensor, at: int = 0) -> None:
        """Make a row hold its first `at` positions and then these keys and values (a prefix kept from an earlier
        prompt, or a later part of it moved to new positions)."""
        end = at + k.shape[2]
        self.k[:, row, :, at:end] = k
        self.v[:, row, :, at:end] = v
        self.lengths[row] = end


BLOCK = 64  # positions per block of a paged cache


class _Pool:
    """The blocks every row of a paged cache (and its row views) draws from: (n_layer, n_blocks, BLOCK, n_kv, hd)
    keys and values, grown by doubling when they run out. Block 0 is never handed out: it pads short rows."""

    def __init__(self, config: Config, blocks: int, dtype: torch.dtype, device):
        shape = (config.n_layer, max(2, blocks), BLOCK, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.free = list(range(shape[1] - 1, 0, -1))

    def take(self) -> int:
        if not self.free:
            n = self.k.shape[1]
            self.k, self.v = (torch.cat([t, torch.zeros_like(t)], dim=1) for t in (self.k, self.v))
            self.free = list(range(2 * n - 1, n - 1, -1))
        return self.free.pop()


@dataclass
class _Row:
    blocks: list[int]  # pool blocks holding this row's positions, in order
    first: int = 0  # the row's position index // BLOCK that blocks[0] holds (> 0 once a window dropped blocks)


class PagedKVCache:
    """Rows of keys and values held in blocks of a shared pool; see the module's docstring.

    Before each forward pass start_positions() makes room for the new tokens and lays out where each row's keys
    are: update() then writes a layer's new keys into their blocks and returns every row's blocks gathered as
    (B, n_kv, S, hd), with key_positions() telling the attention which position each gathered key has.
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        self.pool = _Pool(config, batch_size * 4, dtype, device)
        self.max_len = max_len
        self.window = config.sliding_window if config.sliding_window and config.sliding_window < max_len else None
        self.state = [_Row([]) for _ in range(batch_size)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        # written slots, gathered blocks, key positions, and the first block when the row's blocks are consecutive
        self._layout: tuple[Tensor, Tensor, Tensor, int | None] | None = None

    def rows(self, start: int, stop: int | None = None) -> PagedKVCache:
        """Rows [start, stop) as a cache of their own, sharing this one's pool and rows."""
        stop = start + 1 if stop is None else stop
        view = PagedKVCache.__new__(PagedKVCache)
        view.pool, view.max_len, view.window = self.pool, self.max_len, self.window
        view.state, view.lengths, view._layout = self.state[start:stop], self.lengths[start:stop], None
        return view

    @property
    def batch_size(self) -> int:
        return len(self.state)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks the rows hold (the pool may keep more, free, for rows to grow into)."""
        per_block = self.pool.k[:, 0].nbytes + self.pool.v[:, 0].nbytes
        return per_block * sum(len(row.blocks) for row in self.state)

    def clear(self, row: int) -> None:
        self.pool.free += reversed(self.state[row].blocks)  # (taken again in order: consecutive blocks stay so)
        self.state[row] = _Row([])
        self.lengths[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Row `target` takes row `source`'s blocks (no copy); `source` is left empty."""
        self.clear(target)
        self.state[target], self.state[source] = self.state[source], _Row([])
        self.lengths[target], self.lengths[source] = self.lengths[source].clone(), 0

    def load(self, row: int, k: Tensor, v: Tensor) -> None:
        """Make a row hold exactly these keys and values, (n_layer, n_kv, n, hd) (a computed prompt); under a
        sliding window only the blocks the next token can still see."""
        self.clear(row)
        n = k.shape[2]
        first = max(0, n - self.window) // BLOCK if self.window else 0
        state = self.state[row] = _Row([], first)
        for b in range(first, -(-n // BLOCK)):
            block = self.pool.take()
            state.blocks.append(block)
            piece = slice(b * BLOCK, min(n, (b + 1) * BLOCK))
            width = piece.stop - piece.start
            self.pool.k[:, block, :width] = k[:, :, piece].transpose(1, 2)
            self.pool.v[:, block, :width] = v[:, :, piece].transpose(1, 2)
        self.lengths[row] = n

    def start_positions(self, T: int) -> int | Tensor:
        """Room for T new tokens in every row (blocks taken, blocks out of the window given back), and where
        they go: one int when all rows are at the same length, else each row's (B,) length."""
        lengths = self.lengths
        longest = int(lengths.max())
        if longest + T > self.max_len:
            raise StarCoderError(f"the KV cache holds {self.max_len} positions; {longest} used, {T} more asked")
        slots = []
        for state, n in zip(self.state, lengths.tolist(), strict=True):
            if self.window:  # every query from now on is at n or later: it sees positions > n - window
                while (state.first + 1) * BLOCK <= n - self.window + 1 and state.blocks:
                    self.pool.free.append(state.blocks.pop(0))
                    state.first += 1
            while (state.first + len(state.blocks)) * BLOCK < n + T:
                state.blocks.append(self.pool.take())
            slots += [state.blocks[p // BLOCK - state.first] * BLOCK + p % BLOCK for p in range(n, n + T)]
        held = max(len(state.blocks) for state in self.state)
        table = torch.tensor([s.blocks + [0] * (held - len(s.blocks)) for s in self.state])  # (B, held)
        offsets = torch.arange(held * BLOCK)
        firsts = torch.tensor([s.first * BLOCK for s in self.state])[:, None]
        counts = torch.tensor([len(s.blocks) * BLOCK for s in self.state])[:, None]
        # Padding keys get a position no query reaches, so the causal rule hides them.
        positions = torch.where(offsets < counts, firsts + offsets, torch.iinfo(torch.long).max)  # (B, S)
        device = self.pool.k.device
        blocks = self.state[0].blocks
        # One row in consecutive blocks (a sequence decoding alone, mostly): update() returns a view of the pool
        # instead of gathering a copy of every key at every layer and step (a copy the size of the row's cache).
        consecutive = len(self.state) == 1 and blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        self._layout = (torch.tensor(slots, device=device), table.to(device), positions.to(device),
                        blocks[0] if consecutive else None)
        first = int(lengths[0])
        return first if bool((lengths == first).all()) else lengths.to(device)

    def key_positions(self) -> Tensor:
        """(B, S): the position of each key update() returns."""
        return self._layout[2]

    def update(self, layer: int, k: Tensor, v: Tensor, start) -> tuple[Tensor, Tensor]:
        """Write new keys/values (B, n_kv, T, hd) into their blocks; every row's keys so far (B, n_kv, S, hd)."""
        slots, table, _, first_block = self._layout
        B, KV, T, hd = k.shape
        out = []
        for pool, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            pool.view(-1, KV, hd).index_copy_(0, slots, new.transpose(1, 2).reshape(B * T, KV, hd))
            if first_block is not None:
                held = pool.narrow(0, first_block, table.shape[1])
            else:  # one gather; index_select over whole blocks is ~10x faster than pool[table] on the CPU
                held = pool.view(pool.shape[0], -1).index_select(0, table.flatten())
            out.append(held.view(B, -1, KV, hd).transpose(1, 2))  # (B, KV, S, hd)
        return out[0], out[1]

    def advance(self, T: int) -> None:
        self.lengths += T


def common_prefix(a, b) -> int:
    """How many leading tokens two token sequences share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(differ[0]) if len(differ) else m


def common_suffix(a, b) -> int:
    """How many trailing tokens two token sequences share."""
    return common_prefix(np.asarray(a)[::-1], np.asarray(b)[::-1])


@dataclass
class Prefix:
    tokens: np.ndarray  # (L,) the prompt tokens whose keys and values these are
    k: Tensor  # (n_layer, n_kv, L, hd)
    v: Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


PREFIX_CACHE_MB = 512.0  # default memory for earlier prompts' keys and values (the server's --prefix-cache-mb)


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
