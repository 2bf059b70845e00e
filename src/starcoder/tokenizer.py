"""Tokenizers: a thin wrapper over `tokenizers.Tokenizer`, StarCoder-style training, and streaming decode.

Special tokens are looked up by their text, never by id: StarCoder, StarCoder2 and SantaCoder number them
differently (and SantaCoder spells the FIM tokens with dashes).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .errors import StarCoderError
from .files import write_text_atomic
from .paths import resolve_model

ENDOFTEXT = "<|endoftext|>"

# In id order: the trainer gives special tokens the first ids, as in the published tokenizers.
STARCODER_SPECIAL_TOKENS = [
    ENDOFTEXT, "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]
STARCODER2_SPECIAL_TOKENS = [
    ENDOFTEXT, "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<jupyter_script>", "<empty_output>", "<code_to_intermediate>", "<intermediate_to_code>",
    "<pr>", "<pr_status>", "<pr_is_merged>", "<pr_base>", "<pr_file>", "<pr_base_code>", "<pr_diff>",
    "<pr_diff_hunk>", "<pr_comment>", "<pr_event_id>", "<pr_review>", "<pr_review_state>", "<pr_review_comment>",
    "<pr_in_reply_to_review_id>", "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>",
    "<NAME>", "<EMAIL>", "<KEY>", "<PASSWORD>",
]
# StarEncoder's vocabulary: StarCoder's, then these four at 49152-49155.
ENCODER_TOKENS = ["<pad>", "<sep>", "<cls>", "<mask>"]
SPECIAL_TOKENS = {"gpt_bigcode": STARCODER_SPECIAL_TOKENS, "starcoder2": STARCODER2_SPECIAL_TOKENS,
                  "bert": STARCODER_SPECIAL_TOKENS + ENCODER_TOKENS}


class Tokenizer:
    """Text <-> token ids. Special tokens written in the text are recognised, as transformers does."""

    def __init__(self, backend, eos_token: str = ENDOFTEXT, source: str = "tokenizer"):
        self.backend = backend  # tokenizers.Tokenizer
        self.source = source
        self.eos_id = self.token_id(eos_token)
        if self.eos_id is None:
            self.eos_id = self.token_id(ENDOFTEXT)
        if self.eos_id is None:
            raise StarCoderError(f"{source}: no end-of-text token ({eos_token!r} or {ENDOFTEXT!r}) in the vocabulary")
        self.special_ids = frozenset(
            self.token_id(t.content) for t in backend.get_added_tokens_decoder().values() if t.special
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str = ENDOFTEXT) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            raw = path.read_bytes()
            backend = Backend.from_str(gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode())
        except Exception as e:  # tokenizers reports a malformed file as a plain Exception
            raise StarCoderError(f"{path}: not a readable tokenizer ({type(e).__name__}: {e})") from None
        return cls(backend, eos_token, str(path))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """tokenizer.json of a model directory, with the eos token of tokenizer_config.json where present."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise StarCoderError(f"{model_dir}: no tokenizer.json (a model directory needs one to read and write text)")
        return cls.from_file(path, _configured_eos(model_dir) or ENDOFTEXT)

    @classmethod
    def for_family(cls, model_type: str) -> Tokenizer:
        """The tokenizer this package ships for a family (see assets/tokenizers/README.md)."""
        if model_type not in SPECIAL_TOKENS:
            raise StarCoderError(f"no shipped tokenizer for model type {model_type!r}")
        shipped = "gpt_bigcode" if model_type == "bert" else model_type
        asset = resources.files("starcoder") / "assets" / "tokenizers" / f"{shipped}.json.gz"
        with resources.as_file(asset) as path:
            tokenizer = cls.from_file(path)
        if model_type == "bert":
            tokenizer.backend.add_special_tokens(ENCODER_TOKENS)
            tokenizer = cls(tokenizer.backend, source=tokenizer.source)  # its special ids now hold the four
        return tokenizer

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self.encoding(text).ids

    def encoding(self, text: str):
        """The tokenizers Encoding of `text` (ids, offsets). Through encode_batch, which lets other Python threads
        run while it works (encode holds the GIL: seconds on a megabyte, a stalled event loop in the server)."""
        return self.backend.encode_batch([text], add_special_tokens=False)[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def save(self, model_dir: str | os.PathLike) -> None:
        """tokenizer.json plus the small config files transformers' AutoTokenizer reads."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(model_dir / "tokenizer.json", self.backend.to_str())
        eos = self.backend.id_to_token(self.eos_id)
        specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        config = {
            "tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
            "additional_special_tokens": [t for t in specials if t != eos], "clean_up_tokenization_spaces": False,
            "add_prefix_space": False, "model_max_length": 1_000_000,
        }
        write_text_atomic(model_dir / "tokenizer_config.json", json.dumps(config, indent=2))
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "additional_special_tokens")}
        write_text_atomic(model_dir / "special_tokens_map.json", json.dumps(special_map, indent=2))


def _configured_eos(model_dir: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            eos = json.loads(path.read_text("utf-8")).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise StarCoderError(f"{path}: not valid JSON ({e})") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def load_tokenizer(path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a model directory, a GGUF file (rebuilt from its vocabulary) or a hub id (through the
    Hugging Face cache)."""
    location = resolve_model(path_or_id, cache_dir)
    if location.suffix == ".gguf":
        from .gguf_file import open_gguf, read_tokenizer

        return read_tokenizer(open_gguf(location), location)
    return Tokenizer.from_dir(location)


class StreamDecoder:
    """Turns tokens into text one token at a time, never emitting half of a character.

    A byte-level BPE token can end in the middle of a UTF-8 character; decoding such a prefix gives U+FFFD. The
    text of the tokens since the last emitted boundary is decoded again with each new token, and only emitted
    once it no longer ends in a broken character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context (merges can change leading spaces)
        self.read_offset = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        text = decode(self.ids[self.prefix_offset :], self.skip)
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (a sequence that really ends in a broken character)."""
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :]


def train_tokenizer(texts: Iterable[str], model_type: str = "starcoder2", vocab_size: int = 49152,
                    min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """A StarCoder-style byte-level BPE: every digit its own pre-token, then the GPT-2 split; special tokens
    first, in the family's order."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if model_type not in SPECIAL_TOKENS:
        raise StarCoderError(f"model type {model_type!r} has no special-token set; choose one of "
                             f"{', '.join(SPECIAL_TOKENS)}")
    specials = SPECIAL_TOKENS[model_type]
    if vocab_size < len(specials) + 256:
        raise StarCoderError(f"vocab_size {vocab_size} is too small: {len(specials)} special tokens + 256 bytes")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, source=f"trained {model_type} tokenizer")


def read_text_files(paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...] = (".py",),
                    exclude: tuple[str, ...] = ()) -> Iterable[str]:
    """The UTF-8 text of every file with one of the suffixes under the given files and directories, in a stable
    order (so training on the same tree gives the same tokenizer), skipping any path with a directory named in
    `exclude`. Files that are not UTF-8 are skipped."""
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise StarCoderError(f"{root}: no such file or directory")
        files = [root] if root.is_file() else sorted(
            p for p in root.rglob("*")
            if p.suffix in suffixes and not set(p.relative_to(root).parts[:-1]) & set(exclude))
        for path in files:
            try:
                yield path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
