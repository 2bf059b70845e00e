"""OpenAI's completions (with `suffix` for fill-in-the-middle), chat and models routes."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request

from ..chat import STOP as CHAT_STOP
from ..chat import chat_prompt
from ..generate import SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest
from .service import OPENAI_FINISH, APIError, Service


def add_routes(app: FastAPI, s: Service) -> None:
    sc, engine, model_name = s.sc, s.engine, s.model_name
    check_model, submit_all, collect, merged, sse, created = (s.check_model, s.submit_all, s.collect, s.merged,
                                                              s.sse, s.created)
    tokens_of, openai_logprobs = s.tokens_of, s.openai_logprobs

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
                                seed=body.seed, stop=tuple(body.stop or ()), logprobs=body.logprobs,
                                ignore_eos=body.ignore_eos)
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

