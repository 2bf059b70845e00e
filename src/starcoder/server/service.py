"""What every route of the server shares: the engine, the model, and turning jobs into answers and streams."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..api import StarCoder
from ..errors import StarCoderError
from ..generate import Completion, SamplingParams
from .engine import Engine, Job

OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
TGI_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    if is_openai(request):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)
    tgi_kind = {400: "validation", 422: "validation", 401: "authentication", 404: "not_found",
                429: "overloaded", 503: "overloaded", 504: "timeout"}.get(status, "generation")
    return JSONResponse({"error": message, "error_type": tgi_kind}, status)



class Service:
    def __init__(self, sc: StarCoder, engine: Engine, model_name: str, timeout: float):
        self.sc, self.engine, self.model_name, self.timeout = sc, engine, model_name, timeout

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name, "default"):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", "model",
                           code="model_not_found")

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
        """Every completion of every job; cancels all of them if the client leaves or time runs out."""

        async def one(job: Job) -> list[Completion]:
            done: list[Completion | None] = [None] * job.n
            async for event in job.stream(self.timeout):
                if event.completion is not None:
                    done[event.sample] = event.completion
            return done  # type: ignore[return-value]

        async def client_gone() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        work = asyncio.ensure_future(asyncio.gather(*(one(j) for j in jobs)))
        watcher = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "client closed the request")
            return work.result()
        except TimeoutError:
            raise APIError(504, f"no token within {self.timeout:g} s", kind="timeout") from None
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            for job in jobs:
                self.engine.cancel(job)

    async def merged(self, jobs: list[Job]):
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
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for job in jobs:
                self.engine.cancel(job)

    def sse(self, chunks, done_marker: bool = True) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except (StarCoderError, TimeoutError) as e:
                yield f"data: {json.dumps({'error': str(e) or 'timeout'})}\n\n"
            if done_marker:
                yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def tokens_of(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = [self.sc.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.sc.tokenizer.vocab_size
        for ids in out:
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return out

    def openai_logprobs(self, c: Completion, offset: int) -> dict:
        texts = [t.text for t in c.tokens]
        offsets, pos = [], offset
        for text in texts:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in c.tokens],
                "top_logprobs": [{text: lp for _, text, lp in (t.top or [])} for t in c.tokens],
                "text_offset": offsets}

    def created(self) -> int:
        return int(time.time())
