from __future__ import annotations

import pytest

from dspark.drafters import NgramDrafter, build_drafter
from dspark.drafters.base import DraftState


def propose(d, seq, k=7, rid=0):
    p = d.propose(DraftState([seq], [rid], k))
    return p.tokens[0, : int(p.lens[0])].tolist()


def test_longest_ngram_latest_occurrence_wins():
    d = NgramDrafter(max_ngram=3, min_ngram=1, num_tokens=3)
    # "5 6" occurs twice; the trigram "4 5 6" only once (followed by 9 9 9)
    seq = [4, 5, 6, 9, 9, 9, 1, 5, 6, 7, 7, 7, 4, 5, 6]
    assert propose(d, seq) == [9, 9, 9]
    assert propose(NgramDrafter(max_ngram=2, min_ngram=1, num_tokens=3), seq) == [7, 7, 7]  # latest "5 6"


def test_a_loop_shorter_than_k_is_continued_periodically():
    """Greedy text of a base model loops; the copy after the latest occurrence runs into
    the end of the context and continues over its own proposal (period 3 here)."""
    d = NgramDrafter(max_ngram=3, min_ngram=1, num_tokens=7)
    assert propose(d, [9, 1, 2, 3, 1, 2, 3]) == [1, 2, 3, 1, 2, 3, 1]
    assert propose(NgramDrafter(num_tokens=5), [4, 4]) == [4, 4, 4, 4, 4]  # period 1
    # a continuation that fits is copied as is, no periodic extension
    assert propose(NgramDrafter(max_ngram=2, num_tokens=2), [5, 6, 7, 8, 0, 5, 6]) == [7, 8]


def test_no_match_gives_zero_length_draft_and_incremental_updates():
    d = NgramDrafter(max_ngram=2, min_ngram=2, num_tokens=4)
    assert propose(d, [1, 2, 3]) == []
    assert propose(d, [1, 2, 3, 1, 2]) == [3, 1, 2, 3]  # same request grew: index extended in place
    assert propose(d, [1, 2, 3, 1, 2], k=2) == [3, 1]  # the engine's budget caps the draft
    assert propose(d, [7, 8, 7], rid=0) == []  # a different sequence under the same id rebuilds
    d.release([0])
    assert d._index == {}


def test_registry_and_validation():
    assert isinstance(build_drafter("ngram", num_tokens=3), NgramDrafter)
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        build_drafter("nope")
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)
