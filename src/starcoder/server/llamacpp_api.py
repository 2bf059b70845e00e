"""llama.cpp's /completion and /infill, as llama.vim, llama.vscode and Tabby's llama.cpp backend send them.

Sampling fields keep llama.cpp's meanings (see protocol.LlamaCompletionRequest); `n_predict: 0` is the editors'
warm-up request (the prompt is tokenized and nothing is generated); `n_indent` and `t_max_predict_ms` end a
completion as llama.cpp does; `response_fields` picks fields of the answer ("a/b" reaches into nested objects).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..fim import RepoFile
from ..generate import Completion, SamplingParams
from .protocol import InfillRequest, LlamaCompletionRequest, LlamaError, answers
from .service import APIError, Service, ServiceDep

STOP_TYPE = {"eos": "eos", "stop": "word", "length": "limit"}


def pick_fields(answer: dict, paths: list[str]) -> dict:
    """llama.cpp's response_fields: each path that exists, under its own name."""
    picked = {}
    for path in paths:
        value, found = answer, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            picked[path] = value
    return picked


def timings(prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float) -> dict:
    def rates(n: int, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (n * 1000 / ms if ms else 0.0)

    (prompt_per_token_ms, prompt_per_second), (predicted_per_token_ms, predicted_per_second) = (
        rates(prompt_n, prompt_ms), rates(predicted_n, predicted_ms))
    return {"prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_per_token_ms,
            "prompt_per_second": prompt_per_second, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_per_token_ms, "predicted_per_second": predicted_per_second}


router = APIRouter()


def sampling(s: Service, body: LlamaCompletionRequest, prompt_tokens: int) -> SamplingParams:
    room = s.engine.max_len - prompt_tokens  # n_predict -1: until an end token or the end of the context
    return SamplingParams(
        max_new_tokens=body.n_predict if body.n_predict > 0 else max(room, 1),
        temperature=max(body.temperature, 0.0), top_k=max(body.top_k, 0),
        top_p=min(max(body.top_p, 1e-9), 1.0),  # top_p <= 0 keeps the likeliest token only, as llama.cpp
        repetition_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=None if body.seed < 0 else body.seed,
        stop=tuple(body.stop), min_indent=body.n_indent, ignore_eos=body.ignore_eos,
        time_limit=body.t_max_predict_ms / 1000 if body.t_max_predict_ms > 0 else None)


def final(s: Service, body: LlamaCompletionRequest, c: Completion | None, prompt_tokens: int, prompt_ms: float,
          predicted_ms: float, streamed: bool) -> dict:
    text = c.text if c is not None else ""
    predicted = len(c.token_ids) if c is not None else 0
    reason = c.finish_reason if c is not None else "length"
    answer = {
        "index": 0, "content": "" if streamed else text, "tokens": [], "id_slot": 0, "stop": True,
        "model": s.model_name, "tokens_predicted": predicted, "tokens_evaluated": prompt_tokens,
        "tokens_cached": prompt_tokens + predicted, "truncated": False, "has_new_line": "\n" in text,
        "stop_type": STOP_TYPE[reason], "stopping_word": "", "stopped_eos": reason == "eos",
        "stopped_word": reason == "stop", "stopped_limit": reason == "length",
        "seed": c.seed if c is not None else body.seed,
        "generation_settings": {"n_ctx": s.engine.max_len, "n_predict": body.n_predict,
                                "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                                "n_indent": body.n_indent, "t_max_predict_ms": body.t_max_predict_ms},
        "timings": timings(prompt_tokens, prompt_ms, predicted, predicted_ms),
    }
    return pick_fields(answer, body.response_fields) if body.response_fields else answer


async def run(s: Service, body: LlamaCompletionRequest, ids: list[int], request: Request):
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    if body.n_predict == 0:  # warm-up: nothing to generate
        answer = final(s, body, None, len(ids), 0.0, 0.0, streamed=False)
        return s.sse(_one(answer), "llamacpp") if body.stream else answer
    (job,) = s.submit_all([ids], sampling(s, body, len(ids)), 1)

    def timings() -> tuple[float, float]:
        first, now = job.first_event_at or time.monotonic(), time.monotonic()
        return (first - job.submitted) * 1000, (now - first) * 1000

    if body.stream:
        async def chunks():
            async for _, event in s.merged([job]):
                c = event.completion
                if event.text:
                    yield {"index": 0, "content": event.text, "tokens": [event.token.id], "stop": False,
                           "id_slot": 0, "tokens_predicted": len(c.token_ids) if c else None,
                           "tokens_evaluated": len(ids)}
                if c is not None:
                    yield final(s, body, c, len(ids), *timings(), streamed=True)

        return s.sse(chunks(), "llamacpp")
    ((c,),) = await s.collect(request, [job])
    return final(s, body, c, len(ids), *timings(), streamed=False)


@router.post("/completion", responses=answers(dict, LlamaError, stream=True))
@router.post("/completions", responses=answers(dict, LlamaError, stream=True))
async def completion(body: LlamaCompletionRequest, request: Request, s: ServiceDep):
    ids = list(body.prompt) if isinstance(body.prompt, list) else await s.encode(body.prompt)
    vocab = s.sc.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return await run(s, body, ids, request)


@router.post("/infill", responses=answers(dict, LlamaError, stream=True))
async def infill(body: InfillRequest, request: Request, s: ServiceDep):
    # Other files' chunks become repository context; the text left of the cursor on its line goes after
    # <fim_middle> (llama.cpp's layout), so that typing only extends the end of the prompt.
    if body.input_extra and s.sc.format.repo_style == "starcoder2":
        files = [RepoFile(e.filename, e.text) for e in body.input_extra]
        prompt = s.sc.format.repository("", files, "", body.input_prefix, body.input_suffix)
    else:
        extra = "".join(e.text for e in body.input_extra)
        prompt = s.infill_prompt(extra + body.input_prefix, body.input_suffix)
    return await run(s, body, await s.encode(prompt + body.prompt), request)


async def _one(answer: dict):
    yield answer
