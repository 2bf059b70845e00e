"""Full-text search over the training data (StarCoder Search): which files does this code come from?

The index is SQLite's FTS5 with its trigram tokenizer, one table of files (content, and repository, path, license
and language beside it), in shards of about `shard_bytes` of content each so that it grows past one file.
SQLite because it is embedded in Python itself (no server, no extra package), its trigram tokenizer does the
character-trigram matching code needs (identifiers are not words), and BM25 ranking is built in; tantivy would
be faster on very large corpora but is one more native dependency to build and ship.

A query takes the snippet's longest distinct whitespace-separated tokens (the distinctive ones), asks each shard
for the best files by BM25 over any of them, then re-ranks those candidates by how much of the snippet they
contain line for line (lines compared with their whitespace collapsed, so re-indented code still matches) and
returns the lines that match; when some files share lines with the snippet, files that share only tokens are
left out.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StarCoderError

FORMAT = "starcoder-search-1"
QUERY_TOKENS = 24
CANDIDATES = 20
MIN_LINE = 8  # shorter lines (a bracket, `else:`) say nothing about where code came from


@dataclass
class Match:
    repository: str | None
    path: str | None
    license: str | None
    language: str | None
    bm25: float
    matched_characters: int = 0
    lines: list[dict] = field(default_factory=list)  # {"query_line", "file_line", "text"}


class ShardWriter:
    """Files into one shard; `close()` finishes it."""

    def __init__(self, path: Path):
        self.path, self.bytes = path, 0
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        self.db.execute("CREATE VIRTUAL TABLE files USING fts5(content, repository UNINDEXED, path UNINDEXED, "
                        "license UNINDEXED, language UNINDEXED, tokenize='trigram')")

    def add(self, content: str, repository: str | None, path: str | None, license: str | None,
            language: str | None) -> None:
        self.db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", (content, repository, path, license, language))
        self.bytes += len(content.encode("utf-8", "surrogatepass"))

    def close(self) -> None:
        self.db.execute("INSERT INTO files(files) VALUES ('optimize')")  # one b-tree segment: faster queries
        self.db.commit()
        self.db.close()


def open_shard(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StarCoderError(f"{path}: search shard missing")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    except sqlite3.DatabaseError as e:
        raise StarCoderError(f"{path}: not a search shard ({e})") from None
    if not row or row[0] != FORMAT:
        raise StarCoderError(f"{path}: built with another format ({row[0] if row else 'none'}; this version reads "
                             f"{FORMAT})")
    return db


def _collapse(line: str) -> str:
    return " ".join(line.split())


def query_tokens(snippet: str, count: int = QUERY_TOKENS) -> list[str]:
    """The snippet's longest distinct tokens (at least 3 characters: trigrams), as FTS5 phrases."""
    tokens = sorted({t for t in snippet.split() if len(t) >= 3}, key=lambda t: (-len(t), t))[:count]
    return ['"' + t.replace('"', '""') + '"' for t in tokens]


def search(shards: list[sqlite3.Connection], snippet: str, limit: int = 5) -> list[Match]:
    phrases = query_tokens(snippet)
    if not phrases:
        return []
    candidates: list[tuple[float, sqlite3.Connection, int]] = []
    for db in shards:
        try:
            rows = db.execute("SELECT rowid, bm25(files) FROM files WHERE files MATCH ? ORDER BY bm25(files) "
                              "LIMIT ?", (" OR ".join(phrases), CANDIDATES)).fetchall()
        except sqlite3.DatabaseError as e:
            raise StarCoderError(f"the search index is damaged ({e})") from None
        candidates += [(score, db, rowid) for rowid, score in rows]
    candidates.sort(key=lambda c: c[0])  # SQLite's bm25() is lower for better matches
    query_lines = [(n, _collapse(line)) for n, line in enumerate(snippet.splitlines(), 1)
                   if len(_collapse(line)) >= MIN_LINE]
    matches = []
    for score, db, rowid in candidates[:CANDIDATES]:
        content, repository, path, license, language = db.execute(
            "SELECT content, repository, path, license, language FROM files WHERE rowid = ?", (rowid,)).fetchone()
        match = Match(repository, path, license, language, round(-score, 3))
        file_lines: dict[str, int] = {}
        for number, line in enumerate(content.splitlines(), 1):
            file_lines.setdefault(_collapse(line), number)
        for query_line, text in query_lines:
            if text in file_lines:
                match.lines.append({"query_line": query_line, "file_line": file_lines[text], "text": text})
                match.matched_characters += len(text)
        matches.append(match)
    # Only files that share lines with the snippet are sources; sharing a few tokens is not.
    matches = sorted((m for m in matches if m.matched_characters), key=lambda m: (-m.matched_characters, -m.bm25))
    return matches[:limit]
