"""POST /v1/attribution: the spans of a text found in the training data, and the files they come from."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .protocol import Body, OpenAIError, answers


class AttributionRequest(Body):
    text: str = Field(json_schema_extra={"minLength": 1})
    max_results: int = Field(5, ge=1, le=50)
    min_chain: int = Field(2, ge=1, le=100)


def add_routes(app: FastAPI, index_dir: Path | None) -> None:
    """index_dir: the index to answer from; None for the embedded corpus's (built on the first request)."""
    lock = threading.Lock()  # one SQLite connection per shard, shared: queries take turns (a few ms each)
    loaded = []

    def attribute(body: AttributionRequest) -> dict:
        from ..attribution.index import load_index

        with lock:
            if not loaded:
                loaded.append(load_index(index_dir))
            return loaded[0].attribute(body.text, body.max_results, body.min_chain)

    @app.post("/v1/attribution", responses=answers(dict, OpenAIError))
    async def attribution(body: AttributionRequest) -> dict:
        return await run_in_threadpool(attribute, body)
