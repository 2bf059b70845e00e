"""`starcoder prepare`: source trees or The Stack-style rows in, filtered, deduplicated, redacted shards out.

The run is three steps over a plan of tasks (sources.plan: the inputs cut into pieces of about `task_bytes`):

1. filter, one task per piece, in parallel: read (unreadable, binary, badly encoded, huge files and malformed rows
   are counted with their reason), language, license, opt-out, quality, generated / minified, decontamination;
   the documents left are written with their SHA-256 and MinHash signature;
2. dedup, once over every task's hashes and signatures: exact dedup, then near dedup with global clusters,
   each keeping the file with the most stars, then the longest, then the first (dedup.py); a keep mask per task;
3. finish, one task per piece, in parallel: drop what dedup removed, redact PII, write the task's shard.

Every file a task writes appears by rename, its report last: a task whose report exists is finished and is not
redone when an interrupted run is started again, and no shard is ever half-written. The same steps run on
this machine's cores (a process pool) or on datatrove's executors (`executor="datatrove"`; its Slurm and Ray
executors take the same steps for corpora beyond one machine). Outputs depend on the inputs and settings only,
not on the executor or the number of workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import StarCoderError
from ..files import atomic, write_text_atomic
from . import sources
from .dedup import (
    NUM_PERM,
    clusters_from_signatures,
    content_hash,
    exact_groups,
    kept_per_cluster,
    signature,
)
from .files import ShardWriter, SignatureFiles, save_arrays
from .filters import PERMISSIVE_LICENSES, generated_reason, license_reason, opt_out_reason, quality_reason
from .report import Report, write_chart

WORK = ".work"
FORMATS = ("jsonl", "parquet")
EXECUTORS = ("local", "datatrove")
PER_DOCUMENT_STAGES = ("language", "license", "opt_out", "quality", "generated", "decontaminate")


@dataclass
class PrepareConfig:
    inputs: list[Path]
    out: Path
    languages: frozenset[str] | None = None
    licenses: frozenset[str] = PERMISSIVE_LICENSES
    opt_out: frozenset[str] = frozenset()
    decontaminate: bool = True
    mbpp: Path | None = None
    multiple: list[Path] = field(default_factory=list)  # MultiPL-E JSONL files to decontaminate against
    redact_pii: bool = True
    pii_model: str | None = None  # a StarPII-format model beside (or, without pii_regex, instead of) the regexes
    pii_regex: bool = True
    output_format: str = "jsonl"
    task_bytes: int = 16 * 1024 * 1024  # small enough to keep 2+ workers busy on 100 MB, large enough for shards

    def settings(self) -> dict:
        """Everything that decides the output; a run resumes only with the same settings."""
        return {"inputs": [str(p.resolve()) for p in self.inputs],
                "languages": sorted(self.languages) if self.languages else None,
                "licenses": sorted(self.licenses), "opt_out": sorted(self.opt_out),
                "decontaminate": self.decontaminate, "mbpp": str(self.mbpp) if self.mbpp else None,
                "multiple": [str(p) for p in self.multiple], "redact_pii": self.redact_pii,
                "pii_model": self.pii_model, "pii_regex": self.pii_regex,
                "output_format": self.output_format, "task_bytes": self.task_bytes}


class Pipeline:
    """The three steps of one run, each callable alone (and picklable, for process pools and datatrove)."""

    def __init__(self, config: PrepareConfig):
        if config.output_format not in FORMATS:
            raise StarCoderError(f"output format {config.output_format!r}: choose one of {', '.join(FORMATS)}")
        if config.task_bytes < 1024:
            raise StarCoderError(f"task size {config.task_bytes} bytes is too small")
        if config.redact_pii and config.pii_model:
            from .pii_model import pii_model

            pii_model(config.pii_model)  # a model that does not load stops the run before any work
        self.config = config
        self.out = config.out
        self.work = config.out / WORK
        self.tasks = self._plan()

    def _plan(self) -> list[list[sources.Unit]]:
        settings_file, plan_file = self.work / "settings.json", self.work / "plan.json"
        settings = self.config.settings()
        if settings_file.exists():
            if json.loads(settings_file.read_text()) != settings:
                raise StarCoderError(f"{self.out} holds a run with other settings or inputs; use a new --out")
            for stale in self.out.rglob("*.tmp"):  # what a killed run was writing
                stale.unlink()
            return sources.plan_from_json(json.loads(plan_file.read_text()))
        if self.out.exists() and any(self.out.iterdir()):
            raise StarCoderError(f"{self.out} exists and is not empty")
        tasks = sources.plan(self.config.inputs, self.config.task_bytes)
        for step in ("filter", "dedup", "finish"):
            (self.work / step).mkdir(parents=True, exist_ok=True)
        write_text_atomic(plan_file, json.dumps(sources.plan_json(tasks)))
        write_text_atomic(settings_file, json.dumps(settings, indent=2))  # last: the plan is complete
        return tasks

    # ---- step 1: per-document filters ------------------------------------------------------------------------

    @cached_property
    def _decontaminator(self):
        if not self.config.decontaminate:
            return None
        from .decontaminate import Decontaminator, benchmark_strings

        return Decontaminator(benchmark_strings(mbpp=self.config.mbpp, multiple=self.config.multiple))

    def _checks(self) -> list[tuple[str, Callable[[sources.Document], str | None]]]:
        config = self.config

        def language(doc):
            if not doc.language:
                return "unknown_language"
            return None if not config.languages or doc.language in config.languages else "language_not_selected"

        def decontaminate(doc):
            hit = self._decontaminator.match(doc.content) if self._decontaminator else None
            return f"contains {hit}" if hit else None

        return [("language", language), ("license", lambda d: license_reason(d.licenses, config.licenses)),
                ("opt_out", lambda d: opt_out_reason(d.repo, config.opt_out)),
                ("quality", lambda d: quality_reason(d.content)),
                ("generated", lambda d: generated_reason(d.content, d.path)), ("decontaminate", decontaminate)]

    def _filtered(self, rank: int, suffix: str) -> Path:
        return self.work / "filter" / f"{rank:05d}.{suffix}"

    def filter_task(self, rank: int) -> None:
        if self._filtered(rank, "report.json").exists():
            return
        report, checks = Report(), self._checks()
        digests, stars, sizes, signatures = [], [], [], []
        rows_path = self._filtered(rank, "jsonl")
        with atomic(rows_path) as rows_tmp, open(rows_tmp, "w", encoding="utf-8") as rows:
            for unit in self.tasks[rank]:
                for item in sources.read(unit):
                    if isinstance(item, sources.Skipped):
                        report.enter("read", item.size)
                        report.remove("read", item.reason, item.origin, item.size)
                        continue
                    size = len(item.content.encode("utf-8", errors="surrogatepass"))
                    report.enter("read", size)
                    if self._removed_by_a_filter(item, size, checks, report):
                        continue
                    rows.write(json.dumps({**item.row(), "origin": item.origin}, ensure_ascii=False) + "\n")
                    digests.append(content_hash(item.content))
                    stars.append(item.stars or 0)
                    sizes.append(size)
                    sig = signature(item.content)
                    signatures.append(np.zeros(NUM_PERM, np.uint32) if sig is None else sig)
            with atomic(self._filtered(rank, "signatures.u32")) as tmp, open(tmp, "wb") as f:
                for sig in signatures:
                    f.write(sig.tobytes())
            save_arrays(self._filtered(rank, "meta.npz"), digests=np.array(digests, dtype="S32"),
                        stars=np.array(stars, dtype=np.int64), sizes=np.array(sizes, dtype=np.int64))
        write_text_atomic(self._filtered(rank, "report.json"), report.to_json())

    @staticmethod
    def _removed_by_a_filter(doc: sources.Document, size: int, checks, report: Report) -> bool:
        for stage, check in checks:
            report.enter(stage, size)
            reason = check(doc)
            if reason:
                detail = None
                if stage == "decontaminate":  # "contains HumanEval/2 solution" is counted as "contains"
                    reason, detail = "contains", reason.removeprefix("contains ")
                report.remove(stage, reason, doc.origin, size, detail)
                return True
        return False

    # ---- step 2: global dedup --------------------------------------------------------------------------------

    def dedup(self) -> None:
        done = self.work / "dedup" / "report.json"
        if done.exists():
            return
        metas = [np.load(self._filtered(rank, "meta.npz")) for rank in range(len(self.tasks))]
        counts = [len(m["digests"]) for m in metas]
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        digests = np.concatenate([m["digests"] for m in metas]) if metas else np.zeros(0, "S32")
        stars = np.concatenate([m["stars"] for m in metas]) if metas else np.zeros(0, np.int64)
        sizes = np.concatenate([m["sizes"] for m in metas]) if metas else np.zeros(0, np.int64)
        signatures = SignatureFiles([self._filtered(rank, "signatures.u32") for rank in range(len(counts))])
        unique = kept_per_cluster(exact_groups(digests), stars, sizes)  # one of each group of identical files
        keys = signatures.band_keys()
        keys[~unique] = 0  # exact duplicates take no part in near dedup
        clusters = clusters_from_signatures(keys, signatures.row)
        signatures.close()
        kept = unique & kept_per_cluster(clusters, stars, sizes)

        report = Report()
        removed_examples = []
        for index in range(len(digests)):
            report.enter("exact_dedup", int(sizes[index]))
            if not unique[index]:
                report.remove("exact_dedup", "duplicate", "", int(sizes[index]))
                removed_examples.append(("exact_dedup", index))
                continue
            report.enter("near_dedup", int(sizes[index]))
            if not kept[index]:
                report.remove("near_dedup", "near_duplicate", "", int(sizes[index]))
                removed_examples.append(("near_dedup", index))
        self._name_examples(report, removed_examples, offsets)
        for rank in range(len(counts)):
            save_arrays(self.work / "dedup" / f"{rank:05d}.keep.npy", kept[offsets[rank] : offsets[rank + 1]])
        write_text_atomic(done, report.to_json())

    def _name_examples(self, report: Report, removed: list[tuple[str, int]], offsets: np.ndarray) -> None:
        """Fill in the origins of the first removed documents of each dedup stage (read back from the filter
        step's rows, which only these few need)."""
        for stage in ("exact_dedup", "near_dedup"):
            examples = report.stages[stage]["examples"]
            indices = [index for s, index in removed if s == stage][: len(examples)]
            for example, index in zip(examples, indices, strict=True):
                rank = int(np.searchsorted(offsets, index, side="right")) - 1
                with open(self._filtered(rank, "jsonl"), encoding="utf-8") as rows:
                    for number, line in enumerate(rows):
                        if number == index - offsets[rank]:
                            example["document"] = json.loads(line)["origin"]
                            break

    # ---- step 3: PII and shards ------------------------------------------------------------------------------

    def shard_path(self, rank: int) -> Path:
        return self.out / f"shard-{rank:05d}.{self.config.output_format}"

    def finish_task(self, rank: int) -> None:
        done = self.work / "finish" / f"{rank:05d}.report.json"
        if done.exists():
            return
        if self.config.redact_pii:
            from .pii import redact, redacted_lines
            from .pii_model import pii_model

            model = pii_model(self.config.pii_model) if self.config.pii_model else None
        keep = np.load(self.work / "dedup" / f"{rank:05d}.keep.npy")
        report = Report()
        shard = self.shard_path(rank)
        with atomic(shard) as tmp, ShardWriter(tmp, self.config.output_format) as writer, \
                open(self._filtered(rank, "jsonl"), encoding="utf-8") as rows:
            for index, line in enumerate(rows):
                if not keep[index]:
                    continue
                row = json.loads(line)
                origin = row.pop("origin")
                size = len(row["content"].encode("utf-8", errors="surrogatepass"))
                report.enter("pii", size)
                if self.config.redact_pii:
                    text, findings = redact(row["content"], row["path"], model, self.config.pii_regex)
                    if findings:
                        row["content"] = text
                        new_size = len(text.encode("utf-8", errors="surrogatepass"))
                        report.redact(origin, size, new_size, findings, redacted_lines(text, findings))
                writer.write(row)
        write_text_atomic(done, report.to_json())

    # ---- the run's report ------------------------------------------------------------------------------------

    def finish_report(self) -> dict:
        report = Report()
        for rank in range(len(self.tasks)):
            report.merge(Report.from_json(self._filtered(rank, "report.json").read_text()))
        report.merge(Report.from_json((self.work / "dedup" / "report.json").read_text()))
        for rank in range(len(self.tasks)):
            report.merge(Report.from_json((self.work / "finish" / f"{rank:05d}.report.json").read_text()))
        summary = {**report.summary(), "shards": [self.shard_path(r).name for r in range(len(self.tasks))],
                   "settings": self.config.settings()}
        write_text_atomic(self.out / "report.json", json.dumps(summary, indent=2, ensure_ascii=False))
        write_chart(summary, self.out / "report.png")
        for rank in range(len(self.tasks)):  # the filtered copies are no longer needed; the reports stay
            for suffix in ("jsonl", "signatures.u32", "meta.npz"):
                self._filtered(rank, suffix).unlink(missing_ok=True)
        return summary

    # datatrove calls pipeline steps as step(data, rank, world_size)
    def filter_step(self, data, rank: int, world_size: int):
        self.filter_task(rank)

    def dedup_step(self, data, rank: int, world_size: int):
        self.dedup()

    def finish_step(self, data, rank: int, world_size: int):
        self.finish_task(rank)


def prepare(config: PrepareConfig, workers: int | None = None, executor: str = "local",
            progress: bool = False) -> dict:
    """Run (or resume) the pipeline; returns the report (also in out/report.json and out/report.png)."""
    if executor not in EXECUTORS:
        raise StarCoderError(f"executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    workers = workers or os.cpu_count() or 1
    pipeline = Pipeline(config)
    if (config.out / "report.json").exists():
        return json.loads((config.out / "report.json").read_text())  # finished earlier with these settings
    if executor == "datatrove":
        _run_datatrove(pipeline, workers)
    else:
        _run_local(pipeline, workers, progress)
    return pipeline.finish_report()


def _run_local(pipeline: Pipeline, workers: int, progress: bool) -> None:
    """The three steps on this machine: the per-task ones on a pool of worker processes (one pool for both, so
    the workers start once), or in this process for one worker."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    count = len(pipeline.tasks)
    pool = None
    if workers > 1 and count > 1:
        pool = ProcessPoolExecutor(min(workers, count), mp_context=multiprocessing.get_context("forkserver"))
    try:
        for name, task in (("filter", pipeline.filter_task), ("PII and shards", pipeline.finish_task)):
            with tqdm(total=count, desc=name, unit="task", disable=not progress) as bar:
                for _ in pool.map(task, range(count)) if pool else map(task, range(count)):
                    bar.update()
            if name == "filter":
                pipeline.dedup()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _run_datatrove(pipeline: Pipeline, workers: int) -> None:
    try:
        from datatrove.executor import LocalPipelineExecutor
    except ImportError:
        raise StarCoderError("the datatrove executor needs datatrove: pip install datatrove") from None
    logs, count = pipeline.work / "datatrove", len(pipeline.tasks)
    if not count:  # nothing to read: only the (empty) dedup step's report is needed
        pipeline.dedup()
        return
    filtering = LocalPipelineExecutor([pipeline.filter_step], tasks=count, workers=min(workers, count),
                                      logging_dir=str(logs / "filter"))
    dedup = LocalPipelineExecutor([pipeline.dedup_step], tasks=1, workers=1, logging_dir=str(logs / "dedup"),
                                  depends=filtering)
    finishing = LocalPipelineExecutor([pipeline.finish_step], tasks=count, workers=min(workers, count),
                                      logging_dir=str(logs / "finish"), depends=dedup)
    finishing.run()
    if not (pipeline.work / "finish").exists() or any(
            not (pipeline.work / "finish" / f"{rank:05d}.report.json").exists() for rank in range(count)):
        raise StarCoderError(f"datatrove finished with failed tasks; see the logs in {logs}")
