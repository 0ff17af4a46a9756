"""The batched engine against the batch-1 references: identical greedy output, identical
seeded samples between cache modes, budgets, stop tokens, ragged batches, bad input."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.errors import InvalidRequestError
from dspark.generate import GenerationConfig, ar_generate, speculative_generate_reference
from dspark.sampling import SamplingParams
from tests.drafters_for_tests import DeterministicDrafter, RandomDrafter
from tests.tiny import tiny_gemma3, tiny_qwen3

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
TARGETS = {"gemma3": lambda: tiny_gemma3(vocab=64, sliding_window=8), "qwen3": lambda: tiny_qwen3(vocab=64)}
DRAFTERS = {
    "ngram": lambda: NgramDrafter(num_tokens=5),
    "deterministic": lambda: DeterministicDrafter(64, k=4, seed=0),
    "random": lambda: RandomDrafter(64, k=4, seed=0),
}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request):
    return TARGETS[request.param]()


@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_greedy_identity_with_ar(target, drafter):
    cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY, stop_token_ids=[])
    ar = [ar_generate(target, p, cfg).tokens for p in PROMPTS]  # 40 tokens > the 8-token window
    for mode in ("kv", "recompute"):
        got = SpeculativeEngine(target, DRAFTERS[drafter](), num_draft=4, cache_mode=mode).generate(PROMPTS, cfg)
        assert [r.tokens for r in got] == ar, mode
    for p, want in zip(PROMPTS, ar):
        assert speculative_generate_reference(target, DRAFTERS[drafter](), p, cfg, num_draft=4).tokens == want


def test_seeded_sampling_is_identical_across_cache_modes(target):
    cfg = GenerationConfig(max_new_tokens=30, sampling=SamplingParams(temperature=1.0), stop_token_ids=[], seed=7)
    kv = SpeculativeEngine(target, RandomDrafter(64, k=3, seed=5), 3, "kv").generate(PROMPTS, cfg)
    rc = SpeculativeEngine(target, RandomDrafter(64, k=3, seed=5), 3, "recompute").generate(PROMPTS, cfg)
    assert [r.tokens for r in kv] == [r.tokens for r in rc]
    assert sum(r.stats.rounds for r in kv) < 3 * 30  # drafts were actually accepted


def test_engine_without_drafter_is_ar_sampling(target):
    cfg = GenerationConfig(max_new_tokens=25, sampling=SamplingParams(temperature=0.9, top_k=20), stop_token_ids=[], seed=3)
    assert SpeculativeEngine(target, None).generate([PROMPTS[0]], cfg)[0].tokens == ar_generate(target, PROMPTS[0], cfg).tokens


def test_token_budget_and_stats(target):
    cfg = GenerationConfig(max_new_tokens=13, sampling=GREEDY, stop_token_ids=[])
    res = SpeculativeEngine(target, NgramDrafter(num_tokens=7), 7).generate(PROMPTS, cfg)
    for r in res:
        assert len(r.tokens) == 13 and r.finish_reason == "length"
        # first token comes from the prefill; every round emits accepted + 1
        assert sum(a + 1 for a in r.stats.accepted) == 12
        assert r.stats.new_tokens == 13 and r.stats.seconds > 0


def test_stop_token_ends_generation(target):
    cfg = GenerationConfig(max_new_tokens=40, sampling=GREEDY, stop_token_ids=[])
    full = ar_generate(target, PROMPTS[0], cfg).tokens
    stop = full[len(full) // 2]
    cut = full[: full.index(stop) + 1]
    cfg_stop = GenerationConfig(max_new_tokens=40, sampling=GREEDY, stop_token_ids=[stop])
    assert ar_generate(target, PROMPTS[0], cfg_stop).tokens == cut
    for drafter in (NgramDrafter(num_tokens=6), DeterministicDrafter(64, k=6)):
        res = SpeculativeEngine(target, drafter, 6).generate([PROMPTS[0]], cfg_stop)[0]
        assert res.tokens == cut and res.finish_reason == "stop"
    assert speculative_generate_reference(target, NgramDrafter(), PROMPTS[0], cfg_stop).tokens == cut


def test_bad_input_is_rejected(target):
    eng = SpeculativeEngine(target, NgramDrafter())
    cfg = GenerationConfig(max_new_tokens=5)
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        eng.generate([[]], cfg)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        eng.generate([[1, 99999]], cfg)
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=-3)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        ar_generate(target, [], cfg)
    with pytest.raises(ValueError, match="cache_mode"):
        SpeculativeEngine(target, None, cache_mode="paged")
