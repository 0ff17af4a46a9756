"""Deliberately bad drafters: the verifier must stay lossless whatever they propose."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dspark.drafters.base import DraftState, Proposal


class _Base:
    name = "test"
    feature_layers = None

    def __init__(self, vocab: int, k: int = 2, seed: int = 0, ragged: bool = True) -> None:
        self.vocab, self.k, self.ragged = vocab, k, ragged
        self.gen = torch.Generator().manual_seed(seed)

    def _lens(self, b: int, k: int) -> torch.Tensor:
        if not self.ragged:
            return torch.full((b,), k, dtype=torch.long)
        return torch.randint(0, k + 1, (b,), generator=self.gen)  # 0..k: ragged, zero-length too

    def release(self, request_ids: Sequence[int]) -> None:
        pass


class RandomDrafter(_Base):
    """Random peaky distributions per row and slot; tokens sampled from them."""

    def propose(self, state: DraftState) -> Proposal:
        b, k = len(state.seqs), min(self.k, state.max_draft)
        q = torch.softmax(2.0 * torch.randn((b, k, self.vocab), generator=self.gen), dim=-1)
        tok = torch.multinomial(q.reshape(-1, self.vocab), 1, generator=self.gen).reshape(b, k)
        return Proposal(tok, self._lens(b, k), q.float())


class SupportDrafter(_Base):
    """Random peaky distributions over a fixed subset of the vocabulary (``support``),
    returned over that subset only, as drafters with a draft vocabulary do
    (Proposal(support=...)); the verifier reads them as 0 everywhere else."""

    def __init__(self, vocab: int, support: Sequence[int], **kw) -> None:
        super().__init__(vocab, **kw)
        self.support = torch.tensor(list(support), dtype=torch.long)

    def propose(self, state: DraftState) -> Proposal:
        b, k, n = len(state.seqs), min(self.k, state.max_draft), len(self.support)
        q = torch.softmax(2.0 * torch.randn((b, k, n), generator=self.gen), dim=-1)
        tok = self.support[torch.multinomial(q.reshape(-1, n), 1, generator=self.gen).reshape(b, k)]
        return Proposal(tok, self._lens(b, k), q, support=self.support, vocab_size=self.vocab)


class PeakedWrongDrafter(_Base):
    """90 % of the mass on one fixed token the target rarely wants."""

    def __init__(self, vocab: int, wrong: int, **kw) -> None:
        super().__init__(vocab, **kw)
        self.wrong = wrong

    def propose(self, state: DraftState) -> Proposal:
        b, k = len(state.seqs), min(self.k, state.max_draft)
        q = torch.full((b, k, self.vocab), 0.1 / (self.vocab - 1))
        q[..., self.wrong] = 0.9
        tok = torch.multinomial(q.reshape(-1, self.vocab), 1, generator=self.gen).reshape(b, k)
        return Proposal(tok, self._lens(b, k), q)


class OneHotDrafter(_Base):
    """Always the same token, announced with probability 1."""

    def __init__(self, vocab: int, token: int, **kw) -> None:
        super().__init__(vocab, **kw)
        self.token = token

    def propose(self, state: DraftState) -> Proposal:
        b, k = len(state.seqs), min(self.k, state.max_draft)
        q = torch.zeros((b, k, self.vocab))
        q[..., self.token] = 1.0
        return Proposal(torch.full((b, k), self.token), self._lens(b, k), q)


class DeterministicDrafter(_Base):
    """No probabilities (probs=None): proposes (last token + 1) mod V, repeated."""

    def propose(self, state: DraftState) -> Proposal:
        b, k = len(state.seqs), min(self.k, state.max_draft)
        last = torch.tensor([s[-1] for s in state.seqs])
        tok = (last[:, None] + 1 + torch.arange(k)[None, :]) % self.vocab
        return Proposal(tok, self._lens(b, k), None)
