"""The drafter protocol: drafters only propose; the verifier owns acceptance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from dspark.sampling import Generators, SamplingParams


@dataclass
class DraftState:
    """What a drafter sees each round, per active request.

    seqs:        committed token ids per request (prompt + generated); the last one is
                 the anchor, the token the target produced last round.
    request_ids: stable id per request, for drafters that keep per-request state.
    max_draft:   the most tokens the engine will verify for a request this round.
    params:      the target's sampling params (drafters sample at the same temperature).
    generator:   randomness for sampling drafters.
    features:    for drafters with ``feature_layers``: per request, the target features
                 [n_new, m*d] (the chosen layers' outputs, concatenated) of the tokens
                 committed since the last call, so seqs[i][:-1] is fully covered.
    """

    seqs: Sequence[Sequence[int]]
    request_ids: Sequence[int]
    max_draft: int
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: Generators = None
    features: Sequence[torch.Tensor] | None = None


@dataclass
class Proposal:
    """A ragged batch of drafts.

    tokens: [B, K] long, K <= max_draft; entries at or after lens[b] are ignored.
    lens:   [B] long, how many drafts row b proposes (0 is allowed).
    probs:  [B, K, V] fp32 draft distributions the tokens were drawn from, or None for a
            deterministic drafter (then p_d is the one-hot of each token).
    confidence: [B, K] calibrated per-step survival confidences c_k, if the drafter has
            a confidence head (the scheduler's input).
    """

    tokens: torch.Tensor
    lens: torch.Tensor
    probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @classmethod
    def from_lists(cls, drafts: Sequence[Sequence[int]], max_draft: int) -> Proposal:
        k = min(max_draft, max((len(d) for d in drafts), default=0))
        tokens = torch.zeros((len(drafts), k), dtype=torch.long)
        lens = torch.zeros(len(drafts), dtype=torch.long)
        for i, d in enumerate(drafts):
            d = list(d)[:k]
            tokens[i, : len(d)] = torch.tensor(d, dtype=torch.long)
            lens[i] = len(d)
        return cls(tokens=tokens, lens=lens, probs=None)


@runtime_checkable
class Drafter(Protocol):
    """Anything with ``propose``; ``release`` frees per-request state.

    ``feature_layers``: target decoder layers whose outputs the drafter reads (None for
    drafters that need no target features, like n-gram).
    """

    name: str
    feature_layers: list[int] | None

    def propose(self, state: DraftState) -> Proposal: ...

    def release(self, request_ids: Sequence[int]) -> None: ...
