"""Prompt lookup in front of a trained drafter.

A request whose context ends in an n-gram of at least ``min_match`` tokens that occurred
earlier (the output is repeating itself or quoting the prompt) gets the n-gram
continuation this round; every other request gets the trained drafter's block. Greedy
outputs of small base models fall into verbatim loops that prompt lookup predicts far
better than a drafter trained on sampled text (docs/results.md), while elsewhere the
trained drafter is the better proposer.

Lossless like any drafter: an n-gram draft is a point mass (the verifier accepts token x
with probability p(x)), a trained draft carries its own distribution, and the choice
between them is made from the committed context only, before either is drafted.

The trained drafter still sees every committed token's target features: rows served by
prompt lookup keep theirs pending here and hand them over the next time the trained
drafter runs for that request. Rows served by prompt lookup report, as confidences, the
empirical per-position conditional acceptance of past n-gram drafts (Laplace-smoothed),
so the prefix scheduler can weigh them against the trained drafter's calibrated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dspark.drafters.base import DraftState, Proposal
from dspark.drafters.ngram import NgramDrafter


class NgramFallbackDrafter:
    """``drafter`` (a trained drafter) with prompt lookup for rows whose context repeats.

    min_match: the shortest suffix n-gram that must have occurred before for a row to use
        prompt lookup (longer matches are tried first, up to ``max_ngram``).
    """

    def __init__(self, drafter: Any, min_match: int = 3, max_ngram: int = 4, num_tokens: int | None = None) -> None:
        if min_match < 1:
            raise ValueError(f"min_match must be >= 1, got {min_match}")
        self.drafter = drafter
        self.min_match = min_match
        gamma = num_tokens or getattr(getattr(drafter, "cfg", None), "gamma", 7)
        self.ngram = NgramDrafter(max_ngram=max(max_ngram, min_match), min_ngram=min_match, num_tokens=gamma)
        self.name = f"{drafter.name}+ngram"
        self.feature_layers = drafter.feature_layers
        self._pending: dict[int, torch.Tensor] = {}  # features of rows served by prompt lookup, not yet seen
        self._last: dict[int, tuple[int, list[int]]] = {}  # rid -> (len(seq) when drafted, n-gram drafts)
        self._trials = torch.zeros(gamma, dtype=torch.float64)  # n-gram drafts reaching position j
        self._hits = torch.zeros(gamma, dtype=torch.float64)  # ... and accepted there
        self.ngram_rows = 0  # rounds served by prompt lookup / by the trained drafter (for reports)
        self.model_rows = 0

    @property
    def conf(self) -> Any:
        """The trained drafter's confidence head (None for drafters without one)."""
        return getattr(self.drafter, "conf", None)

    def ngram_confidence(self, k: int) -> torch.Tensor:
        """[k] conditional acceptance of n-gram draft j given drafts < j were accepted."""
        return ((self._hits[:k] + 1) / (self._trials[:k] + 2)).float()

    def _learn(self, rid: int, seq: Sequence[int]) -> None:
        """How many of this request's last n-gram drafts the verifier accepted: the
        committed tokens that repeat them (a correction never equals the rejected draft,
        since the residual of a point mass is 0 at its token)."""
        last = self._last.pop(rid, None)
        if last is None:
            return
        start, drafts = last
        got = list(seq[start : start + len(drafts)])
        n_acc = next((j for j, (a, b) in enumerate(zip(drafts, got)) if a != b), min(len(drafts), len(got)))
        n_acc = min(n_acc, len(got))
        reached = min(n_acc + 1, len(drafts))
        self._trials[:reached] += 1
        self._hits[:n_acc] += 1

    def propose(self, state: DraftState) -> Proposal:
        for rid, seq in zip(state.request_ids, state.seqs):
            self._learn(rid, seq)
        ng = self.ngram.propose(state)
        use = (ng.lens > 0).tolist()
        feats = list(state.features) if state.features is not None else None
        model_idx = []
        for i, rid in enumerate(state.request_ids):
            if feats is not None:
                prev = self._pending.pop(rid, None)
                f = feats[i] if prev is None else torch.cat([prev, feats[i].to(prev.device)])
                if use[i]:
                    self._pending[rid] = f
                else:
                    feats[i] = f
            if use[i]:
                n = int(ng.lens[i])
                self._last[rid] = (len(state.seqs[i]), ng.tokens[i, :n].tolist())
            else:
                model_idx.append(i)
        self.ngram_rows += len(use) - len(model_idx)
        self.model_rows += len(model_idx)
        B = len(use)
        if not model_idx:
            k = ng.tokens.shape[1]
            conf = self.ngram_confidence(k)[None, :].expand(B, k).clone() if self.conf is not None else None
            return Proposal(ng.tokens, ng.lens, None, conf)
        sub = DraftState(
            [state.seqs[i] for i in model_idx], [state.request_ids[i] for i in model_idx], state.max_draft, state.params,
            None if state.generator is None else [state.generator[i] for i in model_idx],
            None if feats is None else [feats[i] for i in model_idx],
        )
        mp = self.drafter.propose(sub)
        if len(model_idx) == B:
            return mp
        K = max(mp.tokens.shape[1], ng.tokens.shape[1])
        tokens = torch.zeros((B, K), dtype=torch.long)
        lens = ng.lens.clone()
        conf = None
        if mp.confidence is not None:
            conf = self.ngram_confidence(K)[None, :].expand(B, K).clone().to(mp.confidence.device, mp.confidence.dtype)
        tokens[:, : ng.tokens.shape[1]] = ng.tokens
        probs = None
        if mp.probs is not None:
            V = mp.probs.shape[-1]
            probs = torch.zeros((B, K, V), dtype=mp.probs.dtype, device=mp.probs.device)
            ng_rows = [i for i in range(B) if use[i]]
            if ng_rows:  # a point mass on each n-gram draft (slots past its length are never read)
                r = torch.tensor(ng_rows, device=probs.device)
                t = ng.tokens[ng_rows].to(probs.device)
                probs[r[:, None], torch.arange(t.shape[1], device=probs.device)[None, :], t] = 1.0
        for j, i in enumerate(model_idx):
            n = int(mp.lens[j])
            tokens[i, :n] = mp.tokens[j, :n].cpu()
            lens[i] = n
            if probs is not None:
                probs[i, : mp.probs.shape[1]] = mp.probs[j]
            if conf is not None:
                conf[i, : mp.confidence.shape[1]] = mp.confidence[j]
        return Proposal(tokens, lens, probs, conf)

    def release(self, request_ids: Sequence[int]) -> None:
        for rid in request_ids:
            self._pending.pop(rid, None)
            self._last.pop(rid, None)
        self.ngram.release(request_ids)
        self.drafter.release(request_ids)

    def to(self, *args: Any, **kwargs: Any) -> NgramFallbackDrafter:
        self.drafter = self.drafter.to(*args, **kwargs)
        return self

    def parameters(self):
        return self.drafter.parameters()
