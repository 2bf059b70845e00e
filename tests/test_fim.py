"""The FIM and repository formats produce exactly the strings of REFERENCE.md."""

from __future__ import annotations

import pytest

from starcoder import StarCoderError
from starcoder.fim import SANTACODER, STARCODER, STARCODER2, PromptFormat, RepoFile, star_bucket
from starcoder.tokenizer import Tokenizer, train_tokenizer


def test_psm_and_spm():
    assert STARCODER.infill("PRE", "SUF") == "<fim_prefix>PRE<fim_suffix>SUF<fim_middle>"
    assert STARCODER2.infill("PRE", "SUF", "spm") == "<fim_prefix><fim_suffix>SUF<fim_middle>PRE"
    assert SANTACODER.infill("PRE", "SUF") == "<fim-prefix>PRE<fim-suffix>SUF<fim-middle>"
    with pytest.raises(StarCoderError, match="unknown FIM mode 'mps'"):
        STARCODER.infill("a", "b", "mps")


def test_formats_follow_the_vocabulary():
    assert PromptFormat.for_tokenizer(Tokenizer.for_family("gpt_bigcode")) == STARCODER
    assert PromptFormat.for_tokenizer(Tokenizer.for_family("starcoder2")) == STARCODER2
    santa = train_tokenizer(["x"] * 5, "gpt_bigcode", vocab_size=300)
    santa.backend.add_special_tokens(["<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"])
    fmt = PromptFormat.for_tokenizer(santa)
    assert (fmt.fim_prefix, fmt.fim_pad) == ("<fim_prefix>", "<fim_pad>")  # underscores win when both exist


def test_starcoder_file_metadata():
    assert STARCODER.file_header("src/a.py", "me/repo", 42) == "<reponame>me/repo<filename>src/a.py<gh_stars>10-100\n"
    assert STARCODER.file_header("a.py") == "<filename>a.py\n"
    assert [star_bucket(s) for s in (0, 1, 9, 10, 99, 100, 999, 1000, 10**6)] == [
        "0", "1-10", "1-10", "10-100", "10-100", "100-1000", "100-1000", "1000+", "1000+"]


def test_starcoder2_repository_context():
    files = [RepoFile("a.py", "A = 1\n"), RepoFile("b.py", "B = 2\n")]
    assert STARCODER2.repository("me/repo", files, "c.py", "import a\n") == (
        "<repo_name>me/repo<file_sep>a.py\nA = 1\n<file_sep>b.py\nB = 2\n<file_sep>c.py\nimport a\n")
    assert STARCODER2.repository("me/repo", files[:1], "c.py", "x = ", "\nprint(x)\n") == (
        "<repo_name>me/repo<file_sep>a.py\nA = 1\n<file_sep><fim_prefix>c.py\nx = <fim_suffix>\nprint(x)\n<fim_middle>")


def test_starcoder_repository_context():
    files = [RepoFile("a.py", "A = 1\n")]
    assert STARCODER.repository("me/repo", files, "c.py", "x = ", "\n") == (
        "<reponame>me/repo<filename>a.py\nA = 1\n<|endoftext|>"
        "<fim_prefix><reponame>me/repo<filename>c.py\nx = <fim_suffix>\n<fim_middle>")


def test_stop_tokens_per_family():
    assert STARCODER2.stop_tokens == ("<|endoftext|>", "<file_sep>", "<fim_pad>")
    assert STARCODER.stop_tokens == ("<|endoftext|>", "<fim_pad>")


def test_no_repository_tokens_is_a_clear_error():
    with pytest.raises(StarCoderError, match="no repository tokens"):
        SANTACODER.repository("r", [], "a.py", "x")
