"""llama.cpp's Q4_K and Q6_K blocks, written here because gguf-py only reads them; and which tensor gets which
in a Q4_K_M file. Block layouts and packing follow ggml's quantize_row_q4_K_ref / quantize_row_q6_K_ref; the
scales are chosen by round-to-nearest from each sub-block's range (ggml searches a few candidate scales; ours are
a little coarser, never a different format). gguf-py's dequantize is the independent check (tests/test_gguf.py).

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


def _round(x: Tensor) -> Tensor:
    return torch.round(x)  # ties to even, as nearest_int's float trick does


def _fp16_bytes(x: Tensor) -> Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def quantize_q4_k(w: Tensor) -> np.ndarray:
    """(R, K) floats, K a multiple of 256 -> (R, K / 256 * 144) bytes."""
    R, K = w.shape
    x = w.float().reshape(-1, 8, 32)  # (B, sub-block, weight)
    low = x.amin(-1).clamp(max=0)
    scale, mins = (x.amax(-1) - low) / 15, -low  # (B, 8), both >= 0
    d = (scale.amax(-1, keepdim=True) / 63).half().float()
    dmin = (mins.amax(-1, keepdim=True) / 63).half().float()
    ls = torch.where(d > 0, _round(scale / d.clamp(min=1e-30)), 0).clamp(0, 63).to(torch.uint8)
    lm = torch.where(dmin > 0, _round(mins / dmin.clamp(min=1e-30)), 0).clamp(0, 63).to(torch.uint8)
    step, offset = d * ls, dmin * lm  # what the file will say
    q = torch.where(step[..., None] > 0, _round((x + offset[..., None]) / step[..., None].clamp(min=1e-30)), 0)
    q = q.clamp(0, 15).to(torch.uint8).view(-1, 4, 2, 32)  # (B, chunk of 64, half, 32)
    scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], dim=-1)  # (B, 12)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = torch.cat([_fp16_bytes(d[:, 0]), _fp16_bytes(dmin[:, 0]), scales, nibbles], dim=-1)
    return blocks.reshape(R, K // SUPER * 144).numpy()


def quantize_q6_k(w: Tensor) -> np.ndarray:
    """(R, K) floats, K a multiple of 256 -> (R, K / 256 * 210) bytes."""
    R, K = w.shape
    x = w.float().reshape(-1, 16, 16)  # (B, sub-block, weight)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]  # signed value of the largest magnitude
    sub = peak / -32  # maps the peak to -32, the end of [-32, 31] that fits it exactly
    top = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))  # (B, 1), the sub-scale of largest magnitude
    d_exact = top / -128  # so that `top` becomes scale -128
    sc = torch.where(d_exact != 0, _round(sub / torch.where(d_exact == 0, 1, d_exact)), 0).clamp(-128, 127)
    d = d_exact.half().float()
    step = d * sc  # (B, 16), what the file will say
    q = torch.where(step[..., None] != 0, _round(x / torch.where(step == 0, 1, step)[..., None]), 0)
    q = (q.clamp(-32, 31) + 32).to(torch.uint8).view(-1, 2, 4, 32)  # (B, half of 128, quarter, 32)
    low, high = q & 15, q >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1)  # (B, 2, 64)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (B, 2, 32)
    blocks = torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.to(torch.int8).view(torch.uint8),
                        _fp16_bytes(d[:, 0])], dim=-1)
    return blocks.reshape(R, K // SUPER * 210).numpy()


def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def q4_k_m_kind(name: str, n_layer: int, tied: bool) -> str:
    """Which K-quant a Q4_K_M file gives a matrix, as llama-quantize does: Q6_K for the output (the token
    embedding where it is the output too), and for attn_v / ffn_down in the layers that get more bits; Q4_K
    elsewhere. The fused attn_qkv of `starcoder` gets Q6_K where llama.cpp uses Q5_K (one more bit, as no Q5_K
    writer is here)."""
    if name == "output.weight" or (tied and name == "token_embd.weight") or "attn_qkv" in name:
        return "Q6_K"
    if "attn_v." in name or "ffn_down." in name:
        return "Q6_K" if _more_bits(int(name.split(".")[1]), n_layer) else "Q4_K"
    return "Q4_K"
