"""Speculative decoding's drafters: guesses of the next few tokens that the generator checks in one forward pass
(on a CPU a pass over a few tokens costs about what a pass over one does: both read every weight once).

- Prompt lookup ("ngram"): code edits and refactors repeat their input, so the tokens that followed the latest
  earlier occurrence of the text's last n-gram are often the next ones. Costs next to nothing.
- A draft model ("draft"): a smaller model with the same tokenizer guesses greedily, with its own KV cache.

The generator keeps drafted tokens as far as they equal what the sequence chooses itself. For sampling this is the
standard rejection rule (accept x with probability min(1, p(x)/q(x)), else sample from max(0, p - q)) for a draft
that puts all its probability on one token: accepting with probability p(x) and otherwise drawing from p without
x is the same as drawing from p and comparing. So the output is exactly plain decoding's, greedy or sampled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

from .cache import common_prefix
from .errors import StarCoderError

MODES = ("none", "ngram", "draft")
MAX_DRAFT = 8
MAX_PAUSE = 64  # steps
FREE_DRAFT = 0.02  # a drafted token costing less than this share of a decode step is free (prompt lookup)
NGRAMS = (4, 3, 2)  # the longest match wins; single tokens match too often to predict anything
REMEMBER_TOKENS = 32_768  # finished sequences' tokens prompt lookup also searches (a few editor requests' worth)


def ngram_draft(history: list[int], k: int, earlier: Iterable[np.ndarray] = ()) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n-gram, in history itself or
    else in the `earlier` texts (newest first), or []. The longest n-gram found anywhere wins."""
    if k <= 0 or len(history) < 3:
        return []
    tokens = np.asarray(history, dtype=np.int64)
    for n in NGRAMS:
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for text, starts_before in ((tokens, len(tokens) - n), *((text, len(text)) for text in earlier)):
            follow = _follow(text, tail, k, starts_before)
            if follow:
                return follow
    return []


def _follow(text: np.ndarray, tail: np.ndarray, k: int, starts_before: int) -> list[int]:
    """The (up to k) tokens after the latest occurrence of tail in text that starts before starts_before and
    has any, or []."""
    n = len(tail)
    last = min(starts_before, len(text) - n)  # occurrences start below this, with a token after them
    if last <= 0:
        return []
    found = text[:last] == tail[0]
    for i in range(1, n):
        found &= text[i : last + i] == tail[i]
    starts = np.flatnonzero(found)
    return text[starts[-1] + n : starts[-1] + n + k].tolist() if len(starts) else []


class DraftLength:
    """How many tokens to draft: doubles after a draft is taken whole, halves after one is refused, and after
    single-token drafts keep being refused, none for a while (longer each time), so that text with nothing to
    look up costs next to nothing (llama.cpp measured its lookup below 1x when it did not back off).

    A drafter that costs something (a draft model) drafts only as far as it pays: k drafted tokens kept at the
    measured rate a yield (1 - a^(k+1)) / (1 - a) tokens per verify pass, for 1 + k x cost decode steps' time,
    against one token per plain step (the rule of Leviathan et al. for the best draft length)."""

    def __init__(self, start: int = 4):
        self.value = start
        self.pause = 0  # steps left without drafting
        self._refusals = 0  # single-token drafts refused in a row, or drafts not worth their cost
        self.acceptance = 0.5  # moving average of the share of drafted tokens kept

    def next(self, cost: float = 0.0) -> int:
        """The draft length for this step (0: do not draft now); cost: drafting one token, in decode steps."""
        if self.pause:
            self.pause -= 1
            return 0
        if cost < FREE_DRAFT:
            return self.value
        a = min(self.acceptance, 0.99)
        gains = [(1 - a ** (k + 1)) / (1 - a) / (1 + k * cost) for k in range(1, self.value + 1)]
        best = max(range(len(gains)), key=gains.__getitem__)
        if gains[best] > 1:
            return best + 1
        self._refusals += 1  # not worth it now: rest, then draft one token to measure again
        self.pause = min(MAX_PAUSE, 2**self._refusals)
        return 1

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.acceptance = 0.7 * self.acceptance + 0.3 * accepted / drafted
        if accepted == 0 and self.value == 1:
            self._refusals += 1
            self.pause = min(MAX_PAUSE, 2**self._refusals)
        elif accepted:
            self._refusals = 0
        if accepted == drafted:
            self.value = min(MAX_DRAFT, self.value * 2)
        elif accepted == 0:
            self.value = max(1, self.value // 2)


class Drafter(Protocol):
    def draft(self, history: list[int], k: int) -> list[int]:
        """Up to k guesses of the tokens that follow history (prompt and generated tokens); [] for none.
        A drafter may also have remember(tokens), called with every finished sequence's prompt and tokens."""


class PromptLookup:
    """Looks up the sequence's own text first, then the texts of the latest finished sequences (bounded): an
    editor sends the same context again after each keystroke, and what the model wrote last time is the best
    guess of what it writes now (llama.cpp's ngram-mod shares its n-grams across requests for the same reason).
    Drafts only make decoding faster or slower, never different, whoever's text they come from."""

    def __init__(self, remember_tokens: int = REMEMBER_TOKENS):
        self.budget = remember_tokens
        self.earlier: deque[np.ndarray] = deque()  # newest first

    def remember(self, tokens: list[int]) -> None:
        text = np.asarray(tokens[-self.budget :], dtype=np.int64)
        self.earlier.appendleft(text)
        held = sum(len(t) for t in self.earlier)
        while held > self.budget:
            held -= len(self.earlier.pop())

    def draft(self, history: list[int], k: int) -> list[int]:
        return ngram_draft(history, k, self.earlier)


class DraftModel:
    """A small model guessing greedily for a large one. Its KV cache holds the last history it drafted from, so
    each draft computes only the tokens the large model accepted since (and the one it chose), then k steps."""

    def __init__(self, model, tokenizer=None, target_tokenizer=None):
        vocab = [t.backend.get_vocab(with_added_tokens=True) for t in (tokenizer, target_tokenizer) if t is not None]
        if len(vocab) == 2 and vocab[0] != vocab[1]:
            raise StarCoderError("the draft model's tokenizer differs from the model's: a draft model must "
                                 "share its tokenizer (e.g. a smaller model of the same family)")
        self.model = model
        self.cache = None
        self.tokens: list[int] = []  # what the cache holds keys and values of

    @torch.inference_mode()
    def draft(self, history: list[int], k: int) -> list[int]:
        if k <= 0 or len(history) + k > self.model.config.max_positions:
            return []
        self._reserve(len(history) + k)
        same = common_prefix(self.tokens, history)
        keep = min(same, len(history) - 1)  # at least one token is fed: its logits give the first guess
        self.cache.lengths[0] = keep
        ids = torch.tensor([history[keep:]])
        guesses: list[int] = []
        while True:
            logits = self.model(ids, cache=self.cache, logits_to_keep=1).logits[0, -1]
            guesses.append(int(logits.argmax()))
            if len(guesses) == k:
                break
            ids = torch.tensor([guesses[-1:]])
        self.tokens = history + guesses[:-1]
        return guesses

    def _reserve(self, n: int) -> None:
        """A cache for at least n positions, grown by doubling (keeping what it holds)."""
        if self.cache is not None and self.cache.max_len >= n:
            return
        size = min(self.model.config.max_positions, max(1024, 2 * n))
        grown = self.model.new_cache(1, size)
        if self.cache is not None and self.tokens:
            grown.load(0, *self.cache.keys_values(0, len(self.tokens)))
        self.cache = grown


def drafter_for(speculate: str | Drafter | None) -> Drafter | None:
    """The drafter a speculation setting means: None for "none", prompt lookup for "ngram", a Drafter as is."""
    if speculate is None or speculate == "none":
        return None
    if speculate == "ngram":
        return PromptLookup()
    if speculate == "draft":
        raise StarCoderError("speculate='draft' needs a draft model (--draft-model DIR): a smaller model with the "
                             "same tokenizer")
    if isinstance(speculate, str):
        raise StarCoderError(f"unknown speculation {speculate!r}; choose one of {', '.join(MODES)}")
    return speculate
