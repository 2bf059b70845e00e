"""Generations from a model behind an HTTP endpoint, for `starcoder evaluate --endpoint URL`.

OpenAI-compatible servers (vLLM, SGLang, TGI's /v1, `starcoder serve`) get /v1/completions, with `suffix` for
infilling problems; TGI's native API gets /generate with the fill-in-the-middle prompt built here in StarCoder's
format. Each sample is one request with its own seed (seed + problem index * n + sample, as local generation seeds
them), stop sequences sent and applied again here (servers differ on how many they accept and whether they keep
them). Requests run `concurrency` at a time; 429, 5xx answers and broken connections are retried with exponential
backoff (a Retry-After header is honoured). Every finished sample is appended to TASK/endpoint_samples.jsonl at
once, so an interrupted run resumes where it stopped and never asks for a sample twice; the file's first line
records the settings, and a run with other settings refuses to mix its samples into it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import StarCoderError
from ..fim import PromptFormat
from .tasks import Problem, Task

log = logging.getLogger(__name__)
APIS = ("openai", "tgi")
RETRIED = {408, 425, 429, 500, 502, 503, 504}
# StarCoder's and StarCoder2's fill-in-the-middle tokens, for servers that take only a prompt (TGI's /generate)
STARCODER_FIM = PromptFormat("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", None, ())


@dataclass(frozen=True)
class Endpoint:
    url: str
    api: str = "openai"
    model: str | None = None  # the name the server knows the model by (OpenAI's `model` field)
    api_key: str | None = None
    concurrency: int = 4
    attempts: int = 8  # per request, the first included
    timeout: float = 600.0  # seconds for one answer
    backoff: float = 1.0  # seconds before the first retry; doubles each time, at most 60

    def check(self) -> None:
        if self.api not in APIS:
            raise StarCoderError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        if not self.url.startswith(("http://", "https://")):
            raise StarCoderError(f"--endpoint must be an http:// or https:// URL, got {self.url!r}")
        if self.concurrency < 1 or self.attempts < 1:
            raise StarCoderError("--concurrency and the number of attempts must be >= 1")

    def settings(self) -> dict[str, Any]:
        return {"endpoint": self.url, "api": self.api, "model": self.model}


@dataclass(frozen=True)
class Job:
    problem: Problem
    index: int  # of the problem in its task
    sample: int
    seed: int


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop sequence (as local generation cuts it)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def request_body(endpoint: Endpoint, job: Job, sampling: dict[str, Any], fim_mode: str) -> tuple[str, dict]:
    """(path, JSON body) of one sample's request."""
    problem, temperature = job.problem, sampling["temperature"]
    if endpoint.api == "openai":
        body = {"prompt": problem.context + problem.prompt, "max_tokens": sampling["max_new_tokens"],
                "temperature": temperature, "top_p": sampling["top_p"], "seed": job.seed, "n": 1}
        if endpoint.model:
            body["model"] = endpoint.model
        if problem.suffix is not None:
            if fim_mode != "psm":
                raise StarCoderError("an OpenAI-compatible server lays out infilling prompts itself (prompt + "
                                     "suffix): --fim-mode spm needs --api tgi")
            body["suffix"] = problem.suffix
        if problem.stop:
            body["stop"] = list(problem.stop)
        path = "/completions" if endpoint.url.rstrip("/").endswith("/v1") else "/v1/completions"
        return path, body
    sample = temperature > 0
    parameters = {"max_new_tokens": sampling["max_new_tokens"], "do_sample": sample, "seed": job.seed,
                  "stop": list(problem.stop), "details": False}
    if sample:  # TGI refuses temperature 0 and top_p 1
        parameters["temperature"] = temperature
        if sampling["top_p"] < 1:
            parameters["top_p"] = sampling["top_p"]
    return "/generate", {"inputs": problem.model_input(lambda p, s: STARCODER_FIM.infill(p, s, fim_mode)),
                         "parameters": parameters}


def completion_text(endpoint: Endpoint, answer: Any) -> str:
    try:
        if endpoint.api == "openai":
            return answer["choices"][0]["text"]
        return (answer[0] if isinstance(answer, list) else answer)["generated_text"]
    except (KeyError, IndexError, TypeError):
        raise StarCoderError(f"{endpoint.url}: unexpected answer for the {endpoint.api} API: "
                             f"{json.dumps(answer)[:300]}") from None


def post(endpoint: Endpoint, path: str, body: dict) -> Any:
    """One request, retried on rate limits, overloads and broken connections; other errors stop the run."""
    url = endpoint.url.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    data = json.dumps(body).encode()
    delay = endpoint.backoff
    for attempt in range(1, endpoint.attempts + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=endpoint.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            if e.code not in RETRIED or attempt == endpoint.attempts:
                raise StarCoderError(f"{url}: HTTP {e.code} after {attempt} attempt(s): {detail}") from None
            wait, reason = _retry_after(e.headers.get("Retry-After")) or delay, f"HTTP {e.code}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
            if attempt == endpoint.attempts:
                raise StarCoderError(f"{url}: no answer after {attempt} attempts ({e})") from None
            wait, reason = delay, str(getattr(e, "reason", e))
        log.warning("%s: %s; retrying in %.0f s (attempt %d of %d)", url, reason, wait, attempt + 1,
                    endpoint.attempts)
        time.sleep(wait)
        delay = min(delay * 2, 60.0)
    raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value else None
    except ValueError:
        return None  # an HTTP date: use our own backoff


class SampleLog:
    """TASK/endpoint_samples.jsonl: the settings, then one line per finished sample (appended under a lock)."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path, self.lock = path, threading.Lock()
        self.done: dict[tuple[str, int], str] = {}
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines and json.loads(lines[0]) != settings:
                raise StarCoderError(f"{path} holds samples generated with other settings ({lines[0]}); give "
                                     "another --out, or delete the file to start again")
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run killed while writing it
                self.done[row["task_id"], row["sample"]] = row["completion"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings) + "\n", encoding="utf-8")

    def add(self, task_id: str, sample: int, completion: str) -> None:
        line = json.dumps({"task_id": task_id, "sample": sample, "completion": completion}, ensure_ascii=False)
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            self.done[task_id, sample] = completion


def generate_remote(endpoint: Endpoint, tasks: list[Task], problems: dict[str, list[Problem]], out: Path,
                    sampling: dict[str, Any], n_samples: int, seed: int, fim_mode: str,
                    quiet: bool | None = None) -> dict[str, list[list[str]]]:
    """Completions per task, problem and sample (the n samples of problem i are seeded seed + i * n + j)."""
    endpoint.check()
    completions: dict[str, list[list[str]]] = {}
    for task in tasks:
        saved = SampleLog(out / task.name / "endpoint_samples.jsonl",
                          endpoint.settings() | sampling | {"seed": seed, "n_samples": n_samples,  # seeds depend on n
                                                            "fim_mode": fim_mode, "task": task.name})
        jobs = [Job(p, i, j, seed + i * n_samples + j) for i, p in enumerate(problems[task.name])
                for j in range(n_samples) if (p.task_id, j) not in saved.done]
        # a setting the API cannot express fails before the first request
        requests = [request_body(endpoint, job, sampling, fim_mode) for job in jobs]
        total = n_samples * len(problems[task.name])
        with tqdm(total=total, initial=total - len(jobs), desc=f"generating {task.name} at {endpoint.url}",
                  unit="sample", disable=quiet) as bar:
            _run_jobs(endpoint, list(zip(jobs, requests, strict=True)), saved, bar.update)
        completions[task.name] = [[saved.done[p.task_id, j] for j in range(n_samples)] for p in problems[task.name]]
    return completions


def _run_jobs(endpoint: Endpoint, work: list[tuple[Job, tuple[str, dict]]], saved: SampleLog, done) -> None:
    def one(job: Job, request: tuple[str, dict]) -> None:
        saved.add(job.problem.task_id, job.sample,
                  cut_at_stop(completion_text(endpoint, post(endpoint, *request)), job.problem.stop))
        done()

    pool = ThreadPoolExecutor(max_workers=endpoint.concurrency)
    try:
        for future in [pool.submit(one, job, request) for job, request in work]:
            future.result()
    finally:  # the first error stops the run (what finished is saved); nothing more is sent
        pool.shutdown(wait=True, cancel_futures=True)
