"""Measuring the PII stage: labelled snippets (PII marked inline as ⟦KIND|value⟧) and precision and recall per
kind. tests/data/pii_labelled.txt and pii_heldout.txt are the project's sets."""

from __future__ import annotations

import re
from pathlib import Path

from .pii import KINDS, Finding, find_pii

_LABEL = re.compile(r"⟦([A-Z_]+)\|(.*?)⟧", re.DOTALL)


def read_labelled(path: Path) -> list[tuple[str, str, list[Finding]]]:
    """(title, text, labels) per snippet of a labelled set: "### title" starts a snippet, ⟦KIND|value⟧ marks PII."""
    snippets = []
    for block in re.split(r"^### ", path.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]:
        title, _, marked = block.partition("\n")
        text, labels, position = [], [], 0
        length = 0
        for match in _LABEL.finditer(marked):
            text.append(marked[position:match.start()])
            length += match.start() - position
            kind, value = match.groups()
            if kind not in KINDS:
                raise ValueError(f"{path}: snippet {title!r}: unknown kind {kind}")
            labels.append(Finding(kind, length, length + len(value), value))
            text.append(value)
            length += len(value)
            position = match.end()
        text.append(marked[position:])
        snippets.append((title, "".join(text), labels))
    return snippets


def score(snippets, find=find_pii) -> dict[str, dict]:
    """Precision and recall per kind: a finding is right when it overlaps a label of its kind."""
    counts = {kind: {"true_positives": 0, "false_positives": 0, "false_negatives": 0} for kind in KINDS}
    mistakes = []
    for title, text, labels in snippets:
        found = find(text)
        for finding in found:
            hit = any(label.kind == finding.kind and label.start < finding.end and finding.start < label.end
                      for label in labels)
            counts[finding.kind]["true_positives" if hit else "false_positives"] += 1
            if not hit:
                mistakes.append((title, "false positive", finding))
        for label in labels:
            if not any(f.kind == label.kind and f.start < label.end and label.start < f.end for f in found):
                counts[label.kind]["false_negatives"] += 1
                mistakes.append((title, "missed", label))
    for entry in counts.values():
        tp, fp, fn = entry["true_positives"], entry["false_positives"], entry["false_negatives"]
        entry["precision"] = tp / (tp + fp) if tp + fp else 1.0
        entry["recall"] = tp / (tp + fn) if tp + fn else 1.0
    return {"kinds": counts, "mistakes": mistakes}
