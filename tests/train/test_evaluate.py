"""Evaluation statistics: the standard error of a benchmark's pooled tau."""

from __future__ import annotations

import math

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
