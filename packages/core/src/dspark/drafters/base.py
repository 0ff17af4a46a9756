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


class Proposal:
    """A ragged batch of drafts.

    tokens: [B, K] long, K <= max_draft; entries at or after lens[b] are ignored.
    lens:   [B] long, how many drafts row b proposes (0 is allowed).
    probs:  [B, K, V] fp32 draft distributions the tokens were drawn from, or None for a
            deterministic drafter (then p_d is the one-hot of each token).
    confidence: [B, K] calibrated per-step survival confidences c_k, if the drafter has
            a confidence head (the scheduler's input).

    A drafter over a draft vocabulary passes ``support`` ([Kd] target ids) and
    ``vocab_size`` (V) and gives ``probs`` over those ids only ([B, K, Kd]; every other
    target id has draft probability 0). ``probs`` then reads as the full [B, K, V] tensor,
    built on first access, while :meth:`rows_probs` builds only the rows a verifier reads:
    a round that ends at its first rejection never pays for the [B, K, V] tensor.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        lens: torch.Tensor,
        probs: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
        support: torch.Tensor | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.tokens, self.lens, self.confidence = tokens, lens, confidence
        if support is not None:
            if probs is None:
                raise ValueError("Proposal: support given without probs")
            if vocab_size is None:
                raise ValueError("Proposal: support needs vocab_size (the target's vocabulary)")
            if support.dim() != 1 or probs.shape[-1] != support.numel():
                raise ValueError(f"Proposal: probs' last dim ({probs.shape[-1]}) must match support [{support.numel()}]")
        self.support, self.vocab_size = support, vocab_size
        self._compact = probs if support is not None else None
        self._dense = None if support is not None else probs

    @property
    def probs(self) -> torch.Tensor | None:
        if self._dense is None and self._compact is not None:
            self._dense = self._scatter(self._compact)
        return self._dense

    def _scatter(self, compact: torch.Tensor) -> torch.Tensor:
        out = compact.new_zeros((*compact.shape[:-1], self.vocab_size))
        return out.index_copy_(-1, self.support.to(compact.device), compact)

    def rows_probs(self, rows: Sequence[int], pos: int, rest: bool = False) -> torch.Tensor | None:
        """The draft distributions of ``rows`` at slot ``pos`` ([A, V]), or at slots
        ``pos:`` with ``rest`` ([A, K - pos, V]), fp32, without building the others."""
        if self._dense is not None or self._compact is None:
            src = self._dense
            if src is None:
                return None
            return (src[rows, pos:] if rest else src[rows, pos]).float()
        c = self._compact[rows, pos:] if rest else self._compact[rows, pos]
        return self._scatter(c.float())

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
