"""Training data: a corpus read once into flat uint16 token shards, packed into fixed-length samples.

    starcoder tokenize --input DIR_OR_JSONL... --tokenizer MODEL_DIR --out DATA_DIR

writes DATA_DIR/{train,val,test}/ with tokens-00000.bin ... (uint16, documents separated by <|endoftext|>) and
index.json, plus DATA_DIR/manifest.jsonl (one line per document: path, repository, license, language, split,
tokens). Samples are windows of seq_len + 1 tokens at multiples of seq_len; the FIM transform is applied to each
sample on the fly with a random generator seeded by (seed, sample index), so any process, resumed or not, sees
the same sample for the same index.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.trees import TreeFile, tree_files
from ..errors import StarCoderError
from ..files import atomic_dir
from ..fim import FimIds, PromptFormat, RepoFile, document_text, fim_context, repository_text
from ..languages import language_of
from ..tokenizer import Tokenizer

SPLITS = ("train", "val", "test")
SHARD_TOKENS = 256 * 1024 * 1024  # 512 MB of uint16 per shard


@dataclass
class Document:
    content: str
    path: str | None = None
    repo: str | None = None
    language: str | None = None
    license: str | None = None
    stars: int | None = None


def read_corpus(paths: Iterable[str | os.PathLike], languages: set[str] | None = None,
                exclude: tuple[str, ...] = ()) -> Iterator[Document]:
    """Documents from directories of source files (read as repositories: see data/trees.py), from JSONL
    and Parquet files (fields: content, and where known repo / repository_name, path, language, license /
    licenses, stars), and from the output directories of `starcoder prepare` (their shards, in order).
    Only files of a known language (or of `languages`) are read from directories, in a stable order."""
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise StarCoderError(f"{root}: no such file or directory")
        if root.is_file() and root.name.endswith((".jsonl", ".parquet", ".jsonl.xz", ".jsonl.gz")):
            yield from _read_rows(root)
            continue
        if root.is_dir() and (root / "report.json").is_file() and any(root.glob("shard-*")):
            for shard in sorted(root.glob("shard-*.jsonl")) + sorted(root.glob("shard-*.parquet")):
                yield from _read_rows(shard)
            continue
        if root.is_file():
            files = [TreeFile(root, root.parent, ())]
        else:
            files = [f for f in tree_files(root) if not set(f.path.relative_to(root).parts[:-1]) & set(exclude)]
        for file in files:
            language = language_of(file.path.name)
            if language is None or (languages and language not in languages):
                continue
            try:
                content = file.path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield Document(content, file.relative, file.repo.name if root.is_dir() else None, language,
                           ",".join(file.licenses) or None)


def _read_rows(path: Path) -> Iterator[Document]:
    for where, row in _rows(path):
        try:
            content = row["content"]
        except (KeyError, TypeError):
            raise StarCoderError(f"{where}: not a JSON object with a 'content' field") from None
        if not isinstance(content, str):
            raise StarCoderError(f"{where}: field 'content' must be a string")
        fields = row_fields(row)
        yield Document(content, fields["path"], fields["repo"], fields["language"],
                       ",".join(fields["licenses"]) or None, fields["stars"])


def row_fields(row: dict) -> dict:
    """path, repo, licenses (a list), language and stars of a row in The Stack's schema, under its own field names
    or BigCode's `max_stars_*` ones (language from the path when the row has none; None for what is missing)."""
    path = row.get("path") or row.get("max_stars_repo_path")
    licenses = row.get("licenses") or row.get("max_stars_repo_licenses") or row.get("license") or []
    stars = row.get("stars") if row.get("stars") is not None else row.get("max_stars_count")
    return {"path": str(path) if path else None,
            "repo": row.get("repository_name") or row.get("max_stars_repo_name") or row.get("repo"),
            "licenses": [str(x) for x in ([licenses] if isinstance(licenses, str) else licenses)],
            "language": row.get("language") or row.get("lang") or (language_of(str(path)) if path else None),
            "stars": stars if isinstance(stars, int) and not isinstance(stars, bool) else None}


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL (plain, .xz or .gz) or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield f"{path}: row {number}", row
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise StarCoderError(f"{path}: not a readable Parquet file ({e})") from None
        return
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise StarCoderError(f"{path}:{number}: not a JSON object with a 'content' field ({e})") from None


def split_of(doc: Document, val_fraction: float, test_fraction: float) -> str:
    """A stable split from the document's identity (path, else content), the same on every run."""
    key = f"{doc.repo}/{doc.path}" if doc.path else doc.content
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


class _ShardWriter:
    def __init__(self, directory: Path):
        self.directory, self.shards, self.buffer, self.total = directory, [], [], 0
        directory.mkdir(parents=True)

    def write(self, tokens: list[int]) -> None:
        self.buffer.extend(tokens)
        self.total += len(tokens)
        if len(self.buffer) >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            name = f"tokens-{len(self.shards):05d}.bin"
            np.asarray(self.buffer, dtype=np.uint16).tofile(self.directory / name)
            self.shards.append({"file": name, "tokens": len(self.buffer)})
            self.buffer = []


def tokenize_corpus(documents: Iterable[Document], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                    val_fraction: float = 0.01, test_fraction: float = 0.01, seed: int = 0,
                    repo_context: bool = False) -> dict:
    """Tokenize documents once into DATA_DIR/{train,val,test}. Written to a temporary directory and renamed, so an
    interrupted run leaves no half-written data set. Returns the summary also written to DATA_DIR/summary.json.

    StarCoder-family tokenizers get the metadata prefixes (probability 0.2 each); with repo_context and a
    StarCoder2-family tokenizer, the files of each repository become one document in the repository layout.
    """
    if tokenizer.vocab_size > 65536:
        raise StarCoderError(f"uint16 shards hold ids below 65536; the tokenizer has {tokenizer.vocab_size}")
    out = Path(out_dir)
    if out.exists():
        raise StarCoderError(f"{out} exists; choose a new directory for the tokenized data")
    with atomic_dir(out) as tmp:
        summary = _write_splits(tmp, documents, tokenizer, seed, repo_context, val_fraction, test_fraction)
    return summary


def _write_splits(tmp: Path, documents, tokenizer: Tokenizer, seed: int, repo_context: bool, val_fraction: float,
                  test_fraction: float) -> dict:
    writers = {split: _ShardWriter(tmp / split) for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    fmt = PromptFormat.for_tokenizer(tokenizer)
    rng = np.random.default_rng(seed)
    grouped = repo_context and fmt.repo_style == "starcoder2"
    with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for split, doc, text in _texts(documents, fmt, rng, grouped, val_fraction, test_fraction):
            tokens = tokenizer.encode(text)
            writers[split].write([*tokens, tokenizer.eos_id])
            counts[split] += 1
            manifest.write(json.dumps({**{k: v for k, v in asdict(doc).items() if k != "content"},
                                       "split": split, "tokens": len(tokens)}) + "\n")
    for writer in writers.values():
        writer.flush()
    tokenizer_hash = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]
    for split, writer in writers.items():
        index = {"shards": writer.shards, "tokens": writer.total, "documents": counts[split],
                 "eos": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer_hash}
        (tmp / split / "index.json").write_text(json.dumps(index, indent=2))
    summary = {split: {"documents": counts[split], "tokens": writers[split].total} for split in SPLITS}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    tokenizer.save(tmp / "tokenizer")
    return summary


def _texts(documents, fmt, rng, grouped, val_fraction, test_fraction):
    """(split, document, training text) for each document, or each repository when grouped."""
    if not grouped:
        for doc in documents:
            yield split_of(doc, val_fraction, test_fraction), doc, document_text(
                doc.repo, doc.path, doc.content, doc.stars, fmt, rng)
        return
    repos: dict[tuple[str, str | None], list[Document]] = {}
    for doc in documents:
        split = split_of(doc, val_fraction, test_fraction)
        if doc.repo is None or doc.path is None:
            yield split, doc, doc.content
        else:
            repos.setdefault((split, doc.repo), []).append(doc)
    for (split, repo), docs in repos.items():
        text = repository_text(repo, [RepoFile(d.path, d.content) for d in docs])
        yield split, Document(text, None, repo, docs[0].language, docs[0].license), text


class Samples:
    """What the training loop reads of a dataset: len(), and global_index(g), the index of the g-th sample of
    training: epochs of a seeded shuffle of all samples (+ epoch * len, so that a sample can differ by epoch,
    as a window gets new FIM cut points in each; index modulo len for the stored sample)."""

    seed: int

    def __len__(self) -> int:
        raise NotImplementedError

    def global_index(self, g: int) -> int:
        epoch, within = divmod(g, len(self))
        if getattr(self, "_epoch", None) != epoch:
            self._order = np.random.default_rng((self.seed, 1_000_003, epoch)).permutation(len(self))
            self._epoch = epoch
        return int(self._order[within]) + epoch * len(self)


class TokenDataset(Samples):
    """Fixed-length samples (seq_len + 1 tokens) over the shards of one split, FIM applied per sample."""

    def __init__(self, split_dir: str | os.PathLike, seq_len: int, tokenizer: Tokenizer | None = None,
                 fim_rate: float = 0.0, spm_rate: float = 0.5, seed: int = 0):
        split_dir = Path(split_dir)
        index_path = split_dir / "index.json"
        if not index_path.is_file():
            raise StarCoderError(f"{split_dir}: no index.json (make the data with `starcoder tokenize`)")
        try:
            index = json.loads(index_path.read_text())
            shards = [np.memmap(split_dir / s["file"], dtype=np.uint16, mode="r") for s in index["shards"]]
        except (json.JSONDecodeError, KeyError, OSError, ValueError) as e:
            raise StarCoderError(f"{index_path}: damaged data index ({type(e).__name__}: {e})") from None
        self.tokens = np.concatenate(shards) if len(shards) > 1 else (shards[0] if shards else np.zeros(0, np.uint16))
        self.index, self.seq_len, self.seed = index, seq_len, seed
        self.fim_rate, self.spm_rate, self.tokenizer = fim_rate, spm_rate, tokenizer
        if fim_rate > 0:
            if tokenizer is None:
                raise StarCoderError("the FIM transform needs the tokenizer")
            self.fim_ids = FimIds.for_tokenizer(tokenizer)
        if len(self) == 0:
            raise StarCoderError(f"{split_dir}: {len(self.tokens)} tokens is less than one sample of {seq_len + 1}")

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        start = (i % len(self)) * self.seq_len
        sample = self.tokens[start : start + self.seq_len + 1].astype(np.int64)
        if self.fim_rate > 0:
            rng = np.random.default_rng((self.seed, i))
            sample = np.asarray(fim_context(sample.tolist(), self.tokenizer, self.fim_ids, rng, self.fim_rate,
                                            self.spm_rate), dtype=np.int64)
        return sample

    def global_sample(self, g: int) -> np.ndarray:
        return self[self.global_index(g)]
