"""The report of a `starcoder prepare` run: documents and bytes into and out of each stage, why documents were
removed, what PII was redacted, with examples; as JSON and as a PNG chart.

Each task keeps its own report; the run's report merges them in task order, so it does not depend on how many
workers ran the tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import pyplot, save_figure

STAGES = ("read", "language", "license", "opt_out", "quality", "generated", "decontaminate", "exact_dedup",
          "near_dedup", "pii")
EXAMPLES_PER_REASON = 2


def _stage() -> dict:
    return {"documents_in": 0, "bytes_in": 0, "documents_out": 0, "bytes_out": 0, "removed": {}, "examples": []}


class Report:
    def __init__(self, stages: dict | None = None):
        self.stages = stages or {stage: _stage() for stage in STAGES}

    def enter(self, stage: str, size: int) -> None:
        entry = self.stages[stage]
        entry["documents_in"] += 1
        entry["bytes_in"] += size
        entry["documents_out"] += 1
        entry["bytes_out"] += size

    def remove(self, stage: str, reason: str, origin: str, size: int, detail: str | None = None) -> None:
        entry = self.stages[stage]
        entry["documents_out"] -= 1
        entry["bytes_out"] -= size
        entry["removed"][reason] = entry["removed"].get(reason, 0) + 1
        self._example(entry, {"reason": reason, "document": origin, **({"detail": detail} if detail else {})})

    def redact(self, origin: str, size_before: int, size_after: int, findings, redacted_lines: list[str]) -> None:
        """A document left the PII stage with findings replaced (size_after its new size)."""
        entry = self.stages["pii"]
        entry["bytes_out"] += size_after - size_before
        entry["redacted_documents"] = entry.get("redacted_documents", 0) + 1
        counts = entry.setdefault("findings", {})
        by_detector = entry.setdefault("findings_by_detector", {})  # "model EMAIL", "regex KEY", ...
        for finding, line in zip(findings, redacted_lines, strict=True):
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
            found_by = f"{finding.detector} {finding.kind}"
            by_detector[found_by] = by_detector.get(found_by, 0) + 1
            self._example(entry, {"reason": finding.kind, "document": origin, "redacted": line})

    @staticmethod
    def _example(entry: dict, example: dict) -> None:
        if sum(e["reason"] == example["reason"] for e in entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(example)

    def merge(self, other: Report) -> None:
        for stage, theirs in other.stages.items():
            ours = self.stages[stage]
            for key, value in theirs.items():
                if key == "examples":
                    for example in value:
                        self._example(ours, example)
                elif isinstance(value, dict):
                    for reason, count in value.items():
                        ours.setdefault(key, {})[reason] = ours.setdefault(key, {}).get(reason, 0) + count
                else:
                    ours[key] = ours.get(key, 0) + value

    def to_json(self) -> str:
        return json.dumps({"stages": self.stages})

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls(json.loads(text)["stages"])

    def summary(self) -> dict:
        last = self.stages[STAGES[-1]]
        return {"documents_out": last["documents_out"], "bytes_out": last["bytes_out"], "stages": self.stages}


def write_chart(summary: dict, path: Path) -> None:
    """Documents and megabytes left after each stage, and what each stage removed."""
    plt = pyplot("data")
    if plt is None:
        return
    stages = summary["stages"]
    names = list(stages)
    fig, (documents, megabytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, unit, scale, label in ((documents, "documents", 1, "documents"), (megabytes, "bytes", 1e6, "MB")):
        kept = [stages[s][f"{unit}_out"] / scale for s in names]
        removed = [(stages[s][f"{unit}_in"] - stages[s][f"{unit}_out"]) / scale for s in names]
        axis.barh(names, kept, color="#4c78a8", label="left")
        axis.barh(names, removed, left=kept, color="#e45756", label="removed or shrunk")
        axis.invert_yaxis()
        axis.set_xlabel(label)
        axis.set_title(f"{label} after each stage")
    handles, labels = documents.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower left", ncol=2, frameon=False)
    redacted = stages["pii"].get("findings", {})
    if redacted:
        fig.text(0.99, 0.02, "PII redacted: " + ", ".join(f"{k.lower()} {v:,}" for k, v in redacted.items()),
                 ha="right", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=110)
