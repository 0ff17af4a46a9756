"""Exact verification of draft tokens: the rejection sampler.

For each request b with draft x_1..x_{n_b} (ragged: n_b may differ per row, and be 0):
accept x_k with probability min(1, p_t,k(x_k) / p_d,k(x_k)) left to right; at the first
rejection sample the correction from normalize(max(p_t,k - p_d,k, 0)); if all n_b drafts
survive sample a bonus token from p_t,n_b+1. The output is distributed exactly as plain
sampling from the target. At temperature 0 this is "accept while draft == argmax".

Drafters without probabilities (n-gram, greedy drafters) are deterministic given the
context, so p_d,k is the one-hot of x_k: accept with probability p_t,k(x_k); the residual
is p_t,k with x_k removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.sampling import Generators, SamplingParams, probs_from_logits, sample, uniform

# Below this residual mass the rejection itself had probability <= the mass, so falling
# back to p_t (to avoid sampling from rounding noise) changes nothing measurable.
RESIDUAL_EPS = 1e-6


@dataclass
class VerifyOutput:
    """What one verification step commits, per request.

    tokens:       [B, K+1] accepted drafts, then the correction/bonus token; -1 after.
    num_accepted: [B] drafts accepted (0..n_b).
    num_emitted:  [B] tokens to commit: num_accepted + 1, or fewer if a stop token
                  ended the row (the stop token itself is included).
    stopped:      [B] bool, a stop token was emitted this step.
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    num_emitted: torch.Tensor
    stopped: torch.Tensor

    def emitted(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.num_emitted[row])].tolist()


def _first_false(ok: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] length of the all-true prefix."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def correction_slot(n_acc: torch.Tensor, draft_lens: torch.Tensor) -> torch.Tensor:
    """[B] slot whose target distribution the last emitted token comes from: the first
    rejected slot, or slot n_b (one past the last draft) for the bonus token."""
    return n_acc


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, V] target and draft probs at the rejected slot -> [B, V] correction weights.

    max(p - q, 0), or p itself where that mass is ~0 (rows where q is zero, i.e. the
    bonus slot, get p back exactly since p - 0 = p).
    """
    r = (p - q).clamp_min(0.0)
    tiny = r.sum(-1, keepdim=True) <= RESIDUAL_EPS
    return torch.where(tiny, p, r)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: Generators = None,
    stop_token_ids: Sequence[int] = (),
) -> VerifyOutput:
    """Verify a ragged batch of drafts against the target.

    target_logits: [B, K+1, V] target logits at [anchor, x_1..x_K] (row b uses 0..n_b).
    draft_tokens:  [B, K] long; entries at or after draft_lens[b] are ignored.
    draft_lens:    [B] long in 0..K.
    draft_probs:   [B, K, V] the exact (processed, fp32) draft distributions the tokens
                   were sampled from, or None for deterministic drafters.
    params:        the target's sampling parameters (define p_t).
    generator:     one torch.Generator for the batch or one per row.
    stop_token_ids: a stop token among the emitted tokens ends that row there.
    """
    B, K = draft_tokens.shape
    if target_logits.shape[:2] != (B, K + 1):
        raise ValueError(f"target_logits must be [B, K+1, V] = [{B}, {K + 1}, V], got {tuple(target_logits.shape)}")
    if draft_lens.shape != (B,) or bool((draft_lens < 0).any()) or bool((draft_lens > K).any()):
        raise ValueError(f"draft_lens must be [B] in 0..{K}, got {draft_lens.tolist()}")
    if draft_probs is not None and draft_probs.shape != (B, K, target_logits.shape[-1]):
        raise ValueError(f"draft_probs must be [B, K, V], got {tuple(draft_probs.shape)}")
    device = target_logits.device
    draft_tokens = draft_tokens.to(device)
    draft_lens = draft_lens.to(device)
    rows = torch.arange(B, device=device)
    valid = torch.arange(K, device=device)[None, :] < draft_lens[:, None]  # [B, K]

    if params.greedy:
        best = target_logits.argmax(-1)  # [B, K+1]
        n_acc = _first_false((draft_tokens == best[:, :K]) & valid)
        last = best[rows, n_acc]  # correction and bonus are both the argmax there
    else:
        p = probs_from_logits(target_logits, params)  # [B, K+1, V] fp32
        safe = draft_tokens.clamp_min(0)
        p_x = p[:, :K].gather(-1, safe[..., None]).squeeze(-1)  # [B, K]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
        else:
            q_x = draft_probs.float().to(device).gather(-1, safe[..., None]).squeeze(-1)
        u = uniform((B, K), generator, device)
        n_acc = _first_false((u * q_x < p_x) & valid)
        p_last = p[rows, correction_slot(n_acc, draft_lens)]  # [B, V]
        rejected = n_acc < draft_lens  # else: bonus slot, q = 0
        q_last = torch.zeros_like(p_last)
        if rejected.any():
            idx = n_acc.clamp_max(max(K - 1, 0))
            if draft_probs is None:
                q_last.scatter_(-1, safe[rows, idx][:, None], 1.0)
            else:
                q_last = draft_probs.float().to(device)[rows, idx]
            q_last = q_last * rejected[:, None]
        last = sample(residual(p_last, q_last), generator)

    tokens = torch.full((B, K + 1), -1, dtype=torch.long, device=device)
    tokens[:, :K] = torch.where(torch.arange(K, device=device)[None, :] < n_acc[:, None], draft_tokens, -1)
    tokens[rows, n_acc] = last
    n_emit = n_acc + 1
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    if stop_token_ids:
        stops = torch.tensor(list(stop_token_ids), device=device)
        is_stop = torch.isin(tokens, stops) & (torch.arange(K + 1, device=device)[None, :] < n_emit[:, None])
        stopped = is_stop.any(1)
        first = is_stop.long().argmax(1)
        n_emit = torch.where(stopped, first + 1, n_emit)
        tokens = torch.where(torch.arange(K + 1, device=device)[None, :] < n_emit[:, None], tokens, -1)
    return VerifyOutput(tokens=tokens, num_accepted=n_acc, num_emitted=n_emit, stopped=stopped)
