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

from dspark import kernels
from dspark.kernels import reference
from dspark.sampling import Generators, SamplingParams, exponential, inverse_cdf, probs_from_logits, uniform64, uniform_ragged


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
    if params.greedy:
        tokens, n_acc = kernels.rejection_greedy(target_logits.argmax(-1), draft_tokens, draft_lens)
    else:
        p = probs_from_logits(target_logits, params)  # [B, K+1, V] fp32
        u, noise = draws(draft_lens, K, p.shape[-1], generator, device)
        q = None if draft_probs is None else draft_probs.float().to(device)
        tokens, n_acc = kernels.rejection_sample(p, draft_tokens, draft_lens, q, u, noise)
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



def draws(draft_lens: torch.Tensor, K: int, vocab_size: int, generator: Generators, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers one sampled verification uses, drawn in :func:`verify`'s order:
    ([B, K] U[0, 1) acceptance draws, row b drawing draft_lens[b] of them; the correction /
    bonus noise: [B, V] Exp(1) on CUDA, else [B] fp64 U[0, 1))."""
    u = uniform_ragged(draft_lens, K, generator, device)
    if device.type == "cuda":  # Exp(1) noise for the Triton kernel's race: cheap on a GPU
        noise = exponential((len(draft_lens), vocab_size), generator, device)
    else:  # one fp64 uniform per row (inverse CDF): V exponentials per row cost ~8 ms on a CPU
        noise = uniform64(generator, len(draft_lens), device)
    return u, noise


def pick(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[A, V] non-negative weights and their rows of :func:`draws`' noise -> [A] ids."""
    return (weights / noise).argmax(-1) if noise.dim() == 2 else inverse_cdf(weights, noise)


def verify_slot(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    u: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft slot of :func:`verify`, for callers that compute the target's logits slot
    by slot and stop at a request's first rejection (most rounds end there).

    target_logits [A, V] at the slot; draft_tokens [A]; draft_probs [A, V] the exact draft
    distributions, or None (deterministic drafter: one-hot); u [A] the rows' acceptance
    draws for this slot and noise their correction noise, both from :func:`draws`. Accepts
    x when u p_d(x) < p_t(x); a rejected row gets its correction from normalize(max(p_t -
    p_d, 0)). Returns (accepted [A] bool, token [A]: the draft where accepted, else the
    correction). With the same draws, chaining slots this way (and :func:`pick` from p_t
    for the bonus once every draft is accepted) makes the same decisions as one
    :func:`verify` call over all slots, so a request's output does not depend on which of
    the two its batch took."""
    if params.greedy:
        raise ValueError("verify_slot is for sampled rounds; greedy rounds compare argmaxes (kernels.rejection_greedy)")
    A = draft_tokens.shape[0]
    if target_logits.dim() != 2 or target_logits.shape[0] != A:
        raise ValueError(f"target_logits must be [A={A}, V], got {tuple(target_logits.shape)}")
    if draft_probs is not None and draft_probs.shape != target_logits.shape:
        raise ValueError(f"draft_probs must be [A, V] = {tuple(target_logits.shape)}, got {tuple(draft_probs.shape)}")
    if u.shape != (A,) or noise.shape[0] != A:
        raise ValueError(f"u must be [A={A}] and noise [A] or [A, V], got {tuple(u.shape)} and {tuple(noise.shape)}")
    device = target_logits.device
    p = probs_from_logits(target_logits[:, None], params)[:, 0]  # [A, V] fp32
    tok = draft_tokens.to(device).long()
    p_x = p.gather(-1, tok[:, None])[:, 0]
    q = None if draft_probs is None else draft_probs.float().to(device)
    q_x = torch.ones_like(p_x) if q is None else q.gather(-1, tok[:, None])[:, 0]
    ok = u.to(device) * q_x < p_x
    out = tok.clone()
    bad = (~ok).nonzero().flatten()
    if len(bad):
        if q is None:
            q_bad = torch.zeros_like(p[bad])
            q_bad.scatter_(-1, tok[bad][:, None], 1.0)
        else:
            q_bad = q[bad]
        out[bad] = pick(reference.residual(p[bad], q_bad), noise.to(device)[bad])
    return ok, out
