"""Sampling primitives shared by the AR baseline, the verifier and the drafters.

All sampling decisions are made on fp32 probabilities. The processed target distribution
(temperature, top-k, top-p) is the distribution speculative decoding reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dspark.errors import InvalidRequestError

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature / top-k / top-p.

    Greedy (T = 0) returns the one-hot distribution of the argmax, so the same
    rejection-sampling math covers both modes.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] -> fp32 softmax(logits / T); the one-hot argmax at T = 0. How drafters
    turn logits into the distributions they sample from (no top-k / top-p: those shape
    the target only, and any draft distribution is lossless)."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits / temperature, dim=-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, V] non-negative weights and [N] U[0, 1) draws -> [N] ids, id i with probability
    w_i / sum(w). One uniform per row (the exponential race needs V): the first id whose
    running sum exceeds u * total. ``right=True`` never returns a zero-weight id."""
    c = probs.float().cumsum(-1)
    v = (u.to(c.device).float() * c[:, -1])[:, None]
    return torch.searchsorted(c, v, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _rows(gens: Generators, batch: int) -> list[torch.Generator | None]:
    if gens is None or isinstance(gens, torch.Generator):
        return [gens] * batch  # type: ignore[list-item]
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}")
    return list(gens)


def uniform(shape: tuple[int, int], gens: Generators, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n] U[0, 1) draws; one generator for the batch, or one per row."""
    if gens is None or isinstance(gens, torch.Generator):
        return torch.rand(shape, generator=gens, device=device)
    return torch.stack([torch.rand(shape[1], generator=g, device=device) for g in _rows(gens, shape[0])])


def uniform_ragged(lens: torch.Tensor, width: int, gens: Generators, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, width] U[0,1) draws where row b needs only lens[b] of them. With one generator
    per row, row b consumes exactly lens[b] draws, so its randomness does not depend on
    the other rows of the batch; padding is 1.0 (never read)."""
    if gens is None or isinstance(gens, torch.Generator):
        return uniform((len(lens), width), gens, device)
    out = torch.ones((len(lens), width), device=device)
    for b, g in enumerate(_rows(gens, len(lens))):
        n = int(lens[b])
        if n:
            out[b, :n] = torch.rand(n, generator=g, device=device)
    return out


def exponential(shape: tuple[int, int], gens: Generators, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n] Exp(1) draws; one generator for the batch, or one per row."""
    if gens is None or isinstance(gens, torch.Generator):
        return torch.empty(shape, device=device).exponential_(generator=gens)
    return torch.stack([torch.empty(shape[1], device=device).exponential_(generator=g) for g in _rows(gens, shape[0])])


def sample(weights: torch.Tensor, gens: Generators = None) -> torch.Tensor:
    """[B, V] non-negative (not necessarily normalised) weights -> [B] sampled ids.

    Exponential race: argmax_i w_i / E_i with E_i ~ Exp(1) picks i with probability
    w_i / sum(w). Exact, needs no normalisation, and zero-weight ids never win.
    """
    if weights.dim() != 2:
        raise ValueError(f"sample expects [B, V] weights, got {tuple(weights.shape)}")
    return (weights.float() / exponential(tuple(weights.shape), gens, weights.device)).argmax(-1)


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, gens: Generators = None) -> torch.Tensor:
    """[B, V] logits -> [B] ids; argmax when greedy (no random draws consumed)."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(probs_from_logits(logits, params), gens)
