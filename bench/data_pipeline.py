"""The data pipeline on ~100 MB of real code: MB/s per stage, the whole run on 1 and 2 workers, and the memory of
near dedup per million files.

The corpus is the Python, C and header files of permissively licensed packages installed beside this benchmark
(transformers, sympy, numpy, networkx, matplotlib: Apache-2.0, BSD-3-Clause, PSF-based), written once as rows in
The Stack's schema (content, repository_name, path, licenses, language).

- Stages: each stage's function alone over the documents that reach it, one core, MB/s of its input. Baselines
  in the same run: reading the rows (json.loads) is the floor every stage is compared with, and BigCode's way of
  finding secrets (detect-secrets scanning every line with its plugins) is run on the same sample as our PII stage.
- Whole run: `prepare` with 1 and with 2 workers (local process pool) and with datatrove's executor on 2 workers;
  speed-up = time(1) / time(2) (ideal 2.0 on this 2-core machine).
- Near-dedup memory: the global dedup step on N synthetic files (random signatures with planted near-duplicate
  clusters), in a fresh process, peak RSS above the process's baseline, for several N; the slope of a line
  through them is extrapolated to a million files. Baseline: datasketch's MinHashLSH (in-memory hash tables)
  holding the same signatures.

    python bench/data_pipeline.py [--mb 100] [--stages-mb 20] [--task-mb 16] [--files 100000 200000 400000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, peak_rss, run_child  # noqa: E402
from starcoder.data.prepare import PrepareConfig  # noqa: E402

PACKAGES = [("transformers", "Apache-2.0"), ("sympy", "BSD-3-Clause"), ("numpy", "BSD-3-Clause"),
            ("networkx", "BSD-3-Clause"), ("matplotlib", "PSF-2.0")]
SUFFIXES = (".py", ".pyi", ".c", ".h", ".cpp")


def build_corpus(megabytes: float) -> Path:
    """The rows file, written once under bench/results/."""
    import importlib.util

    out = RESULTS / f"data-corpus-{megabytes:g}mb.jsonl"
    if out.exists():
        return out
    RESULTS.mkdir(exist_ok=True)
    budget, written = megabytes * 1e6, 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for package, spdx in PACKAGES:
            root = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
            for path in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
                if written >= budget:
                    break
                try:
                    content = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                f.write(json.dumps({"content": content, "repository_name": f"{package}/{package}",
                                    "path": str(path.relative_to(root.parent)), "licenses": [spdx]}) + "\n")
                written += len(content.encode())
    tmp.replace(out)
    return out


def timed(function, items) -> float:
    start = time.perf_counter()
    for item in items:
        function(item)
    return time.perf_counter() - start


def stage_throughput(corpus: Path, megabytes: float) -> dict:
    """MB/s of each stage alone, on the first `megabytes` of the corpus, one core."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import transient_settings

    from starcoder.data import dedup, filters, pii
    from starcoder.data.decontaminate import Decontaminator, benchmark_strings
    from starcoder.languages import language_of

    lines = []
    size = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= megabytes * 1e6:
                break
    rows = [json.loads(line) for line in lines]
    texts = [r["content"] for r in rows]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    finder = Decontaminator(benchmark_strings())
    results = {"read (json.loads, the floor)": timed(json.loads, lines),
               "language": timed(lambda r: language_of(r["path"]), rows),
               "license": timed(lambda r: filters.license_reason(r["licenses"]), rows),
               "quality": timed(filters.quality_reason, texts),
               "generated": timed(lambda r: filters.generated_reason(r["content"], r["path"]), rows),
               "decontaminate": timed(finder.match, texts),
               "exact_dedup (sha256)": timed(dedup.content_hash, texts)}
    start = time.perf_counter()
    matrix = dedup.signature_matrix(texts)
    results["near_dedup: signatures"] = time.perf_counter() - start
    start = time.perf_counter()
    dedup.clusters_from_signatures(dedup.keys_of(matrix), matrix.__getitem__)
    results["near_dedup: clustering"] = time.perf_counter() - start
    results["pii (ours)"] = timed(pii.redact, texts)
    sample = texts[: max(1, len(texts) // 10)]  # BigCode's way is slow: a tenth of the documents
    plugins = [{"name": name} for name in (
        "ArtifactoryDetector", "AWSKeyDetector", "Base64HighEntropyString", "HexHighEntropyString",
        "AzureStorageKeyDetector", "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector",
        "IbmCloudIamDetector", "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector", "NpmDetector",
        "SendGridDetector", "SlackDetector", "SoftlayerDetector", "StripeDetector", "TwilioKeyDetector")]
    with transient_settings({"plugins_used": plugins}):
        start = time.perf_counter()
        for text in sample:
            for line in text.splitlines():
                list(scan_line(line))
        baseline_seconds = time.perf_counter() - start
    sample_mb = sum(len(t.encode()) for t in sample) / 1e6
    out = {name: {"MB/s": round(mb / seconds, 2)} for name, seconds in results.items()}
    out["pii: BigCode's detect-secrets line scan (secrets only, baseline)"] = {
        "MB/s": round(sample_mb / baseline_seconds, 2)}
    return {"megabytes": round(mb, 1), "documents": len(texts), "stages": out}


def whole_run(corpus: Path, workers: int, executor: str, task_mb: float) -> dict:
    from starcoder.data.prepare import PrepareConfig, prepare

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = prepare(PrepareConfig(inputs=[corpus], out=Path(tmp) / "out", task_bytes=int(task_mb * 2**20)),
                         workers=workers, executor=executor)
        seconds = time.perf_counter() - start
    mb = report["stages"]["read"]["bytes_in"] / 1e6
    return {"workers": workers, "executor": executor, "seconds": round(seconds, 1),
            "MB/s": round(mb / seconds, 2), "documents_out": report["documents_out"],
            "removed": {s: sum(e["removed"].values()) for s, e in report["stages"].items() if e["removed"]},
            "pii": report["stages"]["pii"].get("findings", {})}


def synthetic_signatures(files: int, seed: int = 0):
    """Random signatures where one file in ten is an edited copy (about 85% of rows kept) of another."""
    import numpy as np

    from starcoder.data.dedup import NUM_PERM

    rng = np.random.default_rng(seed)
    matrix = rng.integers(1, 2**32 - 1, size=(files, NUM_PERM), dtype=np.uint32)
    copies = rng.choice(files, size=files // 10, replace=False)
    sources = rng.integers(0, files, size=len(copies))
    keep = rng.random((len(copies), NUM_PERM)) < 0.85
    matrix[copies] = np.where(keep, matrix[sources], matrix[copies])
    return matrix


def write_dedup_inputs(out: Path, files: int) -> None:
    """The filter step's outputs for one task holding `files` synthetic files, as the dedup step finds them."""
    import numpy as np

    from starcoder.data.files import save_arrays
    from starcoder.data.prepare import Pipeline, PrepareConfig

    empty = out / "empty.jsonl"
    empty.write_text("")
    pipeline = Pipeline(PrepareConfig(inputs=[empty], out=out / "out"))
    synthetic_signatures(files).tofile(pipeline._filtered(0, "signatures.u32"))
    rng = np.random.default_rng(1)
    save_arrays(pipeline._filtered(0, "meta.npz"), digests=np.array([rng.bytes(32) for _ in range(files)], "S32"),
          stars=np.zeros(files, np.int64), sizes=rng.integers(100, 10000, files))
    pipeline._filtered(0, "jsonl").write_text("")


def dedup_memory_child(side: str, files: int) -> dict:
    """Peak RSS of the global dedup step (or of datasketch's MinHashLSH) over `files` synthetic files, above the
    process's peak before it starts (imports included in the baseline)."""
    import numpy as np

    from starcoder.data.dedup import BANDS, NUM_PERM, ROWS, SEED

    if side == "datasketch":
        from datasketch import LeanMinHash, MinHashLSH

        matrix = synthetic_signatures(files)
        baseline = peak_rss()  # the signatures are in memory here; the LSH's own cost is what is measured
        lsh = MinHashLSH(threshold=0.7, num_perm=NUM_PERM, params=(BANDS, ROWS))
        start = time.perf_counter()
        for i in range(files):
            lsh.insert(i, LeanMinHash(seed=SEED, hashvalues=matrix[i], scheme="affine32"), check_duplication=False)
        seconds = time.perf_counter() - start
        return {"files": files, "peak_bytes": peak_rss() - baseline, "seconds": seconds}
    from starcoder.data.prepare import Pipeline, PrepareConfig

    with tempfile.TemporaryDirectory() as tmp:
        # written by another process, so that making the inputs does not raise this one's peak
        subprocess.run([sys.executable, __file__, "--child", "write", str(files), tmp], check=True)
        pipeline = Pipeline(PrepareConfig(inputs=[Path(tmp) / "empty.jsonl"], out=Path(tmp) / "out"))
        np.zeros(1)  # numpy's first allocation outside the measurement
        baseline = peak_rss()
        start = time.perf_counter()
        pipeline.dedup()
        seconds = time.perf_counter() - start
        report = json.loads((pipeline.work / "dedup" / "report.json").read_text())
    return {"files": files, "peak_bytes": peak_rss() - baseline, "seconds": seconds,
            "near_duplicates": report["stages"]["near_dedup"]["removed"].get("near_duplicate", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--stages-mb", type=float, default=20, help="corpus share for the per-stage figures")
    parser.add_argument("--task-mb", type=float, default=PrepareConfig.task_bytes / 2**20)
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", default=[], choices=["stages", "runs", "memory"])
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "write":
            write_dedup_inputs(Path(args.child[2]), int(args.child[1]))
        else:
            print(json.dumps(dedup_memory_child(args.child[0], int(args.child[1]))))
        return
    corpus = build_corpus(args.mb)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB of rows), {os.cpu_count()} cores")
    if "stages" not in args.skip:
        stages = stage_throughput(corpus, args.stages_mb)
        print(f"\nper stage, one core, on {stages['megabytes']} MB ({stages['documents']} documents):")
        floor = stages["stages"]["read (json.loads, the floor)"]["MB/s"]
        for name, entry in stages["stages"].items():
            print(f"  {name:62} {entry['MB/s']:9.2f} MB/s  {entry['MB/s'] / floor:7.3f}x the floor")
        ours, theirs = stages["stages"]["pii (ours)"]["MB/s"], stages["stages"][
            "pii: BigCode's detect-secrets line scan (secrets only, baseline)"]["MB/s"]
        print(f"  our whole PII stage / BigCode's secret scan alone: {ours / theirs:.1f}x the speed")
    if "runs" not in args.skip:
        print(f"\nthe whole pipeline on {args.mb:g} MB, tasks of {args.task_mb:g} MB:")
        runs = [whole_run(corpus, workers, executor, args.task_mb)
                for workers, executor in ((1, "local"), (2, "local"), (2, "datatrove"))]
        for run in runs:
            print(f"  {run['executor']:9} {run['workers']} worker(s): {run['seconds']:7.1f} s  {run['MB/s']:6.2f} MB/s"
                  f"  kept {run['documents_out']} documents; removed {run['removed']}; PII {run['pii']}")
        print(f"  speed-up 1 -> 2 workers: {runs[0]['seconds'] / runs[1]['seconds']:.2f}x local, "
              f"{runs[0]['seconds'] / runs[2]['seconds']:.2f}x datatrove (ideal 2.0)")
    if "memory" not in args.skip:
        print("\nnear-dedup memory (global step, synthetic signatures, fresh process each):")
        measured = {side: [run_child(__file__, side, [str(n)]) for n in args.files] for side in ("ours", "datasketch")}
        for side, points in measured.items():
            import numpy as np

            slope = np.polyfit([p["files"] for p in points], [p["peak_bytes"] for p in points], 1)[0]
            for p in points:
                extra = f", {p['near_duplicates']} near duplicates removed" if "near_duplicates" in p else ""
                print(f"  {side:10} {p['files']:>9,} files: peak +{p['peak_bytes'] / 1e6:8.1f} MB "
                      f"in {p['seconds']:6.1f} s{extra}")
            print(f"  {side:10} per million files: {slope * 1e6 / 1e9:.2f} GB (slope of a line through the sizes)")
            measured[side] = slope
        print(f"  ours / datasketch MinHashLSH: {measured['ours'] / measured['datasketch']:.2f}x the memory")


if __name__ == "__main__":
    main()
