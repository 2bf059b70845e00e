"""Exact and near deduplication, as StarCoder's data was deduplicated.

Exact: the SHA-256 of the content; the first file with a hash is kept.
Near: MinHash signatures (datasketch, 256 permutations) of the set of 5-grams of the file's tokens, where tokens
are the runs of [A-Za-z_0-9]; locality-sensitive hashing with 25 bands of 10 rows finds candidate pairs at
Jaccard similarity about 0.7; candidates are joined into clusters (union-find, so the clustering is global over
every file given), and one file is kept per cluster: the one with the most stars, then the longest, then the
first seen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

NUM_PERM = 256
BANDS, ROWS = 25, 10
NGRAM = 5
THRESHOLD = 0.7
_TOKEN = re.compile(r"[A-Za-z_0-9]+")


def content_hash(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8", errors="surrogatepass")).hexdigest()


def exact_duplicates(contents: Sequence[str]) -> list[bool]:
    """For each content, whether an earlier one is identical."""
    seen: set[str] = set()
    duplicate = []
    for content in contents:
        h = content_hash(content)
        duplicate.append(h in seen)
        seen.add(h)
    return duplicate


def shingles(content: str, n: int = NGRAM) -> set[bytes]:
    tokens = _TOKEN.findall(content)
    if len(tokens) < n:
        return {" ".join(tokens).encode()} if tokens else set()
    return {" ".join(tokens[i : i + n]).encode() for i in range(len(tokens) - n + 1)}


def minhash(content: str):
    from datasketch import MinHash

    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch(list(shingles(content)))
    return signature


def near_duplicate_clusters(contents: Sequence[str], threshold: float = THRESHOLD) -> list[int]:
    """The cluster of each content (the index of its cluster's first member); singletons are their own."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=(BANDS, ROWS))
    parent = list(range(len(contents)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    signatures = [minhash(c) for c in contents]
    for i, signature in enumerate(signatures):
        if not shingles(contents[i]):
            continue  # nothing to compare (empty or token-less files are left to exact dedup)
        for j in lsh.query(signature):
            # LSH proposes candidates; the estimated Jaccard similarity confirms them.
            if signature.jaccard(signatures[j]) >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
        lsh.insert(i, signature)
    return [find(i) for i in range(len(contents))]


def near_duplicates(contents: Sequence[str], stars: Sequence[int | None] | None = None,
                    threshold: float = THRESHOLD) -> list[bool]:
    """For each content, whether it goes as a near duplicate: in each cluster the file with the most stars, then
    the longest, then the first seen, stays."""
    clusters = near_duplicate_clusters(contents, threshold)
    stars = stars or [None] * len(contents)
    best: dict[int, int] = {}
    for i, cluster in enumerate(clusters):
        key = (stars[i] or 0, len(contents[i]), -i)
        if cluster not in best or key > ((stars[best[cluster]] or 0), len(contents[best[cluster]]), -best[cluster]):
            best[cluster] = i
    return [best[cluster] != i for i, cluster in enumerate(clusters)]
