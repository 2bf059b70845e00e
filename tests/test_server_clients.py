"""The server with the clients people run: text-generation, huggingface_hub, Continue's and llama.vim's request
bodies, and lm-eval's local-completions (generate_until and loglikelihood, offline, on a local task)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import starcoder
from conftest import LiveServer

pytest.importorskip("fastapi")
PREFIX = "def mean(values):\n    total = "
SUFFIX = "\n    return total / len(values)\n"


@pytest.fixture(scope="module")
def server(served_model_dir):
    from starcoder.server.app import create_app

    live = LiveServer(create_app(starcoder.load(served_model_dir), "tiny", api_key="k", max_batch=8))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def sc(served_model_dir):
    return starcoder.load(served_model_dir)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k"}, timeout=60) as client:
        yield client


def sse(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# ------------------------------------------------------------------------------------------- TGI clients
def test_text_generation_client(server, sc):
    from text_generation import Client

    client = Client(server.url, headers={"Authorization": "Bearer k"}, timeout=60)
    done = client.generate("def f(x):", max_new_tokens=10, decoder_input_details=True)
    assert done.generated_text == sc.complete("def f(x):", max_new_tokens=10).text
    assert done.details.generated_tokens == len(done.details.tokens) and done.details.prefill[0].text == "def"
    streamed = list(client.generate_stream("def f(x):", max_new_tokens=10))
    assert "".join(r.token.text for r in streamed if not r.token.special) == done.generated_text
    assert streamed[-1].generated_text == done.generated_text


def test_huggingface_hub_chat_with_a_tgi_model_name(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url, api_key="k")
    for model in (None, "tgi", "dummy"):
        answer = client.chat_completion([{"role": "user", "content": "How do I sort a list?"}], model=model,
                                        max_tokens=8, temperature=0)
        assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens <= 8


# ------------------------------------------------------------------------------------------- OpenAI dialects
def test_continue_autocomplete_body(http, sc):
    """Continue's autocomplete against an OpenAI-compatible host: suffix, a stream, and every stop string of
    its StarCoder template plus its multi-line stops (11 in all)."""
    stops = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
             "</code>", "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8"]
    body = {"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "temperature": 0,
            "stop": stops, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = sse(response)
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert lines[-1] == "data: [DONE]"
    assert text == sc.infill(PREFIX, SUFFIX, max_new_tokens=24, stop=stops).text


def test_stream_options_include_usage(http):
    body = {"prompt": "import os\n", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        chunks = [json.loads(line[6:]) for line in sse(response)[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["usage"]["prompt_tokens"] > 0
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "How do I "},
                                                      {"type": "text", "text": "sort a list?"}]}],
            "max_tokens": 5, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=chat) as response:
        chunks = [json.loads(line[6:]) for line in sse(response)[:-1]]
    assert chunks[-1]["choices"] == [] and 1 <= chunks[-1]["usage"]["completion_tokens"] <= 5
    whole = http.post("/v1/chat/completions", json={**chat, "stream": False,
                                                    "messages": [{"role": "user", "content": "How do I sort a list?"}]})
    parts = http.post("/v1/chat/completions", json={**chat, "stream": False})
    assert parts.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]
    image = {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert http.post("/v1/chat/completions", json=image).status_code == 400


def test_echo_with_logprobs_scores_the_prompt(http, sc, served_model_dir):
    ids = sc.tokenizer.encode("def add(a, b):\n    return a + b\n")
    answer = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                "temperature": 0}).json()
    lp = answer["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    with torch.no_grad():
        reference = starcoder.load_model(served_model_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [float(reference[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-3)
    assert answer["usage"]["completion_tokens"] == 0 and answer["choices"][0]["text"] == sc.tokenizer.decode(ids)
    no_echo = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"


# ------------------------------------------------------------------------------------------- llama.cpp
LLAMA_VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                    "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                    "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"]


def llama_vim_body(**overrides) -> dict:
    """What llama.vim sends to /infill (llama.vscode's body is the same), unknown fields included."""
    return {"input_prefix": "import os\n\n", "input_suffix": "\n\nprint(total)\n", "prompt": "total = ",
            "input_extra": [{"text": "def helper():\n    return 1\n", "time": 1733050000.5, "filename": "util.py"}],
            "n_predict": 16, "n_indent": 0, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1000, "response_fields": LLAMA_VIM_FIELDS, "id_slot": -1, **overrides}


def test_llama_vim_infill(http, sc):
    answer = http.post("/infill", json=llama_vim_body(temperature=0))
    assert answer.status_code == 200, answer.text
    fields = answer.json()
    assert set(fields) == set(LLAMA_VIM_FIELDS) and fields["timings/predicted_n"] <= 16
    from starcoder.fim import RepoFile

    prompt = sc.format.repository("", [RepoFile("util.py", "def helper():\n    return 1\n")], "", "import os\n\n",
                                  "\n\nprint(total)\n") + "total = "  # the line's text goes after <fim_middle>
    assert fields["content"] == sc.complete(prompt, max_new_tokens=16).text
    assert fields["tokens_cached"] == len(sc.tokenizer.encode(prompt)) + fields["timings/predicted_n"]

    warm_up = http.post("/infill", json=llama_vim_body(n_predict=0))  # the ring buffer's cache warm-up
    assert warm_up.status_code == 200 and warm_up.json()["content"] == ""

    with http.stream("POST", "/infill", json=llama_vim_body(temperature=0, stream=True, response_fields=None)) as r:
        events = [json.loads(line.removeprefix("data: ")) for line in sse(r)]
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == fields["content"]


def test_llama_cpp_completion_route(http, sc):
    ids = sc.tokenizer.encode("def f(x):")
    for prompt in ("def f(x):", ids):
        answer = http.post("/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0, "seed": -1,
                                                "unknown_field": {"ignored": True}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["content"] == sc.complete("def f(x):", max_new_tokens=8).text
        assert answer.json()["tokens_evaluated"] == len(ids) and answer.json()["stop_type"] in ("eos", "limit", "word")
    bad = http.post("/completion", json={"prompt": [10**9], "n_predict": 2})
    assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- lm-eval
TASKS = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
{extra}
"""


def test_lm_eval_local_completions(server, served_model_dir, tmp_path, monkeypatch):
    """lm-eval's OpenAI-compatible model on a local task: generations equal ours, loglikelihoods equal the
    model's own log-probabilities from a forward pass."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    rows = [{"context": "def add(a, b):\n    return", "continuation": " a + b"},
            {"context": "import os\nimport", "continuation": " sys"},
            {"context": "for i in range(10):\n   ", "continuation": " print(i)"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ll.yaml").write_text(TASKS.format(name="tiny_ll", data=data, output_type="loglikelihood",
                                                   extra="metric_list:\n  - metric: acc"))
    (tmp_path / "gen.yaml").write_text(TASKS.format(
        name="tiny_gen", data=data, output_type="generate_until",
        extra="generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
              "  temperature: 0\nmetric_list:\n  - metric: exact_match"))
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_ll", "tiny_gen"], log_samples=True,
        model_args={"model": "tiny", "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(served_model_dir), "num_concurrent": 1, "max_retries": 1},
        task_manager=TaskManager(include_path=str(tmp_path)))

    sc = starcoder.load(served_model_dir)
    model = starcoder.load_model(served_model_dir)
    for sample in results["samples"]["tiny_ll"]:
        context, continuation = sample["doc"]["context"], sample["doc"]["continuation"]
        spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces into the continuation
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        whole = sc.tokenizer.encode(context + continuation)
        n_context = len(sc.tokenizer.encode(context))
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        expected = sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole)))
        loglikelihood, _ = sample["resps"][0][0]
        assert loglikelihood == pytest.approx(expected, abs=1e-3)
    for sample in results["samples"]["tiny_gen"]:
        ours = sc.complete(sample["doc"]["context"], max_new_tokens=12, stop=["\n\n"]).text
        assert sample["resps"][0][0] == ours
