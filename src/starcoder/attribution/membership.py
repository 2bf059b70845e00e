"""Membership test in the Data Portraits style: was this text in the training data?

Indexing: each document is normalised (indentation stripped, runs of spaces and newlines collapsed to one space)
and its 50-character n-grams taken every 50 characters go into a Bloom filter. Querying: every 50-gram of the
normalised query at stride 1 is looked up; a document segment copied into the query shows up as hits exactly
50 apart (its stride-50 grams), so hits are chained 50 apart, and a chain of at least `min_chain` hits is a span
found in the training data (a lone hit may be one of the filter's false positives, which a chain of two is
with probability about p squared). Spans are mapped back to the query's own characters. The score is the
fraction of the query's characters that the spans cover; the longest chain over the query length is reported
too (Data Portraits' own score).

The filter is a plain bit array (numpy) with k positions per n-gram from two 64-bit halves of one BLAKE2b hash
(Kirsch-Mitzenmacher double hashing), sized for the n-gram count and the false-positive rate asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StarCoderError
from ..files import atomic

NGRAM = 50
STRIDE = 50
FORMAT = "starcoder-bloom-1"
_WORD = re.compile(r"\S+")


def normalize(text: str) -> tuple[str, np.ndarray]:
    """The normalised text (every run of whitespace, indentation and newlines included, made one space; none at
    either end) and, for each of its characters, the position in text of the character it came from."""
    out, origin = [], []
    for match in _WORD.finditer(text):
        if out:
            out.append(" ")
            origin.append(match.start() - 1)
        out.append(match.group())
        origin.extend(range(match.start(), match.end()))
    return "".join(out), np.array(origin, dtype=np.int64)


def normalized(text: str) -> str:
    """normalize(text)[0], without the position map (for indexing)."""
    return " ".join(text.split())


def _hashes(grams: Iterable[str]) -> np.ndarray:
    """Two 64-bit hashes per n-gram, [n, 2] uint64."""
    digests = b"".join(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=16).digest() for g in grams)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2)


@dataclass
class BloomParams:
    bits: int
    hashes: int
    items: int  # n-grams inserted
    false_positive_rate: float  # the rate the filter was sized for
    ngram: int = NGRAM
    stride: int = STRIDE
    format: str = FORMAT

    @classmethod
    def for_items(cls, items: int, false_positive_rate: float) -> BloomParams:
        if not 0 < false_positive_rate < 1:
            raise StarCoderError(f"false-positive rate {false_positive_rate} must be between 0 and 1")
        items = max(items, 1)
        bits = math.ceil(-items * math.log(false_positive_rate) / math.log(2) ** 2)
        bits = (bits + 63) // 64 * 64
        return cls(bits, max(1, round(bits / items * math.log(2))), items, false_positive_rate)


class BloomFilter:
    def __init__(self, params: BloomParams, words: np.ndarray | None = None):
        self.params = params
        self.words = np.zeros(params.bits // 64, dtype=np.uint64) if words is None else words

    def _positions(self, grams: Iterable[str]) -> np.ndarray:
        """[n, k] bit positions."""
        h = _hashes(grams)
        if not len(h):
            return np.zeros((0, self.params.hashes), dtype=np.uint64)
        k = np.arange(self.params.hashes, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return (h[:, :1] + k[None, :] * (h[:, 1:] | np.uint64(1))) % np.uint64(self.params.bits)

    def add(self, grams: Iterable[str]) -> None:
        positions = self._positions(grams).ravel()
        np.bitwise_or.at(self.words, positions >> np.uint64(6), np.uint64(1) << (positions & np.uint64(63)))

    def contains(self, grams: Iterable[str]) -> np.ndarray:
        positions = self._positions(grams)
        bits = (self.words[positions >> np.uint64(6)] >> (positions & np.uint64(63))) & np.uint64(1)
        return bits.all(axis=1) if len(positions) else np.zeros(0, dtype=bool)

    def save(self, path: Path) -> None:
        """A JSON header line, then the bit array; written by rename."""
        header = (json.dumps(self.params.__dict__) + "\n").encode()
        with atomic(path) as tmp, open(tmp, "wb") as f:
            f.write(header)
            f.write(self.words.astype("<u8").tobytes())

    @classmethod
    def load(cls, path: Path) -> BloomFilter:
        try:
            with open(path, "rb") as f:
                params = BloomParams(**json.loads(f.readline()))
                offset = f.tell()
        except FileNotFoundError:
            raise StarCoderError(f"{path}: no membership filter here (build one with `starcoder index`)") from None
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise StarCoderError(f"{path}: not a membership filter ({e})") from None
        if params.format != FORMAT or params.ngram != NGRAM or params.stride != STRIDE:
            raise StarCoderError(f"{path}: built with other parameters ({params.format}, {params.ngram}-grams every "
                                 f"{params.stride}); this version reads {FORMAT}, {NGRAM}-grams every {STRIDE}")
        expected = offset + params.bits // 8
        if path.stat().st_size != expected:
            raise StarCoderError(f"{path}: damaged ({path.stat().st_size} bytes, expected {expected})")
        words = np.memmap(path, dtype="<u8", mode="r", offset=offset, shape=(params.bits // 64,))
        return cls(params, words)


def document_grams(text: str) -> list[str]:
    """The n-grams a document contributes: every STRIDE characters of its normalised text (a last, shorter piece
    is left out: it cannot be told apart from the start of another n-gram)."""
    norm = normalized(text)
    return [norm[i : i + NGRAM] for i in range(0, len(norm) - NGRAM + 1, STRIDE)]


def count_grams(text: str) -> int:
    n = len(normalized(text))
    return max(0, (n - NGRAM) // STRIDE + 1)


@dataclass
class Span:
    start: int  # in the query's own characters
    end: int
    hits: int  # n-grams chained


def query(bloom: BloomFilter, text: str, min_chain: int = 2) -> dict:
    """Spans of text found in the training data, the covered fraction (the score) and the longest chain."""
    norm, origin = normalize(text)
    starts = range(0, max(0, len(norm) - NGRAM + 1))
    hits = bloom.contains([norm[i : i + NGRAM] for i in starts]) if len(starts) else np.zeros(0, dtype=bool)
    spans: list[Span] = []
    longest = 0
    chained = np.zeros(len(hits), dtype=bool)  # a hit already counted in a chain started earlier
    for i in np.flatnonzero(hits).tolist():
        if chained[i]:
            continue
        j = i
        while j + STRIDE < len(hits) and hits[j + STRIDE]:
            j += STRIDE
            chained[j] = True
        length = (j - i) // STRIDE + 1
        longest = max(longest, length)
        if length >= min_chain:
            spans.append(Span(int(i), int(j + NGRAM), int(length)))
    merged = _merge([(s.start, s.end, s.hits) for s in spans])
    covered_normalized = sum(end - start for start, end, _ in merged)
    query_spans = [Span(int(origin[start]), int(origin[end - 1]) + 1, hits) for start, end, hits in merged]
    return {"score": covered_normalized / len(norm) if norm else 0.0,
            "longest_chain": longest, "longest_chain_fraction": longest * STRIDE / len(norm) if norm else 0.0,
            "spans": query_spans, "normalized_length": len(norm)}


def _merge(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for start, end, hits in sorted(spans):
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2] + hits)
        else:
            merged.append((start, end, hits))
    return merged
