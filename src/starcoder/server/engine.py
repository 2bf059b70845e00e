"""The serving engine: one thread runs the token generator, and requests join and leave it between steps.

HTTP handlers run on the asyncio loop; the model runs on this engine's own thread, so that a decode step never
blocks the event loop. Handlers submit jobs and cancel them through a command queue; the thread admits waiting
jobs as slots free up (continuous batching: a new request starts decoding at the next step, not when the batch
is done), steps every active sequence, and hands each job its events on the job's own asyncio queue.

Failures stay with the request that caused them: a prompt that cannot be prefilled fails its own job, a sequence
whose sampling breaks fails its own job (its other samples are stopped), and the sequences beside it go on as
if nothing happened. Only a batched decode step that fails as a whole fails the jobs that were in it; jobs
still waiting for a slot are untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import StarCoderError
from ..generate import Event, Generator, SamplingParams

log = logging.getLogger(__name__)


class Overloaded(StarCoderError):
    """The waiting queue is full."""


@dataclass
class Job:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    first_event_at: float | None = None  # when the handler received the first token (time to first token)
    finished: int = 0  # samples whose completion the handler has received
    engine_finished: int = 0  # samples the engine has completed (the engine thread's own count)

    async def stream(self, timeout: float | None = None):
        """Events until every sample is finished; raises TimeoutError when none comes within `timeout`."""
        while self.finished < self.n:
            item = await asyncio.wait_for(self.events.get(), timeout)
            if isinstance(item, BaseException):
                raise item
            if self.first_event_at is None:
                self.first_event_at = time.monotonic()
            if item.completion is not None:
                self.finished += 1
            yield item


@dataclass
class Stats:
    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0


class Engine:
    def __init__(self, model, tokenizer, max_queue: int = 64, **generator_options):
        """generator_options are the Generator's (max_batch, max_len, prefix_cache_mb, prefill_chunk, speculate,
        cache_reuse)."""
        self.generator = Generator(model, tokenizer, **generator_options)
        self.max_queue = max_queue
        self.stats = Stats()
        self._commands: queue.Queue = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._in_transit = 0  # submitted jobs the engine thread has not taken yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="starcoder-engine", daemon=True)
        self._thread.start()

    @property
    def max_batch(self) -> int:
        return self.generator.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.generator.max_len

    @property
    def waiting(self) -> int:
        """Requests without their first token yet: queued, or having their prompt computed."""
        return len(self._waiting) + self._in_transit + len(self.generator.pending)

    @property
    def active(self) -> int:
        return len(self.generator.active)

    def submit(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> Job:
        """Queue a request (from the event loop). Bad prompts fail here, before anything is queued."""
        if n < 1 or n > self.max_batch:
            raise StarCoderError(f"n must be between 1 and {self.max_batch}, got {n}")
        prompt_ids = self.generator.fit(prompt_ids, params)
        # Requests that would have to wait for a slot (the count is read across threads: approximate, and fine)
        if self.waiting + n - self.generator.free_slots > self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"the server is busy: {self.waiting} requests are waiting; try again later")
        job = Job(next(self._ids), prompt_ids, params, n, asyncio.get_running_loop())
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt_ids)
        with self._lock:
            self._in_transit += 1
        self._commands.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's slots at the next step (its client went away, or it timed out)."""
        if job.finished < job.n:
            self._commands.put(("cancel", job))

    def close(self) -> None:
        self._stop.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_commands(block=not (self.generator.active or self.generator.pending or self._waiting))
            start = time.monotonic()
            self._admit()
            if self.generator.active or self.generator.pending:
                try:
                    events = self.generator.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the server
                    log.exception("a decode step failed")
                    for request in {seq.request for seq in self.generator.active}:
                        self.generator.cancel(request)
                        self._fail(self._jobs.get(request), e)
                else:
                    self._deliver(events)
                    self.stats.steps += 1
            self.stats.busy_seconds += time.monotonic() - start

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = command
            if kind == "submit":
                self._jobs[job.id] = job
                self._waiting.append(job)
                with self._lock:
                    self._in_transit -= 1
            elif kind == "cancel" and job.id in self._jobs:
                self.stats.cancelled += 1
                if job in self._waiting:
                    self._waiting.remove(job)
                self.generator.cancel(job.id)
                del self._jobs[job.id]
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self._waiting and self._waiting[0].n <= self.generator.free_slots:
            job = self._waiting.popleft()
            try:  # its prompt is computed a chunk per step, between the decode steps of running sequences
                self.generator.submit(job.prompt_ids, job.params, job.n, request=job.id)
            except StarCoderError as e:
                self._fail(job, e)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            job = self._jobs.get(event.request)
            if job is None:
                continue
            if event.error is not None:  # one sample failed: the request fails, its other samples stop
                if not isinstance(event.error, StarCoderError):
                    log.error("generation failed: %s", event.error)
                self.generator.cancel(job.id)
                self._fail(job, event.error)
                continue
            self.stats.generated_tokens += 1
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
            if event.completion is not None:
                job.engine_finished += 1
                if job.engine_finished == job.n:
                    del self._jobs[job.id]

    def _fail(self, job: Job | None, error: Exception) -> None:
        if job is None or self._jobs.pop(job.id, None) is None:
            return  # already failed, finished or cancelled
        self.stats.failed += 1
        job.loop.call_soon_threadsafe(job.events.put_nowait, error)
