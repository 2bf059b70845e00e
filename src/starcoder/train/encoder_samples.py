"""StarEncoder's pre-training samples from the same token shards the decoders train on.

A sample is `<cls> A <sep> B <sep>`: A is the first half of a training window; B is what follows it in the same
window (half the time: next-sentence label 0) or the same stretch of another window (label 1). Token types are 0
through the first `<sep>`, 1 after. Masked LM as BERT and StarEncoder: 15% of the non-special tokens are chosen;
of those, 80% become `<mask>`, 10% a random token, 10% stay; the labels hold the original tokens there and -100
elsewhere. Every choice comes from a generator seeded by (seed, sample index), so a resumed run, or one on
another number of processes, sees the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StarCoderError
from ..tokenizer import ENCODER_TOKENS, Tokenizer
from .data import TokenDataset

MASK_RATE = 0.15
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1


@dataclass(frozen=True)
class EncoderTokens:
    pad: int
    sep: int
    cls: int
    mask: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> EncoderTokens:
        ids = {name: tokenizer.token_id(name) for name in ENCODER_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise StarCoderError(f"{tokenizer.source}: the encoder's objective needs the tokens "
                                 f"{', '.join(ENCODER_TOKENS)}; {', '.join(missing)} missing (StarEncoder's vocabulary "
                                 "is StarCoder's plus these four: `starcoder init --preset starencoder` writes it)")
        return cls(*(ids[name] for name in ENCODER_TOKENS))


def mask_tokens(ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, tokens: EncoderTokens,
                vocab_size: int, rate: float = MASK_RATE) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of masked LM over the maskable positions."""
    chosen = maskable & (rng.random(len(ids)) < rate)
    labels = np.where(chosen, ids, -100)
    roll = rng.random(len(ids))
    inputs = ids.copy()
    inputs[chosen & (roll < MASK_TOKEN_SHARE)] = tokens.mask
    randomized = chosen & (roll >= MASK_TOKEN_SHARE) & (roll < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    inputs[randomized] = rng.integers(0, vocab_size, int(randomized.sum()))
    return inputs, labels


def pretraining_sample(dataset: TokenDataset, index: int, g: int, tokens: EncoderTokens, vocab_size: int,
                       seed: int, next_sentence: bool = True) -> dict[str, np.ndarray]:
    """The encoder's sample from window `index` of the dataset (g: the sample's number, which seeds its choices);
    without next_sentence (a masked-LM head) B always follows A."""
    rng = np.random.default_rng((seed, 2_000_003, g))
    window = dataset[index][: dataset.seq_len].astype(np.int64)
    budget = len(window) - 3
    a_len = budget // 2
    label = int(next_sentence and len(dataset) > 1 and rng.random() < 0.5)
    if label:
        other = (index + 1 + int(rng.integers(len(dataset) - 1))) % len(dataset)  # any window but this one
        second = dataset[other][a_len:budget].astype(np.int64)
    else:
        second = window[a_len:budget]
    ids = np.concatenate([[tokens.cls], window[:a_len], [tokens.sep], second, [tokens.sep]])
    types = np.zeros_like(ids)
    types[a_len + 2:] = 1
    inputs, labels = mask_tokens(ids, ~np.isin(ids, (tokens.cls, tokens.sep)), rng, tokens, vocab_size)
    return {"input_ids": inputs, "token_type_ids": types, "labels": labels, "next_sentence_label": np.array(label)}


@dataclass(frozen=True)
class EncoderObjective:
    """What `starcoder train` needs to make an encoder's batches: masked LM, with next sentence for the
    pre-training head."""

    tokens: EncoderTokens
    vocab_size: int
    seed: int
    next_sentence: bool

    def batch(self, dataset: TokenDataset, samples: list[tuple[int, int]], device: str) -> dict[str, torch.Tensor]:
        """Samples given as (window index, sample number), stacked into the model's keyword arguments."""
        rows = [pretraining_sample(dataset, index, g, self.tokens, self.vocab_size, self.seed, self.next_sentence)
                for index, g in samples]
        keys = [key for key in rows[0] if self.next_sentence or key != "next_sentence_label"]
        return {key: torch.from_numpy(np.stack([row[key] for row in rows])).to(device) for key in keys}
