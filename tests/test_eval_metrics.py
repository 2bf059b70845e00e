"""pass@k against hand-computed closed forms."""

from __future__ import annotations

from math import comb

import pytest

from starcoder import StarCoderError
from starcoder.eval.metrics import pass_at_k, pass_at_ks


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 20, 1), (50, 7, 10), (200, 13, 100)])
def test_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_hand_computed():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(5, 4, 2) == 1.0


def test_only_ks_every_problem_has():
    results = [(10, 5), (10, 0), (20, 20)]
    assert pass_at_ks(results) == {"pass@1": pytest.approx((0.5 + 0 + 1) / 3),
                                   "pass@10": pytest.approx((1 + 0 + 1) / 3)}
    with pytest.raises(StarCoderError, match="pass@5 needs at least 5 samples"):
        pass_at_k(3, 1, 5)
