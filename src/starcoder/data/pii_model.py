"""PII found by a StarPII-format model: a token classifier on the StarEncoder body (BertForTokenClassification)
whose labels are BIO tags of the kinds (`B-EMAIL`, `I-EMAIL`, ..., `O`), as BigCode ran StarPII over StarCoderData.

A document is tokenized once and read in windows of the model's positions, overlapping by an eighth of a window
on each side: each token's label comes from the window where it is farthest from an edge. Runs of one kind (a
B- tag, then I- tags of the same kind) become spans of the text through the tokenizer's offsets. BigCode's post-
filters follow: ambiguous spans and usernames are dropped, names are kept only when full (two words or more),
keys only when longer than 8 characters and gibberish (the same character model as the regex stage), IP
addresses only when public and not a popular DNS server; and an email only when it holds an @.
"""

from __future__ import annotations

import ipaddress
from functools import cache

import torch

from ..errors import StarCoderError
from .pii import KINDS, POPULAR_DNS, Finding, is_gibberish

KEY_MIN_LENGTH = 9  # BigCode: a key longer than 8 characters
_TRIM = " \t\r\n\"'`,;"


def _public_ip(value: str) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return address.is_global and not address.is_multicast and str(address) not in POPULAR_DNS


def keep(kind: str, value: str) -> bool:
    """BigCode's post-filters for model findings."""
    if kind == "NAME":
        return len(value.split()) >= 2
    if kind == "KEY":
        return len(value) >= KEY_MIN_LENGTH and is_gibberish(value)
    if kind == "IP_ADDRESS":
        return _public_ip(value)
    if kind == "EMAIL":
        return "@" in value  # a piece of an address the model split (a lone "." or domain) is not one
    return kind == "PASSWORD"  # AMBIGUOUS and USERNAME are not redacted


class PiiModel:
    """A StarPII-format checkpoint (directory or hub id) with its tokenizer, for finding PII in text."""

    def __init__(self, location: str):
        from ..loader import load_model
        from ..paths import resolve_model
        from ..tokenizer import load_tokenizer

        path = resolve_model(location)
        self.model = load_model(path, dtype="float32")
        config = self.model.config
        if config.head != "token_classification":
            raise StarCoderError(f"{location}: a PII model is a token classifier (StarPII: BertForTokenClassification)"
                                 f"; this is a {config.family} model with a {config.head} head")
        id2label = config.hf_config.get("id2label") or {}
        self.kinds = [self._kind(str(id2label.get(str(i), "O"))) for i in range(config.num_labels)]
        if not any(kind in KINDS for kind, _ in self.kinds):
            raise StarCoderError(f"{path}: its labels ({', '.join(map(str, id2label.values()))}) name none of the "
                                 f"PII kinds {', '.join(KINDS)} (as B-EMAIL, I-EMAIL, ...)")
        self.tokenizer = load_tokenizer(path)
        # StarEncoder reads <cls> text <sep>, as BERT reads [CLS] text [SEP]
        self.cls = next((i for t in ("<cls>", "[CLS]") if (i := self.tokenizer.token_id(t)) is not None), None)
        self.sep = next((i for t in ("<sep>", "[SEP]") if (i := self.tokenizer.token_id(t)) is not None), None)
        self.window = min(512, config.max_positions) - (self.cls is not None) - (self.sep is not None)

    @staticmethod
    def _kind(label: str) -> tuple[str, bool]:
        """(kind, begins) of a BIO label; "O" is no kind."""
        if label[:2] in ("B-", "I-"):
            return label[2:].upper(), label[0] == "B"
        return ("", False) if label.upper() == "O" else (label.upper(), True)

    @torch.inference_mode()
    def labels(self, ids: list[int]) -> list[int]:
        """A label id per token of a document, read in overlapping windows."""
        window, margin = self.window, self.window // 8
        step = window - 2 * margin
        out = [0] * len(ids)
        start = 0
        while True:
            piece = ids[start : start + window]
            full = ([self.cls] if self.cls is not None else []) + piece + ([self.sep] if self.sep is not None else [])
            logits = self.model(torch.tensor([full])).logits[0]
            predicted = logits.argmax(-1).tolist()[self.cls is not None :][: len(piece)]
            at_end = start + window >= len(ids)
            first, last = (0 if start == 0 else margin), (len(piece) if at_end else len(piece) - margin)
            out[start + first : start + last] = predicted[first:last]
            if at_end:
                return out
            start += step

    def find(self, text: str) -> list[Finding]:
        """The model's findings in text, after the post-filters."""
        if not text.strip():
            return []
        encoding = self.tokenizer.encoding(text)
        spans: list[list] = []  # [kind, start, end]
        previous = ""
        for label, (start, end) in zip(self.labels(encoding.ids), encoding.offsets, strict=True):
            kind, begins = self.kinds[label]
            if kind and (begins or kind != previous or not spans):
                spans.append([kind, start, end])
            elif kind:
                spans[-1][2] = end
            previous = kind
        found = []
        for kind, start, end in spans:
            value = text[start:end]
            start += len(value) - len(value.lstrip(_TRIM))  # byte-level tokens carry the space before a word
            end -= len(value) - len(value.rstrip(_TRIM))
            value = text[start:end]
            if value and keep(kind, value):
                found.append(Finding(kind, start, end, value, "model"))
        return found


@cache
def pii_model(location: str) -> PiiModel:
    """One loaded model per process and location (prepare's workers each load it once)."""
    return PiiModel(location)
