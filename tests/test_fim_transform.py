"""StarCoder's FIM training transform: the layouts of REFERENCE.md, every character kept."""

from __future__ import annotations

import numpy as np
import pytest

from starcoder.fim import (
    STARCODER,
    FimIds,
    PromptFormat,
    RepoFile,
    document_text,
    fim_context,
    fim_document,
    repository_text,
)
from starcoder.tokenizer import Tokenizer

DOC = "def mean(xs):\n    total = sum(xs)\n    return total / len(xs)  # naïve ✓\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_family("starcoder2")


def parts(tok, out):
    """(layout, prefix, middle, suffix) read back from a transformed document."""
    ids = FimIds.for_tokenizer(tok)
    assert out[0] == ids.prefix
    if out[1] == ids.suffix:  # SPM: <fim_prefix><fim_suffix> suffix <fim_middle> prefix middle
        m = out.index(ids.middle)
        return "spm", None, tok.decode(out[m + 1 :]), tok.decode(out[2:m])
    s, m = out.index(ids.suffix), out.index(ids.middle)
    return "psm", tok.decode(out[1:s]), tok.decode(out[m + 1 :]), tok.decode(out[s + 1 : m])


def test_every_character_is_kept_in_both_layouts(tok):
    ids = FimIds.for_tokenizer(tok)
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        out = fim_document(tok.encode(DOC), tok, ids, rng, fim_rate=1.0, spm_rate=0.5)
        layout, prefix, middle_or_tail, suffix = parts(tok, out)
        seen.add(layout)
        if layout == "psm":
            assert prefix + middle_or_tail + suffix == DOC
        else:  # SPM's tail is prefix + middle, in order, so the document reads on from the suffix's front
            assert middle_or_tail + suffix == DOC
    assert seen == {"psm", "spm"}


def test_exact_layouts(tok):
    ids = FimIds.for_tokenizer(tok)
    text = tok.decode
    for seed in range(50):
        out = fim_document(tok.encode(DOC), tok, ids, np.random.default_rng(seed), 1.0, 0.0)
        assert text(out).startswith("<fim_prefix>") and text(out).count("<fim_suffix>") == 1
        assert text(out).index("<fim_suffix>") < text(out).index("<fim_middle>")
        out = fim_document(tok.encode(DOC), tok, ids, np.random.default_rng(seed), 1.0, 1.0)
        assert text(out).startswith("<fim_prefix><fim_suffix>")


def test_rates(tok):
    ids = FimIds.for_tokenizer(tok)
    doc = tok.encode(DOC)
    outcomes = []
    for seed in range(400):
        out = fim_document(doc, tok, ids, np.random.default_rng(seed), 0.5, 0.5)
        outcomes.append("none" if out == doc else parts(tok, out)[0])
    assert 150 < outcomes.count("none") < 250
    assert 50 < outcomes.count("spm") < 150 and 50 < outcomes.count("psm") < 150


def test_context_keeps_its_length_and_document_boundaries(tok):
    ids = FimIds.for_tokenizer(tok)
    docs = [tok.encode(DOC), tok.encode("import os\n"), tok.encode("x = [1, 2, 3]\n")]
    context = docs[0] + [ids.eos] + docs[1] + [ids.eos] + docs[2]
    for seed in range(30):
        out = fim_context(context, tok, ids, np.random.default_rng(seed), 1.0, 0.5)
        assert len(out) == len(context)
        assert out.count(ids.prefix) >= 1  # at least the first document was transformed
    short = fim_context(tok.encode("a"), tok, ids, np.random.default_rng(0), 0.0)
    assert short == tok.encode("a")
    # FIM of tiny documents adds tokens: the context is cut back to its length.
    tiny = [*tok.encode("ab"), ids.eos] * 4
    out = fim_context(tiny, tok, ids, np.random.default_rng(3), 1.0)
    assert len(out) == len(tiny) and out[: len(tiny) // 2] != tiny[: len(tiny) // 2]


def test_padding_with_fim_pad(tok):
    """A window can hold a non-canonical split ("a", "b" for "ab"); re-tokenising merges it, the context gets
    shorter, and <fim_pad> fills it back up (not masked from the loss, as in StarCoder)."""
    ids = FimIds.for_tokenizer(tok)
    a, b = tok.encode("a"), tok.encode("b")
    assert len(tok.encode("ab")) == 1
    window = (a + b) * 10
    out = fim_context(window, tok, ids, np.random.default_rng(0), 1.0)
    assert len(out) == len(window) and out[-1] == ids.pad
    kept = [t for t in out if t not in (ids.pad, ids.prefix, ids.suffix, ids.middle)]
    assert len(tok.decode(kept)) == 20


def test_metadata_prefixes():
    rng = np.random.default_rng(0)
    texts = [document_text("me/r", "a.py", "x = 1\n", 50, STARCODER, rng) for _ in range(2000)]
    with_repo = sum(t.startswith("<reponame>me/r") for t in texts) / len(texts)
    with_name = sum("<filename>a.py" in t for t in texts) / len(texts)
    with_stars = sum("<gh_stars>10-100" in t for t in texts) / len(texts)
    assert all(abs(f - 0.2) < 0.04 for f in (with_repo, with_name, with_stars))
    assert all(t.endswith("x = 1\n") for t in texts)
    assert "<reponame>me/r<filename>a.py<gh_stars>10-100\nx = 1\n" in texts
    starcoder2 = PromptFormat.for_tokenizer(Tokenizer.for_family("starcoder2"))
    assert document_text("me/r", "a.py", "x = 1\n", 5, starcoder2, rng) == "x = 1\n"


def test_repository_document():
    files = [RepoFile("a.py", "A = 1\n"), RepoFile("b.py", "B = 2\n")]
    assert repository_text("me/r", files) == "<repo_name>me/r<file_sep>a.py\nA = 1\n<file_sep>b.py\nB = 2\n"
