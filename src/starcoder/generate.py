"""Generation: the one token generator everyone uses (the CLI, the evaluation harness and the server).

The Generator keeps each sequence in a slot (a row) of one preallocated KV cache. A prompt is computed in a scratch
row, a chunk per step inside the forward pass that decodes the other sequences (one read of the weights for
both), starting from the longest prefix kept from earlier prompts; then its n samples take their slots, and every
step decodes one token for all slots together, each at its own position (or checks a prompt-lookup draft when a
sequence decodes alone). Sequences join between steps and leave when they finish (the last slot moves into the
hole): submit()/add() and step() are all there is.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import PREFIX_CACHE_MB, Prefix, PrefixStore, common_suffix
from .errors import ModelOutputError, StarCoderError
from .fim import PromptFormat
from .model import move_keys
from .sequence import MAX_LOGPROBS, Completion, Event, SamplingParams, Sequence, TokenInfo, all_finite
from .speculate import Drafter, drafter_for
from .tokenizer import Tokenizer

__all__ = ["MAX_LOGPROBS", "Completion", "Event", "Generator", "Request", "SamplingParams", "Sequence",
           "TokenInfo", "all_finite", "generate", "stream"]


def _average(mean: float | None, value: float, weight: float = 0.2) -> float:
    return value if mean is None else (1 - weight) * mean + weight * value


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
    moved: tuple[int, Tensor, Tensor] | None = None  # keys and values to take at a position instead of computing


class Generator:
    """Sequences in the slots of one KV cache: submit() queues a prompt, step() computes a chunk of the oldest
    queued prompt and then one token for every running sequence; add() is submit() plus the whole prefill."""

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_len: int | None = None,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, prefill_chunk: int | None = None,
                 speculate: str | Drafter | None = "none", cache_reuse: int = 0):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise StarCoderError(f"prefill_chunk must be a positive number of tokens, not {prefill_chunk}")
        if cache_reuse < 0:
            raise StarCoderError(f"cache_reuse must be 0 (off) or a number of tokens, not {cache_reuse}")
        self.model, self.tokenizer = model, tokenizer
        self.format = PromptFormat.for_tokenizer(tokenizer)
        self.stop_ids = {tokenizer.token_id(t) for t in self.format.stop_tokens}
        context = model.config.max_positions
        self.max_len = min(max_len or context, context)
        self.cache = model.new_cache(max_batch, self.max_len, paged=True)  # the slots of running sequences
        self.scratch = model.new_cache(1, self.max_len)  # prompts are computed here, then copied to their slots
        self.prefixes = PrefixStore(int(prefix_cache_mb * 2**20))
        # Prompt tokens computed per step. None: while others decode, as many as cost about one decode step (see
        # _chunk); the whole prompt when nothing does.
        self.prefill_chunk = prefill_chunk
        # Off (0) or the fewest tokens after an edit worth taking from the kept prompt at their new positions
        # (llama.cpp's --cache-reuse): approximate, as their keys and values saw the text before the edit.
        self.cache_reuse = cache_reuse
        self._step_seconds: float | None = None  # moving averages: a decode step, and what a prompt token adds
        self._token_seconds: float | None = None
        self._last_chunk = 32  # prompt tokens computed beside the last decode step
        self.pending: deque[Prefill] = deque()
        self.active: list[Sequence] = []  # active[i] lives in cache row i
        self.reused_tokens = 0  # prompt tokens taken from the prefix store instead of computed
        # Drafts (prompt lookup or a draft model, see speculate.py) are checked while one sequence decodes alone.
        self.drafter = drafter_for(speculate)
        self.drafted_tokens = self.accepted_tokens = 0
        self._draft_cost: float | None = None  # moving average: a drafted token's time, in decode steps

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
        """One new token for every running sequence, with a chunk of the oldest queued prompt computed in the same
        forward pass (its samples' first tokens once it is done); with nothing running, the prompt alone."""
        job = self.pending[0] if self.pending else None
        if not self.active:
            return self._prefill(self.prefill_chunk) if job else []
        if job is None and self.drafter is not None and len(self.active) == 1:
            # Alone, a sequence's step is bound by reading the weights, and checking a few drafted tokens costs
            # about the same. With company the batch already uses that read, and drafting would only add work.
            speculated = self._speculative_step(self.active[0])
            if speculated is not None:
                return speculated
        chunk, events = None, []
        if job is not None:
            try:
                chunk = self._next_chunk(job, self._chunk())
                self._last_chunk = len(chunk)
            except Exception as e:  # noqa: BLE001 - handed to whoever asked for this prompt
                events.append(self._fail(job, e))
        if chunk is not None:
            started = time.perf_counter()
            last = torch.tensor([[seq.generated[-1]] for seq in self.active])  # (n, 1)
            scored = job.params.prompt_logprobs is not None
            try:
                logits, prompt_logits = self.model.forward_together([
                    (last, self.cache.rows(0, len(self.active)), 1),
                    (torch.tensor([chunk]), self.scratch.rows(0), 0 if scored else 1)])
            except Exception:  # noqa: BLE001 - apart, a prompt that cannot be computed fails only its own request
                events += self._prefill(len(chunk))
                chunk = None
            else:
                logits = logits[:, -1]  # (n, V)
                if self._step_seconds is not None:  # what a prompt token adds to a decode step
                    added = max(time.perf_counter() - started - self._step_seconds, 0.0) / len(chunk)
                    self._token_seconds = _average(self._token_seconds, added)
        if chunk is None:
            started = time.perf_counter()
            last = torch.tensor([[seq.generated[-1]] for seq in self.active])
            logits = self.model(last, cache=self.cache.rows(0, len(self.active))).logits[:, -1]
            self._step_seconds = _average(self._step_seconds, time.perf_counter() - started)
        finite = all_finite(logits).tolist()  # (n,)
        events += [self._advance(seq, logits[i], finite[i]) for i, seq in enumerate(self.active)]
        self._retire_finished()
        if chunk is not None:
            events += self._computed(job, len(chunk), prompt_logits[0])
        return events

    def _speculative_step(self, seq: Sequence) -> list[Event] | None:
        """Check a draft in one forward pass and keep it as far as it equals what the sequence chooses (sampled
        or greedy, its own choice decides: the output is plain decoding's). None: no draft this step."""
        k = min(seq.draft.next(self._draft_cost or 0.0), seq.params.max_new_tokens - len(seq.generated) - 1)
        drafting = time.perf_counter()
        draft = self.drafter.draft(seq.prompt_ids + seq.generated, k) if k > 0 else []
        if not draft:
            return None
        if self._step_seconds:  # what a drafted token costs, in decode steps
            per_token = (time.perf_counter() - drafting) / len(draft) / self._step_seconds
            self._draft_cost = _average(self._draft_cost, per_token)
        start, verifying = int(self.cache.lengths[0]), time.perf_counter()
        ids = torch.tensor([[seq.generated[-1], *draft]])  # (1, 1 + k)
        logits = self.model(ids, cache=self.cache.rows(0)).logits[0]  # (1 + k, V): position i checks draft[i]
        # Checking a few tokens costs about a decode step: it is one, for what a drafted token costs.
        self._step_seconds = _average(self._step_seconds, time.perf_counter() - verifying)
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
        """Prompt tokens to compute with the next decode step: as many as cost about one decode step of their own
        (the running sequences' gap stays near two ordinary steps), or the server's fixed setting."""
        if self.prefill_chunk:
            return self.prefill_chunk
        if self._step_seconds is None or self._token_seconds is None:
            return 32  # a first, small chunk to learn what a prompt token adds
        fits = int(self._step_seconds / max(self._token_seconds, 1e-6))
        # At most twice the last chunk: a step that ran faster than the average (this machine's speed swings) reads
        # as prompt tokens costing nothing, and once computed a 2,000-token prompt in one step (a 12 s gap).
        return max(16, min(fits, 2 * self._last_chunk))

    def _prefill(self, budget: int | None) -> list[Event]:
        """Compute up to `budget` more tokens (None: all) of the oldest queued prompt on their own."""
        job = self.pending[0]
        scored = job.params.prompt_logprobs is not None
        events: list[Event] = []
        while job in self.pending and (budget is None or budget > 0):
            try:
                chunk = self._next_chunk(job, budget)
                ids = torch.tensor([chunk])
                logits = self.model(ids, cache=self.scratch.rows(0), logits_to_keep=0 if scored else 1).logits[0]
            except Exception as e:  # noqa: BLE001 - handed to whoever asked for this prompt
                return events + [self._fail(job, e)]
            events += self._computed(job, len(chunk), logits)
            budget = None if budget is None else budget - len(chunk)
        return events

    def _next_chunk(self, job: Prefill, budget: int | None) -> list[int]:
        """The prompt's next tokens to compute (at most `budget`). A prompt starts from the longest prefix kept
        from earlier prompts, and takes a kept part moved to its new position when it reaches it."""
        if not job.started:
            job.started = True
            self.scratch.clear(0)
            scored = job.params.prompt_logprobs is not None  # scoring needs every position's logits: no reuse
            prefix, n = (None, 0) if scored else self.prefixes.longest(job.ids)
            n = min(n, len(job.ids) - 1)  # the last token is always computed: its logits pick the first token
            if prefix is not None and n > 0:
                self.scratch.load(0, prefix.k[:, :, :n], prefix.v[:, :, :n])
                job.done = n
                self.reused_tokens += n
                job.moved = self._moved_part(prefix, n, job.ids) if self.cache_reuse else None
        if job.moved is not None and job.done == job.moved[0]:
            _, k, v = job.moved
            self.scratch.load(0, k, v, at=job.done)
            job.done += k.shape[2]
            self.reused_tokens += k.shape[2]
            job.moved = None
        stop = len(job.ids) if job.moved is None else job.moved[0]
        return job.ids[job.done : stop if budget is None else min(stop, job.done + budget)]

    def _computed(self, job: Prefill, n: int, logits: Tensor) -> list[Event]:
        """n more prompt tokens are in the scratch row (logits: theirs); when the prompt is complete, its samples
        take their slots and choose their first tokens."""
        job.done += n
        if job.params.prompt_logprobs is not None:
            job.logits.append(logits)
        if job.done < len(job.ids):
            return []
        self.pending.popleft()
        kept = self.scratch.keys_values(0, len(job.ids))
        self.prefixes.put(job.ids, *kept)
        slot = len(self.active)
        sequences = []
        for sample in range(job.n):
            self.cache.load(slot + sample, *kept)
            sequences.append(Sequence(job.ids, job.params, self.tokenizer, self.stop_ids, job.request, sample))
        if job.logits:
            sequences[0].score_prompt(torch.cat(job.logits))
            for seq in sequences[1:]:
                seq.prompt_logprobs = sequences[0].prompt_logprobs
        last = logits[-1]
        self.active.extend(sequences)
        finite = bool(all_finite(last))
        events = [self._advance(seq, last, finite) for seq in sequences]
        self._retire_finished()
        return events

    def _fail(self, job: Prefill, error: Exception) -> Event:
        """A prompt that cannot be computed fails its own request only."""
        self.pending.remove(job)
        return Event(job.request, 0, TokenInfo(-1, ""), "", "error", error=error)

    def _moved_part(self, prefix: Prefix, n: int, ids: list[int]) -> tuple[int, Tensor, Tensor] | None:
        """After an edit (the first n tokens shared), the kept prompt's tokens that the new prompt ends with,
        moved to their new positions, when there are at least cache_reuse of them: the text after the cursor
        when typing into a fill-in-the-middle prompt. The last token is always computed: its logits are needed."""
        shared = min(common_suffix(prefix.tokens, ids), len(ids) - n, len(prefix.tokens) - n)
        length = shared - 1
        at, source = len(ids) - shared, len(prefix.tokens) - shared
        if length < self.cache_reuse or (at != source and self.model.config.learned_positions):
            return None
        part = slice(source, source + length)
        return at, move_keys(prefix.k[:, :, part], at - source, self.model.config), prefix.v[:, :, part]

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
        remember = getattr(self.drafter, "remember", None)  # prompt lookup also searches finished sequences
        i = 0
        while i < len(self.active):
            if self.active[i].finish_reason is None:
                i += 1
                continue
            if remember is not None:
                remember(self.active[i].prompt_ids + self.active[i].generated)
            last = len(self.active) - 1
            if i != last:  # keep the active slots contiguous: the last one moves into the hole
                self.cache.move_row(last, i)
                self.active[i] = self.active[last]
            else:
                self.cache.clear(last)
            self.active.pop()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1


def stream(model, tokenizer: Tokenizer, requests: Seq[Request], max_batch: int = 8,
           speculate: str | Drafter | None = "none") -> Iterator[Event]:
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
             speculate: str | Drafter | None = "none") -> list[list[Completion]]:
    """Every request's n completions, in order."""
    results: list[list[Completion | None]] = [[None] * r.n for r in requests]
    for event in stream(model, tokenizer, requests, max_batch, speculate):
        if event.completion is not None:
            results[event.request][event.sample] = event.completion
    return results  # type: ignore[return-value]
