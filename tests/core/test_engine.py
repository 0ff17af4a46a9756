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


# ---- continuous batching ------------------------------------------------------------


def run_until_done(engine, rids):
    while any(engine._requests[r].finish_reason is None for r in rids) or engine._new:
        engine.step()
    return [engine.pop_result(r).tokens for r in rids]


def test_requests_join_and_leave_between_steps(target):
    cfg = GenerationConfig(max_new_tokens=20, sampling=GREEDY, stop_token_ids=[])
    short = GenerationConfig(max_new_tokens=6, sampling=GREEDY, stop_token_ids=[])
    want = [ar_generate(target, p, c).tokens for p, c in zip(PROMPTS, (cfg, short, cfg))]
    eng = SpeculativeEngine(target, NgramDrafter(num_tokens=4), num_draft=4)
    a = eng.add_request(PROMPTS[0], cfg)
    eng.step()
    eng.step()
    b = eng.add_request(PROMPTS[1], short)  # joins mid-flight, leaves early
    eng.step()
    c = eng.add_request(PROMPTS[2], cfg)
    assert run_until_done(eng, [a, b, c]) == want
    assert not eng.has_unfinished()
    with pytest.raises(KeyError):
        eng.pop_result(a)


@pytest.mark.parametrize("kind", ["ngram", "dspark"])
def test_seeded_request_does_not_depend_on_its_batch(target, kind):
    """Every request draws from its own generator: the same seed gives the same sampled
    output alone or in a batch whose members come and go."""
    from dspark.drafters import build_drafter

    def drafter():
        if kind == "ngram":
            return NgramDrafter(num_tokens=4)
        torch.manual_seed(0)
        d = build_drafter("dspark", target, gamma=4, rank=8, num_layers=1, mask_token_id=3, feature_layers=[0, 1])
        with torch.no_grad():
            for p in d.parameters():
                p.normal_(0, 0.3)
        return d

    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=1.0), stop_token_ids=[])
    alone = SpeculativeEngine(target, drafter(), 4)
    want = run_until_done(alone, [alone.add_request(PROMPTS[0], cfg, seed=5)])[0]
    eng = SpeculativeEngine(target, drafter(), 4)
    other = eng.add_request(PROMPTS[1], GenerationConfig(max_new_tokens=5, sampling=cfg.sampling, stop_token_ids=[]), seed=9)
    eng.step()
    mine = eng.add_request(PROMPTS[0], cfg, seed=5)
    eng.step()
    late = eng.add_request(PROMPTS[2], cfg, seed=1)
    got = run_until_done(eng, [mine, other, late])
    assert got[0] == want


def test_mixed_sampling_params_in_one_batch(target):
    greedy = GenerationConfig(max_new_tokens=20, sampling=GREEDY, stop_token_ids=[])
    hot = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, top_p=0.9), stop_token_ids=[])
    eng = SpeculativeEngine(target, NgramDrafter(num_tokens=4), 4)
    a, b = eng.add_request(PROMPTS[0], greedy), eng.add_request(PROMPTS[0], hot, seed=2)
    out = run_until_done(eng, [a, b])
    assert out[0] == ar_generate(target, PROMPTS[0], greedy).tokens and len(out[1]) == 20
    with pytest.raises(ValueError, match="still running"):
        r = eng.add_request(PROMPTS[1], greedy)
        eng.step()
        eng.pop_result(r)


def test_skipped_drafting_steps_keep_greedy_identity_and_drafter_context():
    """Steps that skip drafting (draft gating) hand the drafter all the features it
    missed when it drafts again; the output stays the AR output."""
    from dspark.drafters import build_drafter
    from dspark.scheduler import PrefixScheduler, SPSProfile
    from tests.tiny import tiny_gemma3

    t = tiny_gemma3(vocab=64)
    torch.manual_seed(0)
    drafter = build_drafter("dspark", t, gamma=4, feature_layers=[0, 1], num_layers=1, mask_token_id=3)
    sch = PrefixScheduler(policy="sync", sps=SPSProfile([1, 64], [10.0, 10.0]), draft_gate=True)
    pattern = iter([True, False, False, True, False, True, True, False] * 50)
    sch.should_draft = lambda R: next(pattern)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (9, 15, 4)]
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=0.0), stop_token_ids=[])
    want = [ar_generate(t, p, cfg).tokens for p in prompts]
    got = SpeculativeEngine(t, drafter, num_draft=4, scheduler=sch).generate(prompts, cfg)
    assert [r.tokens for r in got] == want
    assert any(n == 0 for r in got for n in r.stats.draft_lens)  # some steps really skipped drafting


def test_unseeded_batchmate_does_not_change_a_seeded_request():
    """Issue #11 defect 8: one unseeded request used to send its whole group to the global
    RNG, so a seeded request's output depended on its batchmates. Unseeded requests now
    draw from a generator of their own, seeded from fresh entropy."""
    target = TARGETS["gemma3"]()
    cfg = GenerationConfig(max_new_tokens=16, sampling=SamplingParams(temperature=1.0), stop_token_ids=[], seed=None)
    alone = SpeculativeEngine(target, NgramDrafter(num_tokens=4), 4)
    want = run_until_done(alone, [alone.add_request(PROMPTS[0], cfg, seed=5)])[0]
    eng = SpeculativeEngine(target, NgramDrafter(num_tokens=4), 4)
    ids = [eng.add_request(PROMPTS[0], cfg, seed=5), eng.add_request(PROMPTS[1], cfg)]  # the second is unseeded
    assert run_until_done(eng, ids)[0] == want
    # fresh entropy, not the global RNG: resetting torch's seed does not repeat an unseeded sample
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        e = SpeculativeEngine(target, NgramDrafter(num_tokens=4), 4)
        outs.append(run_until_done(e, [e.add_request(PROMPTS[1], cfg)])[0])
    assert outs[0] != outs[1]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_large_batches_verify_slot_by_slot_with_the_same_output(target, temperature, monkeypatch):
    """Batches of at least ``wave_min_batch`` requests verify slot by slot (the target's LM
    head only for requests still accepting); with the same seeds every request gets exactly
    the tokens of the one-product verification (drawn the same way), and greedy output
    stays the AR output."""
    calls = []
    import dspark.engine as engine_mod

    real_extend = engine_mod._SlotRunner.extend
    monkeypatch.setattr(engine_mod._SlotRunner, "extend", lambda self, *a, **k: calls.append(0) or real_extend(self, *a, **k))
    for name in ("_verify_by_slot", "_decide_greedy_by_slot"):
        real = getattr(SpeculativeEngine, name)
        monkeypatch.setattr(SpeculativeEngine, name, lambda self, *a, _r=real, **k: calls.append(1) or _r(self, *a, **k))
    prompts = [PROMPTS[i % 3] + [40 + i] for i in range(18)]
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=temperature), stop_token_ids=[], seed=11)
    runs = {}
    for waves in (0, 1, 2):
        eng = SpeculativeEngine(target, RandomDrafter(64, k=4, seed=0) if temperature else DeterministicDrafter(64, k=4, seed=0), 4)
        eng.wave_verify = waves
        assert eng.wave_min_batch <= len(prompts)
        n = len(calls)
        runs[waves] = [r.tokens for r in eng.generate(prompts, cfg)]
        assert (len(calls) > n) == bool(waves)
        if waves and temperature and eng._runner().batched:
            assert 0 in calls[n:]  # the target's layers ran in two waves
    assert runs[1] == runs[0] and runs[2] == runs[0]
    eng = SpeculativeEngine(target, RandomDrafter(64, k=4, seed=0) if temperature else DeterministicDrafter(64, k=4, seed=0), 4)
    eng.wave_forward = False  # the target's layers in one forward over all k + 1 rows
    assert [r.tokens for r in eng.generate(prompts, cfg)] == runs[0]
    if temperature == 0:
        assert runs[0] == [ar_generate(target, p, cfg).tokens for p in prompts]


def test_two_wave_forward_gives_a_feature_reading_drafter_the_same_tokens(target):
    """The two-wave target forward appends the survivors' features after the first wave's:
    a DSpark drafter (it reads them every round) proposes, and every request emits, exactly
    what it does with one forward over all rows (T = 1, same seeds)."""
    temperature = 1.0
    from dspark import batch_verify
    from dspark.drafters import build_drafter

    if not batch_verify.supports(target):
        pytest.skip("no slot cache for this target")
    torch.manual_seed(0)
    drafter = build_drafter("dspark", target, gamma=4, feature_layers=[0, 1], num_layers=1, mask_token_id=4, rank=4)
    prompts = [PROMPTS[i % 3] + [40 + i] for i in range(18)]
    cfg = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=temperature), stop_token_ids=[], seed=3)
    runs = []
    for two_waves in (True, False):
        eng = SpeculativeEngine(target, drafter, 4)
        eng.wave_verify, eng.wave_forward = 1, two_waves
        out = eng.generate(prompts, cfg)
        runs.append(([r.tokens for r in out], [r.stats.accepted for r in out]))
    assert runs[0] == runs[1]
    assert sum(map(sum, runs[0][1])) > 0  # drafts were accepted: the later rounds read the appended features


class _GreedyOracle:
    """Proposes the target's own greedy continuation (known in advance), with its third
    draft of every round wrong: rounds accept two drafts and reject the third."""

    name, feature_layers = "oracle", None

    def __init__(self, continuations: dict[tuple, list[int]], k: int, vocab: int) -> None:
        self.cont, self.k, self.vocab = continuations, k, vocab

    def propose(self, state):
        from dspark.drafters.base import Proposal

        k = min(self.k, state.max_draft)
        rows = []
        for seq in state.seqs:
            full = next(p + c for p, c in self.cont.items() if list(p + c)[: len(seq)] == list(seq))
            nxt = list(full[len(seq) : len(seq) + k]) + [0] * k
            row = nxt[:k]
            if k >= 3:
                row[2] = (row[2] + 1) % self.vocab
            rows.append(row)
        return Proposal(torch.tensor(rows, dtype=torch.long).reshape(len(rows), k), torch.full((len(rows),), k, dtype=torch.long), None)

    def release(self, request_ids) -> None:
        pass


def test_two_wave_forward_keeps_greedy_output_with_accepting_drafts(target, monkeypatch):
    """Greedy rounds of a large batch with drafts that are accepted past the first wave
    (the survivors' later drafts go through the target in the second wave): the output is
    the AR output, and the accepted counts equal those of one forward over all rows."""
    prompts = [PROMPTS[i % 3] + [40 + i] for i in range(18)]
    cfg = GenerationConfig(max_new_tokens=16, sampling=SamplingParams(temperature=0.0), stop_token_ids=[], seed=3)
    ar = [ar_generate(target, p, cfg).tokens for p in prompts]
    oracle = _GreedyOracle({tuple(p): tuple(a) for p, a in zip(prompts, ar)}, 4, target.vocab_size)
    import dspark.engine as engine_mod

    extended = []
    real = engine_mod._SlotRunner.extend
    monkeypatch.setattr(engine_mod._SlotRunner, "extend", lambda self, rows, tails: extended.append(len(rows)) or real(self, rows, tails))
    runs = []
    for two_waves in (True, False):
        eng = SpeculativeEngine(target, oracle, 4)
        eng.wave_verify, eng.wave_forward = 1, two_waves
        out = eng.generate(prompts, cfg)
        assert [r.tokens for r in out] == ar
        runs.append([r.stats.accepted for r in out])
    assert runs[0] == runs[1] and max(max(a) for a in runs[0]) == 2
    from dspark import batch_verify

    assert bool(extended) == batch_verify.supports(target)  # the second wave ran wherever there is a slot cache
