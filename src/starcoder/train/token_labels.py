"""Token-classification fine-tuning data: documents with labelled spans, as StarPII was trained.

    starcoder train CONFIG   (model: an encoder; data: a labelled file, or a directory with train.* and val.*)

A labelled file is JSONL in the BigCode PII dataset's format (`text` or `content`, and `fragments`: objects with
`category` and `position` [start, end) in characters) or the project's labelled-snippet format (### title, then the
text with ⟦KIND|value⟧ marks: see data/pii_labels.py). A single file is split by document: every tenth document
is held out for the evaluation loss.

Each document is tokenized once (without special tokens) and cut into windows of seq_len - 2 tokens, read as
`<cls> window <sep>` and padded to seq_len. A token is labelled B-KIND where a span of that kind begins (the first
token overlapping it), I-KIND on the span's later tokens, O elsewhere; the special and pad tokens carry no loss
(-100), as in BigCode's training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..encoder import with_token_classifier
from ..errors import StarCoderError
from ..tokenizer import Tokenizer
from .data import Samples, _rows
from .encoder_samples import EncoderTokens

IGNORED = -100
HELD_OUT_EVERY = 10
LABELLED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".txt")


@dataclass(frozen=True)
class LabelledText:
    text: str
    spans: tuple[tuple[str, int, int], ...]  # (kind, start, end) in characters


def is_labelled_data(path: Path) -> bool:
    """Whether `data` of a training config names labelled documents rather than `starcoder tokenize` shards."""
    if path.is_file():
        return path.name.endswith(LABELLED_SUFFIXES)
    return path.is_dir() and any(_split_file(path, split) for split in ("train", "val"))


def _split_file(directory: Path, split: str) -> Path | None:
    return next((directory / f"{split}{s}" for s in LABELLED_SUFFIXES if (directory / f"{split}{s}").is_file()), None)


def read_labelled_texts(path: Path) -> list[LabelledText]:
    """The documents of a labelled file (JSONL with fragments, or ⟦KIND|value⟧ snippets)."""
    if path.suffix == ".txt":
        from ..data.pii_labels import read_labelled

        try:
            snippets = read_labelled(path)
        except ValueError as e:
            raise StarCoderError(str(e)) from None
        return [LabelledText(text, tuple((f.kind, f.start, f.end) for f in found)) for _, text, found in snippets]
    documents = []
    for where, row in _rows(path):
        text = row.get("text", row.get("content")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise StarCoderError(f"{where}: a labelled document needs a string field 'text' (or 'content')")
        spans = []
        for fragment in row.get("fragments") or []:
            try:
                kind, (start, end) = str(fragment["category"]), fragment["position"]
                valid = isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)
            except (KeyError, TypeError, ValueError):
                valid = False
            if not valid:
                raise StarCoderError(f"{where}: each fragment needs 'category' and 'position' [start, end) within "
                                     f"the text's {len(text)} characters; got {json.dumps(fragment)[:200]}")
            spans.append((kind, start, end))
        documents.append(LabelledText(text, tuple(spans)))
    return documents


def labelled_splits(data: Path) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, val) documents: a directory's train.* and val.* files, or one file with every tenth held out."""
    if data.is_file():
        documents = read_labelled_texts(data)
        held = [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        return [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1], held
    train, val = _split_file(data, "train"), _split_file(data, "val")
    if train is None:
        raise StarCoderError(f"{data}: labelled data needs train.jsonl (or train.txt) in the directory")
    return read_labelled_texts(train), read_labelled_texts(val) if val else []


def bio_labels(kinds: list[str]) -> list[str]:
    """StarPII's label set for these kinds: O, then B- and I- of each."""
    return ["O"] + [f"{tag}-{kind}" for kind in kinds for tag in ("B", "I")]


def token_label_ids(offsets: list[tuple[int, int]], spans, label2id: dict[str, int]) -> list[int]:
    """A label per token: B- on the first token overlapping a span, I- on the rest of it, O elsewhere."""
    labels = [label2id["O"]] * len(offsets)
    for kind, start, end in spans:
        tag = "B"
        for i, (token_start, token_end) in enumerate(offsets):
            if token_start < end and start < token_end:
                labels[i] = label2id[f"{tag}-{kind}"]
                tag = "I"
    return labels


class LabelledWindows(Samples):
    """Labelled documents as fixed-length samples (see the module docstring)."""

    def __init__(self, documents: list[LabelledText], tokenizer: Tokenizer, label2id: dict[str, int], seq_len: int,
                 cls: int, sep: int, pad: int, seed: int = 0):
        self.seq_len, self.seed = seq_len, seed
        width = seq_len - 2
        self.windows: list[tuple[np.ndarray, np.ndarray, int]] = []  # (tokens, labels, length before padding)
        for document in documents:
            if not document.text:
                continue
            encoding = tokenizer.encoding(document.text)
            ids, labels = encoding.ids, token_label_ids(encoding.offsets, document.spans, label2id)
            for start in range(0, len(ids), width):
                row = np.full(seq_len, pad, dtype=np.int64)
                target = np.full(seq_len, IGNORED, dtype=np.int64)
                piece = ids[start : start + width]
                row[: len(piece) + 2] = [cls, *piece, sep]
                target[1 : len(piece) + 1] = labels[start : start + width]
                self.windows.append((row, target, len(piece) + 2))

    def __len__(self) -> int:
        return len(self.windows)


@dataclass(frozen=True)
class TokenLabelling:
    """The training loop's objective for a token classifier: batches of labelled windows."""

    def batch(self, dataset: LabelledWindows, samples: list[tuple[int, int]], device: str) -> dict[str, torch.Tensor]:
        """Samples given as (window index, sample number), stacked into the model's keyword arguments."""
        rows = [dataset.windows[index % len(dataset)] for index, _ in samples]
        mask = np.zeros((len(rows), dataset.seq_len), dtype=np.int64)
        for i, (_, _, length) in enumerate(rows):
            mask[i, :length] = 1
        stacked = {"input_ids": np.stack([r[0] for r in rows]), "attention_mask": mask,
                   "labels": np.stack([r[1] for r in rows])}
        return {key: torch.from_numpy(value).to(device) for key, value in stacked.items()}


def token_classification(model, tokenizer: Tokenizer, data: Path, seq_len: int, seed: int):
    """(model, train set, val set) for fine-tuning on labelled data: an encoder's body under a new head over the
    data's kinds, or a token classifier as it is (trained further) when its labels cover them."""
    if not model.config.encoder:
        raise StarCoderError(f"{data} holds labelled spans for token classification, which fine-tunes an encoder "
                             f"(StarEncoder: `starcoder init --preset starencoder`); the model is a "
                             f"{model.config.family} model")
    train_docs, val_docs = labelled_splits(data)
    kinds = sorted({kind for doc in train_docs for kind, _, _ in doc.spans})
    if model.config.head == "token_classification":
        id2label = model.config.hf_config.get("id2label") or {}
        labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(model.config.num_labels)]
        unknown = [k for k in kinds if f"B-{k}" not in labels or f"I-{k}" not in labels]
        if unknown:
            raise StarCoderError(f"{data}: kinds {', '.join(unknown)} are not among the model's labels "
                                 f"({', '.join(labels)}); start from the encoder body to train a new head")
    else:
        labels = bio_labels(kinds)
        model = with_token_classifier(model, labels)
    tokens = EncoderTokens.of(tokenizer)
    label2id = {label: i for i, label in enumerate(labels)}
    train_set, val_set = (LabelledWindows(docs, tokenizer, label2id, seq_len, tokens.cls, tokens.sep, tokens.pad,
                                          seed) for docs in (train_docs, val_docs))
    for name, dataset in (("training", train_set), ("held-out", val_set)):
        if len(dataset) == 0:
            raise StarCoderError(f"{data}: no {name} documents (a single file holds out every {HELD_OUT_EVERY}th; "
                                 f"give at least {HELD_OUT_EVERY}, or train and val files)")
    return model, train_set, val_set
