"""RNN head: a gated recurrent state carries the whole sampled prefix, not only the last
token. z_k = [s_{k-1}; W1[x_{k-1}]; h_k] -> (g, c, o) by one linear map;
s_k = sigmoid(g) * s_{k-1} + (1 - sigmoid(g)) * tanh(c);  B_k = W2 tanh(o);  s_0 = 0."""

from __future__ import annotations

import torch
from torch import nn


class RNNHead(nn.Module):
    def __init__(self, vocab_size: int, rank: int = 256, hidden_size: int = 0) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError("RNNHead needs the backbone hidden_size")
        self.vocab_size, self.rank = vocab_size, rank
        self.w1 = nn.Embedding(vocab_size + 1, rank)
        self.cell = nn.Linear(2 * rank + hidden_size, 3 * rank)
        self.w2 = nn.Linear(rank, vocab_size, bias=False)
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.normal_(self.cell.weight, std=0.02)
        nn.init.zeros_(self.cell.bias)
        nn.init.zeros_(self.w2.weight)

    def prev_embedding(self, prev: torch.Tensor) -> torch.Tensor:
        return self.w1(prev)

    def init_state(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch, self.rank, device=device, dtype=self.w1.weight.dtype)

    def step(self, state: torch.Tensor, prev: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """state [B, r], prev [B] ids, hidden [B, d] -> (bias [B, V], new state [B, r])."""
        z = torch.cat([state, self.w1(prev), hidden.to(state.dtype)], dim=-1)
        g, c, o = self.cell(z).chunk(3, dim=-1)
        gate = torch.sigmoid(g)
        state = gate * state + (1 - gate) * torch.tanh(c)
        return self.w2(torch.tanh(o)), state

    def block_bias(self, prev: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over a block: prev [..., g], hidden [..., g, d] -> [..., g, V]."""
        lead = prev.shape[:-1]
        g = prev.shape[-1]
        prev2, hid2 = prev.reshape(-1, g), hidden.reshape(-1, g, hidden.shape[-1])
        state = self.init_state(prev2.shape[0], prev.device)
        out = []
        for k in range(g):
            b, state = self.step(state, prev2[:, k], hid2[:, k])
            out.append(b)
        return torch.stack(out, dim=1).reshape(*lead, g, -1)
