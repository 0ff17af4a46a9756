"""Stage 5: Sequential Temperature Scaling on held-out rounds of the real decoding loop,
with ECE / AUC before and after and a reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.heads.calibration import STSCalibrator
from dspark.metrics import merge_all
from dspark.sampling import SamplingParams


def collect_rounds(target: Any, drafter: Any, prompts: Sequence[Sequence[int]], gamma: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0):
    """Decode held-out prompts with the raw (uncalibrated) confidences and return STS input."""
    saved, drafter.calibrator = drafter.calibrator, STSCalibrator()
    try:
        engine = SpeculativeEngine(target, drafter, num_draft=gamma)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature), seed=seed)
        stats = merge_all(r.stats for r in engine.generate(list(prompts), cfg))
    finally:
        drafter.calibrator = saved
    return stats.calibration_data(gamma)


def calibrate(target: Any, drafter: Any, prompts: Sequence[Sequence[int]], gamma: int, max_new_tokens: int, **kw: Any) -> STSCalibrator:
    conf, survived, valid = collect_rounds(target, drafter, prompts, gamma, max_new_tokens, **kw)
    cal = STSCalibrator().fit(conf, survived, valid)
    drafter.calibrator = cal
    cal.report["rounds"] = [float(conf.shape[0])]
    cal._data = (conf, survived, valid)  # kept for the reliability diagram
    return cal


def reliability_diagram(cal: STSCalibrator, path: Path, bins: int = 10) -> Path:
    """Predicted prefix survival vs observed, before and after STS, all positions pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, survived, valid = cal._data
    before = torch.cumprod(conf, 1)[valid]
    after = torch.cumprod(cal.apply(conf).double(), 1)[valid]
    y = survived[valid].double()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for pred, label in ((before, "raw"), (after, "STS")):
        idx = (pred * bins).long().clamp(0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            m = idx == b
            if m.any():
                xs.append(float(pred[m].mean()))
                ys.append(float(y[m].mean()))
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("predicted prefix survival")
    ax.set_ylabel("observed prefix survival")
    ax.set_title("reliability (held-out rounds)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
