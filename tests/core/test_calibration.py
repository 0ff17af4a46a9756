from __future__ import annotations

import math

import torch

from dspark.heads import STSCalibrator, auc, expected_calibration_error


def overconfident_rounds(n: int = 20_000, g: int = 5, seed: int = 0):
    """Synthetic rounds: true per-step survival s, reported confidence pushed toward 1."""
    gen = torch.Generator().manual_seed(seed)
    true = torch.rand(n, g, generator=gen) * 0.6 + 0.3  # real per-step survival 0.3..0.9
    reported = torch.sigmoid(torch.logit(true) * 2.5)  # over-confident (too sharp), same ranking
    step_ok = torch.rand(n, g, generator=gen) < true
    survived = torch.cumprod(step_ok.long(), 1).bool()
    return reported, survived


def test_sts_lowers_ece_and_keeps_ranking():
    conf, survived = overconfident_rounds()
    cal = STSCalibrator().fit(conf, survived)
    after = cal.apply(conf)
    for k in range(conf.shape[1]):
        # order-preserving per position: sorted by raw confidence, calibrated values never decrease
        order = torch.argsort(conf[:, k])
        assert bool((after[order, k].diff() >= 0).all())
        assert not torch.allclose(after[:, k], conf[:, k])
        assert cal.report["ece_after"][k] < cal.report["ece_before"][k]
    assert max(cal.report["ece_before"]) > 0.05 and max(cal.report["ece_after"]) < 0.02
    assert all(t > 1.0 for t in cal.temperatures)  # over-confidence is cooled down
    # the reported ECE is the ECE of the calibrated prefix product
    prefix = torch.cumprod(after.double(), 1)
    assert math.isclose(expected_calibration_error(prefix[:, 2], survived[:, 2]), cal.report["ece_after"][2], rel_tol=1e-6)
    assert STSCalibrator.from_dict(cal.to_dict()).temperatures == cal.temperatures


def test_sts_respects_valid_mask_and_identity_default():
    conf, survived = overconfident_rounds(5000, 3)
    valid = torch.ones_like(survived)
    valid[:2500, 2] = False
    cal = STSCalibrator().fit(conf, survived, valid)
    assert len(cal.temperatures) == 3
    assert torch.equal(STSCalibrator().apply(conf), conf)


def test_auc_and_ece_basics():
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    assert math.isnan(auc(torch.tensor([0.5]), torch.tensor([1])))
    assert expected_calibration_error(torch.full((100,), 0.7), torch.arange(100) < 70) < 1e-6
