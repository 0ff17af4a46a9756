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


_CDF_BLOCK = 512  # inverse_cdf searches block sums first, then one block
_CDF_FLAT_MAX = 65536  # up to this many ids (a draft vocabulary), one fp64 running sum is cheaper


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[N, V] non-negative weights and [N] U[0, 1) draws -> [N] ids, id i with probability
    w_i / sum(w). One uniform per row (the exponential race needs V): the first id whose
    running sum exceeds u * total. Zero-weight ids are never returned.

    Rows of 513-65,536 ids (draft vocabularies) take one fp64 running sum. Longer rows
    (the target's vocabulary) take two levels: the running sum over the blocks of 512 ids
    picks the block, then the running sum inside that block picks the id. One pass over
    the weights and no [N, V] running sum. Block totals are fp32 sums of 512 numbers (relative error ~1e-7), every
    running sum is fp64, so nothing drifts over a 262k vocabulary as one fp32 running sum
    would. The draw ``u`` should be fp64 too: an fp32 U[0, 1) has only 2^24 values."""
    if probs.dim() != 2 or u.shape != probs.shape[:1]:
        raise ValueError(f"inverse_cdf expects [N, V] weights and [N] draws, got {tuple(probs.shape)} and {tuple(u.shape)}")
    N, V = probs.shape
    if _CDF_BLOCK < V <= _CDF_FLAT_MAX:
        # one fp64 running sum over the row (~3x cheaper than the two levels at 32k ids on
        # CPU); the same rule, and the goal kept strictly below the total as below
        run = probs.double().cumsum(-1)
        total = run[:, -1]
        goal = torch.minimum(u.to(run.device, torch.float64) * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(run, goal.clamp_min(0)[:, None], right=True).squeeze(-1)
    bs = min(_CDF_BLOCK, V)
    nb = -(-V // bs)
    w = probs.float()
    if nb * bs != V:
        w = torch.nn.functional.pad(w, (0, nb * bs - V))  # zero weights: never picked
    blocks = w.view(N, nb, bs)
    cb = blocks.sum(-1).double().cumsum(-1)  # [N, nb]
    goal = u.to(cb.device, torch.float64) * cb[:, -1]
    bi = torch.searchsorted(cb, goal[:, None], right=True).squeeze(-1).clamp_max(nb - 1)
    before = torch.where(bi > 0, cb.gather(1, (bi - 1).clamp_min(0)[:, None]).squeeze(-1), torch.zeros_like(goal))
    inner = blocks[torch.arange(N, device=w.device), bi].double().cumsum(-1)  # [N, bs]
    # the two summation orders can disagree in the last bit: stay strictly below the
    # block's own total, so the id found always has weight > 0
    rest = torch.minimum(goal - before, torch.nextafter(inner[:, -1], torch.zeros_like(goal)))
    j = torch.searchsorted(inner, rest.clamp_min(0)[:, None], right=True).squeeze(-1)
    return bi * bs + j


def _rows(gens: Generators, batch: int) -> list[torch.Generator | None]:
    if gens is None or isinstance(gens, torch.Generator):
        return [gens] * batch  # type: ignore[list-item]
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}")
    return list(gens)


def uniform(shape: tuple[int, int], gens: Generators, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, n] U[0, 1) draws; one generator for the batch, or one per row."""
    if gens is None or isinstance(gens, torch.Generator):
        return torch.rand(shape, generator=gens, device=device, dtype=dtype)
    return torch.stack([torch.rand(shape[1], generator=g, device=device, dtype=dtype) for g in _rows(gens, shape[0])])


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


def uniform64(gens: Generators, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch] fp64 U[0, 1) draws, one per row (from row b's generator when given a list)."""
    return uniform((batch, 1), gens, device, torch.float64)[:, 0]


def sample(weights: torch.Tensor, gens: Generators = None) -> torch.Tensor:
    """[B, V] non-negative (not necessarily normalised) weights -> [B] sampled ids.

    Inverse CDF with one fp64 uniform per row (:func:`inverse_cdf`): exact, needs no
    normalisation, zero-weight ids never win. One draw per row instead of V keeps the
    CPU cost at a pass over the weights (Exp(1) noise for a 262k vocabulary costs ~8 ms
    per row on a CPU generator)."""
    if weights.dim() != 2:
        raise ValueError(f"sample expects [B, V] weights, got {tuple(weights.shape)}")
    return inverse_cdf(weights, uniform64(gens, weights.shape[0], weights.device))


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, gens: Generators = None) -> torch.Tensor:
    """[B, V] logits -> [B] ids; argmax when greedy (no random draws consumed)."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(probs_from_logits(logits, params), gens)
