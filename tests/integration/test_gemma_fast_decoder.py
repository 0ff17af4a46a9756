"""The lean decoder step (dspark.fast_decoder) on the real Gemma 3 270M in fp32: hidden
states and taps as HF's forward computes them (prefill and verify rows past the 512-token
sliding window, single-token steps), and greedy AR decoding through HF's forward returns
what the default (fast) path returns."""

from __future__ import annotations

import pytest
import torch

from dspark.benchmarks import load_first_turns
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.slot_cache import SlotKVCache
from tests.integration.test_gemma_greedy_identity import NEW_TOKENS, prompts

pytestmark = pytest.mark.slow


def test_fast_step_matches_hf_forward_past_the_window(gemma_fp32):
    t = gemma_fp32
    ids = t.encode_prompt(load_first_turns("livecodebench", 1, start=2)[0])
    ids = (ids * 2)[:560]  # past the window
    out = {}
    for fast in (True, False):
        kv = SlotKVCache(t, slots=1, capacity=64, fast=fast)
        kv.add(0)
        h0, taps0 = kv.forward([0], [ids[:540]], taps=[6, 12], logits="hidden")
        h1, taps1 = kv.forward([0], [ids[540:548]], taps=[6, 12], logits="hidden")  # a verify row
        kv.rollback(0, 3)
        steps = [kv.forward([0], [[tok]], logits="last_hidden")[0][0, 0] for tok in ids[545:560]]
        out[fast] = (h0[0], h1[0], taps0[12][0], taps1[6][0], torch.stack(steps))
    for a, b in zip(out[True], out[False]):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-5, f"fast step off by {err:.2e} of the largest activation"


def test_greedy_ar_through_hf_forward_equals_the_fast_path(gemma_fp32, ar_greedy):
    t = gemma_fp32
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0))
    ids = [t.encode_prompt(p) for p in prompts()]
    pick = [1, 9]  # 9 runs past the sliding window
    assert len(ids[9]) + NEW_TOKENS > 512
    t.fast_decoder = False
    try:
        with t.screen_mode(False):
            got = {i: ar_generate(t, ids[i], cfg).tokens for i in pick}
    finally:
        t.fast_decoder = None
    bad = [i for i in pick if got[i] != ar_greedy(ids[i], NEW_TOKENS)]
    assert not bad, f"prompts {bad}: HF's forward and the fast step decode differently"
