"""`starcoder index` and `starcoder attribute`: the attribution index of a corpus, and what a text owes to it.

An index directory holds `index.json` (the format, the parameters, the corpus counts, and which build is
current) and one `build-*` directory per build: `membership.bloom` and `search-NNNNN.sqlite` shards. A build
writes a new build directory and then replaces index.json by rename, so an interrupted build leaves the previous
index as it was, and readers never see half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import StarCoderError
from ..files import write_text_atomic
from ..paths import default_model_dir
from . import membership, search

FORMAT = "starcoder-attribution-1"
DEFAULT_FALSE_POSITIVE_RATE = 0.001
SHARD_BYTES = 256 * 1024 * 1024


def embedded_corpus() -> Path:
    """The embedded model's training corpus, as it left the data pipeline (shipped with the model)."""
    return Path(default_model_dir()) / "corpus.jsonl.xz"


def default_index_dir() -> Path:
    """Where the embedded corpus's index is built: the user's cache, keyed by the corpus it indexes."""
    corpus = embedded_corpus()
    stamp = f"{corpus.stat().st_size}-{int(corpus.stat().st_mtime)}" if corpus.exists() else "none"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "starcoder" / "attribution"
    return base / f"embedded-{stamp}"


def build_index(data: list[Path], out: Path, false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
                shard_bytes: int = SHARD_BYTES, progress: bool = False) -> dict:
    """Index the documents of data (prepared directories, JSONL / Parquet rows, source trees) into out."""
    from tqdm import tqdm

    from ..train.data import read_corpus

    params = membership.BloomParams.for_items(
        sum(membership.count_grams(doc.content) for doc in read_corpus(data)), false_positive_rate)
    out.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f"build-{time.strftime('%Y%m%d-%H%M%S')}-", dir=out))
    bloom = membership.BloomFilter(params)
    shards: list[str] = []
    writer = None
    documents = size = 0
    for doc in tqdm(read_corpus(data), desc="indexing", unit="file", disable=not progress):
        bloom.add(membership.document_grams(doc.content))
        if writer is None or writer.bytes >= shard_bytes:
            if writer:
                writer.close()
            shards.append(f"search-{len(shards):05d}.sqlite")
            writer = search.ShardWriter(build / shards[-1])
        writer.add(doc.content, doc.repo, doc.path, doc.license, doc.language)
        documents += 1
        size += len(doc.content.encode("utf-8", "surrogatepass"))
    if writer:
        writer.close()
    if not documents:
        shutil.rmtree(build)
        raise StarCoderError(f"{', '.join(map(str, data))}: no documents to index")
    bloom.save(build / "membership.bloom")
    manifest = {"format": FORMAT, "build": build.name, "data": [str(p) for p in data], "documents": documents,
                "bytes": size, "membership": {**params.__dict__, "file": "membership.bloom"},
                "search": {"format": search.FORMAT, "shards": shards}}
    write_text_atomic(out / "index.json", json.dumps(manifest, indent=2))  # the switch to the new build
    for old in out.glob("build-*"):  # earlier builds, and builds that were interrupted
        if old.name != build.name:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


class AttributionIndex:
    def __init__(self, directory: Path):
        self.directory = directory
        try:
            self.manifest = json.loads((directory / "index.json").read_text())
        except FileNotFoundError:
            raise StarCoderError(f"{directory}: no attribution index (build one with `starcoder index`)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StarCoderError(f"{directory / 'index.json'}: damaged ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise StarCoderError(f"{directory}: an index of another format ({self.manifest.get('format')}); "
                                 f"rebuild it with `starcoder index`")
        build = directory / self.manifest["build"]
        self.bloom = membership.BloomFilter.load(build / self.manifest["membership"]["file"])
        self.shards = [search.open_shard(build / name) for name in self.manifest["search"]["shards"]]

    def attribute(self, text: str, limit: int = 5, min_chain: int = 2) -> dict:
        if not text.strip():
            raise StarCoderError("nothing to attribute: the input is empty")
        if "\0" in text:
            raise StarCoderError("the input is binary (it holds NUL bytes); attribution reads text")
        found = membership.query(self.bloom, text, min_chain)
        spans = [{"start": s.start, "end": s.end, "ngrams": s.hits, "text": text[s.start : s.end]}
                 for s in found["spans"]]
        sources = [m.__dict__ for m in search.search(self.shards, text, limit)]
        return {"score": round(found["score"], 4), "longest_chain": found["longest_chain"],
                "longest_chain_fraction": round(found["longest_chain_fraction"], 4), "spans": spans,
                "sources": sources, "index": {"documents": self.manifest["documents"],
                                              "false_positive_rate": self.manifest["membership"][
                                                  "false_positive_rate"]}}


def load_index(directory: Path | None = None, progress: bool = False) -> AttributionIndex:
    """The index in directory; without one, the embedded corpus's, built on first use."""
    if directory is not None:
        return AttributionIndex(directory)
    default = default_index_dir()
    if not (default / "index.json").exists():
        corpus = embedded_corpus()
        if not corpus.exists():
            raise StarCoderError(f"{corpus}: the embedded model's corpus is missing; pass --index")
        build_index([corpus], default, progress=progress)
    return AttributionIndex(default)


def render_text(text: str, result: dict, color: bool) -> str:
    """The text with its found spans marked, the score, and the sources with their matching lines."""
    marked, position = [], 0
    start_mark, end_mark = ("\033[1;33m", "\033[0m") if color else ("[[", "]]")
    for span in result["spans"]:
        marked += [text[position : span["start"]], start_mark, text[span["start"] : span["end"]], end_mark]
        position = span["end"]
    marked.append(text[position:])
    lines = ["".join(marked).rstrip("\n"), "",
             f"found in the training data: {result['score']:.0%} of the text "
             f"({len(result['spans'])} span(s), longest chain {result['longest_chain']} x 50 characters)"]
    lines.append("best matching files:" if result["sources"] else "no file of the training data shares a line with it")
    for source in result["sources"]:
        where = f"{source['repository']}/{source['path']}" if source["repository"] else source["path"]
        lines.append(f"  {where}  license: {source['license'] or 'unknown'}  "
                     f"{source['matched_characters']} characters in {len(source['lines'])} matching line(s)")
        for line in source["lines"][:5]:
            lines.append(f"    line {line['file_line']}: {line['text'][:100]}")
    return "\n".join(lines)
