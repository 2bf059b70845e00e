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
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    _text = field_validator("*")(lambda cls, v: _check_text(v))


class LenientBody(Body):
    """llama.cpp's bodies: fields this server does not know are ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


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
    prompt: str | list[str] | list[int] | list[list[int]]
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
    typical_p: float | None = Field(None, gt=0, le=1)
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
    best_of: int | None = Field(None, ge=1)
    watermark: bool = False
    grammar: dict | None = None
    adapter_id: str | None = None

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


class GenerateRequest(Body):
    inputs: str
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

    prompt: str | list[int] = ""
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
