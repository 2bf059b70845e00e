"""The encoder family: StarEncoder (BERT-architecture, trained on The Stack) and StarPII (a token classifier on it).

It shares the decoder's blocks (model.Block with post-LayerNorm, model.Attention over a padding mask instead of
the causal one, model.MLP) and differs where BERT does:
  embeddings  token + learned position + token type (segment), then a LayerNorm
  attention   bidirectional: every token sees every non-pad token of its sequence; no cache
  heads       pretraining: masked-LM (dense, activation, LayerNorm, then the tied embedding plus a bias) and
              next-sentence (a tanh pooler over the first token, then 2 scores); masked_lm: the first alone;
              token_classification: one linear over every token (StarPII)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .errors import StarCoderError
from .linears.dense import Linear
from .model import Block, ModelOutput, Span, _embedding


class Encoder(nn.Module):
    """Embeddings and blocks (the pooler too, for the pre-training head): BERT's `bert` module."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = _embedding(config.vocab_size, config.n_embd)
        self.pos_embed = _embedding(config.max_positions, config.n_embd)
        self.type_embed = _embedding(config.type_vocab_size, config.n_embd)
        self.embed_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.pooler = Linear(config.n_embd, config.n_embd) if config.head == "pretraining" else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        B, T = input_ids.shape
        if self.config.max_positions < T:
            raise StarCoderError(f"{T} tokens are more than the encoder's {self.config.max_positions} positions")
        positions = torch.arange(T, device=input_ids.device)[None]
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embed_norm(self.embed(input_ids) + self.type_embed(types) + self.pos_embed(positions))
        # (B, 1, 1, T): the keys each sequence's tokens may see, for every query
        keys = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                else attention_mask.to(device=x.device, dtype=torch.bool))
        span = Span(B, T, keys[:, None, None, :])
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            x = block(x, [span], i)
            if hidden is not None:
                hidden.append(x)
        return x, tuple(hidden) if hidden is not None else None

    def pooled(self, x: Tensor) -> Tensor:
        """The first token's state through the pooler (what next-sentence prediction reads)."""
        return torch.tanh(self.pooler(x[:, 0]))


class MaskedLMHead(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.dense = Linear(config.n_embd, config.n_embd)
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.decoder = Linear(config.n_embd, config.vocab_size)  # weight: the token embedding when tied
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(self.dense(x, activation=self.activation)))


class EncoderModel(nn.Module):
    """An encoder with the config's head: `pretraining` (MLM + next sentence), `masked_lm` or
    `token_classification`, in the interface of the decoders' models (forward -> ModelOutput)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Encoder(config)
        if config.head == "token_classification":
            self.classifier = Linear(config.n_embd, config.num_labels)
        else:
            self.mlm = MaskedLMHead(config)
            if config.head == "pretraining":
                self.nsp = Linear(config.n_embd, 2)
            self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tied_head is not None:
            self.mlm.decoder.weight = self.model.embed.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, next_sentence_label: Tensor | None = None,
                output_hidden_states: bool = False) -> ModelOutput:
        """labels: per token (-100 where no loss: the unmasked tokens for MLM, pad and continuation pieces for
        token classification); next_sentence_label: per sequence, 0 when the second segment follows the first."""
        x, hidden = self.model(input_ids, attention_mask, token_type_ids, output_hidden_states)
        if self.config.head == "token_classification":
            logits = self.classifier(x)
            loss = token_loss(logits, labels) if labels is not None else None
            return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)
        logits = self.mlm(x)
        loss = token_loss(logits, labels) if labels is not None else None
        nsp = self.nsp(self.model.pooled(x)) if self.config.head == "pretraining" else None
        if nsp is not None and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp.float(), next_sentence_label.view(-1))
            loss = nsp_loss if loss is None else loss + nsp_loss
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden, next_sentence_logits=nsp)


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the tokens whose label is not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100)


def with_token_classifier(model: EncoderModel, labels: list[str]) -> EncoderModel:
    """The same encoder body under a new, randomly initialised token-classification head over these labels (as
    transformers' BertForTokenClassification.from_pretrained(encoder, id2label=...) starts a StarPII fine-tune)."""
    from dataclasses import replace

    from .model import init_weights

    id2label = {str(i): label for i, label in enumerate(labels)}
    config = replace(model.config, head="token_classification", num_labels=len(labels),
                     hf_config={**model.config.hf_config, "id2label": id2label,
                                "label2id": {label: i for i, label in enumerate(labels)}})
    weight = next(model.parameters())
    classifier = EncoderModel(config)
    init_weights(classifier)
    classifier.to(device=weight.device, dtype=weight.dtype)
    body = {name: t for name, t in model.model.state_dict().items() if not name.startswith("pooler.")}
    classifier.model.load_state_dict(body)
    return classifier
