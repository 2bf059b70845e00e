"""Reading a corpus, tokenizing it once into shards, and the packed samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from starcoder import StarCoderError
from starcoder.tokenizer import Tokenizer
from starcoder.train.data import TokenDataset, read_corpus, split_of, tokenize_corpus


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_family("starcoder2")


def write_tree(root):
    (root / "repo" / "pkg").mkdir(parents=True)
    (root / "repo" / "pkg" / "a.py").write_text("def a():\n    return 1\n" * 20)
    (root / "repo" / "b.js").write_text("function b() { return 2; }\n" * 20)
    (root / "repo" / "notes.bin").write_bytes(b"\x00\x01")
    rows = [{"content": f"x{i} = {i}\n" * 30, "repository_name": "o/r", "path": f"m{i}.py", "licenses": ["mit"]}
            for i in range(30)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_read_corpus_from_directories_and_jsonl(tmp_path):
    write_tree(tmp_path)
    docs = list(read_corpus([tmp_path / "repo", tmp_path / "rows.jsonl"]))
    assert [(d.path, d.language, d.repo) for d in docs[:2]] == [("b.js", "javascript", "repo"),
                                                               ("pkg/a.py", "python", "repo")]
    assert len(docs) == 32 and docs[2].license == "mit" and docs[2].repo == "o/r"
    assert [d.path for d in read_corpus([tmp_path / "repo"], {"python"})] == ["pkg/a.py"]


def test_bad_corpus_input(tmp_path):
    with pytest.raises(StarCoderError, match="no such file or directory"):
        list(read_corpus([tmp_path / "missing"]))
    (tmp_path / "bad.jsonl").write_text('{"content": "ok"}\n{"text": "no content"}\n')
    with pytest.raises(StarCoderError, match=r"bad.jsonl:2: not a JSON object with a 'content' field"):
        list(read_corpus([tmp_path / "bad.jsonl"]))


def test_tokenize_once_into_shards(tmp_path, tok):
    write_tree(tmp_path)
    docs = list(read_corpus([tmp_path / "repo", tmp_path / "rows.jsonl"]))
    summary = tokenize_corpus(docs, tok, tmp_path / "data", val_fraction=0.2, test_fraction=0.1)
    assert sum(s["documents"] for s in summary.values()) == 32
    manifest = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 32 and {m["split"] for m in manifest} == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        index = json.loads((tmp_path / "data" / split / "index.json").read_text())
        tokens = np.fromfile(tmp_path / "data" / split / index["shards"][0]["file"], dtype=np.uint16)
        assert len(tokens) == index["tokens"] and (tokens == tok.eos_id).sum() == index["documents"]
    train_docs = [d for d in docs if split_of(d, 0.2, 0.1) == "train"]
    index = json.loads((tmp_path / "data" / "train" / "index.json").read_text())
    tokens = np.fromfile(tmp_path / "data" / "train" / index["shards"][0]["file"], dtype=np.uint16).tolist()
    assert tok.decode(tokens).split("<|endoftext|>")[:-1] == [d.content for d in train_docs]
    with pytest.raises(StarCoderError, match="exists; choose a new directory"):
        tokenize_corpus(docs, tok, tmp_path / "data")


def test_packed_samples_and_deterministic_fim(tmp_path, tok):
    write_tree(tmp_path)
    tokenize_corpus(read_corpus([tmp_path / "rows.jsonl"]), tok, tmp_path / "data", 0.0, 0.0)
    plain = TokenDataset(tmp_path / "data" / "train", seq_len=32)
    assert all(len(plain[i]) == 33 for i in range(len(plain)))
    assert np.array_equal(plain[0][32:], plain[1][:1])  # windows of seq_len + 1 overlap by one token
    fim = TokenDataset(tmp_path / "data" / "train", 32, tok, fim_rate=1.0, seed=5)
    again = TokenDataset(tmp_path / "data" / "train", 32, tok, fim_rate=1.0, seed=5)
    assert all(np.array_equal(fim.global_sample(g), again.global_sample(g)) for g in range(0, 3 * len(fim), 7))
    assert any(tok.token_id("<fim_prefix>") in fim[i] for i in range(len(fim)))
    first_epoch = sorted(tuple(plain.global_sample(g)) for g in range(len(plain)))
    assert first_epoch == sorted(tuple(plain[i]) for i in range(len(plain)))  # an epoch is a permutation


def test_repository_context_documents(tmp_path, tok):
    write_tree(tmp_path)
    tokenize_corpus(read_corpus([tmp_path / "repo"]), tok, tmp_path / "data", 0.0, 0.0, repo_context=True)
    index = json.loads((tmp_path / "data" / "train" / "index.json").read_text())
    tokens = np.fromfile(tmp_path / "data" / "train" / index["shards"][0]["file"], dtype=np.uint16).tolist()
    assert tok.decode(tokens).startswith("<repo_name>repo<file_sep>b.js\nfunction b()")
    assert index["documents"] == 1
