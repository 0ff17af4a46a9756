"""Low-rank Markov head: a bias on slot k's logits from the previous token,
B(x_{k-1}, .) = W1[x_{k-1}] W2, with W1 a [V+1, r] table and W2 an [r, V] map.

The extra row of W1 stands for previous tokens outside the draft vocabulary. W2 starts
at zero, so an untrained head leaves the backbone's distribution unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class TransitionRows:
    """Inference cache of the Markov bias rows B(x, .) = W1[x] W2, keyed by previous token.

    The bias depends on the previous token only, so a row computed once serves every later
    draft step that follows the same token. A miss costs one [r] x [r, K] product (reading
    all of W2); a hit reads one K-vector. Rows are kept least-recently-used within a byte
    budget and dropped whenever the head's weights change (new tensor or in-place update).
    Results equal the uncached product up to the last bits of a batched vs single matmul;
    the draft probabilities the verifier receives are always the ones sampled from.
    """

    def __init__(self, budget_bytes: int = 256 << 20, half_min_weights: int | None = 1 << 20) -> None:
        """``half_min_weights``: an fp32 CPU ``W2`` of at least this many weights computes
        missed rows from an fp16 copy of itself (half the bytes of a memory-bound product;
        the rows then carry fp16 rounding, ~5e-4 relative, which changes the draft
        distribution, never what the verifier is told: the drafter samples from the
        probabilities it reports). None: never."""
        self.budget_bytes = budget_bytes
        self.half_min_weights = half_min_weights
        self._rows: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._key: tuple | None = None
        self._w2_half: torch.Tensor | None = None
        self.hits = self.misses = 0

    def _half(self, w2: torch.Tensor) -> torch.Tensor | None:
        lim = self.half_min_weights
        if lim is None or w2.dtype != torch.float32 or w2.device.type != "cpu" or w2.numel() < lim:
            return None
        if self._w2_half is None:  # dropped with the rows when the weights change
            half = w2.detach().half()
            self._w2_half = half if bool(torch.isfinite(half).all()) else w2  # past fp16's range: fp32
        return None if self._w2_half is w2 else self._w2_half

    def __call__(self, head: MarkovHead, prev: torch.Tensor) -> torch.Tensor:
        """prev [B] draft ids -> bias [B, K] in W2's dtype (fp32 also from the fp16 copy)."""
        w1, w2 = head.w1.weight, head.w2.weight
        key = (w1.data_ptr(), w1._version, w2.data_ptr(), w2._version, w2.dtype, w2.device)
        if key != self._key:
            self._rows.clear()
            self._w2_half = None
            self._key = key
        w2h = self._half(w2)
        ids = [int(i) for i in prev.tolist()]
        miss = sorted({i for i in ids if i not in self._rows})
        self.misses += len(miss)
        self.hits += len(ids) - len(miss)
        for i in miss:
            # one row at a time: a row's bits must not depend on which other tokens
            # missed in the same step (a seeded request's output must not depend on its batch)
            if w2h is None:
                self._rows[i] = (w1[i : i + 1] @ w2.T)[0]
            else:
                row = F.linear(w1[i : i + 1].half(), w2h)[0].float()
                self._rows[i] = row if bool(torch.isfinite(row).all()) else (w1[i : i + 1] @ w2.T)[0]
        for i in ids:  # this call's rows become the most recent, in call order
            self._rows.move_to_end(i)
        out = torch.stack([self._rows[i] for i in ids])
        # evict only now: the cap is at least this call's distinct rows, so none of them goes
        cap = max(len(set(ids)), self.budget_bytes // max(1, w2.shape[0] * w2.element_size()))
        while len(self._rows) > cap:
            self._rows.popitem(last=False)
        return out


class MarkovHead(nn.Module):
    def __init__(self, vocab_size: int, rank: int = 256, hidden_size: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.rank = vocab_size, rank
        self.w1 = nn.Embedding(vocab_size + 1, rank)
        self.w2 = nn.Linear(rank, vocab_size, bias=False)
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.zeros_(self.w2.weight)

    def prev_embedding(self, prev: torch.Tensor) -> torch.Tensor:
        """[...] draft ids of the previous tokens -> [..., r] (shared with the confidence head)."""
        return self.w1(prev)

    def init_state(self, batch: int, device: torch.device) -> None:
        return None

    def step(self, state: None, prev: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        """One sampling step. prev: [B] ids, hidden: [B, d] (unused) -> bias [B, V]."""
        return self.w2(self.w1(prev)), None

    def block_bias(self, prev: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: prev [..., g] ground-truth previous ids -> bias [..., g, V]."""
        return self.w2(self.w1(prev))
