"""The HTTP server with real clients on loopback: openai, huggingface_hub, and raw requests for bad input."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

import starcoder
from conftest import LiveServer, needs

pytest.importorskip("fastapi")
API_KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(served_model_dir):
    return served_model_dir


@pytest.fixture(scope="module")
def server(model_dir):
    from starcoder.server.app import create_app

    live = LiveServer(create_app(starcoder.load(model_dir), "tiny", api_key=API_KEY, max_batch=8, max_queue=32))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY)


# ------------------------------------------------------------------------------------------- OpenAI
def test_openai_completion_with_suffix_is_fim(server, model_dir):
    oai = openai_client(server)
    done = oai.completions.create(model="tiny", prompt="def add(a, b):\n    ", suffix="\n", max_tokens=8,
                                  temperature=0)
    sc = starcoder.load(model_dir)
    assert done.choices[0].text == sc.infill("def add(a, b):\n    ", "\n", max_new_tokens=8).text
    assert done.usage.prompt_tokens == len(sc.tokenizer.encode(sc.infill_prompt("def add(a, b):\n    ", "\n")))
    assert done.choices[0].finish_reason in ("stop", "length")


def test_openai_streaming_equals_whole(server):
    oai = openai_client(server)
    whole = oai.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0)
    pieces = [c.choices[0].text for c in oai.completions.create(model="tiny", prompt="import os\n", max_tokens=12,
                                                                temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text


def test_openai_list_prompt_n_logprobs_echo(server):
    oai = openai_client(server)
    done = oai.completions.create(model="tiny", prompt=["a = 1\n", "b = 2\n"], n=2, max_tokens=4, temperature=0.9,
                                  seed=3, logprobs=2, echo=True)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text.startswith("a = 1\n") and done.choices[2].text.startswith("b = 2\n")
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and len(lp.top_logprobs[1]) == 2
    # echo: the prompt's tokens come first, the very first without a logprob (legacy OpenAI, as lm-eval reads it)
    assert "".join(lp.tokens) == done.choices[0].text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])


def test_openai_chat_and_streaming_chat(server):
    oai = openai_client(server)
    messages = [{"role": "user", "content": "How do I sort a list?"}]
    done = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert streamed.strip() == done.choices[0].message.content
    assert [m.id for m in oai.models.list().data] == ["tiny"]


# ------------------------------------------------------------------------------------------- TGI
def test_tgi_routes_with_huggingface_hub(server):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=server.url, api_key=API_KEY)
    text = hub.text_generation("def f(x):", max_new_tokens=8)
    details = hub.text_generation("def f(x):", max_new_tokens=8, details=True)
    assert details.generated_text == text and details.details.generated_tokens == len(details.details.tokens)
    assert details.details.finish_reason in ("length", "eos_token", "stop_sequence")
    streamed = list(hub.text_generation("def f(x):", max_new_tokens=8, stream=True, details=True))
    assert "".join(s.token.text for s in streamed if not s.token.special) == text or streamed[-1].generated_text == text


def test_tgi_generate_and_stream_raw(client):
    body = {"inputs": "x = ", "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True,
                                             "return_full_text": True, "top_n_tokens": 2}}
    done = client.post("/generate", json=body).json()
    assert done["generated_text"].startswith("x = ") and len(done["details"]["tokens"]) == 6
    assert done["details"]["prefill"][0]["text"] == "x" and len(done["details"]["top_tokens"][0]) == 2
    events = []
    with client.stream("POST", "/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1]["generated_text"] == done["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 6 and events[0]["details"] is None


def test_info_health_tokenize_metrics(client, server):
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 1024 and info["max_stop_sequences"] == 32
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    tokens = client.post("/tokenize", json={"inputs": "def f(x):"}).json()
    assert "".join(t["text"] for t in tokens) == "def f(x):" and tokens[0]["start"] == 0
    metrics = client.get("/metrics").text
    assert "starcoder_requests_total" in metrics and "# TYPE starcoder_queue_size gauge" in metrics


def test_llama_cpp_infill(client):
    done = client.post("/infill", json={"input_prefix": "def f(x):\n    return ", "input_suffix": "\n",
                                        "n_predict": 5, "temperature": 0}).json()
    assert done["tokens_predicted"] <= 5 and isinstance(done["content"], str)


def test_playground_page(client):
    page = client.get("/")
    assert page.status_code == 200 and "starcoder playground" in page.text and "/v1/completions" in page.text


# ------------------------------------------------------------------------------------------- batching
def test_sixteen_concurrent_streams_each_equal_alone(server):
    import openai

    prompts = [f"def function_{i}(x):\n    return x * {i}\n\n" for i in range(16)]
    oai = openai_client(server)
    alone = [oai.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]

    async def stream_one(client, prompt):
        text = ""
        async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                           temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY)
        return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


def test_a_client_that_disconnects_frees_its_slot(server, client):
    body = {"prompt": "while True:", "max_tokens": 200, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())  # one chunk, then hang up
    engine = server.server.config.app.state.engine
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


# ------------------------------------------------------------------------------------------- bad input
def openai_error(response, status, contains):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert contains in error["message"] and {"message", "type", "param", "code"} <= error.keys()


def tgi_error(response, status, contains):
    assert response.status_code == status, response.text
    body = response.json()
    assert contains in body["error"] and "error_type" in body


def test_malformed_json(client):
    openai_error(client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, "not valid JSON")
    tgi_error(client.post("/generate", content=b"[1,", headers={"Content-Type": "application/json"}), 422,
              "not valid JSON")
    openai_error(client.post("/v1/completions", content=b"oops"), 400, "request body must be a JSON object")


def test_wrong_types_and_unknown_fields(client):
    openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens")
    openai_error(client.post("/v1/completions", json={"prompt": "x", "temprature": 0.5}), 400, "temprature")
    tgi_error(client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": -1}}), 422,
              "max_new_tokens")
    tgi_error(client.post("/generate", json={"inputs": "x", "parameters": {"unknown": 1}}), 422, "unknown")


def test_empty_prompt(client):
    openai_error(client.post("/v1/completions", json={"prompt": ""}), 400, "prompt must not be empty")
    tgi_error(client.post("/generate", json={"inputs": ""}), 422, "must not be empty")


def test_prompt_longer_than_the_context(client):
    openai_error(client.post("/v1/completions", json={"prompt": "x = 1\n" * 400, "max_tokens": 4}), 400,
                 "exceeds the context of 1024 tokens")
    tgi_error(client.post("/generate", json={"inputs": "x = 1\n" * 400}), 422, "exceeds the context")


def test_out_of_range_values(client):
    openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000}), 400, "exceeds the context")
    openai_error(client.post("/v1/completions", json={"prompt": "x", "n": 50}), 400, "n must be at most 8")
    openai_error(client.post("/v1/completions", json={"prompt": "x", "temperature": 3}), 400, "temperature")


def test_too_many_stop_strings(client):
    stops = [f"s{i}" for i in range(33)]
    openai_error(client.post("/v1/completions", json={"prompt": "x", "stop": stops}), 400,
                 "at most 32 stop sequences")
    tgi_error(client.post("/generate", json={"inputs": "x", "parameters": {"stop": stops}}), 422,
              "at most 32 stop sequences")


def test_unknown_model_name(client):
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    openai_error(response, 404, "the model 'gpt-4' does not exist")


def test_api_key_is_required(server):
    openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x"}), 401, "API key")
    tgi_error(httpx.post(server.url + "/generate", json={"inputs": "x"},
                         headers={"Authorization": "Bearer wrong"}), 401, "API key")


def test_full_queue_answers_429_and_503(model_dir):
    from starcoder.server.app import create_app

    app = create_app(starcoder.load(model_dir), "tiny", max_batch=1, max_queue=1)
    engine = app.state.engine
    step = engine.generator.step
    engine.generator.step = lambda: (time.sleep(0.05), step())[1]  # a slow model: the slot stays busy
    live = LiveServer(app)
    try:
        long_body = {"prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True}
        with httpx.Client(base_url=live.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=long_body) as running:
                next(running.iter_lines())  # the one slot is busy
                with c.stream("POST", "/v1/completions", json=long_body) as waiting:
                    assert waiting.status_code == 200  # the one queue place is taken
                    tgi_error(c.post("/generate", json={"inputs": "x"}), 429, "the server is busy")
                    openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503, "the server is busy")
            deadline = time.monotonic() + 10  # the closed streams free their places at the engine's next step
            while (engine.active or engine.waiting) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        assert engine.stats.rejected == 2 and engine.stats.cancelled >= 2
    finally:
        live.stop()


def test_server_keeps_serving_after_errors(client):
    for _ in range(3):
        client.post("/v1/completions", content=b"{")
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.fixture(scope="module")
def attribution_index(tmp_path_factory):
    from starcoder.attribution.index import build_index
    from test_attribution import source_file

    root = tmp_path_factory.mktemp("attribution-index")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"content": source_file(i), "repository_name": "org/lib", "path": f"m{i}.py",
                                        "licenses": ["MIT"]}) + "\n" for i in range(10)))
    build_index([rows], root / "index")
    return root / "index"


def test_attribution_route(model_dir, attribution_index):
    from fastapi.testclient import TestClient

    from starcoder.server.app import create_app
    from test_attribution import source_file

    app = create_app(starcoder.load(model_dir), "tiny", attribution_index=attribution_index)
    with TestClient(app) as client:
        text = "x = 1\n" + source_file(4)[100:700]
        answer = client.post("/v1/attribution", json={"text": text, "max_results": 2})
        assert answer.status_code == 200
        result = answer.json()
        assert result["score"] > 0.8 and result["spans"][0]["start"] >= len("x = 1")
        assert 1 <= len(result["sources"]) <= 2 and result["sources"][0]["path"] == "m4.py"
        assert result["sources"][0]["license"] == "MIT"
        empty = client.post("/v1/attribution", json={"text": "   "})
        assert empty.status_code == 400 and "input is empty" in empty.json()["error"]["message"]
        assert client.post("/v1/attribution", json={"text": "x", "max_results": 0}).status_code == 400
    app = create_app(starcoder.load(model_dir), "tiny", attribution_index=attribution_index.parent / "missing")
    with TestClient(app) as client:
        missing = client.post("/v1/attribution", json={"text": "def f(): pass"})
        assert missing.status_code == 400 and "no attribution index" in missing.json()["error"]["message"]


def test_playground_streams_in_headless_chromium(model_dir, tmp_path, attribution_index):
    import shutil

    chromium = shutil.which("chromium")
    needs(chromium is not None, "the playground test needs Debian's chromium: apt-get install chromium")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from starcoder.server.app import create_app
    from test_attribution import source_file

    app = create_app(starcoder.load(model_dir), "tiny", api_key=API_KEY, attribution_index=attribution_index)
    step = app.state.engine.generator.step
    app.state.engine.generator.step = lambda: (time.sleep(0.03), step())[1]  # slow enough to watch it stream
    live = LiveServer(app)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
            page = browser.new_page()
            page.goto(live.url + "/")  # the page itself needs no key: its requests carry the one typed here
            page.fill("#api_key", API_KEY)
            page.fill("#max_tokens", "24")
            page.fill("#temperature", "0")
            page.fill("#prompt", "def add(a, b):\n")
            page.click("#run_complete")
            page.wait_for_function("document.querySelector('#complete_out .generated')?.textContent.length > 0")
            status_while_streaming = page.text_content("#status")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            completed = page.text_content("#complete_out .generated")

            page.fill("#max_tokens", "4")  # a prompt from the indexed corpus: attribution marks it
            page.fill("#prompt", source_file(7)[:400])
            page.click("#run_complete")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            page.click("#run_attribution")
            page.wait_for_function("document.querySelectorAll('#complete_out mark').length > 0", timeout=30_000)
            marked = page.text_content("#complete_out mark")
            sources = page.text_content("#attribution_out")
            page.fill("#max_tokens", "24")

            page.click("nav button[data-pane=infill]")
            page.fill("#prefix", "def f(x):\n    return ")
            page.fill("#suffix", "\n")
            page.click("#run_infill")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            middle = page.text_content("#infill_out .generated")
            page.screenshot(path=str(tmp_path / "playground.png"))
            browser.close()
    finally:
        live.stop()
    sc = starcoder.load(model_dir)
    assert status_while_streaming == "generating..."  # text appeared before the answer was complete
    assert len(marked) > 300 and marked in source_file(7) and "org/lib/m7.py (license: MIT" in sources
    assert completed == sc.complete("def add(a, b):\n", max_new_tokens=24).text
    assert middle == sc.infill("def f(x):\n    return ", "\n", max_new_tokens=24).text


def test_request_timeout_is_a_504_and_frees_the_slot(model_dir):
    from starcoder.server.app import create_app

    app = create_app(starcoder.load(model_dir), "tiny", timeout=0.2)
    step = app.state.engine.generator.step
    app.state.engine.generator.step = lambda: (time.sleep(0.5), step())[1]  # slower than the timeout
    live = LiveServer(app)
    try:
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 50}, timeout=30)
        openai_error(response, 504, "no token within 0.2 s")
        deadline = time.monotonic() + 10
        while app.state.engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.engine.active == 0
    finally:
        live.stop()


def test_ignore_eos_extension_generates_max_tokens(client):
    done = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 30, "temperature": 0,
                                                "ignore_eos": True}).json()
    assert done["usage"]["completion_tokens"] == 30 and done["choices"][0]["finish_reason"] == "length"


def test_keystrokes_reuse_the_previous_prompt(client, model_dir):
    """An editor's requests, one per keystroke: each prompt is computed only from where it differs from what the
    server has seen, and every answer equals the one computed from scratch."""
    sc = starcoder.load(model_dir)

    def reused() -> float:
        line = next(x for x in client.get("/metrics").text.splitlines()
                    if x.startswith("starcoder_prompt_tokens_reused_total "))
        return float(line.split()[1])

    before = reused()
    prefix = "import os\n\n\ndef list_files(directory):\n    "
    for typed in ("", "r", "re", "ret"):
        answer = client.post("/v1/completions", json={"prompt": prefix + typed, "suffix": "\n", "max_tokens": 8,
                                                      "temperature": 0}).json()
        assert answer["choices"][0]["text"] == sc.infill(prefix + typed, "\n", max_new_tokens=8).text
    assert reused() - before >= 3 * len(sc.tokenizer.encode("<fim_prefix>" + prefix)) - 3


def test_spm_layout_is_an_option(model_dir):
    from fastapi.testclient import TestClient

    from starcoder.server.app import create_app

    sc = starcoder.load(model_dir)
    with TestClient(create_app(sc, "tiny", fim_mode="spm")) as client:
        answer = client.post("/v1/completions", json={"prompt": "def f(x):\n    return ", "suffix": "\n",
                                                      "max_tokens": 6, "temperature": 0}).json()
    assert answer["choices"][0]["text"] == sc.infill("def f(x):\n    return ", "\n", mode="spm", max_new_tokens=6).text
    assert answer["usage"]["prompt_tokens"] == len(sc.tokenizer.encode(sc.infill_prompt("def f(x):\n    return ",
                                                                                        "\n", "spm")))


def test_serve_with_a_draft_model(model_dir, monkeypatch):
    """`serve --draft-model`: the engine drafts with it, and streams carry plain decoding's text."""
    import uvicorn
    from fastapi.testclient import TestClient

    from starcoder.server.app import serve
    from starcoder.speculate import DraftModel

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.setdefault("app", app))
    serve(model_dir, speculate="draft", draft_model=model_dir)
    app = served["app"]
    assert isinstance(app.state.engine.generator.drafter, DraftModel)
    body = {"model": str(model_dir), "prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
    with TestClient(app) as client:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["text"]
        metrics = client.get("/metrics").text
    assert text == starcoder.load(model_dir).complete("def add(a, b):\n", max_new_tokens=16).text
    accepted = app.state.engine.generator.accepted_tokens
    assert accepted > 0 and f"starcoder_draft_tokens_accepted_total {accepted}" in metrics
