"""PII found by a StarPII-format model: a token classifier on the StarEncoder body (BertForTokenClassification)
whose labels are BIO tags of the kinds (`B-EMAIL`, `I-EMAIL`, ..., `O`), as BigCode ran StarPII over StarCoderData.

A document is tokenized once and read in windows of the model's positions (a batch of them per forward),
overlapping by an eighth of a window on each side: each token's label comes from the window where it is farthest
from an edge. Touching tokens of one kind become one span of the text (through the tokenizer's offsets) unless a
B- tag starts a new word, and a lone unlabelled piece inside a run joins it. BigCode's post-filters follow:
ambiguous spans and usernames are dropped, names are kept only when full (two words or more), keys only when
longer than 8 characters and gibberish (the same character model as the regex stage), IP addresses only when
public and not a popular DNS server; and an email only when it holds an @.
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
    """A StarPII-format checkpoint (directory or hub id, or "default": the one this package ships) with its
    tokenizer, for finding PII in text."""

    def __init__(self, location: str):
        from ..loader import load_model
        from ..paths import default_model_dir, resolve_model
        from ..tokenizer import load_tokenizer

        path = default_model_dir("pii_model") if location == "default" else resolve_model(location)
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
    def labels(self, ids: list[int], batch: int = 16) -> list[int]:
        """A label id per token of a document, read in overlapping windows (`batch` of them per forward)."""
        window, margin = self.window, self.window // 8
        step = window - 2 * margin
        starts = [0]
        while starts[-1] + window < len(ids):
            starts.append(starts[-1] + step)
        head, tail = [self.cls] if self.cls is not None else [], [self.sep] if self.sep is not None else []
        out = [0] * len(ids)
        for first in range(0, len(starts), batch):
            rows = [head + ids[start : start + window] + tail for start in starts[first : first + batch]]
            width = max(map(len, rows))
            inputs = torch.tensor([row + [0] * (width - len(row)) for row in rows])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            predicted = self.model(inputs, attention_mask=mask).logits.argmax(-1).tolist()
            for start, row in zip(starts[first : first + batch], predicted, strict=True):
                piece = row[len(head):][: min(window, len(ids) - start)]
                at_end = start + window >= len(ids)
                lo, hi = (0 if start == 0 else margin), (len(piece) if at_end else len(piece) - margin)
                out[start + lo : start + hi] = piece[lo:hi]
        return out

    def find(self, text: str) -> list[Finding]:
        """The model's findings in text, after the post-filters."""
        if not text.strip():
            return []
        encoding = self.tokenizer.encoding(text)
        tags = [self.kinds[label] for label in self.labels(encoding.ids)]
        offsets = encoding.offsets
        kinds = [kind for kind, _ in tags]
        # A token the model left out between two of the same kind, with no space in it, belongs to them
        # ("E" NAME, "len" O, "a" NAME: one name).
        for i in range(1, len(kinds) - 1):
            if not kinds[i] and kinds[i - 1] and kinds[i - 1] == kinds[i + 1] and not any(
                    c.isspace() for c in text[offsets[i][0]:offsets[i][1]]):
                kinds[i] = kinds[i - 1]
        spans: list[list] = []  # [kind, start, end]
        for i, (kind, (start, end)) in enumerate(zip(kinds, offsets, strict=True)):
            if not kind:
                continue
            # the same kind goes on where the last span ended, unless a B- tag starts a new word there: small
            # models tag several pieces of one value B- ("5", "2" of 52.14.203.77)
            touching = spans and spans[-1][0] == kind and spans[-1][2] == start and kinds[i - 1] == kind
            if touching and not (tags[i][1] and text[start:start + 1].isspace()):
                spans[-1][2] = end
            else:
                spans.append([kind, start, end])
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
