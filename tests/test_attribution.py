"""Attribution: the membership filter and the full-text index over a corpus the tests write."""

from __future__ import annotations

import io
import json
import random
import string

import pytest

from starcoder.__main__ import main
from starcoder.attribution import membership
from starcoder.attribution.index import AttributionIndex, build_index
from starcoder.errors import StarCoderError


def source_file(seed: int, functions: int = 12) -> str:
    """A Python file of functions with names and constants of its own (so every file is distinctive)."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(4, 10)))  # noqa: E731
    parts = []
    for _ in range(functions):
        name, a, b = word(), word(), word()
        parts.append(f"def {name}_{word()}({a}, {b}=None):\n"
                     f"    \"\"\"Return the {word()} of {a} and {b}.\"\"\"\n"
                     f"    if {b} is None:\n        {b} = {rng.randrange(10**6)}\n"
                     f"    total_{word()} = {a} * {rng.randrange(1000)} + {b}\n"
                     f"    return {word()}_{word()}(total_{name}, {a}, key='{word()}')\n")
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribution")
    rows = root / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(60):
            f.write(json.dumps({"content": source_file(i), "repository_name": f"org/repo{i % 7}",
                                "path": f"pkg/module_{i}.py", "licenses": ["MIT" if i % 2 else "Apache-2.0"],
                                "language": "python"}) + "\n")
    index_dir = root / "index"
    build_index([rows], index_dir, shard_bytes=40_000)  # small shards: the search spans several
    return rows, index_dir


def test_copied_snippets_are_found_with_their_source(corpus):
    rows, index_dir = corpus
    index = AttributionIndex(index_dir)
    assert len(index.manifest["search"]["shards"]) > 1
    text = source_file(17)
    snippet = text[900:1900]
    variants = {"exact": snippet,
                "re-indented": "\n".join("        " + line for line in snippet.splitlines()),
                "whitespace changed": snippet.replace("    ", "\t").replace("\n\n", "\n\n\n").replace(" = ", "  =  ")}
    for name, variant in variants.items():
        result = index.attribute(variant)
        assert result["score"] > 0.8, (name, result["score"])
        assert result["spans"] and result["longest_chain"] >= 10, name
        best = result["sources"][0]
        assert (best["repository"], best["path"], best["license"]) == ("org/repo3", "pkg/module_17.py", "MIT"), name
        assert best["lines"] and best["lines"][0]["text"] in " ".join(text.split())


def test_spans_mark_the_copied_part_of_a_longer_text(corpus):
    _, index_dir = corpus
    index = AttributionIndex(index_dir)
    copied = source_file(5)[200:800]
    fresh = source_file(10_000)[:600]  # never indexed
    text = fresh + "\n" + copied + "\n" + source_file(10_001)[:600]
    result = index.attribute(text)
    assert len(result["spans"]) == 1
    span = result["spans"][0]
    # the span lies inside the copied part and covers most of it (the first and last partial n-grams are lost)
    assert len(fresh) <= span["start"] and span["end"] <= len(fresh) + 1 + len(copied)
    assert span["end"] - span["start"] > 0.7 * len(copied)
    assert 0.15 < result["score"] < 0.4


def test_text_not_in_the_corpus_is_not_found(corpus):
    _, index_dir = corpus
    index = AttributionIndex(index_dir)
    for seed in range(20_000, 20_010):
        result = index.attribute(source_file(seed)[:1000])
        assert result["spans"] == [] and result["score"] == 0.0
        assert result["sources"] == []  # files sharing some tokens but no line are no sources


def test_attribute_says_when_no_source_was_found(corpus, tmp_path, capsys):
    _, index_dir = corpus
    snippet = tmp_path / "new.py"
    snippet.write_text(source_file(20_001)[:800])
    assert main(["attribute", str(snippet), "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "no file of the training data shares a line with it" in out and "best matching files" not in out


def test_false_positive_rate_within_twice_the_configured_rate(corpus):
    _, index_dir = corpus
    index = AttributionIndex(index_dir)
    rng = random.Random(0)
    grams = ["".join(rng.choice(string.printable[:94]) for _ in range(50)) for _ in range(50_000)]
    rate = index.bloom.contains(grams).mean()
    assert rate <= 2 * index.manifest["membership"]["false_positive_rate"], rate


def test_search_returns_the_right_file_first_for_distinctive_lines(corpus):
    _, index_dir = corpus
    index = AttributionIndex(index_dir)
    for seed in (3, 28, 59):
        lines = [line for line in source_file(seed).splitlines() if "return" in line][:2]
        result = index.attribute("\n".join(lines))
        assert result["sources"][0]["path"] == f"pkg/module_{seed}.py"


def test_cli_attribute_text_and_json(corpus, tmp_path, capsys):
    _, index_dir = corpus
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source_file(8)[300:1100])
    assert main(["attribute", str(snippet), "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "org/repo1/pkg/module_8.py" in out and "license: Apache-2.0" in out
    assert main(["attribute", str(snippet), "--index", str(index_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] > 0.8 and result["sources"][0]["path"] == "pkg/module_8.py"


def test_bad_input_and_damaged_indexes(corpus, tmp_path, capsys):
    rows, index_dir = corpus
    empty, binary = tmp_path / "empty.py", tmp_path / "blob.bin"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02")
    assert main(["attribute", str(empty), "--index", str(index_dir)]) != 0
    assert "input is empty" in capsys.readouterr().err
    assert main(["attribute", str(binary), "--index", str(index_dir)]) != 0
    assert "binary" in capsys.readouterr().err
    (tmp_path / "latin.py").write_bytes(b"caf\xe9")
    assert main(["attribute", str(tmp_path / "latin.py"), "--index", str(index_dir)]) != 0
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["attribute", str(empty), "--index", str(tmp_path / "nowhere")]) != 0
    assert "no attribution index" in capsys.readouterr().err

    copy = tmp_path / "copy"
    build_index([rows], copy)
    manifest = json.loads((copy / "index.json").read_text())
    bloom = copy / manifest["build"] / "membership.bloom"
    header, _, body = bloom.read_bytes().partition(b"\n")
    bloom.write_bytes(header.replace(b'"ngram": 50', b'"ngram": 40') + b"\n" + body)
    with pytest.raises(StarCoderError, match="built with other parameters"):
        AttributionIndex(copy)
    bloom.write_bytes(header + b"\n" + body[:-100])
    with pytest.raises(StarCoderError, match="damaged"):
        AttributionIndex(copy)
    shard = copy / manifest["build"] / manifest["search"]["shards"][0]
    bloom.write_bytes(header + b"\n" + body)
    shard.write_bytes(b"not a database" * 100)
    with pytest.raises(StarCoderError, match="not a search shard"):
        AttributionIndex(copy)


def test_an_interrupted_build_leaves_the_previous_index_usable(corpus, tmp_path, monkeypatch):
    rows, _ = corpus
    out = tmp_path / "index"
    build_index([rows], out)
    before = json.loads((out / "index.json").read_text())

    def crash(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(membership.BloomFilter, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        build_index([rows], out)
    assert json.loads((out / "index.json").read_text()) == before
    assert AttributionIndex(out).attribute(source_file(2)[:800])["score"] > 0.8
    monkeypatch.undo()
    after = build_index([rows], out)  # the next build also clears the interrupted one away
    assert [p.name for p in out.glob("build-*")] == [after["build"]]


def test_normalisation_maps_back_to_the_original_characters():
    text = "def f(x):\n        return   x + 1\n\n\tpass\n"
    norm, origin = membership.normalize(text)
    assert norm == "def f(x): return x + 1 pass" == membership.normalized(text)
    assert text[origin[norm.index("return")] :].startswith("return")


def test_the_default_index_is_built_on_first_use(corpus, tmp_path, monkeypatch, capsys):
    """Without --index, attribute uses the embedded corpus's index, building it into the cache the first time."""
    import lzma

    from starcoder.attribution import index as index_module

    rows, _ = corpus
    shipped = tmp_path / "corpus.jsonl.xz"  # as the embedded model ships its corpus
    shipped.write_bytes(lzma.compress(rows.read_bytes()))
    monkeypatch.setattr(index_module, "embedded_corpus", lambda: shipped)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source_file(30)[:900])
    assert main(["attribute", str(snippet), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["path"] == "pkg/module_30.py"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(source_file(31)[:900].encode())))
    assert main(["attribute", "-", "--json"]) == 0  # standard input, and the index is built only once
    assert json.loads(capsys.readouterr().out)["sources"][0]["path"] == "pkg/module_31.py"
    assert list((tmp_path / "cache" / "starcoder" / "attribution").glob("embedded-*/index.json"))
