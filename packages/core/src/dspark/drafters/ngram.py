"""Prompt-lookup (n-gram) drafter: copies what followed the latest earlier occurrence of
the context's last n tokens (continuing the copy periodically when it reaches the end). Needs no training; strong on repetitive outputs (code,
quoting the question, a base model's loops)."""

from __future__ import annotations

from collections.abc import Sequence

from dspark.drafters.base import DraftState, Proposal


class _Index:
    """Incremental map n-gram -> end position of its latest occurrence that has a
    continuation, for every n in [min_n, max_n]. O(max_n) work per committed token."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.seq: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}

    def extend(self, seq: Sequence[int]) -> None:
        start = len(self.seq)
        self.seq.extend(seq[start:])
        # an n-gram ending at j gets indexed once token j+1 exists (so it has a continuation)
        for j in range(max(start - 1, 0), len(self.seq) - 1):
            for n in range(self.min_n, self.max_n + 1):
                if j - n + 1 < 0:
                    break
                self.last[tuple(self.seq[j - n + 1 : j + 1])] = j

    def lookup(self, k: int) -> list[int]:
        """Up to ``k`` tokens after the latest earlier occurrence of the longest matching
        suffix. When that continuation runs into the end of the context (the text repeats
        with period p = len - 1 - j), the copy goes on over the tokens it has just proposed,
        as an overlapping LZ77 copy does, so a loop shorter than k still gets k drafts."""
        s = self.seq
        L = len(s)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            j = self.last.get(tuple(s[L - n :]))
            if j is not None:
                out = s[j + 1 : j + 1 + k]
                while len(out) < k:  # position j + 1 + t lies past the context: it is out[t - p]
                    out.append(out[j + 1 + len(out) - L])
                return out
        return []


class NgramDrafter:
    """Propose up to ``num_tokens`` tokens by prompt lookup, longest n-gram first."""

    name = "ngram"
    feature_layers = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 7) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self._index: dict[int, _Index] = {}

    def propose(self, state: DraftState) -> Proposal:
        k = min(self.num_tokens, state.max_draft)
        drafts = []
        for rid, seq in zip(state.request_ids, state.seqs):
            idx = self._index.get(rid)
            if idx is None or len(idx.seq) > len(seq) or idx.seq != list(seq[: len(idx.seq)]):
                idx = self._index[rid] = _Index(self.min_ngram, self.max_ngram)
            idx.extend(seq)
            drafts.append(idx.lookup(k) if k > 0 else [])
        return Proposal.from_lists(drafts, k)

    def release(self, request_ids: Sequence[int]) -> None:
        for rid in request_ids:
            self._index.pop(rid, None)
