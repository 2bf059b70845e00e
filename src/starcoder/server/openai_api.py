"""OpenAI's completions (with `suffix` for fill-in-the-middle), chat and models routes."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request

from ..chat import chat_prompt, with_chat_stops
from ..generate import SamplingParams
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    OpenAIError,
    answers,
)
from .service import OPENAI_FINISH, APIError, Service, ServiceDep


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


router = APIRouter()


def check_common(s: Service, body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if body.n > s.engine.max_batch:
        raise APIError(400, f"n must be at most {s.engine.max_batch} on this server", "n")


@router.get("/v1/models", responses=answers(ModelList, OpenAIError))
async def models(s: ServiceDep):
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created(),
                                        "owned_by": "starcoder"}]}


@router.post("/v1/completions", responses=answers(CompletionResponse, OpenAIError, stream=True))
async def completions(body: CompletionRequest, request: Request, s: ServiceDep):
    s.check_model(body.model)
    check_common(s, body)
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of different from n is not supported", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt)", "max_tokens")
    if body.suffix is not None:
        if not isinstance(body.prompt, str):
            raise APIError(400, "suffix needs a single text prompt", "suffix")
        if body.echo:
            raise APIError(400, "echo cannot be combined with suffix", "echo")
        prompts = [await s.encode(s.infill_prompt(body.prompt, body.suffix))]
    else:
        prompts = await s.tokens_of(body.prompt)
    score_prompt = body.echo and body.logprobs is not None
    generate = body.max_tokens > 0  # max_tokens 0 (with echo): one token is computed, and left out
    params = SamplingParams(max_new_tokens=max(body.max_tokens, 1), temperature=body.temperature,
                            top_p=body.top_p, presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty, seed=body.seed, stop=tuple(body.stop or ()),
                            logprobs=body.logprobs, ignore_eos=body.ignore_eos,
                            prompt_logprobs=body.logprobs if score_prompt else None)
    jobs = s.submit_all(prompts, params, body.n)
    rid = f"cmpl-{secrets.token_hex(12)}"
    echoes = [await s.decode(p) if body.echo else "" for p in prompts]
    prompt_tokens = sum(len(p) for p in prompts)

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": s.created(), "model": s.model_name,
                "choices": choices}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def chunks():
            with_usage = {"usage": None} if include_usage else {}
            for i, echo in enumerate(echoes):
                for sample in range(body.n if echo else 0):
                    yield chunk([{"text": echo, "index": i * body.n + sample, "logprobs": None,
                                  "finish_reason": None}]) | with_usage
            completion_tokens = 0
            async for i, event in s.merged(jobs):
                completion_tokens += generate
                text = event.text if generate else ""
                if text or event.finish_reason:
                    yield chunk([{"text": text, "index": i * body.n + event.sample, "logprobs": None,
                                  "finish_reason": OPENAI_FINISH.get(event.finish_reason)}]) | with_usage
            if include_usage:
                yield chunk([]) | {"usage": usage(prompt_tokens, completion_tokens)}

        return s.sse(chunks(), "openai")
    results = await s.collect(request, jobs)
    choices, completion_tokens = [], 0
    for i, samples in enumerate(results):
        for c in samples:
            if not generate:
                c.text, c.tokens, c.token_ids, c.finish_reason = "", [], [], "length"
            completion_tokens += len(c.token_ids)
            choices.append({"text": echoes[i] + c.text, "index": i * body.n + c.sample,
                            "logprobs": s.openai_logprobs(c, body.echo) if body.logprobs is not None else None,
                            "finish_reason": OPENAI_FINISH[c.finish_reason]})
    return chunk(choices) | {"usage": usage(prompt_tokens, completion_tokens)}


@router.post("/v1/chat/completions", responses=answers(ChatCompletionResponse, OpenAIError, stream=True))
async def chat_completions(body: ChatCompletionRequest, request: Request, s: ServiceDep):
    s.check_model(body.model, any_name=True)  # TGI's chat route answers whatever name is asked for
    check_common(s, body)
    prompt = chat_prompt([{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                          for m in body.messages])
    stops = with_chat_stops(body.stop)
    params = SamplingParams(max_new_tokens=body.max_completion_tokens or body.max_tokens or 512,
                            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops,
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    ids = await s.encode(prompt)
    (job,) = s.submit_all([ids], params, body.n)
    rid = f"chatcmpl-{secrets.token_hex(12)}"

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": s.created(), "model": s.model_name,
                "choices": choices}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def chunks():
            with_usage = {"usage": None} if include_usage else {}
            started: set[int] = set()
            for sample in range(body.n):
                yield chunk([{"index": sample, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}]) | with_usage
            completion_tokens = 0
            async for _, event in s.merged([job]):
                completion_tokens += 1
                text = event.text
                if event.sample not in started:  # the reply follows "Assistant:" after a space
                    text = text.lstrip()
                    if text:
                        started.add(event.sample)
                if text:
                    yield chunk([{"index": event.sample, "delta": {"content": text},
                                  "finish_reason": None}]) | with_usage
                if event.finish_reason:
                    yield chunk([{"index": event.sample, "delta": {},
                                  "finish_reason": OPENAI_FINISH[event.finish_reason]}]) | with_usage
            if include_usage:
                yield chunk([]) | {"usage": usage(len(ids), completion_tokens)}

        return s.sse(chunks(), "openai")
    (samples,) = await s.collect(request, [job])
    completion_tokens = sum(len(c.token_ids) for c in samples)
    return {"id": rid, "object": "chat.completion", "created": s.created(), "model": s.model_name,
            "choices": [{"index": c.sample, "message": {"role": "assistant", "content": c.text.strip()},
                         "finish_reason": OPENAI_FINISH[c.finish_reason]} for c in samples],
            "usage": usage(len(ids), completion_tokens)}
