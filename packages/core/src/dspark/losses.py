"""The distillation objectives of the paper, on top of the fused per-token terms in
``dspark.kernels.distill_loss`` (Triton on GPU, torch elsewhere).

DSpark: L = 0.1 L_ce + 0.9 L_tv + 1.0 L_conf, each a position-weighted mean with
w_k = exp(-(k-1)/4); L_tv uses ||p_d - p_t||_1; L_conf is a soft BCE of the confidence
logits against the analytic acceptance 1 - 0.5 ||p_d - p_t||_1 (detached).
DFlash: CE only (same weights). Eagle3: step k of the unroll weighted 0.8^k (see train).

With a draft vocabulary the target's mass outside it still counts: :func:`with_outside_mass`
appends one column holding it (the draft gives it probability 0), so the L1 term is the
exact full-vocabulary distance.

Truncated targets (:func:`truncated_terms`): training can read the target's top-k
probabilities per token from the offline cache instead of running its LM head. The
distribution is then compared on a coarser partition: the k top tokens one by one and
everything else as one bucket. Merging outcomes never increases an L1 distance, so the
truncated ||p_d - p_t||_1 is a lower bound of the exact one (and the acceptance label an
upper bound); both are exact when the k tokens hold all of the target's mass.
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
    return draft_with_outside(draft_logits), target_with_outside(target_full_logits, vocab_ids)


def draft_with_outside(draft_logits: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., K+1]: the draft gives the outside-vocabulary column no mass."""
    return torch.cat([draft_logits, torch.full_like(draft_logits[..., :1], -math.inf)], -1)


def target_with_outside(target_full_logits: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., K+1]: the vocabulary's logits, then the log-mass outside it."""
    inside = target_full_logits.index_select(-1, vocab_ids)
    if vocab_ids.numel() < target_full_logits.shape[-1]:
        # log(Z_all - Z_inside) without copying the outside columns out of the row; the
        # absolute error in the outside probability is at fp32 rounding (~1e-7)
        lse_all = torch.logsumexp(target_full_logits.float(), dim=-1, keepdim=True)
        lse_in = torch.logsumexp(inside.float(), dim=-1, keepdim=True)
        rest = (lse_all + torch.log1p(-torch.exp(lse_in - lse_all).clamp_max(1.0))).to(inside.dtype)
    else:
        rest = torch.full_like(inside[..., :1], -math.inf)
    return torch.cat([inside, rest], -1)


class _PickLogProbs(torch.autograd.Function):
    """log_softmax(z)[n, idx[n, j]] for a few columns per row, without materialising the
    [N, K] log-softmax or the [N, K] zero-filled gradients of one gather per use: forward
    keeps the row log-normalisers, backward writes d/dz = scatter(g) - softmax(z) * sum(g)
    into one buffer. Same values as ``log_softmax(z).gather(1, idx)`` up to rounding."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        step = _chunk(z)
        for i in range(0, z.shape[0], step):  # on CPU, row chunks keep the exp temporaries in cache
            lse[i : i + step] = torch.logsumexp(z[i : i + step], -1)
        ctx.save_for_backward(z, idx, lse)
        return z.gather(1, idx) - lse[:, None]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, idx, lse = ctx.saved_tensors
        grad = torch.empty_like(z)
        s = g.sum(-1)
        step = _chunk(z)
        for i in range(0, z.shape[0], step):
            r = slice(i, i + step)
            torch.sub(z[r], lse[r, None], out=grad[r])
            grad[r].exp_().mul_(-s[r, None])
        grad.scatter_add_(1, idx, g.to(grad.dtype))
        return grad, None


def _chunk(z: torch.Tensor) -> int:
    """Rows per pass: a cache-sized block on CPU, every row at once on accelerators (one
    kernel launch instead of N / 32)."""
    return 32 if z.device.type == "cpu" else max(int(z.shape[0]), 1)


def _pick_log_probs(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[N, K] logits, [N, m] column ids in [0, K) -> [N, m] log-softmax values at them."""
    if z.requires_grad and torch.is_grad_enabled():
        return _PickLogProbs.apply(z, idx)
    return z.gather(1, idx) - torch.logsumexp(z, -1, keepdim=True)


def _truncated(draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, labels: torch.Tensor | None = None):
    N, K = draft_logits.shape
    if top_ids.shape != top_logp.shape or top_ids.shape[0] != N:
        raise ValueError(f"top_ids {tuple(top_ids.shape)} and top_logp {tuple(top_logp.shape)} must both be [N={N}, k]")
    k = top_ids.shape[1]
    idx = top_ids.clamp_min(0)
    if labels is not None:
        idx = torch.cat([idx, labels.clamp_min(0)[:, None]], 1)
    picked = _pick_log_probs(draft_logits.float(), idx)  # draft log-probs at the top tokens (and the label)
    inside = top_ids >= 0
    logq_top = picked[:, :k].masked_fill(~inside, -math.inf)  # the draft has no mass outside its vocabulary
    p_top = top_logp.float().detach().exp()
    q_top = logq_top.exp()
    q_rest = (1 - q_top.sum(-1)).clamp_min(0)
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)
    l1 = (q_top - p_top).abs().sum(-1) + (q_rest - p_rest).abs()  # on {each top token} + {the rest}
    logq_label = picked[:, k] if labels is not None else None
    return logq_label, logq_top, p_top, q_rest, p_rest, l1


def truncated_terms(
    draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CE, L1 and acceptance against a truncated target, differentiable in the draft.

    draft_logits [N, K] over the draft vocabulary; top_ids [N, k] the target's k most
    likely tokens as draft-vocabulary ids (-1: the token is outside the draft vocabulary,
    where the draft has no mass); top_logp [N, k] their target log-probabilities (over the
    full target vocabulary); labels [N] draft ids (-100 = no CE). CE is exact (it needs only
    the label); L1 is over {each top token} + {the rest}, a lower bound of the exact L1.
    Returns fp32 [N] each, like :func:`dspark.kernels.distill_loss`.
    """
    logq_label, _, _, _, _, l1 = _truncated(draft_logits, top_ids, top_logp, labels)
    ce = -logq_label * (labels >= 0)
    return ce, l1, (1 - 0.5 * l1).detach()


def truncated_soft_ce(draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eagle3's soft cross-entropy against a truncated target, on the same partition as
    :func:`truncated_terms`: -(sum_top p_t log q + p_t(rest) log q(rest)). Returns
    (soft CE [N], L1 [N]); a top token outside the draft vocabulary adds no CE term (the
    exact soft CE over the draft vocabulary ignores it too)."""
    _, logq_top, p_top, q_rest, p_rest, l1 = _truncated(draft_logits, top_ids, top_logp)
    ce = -(p_top * logq_top.clamp_min(-1e4)).sum(-1) - p_rest * torch.log(q_rest.clamp_min(1e-12))
    return ce, l1


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
    return combine_terms(ce.view(N, g), l1.view(N, g), acc.view(N, g), mask, conf_logits, w_ce, w_tv, w_conf, decay)


def combine_terms(
    ce: torch.Tensor,
    l1: torch.Tensor,
    acc: torch.Tensor,
    mask: torch.Tensor,
    conf_logits: torch.Tensor | None = None,
    w_ce: float = 0.1,
    w_tv: float = 0.9,
    w_conf: float = 1.0,
    decay: float = 4.0,
) -> LossTerms:
    """Per-token terms [N, g] (exact from :func:`dspark_loss` or truncated from
    :func:`truncated_terms`) -> the position-weighted DSpark objective."""
    g = ce.shape[1]
    w = position_weights(g, decay, ce.device)[None, :] * mask.float()
    denom = w.sum().clamp_min(1e-8)
    ce_m, tv_m = (ce * w).sum() / denom, (l1 * w).sum() / denom
    conf_m = torch.zeros((), device=ce.device)
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), acc, reduction="none")
        conf_m = (bce * w).sum() / denom
    loss = w_ce * ce_m + w_tv * tv_m + w_conf * conf_m
    acc_slot = (acc * mask).sum(0) / mask.float().sum(0).clamp_min(1)
    return LossTerms(loss, ce_m.detach(), tv_m.detach(), conf_m.detach(), acc_slot.detach())


def live_tau(accept_per_slot: torch.Tensor) -> float:
    """Expected accepted length from per-slot acceptance: 1 + sum_k prod_{i<=k} a_i."""
    return float(1 + torch.cumprod(accept_per_slot.float(), 0).sum())
