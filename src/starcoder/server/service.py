"""What every route of the server shares: errors in each API's shape, tokenizing off the event loop, and turning
jobs into answers and streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..api import StarCoder
from ..errors import StarCoderError
from ..generate import Completion, SamplingParams
from .engine import Engine, Job, Overloaded

log = logging.getLogger(__name__)

OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
TGI_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}
# Texts shorter than this are tokenized in place (a fraction of a millisecond); longer ones in a worker thread, so
# that a large request never stalls the event loop (and every other client's stream with it).
INLINE_CHARS = 16_384
# Names that mean "whatever this server serves": TGI's clients send one of these (huggingface_hub sends "tgi").
MODEL_ALIASES = ("", "default", "tgi", "dummy")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def api_of(request: Request) -> str:
    """Which API's error shape a path answers in: "openai", "llamacpp" or "tgi"."""
    path = request.url.path
    if path.startswith("/v1/"):
        return "openai"
    if path in ("/infill", "/completion", "/completions"):
        return "llamacpp"
    return "tgi"


def as_api_error(e: BaseException, api: str) -> APIError:
    """Any failure as the 4xx or 5xx it is: the user's problem, a full server, a timeout, or the server's fault."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return APIError(503 if api == "openai" else 429, str(e), kind="server_overloaded")
    if isinstance(e, StarCoderError):
        return APIError(400 if api != "tgi" else 422, str(e))
    if isinstance(e, TimeoutError):
        return APIError(504, str(e) or "timed out", kind="timeout")
    log.error("request failed: %r", e)
    return APIError(424 if api == "tgi" else 500, f"generation failed: {e}", kind="server_error")


TGI_ERROR_TYPES = {400: "validation", 405: "validation", 413: "validation", 422: "validation", 401: "authentication",
                   404: "not_found", 429: "overloaded", 503: "overloaded", 504: "timeout"}


def error_body(api: str, e: APIError) -> dict:
    if api == "openai":
        return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    if api == "llamacpp":
        return {"error": {"code": e.status, "message": e.message, "type": e.kind}}
    return {"error": e.message, "error_type": TGI_ERROR_TYPES.get(e.status, "generation")}


def error_response(request: Request, e: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(api_of(request), e), e.status, headers=headers)


class Service:
    def __init__(self, sc: StarCoder, engine: Engine, model_name: str, timeout: float, fim_mode: str = "psm"):
        self.sc, self.engine, self.model_name, self.timeout = sc, engine, model_name, timeout
        self.fim_mode = fim_mode  # the layout of fill-in-the-middle prompts the server builds

    def infill_prompt(self, prefix: str, suffix: str) -> str:
        return self.sc.infill_prompt(prefix, suffix, self.fim_mode)

    def check_model(self, name: str | None, any_name: bool = False) -> None:
        """The model a request names must be this server's (or an alias); TGI's chat route takes any name."""
        if any_name or name is None or name in MODEL_ALIASES or name == self.model_name:
            return
        raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                       code="model_not_found")

    # ------------------------------------------------------------------ text <-> tokens, large ones off the event loop
    async def encode(self, text: str) -> list[int]:
        if len(text) < INLINE_CHARS:
            return self.sc.tokenizer.encode(text)
        return await run_in_threadpool(self.sc.tokenizer.encode, text)

    async def decode(self, ids: list[int]) -> str:
        if len(ids) < INLINE_CHARS // 4:
            return self.sc.tokenizer.decode(ids)
        return await run_in_threadpool(self.sc.tokenizer.decode, ids)

    async def tokens_of(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = [await self.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.sc.tokenizer.vocab_size
        for ids in out:
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return out

    # ------------------------------------------------------------------ jobs
    def submit_all(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
        jobs: list[Job] = []
        try:
            for ids in prompts:
                jobs.append(self.engine.submit(ids, params, n))
        except BaseException:
            for job in jobs:
                self.engine.cancel(job)
            raise
        return jobs

    async def collect(self, request: Request, jobs: list[Job]) -> list[list[Completion]]:
        """Every completion of every job; cancels all of them if the client leaves, time runs out, or one fails."""

        async def one(job: Job) -> list[Completion]:
            done: list[Completion | None] = [None] * job.n
            async for event in job.stream(self.timeout):
                if event.completion is not None:
                    done[event.sample] = event.completion
            return done  # type: ignore[return-value]

        async def client_gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)

        work = asyncio.ensure_future(asyncio.gather(*(one(j) for j in jobs)))
        watcher = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "client closed the request")
            return work.result()
        except TimeoutError:
            raise self._timed_out() from None
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            for job in jobs:
                self.engine.cancel(job)

    async def merged(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Any]]:
        """(job index, event) as they come, from several jobs at once."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for event in job.stream(self.timeout):
                    await queue.put((i, event))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, j)) for i, j in enumerate(jobs)]
        open_jobs = len(jobs)
        try:
            while open_jobs:
                i, item = await queue.get()
                if item is None:
                    open_jobs -= 1
                elif isinstance(item, TimeoutError):
                    raise self._timed_out()
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for job in jobs:
                self.engine.cancel(job)

    def _timed_out(self) -> APIError:
        return APIError(504, f"no token within {self.timeout:g} s", kind="timeout")

    def sse(self, chunks: AsyncIterator[dict], api: str) -> StreamingResponse:
        """Server-sent events. A stream that fails after it started ends with an error event in its API's shape
        (OpenAI: a data line with {"error": ...} then [DONE]; TGI: an `error` event; llama.cpp: an `error:`
        line), never silently."""

        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes into the stream
                error = json.dumps(error_body(api, as_api_error(e, api)), ensure_ascii=False)
                yield {"openai": f"data: {error}\n\n", "tgi": f"event: error\ndata: {error}\n\n",
                       "llamacpp": f"error: {error}\n\n"}[api]
            if api == "openai":
                yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ shared answer pieces
    def openai_logprobs(self, c: Completion, echo: bool = False) -> dict:
        """OpenAI's legacy logprobs object; with echo, the prompt's tokens come first (the very first has no
        logprob), as lm-eval's loglikelihood reads them."""
        tokens = (c.prompt_logprobs or []) + c.tokens if echo else c.tokens
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.logprob is None else {text: lp for _, text, lp in (t.top or [])}
                                 for t in tokens],
                "text_offset": offsets}

    def created(self) -> int:
        return int(time.time())


def service(request: Request) -> Service:
    """The app's Service, for the routes (each API's routes are plain functions on a router)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
