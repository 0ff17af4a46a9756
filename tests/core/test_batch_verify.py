"""One batched target forward over requests with different cache lengths equals
feeding each request alone: logits, tapped features and the caches left behind
(including Gemma's sliding layers past their window), on tiny Gemma 3 and Qwen3."""

from __future__ import annotations

import pytest
import torch

from dspark import batch_verify
from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams
from tests.tiny import tiny_gemma3, tiny_qwen3


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_qwen3], ids=["gemma3", "qwen3"])
def test_batched_forward_equals_one_forward_per_request(make):
    t = make(vocab=64)
    assert batch_verify.supports(t)
    g = torch.Generator().manual_seed(0)
    contexts = [3, 7, 12, 30]  # the sliding window is 8: some caches are past it
    fed = [[5], [6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16]]
    seqs = [torch.randint(4, 64, (n,), generator=g).tolist() for n in contexts]

    def prefilled():
        caches = []
        for s in seqs:
            c = t.new_cache()
            t.forward(torch.tensor([s]), c, logits="none")
            t.rollback(c, 0)
            caches.append(c)
        return caches

    alone = prefilled()
    want = [t.forward(torch.tensor([f]), c, taps=[0, 1]) for f, c in zip(fed, alone)]
    together = prefilled()
    lg, taps = batch_verify.batched_forward(t, together, fed, taps=[0, 1])
    for i, f in enumerate(fed):
        torch.testing.assert_close(lg[i, : len(f)], want[i].logits[0], rtol=1e-5, atol=1e-5)
        for layer in (0, 1):
            torch.testing.assert_close(taps[layer][i, : len(f)], want[i].taps[layer][0], rtol=1e-5, atol=1e-5)
    # roll back part of each and keep going: the caches behave like the solo ones
    for i, f in enumerate(fed):
        for cs in (alone, together):
            t.rollback(cs[i], len(f) // 2)
    nxt = [[20, 21], [22], [23, 24, 25], [26]]
    want2 = [t.forward(torch.tensor([f]), c).logits[0] for f, c in zip(nxt, alone)]
    lg2, _ = batch_verify.batched_forward(t, together, nxt)
    for i, f in enumerate(nxt):
        torch.testing.assert_close(lg2[i, : len(f)], want2[i], rtol=1e-5, atol=1e-5)
        assert t.cache_length(together[i]) == t.cache_length(alone[i])


def test_engine_batched_and_per_request_verification_agree():
    t = tiny_gemma3(vocab=64)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(4, 64, (6,), generator=g).tolist()
    prompts = [(base * 6)[: 9 + 5 * i] for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0), stop_token_ids=[], seed=3)
    outs = [
        [r.tokens for r in SpeculativeEngine(t, NgramDrafter(num_tokens=4), num_draft=4, batch_verify=b).generate(prompts, cfg)]
        for b in (True, False)
    ]
    assert outs[0] == outs[1]


def test_batched_forward_rejects_empty_rows():
    t = tiny_gemma3(vocab=64)
    c = t.new_cache()
    t.forward(torch.tensor([[5, 6]]), c, logits="none")
    t.rollback(c, 0)
    with pytest.raises(ValueError, match="at least one token"):
        batch_verify.batched_forward(t, [c], [[]])
