"""Prompt lookup in front of a trained drafter (dspark.drafters.fallback): greedy identity
with AR through both cache modes, the trained drafter's context stays complete across
rounds served by prompt lookup, the acceptance estimate it reports, bad input."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import build_drafter
from dspark.drafters.base import DraftState
from dspark.drafters.fallback import NgramFallbackDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.scheduler import PrefixScheduler, SPSProfile
from tests.tiny import tiny_gemma3

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def target():
    return tiny_gemma3(vocab=64, sliding_window=8)


def _dspark(target, seed: int = 0):
    torch.manual_seed(seed)
    return build_drafter("dspark", target, gamma=4, feature_layers=[0, 1], num_layers=1, mask_token_id=3)


@pytest.mark.parametrize("mode", ["kv", "recompute"])
def test_greedy_identity_with_ar_and_both_kinds_of_rounds(target, mode):
    g = torch.Generator().manual_seed(3)
    loop = torch.randint(4, 64, (5,), generator=g).tolist()
    prompts = [loop * 4, torch.randint(4, 64, (11,), generator=g).tolist(), [1, *loop, 9, 9, *loop[:3]]]
    cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY, stop_token_ids=[])
    want = [ar_generate(target, p, cfg).tokens for p in prompts]  # 40 tokens: past the 8-token window
    fb = NgramFallbackDrafter(_dspark(target), min_match=2, num_tokens=4)
    sched = PrefixScheduler(policy="sync", sps=SPSProfile([1, 64], [10.0, 9.0]))
    got = SpeculativeEngine(target, fb, num_draft=4, cache_mode=mode, scheduler=sched).generate(prompts, cfg)
    assert [r.tokens for r in got] == want
    # both proposers served rounds; the trained drafter's context check (it raises when
    # features go missing) passed every time it ran after prompt-lookup rounds
    assert fb.ngram_rows > 0 and fb.model_rows > 0
    assert not fb._pending and not fb._last  # finished requests were released


def test_rows_are_routed_by_the_committed_context_only(target):
    fb = NgramFallbackDrafter(_dspark(target), min_match=2, num_tokens=4)
    d = target.hidden_size * 2
    seqs = [[5, 6, 7, 5, 6], [8, 9, 10, 11]]  # row 0 ends in "5 6", seen before; row 1 repeats nothing
    feats = [torch.randn(len(s) - 1, d) for s in seqs]
    prop = fb.propose(DraftState(seqs, [0, 1], 4, GREEDY, None, feats))
    assert prop.tokens[0, : int(prop.lens[0])].tolist() == [7, 5, 6, 7][: int(prop.lens[0])]  # the n-gram continuation (periodic)
    assert int(prop.lens[1]) == 4  # the trained drafter's block
    assert prop.probs is not None and float(prop.probs[0, 0, 7]) == 1.0  # a point mass on the n-gram draft
    assert 0 in fb._pending and fb._pending[0].shape[0] == len(seqs[0]) - 1  # held for the trained drafter
    assert prop.confidence is not None and prop.confidence.shape == (2, 4)


def test_acceptance_estimate_learns_from_committed_tokens(target):
    fb = NgramFallbackDrafter(_dspark(target), min_match=1, num_tokens=4)
    assert torch.allclose(fb.ngram_confidence(3), torch.full((3,), 0.5))  # Laplace prior
    fb._last[7] = (5, [1, 2, 3])
    fb._learn(7, [0, 0, 0, 0, 0, 1, 2, 9])  # drafts 1, 2 accepted, 3 rejected
    assert fb._trials[:3].tolist() == [1, 1, 1] and fb._hits[:3].tolist() == [1, 1, 0]
    fb._last[7] = (5, [4, 4])
    fb._learn(7, [0, 0, 0, 0, 0, 5])  # first draft rejected: position 2 never reached
    assert fb._trials[:3].tolist() == [2, 1, 1] and fb._hits[:3].tolist() == [1, 1, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_match"):
        NgramFallbackDrafter(object(), min_match=0)
