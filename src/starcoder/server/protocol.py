"""Request and response bodies of the APIs the server speaks: OpenAI completions and chat, TGI, llama.cpp infill.

Unknown fields are rejected (as both OpenAI and TGI do), so a misspelt option is an error rather than a silent
default. Ranges that depend on the served model (context, batch size) are checked by the routes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


# ---------------------------------------------------------------------------------------------- OpenAI
class CompletionRequest(Strict):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens whatever the model says

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))


# ---------------------------------------------------------------------------------------------- TGI
class GenerateParameters(Strict):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0)
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


class GenerateRequest(Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(Strict):
    inputs: str
    parameters: dict | None = None


# ---------------------------------------------------------------------------------------------- llama.cpp
class ExtraContext(Strict):
    filename: str
    text: str


class InfillRequest(Strict):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraContext] = Field(default_factory=list)
    prompt: str = ""
    n_predict: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    cache_prompt: bool = False

    _stops = field_validator("stop")(lambda cls, v: _stop_list(v))
