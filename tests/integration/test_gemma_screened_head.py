"""The LM head's fp16 screen on the real Gemma 3 270M: its bounds hold on real hidden
states (massive activations included), and greedy AR decoding through it returns the fp32
output token for token, also past the 512-token sliding window."""

from __future__ import annotations

import pytest
import torch

from dspark.benchmarks import load_first_turns
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from tests.integration.test_gemma_greedy_identity import NEW_TOKENS, prompts

pytestmark = pytest.mark.slow


def test_bounds_hold_on_real_hidden_states(gemma_fp32):
    t = gemma_fp32
    ids = t.encode_prompt(load_first_turns("mt-bench", 1)[0])[:160]
    h = t.forward(torch.tensor([ids]), None, logits="none", final_hidden=True).final_hidden[0]
    with t.screen_mode(True):
        head = t._screened_head()
        lo, hi = head.bounds(h)
    z = t.lm_head(h)
    assert bool((lo <= z).all() and (z <= hi).all())
    width = float((hi - lo).mean())
    assert width < 0.5, f"mean bound width {width:.3f} logits: the screen would reject too often"
    assert head.argmax(h).tolist() == z.argmax(-1).tolist()


def test_greedy_ar_through_the_screen_is_the_fp32_output(gemma_fp32, ar_greedy):
    t = gemma_fp32
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0))
    ids = [t.encode_prompt(p) for p in prompts()]
    pick = [0, 9, 11]  # 9 and 11 run past the sliding window
    assert sum(len(ids[i]) + NEW_TOKENS > 512 for i in pick) >= 2
    with t.screen_mode(True):
        got = {i: ar_generate(t, ids[i], cfg).tokens for i in pick}
    bad = [i for i in pick if got[i] != ar_greedy(ids[i], NEW_TOKENS)]
    assert not bad, f"prompts {bad}: greedy through the screen differs from the fp32 head"
