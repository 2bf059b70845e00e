"""Prompt lookup: draft the next tokens from an earlier place where the last few tokens already occurred.

Code edits and refactors repeat their input, so the tokens that followed the latest earlier occurrence of the
text's last n-gram are often the next ones. The generator checks a draft in one forward pass (on a CPU a pass over
a few tokens costs about what a pass over one does: both read every weight once) and keeps the drafted tokens as
far as they equal what it would have chosen, so the output is exactly plain decoding's, greedy or sampled.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "ngram")
MAX_DRAFT = 8
MAX_PAUSE = 64  # steps
NGRAMS = (4, 3, 2)  # the longest match wins; single tokens match too often to predict anything


def ngram_draft(history: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n-gram, or []."""
    if k <= 0 or len(history) < 3:
        return []
    tokens = np.asarray(history, dtype=np.int64)
    for n in NGRAMS:
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        starts = np.flatnonzero(tokens[: len(tokens) - n] == tail[0])  # candidates ending before the tail
        for start in starts[::-1]:
            if np.array_equal(tokens[start : start + n], tail):
                follow = tokens[start + n : start + n + k]
                if len(follow):
                    return follow.tolist()
    return []


class DraftLength:
    """How many tokens to draft: doubles after a draft is taken whole, halves after one is refused, and after
    single-token drafts keep being refused, none for a while (longer each time), so that text with nothing to
    look up costs next to nothing (llama.cpp measured its lookup below 1x when it did not back off)."""

    def __init__(self, start: int = 4):
        self.value = start
        self.pause = 0  # steps left without drafting
        self._refusals = 0  # single-token drafts refused in a row

    def next(self) -> int:
        """The draft length for this step (0: do not draft now)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.value

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == 0 and self.value == 1:
            self._refusals += 1
            self.pause = min(MAX_PAUSE, 2**self._refusals)
        elif accepted:
            self._refusals = 0
        if accepted == drafted:
            self.value = min(MAX_DRAFT, self.value * 2)
        elif accepted == 0:
            self.value = max(1, self.value // 2)
