"""Tokenizers: the shipped ones, training, special tokens by text, and UTF-8-safe streaming."""

from __future__ import annotations

import pytest

from starcoder import StarCoderError
from starcoder.tokenizer import (
    STARCODER2_SPECIAL_TOKENS,
    STARCODER_SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

SAMPLE = "def area(r):\n    return 3.14159 * r ** 2  # π r² — ok 👍\n"


@pytest.mark.parametrize("family, specials", [("gpt_bigcode", STARCODER_SPECIAL_TOKENS),
                                              ("starcoder2", STARCODER2_SPECIAL_TOKENS)])
def test_shipped_tokenizers_have_the_published_special_ids(family, specials):
    tok = Tokenizer.for_family(family)
    assert tok.vocab_size == 49152
    assert [tok.token_id(t) for t in specials] == list(range(len(specials)))
    assert tok.eos_id == 0


def test_round_trip_and_digits_split():
    tok = Tokenizer.for_family("starcoder2")
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert [tok.decode([i]) for i in tok.encode("x = 31415")][-5:] == ["3", "1", "4", "1", "5"]


def test_special_tokens_in_text_are_recognised():
    tok = Tokenizer.for_family("starcoder2")
    ids = tok.encode("<fim_prefix>a<fim_suffix>b<fim_middle>")
    assert ids[0] == tok.token_id("<fim_prefix>") and ids[-1] == tok.token_id("<fim_middle>")


def test_streaming_never_emits_half_a_character():
    tok = Tokenizer.for_family("gpt_bigcode")
    text = "日本語のコメント 👍🏽 ünïcødé " * 3
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_train_a_small_tokenizer(tmp_path):
    corpus = [SAMPLE * 3, "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"] * 20
    tok = train_tokenizer(corpus, "gpt_bigcode", vocab_size=400)
    assert tok.vocab_size <= 400
    assert [tok.token_id(t) for t in STARCODER_SPECIAL_TOKENS] == list(range(19))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(SAMPLE, add_special_tokens=False) == tok.encode(SAMPLE)
    assert hf.eos_token == "<|endoftext|>"


def test_santacoder_style_eos_from_tokenizer_config(tmp_path):
    tok = train_tokenizer(["abc def"] * 10, "starcoder2", vocab_size=300)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": {"content": "<file_sep>"}}')
    assert load_tokenizer(tmp_path).eos_id == 6


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(StarCoderError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(StarCoderError, match=r"tokenizer.json: not a readable tokenizer"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(StarCoderError, match="vocab_size 100 is too small"):
        train_tokenizer(["x"], "starcoder2", vocab_size=100)
