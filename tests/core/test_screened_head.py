"""The LM head's fp16 screen (dspark.screened_head): its error bounds hold, greedy picks the
exact fp32 argmax, sampling reproduces softmax(z / T) exactly (chi-square, and the test
fails a sampler without the acceptance step), and the engine / AR loop give the same
greedy tokens with the screen on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.screened_head import ScreenedHead
from tests.tiny import tiny_gemma3


def awkward_head(V: int = 3000, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows of very different scales: ordinary, fp16-subnormal tiny, large; plus a near-tie
    (row 7 = row 3 scaled by 1 + 1e-5) among the largest rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g) * 0.05
    w[100:200] *= 1e-4  # entries ~5e-6: fp16 subnormals
    w[200:260] *= 40.0
    w[3] = torch.randn(d, generator=g) * 6.0  # the largest rows, so hidden states can aim at them
    w[4] = torch.randn(d, generator=g) * 6.0
    w[7] = w[3] * (1 + 1e-5)  # logits 1e-5 apart: far below fp16's resolution, above fp32 rounding
    return w


def awkward_hidden(n: int = 256, d: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 3.0
    h[:, 5] *= 300.0  # a massive-activation dimension, as Gemma's hidden states have
    h[:64] *= 1e-3
    return h


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bounds_hold_and_greedy_is_the_exact_argmax(softcap):
    w, h = awkward_head(), awkward_hidden()
    head = ScreenedHead(w, softcap)
    z = F.linear(h, w)
    z64 = h.double() @ w.double().t()
    if softcap:  # the target's logits are capped in fp32, and so are the bounds
        z = torch.tanh(z / softcap) * softcap
    lo, hi = head.bounds(h)
    assert bool((lo <= z).all() and (z <= hi).all())
    if not softcap:  # the real-number logits too (fp64 stands in for them)
        assert bool((lo.double() <= z64).all() and (z64 <= hi.double()).all())
    assert float((hi - lo).mean()) < 2.0  # bounds that hold only because they are huge would be useless
    assert head.argmax(h).tolist() == z.argmax(-1).tolist()
    # the tie rows: aim hidden states at them
    aim = lambda r: (w[r] * 0.05 / w[r].norm())[None]  # noqa: E731  (its logit ~2.4: below the cap)
    assert int(head.argmax(aim(3))[0]) == 7 == int(F.linear(aim(3), w).argmax())  # the near-tie
    # (no assertion on the exact tie 4 / 9: the library GEMM itself gives equal rows values
    # that differ in the last bit depending on where they sit in its blocking)
    big = (w[4] * 1e3)[None]  # logits past fp16's range: the screen steps aside
    assert head.bounds(big) is None and head.argmax(big).tolist() == head.full(big).argmax(-1).tolist()


def test_hidden_states_beyond_fp16_use_the_full_head():
    w = awkward_head()
    h = awkward_hidden(8)
    h[0, 0] = 1e6
    head = ScreenedHead(w)
    assert head.bounds(h) is None
    assert head.argmax(h).tolist() == F.linear(h, w).argmax(-1).tolist()
    ids = head.sample(h, 1.0, torch.Generator().manual_seed(0))
    assert ids.shape == (8,) and bool((ids >= 0).all() and (ids < w.shape[0]).all())


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="fp32"):
        ScreenedHead(torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16's range"):
        ScreenedHead(torch.full((4, 3), 1e6))
    with pytest.raises(ValueError, match="temperature"):
        ScreenedHead(torch.randn(4, 3)).sample(torch.randn(1, 3), 0.0)


def _draws(head: ScreenedHead, h: torch.Tensor, T: float, n: int = 20_000) -> torch.Tensor:
    ids = head.sample(h.expand(n, -1).contiguous(), T, torch.Generator().manual_seed(0))
    return torch.bincount(ids, minlength=head.weight.shape[0]).double()


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    exp = probs.double() / probs.double().sum() * counts.sum()
    keep = exp >= 5
    obs, ex = counts[keep], exp[keep]
    if not bool(keep.all()):  # cells expecting < 5 draws are pooled
        obs, ex = torch.cat([obs, counts[~keep].sum()[None]]), torch.cat([ex, exp[~keep].sum()[None]])
    return float(chisquare(obs.numpy(), ex.numpy()).pvalue)


def _case():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 16, generator=g) * 0.08
    h = torch.randn(1, 16, generator=g)
    return w, h


@pytest.mark.parametrize("T,max_tries", [(1.0, 32), (0.5, 32), (1.0, 0)])
def test_sampling_reproduces_the_softmax(T, max_tries):
    """top=2 and one logit of extra slack: most draws land outside the exact top set and go
    through the acceptance step (max_tries=0: every row falls back to its full logits)."""
    w, h = _case()
    head = ScreenedHead(w, top=2, slack=1.0, max_tries=max_tries)
    p = torch.softmax(F.linear(h, w)[0] / T, -1)
    assert float(p.topk(2).values.sum()) < 0.7  # the tail carries real mass
    counts = _draws(head, h, T)
    assert _pvalue(counts, p) > 1e-3


def test_the_sampling_test_fails_without_the_acceptance_step(monkeypatch):
    """A sampler that accepts every proposal draws from exp(upper bound): the test sees it."""
    w, h = _case()
    head = ScreenedHead(w, top=2, slack=1.0)

    def upper_bounds(hv, ids):  # the acceptance ratio becomes 1: every proposal is accepted
        return head.bounds(hv)[1].gather(1, ids[:, None])[:, 0]

    monkeypatch.setattr(head, "exact_pairs", upper_bounds)
    p = torch.softmax(F.linear(h, w)[0], -1)
    assert _pvalue(_draws(head, h, 1.0), p) < 1e-6


def _verify_draws(head: ScreenedHead, h: torch.Tensor, q: torch.Tensor | None, T: float, n: int = 20_000,
                  seed: int = 0) -> tuple[torch.Tensor, float]:
    """n independent speculative-sampling steps of one slot: x ~ q (or the fixed draft when
    q is None), then verify_step. Returns the counts of the emitted token and the
    acceptance rate."""
    g = torch.Generator().manual_seed(seed)
    V = head.weight.shape[0]
    if q is None:
        x = torch.full((n,), 5, dtype=torch.long)
        qs = None
    else:
        x = torch.multinomial(q, n, replacement=True, generator=g)
        qs = q.expand(n, -1)
    ok, corr = head.verify_step(h.expand(n, -1).contiguous(), x, qs, T, g)
    assert bool((corr[ok] == -1).all()) and bool((corr[~ok] >= 0).all())
    out = torch.where(ok, x, corr)
    return torch.bincount(out, minlength=V).double(), float(ok.double().mean())


@pytest.mark.parametrize("T,top,slack,max_tries,drafts", [
    (1.0, 64, 0.0, 32, "random"),   # the bounds as built: the screen decides nearly every step
    (1.0, 2, 1.0, 32, "random"),    # loose bounds: many undecided tests fall back to the full logits
    (0.6, 2, 0.3, 32, "peaked"),    # a draft distribution far from p: many corrections
    (1.0, 2, 0.3, 1, "random"),     # corrections giving up after one proposal
    (1.0, 2, 0.3, 32, "one-hot"),   # deterministic drafts: q is the draft's one-hot
])
def test_verify_step_emits_exactly_the_target_distribution(T, top, slack, max_tries, drafts):
    """The emitted token of an accept/correct step is distributed exactly as p = softmax(z / T),
    and the acceptance rate is sum_x min(p(x), q(x)), whatever the bounds' width."""
    w, h = _case()
    head = ScreenedHead(w, top=top, slack=slack, max_tries=max_tries)
    p = torch.softmax(F.linear(h, w)[0].double() / T, -1)
    g = torch.Generator().manual_seed(7)
    if drafts == "random":
        q = torch.rand(w.shape[0], generator=g)
    elif drafts == "peaked":
        q = torch.full((w.shape[0],), 0.01)
        q[int(p.argmin())] = 1.0  # most drafts are the target's least likely token
    else:
        q = None
    q = None if q is None else q / q.sum()
    counts, acc = _verify_draws(head, h, q, T)
    assert _pvalue(counts, p) > 1e-3
    want = float(p[5]) if q is None else float(torch.minimum(p, q.double()).sum())
    n = counts.sum().item()
    assert abs(acc - want) < 5 * (want * (1 - want) / n) ** 0.5 + 1e-9


def test_the_verify_test_fails_when_undecided_steps_accept(monkeypatch):
    """Power: accepting every step the bounds cannot decide (instead of asking the full logits)
    over-accepts the draft, and the chi-square test sees it."""
    w, h = _case()
    head = ScreenedHead(w, top=2, slack=1.0)
    monkeypatch.setattr(head, "_verify_full", lambda *a, **k: (True, -1))
    p = torch.softmax(F.linear(h, w)[0].double(), -1)
    q = torch.full((w.shape[0],), 0.01)
    q[int(p.argmin())] = 1.0
    counts, _ = _verify_draws(head, h, q / q.sum(), 1.0)
    assert _pvalue(counts, p) < 1e-6


def test_target_chooses_the_screen_only_where_it_applies():
    t = tiny_gemma3(vocab=512, seed=2)
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    assert not t.screens(1, hot)  # auto: a tiny head is not worth screening
    t.screen_head = True
    assert t.screens(1, hot) and t.screens(64, greedy)
    assert not t.screens(1, SamplingParams(temperature=1.0, top_k=5))  # top-k / top-p need the full head
    assert not t.screens(1, SamplingParams(temperature=1.0, top_p=0.9))
    t.screen_head = False
    assert not t.screens(1, greedy)
    bf = tiny_gemma3(vocab=512, seed=2)
    bf.model.to(torch.bfloat16)
    bf.screen_head = True
    assert not bf.screens(1, greedy)  # the screen bounds an fp32 head only
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        t.next_tokens(torch.zeros(2, 3, 32), greedy)


def test_greedy_tokens_are_identical_with_the_screen_on_and_off():
    t = tiny_gemma3(vocab=512, seed=3, init_std=0.05)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [3] * 20]
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0), stop_token_ids=[])
    runs = {}
    for on in (False, True):
        t.screen_head = on
        runs[on] = {
            "ar": [ar_generate(t, p, cfg).tokens for p in prompts],
            "slots": [r.tokens for r in SpeculativeEngine(t, NgramDrafter(num_tokens=4), 4).generate(prompts, cfg)],
            "kv": [r.tokens for r in SpeculativeEngine(t, NgramDrafter(num_tokens=4), 4, batch_verify=False).generate(prompts, cfg)],
            "recompute": [r.tokens for r in SpeculativeEngine(t, None, 0, cache_mode="recompute").generate(prompts, cfg)],
        }
    assert runs[True] == runs[False]
    assert runs[False]["ar"] == runs[False]["slots"] == runs[False]["kv"] == runs[False]["recompute"]
    assert len(set(sum(runs[True]["ar"], []))) > 5  # not a degenerate constant output


def test_a_kernel_that_breaks_the_bound_turns_the_screen_off(monkeypatch):
    """The construction-time probe: an fp16 product that rounds like fp16 accumulation
    (simulated: the bounds' screen logits perturbed by 0.5) is caught and the target falls
    back to the full head."""
    t = tiny_gemma3(vocab=512, seed=2)
    t.screen_head = True
    assert t._screened_head() is not None and t._screen.self_check() is None
    t._screen = None
    real_linear = F.linear

    def sloppy(x, w, b=None):
        out = real_linear(x, w, b)
        return out + 0.5 if x.dtype == torch.float16 else out

    monkeypatch.setattr("dspark.screened_head.F.linear", sloppy)
    assert t._screened_head() is None and t.screen_head is False
    assert not t.screens(1, SamplingParams(temperature=0))
