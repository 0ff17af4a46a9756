"""Statistical losslessness: speculative sampling through the real engine reproduces the
target's autoregressive distribution exactly, whatever the drafter proposes.

Target: a tiny random-init Gemma 3 with a 5-token vocabulary. The exact AR probability of
every 3-token continuation (125 cells) is computed by enumeration; 20,000 seeded
speculative samples are compared with it by a chi-square test. The same test must reject
verifiers that are broken on purpose (residual step removed, bonus from the wrong slot),
which shows it has the power to catch those bugs.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chisquare

import dspark.kernels.reference as ref_mod
import dspark.verify as verify_mod
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams, probs_from_logits
from dspark.scheduler import PrefixScheduler, SPSProfile
from tests.drafters_for_tests import DeterministicDrafter, OneHotDrafter, PeakedWrongDrafter, RandomDrafter, SupportDrafter
from tests.tiny import tiny_gemma3

V, N_TOK, N_SAMPLES = 5, 3, 20_000
PROMPT = [1, 2, 3]
PARAMS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.8-topk4-topp0.9": SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
}


@pytest.fixture(scope="module")
def target():
    return tiny_gemma3(vocab=V, init_std=0.15, seed=1)


def exact_distribution(target, params: SamplingParams, prompt: list[int] = PROMPT) -> torch.Tensor:
    """[V, V, V] exact AR probabilities of the first three new tokens."""
    prefixes = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    p = probs_from_logits(target.forward(prefixes).logits[:, len(prompt) - 1 :], params).double().cpu()
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    for a, b in itertools.product(range(V), range(V)):
        r = a * V + b
        joint[a, b] = p[0, 0, a] * p[r, 1, b] * p[r, 2]
    return joint


def sample_counts(target, drafter, params: SamplingParams, seed: int = 0, screen_verify: int | None = None,
                  wave_verify: int = 0) -> torch.Tensor:
    """``wave_verify`` 0: every slot from full logits in one verify() (the engine's path
    below ``wave_min_batch`` requests); > 0: the slot-by-slot path of large batches (all
    N_SAMPLES requests decode as one batch here)."""
    engine = SpeculativeEngine(target, drafter, num_draft=2, cache_mode="recompute")
    if screen_verify is not None:
        engine.screen_verify = screen_verify
    engine.wave_verify = wave_verify
    cfg = GenerationConfig(max_new_tokens=N_TOK, sampling=params, stop_token_ids=[], seed=seed)
    results = engine.generate([PROMPT] * N_SAMPLES, cfg)
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    for r in results:
        assert len(r.tokens) == N_TOK
        counts[tuple(r.tokens)] += 1
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting < 5 samples are pooled into one.

    A sample in a cell of probability exactly 0 (cut by top-k / top-p) is an outright
    failure, reported as p = 0.
    """
    obs, exp = counts.flatten().numpy(), (probs.flatten() / probs.sum() * counts.sum()).numpy()
    if obs[exp == 0].sum() > 0:
        return 0.0
    obs, exp = obs[exp > 0], exp[exp > 0]
    small = exp < 5
    o = list(obs[~small]) + ([obs[small].sum()] if small.any() else [])
    e = list(exp[~small]) + ([exp[small].sum()] if small.any() else [])
    return float(chisquare(o, e).pvalue)


def make_drafter(kind: str, target, params):
    # the "wrong" token: the one the target least wants first
    wrong = int(exact_distribution(target, params).sum((1, 2)).argmin())
    return {
        "random": lambda: RandomDrafter(V, k=2, seed=1),
        "peaked_wrong": lambda: PeakedWrongDrafter(V, wrong=wrong, k=2, seed=2),
        "one_hot": lambda: OneHotDrafter(V, token=wrong, k=2, seed=3),
        "deterministic": lambda: DeterministicDrafter(V, k=2, seed=4),
        # over 3 of the 5 tokens, the target's least wanted first token among them
        "support": lambda: SupportDrafter(V, support=[wrong, (wrong + 1) % V, (wrong + 3) % V], k=2, seed=5),
    }[kind]()


@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("kind", ["random", "peaked_wrong", "one_hot", "deterministic", "support"])
def test_speculative_sampling_matches_ar_distribution(target, kind, pname):
    params = PARAMS[pname]
    exact = exact_distribution(target, params)
    counts = sample_counts(target, make_drafter(kind, target, params), params)
    p = chi2_pvalue(counts, exact)
    tv = 0.5 * (counts / counts.sum() - exact).abs().sum().item()
    assert p > 1e-3, f"{kind}/{pname}: chi-square p={p:.2e}, TV={tv:.4f}"


@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("kind,waves", [("random", 1), ("peaked_wrong", 2), ("one_hot", 1), ("deterministic", 2), ("support", 1)])
def test_slot_by_slot_verification_matches_ar_distribution(target, kind, waves, pname, monkeypatch):
    """Large sampled batches verify their first ``waves`` slots one at a time through the
    exact head, for the requests still accepting (dspark.verify.verify_slot), the rest in
    one product."""
    params = PARAMS[pname]
    calls = []
    real = verify_mod.verify_slot
    import dspark.engine as engine_mod

    monkeypatch.setattr(engine_mod, "verify_slot", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = sample_counts(target, make_drafter(kind, target, params), params, wave_verify=waves)
    assert calls  # the slot-by-slot path ran
    p = chi2_pvalue(counts, exact_distribution(target, params))
    assert p > 1e-3, f"{kind}/{pname}/{waves} slots: chi-square p={p:.2e}"


def test_detects_draft_probs_on_the_wrong_ids(target, monkeypatch):
    """Power: draft-vocabulary probs read back onto the first ids instead of their
    support's ids (what a lost index map would do) fail the slot-by-slot path."""
    from dspark.drafters.base import Proposal

    params = PARAMS["T1"]

    def wrong(self, compact):
        out = compact.new_zeros((*compact.shape[:-1], self.vocab_size))
        out[..., : compact.shape[-1]] = compact
        return out

    monkeypatch.setattr(Proposal, "_scatter", wrong)
    counts = sample_counts(target, make_drafter("support", target, params), params, wave_verify=1)
    assert chi2_pvalue(counts, exact_distribution(target, params)) < 1e-6


def test_detects_slot_by_slot_verification_without_residual(target, monkeypatch):
    """Power: the slot-wise path resampling from p_t instead of max(p_t - p_d, 0) fails."""
    params = PARAMS["T1"]
    monkeypatch.setattr(ref_mod, "residual", lambda p, q: p)
    counts = sample_counts(target, make_drafter("peaked_wrong", target, params), params, wave_verify=2)
    assert chi2_pvalue(counts, exact_distribution(target, params)) < 1e-6


def test_verify_slot_rejects_bad_input():
    logits, u, noise = torch.zeros(3, V), torch.rand(3), torch.rand(3, dtype=torch.float64)
    tok = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="greedy"):
        verify_mod.verify_slot(logits, tok, None, SamplingParams(temperature=0.0), u, noise)
    with pytest.raises(ValueError, match="target_logits must be"):
        verify_mod.verify_slot(logits, tok[:2], None, PARAMS["T1"], u, noise)
    with pytest.raises(ValueError, match="draft_probs must be"):
        verify_mod.verify_slot(logits, tok, torch.zeros(3, V + 1), PARAMS["T1"], u, noise)
    with pytest.raises(ValueError, match="u must be"):
        verify_mod.verify_slot(logits, tok, None, PARAMS["T1"], u[:2], noise)


def test_without_drafter_matches_ar_distribution(target):
    params = PARAMS["T1"]
    counts = sample_counts(target, None, params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) > 1e-3


@pytest.fixture
def screened(target):
    """The target with its LM head's fp16 screen forced on, made to work hard: one token
    with an exact logit, every other bound widened by one logit (still valid bounds), so
    most draws go through the acceptance step."""
    from dspark.screened_head import ScreenedHead

    target.screen_head, target._screen = True, ScreenedHead(target.get_lm_head_weight(), target._softcap, top=1, slack=1.0)
    yield target
    target.screen_head, target._screen = None, None


def test_screened_lm_head_matches_ar_distribution(screened):
    """No drafter: every token (the prefill's and each round's) is drawn through the screen."""
    params = PARAMS["T1"]
    counts = sample_counts(screened, None, params)
    assert chi2_pvalue(counts, exact_distribution(screened, params)) > 1e-3


def test_detects_a_screen_without_acceptance_test(screened, monkeypatch):
    """Accepting every proposal of the screen draws from exp(upper bound), not exp(logit)."""
    head = screened._screen
    monkeypatch.setattr(head, "exact_pairs", lambda h, ids: head.bounds(h)[1].gather(1, ids[:, None])[:, 0])
    params = PARAMS["T1"]
    counts = sample_counts(screened, None, params)
    assert chi2_pvalue(counts, exact_distribution(screened, params)) < 1e-6


@pytest.mark.parametrize("kind,screen_verify", [("peaked_wrong", 2), ("deterministic", 1)])
def test_screened_verification_of_drafts_matches_ar_distribution(screened, kind, screen_verify, monkeypatch):
    """Sampled drafts verified slot by slot through the screen (the loose bounds of the
    fixture leave many tests undecided: those go to the full logits), with the slots past
    ``screen_verify`` verified from full logits."""
    params = PARAMS["T1"]
    head = screened._screen
    calls = []
    real = head.verify_step
    monkeypatch.setattr(head, "verify_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = sample_counts(screened, make_drafter(kind, screened, params), params, screen_verify=screen_verify)
    assert calls  # the screened verification ran
    assert chi2_pvalue(counts, exact_distribution(screened, params)) > 1e-3


def test_detects_screened_verification_accepting_undecided_drafts(screened, monkeypatch):
    """Power: a screened verifier that accepts whenever its bounds cannot decide fails."""
    params = PARAMS["T1"]
    monkeypatch.setattr(screened._screen, "_verify_full", lambda *a, **k: (True, -1))
    counts = sample_counts(screened, make_drafter("peaked_wrong", screened, params), params)
    assert chi2_pvalue(counts, exact_distribution(screened, params)) < 1e-6


# ---- the test has power: broken verifiers must fail it ------------------------------


def test_detects_missing_residual(target, monkeypatch):
    """Resampling from p_t instead of max(p_t - p_d, 0) after a rejection biases the
    output toward the draft's favourite token."""
    params = PARAMS["T1"]
    monkeypatch.setattr(ref_mod, "residual", lambda p, q: p)
    counts = sample_counts(target, make_drafter("peaked_wrong", target, params), params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) < 1e-6


def test_detects_bonus_from_wrong_slot(target, monkeypatch):
    """Drawing the bonus token from the last draft's slot instead of the next one."""
    params = PARAMS["T1"]

    def off_by_one(n_acc, lens):
        return torch.where(n_acc == lens, (n_acc - 1).clamp_min(0), n_acc)

    monkeypatch.setattr(ref_mod, "correction_slot", off_by_one)
    drafter = RandomDrafter(V, k=1, seed=1, ragged=False)  # bonus lands on token 3
    counts = sample_counts(target, drafter, params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) < 1e-6


def test_detects_always_accept(target, monkeypatch):
    """Skipping the acceptance test altogether."""
    params = PARAMS["T1"]
    real = verify_mod.uniform_ragged
    monkeypatch.setattr(verify_mod, "uniform_ragged", lambda lens, k, gens, device="cpu": real(lens, k, gens, device) * 0)
    counts = sample_counts(target, make_drafter("peaked_wrong", target, params), params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) < 1e-6


# ---- the trained-model drafters go through the same test ----------------------------


@pytest.mark.parametrize(
    "kind,kw",
    [("dflash", {"num_layers": 1, "mask_token_id": 4}), ("dspark", {"num_layers": 1, "mask_token_id": 4, "rank": 4}),
     ("dspark", {"head": "rnn", "num_layers": 1, "mask_token_id": 4, "rank": 4}), ("eagle3", {})],
    ids=["dflash", "dspark", "dspark-rnn", "eagle3"],
)
def test_trained_model_drafters_are_lossless(target, kind, kw):
    from dspark.drafters import build_drafter

    torch.manual_seed(0)
    drafter = build_drafter(kind, target, gamma=2, feature_layers=[0, 1], **kw)
    with torch.no_grad():  # sharpen the random drafter so its proposals are confidently wrong
        for p in drafter.parameters():
            p.normal_(0, 0.5)
    params = PARAMS["T1"]
    counts = sample_counts(target, drafter, params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) > 1e-3


# ---- the same statistics through the Triton rejection sampler -------------------------


@pytest.mark.skipif(
    not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("kind,pname", [("peaked_wrong", "T1"), ("deterministic", "T0.8-topk4-topp0.9")])
def test_triton_rejection_sampler_is_lossless(target, kind, pname):
    """Device-aware: under TRITON_INTERPRET=1 the kernel runs on CPU tensors; on a CUDA
    host (native Triton) the target and so the verifier's tensors move to the GPU."""
    from dspark import kernels

    if kernels._interpreting():
        dev_target = target
    else:
        dev_target = tiny_gemma3(vocab=V, init_std=0.15, seed=1)
        dev_target.model.to("cuda")
        assert dev_target.device.type == "cuda"
    params = PARAMS[pname]
    with kernels.backend_override("triton"):
        counts = sample_counts(dev_target, make_drafter(kind, dev_target, params), params)
    assert chi2_pvalue(counts, exact_distribution(dev_target, params)) > 1e-3


# ---- the KV cache and the one-forward ragged batch, past the sliding window ------------


@pytest.mark.parametrize("kind", ["peaked_wrong", "deterministic"])
def test_kv_cache_and_ragged_batch_verify_are_lossless_past_the_window(target, kind):
    """The default engine path (every request in one slot KV cache, all verified in one
    ragged forward: dspark.slot_cache) with two prompts of different lengths, both
    longer than the tiny target's sliding window (8), decoded concurrently: each
    prompt's 3-token continuations must follow its own exact AR distribution."""
    from dspark import batch_verify

    assert batch_verify.supports(target)
    window = target.model.config.sliding_window
    prompts = [[1, 2, 3, 4, 0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4, 3, 2, 1, 0, 1, 2, 3]]
    assert all(len(p) > window for p in prompts)
    params = PARAMS["T0.8-topk4-topp0.9"] if kind == "deterministic" else PARAMS["T1"]
    n = 8_000
    engine = SpeculativeEngine(target, make_drafter(kind, target, params), num_draft=2)
    assert engine.cache_mode == "kv"
    cfg = GenerationConfig(max_new_tokens=N_TOK, sampling=params, stop_token_ids=[], seed=11)
    results = engine.generate([prompts[i % 2] for i in range(2 * n)], cfg)
    assert engine._runner().batched  # the ragged one-forward path actually ran
    for j, prompt in enumerate(prompts):
        counts = torch.zeros(V, V, V, dtype=torch.float64)
        for r in results[j::2]:
            counts[tuple(r.tokens)] += 1
        p = chi2_pvalue(counts, exact_distribution(target, params, prompt))
        assert p > 1e-3, f"{kind}, prompt {j} (length {len(prompt)}): chi-square p={p:.2e}"


def exact_distribution4(target, params: SamplingParams, prompt: list[int] = PROMPT) -> torch.Tensor:
    """[V, V, V, V] exact AR probabilities of the first four new tokens."""
    prefixes = torch.tensor([prompt + list(t) for t in itertools.product(range(V), repeat=3)])
    p = probs_from_logits(target.forward(prefixes).logits[:, len(prompt) - 1 :], params).double().cpu()
    joint = torch.zeros(V, V, V, V, dtype=torch.float64)
    for r, (a, b, c) in enumerate(itertools.product(range(V), repeat=3)):
        joint[a, b, c] = p[r, 0, a] * p[r, 1, b] * p[r, 2, c] * p[r, 3]
    return joint


@pytest.mark.parametrize("kind,pname", [("peaked_wrong", "T1"), ("dspark", "T0.8-topk4-topp0.9")])
def test_two_wave_target_forward_is_lossless(target, kind, pname, monkeypatch):
    """Large batches on the slot cache run the target's decoder layers in two waves: the
    anchor and the first draft of every request, then the second draft only for the
    requests that accepted the first (``wave_forward``, ``wave_verify`` 1). Four new
    tokens, so a round after the first token can verify two drafts. The dspark case
    reads the target's features, which the second wave appends."""
    import dspark.engine as engine_mod
    from dspark.drafters import build_drafter

    params = PARAMS[pname]
    if kind == "dspark":
        torch.manual_seed(0)
        drafter = build_drafter("dspark", target, gamma=2, feature_layers=[0, 1], num_layers=1, mask_token_id=4, rank=4)
        with torch.no_grad():
            for p in drafter.parameters():
                p.normal_(0, 0.5)
    else:
        drafter = make_drafter(kind, target, params)
    engine = SpeculativeEngine(target, drafter, num_draft=2)
    engine.wave_verify = 1
    assert engine.wave_forward and engine.cache_mode == "kv"
    extended = []
    real = engine_mod._SlotRunner.extend
    monkeypatch.setattr(engine_mod._SlotRunner, "extend", lambda self, rows, tails: extended.append(len(rows)) or real(self, rows, tails))
    cfg = GenerationConfig(max_new_tokens=4, sampling=params, stop_token_ids=[], seed=5)
    results = engine.generate([PROMPT] * N_SAMPLES, cfg)
    assert extended and sum(extended) < N_SAMPLES  # the second wave ran, for part of the batch only
    counts = torch.zeros(V, V, V, V, dtype=torch.float64)
    for r in results:
        counts[tuple(r.tokens)] += 1
    p = chi2_pvalue(counts, exact_distribution4(target, params))
    assert p > 1e-3, f"{kind}/{pname}: chi-square p={p:.2e}"


# ---- serving-shaped runs: pooled requests, the scheduler, the draft gate, stops ---------


def exact_outcomes(target, params: SamplingParams, prompt: list[int] = PROMPT, stops: Sequence[int] = ()) -> dict:
    """Exact probability of every outcome of a 3-token request that ends at the first
    stop token: the joint of :func:`exact_distribution` summed over what a stop cuts off."""
    joint = exact_distribution(target, params, prompt)
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for seq in itertools.product(range(V), repeat=N_TOK):
        cut = next((i + 1 for i, t in enumerate(seq) if t in stops), N_TOK)
        out[seq[:cut]] += float(joint[seq])
    return dict(out)


def outcome_pvalue(counts: Counter, exact: dict) -> float:
    """Chi-square of sampled outcomes against :func:`exact_outcomes`; an outcome the exact
    law cannot produce (e.g. tokens after a stop) is an outright failure (p = 0)."""
    if any(k not in exact for k in counts):
        return 0.0
    keys = sorted(exact)
    obs = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64)
    return chi2_pvalue(obs, torch.tensor([exact[k] for k in keys], dtype=torch.float64))


@dataclass
class PooledRun:
    counts: Counter
    accepted: int = 0  # accepted drafts over all requests
    verified: int = 0  # drafts verified over all requests


def pooled_counts(
    target, drafter, params: SamplingParams, n: int, scheduler=None, concurrency: int = 16,
    cache_mode: str = "recompute", stops: Sequence[int] = (), seeded: bool = True, prompt: list[int] = PROMPT,
) -> PooledRun:
    """``n`` requests through one engine the way a server drives it: at most
    ``concurrency`` in flight, a new one admitted as soon as one finishes, so each step
    pools requests at different positions (and, with a scheduler, schedules them together).
    ``seeded=False`` leaves every request unseeded (fresh OS entropy per request)."""
    engine = SpeculativeEngine(target, drafter, num_draft=2, cache_mode=cache_mode, scheduler=scheduler)
    cfg = GenerationConfig(max_new_tokens=N_TOK, sampling=params, stop_token_ids=list(stops), seed=None)
    run, live, submitted = PooledRun(Counter()), [], 0
    while submitted < n or live:
        while submitted < n and len(live) < concurrency:
            live.append(engine.add_request(prompt, cfg, seed=submitted if seeded else None))
            submitted += 1
        engine.step()
        for rid in [r for r in live if engine.finish_reason(r) is not None]:
            live.remove(rid)
            res = engine.pop_result(rid)
            run.counts[tuple(res.tokens)] += 1
            run.accepted += sum(res.stats.accepted)
            run.verified += sum(res.stats.draft_lens)
    return run


def sharpened_drafter(kind: str, target, seed: int = 0, **kw):
    """A random-init trained-style drafter whose proposals (and confidences) are sharp."""
    from dspark.drafters import build_drafter

    torch.manual_seed(seed)
    drafter = build_drafter(kind, target, gamma=2, feature_layers=[0, 1], **kw)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.5)
    return drafter


class RecordingScheduler:
    """Wraps a PrefixScheduler's draft gate and verify_lengths to record what they did."""

    def __init__(self, sched: PrefixScheduler) -> None:
        self.sched, self.gate, self.steps = sched, Counter(), []
        real_gate, real_lengths = sched.should_draft, sched.verify_lengths

        def should_draft(num_requests: int) -> bool:
            ok = real_gate(num_requests)
            self.gate[ok] += 1
            return ok

        def verify_lengths(survival, request_ids=None, group=None):
            lens = real_lengths(survival, request_ids, group)
            self.steps.append(([int(s.numel()) for s in survival], list(lens)))
            return lens

        sched.should_draft, sched.verify_lengths = should_draft, verify_lengths

    def check_exercised(self) -> None:
        """The run pooled requests, trimmed some drafts, verified others, and gated."""
        assert max(len(n) for n, _ in self.steps) >= 4, "no step pooled several requests"
        assert any(l < k for n, lens in self.steps for k, l in zip(n, lens)), "no draft was ever trimmed"
        assert any(l > 0 for _, lens in self.steps for l in lens), "nothing was ever verified"
        assert self.gate[True] > 0 and self.gate[False] > 0, f"the draft gate never switched: {dict(self.gate)}"


# Verify steps this cheap make any measured draft time dominate: the gate finds plain
# decoding faster, skips, probes again next step (probe_every=1), so it keeps switching.
# Steps/s are flat up to 24 verified tokens and fall off a cliff after: with R requests
# pooled (R tokens for the anchors), at most 24 - R drafts are worth verifying, so sync /
# async trim drafts whenever more requests than that drafted.
FAST_SPS = SPSProfile([1, 24, 25, 64], [1e5, 1e5, 1e4, 1e4])


@pytest.mark.parametrize("policy,pname", [("sync", "T0.8-topk4-topp0.9"), ("async", "T1")])
def test_pooled_scheduler_with_draft_gate_is_lossless(target, policy, pname):
    """#11 item 10: sync / async prefix scheduling of many requests pooled per step, the
    real draft gate (observe / should_draft) on, T > 0: the output is still exactly AR."""
    params = PARAMS[pname]
    sched = PrefixScheduler(policy=policy, sps=FAST_SPS, gamma=2, draft_gate=True, probe_every=1, initial_budget=4)
    rec = RecordingScheduler(sched)
    run = pooled_counts(target, sharpened_drafter("dspark", target, mask_token_id=4, rank=4), params, 8_000, scheduler=sched)
    rec.check_exercised()
    assert run.accepted > 100, f"only {run.accepted} drafts accepted: the test would verify little"
    p = outcome_pvalue(run.counts, exact_outcomes(target, params))
    assert p > 1e-3, f"{policy}/{pname}: chi-square p={p:.2e}"


def test_pooled_scheduler_test_detects_missing_residual(target, monkeypatch):
    """The pooled, scheduled, gated run has the power to catch a broken verifier."""
    params = PARAMS["T1"]
    monkeypatch.setattr(ref_mod, "residual", lambda p, q: p)
    sched = PrefixScheduler(policy="sync", sps=FAST_SPS, gamma=2, draft_gate=True, probe_every=1)
    run = pooled_counts(target, sharpened_drafter("dspark", target, mask_token_id=4, rank=4), params, 8_000, scheduler=sched)
    assert outcome_pvalue(run.counts, exact_outcomes(target, params)) < 1e-6


@pytest.mark.parametrize(
    "kind,kw",
    [("dflash", {"num_layers": 1, "mask_token_id": 4}), ("dspark", {"num_layers": 1, "mask_token_id": 4, "rank": 4}),
     ("dspark", {"head": "rnn", "num_layers": 1, "mask_token_id": 4, "rank": 4}), ("eagle3", {})],
    ids=["dflash", "dspark", "dspark-rnn", "eagle3"],
)
def test_draft_vocabulary_with_temperature_and_top_k_top_p_is_lossless(target, kind, kw):
    """#11 item 11: a 3-token draft vocabulary (of the target's 5), T=0.8 with top-k and
    top-p. Tokens outside it have draft probability 0; every proposal must lie inside it,
    and enough drafts must be accepted that verification was actually exercised."""
    from dspark.drafters import DraftVocab

    params = PARAMS["T0.8-topk4-topp0.9"]
    first = exact_distribution(target, params).sum((1, 2))
    ids = torch.argsort(first, descending=True)[:3]  # the target's likeliest first tokens
    drafter = sharpened_drafter(kind, target, vocab=DraftVocab(ids, V), **kw)
    assert drafter.vocab.size == 3
    real_propose, outside = drafter.propose, []

    def propose(state):
        prop = real_propose(state)
        for i, n in enumerate(prop.lens.tolist()):
            outside.extend(t for t in prop.tokens[i, :n].tolist() if t not in set(ids.tolist()))
        return prop

    drafter.propose = propose
    run = pooled_counts(target, drafter, params, 8_000, concurrency=64)
    assert not outside, f"{kind} proposed ids outside its draft vocabulary: {sorted(set(outside))}"
    assert run.accepted > 200, f"{kind}: only {run.accepted} of {run.verified} drafts accepted"
    p = outcome_pvalue(run.counts, exact_outcomes(target, params))
    assert p > 1e-3, f"{kind}: chi-square p={p:.2e}"


@pytest.mark.parametrize("pname", list(PARAMS))
def test_stop_tokens_and_unseeded_requests_are_lossless(target, pname):
    """#11 item 12: stop tokens at T > 0 on the default KV-cache path, every request
    unseeded (its own fresh-entropy generators). Outcomes end at the first stop token;
    their law must be the exact AR law of the truncated sequences."""
    params = PARAMS[pname]
    first = exact_distribution(target, params).sum((1, 2))
    stop = int(torch.argsort(first, descending=True)[1])  # common enough to cut many requests
    drafter = make_drafter("random", target, params)  # accepted often enough to cut drafts at a stop
    run = pooled_counts(target, drafter, params, 4_000, cache_mode="kv", stops=[stop], seeded=False)
    exact = exact_outcomes(target, params, stops=[stop])
    lengths = Counter(len(k) for k in run.counts.elements())
    likely = {len(k) for k, p in exact.items() if p > 0.01}  # lengths the exact law makes common
    assert 1 in likely and 3 in likely and likely <= set(lengths), f"stops: exact lengths {likely}, sampled {dict(lengths)}"
    assert all(stop not in k[:-1] for k in run.counts), "tokens were emitted after a stop token"
    assert run.accepted > 100
    p = outcome_pvalue(run.counts, exact)
    assert p > 1e-3, f"{pname}: chi-square p={p:.2e}, lengths {dict(lengths)}"


def test_ngram_fallback_in_front_of_a_trained_drafter_is_lossless(target):
    """Prompt lookup serves the rows whose context repeats an n-gram (point-mass drafts),
    the trained drafter the others (its own distributions), in the same pooled, scheduled
    step; the output stays the exact AR law."""
    from dspark.drafters.fallback import NgramFallbackDrafter

    params = PARAMS["T1"]
    fb = NgramFallbackDrafter(sharpened_drafter("dspark", target, mask_token_id=4, rank=4), min_match=1, num_tokens=2)
    sched = PrefixScheduler(policy="sync", sps=FAST_SPS, gamma=2)
    run = pooled_counts(target, fb, params, 8_000, scheduler=sched)
    assert fb.ngram_rows > 1_000 and fb.model_rows > 1_000, (fb.ngram_rows, fb.model_rows)
    assert run.accepted > 100
    p = outcome_pvalue(run.counts, exact_outcomes(target, params))
    assert p > 1e-3, f"chi-square p={p:.2e}"
