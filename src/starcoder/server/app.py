"""The HTTP server: OpenAI completions (with `suffix` for FIM) and chat, TGI, llama.cpp infill, attribution, a
playground.

    starcoder serve [--model PATH_OR_ID] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Every request becomes a job of the one Engine, which batches whatever is running. Errors keep each API's own
shape: OpenAI routes (/v1/...) answer {"error": {"message", "type", "param", "code"}}, TGI routes
{"error", "error_type"}; bad input is a 4xx, a full queue 503 (OpenAI) or 429 (TGI).
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import StarCoder
from ..errors import StarCoderError
from . import attribution_api, openai_api, tgi_api
from .engine import Engine, Overloaded
from .service import APIError, Service, error_response, is_openai


def create_app(sc: StarCoder, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, timeout: float = 600.0, attribution_index: Path | None = None) -> FastAPI:
    engine = Engine(sc.model, sc.tokenizer, max_batch=max_batch, max_queue=max_queue)
    validation_status = lambda request: 400 if is_openai(request) else 422  # noqa: E731

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="starcoder", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    service = Service(sc, engine, model_name, timeout)

    # ------------------------------------------------------------------ errors and authentication
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(request, e.status, e.message, e.param, e.kind, e.code)

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
        return error_response(request, validation_status(request), message, where or None)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, e: Overloaded):
        return error_response(request, 503 if is_openai(request) else 429, str(e), kind="server_overloaded")

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


    openai_api.add_routes(app, service)
    tgi_api.add_routes(app, service)
    attribution_api.add_routes(app, attribution_index)

    # ------------------------------------------------------------------ playground
    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return (resources.files("starcoder") / "server" / "static" / "index.html").read_text(encoding="utf-8")

    return app


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          max_queue: int = 64, timeout: float = 600.0, dtype: str | None = None,
          attribution_index: Path | None = None) -> None:
    import uvicorn

    from ..api import load

    sc = load(model, dtype=dtype)
    name = str(model) if model is not None else "starcoder-embedded"
    app = create_app(sc, name, api_key, max_batch, max_queue, timeout, attribution_index)
    uvicorn.run(app, host=host, port=port, log_level="info")


__all__ = ["create_app", "serve"]
