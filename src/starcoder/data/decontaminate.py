"""Decontamination: drop training files that contain evaluation problems.

As StarCoder's pipeline: a file goes when it contains, as a case-insensitive exact substring, a HumanEval
docstring or canonical solution, an MBPP problem text or solution, or a MultiPL-E prompt. All the strings are
searched at once with an Aho-Corasick automaton (pyahocorasick), in one pass over each file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import StarCoderError

MIN_LENGTH = 40  # shorter benchmark strings ("return a + b") would match ordinary code


def _docstring(prompt: str) -> str | None:
    for quote in ('"""', "'''"):
        if prompt.count(quote) >= 2:
            return prompt.split(quote)[-2].strip()
    return None


def benchmark_strings(mbpp: Path | None = None, multiple: Iterable[Path] = ()) -> dict[str, str]:
    """Normalised (lower-cased, stripped) benchmark strings -> where each comes from."""
    from ..eval.tasks import humaneval_file, read_rows

    found: dict[str, str] = {}

    def add(text: str | None, source: str) -> None:
        if text and len(text.strip()) >= MIN_LENGTH:
            found.setdefault(text.strip().lower(), source)

    for _, row in read_rows(humaneval_file()):
        add(_docstring(row["prompt"]), f"{row['task_id']} docstring")
        add(row["canonical_solution"], f"{row['task_id']} solution")
    if mbpp is not None:
        for _, row in read_rows(mbpp):
            add(row.get("text"), f"mbpp/{row.get('task_id')} text")
            add(row.get("code"), f"mbpp/{row.get('task_id')} solution")
    for path in multiple:
        for _, row in read_rows(path):
            add(row.get("prompt"), f"{row.get('name')} prompt")
    if not found:
        raise StarCoderError("no benchmark strings to decontaminate against")
    return found


class Decontaminator:
    """Finds benchmark strings in files (case-insensitive)."""

    def __init__(self, strings: dict[str, str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for text, source in strings.items():
            self.automaton.add_word(text, source)
        self.automaton.make_automaton()

    def match(self, content: str) -> str | None:
        """The benchmark a file contains (its first hit), or None."""
        for _, source in self.automaton.iter(content.lower()):
            return source
        return None
