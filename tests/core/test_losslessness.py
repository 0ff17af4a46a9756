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

import pytest
import torch
from scipy.stats import chisquare

import dspark.kernels.reference as ref_mod
import dspark.verify as verify_mod
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams, probs_from_logits
from tests.drafters_for_tests import DeterministicDrafter, OneHotDrafter, PeakedWrongDrafter, RandomDrafter
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
    p = probs_from_logits(target.forward(prefixes).logits[:, len(prompt) - 1 :], params).double()
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    for a, b in itertools.product(range(V), range(V)):
        r = a * V + b
        joint[a, b] = p[0, 0, a] * p[r, 1, b] * p[r, 2]
    return joint


def sample_counts(target, drafter, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    engine = SpeculativeEngine(target, drafter, num_draft=2, cache_mode="recompute")
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
    }[kind]()


@pytest.mark.parametrize("pname", list(PARAMS))
@pytest.mark.parametrize("kind", ["random", "peaked_wrong", "one_hot", "deterministic"])
def test_speculative_sampling_matches_ar_distribution(target, kind, pname):
    params = PARAMS[pname]
    exact = exact_distribution(target, params)
    counts = sample_counts(target, make_drafter(kind, target, params), params)
    p = chi2_pvalue(counts, exact)
    tv = 0.5 * (counts / counts.sum() - exact).abs().sum().item()
    assert p > 1e-3, f"{kind}/{pname}: chi-square p={p:.2e}, TV={tv:.4f}"


def test_without_drafter_matches_ar_distribution(target):
    params = PARAMS["T1"]
    counts = sample_counts(target, None, params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) > 1e-3


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
    from dspark import kernels

    params = PARAMS[pname]
    with kernels.backend_override("triton"):
        counts = sample_counts(target, make_drafter(kind, target, params), params)
    assert chi2_pvalue(counts, exact_distribution(target, params)) > 1e-3


# ---- the KV cache and the one-forward ragged batch, past the sliding window ------------


@pytest.mark.parametrize("kind", ["peaked_wrong", "deterministic"])
def test_kv_cache_and_ragged_batch_verify_are_lossless_past_the_window(target, kind):
    """The default engine path (per-request KV caches, every request verified in one
    padded forward by dspark.batch_verify) with two prompts of different lengths, both
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
