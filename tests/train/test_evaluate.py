"""Evaluation statistics: the standard error of a benchmark's pooled tau."""

from __future__ import annotations

import math

import pytest

from dspark.metrics import SpecStats
from train.evaluate import tau_markdown, tau_standard_error


def stats(accepted: list[int]) -> SpecStats:
    s = SpecStats()
    for a in accepted:
        s.record(7, a)
    return s


def test_tau_standard_error_is_the_ratio_estimators():
    per = [stats([0, 1, 2]), stats([3, 3]), stats([0, 0, 0, 1])]
    e = [sum(a + 1 for a in s.accepted) for s in per]  # 6, 8, 5 tokens
    r = [len(s.accepted) for s in per]  # 3, 2, 4 rounds
    tau, rbar = sum(e) / sum(r), sum(r) / 3
    want = math.sqrt(sum(((ei - tau * ri) / rbar) ** 2 for ei, ri in zip(e, r)) / (3 * 2))
    assert math.isclose(tau_standard_error(per), want)
    assert tau_standard_error([stats([1, 1]), stats([1, 1, 1])]) == 0.0  # every prompt at the same tau
    assert tau_standard_error(per[:1]) is None  # one prompt: no estimate


def test_markdown_shows_the_macro_standard_error():
    res = {"T=1": {"gsm8k": {"tau": 1.5}, "macro": {"tau": 1.5, "tau_se": 0.04}}}
    assert "| 1.50 ± 0.04 |" in tau_markdown(res, "dspark")


def test_batched_evaluation_gives_each_prompt_its_batch_1_result():
    """eval.batch_size decodes prompts together; prompt i of a benchmark keeps seed + i,
    so at T=0 (fp32) every benchmark's tau and per-position acceptance equal batch 1's."""
    import torch

    from dspark.drafters import build_drafter
    from tests.train.test_data import char_target
    from train.evaluate import evaluate

    t = char_target()
    torch.manual_seed(0)
    d = build_drafter("dspark", t, gamma=3, feature_layers=[0, 1], num_layers=1, mask_token_id=3, rank=8)
    runs = [evaluate(t, d, ["gsm8k", "mt-bench"], 3, 12, [0.0], 3, progress=False, batch_size=bs) for bs in (1, 4)]
    for bench in ("gsm8k", "mt-bench"):
        one, many = runs[0]["T=0"][bench], runs[1]["T=0"][bench]
        assert one["prompts"] == many["prompts"] == 3
        assert one["rounds"] == many["rounds"] and one["tau"] == many["tau"]
        assert one["per_position"] == many["per_position"]
        assert one["per_prompt"] == many["per_prompt"] and len(one["per_prompt"]) == 3
        assert sum(e for e, _ in one["per_prompt"]) / sum(r for _, r in one["per_prompt"]) == one["tau"]
        assert [a / n if n else None for n, a in one["per_position_counts"]] == one["per_position"]


def test_greedy_evaluation_can_take_fewer_prompts():
    """eval.greedy_prompts_per_benchmark: T = 0 decodes the first n prompts, the other
    temperatures all of them; the T = 0 prompts are the same as without the option."""
    import torch

    from dspark.drafters import build_drafter
    from tests.train.test_data import char_target
    from train.evaluate import evaluate

    t = char_target()
    torch.manual_seed(0)
    d = build_drafter("dspark", t, gamma=3, feature_layers=[0, 1], num_layers=1, mask_token_id=3, rank=8)
    res = evaluate(t, d, ["gsm8k"], 3, 8, [1.0, 0.0], 3, progress=False, batch_size=4, greedy_prompts_per_benchmark=2)
    assert res["T=1"]["gsm8k"]["prompts"] == 3 and res["T=0"]["gsm8k"]["prompts"] == 2
    alone = evaluate(t, d, ["gsm8k"], 2, 8, [0.0], 3, progress=False, batch_size=4)
    assert alone["T=0"]["gsm8k"]["per_prompt"] == res["T=0"]["gsm8k"]["per_prompt"]


def test_wilson_interval_brackets_the_rate_and_narrows_with_n():
    from train.pipeline import wilson_interval

    lo, hi = wilson_interval(3, 10)
    assert lo < 0.3 < hi and 0 <= lo and hi <= 1
    assert (lo, hi) == (pytest.approx(0.1078, abs=1e-3), pytest.approx(0.6032, abs=1e-3))  # the textbook value
    lo0, hi0 = wilson_interval(0, 5)
    assert lo0 == pytest.approx(0.0, abs=1e-12) and 0 < hi0 < 1  # not a zero-width interval at a zero rate
    lo2, hi2 = wilson_interval(300, 1000)
    assert hi2 - lo2 < (hi - lo) / 5
