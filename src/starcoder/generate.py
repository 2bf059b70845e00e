"""Generation: sampling parameters, one sequence's state, and the one token generator everyone uses.

The Generator keeps each sequence in a slot (a row) of one preallocated KV cache. A new prompt is prefilled
alone into a free slot (its n samples copy that slot instead of prefilling again); then every step decodes one
token for all slots together, each at its own position. Sequences can join between steps and leave when they
finish (the last slot moves into the hole), so the CLI, the evaluation harness and the server's continuous
batching all run on the same two calls: add() and step().
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import PrefixStore
from .errors import ModelOutputError, SamplingError, StarCoderError
from .fim import PromptFormat
from .speculate import MODES, DraftLength, ngram_draft
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


def _average(mean: float | None, value: float, weight: float = 0.2) -> float:
    return value if mean is None else (1 - weight) * mean + weight * value


def all_finite(logits: Tensor) -> Tensor:
    """(..., V) -> (...): whether each row has no nan or inf. A row's sum is not finite exactly when one of its
    values is not (finite logits cannot add up past float range), and summing is 30x cheaper than isfinite."""
    return torch.isfinite(logits.sum(-1))


@dataclass(eq=False)
class Prefill:
    """A prompt being computed into the scratch row, a chunk at a time, before its n samples take their rows."""

    ids: list[int]
    params: SamplingParams
    n: int
    request: int
    done: int = 0  # prompt tokens whose keys and values are in the scratch row
    started: bool = False
    logits: list[Tensor] = field(default_factory=list)  # every position's, when the prompt is scored


class Generator:
    """Sequences in the slots of one KV cache: submit() queues a prompt, step() computes a chunk of the oldest
    queued prompt and then one token for every running sequence; add() is submit() plus the whole prefill."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_len: int | None = None,
                 prefix_cache_mb: float = 256.0, prefill_chunk: int | None = None, speculate: str = "none"):
        if speculate not in MODES:
            raise StarCoderError(f"unknown speculation {speculate!r}; choose one of {', '.join(MODES)}")
        self.model, self.tokenizer = model, tokenizer
        self.format = PromptFormat.for_tokenizer(tokenizer)
        self.stop_ids = {tokenizer.token_id(t) for t in self.format.stop_tokens}
        context = model.config.max_positions
        self.max_len = min(max_len or context, context)
        self.cache = model.new_cache(max_batch, self.max_len)
        self.scratch = model.new_cache(1, self.max_len)  # prompts are computed here, then copied to their slots
        self.prefixes = PrefixStore(int(prefix_cache_mb * 2**20))
        # Prompt tokens computed per step. None: as many as fit in about two decode steps' time while others
        # decode (their longest gap stays near three ordinary ones), the whole prompt when nothing does.
        self.prefill_chunk = prefill_chunk
        self._step_seconds: float | None = None  # moving averages: a decode step, and a prompt token in a chunk
        self._token_seconds: float | None = None
        self.pending: deque[Prefill] = deque()
        self.active: list[Sequence] = []  # active[i] lives in cache row i
        self.reused_tokens = 0  # prompt tokens taken from the prefix store instead of computed
        self.speculate = speculate  # "ngram": prompt lookup while one sequence decodes alone (see speculate.py)
        self.drafted_tokens = self.accepted_tokens = 0

    @property
    def free_slots(self) -> int:
        return self.cache.batch_size - len(self.active) - sum(p.n for p in self.pending)

    def fit(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt, checked against the context; with params.truncate its start is dropped to fit."""
        if not prompt_ids:
            raise StarCoderError("the prompt is empty")
        room = self.max_len - params.max_new_tokens
        if len(prompt_ids) <= room:
            return list(prompt_ids)
        if params.truncate and room > 0:
            return list(prompt_ids[-room:])
        raise StarCoderError(
            f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"context of {self.max_len} tokens; shorten the prompt, lower max_new_tokens, or truncate the prompt")

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1, request: int = 0) -> None:
        """Queue a prompt for n samples; its slots are held from now on, its first tokens come from step()."""
        if n < 1 or n > self.free_slots:
            raise StarCoderError(f"{n} samples asked, {self.free_slots} free slots of {self.cache.batch_size}")
        self.pending.append(Prefill(self.fit(prompt_ids, params), params, n, request))

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], params: SamplingParams, n: int = 1, request: int = 0) -> list[Event]:
        """Prefill a prompt once for n samples, now; returns each sample's first token."""
        self.submit(prompt_ids, params, n, request)
        job = self.pending[-1]
        events: list[Event] = []
        while job in self.pending:
            events += self._prefill(None)
        return events

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """A chunk of the oldest queued prompt (its samples' first tokens once it is done), then one new token
        for every running sequence."""
        events = self._timed_prefill() if self.pending else []
        if not self.active:
            return events
        if self.speculate == "ngram" and len(self.active) == 1:
            # Alone, a sequence's step is bound by reading the weights, and checking a few drafted tokens costs
            # about the same. With company the batch already uses that read, and drafting would only add work.
            speculated = self._speculative_step(self.active[0])
            if speculated is not None:
                return events + speculated
        started = time.perf_counter()
        last = torch.tensor([[seq.generated[-1]] for seq in self.active])  # (n, 1)
        logits = self.model(last, cache=self.cache.rows(0, len(self.active))).logits[:, -1]  # (n, V)
        finite = all_finite(logits).tolist()  # (n,)
        self._step_seconds = _average(self._step_seconds, time.perf_counter() - started)
        events += [self._advance(seq, logits[i], finite[i]) for i, seq in enumerate(self.active)]
        self._retire_finished()
        return events

    def _speculative_step(self, seq: Sequence) -> list[Event] | None:
        """Check a prompt-lookup draft in one forward pass and keep it as far as it equals what the sequence
        chooses (sampled or greedy, its own choice decides: the output is plain decoding's). None: no draft."""
        k = min(seq.draft.next(), seq.params.max_new_tokens - len(seq.generated) - 1)
        draft = ngram_draft(seq.prompt_ids + seq.generated, k) if k > 0 else []
        if not draft:
            return None
        start = int(self.cache.lengths[0])
        ids = torch.tensor([[seq.generated[-1], *draft]])  # (1, 1 + k)
        logits = self.model(ids, cache=self.cache.rows(0)).logits[0]  # (1 + k, V): position i checks draft[i]
        finite = all_finite(logits).tolist()
        events, accepted = [], 0
        for i in range(len(draft) + 1):
            events.append(self._advance(seq, logits[i], finite[i]))
            if seq.finish_reason is not None or i == len(draft) or events[-1].token.id != draft[i]:
                break
            accepted += 1
        # Keys and values of refused draft tokens lie past the row's length, where nothing sees them.
        self.cache.lengths[0] = start + 1 + accepted
        seq.draft.update(len(draft), accepted)
        self.drafted_tokens += len(draft)
        self.accepted_tokens += accepted
        self._retire_finished()
        return events

    def cancel(self, request: int) -> None:
        """Stop every sequence of a request now (a client went away); its slots are free after this call. The
        part of its prompt already computed stays in the prefix store."""
        for job in list(self.pending):
            if job.request == request:
                if job is self.pending[0] and job.done and job.params.prompt_logprobs is None:
                    self.prefixes.put(job.ids[: job.done], *self.scratch.keys_values(0, job.done))
                self.pending.remove(job)
        for seq in self.active:
            if seq.request == request and seq.finish_reason is None:
                seq.finish_reason = "stop"
        self._retire_finished()

    # ------------------------------------------------------------------ prompts
    def _chunk(self) -> int | None:
        if self.prefill_chunk or not self.active:
            return self.prefill_chunk
        if self._step_seconds is None or self._token_seconds is None:
            return 32  # a first, small chunk to learn how long a prompt token takes
        return max(16, int(2 * self._step_seconds / self._token_seconds))

    def _timed_prefill(self) -> list[Event]:
        job, chunk = self.pending[0], self._chunk()
        before, started = job.done, time.perf_counter()
        events = self._prefill(chunk)
        if chunk is not None and job.done > before:
            self._token_seconds = _average(self._token_seconds, (time.perf_counter() - started) / (job.done - before))
        return events

    def _prefill(self, budget: int | None) -> list[Event]:
        """Compute up to `budget` more tokens of the oldest queued prompt; when it is complete, its samples
        take their slots and choose their first tokens. A prompt that fails fails its own request only."""
        job = self.pending[0]
        scored = job.params.prompt_logprobs is not None  # scoring needs every position's logits: no reuse
        try:
            if not job.started:
                job.started = True
                self.scratch.clear(0)
                prefix, n = (None, 0) if scored else self.prefixes.longest(job.ids)
                n = min(n, len(job.ids) - 1)  # the last token is always computed: its logits pick the first token
                if prefix is not None and n > 0:
                    self.scratch.load(0, prefix.k[:, :, :n], prefix.v[:, :, :n])
                    job.done = n
                    self.reused_tokens += n
            end = len(job.ids) if budget is None else min(len(job.ids), job.done + budget)
            chunk = torch.tensor([job.ids[job.done : end]])
            logits = self.model(chunk, cache=self.scratch.rows(0), logits_to_keep=0 if scored else 1).logits[0]
            job.done = end
            if scored:
                job.logits.append(logits)
            if end < len(job.ids):
                return []
        except Exception as e:  # noqa: BLE001 - handed to whoever asked for this prompt
            self.pending.popleft()
            return [Event(job.request, 0, TokenInfo(-1, ""), "", "error", error=e)]
        self.pending.popleft()
        kept = self.scratch.keys_values(0, len(job.ids))
        self.prefixes.put(job.ids, *kept)
        slot = len(self.active)
        sequences = []
        for sample in range(job.n):
            self.cache.load(slot + sample, *kept)
            sequences.append(Sequence(job.ids, job.params, self.tokenizer, self.stop_ids, job.request, sample))
        if scored:
            sequences[0].score_prompt(torch.cat(job.logits))
            for seq in sequences[1:]:
                seq.prompt_logprobs = sequences[0].prompt_logprobs
        last = logits[-1]
        self.active.extend(sequences)
        finite = bool(all_finite(last))
        events = [self._advance(seq, last, finite) for seq in sequences]
        self._retire_finished()
        return events

    def _advance(self, seq: Sequence, logits: Tensor, finite: bool) -> Event:
        """The sequence's next token; a sequence that cannot go on fails alone, the others keep their rows."""
        try:
            if not finite:
                raise ModelOutputError("the model computed non-finite logits (nan or inf)")
            info = seq.choose(logits)
            text = seq.append(info)
        except Exception as e:  # noqa: BLE001 - handed to whoever asked for this sequence
            seq.finish_reason = "error"
            return Event(seq.request, seq.sample, TokenInfo(-1, ""), "", "error", error=e)
        done = seq.finish_reason is not None
        return Event(seq.request, seq.sample, info, text, seq.finish_reason, seq.completion() if done else None)

    def _retire_finished(self) -> None:
        i = 0
        while i < len(self.active):
            if self.active[i].finish_reason is None:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:  # keep the active slots contiguous: the last one moves into the hole
                self.cache.copy_row(last, i)
                self.active[i] = self.active[last]
            self.cache.clear(last)
            self.active.pop()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1


def stream(model, tokenizer: Tokenizer, requests: Seq[Request], max_batch: int = 8,
           speculate: str = "none") -> Iterator[Event]:
    """Run requests through one Generator, admitting each as soon as it has slots for all its samples."""
    if not requests:
        return
    longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
    batch = max(max_batch, max(r.n for r in requests))
    generator = Generator(model, tokenizer, max_batch=batch, max_len=longest, speculate=speculate)
    for r in requests:  # fail before any work is done
        generator.fit(r.prompt_ids, r.params)
    pending = list(enumerate(requests))
    while pending or generator.active:
        while pending and pending[0][1].n <= generator.free_slots:
            index, request = pending.pop(0)
            yield from _raising(generator.add(request.prompt_ids, request.params, request.n, index))
        yield from _raising(generator.step())


def _raising(events: list[Event]) -> Iterator[Event]:
    for event in events:
        if event.error is not None:
            raise event.error
        yield event


def generate(model, tokenizer: Tokenizer, requests: Seq[Request], max_batch: int = 8,
             speculate: str = "none") -> list[list[Completion]]:
    """Every request's n completions, in order."""
    results: list[list[Completion | None]] = [[None] * r.n for r in requests]
    for event in stream(model, tokenizer, requests, max_batch, speculate):
        if event.completion is not None:
            results[event.request][event.sample] = event.completion
    return results  # type: ignore[return-value]
