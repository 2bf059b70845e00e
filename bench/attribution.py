"""Attribution on the embedded model's corpus: index build speed, index size per MB of corpus, and the latency of
attributing a 1,000-character snippet.

- Build: `build_index` over the corpus (membership filter and search shards), MB of corpus per second.
- Size: bytes of each part per MB of corpus.
- Latency: 1,000-character snippets cut from random corpus files (half of them re-indented), each attributed
  alone: the membership test (normalise, 950 stride-1 lookups, chaining) and the search (FTS5 query, re-ranking,
  matching lines) timed apart; median and 95th percentile. Targets: membership under 50 ms, search under 200 ms.
  Baseline in the same run: finding the snippet's lines by scanning every file of the corpus (what attribution
  costs without an index).

    python bench/attribution.py [--data PATH] [--snippets 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def snippets(documents, count: int, seed: int = 0) -> list[tuple[str, tuple]]:
    """(snippet, (repository, path) of the file it was cut from)."""
    rng = random.Random(seed)
    long_enough = [d for d in documents if len(d.content) > 3000]
    chosen = []
    for i in range(count):
        doc = rng.choice(long_enough)
        start = rng.randrange(0, len(doc.content) - 1000)
        piece = doc.content[start : start + 1000]
        piece = "\n".join("    " + line for line in piece.splitlines()) if i % 2 else piece
        chosen.append((piece, (doc.repo, doc.path)))
    return chosen


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return (f"median {statistics.median(ordered) * 1000:7.1f} ms   "
            f"p95 {ordered[int(0.95 * (len(ordered) - 1))] * 1000:7.1f} ms")


def main() -> None:
    from starcoder.attribution import membership, search
    from starcoder.attribution.index import AttributionIndex, build_index, embedded_corpus
    from starcoder.train.data import read_corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="corpus (default: the embedded model's)")
    parser.add_argument("--snippets", type=int, default=50)
    args = parser.parse_args()
    data = args.data or embedded_corpus()
    documents = list(read_corpus([data]))
    corpus_mb = sum(len(d.content.encode()) for d in documents) / 1e6
    print(f"corpus: {data} ({len(documents):,} files, {corpus_mb:.1f} MB)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = build_index([data], Path(tmp) / "index")
        build_seconds = time.perf_counter() - start
        build = Path(tmp) / "index" / manifest["build"]
        bloom_bytes = (build / "membership.bloom").stat().st_size
        search_bytes = sum(p.stat().st_size for p in build.glob("search-*.sqlite"))
        print(f"\nbuild: {build_seconds:.1f} s, {corpus_mb / build_seconds:.2f} MB/s "
              f"({manifest['membership']['items']:,} n-grams, {len(manifest['search']['shards'])} search shard(s))")
        print(f"size per MB of corpus: membership {bloom_bytes / corpus_mb / 1e3:.1f} KB "
              f"(false-positive rate {manifest['membership']['false_positive_rate']}), "
              f"search {search_bytes / corpus_mb / 1e6:.2f} MB (content stored + trigram index)")

        index = AttributionIndex(Path(tmp) / "index")
        queries = snippets(documents, args.snippets)
        member_times, search_times, scores, right_first = [], [], [], 0
        for text, source in queries:
            start = time.perf_counter()
            found = membership.query(index.bloom, text)
            member_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            matches = search.search(index.shards, text)
            search_times.append(time.perf_counter() - start)
            scores.append(found["score"])
            right_first += bool(matches) and (matches[0].repository, matches[0].path) == source
        scan_times = []
        normalized_docs = [" ".join(d.content.split()) for d in documents]
        for text, _ in queries[:10]:
            lines = [" ".join(line.split()) for line in text.splitlines() if len(line.strip()) >= 8]
            start = time.perf_counter()
            best = max(range(len(documents)), key=lambda i: sum(line in normalized_docs[i] for line in lines))
            scan_times.append(time.perf_counter() - start)
            del best
        print(f"\n{len(queries)} snippets of 1,000 characters (half re-indented), one at a time:")
        print(f"  membership test   {percentiles(member_times)}   (target < 50 ms)   "
              f"score: median {statistics.median(scores):.2f}")
        print(f"  search            {percentiles(search_times)}   (target < 200 ms)   "
              f"source's file first for {right_first}/{len(queries)}")
        print(f"  baseline: scanning every file for the snippet's lines   {percentiles(scan_times)}")
        print(f"  search / scan: {statistics.median(search_times) / statistics.median(scan_times):.3f}x the time")


if __name__ == "__main__":
    main()
