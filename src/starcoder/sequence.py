"""One sequence being generated: its sampling settings, how it chooses each token, and its text (stop strings,
characters split across tokens, llama.cpp's indentation and time limits), and what it reports: token events and
the finished completion. The Generator (generate.py) runs many of these together.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SamplingError, StarCoderError
from .speculate import DraftLength
from .tokenizer import Tokenizer

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # a temperature this small means greedy (as in vLLM): dividing by it overflows the scores
SEEDS = 2**64  # seeds are unsigned 64-bit numbers, as OpenAI and TGI allow


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL / transformers: over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI: over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # in [0, 2**64); None draws one (reported in the Completion)
    stop: tuple[str, ...] = ()  # strings that end the generation, not included in the text
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k alternatives
    ignore_eos: bool = False
    truncate: bool = False  # drop the start of a prompt that does not fit, instead of failing
    prompt_logprobs: int | None = None  # also score the prompt: each prompt token's logprob and k alternatives
    min_indent: int = 0  # llama.cpp's n_indent: end before a new line that is indented less than this
    time_limit: float | None = None  # llama.cpp's t_max_predict_ms, in s: once spent, end at the next line break

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", 0 <= self.temperature < float("inf"), ">= 0 and finite"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEEDS),
             "an integer in [0, 2**64)"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"in [0, {MAX_LOGPROBS}]"),
            ("min_indent", isinstance(self.min_indent, int) and self.min_indent >= 0, "an integer >= 0"),
            ("time_limit", self.time_limit is None or self.time_limit > 0, "> 0 seconds"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise StarCoderError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class TokenInfo:
    id: int
    text: str
    special: bool = False
    logprob: float | None = None  # under the model's own distribution (before penalties and temperature)
    top: list[tuple[int, str, float]] | None = None  # (id, text, logprob) of the most likely alternatives


@dataclass
class Completion:
    text: str
    finish_reason: str  # "length", "stop" or "eos"
    token_ids: list[int]
    tokens: list[TokenInfo]
    prompt_tokens: int
    seed: int
    request: int = 0
    sample: int = 0
    prompt_logprobs: list[TokenInfo] | None = None  # with params.prompt_logprobs: every prompt token (the first
    # has no logprob: nothing predicts it)


@dataclass
class Event:
    """One new token of one sequence: what to show now, and the completion once it is finished."""

    request: int
    sample: int
    token: TokenInfo
    text: str  # newly visible text ("" while text is held back: a broken character, a possible stop string)
    finish_reason: str | None = None
    completion: Completion | None = None
    error: Exception | None = None  # this sequence failed (and is finished); the others go on


class Sequence:
    """One sample being generated: its tokens, random state, penalties and stop handling."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, stop_ids: set[int],
                 request: int = 0, sample: int = 0):
        self.prompt_ids, self.params, self.tokenizer = prompt_ids, params, tokenizer
        self.stop_ids = set() if params.ignore_eos else stop_ids
        self.request, self.sample = request, sample
        base = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63 - 1)
        self.seed = (base + sample) % SEEDS  # n samples with one seed differ from each other and repeat run to run
        self.rng = torch.Generator().manual_seed(self.seed)
        self.generated: list[int] = []
        self.tokens: list[TokenInfo] = []
        self.decoder = tokenizer.stream()
        self.text = ""  # decoded so far, possibly ahead of what was emitted
        self.emitted = 0  # characters of text already shown
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[TokenInfo] | None = None
        self.draft = DraftLength()
        self.started = time.monotonic()
        self.line_start = 0  # where the text's current line begins (for min_indent)
        self._longest_stop = max((len(s) for s in params.stop), default=0)

    # ------------------------------------------------------------------ choosing the next token
    def choose(self, logits: Tensor) -> TokenInfo:
        """Apply penalties, temperature, top-k and top-p to one row of logits (V,) and pick a token."""
        p = self.params
        raw = logits.float()
        scores = raw
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(self.generated)), dtype=torch.long)
            picked = scores[seen]
            scores = scores.index_put((seen,), torch.where(picked < 0, picked * p.repetition_penalty,
                                                           picked / p.repetition_penalty))
        if (p.presence_penalty or p.frequency_penalty) and self.generated:
            counts = torch.bincount(torch.tensor(self.generated), minlength=scores.shape[0])[: scores.shape[0]]
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        if p.greedy:
            token = int(scores.argmax())
        else:
            scores = scores / p.temperature
            if p.top_k and p.top_k < scores.shape[0]:
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=True)
                probs = ordered.softmax(-1)
                # Keep the smallest set of most likely tokens whose probabilities reach top_p (at least one).
                drop = (probs.cumsum(-1) - probs) >= p.top_p
                drop[0] = False  # a top_p that rounds to 0 in float32 still keeps the likeliest token
                scores = scores.index_put((order[drop],), torch.tensor(float("-inf")))
            probs = scores.softmax(-1)
            if not bool(all_finite(probs)):
                raise SamplingError("sampling failed: the penalties and temperature of this request made every "
                                    "token's probability undefined")
            token = int(torch.multinomial(probs, 1, generator=self.rng))
        return self._info(token, raw)

    def score_prompt(self, logits: Tensor) -> None:
        """Each prompt token's log-probability from the prefill's logits (T, V), as the legacy OpenAI `echo`
        gives them (lm-eval's loglikelihood reads them)."""
        logprobs = logits[:-1].float().log_softmax(-1)  # (T-1, V): position t predicts token t + 1
        targets = torch.tensor(self.prompt_ids[1:])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        k = self.params.prompt_logprobs or 0
        tops = torch.topk(logprobs, k) if k else None
        decode, special = self.tokenizer.decode, self.tokenizer.special_ids
        first = self.prompt_ids[0]
        self.prompt_logprobs = [TokenInfo(first, decode([first]), first in special)]  # nothing predicts it
        for t, token in enumerate(self.prompt_ids[1:]):
            top = None
            if tops is not None:
                top = [(int(i), decode([int(i)]), float(v))
                       for v, i in zip(tops.values[t], tops.indices[t], strict=True)]
            self.prompt_logprobs.append(TokenInfo(token, decode([token]), token in special, chosen[t], top))

    def _info(self, token: int, raw: Tensor) -> TokenInfo:
        decode = self.tokenizer.decode
        info = TokenInfo(token, decode([token]), token in self.tokenizer.special_ids)
        if self.params.logprobs is not None:
            logprobs = raw.log_softmax(-1)
            info.logprob = float(logprobs[token])
            if self.params.logprobs:
                values, ids = torch.topk(logprobs, self.params.logprobs)
                info.top = [(int(i), decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]
        return info

    # ------------------------------------------------------------------ text, stop strings, finishing
    def append(self, info: TokenInfo) -> str:
        """Record the chosen token; return the text that may be shown now."""
        self.generated.append(info.id)
        self.tokens.append(info)
        if info.id in self.stop_ids:
            self.text += self.decoder.flush()
            return self._finish("eos", len(self.text))
        before = len(self.text)
        self.text += self.decoder.push(info.id)
        out_of_tokens = len(self.generated) >= self.params.max_new_tokens
        if out_of_tokens:
            self.text += self.decoder.flush()
        stop_at = self._find_stop()
        if stop_at is not None:
            return self._finish("stop", stop_at)
        dedent_at = self._find_dedent()
        if dedent_at is not None:
            return self._finish("length", dedent_at)
        if out_of_tokens or self._out_of_time(before):
            return self._finish("length", len(self.text))
        visible = len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted : visible], max(self.emitted, visible)
        return delta

    def _find_stop(self) -> int | None:
        # Text before `emitted` holds no stop string nor the start of one (see _held_back), so search from there.
        hits = [i for s in self.params.stop if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits, default=None)

    def _find_dedent(self) -> int | None:
        """With min_indent: where the first line that starts less indented begins its text (as llama.cpp cuts
        it: the indentation stays, the line's text goes)."""
        if not self.params.min_indent:
            return None
        while (newline := self.text.find("\n", self.line_start)) >= 0:
            self.line_start = newline + 1
            rest = self.text[self.line_start :]
            body = rest.lstrip(" \t")
            if not body:  # the line's first character is not written yet
                self.line_start = newline  # look at this line again with the next token
                return None
            if len(rest) - len(body) < self.params.min_indent:
                return self.line_start + len(rest) - len(body)
        return None

    def _out_of_time(self, before: int) -> bool:
        """llama.cpp's time budget: once it is spent, the generation ends with a token that breaks a line."""
        limit = self.params.time_limit
        return limit is not None and "\n" in self.text[before:] and time.monotonic() - self.started > limit

    def _held_back(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        for k in range(min(len(self.text), self._longest_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0

    def _finish(self, reason: str, end: int) -> str:
        self.finish_reason = reason
        self.text = self.text[:end]
        delta, self.emitted = self.text[self.emitted :], end
        return delta

    def completion(self) -> Completion:
        return Completion(self.text, self.finish_reason or "length", list(self.generated), list(self.tokens),
                          len(self.prompt_ids), self.seed, self.request, self.sample, self.prompt_logprobs)


def all_finite(logits: Tensor) -> Tensor:
    """(..., V) -> (...): whether each row has no nan or inf. A row's sum is not finite exactly when one of its
    values is not (finite logits cannot add up past float range), and summing is 30x cheaper than isfinite."""
    return torch.isfinite(logits.sum(-1))
