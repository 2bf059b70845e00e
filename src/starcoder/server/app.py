"""The HTTP server: OpenAI completions (with `suffix` for FIM) and chat, TGI, llama.cpp infill, a playground.

    starcoder serve [--model PATH_OR_ID] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Every request becomes a job of the one Engine, which batches whatever is running. Errors keep each API's own
shape: OpenAI routes (/v1/...) answer {"error": {"message", "type", "param", "code"}}, TGI routes
{"error", "error_type"}; bad input is a 4xx, a full queue 503 (OpenAI) or 429 (TGI).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import StarCoder
from ..chat import STOP as CHAT_STOP
from ..chat import chat_prompt
from ..errors import StarCoderError
from ..generate import Completion, Event, SamplingParams
from .engine import Engine, Job, Overloaded
from .protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, InfillRequest, TokenizeRequest

OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
TGI_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    if _is_openai(request):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)
    tgi_kind = {400: "validation", 422: "validation", 401: "authentication", 404: "not_found",
                429: "overloaded", 503: "overloaded", 504: "timeout"}.get(status, "generation")
    return JSONResponse({"error": message, "error_type": tgi_kind}, status)


def create_app(sc: StarCoder, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, timeout: float = 600.0) -> FastAPI:
    engine = Engine(sc.model, sc.tokenizer, max_batch=max_batch, max_queue=max_queue)
    validation_status = lambda request: 400 if _is_openai(request) else 422  # noqa: E731

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="starcoder", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    # ------------------------------------------------------------------ errors and authentication
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(request, e.status, e.message, e.param, e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "request body is not valid JSON" if first.get("type") == "json_invalid" else (
            f"{where}: {first.get('msg')}" if where else str(first.get("msg")))
        return error_response(request, validation_status(request), message, where or None)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, e: Overloaded):
        return error_response(request, 503 if _is_openai(request) else 429, str(e), kind="server_overloaded")

    @app.exception_handler(StarCoderError)
    async def on_user_error(request: Request, e: StarCoderError):
        return error_response(request, validation_status(request), str(e))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        return error_response(request, e.status_code, str(e.detail), kind="not_found" if e.status_code == 404 else
                              "invalid_request_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(request, 401, "missing or wrong API key (Authorization: Bearer ...)",
                                      kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    # ------------------------------------------------------------------ shared helpers
    def check_model(name: str | None) -> None:
        if name not in (None, "", model_name, "default"):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           code="model_not_found")

    def submit_all(prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
        jobs: list[Job] = []
        try:
            for ids in prompts:
                jobs.append(engine.submit(ids, params, n))
        except BaseException:
            for job in jobs:
                engine.cancel(job)
            raise
        return jobs

    async def collect(request: Request, jobs: list[Job]) -> list[list[Completion]]:
        """Every completion of every job; cancels all of them if the client leaves or time runs out."""

        async def one(job: Job) -> list[Completion]:
            done: list[Completion | None] = [None] * job.n
            async for event in job.stream(timeout):
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
            raise APIError(504, f"no token within {timeout:g} s", kind="timeout") from None
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
            for job in jobs:
                engine.cancel(job)

    async def merged(jobs: list[Job]):
        """(job index, event) as they come, from several jobs at once."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for event in job.stream(timeout):
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
                engine.cancel(job)

    def sse(chunks, done_marker: bool = True) -> StreamingResponse:
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

    def tokens_of(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = [sc.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        vocab = sc.tokenizer.vocab_size
        for ids in out:
            if not ids:
                raise APIError(400, "prompt must not be empty", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return out

    def openai_logprobs(c: Completion, offset: int) -> dict:
        texts = [t.text for t in c.tokens]
        offsets, pos = [], offset
        for text in texts:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in c.tokens],
                "top_logprobs": [{text: lp for _, text, lp in (t.top or [])} for t in c.tokens],
                "text_offset": offsets}

    def created() -> int:
        return int(time.time())

    # ------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created(),
                                            "owned_by": "starcoder"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of different from n is not supported", "best_of")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if body.n > engine.max_batch:
            raise APIError(400, f"n must be at most {engine.max_batch} on this server", "n")
        prompts = tokens_of(body.prompt)
        if body.suffix is not None:
            if not isinstance(body.prompt, str):
                raise APIError(400, "suffix needs a single text prompt", "suffix")
            if body.echo:
                raise APIError(400, "echo cannot be combined with suffix", "echo")
            prompts = [sc.tokenizer.encode(sc.infill_prompt(body.prompt, body.suffix))]
        params = SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                seed=body.seed, stop=tuple(body.stop or ()), logprobs=body.logprobs)
        jobs = submit_all(prompts, params, body.n)
        rid, model = f"cmpl-{secrets.token_hex(12)}", model_name
        echoes = [sc.tokenizer.decode(p) if body.echo else "" for p in prompts]

        if body.stream:
            async def chunks():
                for i, echo in enumerate(echoes):
                    if echo:
                        for s in range(body.n):
                            yield {"id": rid, "object": "text_completion", "created": created(), "model": model,
                                   "choices": [{"text": echo, "index": i * body.n + s, "logprobs": None,
                                                "finish_reason": None}]}
                async for i, event in merged(jobs):
                    if event.text or event.finish_reason:
                        yield {"id": rid, "object": "text_completion", "created": created(), "model": model,
                               "choices": [{"text": event.text, "index": i * body.n + event.sample,
                                            "logprobs": None,
                                            "finish_reason": OPENAI_FINISH.get(event.finish_reason)}]}

            return sse(chunks())
        results = await collect(request, jobs)
        choices = []
        for i, samples in enumerate(results):
            for c in samples:
                choices.append({"text": echoes[i] + c.text, "index": i * body.n + c.sample,
                                "logprobs": openai_logprobs(c, len(echoes[i])) if body.logprobs is not None
                                else None, "finish_reason": OPENAI_FINISH[c.finish_reason]})
        completion_tokens = sum(len(c.token_ids) for samples in results for c in samples)
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": rid, "object": "text_completion", "created": created(), "model": model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if body.n > engine.max_batch:
            raise APIError(400, f"n must be at most {engine.max_batch} on this server", "n")
        prompt = chat_prompt([m.model_dump(exclude={"name"}) for m in body.messages])
        stops = tuple(body.stop or ()) + tuple(s for s in CHAT_STOP if s not in (body.stop or ()))
        params = SamplingParams(max_new_tokens=body.max_completion_tokens or body.max_tokens or 512,
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops,
                                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        ids = sc.tokenizer.encode(prompt)
        (job,) = submit_all([ids], params, body.n)
        rid = f"chatcmpl-{secrets.token_hex(12)}"

        def chunk(index: int, delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created(), "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            async def chunks():
                started: set[int] = set()
                for s in range(body.n):
                    yield chunk(s, {"role": "assistant", "content": ""}, None)
                async for _, event in merged([job]):
                    text = event.text
                    if event.sample not in started:  # the reply follows "Assistant:" after a space
                        text = text.lstrip()
                        if text:
                            started.add(event.sample)
                    if text:
                        yield chunk(event.sample, {"content": text}, None)
                    if event.finish_reason:
                        yield chunk(event.sample, {}, OPENAI_FINISH[event.finish_reason])

            return sse(chunks())
        (samples,) = await collect(request, [job])
        completion_tokens = sum(len(c.token_ids) for c in samples)
        return {"id": rid, "object": "chat.completion", "created": created(), "model": model_name,
                "choices": [{"index": c.sample, "message": {"role": "assistant", "content": c.text.strip()},
                             "finish_reason": OPENAI_FINISH[c.finish_reason]} for c in samples],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(ids) + completion_tokens}}

    # ------------------------------------------------------------------ TGI
    def tgi_job(body: GenerateRequest) -> tuple[Job, list[int], SamplingParams]:
        p = body.parameters
        for name, unsupported in (("best_of", (p.best_of or 1) > 1), ("watermark", p.watermark),
                                  ("grammar", p.grammar is not None), ("adapter_id", p.adapter_id is not None),
                                  ("typical_p", p.typical_p not in (None, 1.0))):
            if unsupported:
                raise APIError(422, f"`{name}` is not supported by this server", name)
        if not body.inputs:
            raise APIError(422, "`inputs` must not be empty", "inputs")
        ids = sc.tokenizer.encode(body.inputs)
        if p.truncate:
            ids = ids[-p.truncate :]
        # As in TGI: sampling when asked, or when any sampling setting is given.
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens or 100, temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_k=p.top_k or 0, top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=tuple(p.stop),
            logprobs=(p.top_n_tokens or 0) if (p.details or p.top_n_tokens) else None)
        (job,) = submit_all([ids], params, 1)
        return job, ids, params

    def tgi_token(t) -> dict:
        return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}

    def tgi_details(body: GenerateRequest, c: Completion, ids: list[int]) -> dict:
        details = {"finish_reason": TGI_FINISH[c.finish_reason], "generated_tokens": len(c.token_ids),
                   "seed": c.seed if body.parameters.do_sample else None,
                   "prefill": [{"id": i, "text": sc.tokenizer.decode([i]), "logprob": None} for i in ids]
                   if body.parameters.decoder_input_details else [],
                   "tokens": [tgi_token(t) for t in c.tokens]}
        if body.parameters.top_n_tokens:
            details["top_tokens"] = [[{"id": i, "text": text, "logprob": lp, "special": i in sc.tokenizer.special_ids}
                                      for i, text, lp in (t.top or [])] for t in c.tokens]
        return details

    async def tgi_generate(body: GenerateRequest, request: Request) -> dict:
        job, ids, _ = tgi_job(body)
        ((c,),) = await collect(request, [job])
        full = body.inputs if body.parameters.return_full_text else ""
        answer = {"generated_text": full + c.text}
        if body.parameters.details:
            answer["details"] = tgi_details(body, c, ids)
        return answer

    def tgi_stream(body: GenerateRequest) -> StreamingResponse:
        job, _, _ = tgi_job(body)

        async def chunks():
            async for _, event in merged([job]):
                c = event.completion
                out = {"index": len(c.token_ids) if c else None, "token": tgi_token(event.token),
                       "generated_text": None, "details": None}
                if c is not None:
                    full = body.inputs if body.parameters.return_full_text else ""
                    out["generated_text"] = full + c.text
                    out["details"] = {"finish_reason": TGI_FINISH[c.finish_reason],
                                      "generated_tokens": len(c.token_ids),
                                      "seed": c.seed if body.parameters.do_sample else None}
                yield out

        return sse(chunks(), done_marker=False)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        return await tgi_generate(body, request)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest):
        return tgi_stream(body)

    @app.post("/")
    async def compat_generate(body: GenerateRequest, request: Request):
        """TGI's route for the Hugging Face inference clients: a list, or a stream with `stream: true`."""
        if body.stream:
            return tgi_stream(body)
        return [await tgi_generate(body, request)]

    @app.get("/info")
    async def info():
        weight = sc.model.model.embed.weight
        return {"model_id": model_name, "model_sha": None, "model_dtype": str(weight.dtype).removeprefix("torch."),
                "model_device_type": weight.device.type, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": engine.max_batch + engine.max_queue, "max_best_of": 1,
                "max_stop_sequences": 4, "max_input_tokens": engine.max_len - 1, "max_total_tokens": engine.max_len,
                "max_batch_size": engine.max_batch, "validation_workers": 1, "max_client_batch_size": 1,
                "router": "starcoder", "version": __import__("starcoder").__version__}

    @app.get("/health")
    async def health():
        return {}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        encoding = sc.tokenizer.backend.encode(body.inputs, add_special_tokens=False)
        return [{"id": i, "text": body.inputs[a:b], "start": a, "stop": b}
                for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)]

    @app.get("/metrics")
    async def metrics():
        s = engine.stats
        rows = [("requests_total", "counter", "requests accepted", s.requests),
                ("requests_rejected_total", "counter", "requests refused because the queue was full", s.rejected),
                ("requests_cancelled_total", "counter", "requests cancelled (client gone, timeout)", s.cancelled),
                ("prompt_tokens_total", "counter", "prompt tokens accepted", s.prompt_tokens),
                ("generated_tokens_total", "counter", "tokens generated", s.generated_tokens),
                ("decode_steps_total", "counter", "batched decode steps", s.steps),
                ("busy_seconds_total", "counter", "seconds the engine spent computing", s.busy_seconds),
                ("queue_size", "gauge", "requests waiting for a slot", engine.waiting),
                ("active_sequences", "gauge", "sequences being generated", engine.active),
                ("batch_slots", "gauge", "sequences that can be generated at once", engine.max_batch)]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP starcoder_{name} {doc}", f"# TYPE starcoder_{name} {kind}", f"starcoder_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ llama.cpp
    @app.post("/infill")
    async def infill(body: InfillRequest, request: Request):
        if body.input_extra and sc.format.repo_style == "starcoder2":
            from ..fim import RepoFile

            files = [RepoFile(e.filename, e.text) for e in body.input_extra]
            prompt = sc.format.repository("", files, "", body.input_prefix + body.prompt, body.input_suffix)
        else:
            extra = "".join(e.text for e in body.input_extra)
            prompt = sc.infill_prompt(extra + body.input_prefix + body.prompt, body.input_suffix)
        params = SamplingParams(max_new_tokens=body.n_predict, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, seed=body.seed, stop=tuple(body.stop))
        ids = sc.tokenizer.encode(prompt)
        (job,) = submit_all([ids], params, 1)
        ((c,),) = await collect(request, [job])
        return {"content": c.text, "stop": True, "model": model_name, "tokens_predicted": len(c.token_ids),
                "tokens_evaluated": len(ids), "stopped_eos": c.finish_reason == "eos",
                "stopped_word": c.finish_reason == "stop", "stopped_limit": c.finish_reason == "length",
                "seed": c.seed}

    # ------------------------------------------------------------------ playground
    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return (resources.files("starcoder") / "server" / "static" / "index.html").read_text(encoding="utf-8")

    return app


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_queue: int = 64, timeout: float = 600.0, dtype: str | None = None) -> None:
    import uvicorn

    from ..api import load

    sc = load(model, dtype=dtype)
    name = str(model) if model is not None else "starcoder-embedded"
    app = create_app(sc, name, api_key, max_batch, max_queue, timeout)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["Event", "create_app", "serve"]
