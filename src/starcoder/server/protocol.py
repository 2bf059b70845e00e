"""Request and response bodies of the APIs the server speaks: OpenAI completions and chat, TGI, llama.cpp.

OpenAI and TGI bodies reject unknown fields (as both servers do), so a misspelt option is an error rather than a
silent default; llama.cpp's server ignores fields it does not know, and editor plugins rely on that, so its
bodies do too. Every text field must be valid Unicode (a JSON string can carry a lone surrogate, which no
tokenizer can read), and numbers must be finite. Ranges that depend on the served model (context, batch size)
are checked by the routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI allows 4 stop strings; editors send more (Continue's StarCoder2 template has 11), and vLLM, TGI's OpenAI
# route and llama.cpp accept them.
MAX_STOP = 32
SEED = Field(None, ge=0, le=2**64 - 1)  # unsigned 64-bit, as OpenAI and TGI allow
# Documented for fuzzers and clients; the routes check it and say "must not be empty" in the API's own words
NOT_EMPTY = {"minLength": 1, "minItems": 1}


def _check_text(value: Any) -> Any:
    """Refuse strings that are not valid Unicode, anywhere inside a field's value."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode (a lone surrogate at character {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_text(v)
    return value


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # no "1" for 1, no 0 for false

    _text = field_validator("*")(lambda cls, v: _check_text(v))


class LenientBody(Body):
    """llama.cpp's bodies: fields this server does not know are ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


# ---------------------------------------------------------------------------------------------- OpenAI
class StreamOptions(Body):
    include_usage: bool = False


class CompletionRequest(Body):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra=NOT_EMPTY)
    suffix: str | None = None
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: score the prompt, generate nothing (legacy OpenAI)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    seed: int | None = SEED
    user: str | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens whatever the model says

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = SEED
    user: str | None = None

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


# ---------------------------------------------------------------------------------------------- TGI
class GenerateParameters(Body):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    typical_p: float | None = Field(None, ge=1, le=1)  # this server does not do typical sampling
    do_sample: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = SEED
    stop: list[str] = Field(default_factory=list)
    return_full_text: bool | None = None
    truncate: int | None = Field(None, ge=1)
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=5)
    # TGI's options this server does not have: accepted only as their "off" values
    best_of: int | None = Field(None, ge=1, le=1)
    watermark: bool = Field(False, json_schema_extra={"enum": [False]})
    grammar: None = None
    adapter_id: None = None

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value: bool) -> bool:
        if value:
            raise ValueError("watermarking is not supported by this server")
        return value


class GenerateRequest(Body):
    inputs: str = Field(json_schema_extra=NOT_EMPTY)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(Body):
    inputs: str
    parameters: dict | None = None


# ---------------------------------------------------------------------------------------------- llama.cpp
class ExtraContext(LenientBody):
    """A chunk of another file (llama.vim and llama.vscode send recently used lines, with the time seen)."""

    filename: str = ""
    text: str = ""
    time: float | None = None


class LlamaCompletionRequest(LenientBody):
    """llama.cpp's /completion body; /infill adds the FIM fields below. Sampling fields keep llama.cpp's
    defaults and meanings: temperature <= 0 is greedy, top_k <= 0 and top_p >= 1 are off, seed -1 is random,
    n_predict -1 generates until an end token or the end of the context."""

    prompt: str | list[int] = Field(json_schema_extra=NOT_EMPTY)
    n_predict: int = Field(-1, ge=-1)  # 0: only warm up (tokenize), generate nothing
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int = Field(-1, ge=-1, le=2**64 - 1)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    cache_prompt: bool = True
    ignore_eos: bool = False  # generate n_predict tokens whatever the model says
    n_indent: int = Field(0, ge=0)  # end before a new line indented less than this
    t_max_prompt_ms: int = -1  # accepted; prompts are not cut short by time
    t_max_predict_ms: int = -1  # once this many ms of generation are spent, end at the next line break
    samplers: list[str] | str | None = None  # llama.cpp's sampler order; this server's order is fixed
    response_fields: list[str] | None = None  # answer only these fields ("a/b" reaches into nested objects)

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


class InfillRequest(LlamaCompletionRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraContext] = Field(default_factory=list)
    prompt: str = ""  # the text left of the cursor on its line: it goes after <fim_middle>


# ---------------------------------------------------------------------------------------------- answers
# Documented in /openapi.json (clients and fuzzers check answers against them); the routes build plain dicts.
class Answer(BaseModel):
    pass


class OpenAIErrorDetail(Answer):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Answer):
    error: OpenAIErrorDetail


class TGIError(Answer):
    error: str
    error_type: str


class LlamaErrorDetail(Answer):
    code: int
    message: str
    type: str


class LlamaError(Answer):
    error: LlamaErrorDetail


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Logprobs(Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Answer):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ReplyMessage(Answer):
    role: Literal["assistant"]
    content: str


class ChatChoice(Answer):
    index: int
    message: ReplyMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelCard]


class Token(Answer):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(Answer):
    id: int
    text: str
    logprob: float | None


class Details(Answer):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(Answer):
    generated_text: str
    details: Details | None = None


class Info(Answer):
    model_id: str
    model_dtype: str
    model_device_type: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    version: str


class TokenSpan(Answer):
    id: int
    text: str
    start: int
    stop: int


# One server-sent event (as OpenAPI before 3.2 documents a stream): a JSON chunk in `data`, or an error
SSE_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}


def answers(model: Any, error: type[Answer], stream: bool = False) -> dict:
    """A route's documented answers: `model` (also as server-sent events when it can stream), and every 4xx
    and 5xx in its API's error shape."""
    ok: dict = {"model": model} if model is not None else {}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    return {200: ok, "4XX": {"model": error}, "5XX": {"model": error}}
