"""GPTQ (Frantar et al. 2022) for one linear layer, and round-to-nearest as its baseline.

GPTQ quantizes W (N, K) one input column at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's loss ||WX - QX||^2, H = 2 X X^T:

    for each column i:   q_i = quant(w_i);   e = (w_i - q_i) / Hinv[i, i];   W[:, i:] -= e Hinv[i, i:]

with Hinv the upper Cholesky factor of H^-1 (numerically stable, computed once). Columns are processed in
blocks of 128 with lazy updates of the rest; act-order (desc_act) takes columns by descending diag(H), the
most sensitive first; groups give each run of group_size input columns its own scale and zero, found when
the run starts (or up front, from the unquantized weight, with static groups).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import StarCoderError
from ..linears.gptq_layout import QuantizedWeight, QuantSettings


def find_params(w: Tensor, settings: QuantSettings) -> tuple[Tensor, Tensor]:
    """Scale and zero (N,) for the columns w (N, C), as AutoGPTQ's Quantizer finds them: a range that includes
    0; symmetric: zero in the middle, scale = 2 max|w| / maxq."""
    maxq = settings.maxq
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if settings.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    if settings.sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
        if settings.checkpoint_format == "gptq":
            zero = zero.clamp(min=1)  # v1 cannot store a zero of 0
    return scale, zero


def quantize_levels(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """The integers of w under scale and zero (as floats), computed in place in one temporary."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """(integers, dequantized values) of w under scale and zero."""
    q = quantize_levels(w, scale, zero, maxq)
    return q, scale * (q - zero)


def _pack_result(Q: Tensor, scales: list[Tensor], zeros: list[Tensor], g_idx: Tensor,
                 settings: QuantSettings) -> QuantizedWeight:
    return QuantizedWeight(Q.to(torch.uint8), torch.stack(scales), torch.stack(zeros).to(torch.int32),
                           g_idx.to(torch.int32), settings.bits, settings.group_size)


def rtn(weight: Tensor, settings: QuantSettings) -> QuantizedWeight:
    """Round-to-nearest: each group's scale and zero from its own columns, no error correction."""
    W = weight.float()
    N, K = W.shape
    g = K if settings.group_size == -1 else settings.group_size
    Q = torch.empty_like(W)
    scales, zeros = [], []
    for start in range(0, K, g):
        scale, zero = find_params(W[:, start : start + g], settings)
        Q[:, start : start + g] = quantize_levels(W[:, start : start + g], scale[:, None], zero[:, None],
                                                  settings.maxq)
        scales.append(scale)
        zeros.append(zero)
    return _pack_result(Q, scales, zeros, torch.arange(K) // g, settings)


class Hessian:
    """H = 2 X X^T averaged over every calibration row the layer saw (float32)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (rows, K)
        n = x.shape[0]
        self.H *= self.rows / (self.rows + n)
        self.rows += n
        x = x * (2 / self.rows) ** 0.5
        self.H += x.T @ x


def gptq(weight: Tensor, H: Tensor, settings: QuantSettings, overwrite: bool = False) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize weight (N, K) given its layer's Hessian (K, K); returns the result and the summed
    squared error the algorithm saw ((w - q)^2 / Hinv_ii^2 / 2), for progress reports. overwrite=True lets it
    use H as its working copy (saving a K x K matrix)."""
    W = weight.float().clone()
    N, K = W.shape
    if not overwrite:
        H = H.clone()
    maxq, g = settings.maxq, (K if settings.group_size == -1 else settings.group_size)

    dead = torch.diag(H) == 0  # inputs that were always zero: nothing to preserve there
    H[dead, dead] = 1
    W[:, dead] = 0

    static: list[tuple[Tensor, Tensor]] = []
    if settings.static_groups and settings.group_size != -1:
        static = [find_params(W[:, s : s + g], settings) for s in range(0, K, g)]
    perm = torch.argsort(torch.diag(H), descending=True) if settings.act_order else torch.arange(K)
    if settings.act_order:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, settings.damp)
    del H

    Q = torch.zeros_like(W)
    scales, zeros = [], []
    scale = zero = None
    if settings.group_size == -1:
        scale, zero = find_params(W, settings)
        scales, zeros = [scale], [zero]
    loss = 0.0
    for i1 in range(0, K, settings.block_size):
        i2 = min(i1 + settings.block_size, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = i1 + i
            if settings.group_size != -1:
                if static:
                    scale, zero = static[int(perm[column]) // g]
                elif column % g == 0:
                    # From W as the block started, as AutoGPTQ does (the in-block updates live in W1).
                    scale, zero = find_params(W[:, column : column + g], settings)
                    scales.append(scale)
                    zeros.append(zero)
            w, d = W1[:, i], Hinv1[i, i]
            q, dq = quantize_column(w, scale, zero, maxq)
            Q[:, column] = q
            loss += float(((w - dq) ** 2 / d**2).sum()) / 2
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    if static:
        scales, zeros = [s for s, _ in static], [z for _, z in static]
        g_idx = torch.arange(K) // g
    else:
        g_idx = (torch.arange(K) // g)[invperm]  # column j was quantized at position invperm[j]
    return _pack_result(Q, scales, zeros, g_idx, settings), loss


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damping)^-1; more damping when H is too ill-conditioned to factor.

    At most three K x K matrices are alive at once (H, and two of damped / L / inverse / U): for StarCoder-15B's
    MLP projection (K = 24,576) each is 2.4 GB, so copies are freed as soon as they are used."""
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(6):
        damped = H.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return U
    raise StarCoderError("the layer's Hessian is not positive definite even with 10^5 times the damping: the "
                         "calibration data does not exercise this layer (too few or degenerate samples)")
