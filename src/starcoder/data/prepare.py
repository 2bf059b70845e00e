"""`starcoder prepare`: source trees or The Stack-style rows in, filtered and deduplicated JSONL shards out.

Stages, in order: reading (unreadable, binary, badly encoded and huge files are skipped with a reason), language
(by file extension), license (permissive SPDX ids; a tree's license comes from its LICENSE / COPYING file),
opt-out, quality, generated / minified, exact dedup, decontamination, then near dedup over every file that is left
(the clustering is global). The report counts documents and bytes into and out of each stage, with examples of
what each removed. The shards are what `starcoder tokenize` reads.

Single process for now; PII redaction and the distributed run are the next steps of this pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import write_text_atomic
from ..errors import StarCoderError
from ..train.data import language_of
from .dedup import content_hash, near_duplicates
from .filters import (
    PERMISSIVE_LICENSES,
    classify_license,
    generated_reason,
    license_reason,
    opt_out_reason,
    quality_reason,
)

MAX_FILE_BYTES = 1024 * 1024
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt", "LICENSE-MIT")
STAGES = ("read", "language", "license", "opt_out", "quality", "generated", "exact_dedup", "decontaminate",
          "near_dedup")


@dataclass
class Document:
    content: str
    path: str
    repo: str | None
    language: str | None
    licenses: list[str]
    stars: int | None = None


@dataclass
class PrepareConfig:
    inputs: list[Path]
    out: Path
    languages: set[str] | None = None
    licenses: frozenset[str] = PERMISSIVE_LICENSES
    opt_out: frozenset[str] = frozenset()
    decontaminate: bool = True
    mbpp: Path | None = None
    shard_documents: int = 10_000


@dataclass
class Report:
    stages: dict[str, dict] = field(default_factory=lambda: {
        s: {"documents_in": 0, "bytes_in": 0, "removed": {}, "examples": []} for s in STAGES})

    def enter(self, stage: str, doc_bytes: int) -> None:
        self.stages[stage]["documents_in"] += 1
        self.stages[stage]["bytes_in"] += doc_bytes

    def remove(self, stage: str, reason: str, example: str) -> None:
        entry = self.stages[stage]
        entry["removed"][reason] = entry["removed"].get(reason, 0) + 1
        if len(entry["examples"]) < 3:
            entry["examples"].append({"reason": reason, "document": example})

    def as_dict(self) -> dict:
        out = {}
        for stage, entry in self.stages.items():
            removed = sum(entry["removed"].values())
            out[stage] = {**entry, "documents_out": entry["documents_in"] - removed}
        return out


def read_inputs(paths: list[Path], report: Report) -> Iterator[Document]:
    """Documents from directories (one source tree each) and JSONL files in The Stack's schema; what cannot be
    read is counted in the report with its reason, never dropped silently."""
    for root in paths:
        if not root.exists():
            raise StarCoderError(f"{root}: no such file or directory")
        if root.is_file():
            yield from _read_rows(root, report)
        else:
            yield from _read_tree(root, report)


def _read_tree(root: Path, report: Report) -> Iterator[Document]:
    licenses = []
    for name in LICENSE_FILES:
        if (root / name).is_file():
            spdx = classify_license((root / name).read_text(encoding="utf-8", errors="replace"))
            if spdx:
                licenses.append(spdx)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = str(path.relative_to(root))
        if path.name in LICENSE_FILES:
            continue
        size = path.stat().st_size
        report.enter("read", size)
        if size > MAX_FILE_BYTES:
            report.remove("read", "too_large", relative)
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            report.remove("read", "unreadable", relative)
            continue
        if b"\0" in raw:
            report.remove("read", "binary", relative)
            continue
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.remove("read", "bad_encoding", relative)
            continue
        yield Document(content, relative, root.name, language_of(relative), list(licenses))


def _read_rows(path: Path, report: Report) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.enter("read", len(line))
            try:
                row = json.loads(line)
                content = row["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not a string")
            except (json.JSONDecodeError, KeyError, TypeError):
                report.remove("read", "malformed_row", f"{path}:{number}")
                continue
            if len(content.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
                report.remove("read", "too_large", f"{path}:{number}")
                continue
            name = row.get("path") or row.get("max_stars_repo_path") or f"{path.name}:{number}"
            licenses = row.get("licenses") or row.get("max_stars_repo_licenses") or (
                [row["license"]] if row.get("license") else [])
            yield Document(content, name, row.get("repository_name") or row.get("max_stars_repo_name")
                           or row.get("repo"), row.get("language") or row.get("lang") or language_of(name),
                           list(licenses), row.get("stars") or row.get("max_stars_count"))


def _reason(stage: str, doc: Document, digest: str, config: PrepareConfig, seen: set[str],
            decontaminator) -> str | None:
    """Why a per-document stage removes doc, or None."""
    if stage == "language":
        if not doc.language:
            return "unknown_language"
        return None if not config.languages or doc.language in config.languages else "language_not_selected"
    if stage == "license":
        return license_reason(doc.licenses, config.licenses)
    if stage == "opt_out":
        return opt_out_reason(doc.repo, config.opt_out)
    if stage == "quality":
        return quality_reason(doc.content)
    if stage == "generated":
        return generated_reason(doc.content, doc.path)
    if stage == "exact_dedup":
        return "duplicate" if digest in seen else None
    hit = decontaminator.match(doc.content) if decontaminator else None
    return f"contains {hit}" if hit else None


def prepare(config: PrepareConfig) -> dict:
    """Run the pipeline; returns the report (also written to out/report.json)."""
    if config.out.exists() and any(config.out.iterdir()):
        raise StarCoderError(f"{config.out} exists and is not empty")
    decontaminator = None
    if config.decontaminate:
        from .decontaminate import Decontaminator, benchmark_strings

        decontaminator = Decontaminator(benchmark_strings(mbpp=config.mbpp))
    report = Report()
    seen: set[str] = set()
    kept: list[tuple[Document, int]] = []  # with its size in bytes
    for doc in read_inputs(config.inputs, report):
        size = len(doc.content.encode("utf-8", errors="replace"))
        digest = content_hash(doc.content)
        for stage in STAGES[1:-1]:
            report.enter(stage, size)
            reason = _reason(stage, doc, digest, config, seen, decontaminator)
            if reason:
                example = f"{doc.repo}/{doc.path}"
                if stage == "decontaminate":  # "contains HumanEval/2 solution": counted as "contains"
                    reason, example = "contains", f"{example} ({reason})"
                report.remove(stage, reason, example)
                break
        else:
            seen.add(digest)
            kept.append((doc, size))
    for _, size in kept:
        report.enter("near_dedup", size)
    gone = near_duplicates([d.content for d, _ in kept], [d.stars for d, _ in kept]) if kept else []
    final = []
    for (doc, size), drop in zip(kept, gone, strict=True):
        if drop:
            report.remove("near_dedup", "near_duplicate", f"{doc.repo}/{doc.path}")
        else:
            final.append((doc, size))
    config.out.mkdir(parents=True, exist_ok=True)
    for index in range(0, len(final), config.shard_documents):
        shard = final[index : index + config.shard_documents]
        rows = [json.dumps({"content": d.content, "repository_name": d.repo, "path": d.path, "language": d.language,
                            "licenses": d.licenses, "stars": d.stars}, ensure_ascii=False) for d, _ in shard]
        write_text_atomic(config.out / f"shard-{index // config.shard_documents:05d}.jsonl", "\n".join(rows))
    result = {"documents_out": len(final), "bytes_out": sum(size for _, size in final),
              "stages": report.as_dict()}
    write_text_atomic(config.out / "report.json", json.dumps(result, indent=2))
    return result
