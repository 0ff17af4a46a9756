"""Anchor sampling for block-parallel drafter training.

An anchor is a position p whose token and next token are both loss (assistant) tokens.
Its block of g slots predicts tokens p+1 .. p+g; slot j is supervised only while its
label is a loss token (a contiguous prefix: supervision stops at the first non-loss
label or at the end of the sequence).
"""

from __future__ import annotations

import torch


def sample_anchors(
    loss_mask: torch.Tensor, gamma: int, max_anchors: int, generator: torch.Generator | None = None,
    row_generators: list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss_mask [B, T] (0/1) -> anchors [B, n] long (padded with 0), anchor_valid [B, n]
    bool, slot_mask [B, n, g] bool (slot j supervised). n = max anchors found in a row,
    at most ``max_anchors``; anchors are drawn uniformly without replacement, from
    ``row_generators[b]`` for row b when given (randomness that belongs to the example, not
    to the batch it landed in), else from ``generator``."""
    B, T = loss_mask.shape
    m = loss_mask.bool()
    ok = torch.zeros_like(m)
    ok[:, :-1] = m[:, :-1] & m[:, 1:]
    picks = []
    for b in range(B):
        cand = ok[b].nonzero().flatten()
        if len(cand) > max_anchors:
            g = row_generators[b] if row_generators is not None else generator
            cand = cand[torch.randperm(len(cand), generator=g)[:max_anchors]].sort().values
        picks.append(cand)
    n = max(1, max(len(c) for c in picks))
    anchors = torch.zeros(B, n, dtype=torch.long)
    valid = torch.zeros(B, n, dtype=torch.bool)
    for b, c in enumerate(picks):
        anchors[b, : len(c)] = c
        valid[b, : len(c)] = True
    # slot j's label sits at anchor + j + 1: supervised while every label up to it is a loss token
    lab = anchors[..., None] + torch.arange(1, gamma + 1)  # [B, n, g]
    inside = lab < T
    lab_ok = torch.gather(m, 1, lab.clamp_max(T - 1).reshape(B, -1)).reshape(B, n, gamma) & inside
    slot_mask = torch.cumprod(lab_ok.long(), dim=-1).bool() & valid[..., None]
    return anchors, valid, slot_mask
