"""llama.cpp's Q4_K and Q6_K blocks, written here because gguf-py only reads them; and which tensor gets which
in a Q4_K_M file. This is ggml's reference quantizer (quantize_row_q4_K_ref / quantize_row_q6_K_ref, which
llama-quantize runs without an importance matrix), its per-block searches done for all blocks at once: the same
candidates, comparisons and float32 rounding, the sums taken in ggml's order. On the embedded model the bytes
equal llama-quantize's but for 98 of 5.9 million (an intermediate rounding we do not reproduce exactly; the
tests hold rows that llama-quantize wrote). gguf-py's dequantize is the independent check of the layout.

    Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
          128 bytes of nibbles; w = d * scale_j * q - dmin * min_j, q in [0, 15].
    Q6_K, 256 weights in 210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales for
          sub-blocks of 16, fp16 d; w = d * scale_j * (q - 32), q in [0, 63].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUPER = 256  # weights per K-quant block
ROWS_AT_ONCE = 256  # rows quantized together: the searches hold ~21 candidates per weight


def _sum(t: Tensor) -> Tensor:
    """Sum over the last dimension one term after another, as ggml's loops add (float32)."""
    total = t[..., 0]
    for i in range(1, t.shape[-1]):
        total = total + t[..., i]
    return total


def _nearest(x: Tensor) -> Tensor:
    return torch.round(x)  # ggml's nearest_int: round half to even


def _f16(x: Tensor) -> Tensor:
    """The value an fp16 field will hold."""
    return x.to(torch.float16).float()


def _fp16_bytes(x: Tensor) -> Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _by_rows(quantize, w: Tensor, block_bytes: int) -> np.ndarray:
    R, K = w.shape
    if K % SUPER:
        raise ValueError(f"K-quant rows need a multiple of {SUPER} weights, not {K}")
    out = [quantize(w[r : r + ROWS_AT_ONCE].float().reshape(-1, SUPER)) for r in range(0, R, ROWS_AT_ONCE)]
    return torch.cat(out).reshape(R, K // SUPER * block_bytes).numpy()


def quantize_q4_k(w: Tensor) -> np.ndarray:
    """(R, K) floats, K a multiple of 256 -> (R, K / 256 * 144) bytes."""
    return _by_rows(_q4_k_blocks, w, 144)


def quantize_q6_k(w: Tensor) -> np.ndarray:
    """(R, K) floats, K a multiple of 256 -> (R, K / 256 * 210) bytes."""
    return _by_rows(_q6_k_blocks, w, 210)


def _scale_min_search(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ggml's make_qkx2_quants(32, 15, x, weights, rmin=-1, rdelta=0.1, nstep=20, use_mad=false) for every
    sub-block of 32 (x: (..., 32)): the scale, the (positive) min and the integers."""
    weights = torch.sqrt(_sum(x * x) / 32)[..., None] + x.abs()
    low, high = x.amin(-1).clamp(max=0), x.amax(-1)
    sum_w, sum_x = _sum(weights), _sum(weights * x)
    flat = high == low
    span = torch.where(flat, 1, high - low)
    iscale = 15 / span
    scale = 1 / iscale
    L = _nearest(iscale[..., None] * (x - low[..., None])).clamp(0, 15)
    diff = (scale[..., None] * L + low[..., None]) - x
    best = _sum(weights * diff * diff)
    for step in range(21):  # (ggml moves the min as it goes: later candidates start from the best one so far)
        iscale = (torch.tensor(-1.0) + torch.tensor(0.1) * step + 15) / torch.where(flat, 1, high - low)
        Laux = _nearest(iscale[..., None] * (x - low[..., None])).clamp(0, 15)
        sum_l, sum_l2, sum_xl = _sum(weights * Laux), _sum(weights * Laux * Laux), _sum(weights * Laux * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(D > 0, D, 1)
        this_scale, this_min = (sum_w * sum_xl - sum_x * sum_l) / safe, (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 == 0, 1, sum_l2), this_scale)
        this_min = torch.where(positive, 0, this_min)
        diff = (this_scale[..., None] * Laux + this_min[..., None]) - x
        error = _sum(weights * diff * diff)
        better = (D > 0) & (error < best)
        L, best = torch.where(better[..., None], Laux, L), torch.where(better, error, best)
        scale, low = torch.where(better, this_scale, scale), torch.where(better, this_min, low)
    return torch.where(flat, 0, scale), -low, torch.where(flat[..., None], 0, L)


def _q4_k_blocks(x: Tensor) -> Tensor:
    """(B, 256) -> (B, 144) bytes: quantize_row_q4_K_ref."""
    x = x.view(-1, 8, 32)
    scales, mins, L = _scale_min_search(x)  # (B, 8), (B, 8), (B, 8, 32)
    max_scale, max_min = scales.amax(-1, keepdim=True).clamp(min=0), mins.amax(-1, keepdim=True).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0)
    ls = _nearest(inv_scale * scales).clamp(max=63).to(torch.uint8)
    lm = _nearest(inv_min * mins).clamp(max=63).to(torch.uint8)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    step, offset = d * ls, dmin * lm
    requantized = _nearest((x + offset[..., None]) / torch.where(step == 0, 1, step)[..., None]).clamp(0, 15)
    q = torch.where(step[..., None] == 0, L, requantized).to(torch.uint8).view(-1, 4, 2, 32)
    packed_scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                               (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], dim=-1)  # (B, 12)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_fp16_bytes(d[:, 0]), _fp16_bytes(dmin[:, 0]), packed_scales, nibbles], dim=-1)


def _signed_scale_search(x: Tensor) -> tuple[Tensor, Tensor]:
    """ggml's make_qx_quants(16, 32, x, L, rmse_type=1) for every sub-block of 16 (x: (..., 16)): the scale and
    the integers (offset by 32)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]  # the first value of the largest magnitude
    zero = peak.abs() < 1e-15
    peak = torch.where(zero, 1, peak)
    weights = x * x

    def attempt(iscale):
        levels = _nearest(iscale[..., None] * x).clamp(-32, 31)
        return levels, _sum(weights * x * levels), _sum(weights * levels * levels)

    L, sumlx, suml2 = attempt(-32 / peak)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 == 0, 1, suml2), 0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        levels, sumlx, suml2 = attempt(-(32 + torch.tensor(0.1) * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[..., None], levels, L)
        scale = torch.where(better, sumlx / torch.where(suml2 == 0, 1, suml2), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0, scale), torch.where(zero[..., None], 0, L + 32)


def _q6_k_blocks(x: Tensor) -> Tensor:
    """(B, 256) -> (B, 210) bytes: quantize_row_q6_K_ref."""
    x = x.view(-1, 16, 16)
    scales, L = _signed_scale_search(x)  # (B, 16), (B, 16, 16)
    top = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))  # (B, 1), the first of the largest magnitude
    empty = top.abs() < 1e-15
    iscale = -128 / torch.where(empty, 1, top)
    d = torch.where(empty, 0, _f16(1 / iscale))
    sc = torch.where(empty, 0, _nearest(iscale * scales).clamp(max=127))
    step = d * sc
    requantized = _nearest(x / torch.where(step == 0, 1, step)[..., None]).clamp(-32, 31) + 32
    q = torch.where(step[..., None] == 0, L, requantized)
    q = torch.where(empty[..., None], 0, q).to(torch.uint8).view(-1, 2, 4, 32)  # (B, half of 128, quarter, 32)
    low, high = q & 15, q >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)  # (B, 2, 64)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (B, 2, 32)
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.to(torch.int8).view(torch.uint8),
                      _fp16_bytes(d[:, 0])], dim=-1)


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def q4_k_m_kind(name: str, n_layer: int) -> str:
    """Which K-quant a Q4_K_M file gives a block matrix, as llama-quantize does: Q6_K for attn_v / ffn_down in
    the layers that get more bits, Q4_K elsewhere. The fused attn_qkv of `starcoder` gets Q6_K where llama.cpp
    uses Q5_K (one more bit, as no Q5_K writer is here). (The output matrix gets Q6_K: gguf_weights.py.)"""
    if "attn_qkv" in name:
        return "Q6_K"
    if "attn_v." in name or "ffn_down." in name:
        return "Q6_K" if _more_bits(int(name.split(".")[1]), n_layer) else "Q4_K"
    return "Q4_K"
