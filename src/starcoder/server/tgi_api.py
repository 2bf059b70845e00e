"""Text Generation Inference's routes, and llama.cpp's /infill, as code editors and their clients use them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from ..generate import Completion, SamplingParams
from .engine import Job
from .protocol import GenerateRequest, InfillRequest, TokenizeRequest
from .service import TGI_FINISH, APIError, Service


def add_routes(app: FastAPI, s: Service) -> None:
    sc, engine, model_name = s.sc, s.engine, s.model_name
    submit_all, collect, merged, sse = s.submit_all, s.collect, s.merged, s.sse

    def tgi_job(body: GenerateRequest) -> tuple[Job, list[int], SamplingParams]:
        p = body.parameters
        for name, unsupported in (("best_of", (p.best_of or 1) > 1), ("watermark", p.watermark),
                                  ("grammar", p.grammar is not None), ("adapter_id", p.adapter_id is not None),
                                  ("typical_p", p.typical_p not in (None, 1.0))):
            if unsupported:
                raise APIError(422, f"`{name}` is not supported by this server", name)
        if not body.inputs:
            raise APIError(422, "`inputs` must not be empty", "inputs")
        ids = sc.tokenizer.encode(body.inputs)
        if p.truncate:
            ids = ids[-p.truncate :]
        # As in TGI: sampling when asked, or when any sampling setting is given.
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens or 100, temperature=(p.temperature or 1.0) if sampling else 0.0,
            top_k=p.top_k or 0, top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, seed=p.seed, stop=tuple(p.stop),
            logprobs=(p.top_n_tokens or 0) if (p.details or p.top_n_tokens) else None)
        (job,) = submit_all([ids], params, 1)
        return job, ids, params

    def tgi_token(t) -> dict:
        return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}

    def tgi_details(body: GenerateRequest, c: Completion, ids: list[int]) -> dict:
        details = {"finish_reason": TGI_FINISH[c.finish_reason], "generated_tokens": len(c.token_ids),
                   "seed": c.seed if body.parameters.do_sample else None,
                   "prefill": [{"id": i, "text": sc.tokenizer.decode([i]), "logprob": None} for i in ids]
                   if body.parameters.decoder_input_details else [],
                   "tokens": [tgi_token(t) for t in c.tokens]}
        if body.parameters.top_n_tokens:
            details["top_tokens"] = [[{"id": i, "text": text, "logprob": lp, "special": i in sc.tokenizer.special_ids}
                                      for i, text, lp in (t.top or [])] for t in c.tokens]
        return details

    async def tgi_generate(body: GenerateRequest, request: Request) -> dict:
        job, ids, _ = tgi_job(body)
        ((c,),) = await collect(request, [job])
        full = body.inputs if body.parameters.return_full_text else ""
        answer = {"generated_text": full + c.text}
        if body.parameters.details:
            answer["details"] = tgi_details(body, c, ids)
        return answer

    def tgi_stream(body: GenerateRequest) -> StreamingResponse:
        job, _, _ = tgi_job(body)

        async def chunks():
            async for _, event in merged([job]):
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

        return sse(chunks(), done_marker=False)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        return await tgi_generate(body, request)

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest):
        return tgi_stream(body)

    @app.post("/")
    async def compat_generate(body: GenerateRequest, request: Request):
        """TGI's route for the Hugging Face inference clients: a list, or a stream with `stream: true`."""
        if body.stream:
            return tgi_stream(body)
        return [await tgi_generate(body, request)]

    @app.get("/info")
    async def info():
        weight = sc.model.model.embed.weight
        return {"model_id": model_name, "model_sha": None, "model_dtype": str(weight.dtype).removeprefix("torch."),
                "model_device_type": weight.device.type, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": engine.max_batch + engine.max_queue, "max_best_of": 1,
                "max_stop_sequences": 4, "max_input_tokens": engine.max_len - 1, "max_total_tokens": engine.max_len,
                "max_batch_size": engine.max_batch, "validation_workers": 1, "max_client_batch_size": 1,
                "router": "starcoder", "version": __import__("starcoder").__version__}

    @app.get("/health")
    async def health():
        return {}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        encoding = sc.tokenizer.backend.encode(body.inputs, add_special_tokens=False)
        return [{"id": i, "text": body.inputs[a:b], "start": a, "stop": b}
                for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)]

    @app.get("/metrics")
    async def metrics():
        s = engine.stats
        rows = [("requests_total", "counter", "requests accepted", s.requests),
                ("requests_rejected_total", "counter", "requests refused because the queue was full", s.rejected),
                ("requests_cancelled_total", "counter", "requests cancelled (client gone, timeout)", s.cancelled),
                ("prompt_tokens_total", "counter", "prompt tokens accepted", s.prompt_tokens),
                ("generated_tokens_total", "counter", "tokens generated", s.generated_tokens),
                ("decode_steps_total", "counter", "batched decode steps", s.steps),
                ("busy_seconds_total", "counter", "seconds the engine spent computing", s.busy_seconds),
                ("queue_size", "gauge", "requests waiting for a slot", engine.waiting),
                ("active_sequences", "gauge", "sequences being generated", engine.active),
                ("batch_slots", "gauge", "sequences that can be generated at once", engine.max_batch)]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP starcoder_{name} {doc}", f"# TYPE starcoder_{name} {kind}", f"starcoder_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ llama.cpp
    @app.post("/infill")
    async def infill(body: InfillRequest, request: Request):
        if body.input_extra and sc.format.repo_style == "starcoder2":
            from ..fim import RepoFile

            files = [RepoFile(e.filename, e.text) for e in body.input_extra]
            prompt = sc.format.repository("", files, "", body.input_prefix + body.prompt, body.input_suffix)
        else:
            extra = "".join(e.text for e in body.input_extra)
            prompt = sc.infill_prompt(extra + body.input_prefix + body.prompt, body.input_suffix)
        params = SamplingParams(max_new_tokens=body.n_predict, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, seed=body.seed, stop=tuple(body.stop))
        ids = sc.tokenizer.encode(prompt)
        (job,) = submit_all([ids], params, 1)
        ((c,),) = await collect(request, [job])
        return {"content": c.text, "stop": True, "model": model_name, "tokens_predicted": len(c.token_ids),
                "tokens_evaluated": len(ids), "stopped_eos": c.finish_reason == "eos",
                "stopped_word": c.finish_reason == "stop", "stopped_limit": c.finish_reason == "length",
                "seed": c.seed}
