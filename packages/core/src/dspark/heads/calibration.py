"""Sequential Temperature Scaling (STS): post-hoc calibration of the confidence head.

Raw confidences are over-confident. On held-out verification rounds, for k = 1..g in
order, pick one temperature t_k (c_k <- sigmoid(logit(c_k) / t_k)) by grid search so that
the cumulative product a_k = prod_{i<=k} c_i matches the observed event "drafts 1..k all
survived" (lowest ECE), keeping t_1..t_{k-1} fixed. A positive temperature is monotone,
so the ranking of each position's confidences never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_GRID = torch.logspace(-1.0, 1.0, 161).tolist()  # 0.1 .. 10


def expected_calibration_error(prob: torch.Tensor, label: torch.Tensor, bins: int = 15) -> float:
    """Equal-width-bin ECE: sum_b |B_b|/N * |mean(prob in b) - mean(label in b)|."""
    prob, label = prob.flatten().double(), label.flatten().double()
    if prob.numel() == 0:
        return float("nan")
    idx = (prob * bins).long().clamp(0, bins - 1)
    sp = torch.bincount(idx, weights=prob, minlength=bins)
    sl = torch.bincount(idx, weights=label, minlength=bins)
    return float((sp - sl).abs().sum() / prob.numel())


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); nan if one class."""
    score, label = score.flatten().double(), label.flatten().bool()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score)
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(score, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    counts = torch.bincount(inv, minlength=len(uniq)).double()
    ranks = (sums / counts)[inv]
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _scale(conf: torch.Tensor, t: float) -> torch.Tensor:
    c = conf.double().clamp(1e-7, 1 - 1e-7)
    return torch.sigmoid(torch.logit(c) / t)


@dataclass
class STSCalibrator:
    """Per-position temperatures; identity (all 1.0) until fitted."""

    temperatures: list[float] = field(default_factory=list)
    report: dict[str, list[float]] = field(default_factory=dict)

    def apply(self, conf: torch.Tensor) -> torch.Tensor:
        """[..., g] raw per-step confidences -> calibrated, same shape and dtype."""
        if not self.temperatures:
            return conf
        g = conf.shape[-1]
        if g > len(self.temperatures):
            raise ValueError(f"calibrated for {len(self.temperatures)} positions, got {g}")
        cols = [_scale(conf[..., k], self.temperatures[k]) for k in range(g)]
        return torch.stack(cols, dim=-1).to(conf.dtype)

    def fit(
        self,
        conf: torch.Tensor,
        survived: torch.Tensor,
        valid: torch.Tensor | None = None,
        grid: list[float] | None = None,
        bins: int = 15,
    ) -> STSCalibrator:
        """conf: [N, g] raw per-step confidences of recorded rounds; survived: [N, g] bool,
        drafts 1..k all accepted; valid: [N, g] bool, a k-th draft was verified."""
        if conf.shape != survived.shape or conf.dim() != 2:
            raise ValueError(f"conf and survived must both be [N, g], got {tuple(conf.shape)} and {tuple(survived.shape)}")
        valid = torch.ones_like(survived, dtype=torch.bool) if valid is None else valid.bool()
        grid = grid or DEFAULT_GRID
        g = conf.shape[1]
        raw_prefix = torch.cumprod(conf.double(), dim=1)
        temps: list[float] = []
        prefix = torch.ones(conf.shape[0], dtype=torch.float64)
        ece_before, ece_after, auc_before, auc_after = [], [], [], []
        for k in range(g):
            m = valid[:, k]
            y = survived[m, k]
            best_t, best_e = 1.0, float("inf")
            for t in grid:
                e = expected_calibration_error(prefix[m] * _scale(conf[m, k], t), y, bins)
                if e < best_e - 1e-12:
                    best_t, best_e = t, e
            temps.append(best_t)
            prefix = prefix * _scale(conf[:, k], best_t)
            ece_before.append(expected_calibration_error(raw_prefix[m, k], y, bins))
            ece_after.append(best_e if m.any() else float("nan"))
            auc_before.append(auc(raw_prefix[m, k], y))
            auc_after.append(auc(prefix[m], y))
        self.temperatures = temps
        self.report = {"ece_before": ece_before, "ece_after": ece_after, "auc_before": auc_before, "auc_after": auc_after}
        return self

    def to_dict(self) -> dict:
        return {"temperatures": self.temperatures, "report": self.report}

    @classmethod
    def from_dict(cls, d: dict) -> STSCalibrator:
        return cls(list(d.get("temperatures", [])), dict(d.get("report", {})))
