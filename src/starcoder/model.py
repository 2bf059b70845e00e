"""One decoder for StarCoder (gpt_bigcode) and StarCoder2.

The two families differ in a few switches, all read from Config:
  positions   learned table (gpt_bigcode) or rotary (starcoder2, rope_theta)
  KV heads    1 (multi-query), a divisor of n_head (grouped-query) or n_head (multi-head)
  window      full causal, or sliding: key j visible to query i iff 0 <= i - j < sliding_window
  bias        on every linear, or none (starcoder2 use_bias)
Everything else (pre-LayerNorm blocks, GELU MLP, tied embeddings) is shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache, PagedKVCache
from .config import Config
from .errors import StarCoderError
from .linears import native
from .linears.dense import Linear, pack_weight


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V) for a causal LM or MLM, (B, num_labels) for a classifier, (B, T, num_labels) per token
    loss: Tensor | None = None
    next_sentence_logits: Tensor | None = None  # (B, 2), the encoder's pre-training head
    # With output_hidden_states: the embeddings, then each block's output; the last one after the final norm
    # (the convention of transformers, so the two can be compared).
    hidden_states: tuple[Tensor, ...] | None = None


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (B, T, head_dim) for the given positions, computed in float32 as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                                / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotation(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin (B, T, hd) as apply_rotary takes them: (B, T, 1, hd), with the first half of sin negated."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, hd) by the half-split convention (first half paired with second half), given
    rotation(cos, sin): x cos + (-x2, x1) sin, computed as x cos + (x2, x1) (-sin1, sin2), the same products to the
    bit (negation is exact) in 4 operations where it took 9, each a few microseconds twice per layer of a decode
    step."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def move_keys(k: Tensor, delta: int, config: Config) -> Tensor:
    """Cached keys (n_layer, n_kv, L, hd) as they would be `delta` positions later: a rotary key at position p is
    R(p) k and R(p + delta) = R(delta) R(p) (llama.cpp's KV shift). Learned positions are added into the hidden
    state itself, so a StarCoder key cannot move."""
    if delta == 0:
        return k
    if config.learned_positions:
        raise StarCoderError("keys of a model with learned positions cannot move to other positions")
    offsets = torch.full((1, k.shape[2]), delta, device=k.device)
    turn = rotation(*rotary_cos_sin(offsets, config.head_dim, config.rope_theta, torch.float32))
    return apply_rotary(k.transpose(1, 2).float(), *turn).to(k.dtype).transpose(1, 2)  # n_layer as the batch


# What a layer's attention must apply: a boolean mask (B or 1, 1, T, S), or one of two patterns that need none.
CAUSAL = "causal"  # query t sees keys 0..t: the whole input is new and nothing cuts the view
ALL_KEYS = "all"  # every query sees every key (one new token, no window cut, no padding)


def attention_pattern(
    attention_mask: Tensor | None, start: int | Tensor, T: int, S: int, window: int | None, device,
    key_positions: Tensor | None = None,
) -> Tensor | str:
    """Which keys each query may see: causal, optionally windowed, and blind to padded keys.

    `start` is the position of the first new token: one int for the batch, or one per row (B,). Key j is at
    position j, or at key_positions[b, j] (a paged cache's gathered blocks). A padded query still sees itself,
    so its (ignored) output stays finite rather than NaN.
    """
    if attention_mask is not None and attention_mask.shape[-1] != S:
        raise StarCoderError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cache and input hold {S}"
        )
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and key_positions is None and isinstance(start, int) and (window is None or window >= S):
        if start == 0:
            return CAUSAL
        if T == 1:
            return ALL_KEYS
    starts = torch.as_tensor(start, device=device).reshape(-1, 1, 1)  # (B or 1, 1, 1)
    q_pos = starts + torch.arange(T, device=device)[None, :, None]  # (B or 1, T, 1)
    k_pos = torch.arange(S, device=device) if key_positions is None else key_positions
    k_pos = k_pos.reshape(-1, 1, S)  # (1 or B, 1, S)
    visible = k_pos <= q_pos  # (B or 1, T, S)
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    if attention_mask is not None:
        visible = visible & (attention_mask.bool()[:, None, :] | (k_pos == q_pos))
    return visible[:, None]  # (B or 1, 1, T, S)


FOLD_MAX_TOKENS = 4  # up to this many new tokens (decoding), query heads are folded; beyond, KV is broadcast
# A whole prompt of up to 512 tokens on the CPU takes its attention this many queries at a time (see attend).
CAUSAL_QUERY_CHUNK = 64


def attend(q: Tensor, k: Tensor, v: Tensor, pattern: Tensor | str, scale: float) -> Tensor:
    """Attention of q (B, T, H, hd) over k, v (B, KV, S, hd) -> (B, T, H * hd)."""
    B, T, H, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    if T > FOLD_MAX_TOKENS:
        y = _native_prompt_attention(q, k, v, pattern, scale)
        if y is not None:
            return y
        # Prompt processing: KV heads broadcast to the query heads (expand copies nothing), so the kernel can
        # exploit the causal pattern when there is no mask.
        k, v = (t[:, :, None].expand(B, KV, G, S, hd).reshape(B, H, S, hd) for t in (k, v))
        q = q.transpose(1, 2)  # (B, H, T, hd)
        if pattern == CAUSAL and q.device.type == "cpu" and CAUSAL_QUERY_CHUNK < T <= 512 and H * hd >= 1024:
            y = _causal_in_chunks(q, k, v, scale)
        else:
            mask = pattern if isinstance(pattern, Tensor) else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pattern == CAUSAL,
                                               scale=scale)  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, H * hd)
    mask = None  # (B or 1, T, S)
    if isinstance(pattern, Tensor):
        mask = pattern[:, 0]
    elif pattern == CAUSAL and T > 1:
        mask = last_queries_causal(T, S, q.device)[None]
    y = _native_attention(q, k, v, mask, scale)
    if y is not None:
        return y
    # Decoding by PyTorch's kernel: the query heads that share a KV head are folded into the sequence axis,
    # (B, KV, G*T, hd), so each stored KV head is read once (many times faster than broadcasting the cache).
    q = q.view(B, T, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
    if mask is not None:
        mask = mask[:, None, None].expand(mask.shape[0], 1, G, T, S).reshape(mask.shape[0], 1, G * T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, KV, G*T, hd)
    return y.view(B, KV, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, H * hd)


def last_queries_causal(T: int, S: int, device) -> Tensor:
    """The causal mask (T, S) of the last T of S positions as queries over all S as keys (true: visible)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def _causal_in_chunks(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of q over k, v (B, H, T, hd), CAUSAL_QUERY_CHUNK queries at a time against the keys up to
    their end. PyTorch's CPU flash attention reads keys in blocks of 512, so up to 512 tokens it computes every score
    above the diagonal and masks it away; the chunks skip most of that. 16 heads of 128, 512 tokens: 13.7 -> 9.5 ms
    per layer (1.2-1.4x from 128 tokens and 1024 wide up; 0.96-0.99x at 1024 tokens, and narrower heads gain little
    or lose to the extra calls); whole prompts 1.02x (1B) and 1.025x (3B), alternating in one process."""
    T, parts = q.shape[2], []
    for start in range(0, T, CAUSAL_QUERY_CHUNK):
        end = min(start + CAUSAL_QUERY_CHUNK, T)
        parts.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                                    attn_mask=last_queries_causal(end - start, end, q.device),
                                                    scale=scale))
    return torch.cat(parts, 2)


def _native_prompt_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Tensor | str, scale: float) -> Tensor | None:
    """A prompt's attention (B, T, H * hd) by our bfloat16 kernel (attention_avx512.h: each KV head's keys met once
    for all its query heads, with vdpbf16ps; 1.7-2.6x PyTorch's flash attention on the 1B, 3B and embedded shapes,
    measured from 16 to 1,398 new tokens), or None where it does not apply. CAUSAL is the kernel's default: the
    queries are the last T keys."""
    if (q.device.type != "cpu" or q.requires_grad or q.shape[-1] % 32
            or any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in (q, k, v))):
        return None
    kernels = native.kernels("avx512")
    if kernels is None:
        return None
    return kernels.prompt_attention(q, k, v, pattern[:, 0].contiguous() if isinstance(pattern, Tensor) else None,
                                    scale)


def _native_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor | None:
    """Decoding's attention (B, T, H * hd) by our CPU kernel (attention_avx2.h: each KV head's keys read once for
    its query heads, split among the threads), or None where it does not apply. PyTorch's kernel spent 200-350 us
    per layer on it, alone on one core."""
    if (q.device.type != "cpu" or q.requires_grad or q.shape[-1] % 8 or q.stride(-1) != 1
            or q.dtype not in (torch.float32, torch.bfloat16) or k.dtype not in (torch.float32, torch.bfloat16)
            or v.dtype != k.dtype or k.stride(-1) != 1 or v.stride(-1) != 1):
        return None
    kernels = native.avx2_kernels()
    if kernels is None:
        return None
    return kernels.decode_attention(q, k, v, None if mask is None else mask.contiguous(), scale)


@dataclass
class Span:
    """One group of rows in a forward pass: `rows` rows of `tokens` new tokens, with their own cache and the keys
    each may see. Spans computed together lie one after another along the token axis of a single row: every
    linear reads its weights once for all of them (a prompt chunk riding along with a decode step), while
    attention stays within each span."""

    rows: int
    tokens: int
    pattern: Tensor | str = CAUSAL
    rotary: tuple[Tensor, Tensor] | None = None
    cache: KVCache | PagedKVCache | None = None
    start: int | Tensor = 0


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q = Linear(config.n_embd, q_dim, bias=config.bias)
        self.k = Linear(config.n_embd, kv_dim, bias=config.bias)
        self.v = Linear(config.n_embd, kv_dim, bias=config.bias)
        self.o = Linear(q_dim, config.n_embd, bias=config.bias)
        self.widths = [q_dim, kv_dim, kv_dim]
        self.qkv: nn.Module | None = None  # q, k and v in one layer for CPU inference, once fuse_qkv() has run
        self.scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0

    def fuse_qkv(self, make_layer: Callable[[Tensor, Tensor | None], nn.Module] | None = None) -> None:
        """q, k and v as one layer for CPU inference: one call and one weight read per token where there were
        three (a multi-query model's k and v are too small to be worth a call's fixed cost). make_layer(weight,
        bias) builds it; by default a Linear packed for oneDNN."""
        parts = (self.q, self.k, self.v)
        weight = torch.cat([part.weight.detach() for part in parts])
        bias = torch.cat([part.bias.detach() for part in parts]) if self.q.bias is not None else None
        self.use_qkv((make_layer or _packed_linear)(weight, bias))

    def use_qkv(self, layer: nn.Module) -> None:
        """q, k and v replaced by one layer computing all three (their outputs one after another)."""
        self.qkv = layer
        del self.q, self.k, self.v

    def forward(self, x: Tensor, spans: list[Span], layer: int) -> Tensor:
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.widths, -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if len(spans) == 1:
            return self.o(self._attend(spans[0], q, k, v, layer))
        sizes = [span.rows * span.tokens for span in spans]
        parts = zip(spans, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True)
        return self.o(torch.cat([self._attend(*part, layer).reshape(1, -1, q.shape[-1]) for part in parts], 1))

    def _attend(self, span: Span, q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
        B, T = span.rows, span.tokens
        q = q.reshape(B, T, self.n_head, self.head_dim)
        k = k.reshape(B, T, self.n_kv_head, self.head_dim)
        v = v.reshape(B, T, self.n_kv_head, self.head_dim)
        if span.rotary is not None:
            q, k = apply_rotary(q, *span.rotary), apply_rotary(k, *span.rotary)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, T, hd)
        if span.cache is not None:
            k, v = span.cache.update(layer, k, v, span.start)  # (B, KV, S, hd)
        return attend(q, k, v, span.pattern, self.scale)


def _packed_linear(weight: Tensor, bias: Tensor | None) -> Linear:
    with torch.device("meta"):
        layer = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(pack_weight(weight), requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.fc = Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.proj = Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.fc(x, activation=self.activation))


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        # LayerNorms keep their bias even when the linears have none, as in both reference models.
        self.attn_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.post_norm = config.encoder  # BERT normalizes each residual sum; the decoders each branch's input

    def forward(self, x: Tensor, spans: list[Span] | None = None, layer: int = 0) -> Tensor:
        """By default: whole sequences, causal, no cache (as calibration and tests run a block alone)."""
        spans = spans or [Span(x.shape[0], x.shape[1])]
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, spans, layer))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), spans, layer)
        return x + self.mlp(self.mlp_norm(x))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    # Passing the (uninitialised) weight skips nn.Embedding's own normal_() init: weights always come from a file
    # or init_weights(), and on the meta device that first normal_() costs about a second of lazy imports.
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: the body both heads share."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = _embedding(config.vocab_size, config.n_embd)
        self.pos_embed = _embedding(config.max_positions, config.n_embd) if config.learned_positions else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)

    def embed_tokens(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """The blocks' input: token embeddings, plus learned position embeddings where the model has them."""
        x = self.embed(input_ids).to(self.norm.weight.dtype)  # (a widened model's embedding is half precision)
        if self.pos_embed is None:
            return x
        if int(position_ids.max()) >= self.config.max_positions:
            raise StarCoderError(
                f"position {int(position_ids.max())} is past the model's {self.config.max_positions} learned positions"
            )
        return x + self.pos_embed(position_ids)

    def rotary(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """The rotation the blocks apply at these positions (see rotation); None for learned positions."""
        if self.pos_embed is not None:
            return None
        return rotation(*rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, dtype))

    def span(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
             cache: KVCache | PagedKVCache | None = None) -> tuple[Span, Tensor]:
        """The blocks' view of a batch of new tokens (where they go, what they see) and their embeddings."""
        B, T = input_ids.shape
        # Where the new tokens go: one start for the batch, or one per cache row when rows differ in length.
        start = cache.start_positions(T) if cache is not None else 0
        key_positions = cache.key_positions() if cache is not None else None  # None: key j is at position j
        if key_positions is not None:
            S = key_positions.shape[-1]
        else:
            S = (start if isinstance(start, int) else int(start.max())) + T
        if position_ids is None:
            if isinstance(start, int):
                position_ids = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
            else:
                position_ids = start[:, None]  # (B, 1)
        x = self.embed_tokens(input_ids, position_ids)  # (B, T, D)
        pattern = attention_pattern(attention_mask, start, T, S, self.config.sliding_window, x.device, key_positions)
        return Span(B, T, pattern, self.rotary(position_ids, x.dtype), cache, start), x

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | PagedKVCache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        span, x = self.span(input_ids, attention_mask, position_ids, cache)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            x = block(x, [span], i)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if cache is not None:
            cache.advance(span.tokens)
        if hidden is not None:
            hidden[-1] = x
        return x, tuple(hidden) if hidden is not None else None

    def forward_together(self, inputs: list[tuple[Tensor, KVCache | PagedKVCache]]) -> list[Tensor]:
        """Several batches of new tokens, each with its own cache, in one pass (each block's weights are read
        once for all of them): each batch's final hidden states, (B, T, D)."""
        spans, xs = zip(*(self.span(ids, cache=cache) for ids, cache in inputs), strict=True)
        x = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in xs], 1)  # (1, sum of B * T, D)
        for i, block in enumerate(self.layers):
            x = block(x, list(spans), i)
        x = self.norm(x)
        for span in spans:
            span.cache.advance(span.tokens)
        sizes = [span.rows * span.tokens for span in spans]
        return [part.view(span.rows, span.tokens, -1) for span, part in zip(spans, x.split(sizes, 1), strict=True)]


class CausalLM(nn.Module):
    """The language model: decoder + lm_head (tied to the token embeddings unless the config says otherwise)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and not self.lm_head.weight.is_mkldnn:  # a packed head is its own copy
            self.lm_head.weight = self.model.embed.weight

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  paged: bool = False) -> KVCache | PagedKVCache:
        weight = self.model.norm.weight  # the activations' dtype (the embedding's, unless the model is widened)
        kind = PagedKVCache if paged else KVCache
        return kind(self.config, batch_size, max_len, dtype or weight.dtype, weight.device)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        cache: KVCache | PagedKVCache | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """logits_to_keep > 0 computes logits for the last positions only (generation needs one)."""
        x, hidden = self.model(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)

    def forward_together(self, inputs: list[tuple[Tensor, KVCache | PagedKVCache, int]]) -> list[Tensor]:
        """Batches of new tokens with their own caches in one pass (see Decoder.forward_together), each with its
        logits_to_keep (0: all): each batch's logits, (B, kept, V), from one read of the head too."""
        hidden = self.model.forward_together([(ids, cache) for ids, cache, _ in inputs])
        kept = [x[:, -keep:] if keep else x for x, (_, _, keep) in zip(hidden, inputs, strict=True)]
        logits = self.lm_head(torch.cat([x.reshape(1, -1, x.shape[-1]) for x in kept], 1))
        parts = logits.split([x.shape[0] * x.shape[1] for x in kept], 1)
        return [part.view(*x.shape[:2], -1) for part, x in zip(parts, kept, strict=True)]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels of -100 are ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100)


class SequenceClassifier(nn.Module):
    """Decoder + a linear score read at each sequence's last non-pad token."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        x, hidden = self.model(input_ids, attention_mask, position_ids, None, output_hidden_states)
        scores = self.score(x)  # (B, T, num_labels)
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise StarCoderError("classifying a batch needs pad_token_id in the config to find each last token")
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            # The rightmost non-pad token, so left and right padding both work.
            positions = torch.arange(T, device=input_ids.device)
            last = (positions * (input_ids != pad)).argmax(-1)  # (B,)
        logits = scores[torch.arange(B, device=scores.device), last]  # (B, num_labels)
        loss = classification_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Regression for one label, cross-entropy for integer classes, BCE for multi-label targets."""
    num_labels = logits.shape[-1]
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def build_model(config: Config) -> nn.Module:
    """An uninitialised model of the config's head (create it under `torch.device("meta")` to skip allocation)."""
    if config.encoder:
        from .encoder import EncoderModel

        return EncoderModel(config)
    return SequenceClassifier(config) if config.head == "sequence_classification" else CausalLM(config)


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std), residual projections scaled by 1/sqrt(2 n_layer)."""
    n_layer = model.config.n_layer
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scaled = name.endswith(("attn.o", "mlp.proj"))
            module.weight.normal_(0.0, std / math.sqrt(2 * n_layer) if scaled else std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
