"""`starcoder.load()`: a model and its tokenizer, ready to complete, infill and chat."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from .chat import chat_prompt, with_chat_stops
from .errors import StarCoderError
from .fim import PromptFormat, RepoFile
from .generate import Completion, Request, SamplingParams, generate, stream
from .loader import load_model
from .paths import default_model_dir, resolve_model
from .speculate import Drafter, DraftModel, drafter_for
from .tokenizer import Tokenizer, load_tokenizer


class StarCoder:
    """A model and its tokenizer. Sampling options are SamplingParams' fields, passed as keywords."""

    def __init__(self, model, tokenizer: Tokenizer, speculate: str | Drafter = "none"):
        self.model, self.tokenizer = model, tokenizer
        self.speculate = drafter_for(speculate)  # checked now, shared by every generation (a draft model's cache)
        self.format = PromptFormat.for_tokenizer(tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise StarCoderError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                 f"{model.config.vocab_size}: they do not belong together")

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ prompts
    def infill_prompt(self, prefix: str, suffix: str, mode: str = "psm") -> str:
        return self.format.infill(prefix, suffix, mode)

    def repository_prompt(self, repo: str, files: Sequence[RepoFile], path: str, prefix: str,
                          suffix: str | None = None) -> str:
        return self.format.repository(repo, list(files), path, prefix, suffix)

    # ------------------------------------------------------------------ whole answers
    def generate(self, prompts: Sequence[str], n: int = 1, **sampling: Any) -> list[list[Completion]]:
        params = SamplingParams(**sampling)
        requests = [Request(self.tokenizer.encode(p), params, n) for p in prompts]
        return generate(self.model, self.tokenizer, requests, speculate=self.speculate)

    def complete(self, prompt: str, **sampling: Any) -> Completion:
        return self.generate([prompt], **sampling)[0][0]

    def infill(self, prefix: str, suffix: str, mode: str = "psm", **sampling: Any) -> Completion:
        """The middle between prefix and suffix (the model's FIM answer, end token excluded)."""
        return self.complete(self.infill_prompt(prefix, suffix, mode), **sampling)

    def chat(self, messages: Sequence[dict[str, str]], **sampling: Any) -> Completion:
        stop = with_chat_stops(sampling.pop("stop", None))
        completion = self.complete(chat_prompt(messages), **sampling, stop=stop)
        completion.text = completion.text.strip()
        return completion

    # ------------------------------------------------------------------ streams of text
    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        request = Request(self.tokenizer.encode(prompt), SamplingParams(**sampling))
        for event in stream(self.model, self.tokenizer, [request], speculate=self.speculate):
            if event.text:
                yield event.text

    def stream_infill(self, prefix: str, suffix: str, mode: str = "psm", **sampling: Any) -> Iterator[str]:
        return self.stream(self.infill_prompt(prefix, suffix, mode), **sampling)

    def stream_chat(self, messages: Sequence[dict[str, str]], **sampling: Any) -> Iterator[str]:
        stop = with_chat_stops(sampling.pop("stop", None))
        return self.stream(chat_prompt(messages), **sampling, stop=stop)


def load(model: str | os.PathLike | None = None, dtype: str | None = None, device: str = "cpu",
         allow_pickle: bool = False, pack: bool = True, speculate: str = "none",
         draft_model: str | os.PathLike | None = None) -> StarCoder:
    """A model directory or hub id with its tokenizer, for inference; None means the embedded default model.

    On the CPU the weights are packed for oneDNN (pack=True), which decodes about 1.5x faster; pass pack=False
    to get a model that can also be trained or saved (as `.model`). While a single sequence decodes, tokens can be
    drafted and checked several at a time, with the same output: speculate="ngram" by prompt lookup (faster where
    the text repeats its input), speculate="draft" by `draft_model`, a smaller model with the same tokenizer.
    """
    if draft_model is not None and speculate in ("none", "draft"):
        speculate = "draft"
    elif draft_model is not None:
        raise StarCoderError(f"a draft model is used with speculate='draft', not {speculate!r}")
    model_dir = default_model_dir() if model is None else resolve_model(model)
    pack = pack and device == "cpu"
    model = load_model(model_dir, dtype=dtype, device=device, allow_pickle=allow_pickle, pack=pack)
    model.config.require_causal_lm(model_dir, "generating text")
    tokenizer = load_tokenizer(model_dir)
    if speculate == "draft" and draft_model is not None:
        draft_dir = resolve_model(draft_model)
        drafter = load_model(draft_dir, dtype=dtype, device=device, allow_pickle=allow_pickle, pack=pack)
        drafter.config.require_causal_lm(draft_dir, "drafting tokens")
        speculate = DraftModel(drafter, load_tokenizer(draft_dir), tokenizer)
    return StarCoder(model, tokenizer, speculate)
