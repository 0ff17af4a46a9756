"""The distillation objectives of the paper, on top of the fused per-token terms in
``dspark.kernels.distill_loss`` (Triton on GPU, torch elsewhere).

DSpark: L = 0.1 L_ce + 0.9 L_tv + 1.0 L_conf, each a position-weighted mean with
w_k = exp(-(k-1)/4); L_tv uses ||p_d - p_t||_1; L_conf is a soft BCE of the confidence
logits against the analytic acceptance 1 - 0.5 ||p_d - p_t||_1 (detached).
DFlash: CE only (same weights). Eagle3: step k of the unroll weighted 0.8^k (see train).

With a draft vocabulary the target's mass outside it still counts: :func:`with_outside_mass`
appends one column holding it (the draft gives it probability 0), so the L1 term is the
exact full-vocabulary distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark import kernels


def position_weights(gamma: int, decay: float = 4.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """[gamma] w_k = exp(-(k-1)/decay), k = 1..gamma."""
    return torch.exp(-torch.arange(gamma, dtype=torch.float32, device=device) / decay)


def with_outside_mass(draft_logits: torch.Tensor, target_full_logits: torch.Tensor, vocab_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_logits [..., K] over the draft vocabulary, target_full_logits [..., V] ->
    ([..., K+1], [..., K+1]): column K is the target's log-mass outside the vocabulary
    and -inf for the draft."""
    inside = target_full_logits.index_select(-1, vocab_ids)
    outside_mask = torch.ones(target_full_logits.shape[-1], dtype=torch.bool, device=vocab_ids.device)
    outside_mask[vocab_ids] = False
    if outside_mask.any():
        rest = torch.logsumexp(target_full_logits[..., outside_mask].float(), dim=-1, keepdim=True).to(inside.dtype)
    else:
        rest = torch.full_like(inside[..., :1], -math.inf)
    neg = torch.full_like(draft_logits[..., :1], -math.inf)
    return torch.cat([draft_logits, neg], -1), torch.cat([inside, rest], -1)


@dataclass
class LossTerms:
    loss: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor
    conf: torch.Tensor
    accept: torch.Tensor  # mean analytic acceptance per slot [gamma] (for the live tau estimate)


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    conf_logits: torch.Tensor | None = None,
    w_ce: float = 0.1,
    w_tv: float = 0.9,
    w_conf: float = 1.0,
    decay: float = 4.0,
) -> LossTerms:
    """draft_logits, target_logits [N, g, C]; labels [N, g] (ids into C, -100 ignored);
    mask [N, g] bool (slot supervised); conf_logits [N, g] or None.
    w_tv = w_conf = 0 gives the DFlash objective (CE only)."""
    N, g, C = draft_logits.shape
    ce, l1, acc = kernels.distill_loss(draft_logits.reshape(-1, C), target_logits.reshape(-1, C), labels.reshape(-1))
    ce, l1, acc = ce.view(N, g), l1.view(N, g), acc.view(N, g)
    w = position_weights(g, decay, draft_logits.device)[None, :] * mask.float()
    denom = w.sum().clamp_min(1e-8)
    ce_m, tv_m = (ce * w).sum() / denom, (l1 * w).sum() / denom
    conf_m = torch.zeros((), device=draft_logits.device)
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), acc, reduction="none")
        conf_m = (bce * w).sum() / denom
    loss = w_ce * ce_m + w_tv * tv_m + w_conf * conf_m
    acc_slot = (acc * mask).sum(0) / mask.float().sum(0).clamp_min(1)
    return LossTerms(loss, ce_m.detach(), tv_m.detach(), conf_m.detach(), acc_slot.detach())


def live_tau(accept_per_slot: torch.Tensor) -> float:
    """Expected accepted length from per-slot acceptance: 1 + sum_k prod_{i<=k} a_i."""
    return float(1 + torch.cumprod(accept_per_slot.float(), 0).sum())
