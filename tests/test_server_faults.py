"""The server under faults: one bad request never harms another, abandoned requests free their slots, big bodies
neither block the event loop nor get in at all, and extreme values are answered, never a 500."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

import starcoder
from conftest import LiveServer

pytest.importorskip("fastapi")
POISON_SEED = 4242  # a request with this seed fails inside generation, after its first token (an injected fault)
GOOD = {"prompt": "def add(a, b):\n", "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server(served_model_dir):
    from starcoder.generate import Sequence
    from starcoder.server.app import create_app

    choose = Sequence.choose

    def faulty(self, logits):
        if self.params.seed == POISON_SEED and self.generated:
            raise RuntimeError("injected fault")
        return choose(self, logits)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sequence, "choose", faulty)
        app = create_app(starcoder.load(served_model_dir), "tiny", max_batch=8, max_queue=32)
        step = app.state.engine.generator.step
        app.state.engine.generator.step = lambda: (time.sleep(0.01), step())[1]  # requests overlap in the batch
        live = LiveServer(app)
        yield live
        live.stop()


def sse_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def stream_text(lines: list[str]) -> str:
    text = ""
    for line in lines:
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            text += chunk["choices"][0]["text"] if chunk.get("choices") else ""
    return text


def engine_idle(app, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if app.state.engine.active == 0 and app.state.engine.waiting == 0:
            return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------------------- containment
def test_a_bad_request_next_to_good_ones_leaves_them_unchanged(server):
    url = server.url
    good_stream = {**GOOD, "prompt": "class Stack:\n", "stream": True}
    good_tgi = {"inputs": "import os\n", "parameters": {"max_new_tokens": 20}}
    with httpx.Client(base_url=url, timeout=60) as c:
        alone = c.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json=good_stream) as r:
            alone_stream = stream_text(sse_lines(r))
        alone_tgi = c.post("/generate", json=good_tgi).json()["generated_text"]

    async def everything_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def streamed(path, body):
                async with c.stream("POST", path, json=body) as r:
                    return r.status_code, [line async for line in r.aiter_lines() if line]

            return await asyncio.gather(
                c.post("/v1/completions", json=GOOD),
                streamed("/v1/completions", good_stream),
                c.post("/generate", json=good_tgi),
                c.post("/v1/completions", json={**GOOD, "temperature": 0.7, "seed": POISON_SEED}),
                streamed("/v1/completions", {**GOOD, "temperature": 0.7, "seed": POISON_SEED, "stream": True}),
                streamed("/generate_stream", {"inputs": "x", "parameters": {"seed": POISON_SEED, "do_sample": True}}),
                # a real user's fault: a repetition penalty that sends seen tokens' scores to infinity
                c.post("/generate", json={"inputs": "def f(x):", "parameters": {"do_sample": True,
                                                                                "repetition_penalty": 1e-300}}),
                c.post("/v1/completions", json={**GOOD, "prompt": "x" * 3}),
            )

    (good, (stream_status, stream_lines), tgi, bad, (bad_stream_status, bad_stream_lines),
     (bad_tgi_status, bad_tgi_lines), penalty, other) = asyncio.run(everything_at_once())
    assert good.json()["choices"][0]["text"] == alone
    assert stream_status == 200 and stream_text(stream_lines) == alone_stream and stream_lines[-1] == "data: [DONE]"
    assert tgi.json()["generated_text"] == alone_tgi
    assert other.status_code == 200

    assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
    assert bad.json()["error"]["type"] == "server_error"
    # A stream that fails after it started ends with an error event in its API's shape, never silently.
    assert bad_stream_status == 200 and bad_stream_lines[-1] == "data: [DONE]"
    error = json.loads(bad_stream_lines[-2][6:])["error"]
    assert "injected fault" in error["message"] and error["type"] == "server_error"
    assert bad_tgi_status == 200 and bad_tgi_lines[-2] == "event: error"
    assert json.loads(bad_tgi_lines[-1][5:])["error_type"] == "generation"
    assert penalty.status_code == 422 and "sampling failed" in penalty.json()["error"]
    assert engine_idle(server.app, within=5)


def test_a_failed_decode_step_fails_only_the_requests_in_it(served_model_dir):
    """A batched step that fails as a whole fails the jobs that were in it; a job still waiting goes on."""
    from starcoder.generate import SamplingParams
    from starcoder.server.engine import Engine

    sc = starcoder.load(served_model_dir)
    params = SamplingParams(max_new_tokens=8)
    ids = sc.tokenizer.encode("def f(x):")
    expected = sc.complete("def f(x):", max_new_tokens=8).text

    async def run():
        engine = Engine(sc.model, sc.tokenizer, max_batch=1)
        step, calls = engine.generator.step, []

        def failing_once():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("the step broke")
            return step()

        engine.generator.step = failing_once
        try:
            running, waiting = engine.submit(ids, params), engine.submit(ids, params)
            with pytest.raises(RuntimeError, match="the step broke"):
                async for _ in running.stream(30):
                    pass
            text = ""
            async for event in waiting.stream(30):
                text += event.text
            return text, engine.stats.failed
        finally:
            engine.close()

    text, failed = asyncio.run(run())
    assert text == expected and failed == 1


# ------------------------------------------------------------------------------------------- values at the edges
def test_extreme_sampling_values_are_answered(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        greedy = c.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
        tiny = c.post("/v1/completions", json={**GOOD, "temperature": 1e-31})  # underflows: greedy, as in vLLM
        assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy
        for body in ({**GOOD, "temperature": 1, "top_p": 1e-40}, {**GOOD, "temperature": 1, "seed": 2**64 - 1}):
            assert c.post("/v1/completions", json=body).status_code == 200, body
        too_big = c.post("/v1/completions", json={**GOOD, "seed": 2**64})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"
        nan = c.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                     headers={"Content-Type": "application/json"})
        assert nan.status_code == 400 and "finite" in nan.json()["error"]["message"]
        for parameters in ({"temperature": 1e-40}, {"top_p": 1e-40}, {"seed": 2**64 - 1, "do_sample": True}):
            answer = c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 4, **parameters}})
            assert answer.status_code == 200, parameters
        with c.stream("POST", "/v1/completions", json={**GOOD, "temperature": 1e-31, "stream": True}) as r:
            lines = sse_lines(r)
        assert stream_text(lines) == greedy and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
    ("/tokenize", '{"inputs": "a\\ud800b"}', "inputs"),
    ("/generate", '{"inputs": "x", "parameters": {"stop": ["\\ud800"]}}', "parameters.stop"),
    ("/infill", '{"input_prefix": "\\ud800", "input_suffix": ""}', "input_prefix"),
])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(server, path, body, field):
    answer = httpx.post(server.url + path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert answer.status_code in (400, 422), answer.text
    assert field in answer.text and "lone surrogate" in answer.text


# ------------------------------------------------------------------------------------------- clients that leave
def test_abandoned_non_streaming_requests_free_their_slots_within_a_second(served_model_dir):
    from starcoder.server.app import create_app

    app = create_app(starcoder.load(served_model_dir), "tiny", max_batch=4, max_queue=32, api_key="k")
    step = app.state.engine.generator.step
    app.state.engine.generator.step = lambda: (time.sleep(0.02), step())[1]
    live = LiveServer(app)
    try:
        def abandon(i: int) -> None:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                httpx.post(live.url + "/v1/completions", timeout=1.0, headers={"Authorization": "Bearer k"},
                           json={"prompt": f"x = {i}", "max_tokens": 500, "temperature": 0, "ignore_eos": True})

        clients = [threading.Thread(target=abandon, args=(i,)) for i in range(12)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        assert engine_idle(app, within=1.0), (app.state.engine.active, app.state.engine.waiting)
        assert app.state.engine.stats.generated_tokens < 12 * 500 / 4
    finally:
        live.stop()


# ------------------------------------------------------------------------------------------- big bodies
def test_a_body_over_the_limit_is_a_413_at_once(served_model_dir):
    from starcoder.server.app import create_app

    live = LiveServer(create_app(starcoder.load(served_model_dir), "tiny", max_body_mb=0.5))
    try:
        big = json.dumps({"prompt": "x" * 600_000})
        sized = httpx.post(live.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert sized.status_code == 413 and "--max-body-mb" in sized.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536].encode()

        chunked = httpx.post(live.url + "/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error_type"] == "validation"
        assert httpx.post(live.url + "/v1/completions", json={**GOOD, "max_tokens": 2}).status_code == 200
    finally:
        live.stop()


def test_a_large_input_is_tokenized_off_the_event_loop(server):
    text = "def function(argument):\n    return [argument * 2 for _ in range(10)]\n" * 45_000  # 3.2 MB
    answer: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answer.append(
        httpx.post(server.url + "/tokenize", json={"inputs": text}, timeout=120)))
    worker.start()
    slowest = 0.0
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while worker.is_alive():
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
    worker.join()
    assert answer[0].status_code == 200 and len(answer[0].json()) > 100_000
    assert slowest < 1.0


def test_the_playground_page_needs_no_key_but_the_api_does(served_model_dir):
    from fastapi.testclient import TestClient

    from starcoder.server.app import create_app

    with TestClient(create_app(starcoder.load(served_model_dir), "tiny", api_key="secret")) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="api_key"' in page.text
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=GOOD).status_code == 401
        assert client.get("/info").status_code == 401
        assert client.post("/v1/completions", json={**GOOD, "max_tokens": 2},
                           headers={"Authorization": "Bearer secret"}).status_code == 200
