"""Draft vocabulary: the drafter's LM head, Markov head and sampling run over the K most
frequent target tokens instead of the full vocabulary (262,144 rows for Gemma 3).

Lossless by construction: tokens outside the draft vocabulary simply get draft
probability 0, and the verifier only needs p_d of the proposed tokens plus the residual.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def count_tokens(sequences: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """[V] occurrence counts of target ids over token sequences (the training data)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        if len(ids):
            counts += torch.bincount(ids, minlength=vocab_size)
    return counts


class DraftVocab(nn.Module):
    """Maps between target ids and draft ids.

    ids: [K] sorted-by-frequency target ids (draft id i <-> target id ids[i]).
    Target ids outside the vocabulary map to ``oov`` = K (an extra row for embeddings
    that take previous tokens, e.g. the Markov head's W1).
    """

    def __init__(self, ids: torch.Tensor, target_vocab_size: int) -> None:
        super().__init__()
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or len(ids) == 0:
            raise ValueError("draft vocabulary ids must be a non-empty 1-D tensor")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("draft vocabulary ids must be unique")
        if int(ids.min()) < 0 or int(ids.max()) >= target_vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {target_vocab_size})")
        self.target_vocab_size = int(target_vocab_size)
        self.register_buffer("ids", ids, persistent=True)
        to_draft = torch.full((target_vocab_size,), len(ids), dtype=torch.long)
        to_draft[ids] = torch.arange(len(ids))
        self.register_buffer("to_draft", to_draft, persistent=False)

    @classmethod
    def full(cls, vocab_size: int) -> DraftVocab:
        return cls(torch.arange(vocab_size), vocab_size)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> DraftVocab:
        """The ``size`` most frequent ids by ``counts`` [V], plus ``always`` (e.g. EOS)."""
        keep = list(dict.fromkeys(int(i) for i in always))
        order = torch.argsort(counts.float(), descending=True, stable=True).tolist()
        extra = [i for i in order if i not in set(keep)][: max(size - len(keep), 0)]
        return cls(torch.tensor(keep + extra), len(counts))

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @property
    def is_full(self) -> bool:
        return self.size == self.target_vocab_size

    def encode(self, target_ids: torch.Tensor) -> torch.Tensor:
        """target ids -> draft ids (``size`` for out-of-vocabulary)."""
        return self.to_draft[target_ids]

    def decode(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return self.ids[draft_ids]

    def scatter_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., K] draft-vocab probs -> [..., V] target-vocab probs (0 outside)."""
        if self.is_full:
            return probs
        out = probs.new_zeros((*probs.shape[:-1], self.target_vocab_size))
        return out.index_copy_(-1, self.ids, probs)
