"""What an evaluation leaves for people: summary.json, a Markdown table, and a PNG chart of pass@k per task."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..files import pyplot, save_figure, write_text_atomic

log = logging.getLogger(__name__)


def _metrics(summary: dict[str, Any]) -> list[str]:
    names = {m for result in summary["tasks"].values() for m in result if m.startswith("pass@")}
    columns = sorted(names, key=lambda m: int(m.split("@")[1]))
    if any("exact_match" in r for r in summary["tasks"].values()):
        columns.append("exact_match")
    return columns


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per task, one column per metric."""
    columns = _metrics(summary)
    lines = ["| task | problems | samples | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for name, result in summary["tasks"].items():
        cells = [f"{result[c]:.4f}" if c in result else "" for c in columns]
        lines.append(f"| {name} | {result['problems']} | {result['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(out: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", format_table(summary))
    plot(summary, out / "pass_at_k.png")


def plot(summary: dict[str, Any], path: Path) -> None:
    plt = pyplot("eval")
    if plt is None:
        return
    columns = [c for c in _metrics(summary) if c.startswith("pass@")]
    tasks = list(summary["tasks"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) + 2), 4), dpi=120)
    width = 0.8 / max(len(columns), 1)
    for i, metric in enumerate(columns):
        xs = [t + (i - (len(columns) - 1) / 2) * width for t in range(len(tasks))]
        values = [summary["tasks"][t].get(metric, 0.0) for t in tasks]
        bars = ax.bar(xs, values, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pass@k")
    config = summary["config"]
    model = (f"saved generations ({Path(config['generations']).name})" if config.get("generations")
             else config.get("model") or "embedded default model")
    settings = "" if config.get("generations") else f": n={config.get('n_samples')}, T={config.get('temperature')}"
    ax.set_title(model + settings, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
