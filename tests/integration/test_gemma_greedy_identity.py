"""fp32 greedy identity on the real Gemma 3 270M: speculative decoding with the n-gram
drafter returns exactly the autoregressive output on 12 real benchmark prompts (one per
benchmark file and four long enough that the context crosses the 512-token sliding
window); one request at a time and six together (one batched target forward per step)."""

from __future__ import annotations

import pytest

from dspark.benchmarks import BENCHMARKS, load_first_turns
from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, speculative_generate_reference
from dspark.sampling import SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 40


def prompts() -> list[str]:
    out = [load_first_turns(b, 1)[0] for b in BENCHMARKS]
    out += [load_first_turns("livecodebench", 1, start=s)[0] for s in (2, 7)]  # ~480-520 tokens
    out += [load_first_turns("arena-hard-v2", 1, start=s)[0] for s in (27, 35)]
    return out


def test_fp32_greedy_identity_on_real_prompts(gemma_fp32, ar_greedy):
    t = gemma_fp32
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0))
    ids = [t.encode_prompt(p) for p in prompts()]
    assert len(ids) >= 12
    assert sum(len(i) + NEW_TOKENS > 512 for i in ids) >= 4, "some contexts must pass the 512 window"
    engine = SpeculativeEngine(t, NgramDrafter(num_tokens=7), num_draft=7)
    mismatches, accepted, wants = [], 0, []
    for n, p in enumerate(ids):
        want = ar_greedy(p, NEW_TOKENS)
        wants.append(want)
        got = engine.generate([p], cfg)[0]
        accepted += sum(got.stats.accepted)
        if got.tokens != want:
            mismatches.append(n)
    assert not mismatches, f"prompts {mismatches} differ from AR greedy"
    assert accepted > 100  # the drafter really drafted: identity is not vacuous
    # six at once (three past the sliding window): every step verifies the ragged batch in
    # one target forward, over caches of different lengths
    pick = [0, 3, 6, 8, 9, 11]
    together = SpeculativeEngine(t, NgramDrafter(num_tokens=7), num_draft=7)
    assert together._runner().batched
    got = [r.tokens for r in together.generate([ids[i] for i in pick], cfg)]
    bad = [pick[n] for n, g in enumerate(got) if g != wants[pick[n]]]
    assert not bad, f"batched verification: prompts {bad} differ from AR greedy"


def test_reference_loop_identity_on_a_long_prompt(gemma_fp32, ar_greedy):
    t = gemma_fp32
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0))
    p = t.encode_prompt(load_first_turns("livecodebench", 1, start=2)[0])
    assert len(p) + NEW_TOKENS > 512
    assert speculative_generate_reference(t, NgramDrafter(), p, cfg).tokens == ar_greedy(p, NEW_TOKENS)
