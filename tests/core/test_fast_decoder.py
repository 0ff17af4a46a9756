"""The lean Gemma 3 decoder step (dspark.fast_decoder) against HF's forward on the same slot
cache: same hidden states, taps and logits for prefill, ragged verify rows and single-token
steps, past the sliding window, after rollbacks and slot moves; fused weights follow in-place
changes; unsupported models are refused with the reason; the AR loop and the engine on it
decode what HF's forward decodes (fp32 greedy)."""

from __future__ import annotations

import pytest
import torch

from dspark import fast_decoder
from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.slot_cache import SlotKVCache
from tests.tiny import tiny_gemma3, tiny_qwen3


def _target(seed: int = 0):
    """A tiny Gemma 3 whose norms are not the identity (HF initialises them to zero, i.e.
    a factor 1, which would hide a wrong norm weight) and whose layers are not tiny."""
    t = tiny_gemma3(vocab=64, layers=4, seed=seed, init_std=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return t


def _pair(t):
    fast, hf = SlotKVCache(t, slots=1, capacity=8, fast=True), SlotKVCache(t, slots=1, capacity=8, fast=False)
    assert fast.fast is not None and hf.fast is None
    return fast, hf


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_matches_hf_forward_on_ragged_steps_past_the_window():
    t = _target()
    fast, hf = _pair(t)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (3, 9, 21)]  # window 8
    for kv in (fast, hf):
        for rid in range(3):
            kv.add(rid)

    def step(rids, fed, back=None, logits="all"):
        outs = [kv.forward(rids, fed, taps=[0, -1], logits=logits) for kv in (fast, hf)]
        (a, ta), (b, tb) = outs
        for i, f in enumerate(fed):
            _same(a[i, : len(f)], b[i, : len(f)])
        assert sorted(ta) == sorted(tb) == [0, 3]
        for k in ta:
            for i, f in enumerate(fed):
                _same(ta[k][i, : len(f)], tb[k][i, : len(f)])
        for i, r in enumerate(rids):
            for kv in (fast, hf):
                kv.rollback(r, back[i] if back else 0)

    step([0, 1, 2], prompts)  # prefill, ragged
    step([2, 0, 1], [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16]], back=[2, 0, 5])  # verify rows
    for n in range(14):  # single tokens: request 0 walks past the 8-token window
        step([0] if n % 3 else [0, 1], [[17 + n]] if n % 3 else [[17 + n], [40]], logits="hidden")
    for kv in (fast, hf):
        kv.release(0)  # request 2 moves into slot 0
    step([2, 1], [[41, 42], [43]], logits="last")
    step([1], [[44]], logits="last_hidden")
    assert fast.length == hf.length


def test_logits_match_full_vocab_and_the_plain_hf_forward():
    """Against HF's own forward with its own cache (not the slot cache's attention)."""
    t = _target(seed=3)
    ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(3))
    want = t.forward(ids, None, logits="all").logits
    kv = SlotKVCache(t, fast=True)
    kv.add(0)
    got, _ = kv.forward([0], [ids[0, :20].tolist()])
    _same(got[0], want[0, :20])
    for j in range(20, 30):  # the rest one token at a time
        got, _ = kv.forward([0], [[int(ids[0, j])]], logits="last")
        _same(got[0, 0], want[0, j])


def test_fused_weights_follow_in_place_changes():
    t = _target()
    fast, hf = _pair(t)
    for kv in (fast, hf):
        kv.add(0)
    p = [4, 5, 6, 7, 8]
    _same(fast.forward([0], [p])[0], hf.forward([0], [p])[0])
    with torch.no_grad():  # what loading new weights into the same module does
        for layer in t.layers:
            layer.self_attn.k_proj.weight.mul_(1.5)
            layer.mlp.up_proj.weight.add_(0.1)
            layer.post_feedforward_layernorm.weight.add_(0.3)
    for kv in (fast, hf):
        kv.rollback(0, 5)
    a, b = fast.forward([0], [p])[0], hf.forward([0], [p])[0]
    _same(a, b)


def test_refuses_unsupported_models_with_the_reason():
    q = tiny_qwen3(vocab=64)
    assert "not a Gemma 3" in fast_decoder.supports(q)
    with pytest.raises(ValueError, match="not a Gemma 3"):
        SlotKVCache(q, fast=True)
    assert SlotKVCache(q).fast is None  # auto: HF's forward
    t = tiny_gemma3(vocab=64)
    kv = SlotKVCache(t, fast=True)
    kv.add(0)
    with pytest.raises(ValueError, match="tap layer 7 out of range"):
        kv.forward([0], [[4, 5]], taps=[7])
    kv.forward([0], [[4, 5]], taps=[-3])  # negative indices count from the last layer, as in Target.forward
    t.config.attn_logit_softcapping = 50.0
    assert "soft-capping" in fast_decoder.supports(t)
    assert SlotKVCache(t).fast is None
    t.config.attn_logit_softcapping = None
    t.fast_decoder = False
    assert SlotKVCache(t).fast is None  # the target's switch
    q.fast_decoder = True
    with pytest.raises(ValueError, match="not a Gemma 3"):
        ar_generate(q, [4, 5, 6], GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_on_the_fast_step_matches_hf(temperature):
    """fp32: greedy output token for token; sampled with the same seed too (both paths
    give the same probabilities to ~1e-6, so a seeded draw agrees unless it lands within
    that of a CDF boundary)."""
    t = _target(seed=5)
    prompts = [[3, 9, 17, 4, 22], list(range(3, 15)), [7] * 6]
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=temperature), seed=1,
                           stop_token_ids=[])
    t.fast_decoder = False
    want = [ar_generate(t, p, cfg).tokens for p in prompts]
    t.fast_decoder = None
    assert [ar_generate(t, p, cfg).tokens for p in prompts] == want
    if temperature == 0:  # the engine (slot runner, verify rows on the fast step) as well
        eng = SpeculativeEngine(t, NgramDrafter(num_tokens=3), num_draft=3)
        assert [r.tokens for r in eng.generate(prompts, cfg)] == want
        assert type(eng._run).__name__ == "_SlotRunner" and eng._run.kv.fast is not None


def test_a_failing_compiled_part_falls_back_to_eager(caplog):
    """FastGemma3(compile=True) whose compiled parts cannot run (here: a stand-in that raises,
    as a missing C++ compiler would at first call) logs once, switches to eager and gives
    the eager step's values, to the bit."""
    t = _target(seed=3)
    eager = SlotKVCache(t, slots=1, capacity=8, fast=True)
    broken = SlotKVCache(t, slots=1, capacity=8, fast=True)
    broken.fast = fast_decoder.FastGemma3(t)
    calls = []

    def no_compiler(*args):
        calls.append(1)
        raise RuntimeError("InductorError: no working C++ compiler found")

    broken.fast.compiled = True
    broken.fast._kernels = {name: no_compiler for name in fast_decoder._KERNELS}
    for kv in (eager, broken):
        kv.add(0)
    prompt = [[5, 9, 14, 3, 22, 7]]
    with caplog.at_level("WARNING", logger="dspark.fast_decoder"):
        a, _ = eager.forward([0], prompt, logits="hidden")
        b, _ = broken.forward([0], prompt, logits="hidden")
        b2, _ = broken.forward([0], [[8]], logits="hidden")
    a2, _ = eager.forward([0], [[8]], logits="hidden")
    assert calls == [1] and broken.fast.compiled is False
    assert broken.fast._kernels == fast_decoder._KERNELS
    assert sum("running it eager" in r.message for r in caplog.records) == 1
    assert torch.equal(a, b) and torch.equal(a2, b2)
