"""Each Triton kernel against its torch reference (CPU: TRITON_INTERPRET=1, fp32),
plus the dispatch rules and argument checks."""

from __future__ import annotations

import os

import pytest
import torch

from dspark import kernels
from dspark.kernels import reference as ref

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tri():
    from dspark.kernels import triton_kernels

    return triton_kernels


def ragged_case(B=6, K=4, V=37, seed=0, with_q=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1) if with_q else None
    if q is not None:
        tok = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    else:
        tok = torch.randint(0, V, (B, K), generator=g)
    lens = torch.tensor([K, 0, 1, K, 2, 3][:B])
    u = torch.rand(B, K, generator=g)
    noise = torch.empty(B, V).exponential_(generator=g)
    return [x.to(DEV) if x is not None else None for x in (p, tok, lens, q, u, noise)]


@needs_triton
@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rejection_sample_matches_reference(with_q, seed):
    p, tok, lens, q, u, noise = ragged_case(seed=seed, with_q=with_q)
    want = ref.rejection_sample(p, tok, lens, q, u, noise)
    got = tri().rejection_sample(p, tok, lens, q, u, noise)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
@pytest.mark.parametrize("with_q", [True, False])
def test_rejection_sample_large_vocab_chunks(with_q):
    """V = 2500 spans several vocabulary blocks; 5 rows exercise the row mask."""
    p, tok, lens, q, u, noise = ragged_case(B=5, V=2500, seed=7, with_q=with_q)
    want = ref.rejection_sample(p, tok, lens, q, u, noise)
    got = tri().rejection_sample(p, tok, lens, q, u, noise)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_rejection_sample_accepts_everything_and_bonus():
    p, tok, lens, q, u, noise = ragged_case(seed=3)
    u = torch.zeros_like(u)  # every draft with p_t(x) > 0 is accepted
    want = ref.rejection_sample(p, tok, lens, q, u, noise)
    got = tri().rejection_sample(p, tok, lens, q, u, noise)
    assert torch.equal(got[1], lens) and torch.equal(got[0], want[0])


@needs_triton
def test_rejection_greedy_matches_reference():
    g = torch.Generator().manual_seed(0)
    amax = torch.randint(0, 5, (7, 6), generator=g)
    tok = torch.where(torch.rand(7, 5, generator=g) < 0.7, amax[:, :5], torch.randint(0, 5, (7, 5), generator=g))
    lens = torch.tensor([5, 0, 3, 5, 1, 2, 4])
    want = ref.rejection_greedy(amax, tok, lens)
    got = tri().rejection_greedy(amax.to(DEV), tok.to(DEV), lens.to(DEV))
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def head_case(B=3, G=4, K=45, R=8, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, G, K, generator=g) * 2
    w1 = torch.randn(K + 1, R, generator=g)
    w2 = torch.randn(K, R, generator=g) * 0.5
    prev0 = torch.tensor([K, 3, 7][:B])  # K: an out-of-vocabulary anchor
    noise = torch.empty(B, G, K).exponential_(generator=g)
    hid = torch.randn(B, G, D, generator=g)
    cw = torch.randn(3 * R, 2 * R + D, generator=g) * 0.3
    cb = torch.randn(3 * R, generator=g) * 0.1
    return [x.to(DEV) for x in (base, w1, w2, prev0, noise, hid, cw, cb)]


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_markov_sampler_matches_reference(temperature):
    base, w1, w2, prev0, noise, *_ = head_case()
    nz = None if temperature == 0 else noise
    want_t, want_p = ref.markov_sample(base, w1, w2, prev0, temperature, nz)
    got_t, got_p = tri().markov_sample(base, w1, w2, prev0, temperature, nz)
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("shape", [dict(), dict(K=300, R=64, D=100)], ids=["small", "chunked"])
def test_rnn_sampler_matches_reference(temperature, shape):
    """'chunked': the cell's 228 input columns and the 300-token vocabulary span several blocks."""
    base, w1, w2, prev0, noise, hid, cw, cb = head_case(**shape)
    nz = None if temperature == 0 else noise
    want_t, want_p = ref.rnn_sample(base, hid, w1, cw, cb, w2, prev0, temperature, nz)
    got_t, got_p = tri().rnn_sample(base, hid, w1, cw, cb, w2, prev0, temperature, nz)
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-6)


@needs_triton
def test_distill_loss_and_gradients_match_reference():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(9, 300, generator=g) * 3
    t = torch.randn(9, 300, generator=g) * 3
    y = torch.randint(0, 300, (9,), generator=g)
    y[2] = -100  # ignored for CE
    w_ce, w_l1 = torch.rand(9, generator=g), torch.rand(9, generator=g)
    d, t, y, w_ce, w_l1 = (x.to(DEV) for x in (d, t, y, w_ce, w_l1))
    outs, grads = [], []
    for impl in (ref, tri()):
        x = d.clone().requires_grad_(True)
        ce, l1, acc = impl.distill_loss(x, t, y)
        (ce * w_ce + l1 * w_l1).sum().backward()
        outs.append((ce.detach(), l1.detach(), acc))
        grads.append(x.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert float(outs[0][0][2]) == 0.0 and bool(((outs[0][2] >= 0) & (outs[0][2] <= 1)).all())


def test_distill_loss_reference_values():
    d = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    t = torch.tensor([[0.0, 0.0], [-10.0, 10.0]])
    ce, l1, acc = ref.distill_loss(d, t, torch.tensor([0, 1]))
    torch.testing.assert_close(ce, torch.tensor([0.6931472, 20.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, torch.tensor([0.0, 2.0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_q", [True, False])
def test_rejection_sample_inverse_cdf_draw(with_q):
    """The CPU form of the correction / bonus draw (one fp64 uniform per row, inverse CDF)
    makes the same accept decisions as the exponential race and samples the same law:
    the residual at a rejected slot, p_t at the bonus slot."""
    p, tok, lens, q, u, noise = ragged_case(B=6, K=4, V=5, seed=4, with_q=with_q)
    p, tok, lens, q, u = [x.cpu() if x is not None else None for x in (p, tok, lens, q, u)]
    _, n_acc = ref.rejection_sample(p, tok, lens, q, u, noise.cpu())
    n = 20_000
    u64 = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for b in range(6):
        rep = [x[b : b + 1].repeat(n, *[1] * (x.dim() - 1)) if x is not None else None for x in (p, tok, lens, q, u)]
        toks, acc = kernels.rejection_sample(*rep, u64)
        assert bool((acc == n_acc[b]).all())  # the accept decisions use only `uniforms`
        a = int(n_acc[b])
        if a < int(lens[b]):
            qa = torch.zeros(5).scatter_(0, tok[b, a : a + 1], 1.0) if q is None else q[b, a]
            want = ref.residual(p[b, a][None], qa[None])[0]
        else:
            want = p[b, a]
        freq = torch.bincount(toks[:, a], minlength=5).float() / n
        torch.testing.assert_close(freq, want / want.sum(), atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="noise must have dtype"):
        kernels.rejection_sample(p, tok, lens, q, u, u64[:6].float())


def test_dispatch_switch_and_argument_checks(monkeypatch):
    p, tok, lens, q, u, noise = ragged_case()
    with kernels.backend_override("torch"):
        assert kernels.get_backend() == "torch"
        out = kernels.rejection_sample(p, tok, lens, q, u, noise)
        assert torch.equal(out[0], ref.rejection_sample(p, tok, lens, q, u, noise)[0])
    monkeypatch.setenv("DSPARK_KERNELS", "fast")
    with pytest.raises(ValueError, match="DSPARK_KERNELS"):
        kernels.get_backend()
    monkeypatch.setenv("DSPARK_KERNELS", "auto")
    with pytest.raises(ValueError, match="uniforms must have shape"):
        kernels.rejection_sample(p, tok, lens, q, u[:, :2], noise)
    with pytest.raises(ValueError, match="target_probs must have dtype"):
        kernels.rejection_sample(p.double(), tok, lens, q, u, noise)
    with pytest.raises(ValueError, match="noise must be given exactly"):
        base, w1, w2, prev0, *_ = head_case()
        kernels.markov_sample(base, w1, w2, prev0, 1.0, None)
    with pytest.raises(ValueError, match="backend must be"):
        kernels.set_backend("cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with kernels.backend_override("triton"), pytest.raises(RuntimeError, match="needs CUDA"):
            kernels.rejection_sample(p, tok, lens, q, u, noise)


_PADDED = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.kernels.test_kernels import ragged_case
from dspark.kernels import reference as ref, triton_kernels as tk
p, tok, lens, q, u, noise = ragged_case(seed=0)
pad = torch.arange(tok.shape[1], device=tok.device)[None, :] >= lens[:, None]
tok = tok.masked_fill(pad, -(2**40))  # padding far below any valid id
want = ref.rejection_sample(p, tok, lens, q, u, noise)
got = tk.rejection_sample(p, tok, lens, q, u, noise)
assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
print("OK")
"""


def test_rejection_kernel_clamps_negative_padding_ids():
    """Issue #11 defect 5: the kernel read p[row, slot, id] for padded (negative) ids; with a
    far-negative id the interpreter segfaulted. It must clamp them like the reference. Run in
    a subprocess (interpreter on CPU) so a crash fails the test instead of the suite."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _PADDED.format(root=root)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.returncode, proc.stderr[-1500:])
