"""Confidence head: c_k = sigmoid(w . [h_k ; W1[x_{k-1}]]), the probability that draft k
survives verification given that drafts 1..k-1 did. Prefix survival a_k = prod c_i.
Trained against the analytic acceptance rate 1 - TV(p_d,k, p_t,k)."""

from __future__ import annotations

import torch
from torch import nn


class ConfidenceHead(nn.Module):
    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size + rank, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def logits(self, hidden: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        """hidden [..., d], prev_emb [..., r] -> [...] confidence logits."""
        return self.proj(torch.cat([hidden, prev_emb.to(hidden.dtype)], dim=-1)).squeeze(-1)

    def forward(self, hidden: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden, prev_emb).float())


def prefix_survival(conf: torch.Tensor) -> torch.Tensor:
    """[..., g] per-step confidences -> [..., g] cumulative products a_k."""
    return torch.cumprod(conf, dim=-1)
