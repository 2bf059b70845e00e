"""Text Generation Inference's routes, as code editors (llm-ls) and Hugging Face's clients use them."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from ..generate import Completion, SamplingParams
from .engine import Job
from .protocol import MAX_STOP, GenerateRequest, GenerateResponse, Info, TGIError, TokenizeRequest, TokenSpan, answers
from .service import TGI_FINISH, APIError, Service, ServiceDep

router = APIRouter()


async def tgi_job(s: Service, body: GenerateRequest) -> tuple[Job, list[int]]:
    p = body.parameters
    if not body.inputs:
        raise APIError(422, "`inputs` must not be empty", "inputs")
    ids = await s.encode(body.inputs)
    if p.truncate:
        ids = ids[-p.truncate :]
    # As in TGI: sampling when asked, or when any sampling setting is given.
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens or 100, temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_k=p.top_k or 0, top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=tuple(p.stop),
        logprobs=(p.top_n_tokens or 0) if (p.details or p.top_n_tokens) else None)
    (job,) = s.submit_all([ids], params, 1)
    return job, ids


def tgi_token(t) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def tgi_details(s: Service, body: GenerateRequest, c: Completion, ids: list[int]) -> dict:
    details = {"finish_reason": TGI_FINISH[c.finish_reason], "generated_tokens": len(c.token_ids),
               "seed": c.seed if body.parameters.do_sample else None,
               "prefill": [{"id": i, "text": s.sc.tokenizer.decode([i]), "logprob": None} for i in ids]
               if body.parameters.decoder_input_details else [],
               "tokens": [tgi_token(t) for t in c.tokens]}
    if body.parameters.top_n_tokens:
        details["top_tokens"] = [[{"id": i, "text": text, "logprob": lp, "special": i in s.sc.tokenizer.special_ids}
                                  for i, text, lp in (t.top or [])] for t in c.tokens]
    return details


@router.post("/generate", responses=answers(GenerateResponse, TGIError))
async def generate(body: GenerateRequest, request: Request, s: ServiceDep):
    job, ids = await tgi_job(s, body)
    ((c,),) = await s.collect(request, [job])
    full = body.inputs if body.parameters.return_full_text else ""
    answer = {"generated_text": full + c.text}
    if body.parameters.details:
        answer["details"] = tgi_details(s, body, c, ids)
    return answer


@router.post("/generate_stream", responses=answers(None, TGIError, stream=True))
async def generate_stream(body: GenerateRequest, s: ServiceDep):
    job, _ = await tgi_job(s, body)

    async def chunks():
        async for _, event in s.merged([job]):
            c = event.completion
            out = {"index": len(c.token_ids) if c else None, "token": tgi_token(event.token),
                   "generated_text": None, "details": None}
            if c is not None:
                full = body.inputs if body.parameters.return_full_text else ""
                out["generated_text"] = full + c.text
                out["details"] = {"finish_reason": TGI_FINISH[c.finish_reason],
                                  "generated_tokens": len(c.token_ids),
                                  "seed": c.seed if body.parameters.do_sample else None}
            yield out

    return s.sse(chunks(), "tgi")


@router.post("/", responses=answers(list[GenerateResponse], TGIError, stream=True))
async def compat_generate(body: GenerateRequest, request: Request, s: ServiceDep):
    """TGI's route for the Hugging Face inference clients: a list, or a stream with `stream: true`."""
    if body.stream:
        return await generate_stream(body, s)
    return [await generate(body, request, s)]


@router.get("/info", responses=answers(Info, TGIError))
async def info(s: ServiceDep):
    weight = s.sc.model.model.embed.weight
    return {"model_id": s.model_name, "model_sha": None, "model_dtype": str(weight.dtype).removeprefix("torch."),
            "model_device_type": weight.device.type, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": s.engine.max_batch + s.engine.max_queue, "max_best_of": 1,
            "max_stop_sequences": MAX_STOP, "max_input_tokens": s.engine.max_len - 1,
            "max_total_tokens": s.engine.max_len, "max_batch_size": s.engine.max_batch, "validation_workers": 1,
            "max_client_batch_size": 1, "router": "starcoder", "version": __import__("starcoder").__version__}


@router.get("/health", responses=answers(dict, TGIError))
async def health():
    return {}


@router.post("/tokenize", responses=answers(list[TokenSpan], TGIError))
async def tokenize(body: TokenizeRequest, s: ServiceDep):
    def answer() -> bytes:  # tokenizing and writing a large input take seconds: never on the event loop
        encoding = s.sc.tokenizer.encoding(body.inputs)
        ids, offsets, text = encoding.ids, encoding.offsets, body.inputs
        # In pieces: json.dumps holds the GIL until it is done (the event loop gets turns between pieces), and
        # a million small dicts at once would leave the allocator's arenas fragmented and the process large.
        pieces = [json.dumps([{"id": t, "text": text[a:b], "start": a, "stop": b}
                              for t, (a, b) in zip(ids[i : i + 4096], offsets[i : i + 4096], strict=True)])[1:-1]
                  for i in range(0, len(ids), 4096)]
        return ("[" + ",".join(pieces) + "]").encode()

    return Response(await run_in_threadpool(answer), media_type="application/json")


@router.get("/metrics", response_class=PlainTextResponse, responses=answers(None, TGIError))
async def metrics(s: ServiceDep):
    st = s.engine.stats
    rows = [("requests_total", "counter", "requests accepted", st.requests),
            ("requests_rejected_total", "counter", "requests refused because the queue was full", st.rejected),
            ("requests_cancelled_total", "counter", "requests cancelled (client gone, timeout)", st.cancelled),
            ("requests_failed_total", "counter", "requests that failed during generation", st.failed),
            ("prompt_tokens_total", "counter", "prompt tokens accepted", st.prompt_tokens),
            ("prompt_tokens_reused_total", "counter", "prompt tokens taken from earlier prompts' keys and values",
             s.engine.generator.reused_tokens),
            ("draft_tokens_total", "counter", "tokens drafted by speculation", s.engine.generator.drafted_tokens),
            ("draft_tokens_accepted_total", "counter", "drafted tokens that were kept",
             s.engine.generator.accepted_tokens),
            ("generated_tokens_total", "counter", "tokens generated", st.generated_tokens),
            ("decode_steps_total", "counter", "batched decode steps", st.steps),
            ("busy_seconds_total", "counter", "seconds the s.engine spent computing", st.busy_seconds),
            ("queue_size", "gauge", "requests waiting for a slot", s.engine.waiting),
            ("active_sequences", "gauge", "sequences being generated", s.engine.active),
            ("batch_slots", "gauge", "sequences that can be generated at once", s.engine.max_batch)]
    lines = []
    for name, kind, doc, value in rows:
        lines += [f"# HELP starcoder_{name} {doc}", f"# TYPE starcoder_{name} {kind}", f"starcoder_{name} {value}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
