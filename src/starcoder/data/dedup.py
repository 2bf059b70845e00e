"""Exact and near deduplication, as StarCoder's data was deduplicated.

Exact: files with the same SHA-256 of their content form a group; one is kept (the rule below).
Near: MinHash signatures (datasketch, 256 permutations) of the set of 5-grams of the file's tokens, where tokens
are the runs of [A-Za-z_0-9]. Locality-sensitive hashing with 25 bands of 10 rows proposes candidate pairs (files
that agree on every row of some band); a candidate pair is a near duplicate when its estimated Jaccard similarity
is at least 0.7. Clusters are the connected components of those pairs (union-find over every file given, so the
clustering is global however the files were cut into shards), and one file is kept per cluster: the one with the
most stars, then the longest, then the first seen.

The banding works on a signature matrix by sorting each band's keys rather than in datasketch's in-memory hash
tables: a few hundred bytes of memory per file (band keys, hashes, union-find), with the signatures themselves
read from disk only for the candidate pairs. The result is the same as querying datasketch's
MinHashLSH with each file in turn (a test checks this).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np

NUM_PERM = 256
BANDS, ROWS = 25, 10
NGRAM = 5
THRESHOLD = 0.7
SEED = 1
_TOKEN = re.compile(r"[A-Za-z_0-9]+")


def content_hash(content: str) -> bytes:
    return hashlib.sha256(content.encode("utf-8", errors="surrogatepass")).digest()


def exact_duplicates(contents: Sequence[str]) -> list[bool]:
    """For each content, whether an earlier one is identical."""
    return first_occurrences([content_hash(c) for c in contents]).__invert__().tolist()


def first_occurrences(digests: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """For each digest, whether it is the first with its value."""
    groups = exact_groups(digests)
    return groups == np.arange(len(groups))


def exact_groups(digests: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """For each digest, the index of the first digest with its value."""
    digests = np.asarray(digests, dtype="S32")
    if not len(digests):
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def shingles(content: str, n: int = NGRAM) -> set[bytes]:
    tokens = _TOKEN.findall(content)
    if len(tokens) < n:
        return {" ".join(tokens).encode()} if tokens else set()
    return {" ".join(tokens[i : i + n]).encode() for i in range(len(tokens) - n + 1)}


def minhash_of(content: str):
    """datasketch's MinHash of content's 5-gram set."""
    from datasketch import MinHash

    minhash = MinHash(num_perm=NUM_PERM, seed=SEED)
    minhash.update_batch(list(shingles(content)))
    return minhash


def signature(content: str) -> np.ndarray | None:
    """The MinHash signature (uint32 x 256) of content's 5-gram set; None for a file without tokens (nothing to
    compare: such files are left to exact dedup)."""
    if not _TOKEN.search(content):
        return None
    return minhash_of(content).hashvalues.astype(np.uint32)  # 32-bit values (datasketch < 2 kept them in uint64)


def band_keys(signatures: np.ndarray) -> np.ndarray:
    """One 64-bit key per band and file ([n, BANDS]): equal bands give equal keys; a rare collision between
    different bands only proposes a candidate that the Jaccard check then rejects."""
    keys = np.zeros((len(signatures), BANDS), dtype=np.uint64)
    rows = signatures[:, : BANDS * ROWS].reshape(len(signatures), BANDS, ROWS).astype(np.uint64)
    with np.errstate(over="ignore"):
        for r in range(ROWS):  # FNV-style mixing, wrapping at 64 bits
            keys = (keys ^ rows[:, :, r]) * np.uint64(0x100000001B3)
    return keys


def clusters_from_signatures(keys: np.ndarray, row: Callable[[int], np.ndarray],
                             threshold: float = THRESHOLD) -> np.ndarray:
    """The cluster of each file (its smallest member's index), from the band keys of every file and a function
    giving one file's signature. Files with an all-zero key row (no signature) are singletons."""
    n = len(keys)
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def similar(i: int, j: int) -> bool:
        return np.count_nonzero(row(i) == row(j)) / NUM_PERM >= threshold

    for band in range(BANDS):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")  # equal keys stay in file order
        ordered = column[order]
        bounds = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])))
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end - start < 2 or ordered[start] == 0:
                continue  # a file alone in its bucket, or the files without a signature
            # The bucket's files joined so far, by cluster. A file joins each cluster one of whose files it is
            # similar to (trying that cluster's files in order, stopping at the first similar one).
            members_of: dict[int, list[int]] = {}
            for i in order[start:end].tolist():
                root = find(i)
                for other_root in list(members_of):
                    if other_root == root or other_root not in members_of:  # i's cluster, or merged just now
                        continue
                    if any(similar(i, j) for j in members_of[other_root]):
                        merged = min(root, other_root)
                        parent[max(root, other_root)] = merged
                        members_of.setdefault(root, [])
                        members_of[merged] = members_of.pop(root) + members_of.pop(other_root)
                        root = merged
                members_of.setdefault(root, []).append(i)
    return np.array([find(i) for i in range(n)])


def kept_per_cluster(clusters: np.ndarray, stars: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """For each file, whether it is its cluster's keeper: most stars, then longest, then first."""
    order = np.lexsort((np.arange(len(clusters)), -sizes, -stars, clusters))  # last key sorts first
    keep = np.zeros(len(clusters), dtype=bool)
    first_of_cluster = np.ones(len(order), dtype=bool)
    first_of_cluster[1:] = clusters[order][1:] != clusters[order][:-1]
    keep[order[first_of_cluster]] = True
    return keep


def signature_matrix(contents: Sequence[str]) -> np.ndarray:
    """Signatures of contents as rows; files without tokens get a zero row (and zero band keys)."""
    matrix = np.zeros((len(contents), NUM_PERM), dtype=np.uint32)
    for i, content in enumerate(contents):
        sig = signature(content)
        if sig is not None:
            matrix[i] = sig
    return matrix


def keys_of(matrix: np.ndarray) -> np.ndarray:
    """Band keys, zero for the rows without a signature."""
    keys = band_keys(matrix)
    keys[~matrix.any(axis=1)] = 0
    return keys


def near_duplicate_clusters(contents: Sequence[str], threshold: float = THRESHOLD) -> list[int]:
    """The cluster of each content (the index of its cluster's first member); singletons are their own."""
    matrix = signature_matrix(contents)
    return clusters_from_signatures(keys_of(matrix), matrix.__getitem__, threshold).tolist()


def near_duplicates(contents: Sequence[str], stars: Sequence[int | None] | None = None,
                    threshold: float = THRESHOLD) -> list[bool]:
    """For each content, whether it goes as a near duplicate: in each cluster the file with the most stars, then
    the longest, then the first seen, stays."""
    clusters = np.array(near_duplicate_clusters(contents, threshold))
    stars_array = np.array([s or 0 for s in (stars or [None] * len(contents))], dtype=np.int64)
    sizes = np.array([len(c.encode("utf-8", errors="surrogatepass")) for c in contents], dtype=np.int64)
    return (~kept_per_cluster(clusters, stars_array, sizes)).tolist()
