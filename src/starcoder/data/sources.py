"""What `starcoder prepare` reads: source trees, JSONL and Parquet rows in The Stack's schema, cut into tasks.

A plan cuts the inputs into units of about `task_bytes` each: runs of a tree's files, line-aligned byte ranges of
a JSONL file, runs of a Parquet file's row groups. Units are packed into tasks in input order, so the plan (and
with it every task's output) depends on the inputs and the task size only, never on how many workers run it.
Reading streams one document at a time; what cannot be read is yielded as a `Skipped` with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import StarCoderError
from ..languages import language_of
from ..train.data import row_fields
from .trees import tree_files

MAX_FILE_BYTES = 1024 * 1024


@dataclass
class Document:
    content: str
    path: str
    repo: str | None
    language: str | None
    licenses: list[str]
    stars: int | None = None
    origin: str = ""  # where it came from, for the report: repo/path or file:line

    def row(self) -> dict:
        return {"content": self.content, "repository_name": self.repo, "path": self.path,
                "language": self.language, "licenses": self.licenses, "stars": self.stars}


@dataclass
class Skipped:
    reason: str
    origin: str
    size: int


@dataclass
class Unit:
    """One piece of input: some files of a repository in a tree, a byte range of a JSONL file, row groups of a
    Parquet file."""
    kind: str  # "tree" | "jsonl" | "parquet"
    path: str  # tree: the repository's folder
    size: int
    files: list[str] = field(default_factory=list)  # tree: paths relative to the repository's folder
    licenses: list[str] = field(default_factory=list)  # tree: from the nearest license files
    start: int = 0  # jsonl: first byte, parquet: first row group
    end: int = 0  # jsonl: end byte, parquet: end row group
    first_line: int = 1  # jsonl: the line number at `start`


def plan(inputs: list[Path], task_bytes: int) -> list[list[Unit]]:
    """The inputs cut into tasks of about task_bytes each."""
    units: list[Unit] = []
    for path in inputs:
        if not path.exists():
            raise StarCoderError(f"{path}: no such file or directory")
        if path.is_dir():
            units += _tree_units(path, task_bytes)
        elif path.suffix == ".parquet":
            units += _parquet_units(path, task_bytes)
        elif path.suffix in (".jsonl", ".json"):
            units += _jsonl_units(path, task_bytes)
        else:
            raise StarCoderError(f"{path}: not a directory, .jsonl or .parquet file")
    tasks: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not tasks or (size > 0 and size + unit.size > task_bytes):
            tasks.append([])
            size = 0
        tasks[-1].append(unit)
        size += unit.size
    return tasks


def plan_json(tasks: list[list[Unit]]) -> list[list[dict]]:
    return [[asdict(unit) for unit in task] for task in tasks]


def plan_from_json(data: list[list[dict]]) -> list[list[Unit]]:
    return [[Unit(**unit) for unit in task] for task in data]


def _tree_units(root: Path, task_bytes: int) -> list[Unit]:
    """Runs of files of one repository under the same licenses (see trees.py)."""
    units: list[Unit] = []
    for file in tree_files(root):
        size = file.path.stat().st_size
        last = units[-1] if units else None
        if (last is None or last.path != str(file.repo) or last.licenses != list(file.licenses)
                or last.size + size > task_bytes and last.files):
            units.append(Unit("tree", str(file.repo), 0, licenses=list(file.licenses)))
        units[-1].files.append(file.relative)
        units[-1].size += size
    return units


def _jsonl_units(path: Path, task_bytes: int) -> list[Unit]:
    """Byte ranges that start at line starts, with the line number of each start."""
    units, start, first_line, position = [], 0, 1, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            position += len(raw)
            if position - start >= task_bytes:
                units.append(Unit("jsonl", str(path), position - start, start=start, end=position,
                                  first_line=first_line))
                start, first_line = position, number + 1
    if position > start or not units:
        units.append(Unit("jsonl", str(path), position - start, start=start, end=position, first_line=first_line))
    return units


def _parquet_units(path: Path, task_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for damaged files
        raise StarCoderError(f"{path}: not a readable Parquet file ({e})") from None
    units: list[Unit] = []
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).total_byte_size
        if not units or units[-1].size + size > task_bytes:
            units.append(Unit("parquet", str(path), 0, start=group, end=group))
        units[-1].end = group + 1
        units[-1].size += size
    return units


def read(unit: Unit) -> Iterator[Document | Skipped]:
    if unit.kind == "tree":
        yield from _read_tree(unit)
    elif unit.kind == "jsonl":
        yield from _read_jsonl(unit)
    else:
        yield from _read_parquet(unit)


def _read_tree(unit: Unit) -> Iterator[Document | Skipped]:
    root = Path(unit.path)
    for relative in unit.files:
        path = root / relative
        origin = f"{root.name}/{relative}"
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                yield Skipped("too_large", origin, size)
                continue
            raw = path.read_bytes()
        except OSError:
            yield Skipped("unreadable", origin, 0)
            continue
        if b"\0" in raw:
            yield Skipped("binary", origin, len(raw))
            continue
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Skipped("bad_encoding", origin, len(raw))
            continue
        yield Document(content, relative, root.name, language_of(relative), list(unit.licenses), origin=origin)


def _read_jsonl(unit: Unit) -> Iterator[Document | Skipped]:
    name = Path(unit.path).name
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        position, number = unit.start, unit.first_line
        while position < unit.end:
            raw = f.readline()
            if not raw:
                break
            position += len(raw)
            origin = f"{name}:{number}"
            number += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield Skipped("malformed_row", origin, len(raw))
                continue
            yield _row_document(row, origin, len(raw))


def _read_parquet(unit: Unit) -> Iterator[Document | Skipped]:
    import pyarrow.parquet as pq

    name = Path(unit.path).name
    parquet = pq.ParquetFile(unit.path)
    number = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
    for group in range(unit.start, unit.end):
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group]):
            for row in batch.to_pylist():
                number += 1
                content = row.get("content")
                size = len(content.encode("utf-8", errors="replace")) if isinstance(content, str) else 0
                yield _row_document(row, f"{name}:row {number}", size)


def _row_document(row, origin: str, size: int) -> Document | Skipped:
    """A document from a row in The Stack's schema (its field names, or BigCode's max_stars_* ones)."""
    if not isinstance(row, dict) or not isinstance(row.get("content"), str):
        return Skipped("malformed_row", origin, size)
    content = row["content"]
    if size > MAX_FILE_BYTES:
        return Skipped("too_large", origin, size)
    if "\0" in content:
        return Skipped("binary", origin, size)
    fields = row_fields(row)
    path, repo, language = fields["path"] or origin, fields["repo"], fields["language"]
    return Document(content, path, repo, language.lower() if isinstance(language, str) else None,
                    fields["licenses"], fields["stars"], origin=f"{repo}/{path}" if repo else origin)
