"""The HTTP server: OpenAI completions (with `suffix` for FIM) and chat, TGI, llama.cpp completion and infill,
attribution, a playground.

    starcoder serve [--model PATH_OR_ID] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-body-mb 4]

Every request becomes a job of the one Engine, which batches whatever is running. Errors keep each API's own
shape: OpenAI routes (/v1/...) answer {"error": {"message", "type", "param", "code"}}, TGI routes
{"error", "error_type"}, llama.cpp's {"error": {"code", "message", "type"}}; bad input is a 4xx, a full queue 503
(OpenAI) or 429 (TGI).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import StarCoder
from ..cache import PREFIX_CACHE_MB
from ..errors import StarCoderError
from ..memory import return_freed_memory
from ..speculate import Drafter
from . import attribution_api, llamacpp_api, openai_api, tgi_api
from .engine import Engine
from .service import APIError, Service, api_of, as_api_error, error_response

PUBLIC = {("GET", "/"), ("GET", "/health"), ("HEAD", "/health")}  # the playground asks for the key itself
LARGE_BODY = 1 << 20  # after a request this large, freed memory is handed back to the system


class Gate:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which hides a client's disconnect from the route, so that
    abandoned requests would keep generating): the API key, and the request body's size limit, answered with
    401 and 413 before the body is read."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.too_large = APIError(413, f"the request body is larger than the server's limit of "
                                       f"{max_body / 2**20:g} MB (--max-body-mb)", kind="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.api_key and (scope["method"], scope["path"]) not in PUBLIC:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                 kind="authentication_error", code="invalid_api_key")
                return await error_response(request, error)(scope, receive, send)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await error_response(request, self.too_large)(scope, receive, send)
        received = 0

        async def counting_receive():  # a body sent in chunks, without a length, is counted as it comes
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise StarletteHTTPException(413, self.too_large.message)
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if received > LARGE_BODY:
                await run_in_threadpool(return_freed_memory)


def create_app(sc: StarCoder, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, timeout: float = 600.0, attribution_index: Path | None = None,
               max_body_mb: float = 4.0, prefix_cache_mb: float = PREFIX_CACHE_MB, prefill_chunk: int | None = None,
               speculate: str | Drafter | None = None, fim_mode: str = "psm", cache_reuse: int = 0) -> FastAPI:
    engine = Engine(sc.model, sc.tokenizer, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_mb=prefix_cache_mb, prefill_chunk=prefill_chunk, cache_reuse=cache_reuse,
                    speculate=speculate if speculate is not None else sc.speculate)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="starcoder", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    service = Service(sc, engine, model_name, timeout, fim_mode)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        elif not where:
            message = "request body must be a JSON object"
        else:
            message = f"{where}: {first.get('msg')}"
        status = 400 if api_of(request) != "tgi" else 422
        return error_response(request, APIError(status, message, where or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 413: "request_too_large"}.get(e.status_code, "invalid_request_error")
        status = 422 if e.status_code == 400 and api_of(request) == "tgi" else e.status_code  # TGI's validation
        return error_response(request, APIError(status, str(e.detail), kind=kind), e.headers)

    async def on_error(request: Request, e: Exception):
        return error_response(request, as_api_error(e, api_of(request)))

    # Expected failures are answered where they happen; anything else is a 5xx in the API's shape (and logged).
    for kind in (APIError, StarCoderError, TimeoutError, Exception):
        app.add_exception_handler(kind, on_error)

    app.state.service = service
    for api in (openai_api, tgi_api, llamacpp_api):
        app.include_router(api.router)
    attribution_api.add_routes(app, attribution_index)

    # ------------------------------------------------------------------ playground
    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return (resources.files("starcoder") / "server" / "static" / "index.html").read_text(encoding="utf-8")

    app.add_middleware(Gate, api_key=api_key, max_body=int(max_body_mb * 2**20))
    return app


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None, **options) -> None:
    """Load the model and serve it; options are create_app's (api_key, max_batch, max_queue, timeout,
    attribution_index, max_body_mb, prefix_cache_mb, prefill_chunk, cache_reuse, fim_mode) and load's (speculate,
    draft_model)."""
    import uvicorn

    from ..api import load

    sc = load(model, dtype=dtype, speculate=options.pop("speculate", None) or "none",
              draft_model=options.pop("draft_model", None))
    name = str(model) if model is not None else "starcoder-embedded"
    uvicorn.run(create_app(sc, name, **options), host=host, port=port, log_level="info")


__all__ = ["create_app", "serve"]
