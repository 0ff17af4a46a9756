"""The slot KV cache (the engine's batched path) against one HF cache per request: same
logits and taps for ragged batches, past Gemma's sliding window, after rollbacks, after a
finished request's slot is refilled by the last one, and when the batch's slots are not
consecutive; the engine on it emits what the per-request reference emits."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams
from dspark.slot_cache import SlotKVCache
from tests.tiny import tiny_gemma3, tiny_qwen3


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_qwen3], ids=["gemma3", "qwen3"])
def test_slot_cache_matches_one_hf_cache_per_request(make):
    t = make(vocab=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (3, 7, 12, 30)]  # window 8: two are past it
    ref = {}
    kv = SlotKVCache(t, slots=1, capacity=8)  # small: storage must grow in slots and in length
    for rid, p in enumerate(prompts):
        ref[rid] = t.new_cache()
        want = t.forward(torch.tensor([p]), ref[rid], logits="last", taps=[0])
        t.rollback(ref[rid], 0)
        kv.add(rid)
        lg, taps = kv.forward([rid], [p], taps=[0], logits="last")
        _close(lg[0, 0], want.logits[0, 0])
        _close(taps[0][0], want.taps[0][0])

    def step(rids, fed, back=None):
        """Feed, compare, then drop ``back[i]`` rejected tokens of each (the reference
        cache must be rolled back right after its forward: Target.rollback)."""
        lg, taps = kv.forward(rids, fed, taps=[1])
        for i, (r, f) in enumerate(zip(rids, fed)):
            want = t.forward(torch.tensor([f]), ref[r], taps=[1])
            n = back[i] if back else 0
            t.rollback(ref[r], n)
            kv.rollback(r, n)
            _close(lg[i, : len(f)], want.logits[0])
            _close(taps[1][i, : len(f)], want.taps[1][0])
            assert kv.length[r] == t.cache_length(ref[r])

    step([0, 1, 2, 3], [[5], [6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16]], back=[0, 2, 5, 1])  # rejected drafts
    step([2, 0, 3, 1], [[20, 21], [22], [23, 24, 25], [26]], back=[1, 0, 2, 0])  # any row order
    kv.release(1)  # request 3 (last slot) moves into slot 1
    ref.pop(1)
    assert sorted(kv.slot_of.values()) == [0, 1, 2]
    step([3, 0, 2], [[30, 31, 32], [33], [34, 35]])
    step([0, 3], [[40], [41, 42]])  # slots 0 and 1: consecutive
    step([0, 2], [[43, 44], [45]])  # slots 0 and 2: gathered, not a view
    for _ in range(12):  # walk request 0 well past the window, one token at a time
        step([0], [[46]])
    assert kv.capacity >= max(kv.length.values())


def test_slot_cache_rejects_bad_use():
    t = tiny_gemma3(vocab=64)
    kv = SlotKVCache(t)
    kv.add(0)
    with pytest.raises(ValueError, match="already holds"):
        kv.add(0)
    with pytest.raises(ValueError, match="at least one token"):
        kv.forward([0], [[]])
    kv.forward([0], [[5, 6]])
    with pytest.raises(ValueError, match="holds 2 tokens"):
        kv.rollback(0, 3)
    with pytest.raises(RuntimeError, match="outside"):
        kv.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), 0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_on_slot_cache_emits_what_the_reference_emits(temperature):
    """fp32: greedy identical, and sampled identical too (same per-request generators,
    logits equal up to float summation order), with requests finishing at different
    times so slots are freed and refilled mid-run."""
    t = tiny_gemma3(vocab=64)
    g = torch.Generator().manual_seed(1)
    base = torch.randint(4, 64, (6,), generator=g).tolist()
    prompts = [(base * 6)[: 9 + 5 * i] for i in range(5)]
    outs = []
    for b in (None, False):
        eng = SpeculativeEngine(t, NgramDrafter(num_tokens=4), num_draft=4, batch_verify=b)
        rids = [eng.add_request(p, GenerationConfig(max_new_tokens=6 + 4 * i, sampling=SamplingParams(temperature=temperature),
                                                    stop_token_ids=[]), seed=10 + i) for i, p in enumerate(prompts)]
        while eng.has_unfinished():
            eng.step()
        outs.append([eng.pop_result(r).tokens for r in rids])
        if b is None:
            assert type(eng._run).__name__ == "_SlotRunner"
    assert outs[0] == outs[1]
    assert [len(o) for o in outs[0]] == [6 + 4 * i for i in range(5)]
