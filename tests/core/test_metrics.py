from __future__ import annotations

import math

import pytest

from dspark.metrics import SpecStats, merge_all, per_position_acceptance, per_position_counts, tau


def test_tau_and_acceptance():
    s = SpecStats()
    for n, a in [(3, 3), (3, 0), (3, 1), (0, 0)]:
        s.record(n, a)
    assert s.tau == pytest.approx((4 + 1 + 2 + 1) / 4)
    assert s.acceptance_rate == pytest.approx(4 / 9)
    assert math.isnan(tau([]))


def test_per_position_conditional_acceptance():
    # pos1: reached by all 3 rounds with n>=1, accepted in 2 -> 2/3
    # pos2: reached by rounds with a>=1 and n>=2: (3,3),(3,1) -> accepted in 1 -> 1/2
    # pos3: reached by (3,3) only -> 1/1 ; pos4 never reached
    assert per_position_acceptance([3, 3, 3], [3, 0, 1], max_k=4) == [2 / 3, 1 / 2, 1.0, None]
    assert per_position_counts([3, 3, 3, 1], [3, 0, 1, 1], max_k=4) == [[4, 3], [2, 1], [1, 1], [0, 0]]


def test_merge_and_validation():
    a, b = SpecStats(), SpecStats()
    a.record(2, 2)
    b.record(2, 0)
    a.new_tokens, a.seconds, b.new_tokens, b.seconds = 4, 1.0, 1, 1.0
    m = merge_all([a, b])
    assert m.rounds == 2 and m.tau == 2.0 and m.tokens_per_second == 2.5
    with pytest.raises(ValueError):
        a.record(1, 2)
