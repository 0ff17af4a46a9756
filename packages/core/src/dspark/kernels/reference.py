"""Pure-torch references of the hot-path kernels. They run everywhere (CPU included),
define the semantics, and are what the Triton kernels are tested against.

All randomness is passed in (uniforms, Exp(1) noise), so a kernel and its reference make
identical decisions from identical draws.
"""

from __future__ import annotations

import torch

from dspark.sampling import inverse_cdf, temperature_probs

# Below this residual mass the rejection itself had probability <= the mass, so falling
# back to p_t (to avoid sampling from rounding noise) changes nothing measurable.
RESIDUAL_EPS = 1e-6


def correction_slot(n_acc: torch.Tensor, draft_lens: torch.Tensor) -> torch.Tensor:
    """[B] slot whose target distribution the last emitted token comes from: the first
    rejected slot, or slot n_b (one past the last draft) for the bonus token."""
    return n_acc


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, V] target and draft probs at the rejected slot -> [B, V] correction weights:
    max(p - q, 0), or p itself where that mass is ~0 (the bonus slot has q = 0)."""
    r = (p - q).clamp_min(0.0)
    tiny = r.sum(-1, keepdim=True) <= RESIDUAL_EPS
    return torch.where(tiny, p, r)


def _first_false(ok: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] length of the all-true prefix."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def _emit(draft_tokens: torch.Tensor, n_acc: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    B, K = draft_tokens.shape
    ar = torch.arange(K, device=draft_tokens.device)[None, :]
    tokens = torch.full((B, K + 1), -1, dtype=torch.long, device=draft_tokens.device)
    tokens[:, :K] = torch.where(ar < n_acc[:, None], draft_tokens, -1)
    tokens[torch.arange(B, device=draft_tokens.device), n_acc] = last
    return tokens


def rejection_greedy(target_argmax: torch.Tensor, draft_tokens: torch.Tensor, draft_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_argmax [B, K+1], draft_tokens [B, K], draft_lens [B] ->
    (tokens [B, K+1] accepted drafts then the target's token, -1 after; n_acc [B])."""
    K = draft_tokens.shape[1]
    valid = torch.arange(K, device=draft_tokens.device)[None, :] < draft_lens[:, None]
    n_acc = _first_false((draft_tokens == target_argmax[:, :K]) & valid)
    last = target_argmax.gather(1, n_acc[:, None]).squeeze(1)
    return _emit(draft_tokens, n_acc, last), n_acc


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for a ragged batch.

    target_probs [B, K+1, V] fp32; draft_tokens [B, K]; draft_lens [B]; draft_probs
    [B, K, V] fp32 or None (deterministic drafter: one-hot); uniforms [B, K] U[0,1);
    noise: the draw for the correction / bonus sample, either [B, V] Exp(1) (exponential
    race, what the Triton kernel takes) or [B] fp64 U[0, 1) (inverse CDF: one draw per row,
    what CPUs use, where V exponentials per row cost more than the rest of the sampler).
    Returns (tokens [B, K+1], n_acc [B]) as :func:`rejection_greedy`.
    """
    B, K = draft_tokens.shape
    dev = target_probs.device
    rows = torch.arange(B, device=dev)
    valid = torch.arange(K, device=dev)[None, :] < draft_lens[:, None]
    safe = draft_tokens.clamp_min(0)
    p_x = target_probs[:, :K].gather(-1, safe[..., None]).squeeze(-1)
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(-1, safe[..., None]).squeeze(-1)
    n_acc = _first_false((uniforms * q_x < p_x) & valid)
    p_last = target_probs[rows, correction_slot(n_acc, draft_lens)]
    rejected = n_acc < draft_lens
    weights = p_last  # every row took the bonus slot: plain target sampling
    if K > 0 and bool(rejected.any()):
        idx = n_acc.clamp_max(K - 1)
        q_last = torch.zeros_like(p_last)
        if draft_probs is None:
            q_last.scatter_(-1, safe[rows, idx][:, None], 1.0)
        else:
            q_last = draft_probs[rows, idx].clone()
        weights = residual(p_last, q_last * rejected[:, None])
    last = (weights / noise).argmax(-1) if noise.dim() == 2 else inverse_cdf(weights, noise)
    return _emit(draft_tokens, n_acc, last), n_acc


def _race(probs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    return probs.argmax(-1) if noise is None else (probs / noise).argmax(-1)


def _sequential(base, prev0, temperature, noise, bias_step):
    """The shared left-to-right loop: slot k's logits are base[:, k] + bias, sampled at
    ``temperature``; ``bias_step(k, prev, state) -> (bias, state)`` is the head."""
    g = base.shape[1]
    prev, state, toks, probs = prev0, None, [], []
    for k in range(g):
        bias, state = bias_step(k, prev, state)
        p = temperature_probs(base[:, k] + bias.float(), temperature)
        x = _race(p, None if noise is None else noise[:, k])
        toks.append(x)
        probs.append(p)
        prev = x
    return torch.stack(toks, 1), torch.stack(probs, 1)


def markov_sample(
    base: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    prev0: torch.Tensor,
    temperature: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSpark Markov loop: x_k ~ softmax((U_k + W1[x_{k-1}] W2^T) / T), left to right.

    base [B, g, K] fp32 backbone logits; w1 [K+1, r] (row K = out-of-vocabulary);
    w2 [K, r] (the Linear weight of W2); prev0 [B] the anchor's draft id; temperature 0
    is greedy (noise None); noise [B, g, K] Exp(1). Returns (tokens [B, g] draft ids,
    probs [B, g, K] fp32: exactly the distributions the tokens were drawn from).
    """
    # matmul in the weights' dtype (no per-step fp32 copy of W2); the sum is fp32
    return _sequential(base, prev0, temperature, noise, lambda k, prev, state: (w1[prev] @ w2.T, None))


def rnn_sample(
    base: torch.Tensor,
    hidden: torch.Tensor,
    w1: torch.Tensor,
    cell_w: torch.Tensor,
    cell_b: torch.Tensor,
    w2: torch.Tensor,
    prev0: torch.Tensor,
    temperature: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSpark RNN loop (see heads/rnn.py): hidden [B, g, d]; cell_w [3r, 2r+d],
    cell_b [3r]; other arguments and outputs as :func:`markov_sample`."""
    dt = cell_w.dtype

    def step(k, prev, state):
        if state is None:
            state = torch.zeros(base.shape[0], w1.shape[1], dtype=torch.float32, device=base.device)
        z = torch.cat([state.to(dt), w1[prev].to(dt), hidden[:, k].to(dt)], -1)
        gg, c, o = (z @ cell_w.T + cell_b).float().chunk(3, -1)
        gate = torch.sigmoid(gg)
        state = gate * state + (1 - gate) * torch.tanh(c)
        return torch.tanh(o).to(w2.dtype) @ w2.T, state

    return _sequential(base, prev0, temperature, noise, step)


def distill_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token distillation terms, differentiable in ``draft_logits``.

    draft_logits, target_logits [N, V] (any float dtype; computed in fp32, row chunks of
    ``chunk_rows`` to bound memory); labels [N] next-token ids (-100 = ignore for CE).
    Returns fp32 [N] each: cross-entropy on the draft logits, the L1 distance
    ||p_d - p_t||_1 (= 2 TV), and the analytic acceptance rate 1 - 0.5 ||p_d - p_t||_1
    (detached: the confidence head's label).
    """
    ce, l1 = [], []
    for s in range(0, draft_logits.shape[0], chunk_rows):
        d = draft_logits[s : s + chunk_rows].float()
        t = target_logits[s : s + chunk_rows].float().detach()
        y = labels[s : s + chunk_rows]
        ce.append(torch.nn.functional.cross_entropy(d, y.clamp_min(0), reduction="none") * (y >= 0))
        l1.append((torch.softmax(d, -1) - torch.softmax(t, -1)).abs().sum(-1))
    ce_t, l1_t = torch.cat(ce), torch.cat(l1)
    return ce_t, l1_t, (1 - 0.5 * l1_t).detach()
