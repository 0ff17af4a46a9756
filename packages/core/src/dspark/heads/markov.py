"""Low-rank Markov head: a bias on slot k's logits from the previous token,
B(x_{k-1}, .) = W1[x_{k-1}] W2, with W1 a [V+1, r] table and W2 an [r, V] map.

The extra row of W1 stands for previous tokens outside the draft vocabulary. W2 starts
at zero, so an untrained head leaves the backbone's distribution unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


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
