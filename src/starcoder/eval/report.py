"""What an evaluation leaves for people: summary.json, a Markdown table, and a PNG chart of pass@k per task."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import StarCoderError
from ..files import pyplot, save_figure, write_text_atomic

log = logging.getLogger(__name__)


def _metrics(summary: dict[str, Any]) -> list[str]:
    names = {m for result in summary["tasks"].values() for m in result if m.startswith("pass@")}
    columns = sorted(names, key=lambda m: int(m.split("@")[1]))
    if any("exact_match" in r for r in summary["tasks"].values()):
        columns.append("exact_match")
    return columns


def _rows(task: str, result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A task's result and those of its groups (DS-1000's libraries), each with its row label."""
    return [(task, result)] + [(f"{task} · {group}", r) for group, r in result.get("groups", {}).items()]


def format_table(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per task, one column per metric."""
    columns = _metrics(summary)
    lines = ["| task | problems | samples | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    notes = []
    for name, result in summary["tasks"].items():
        for label, row in _rows(name, result):
            cells = [f"{row[c]:.4f}" if c in row else "" for c in columns]
            samples = row.get("samples", "")
            lines.append(f"| {label} | {row['problems']} | {samples} | " + " | ".join(cells) + " |")
        if result.get("skipped"):
            notes.append(f"{name}: skipped, library not installed: "
                         + ", ".join(f"{group} ({count})" for group, count in sorted(result["skipped"].items())))
    return "\n".join(lines + ([""] + notes if notes else []))


def write_reports(out: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", format_table(summary))
    plot(summary, out / "pass_at_k.png")


def _title(summary: dict[str, Any]) -> str:
    config = summary["config"]
    if config.get("generations"):
        return f"saved generations ({Path(config['generations']).name})"
    endpoint = config.get("endpoint")
    if endpoint:
        return endpoint.get("model") or endpoint["endpoint"]
    return config.get("model") or "embedded default model"


# ---------------------------------------------------------------------------------------------------- compare
def read_summaries(directories: list[Path]) -> dict[str, dict[str, Any]]:
    """summary.json of each evaluation directory, by model name (the directory's name where names repeat)."""
    summaries = {}
    for directory in directories:
        path = directory / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StarCoderError(f"{path}: cannot read an evaluation summary ({e})") from None
        if not (isinstance(summary, dict) and isinstance(summary.get("tasks"), dict) and "config" in summary):
            raise StarCoderError(f"{path}: not an evaluation summary (the summary.json starcoder evaluate writes)")
        summaries[str(directory)] = summary
    titles = [_title(s) for s in summaries.values()]
    unique = len(set(titles)) == len(titles)
    return {(title if unique else Path(d).name): s for (d, s), title in zip(summaries.items(), titles, strict=True)}


def compare_table(summaries: dict[str, dict[str, Any]], metric: str = "pass@1") -> str:
    """Models side by side, as on a model card: a row per task (and per group of a task), a column per model."""
    rows: dict[str, dict[str, float]] = {}
    for model, summary in summaries.items():
        for task, result in summary["tasks"].items():
            for label, row in _rows(task, result):
                if metric in row:
                    rows.setdefault(label, {})[model] = row[metric]
    models = list(summaries)
    lines = [f"| {metric} | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.4f}" if m in values else "-" for m in models) + " |")
    return "\n".join(lines)


def plot_comparison(summaries: dict[str, dict[str, Any]], path: Path, metric: str = "pass@1") -> None:
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["tasks"]))
    _bar_chart(path, tasks, {model: [s["tasks"].get(t, {}).get(metric, 0.0) for t in tasks]
                             for model, s in summaries.items()}, metric)


def plot(summary: dict[str, Any], path: Path) -> None:
    tasks = list(summary["tasks"])
    config = summary["config"]
    settings = "" if config.get("generations") else f": n={config.get('n_samples')}, T={config.get('temperature')}"
    _bar_chart(path, tasks, {metric: [summary["tasks"][t].get(metric, 0.0) for t in tasks]
                             for metric in _metrics(summary) if metric.startswith("pass@")},
               "pass@k", _title(summary) + settings)


def _bar_chart(path: Path, tasks: list[str], series: dict[str, list[float]], ylabel: str, title: str = "") -> None:
    """Grouped bars: one group per task, one bar per series (a metric, or a model), values labelled."""
    plt = pyplot("eval")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) + 2), 4), dpi=120)
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar_label(ax.bar(xs, values, width, label=label), fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
