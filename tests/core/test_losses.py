from __future__ import annotations

import math

import torch

from dspark.losses import dspark_loss, live_tau, position_weights, with_outside_mass


def test_position_weights():
    w = position_weights(3)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-0.25), math.exp(-0.5)]))


def test_outside_mass_column_gives_exact_full_vocab_l1():
    g = torch.Generator().manual_seed(0)
    full_t = torch.randn(4, 50, generator=g)
    ids = torch.tensor([3, 7, 11, 20, 49])
    d = torch.randn(4, 5, generator=g)
    d_ext, t_ext = with_outside_mass(d, full_t, ids)
    pd = torch.softmax(d_ext, -1)
    # the same distance computed on the full vocabulary (draft prob 0 outside)
    pd_full = torch.zeros(4, 50).index_copy_(1, ids, torch.softmax(d, -1))
    want = (pd_full - torch.softmax(full_t, -1)).abs().sum(-1)
    got = (pd - torch.softmax(t_ext, -1)).abs().sum(-1)
    torch.testing.assert_close(got, want)


def test_dspark_loss_terms_and_gradients():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(5, 3, 11, generator=g, requires_grad=True)
    t = torch.randn(5, 3, 11, generator=g)
    y = torch.randint(0, 11, (5, 3), generator=g)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0, 2] = False
    conf = torch.zeros(5, 3, requires_grad=True)
    out = dspark_loss(d, t, y, mask, conf)
    out.loss.backward()
    assert d.grad is not None and conf.grad is not None and float(out.tv) > 0
    # identical distributions: no TV, acceptance 1
    same = dspark_loss(t.clone(), t, y, mask)
    assert float(same.tv) < 1e-5 and torch.allclose(same.accept, torch.ones(3))
    assert abs(live_tau(torch.ones(3)) - 4.0) < 1e-6 and abs(live_tau(torch.tensor([0.5, 0.5])) - 1.75) < 1e-6


def _draft_ids_of(top_idx, vocab_ids, V):
    to_d = torch.full((V,), -1)
    to_d[vocab_ids] = torch.arange(len(vocab_ids))
    return to_d[top_idx]


def test_truncated_terms_equal_the_exact_ones_when_k_covers_the_vocabulary():
    from dspark import kernels
    from dspark.losses import truncated_terms

    g = torch.Generator().manual_seed(2)
    V, K = 40, 25
    vid = torch.randperm(V, generator=g)[:K].sort().values  # a draft vocabulary with 15 target ids outside it
    full_t = 2 * torch.randn(6, V, generator=g)
    d = torch.randn(6, K, generator=g)
    y = torch.randint(0, K, (6,), generator=g)
    y[0] = -100
    d_ext, t_ext = with_outside_mass(d, full_t, vid)
    ce, l1, acc = kernels.distill_loss(d_ext, t_ext, y)
    top = torch.log_softmax(full_t, -1).topk(V, -1)
    ce2, l12, acc2 = truncated_terms(d, _draft_ids_of(top.indices, vid, V), top.values, y)
    torch.testing.assert_close(ce2, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l12, l1, atol=1e-5, rtol=1e-5)
    assert float(ce2[0]) == 0.0
    # truncated: a lower bound of the L1 (merging outcomes), the same CE, and it trains the draft
    dd = d.clone().requires_grad_(True)
    top8 = torch.log_softmax(full_t, -1).topk(8, -1)
    ce3, l13, _ = truncated_terms(dd, _draft_ids_of(top8.indices, vid, V), top8.values, y)
    assert bool((l13 <= l1 + 1e-6).all()) and bool((l13 < l1 - 1e-3).any())
    torch.testing.assert_close(ce3, ce, atol=1e-5, rtol=1e-5)
    (ce3.sum() + l13.sum()).backward()
    assert dd.grad is not None and float(dd.grad.abs().sum()) > 0


def test_truncated_soft_ce_equals_the_exact_soft_ce_over_the_draft_vocabulary():
    from dspark.losses import truncated_soft_ce

    g = torch.Generator().manual_seed(3)
    V, K = 30, 30  # full draft vocabulary: no outside tokens, so the soft CEs agree exactly
    full_t = torch.randn(4, V, generator=g)
    d = torch.randn(4, K, generator=g)
    p = torch.softmax(full_t, -1)
    want = -(p * torch.log_softmax(d, -1)).sum(-1)
    top = torch.log_softmax(full_t, -1).topk(V, -1)
    ce, l1 = truncated_soft_ce(d, top.indices, top.values)
    torch.testing.assert_close(ce, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, (torch.softmax(d, -1) - p).abs().sum(-1), atol=1e-5, rtol=1e-5)


def test_picked_log_probs_have_the_gradient_of_log_softmax_gather(monkeypatch):
    """The fused pick (no [N, K] log-softmax, one gradient buffer) gives log_softmax's values
    and gradient, also with repeated columns in a row (the label among the top tokens) and
    more rows than one chunk."""
    from dspark import losses as losses_mod
    from dspark.losses import _pick_log_probs

    g = torch.Generator().manual_seed(4)
    N, K, m = 70, 50, 6
    z = (3 * torch.randn(N, K, generator=g)).requires_grad_(True)
    idx = torch.randint(0, K, (N, m), generator=g)
    idx[:, -1] = idx[:, 0]  # a repeated column: the gradient must add both uses
    w = torch.randn(N, m, generator=g)
    ref_z = z.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(ref_z, -1).gather(1, idx)
    got = _pick_log_probs(z, idx)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(z.grad, ref_z.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no graph: the plain expression
        torch.testing.assert_close(_pick_log_probs(z, idx), ref.detach(), atol=1e-5, rtol=1e-5)
    # all rows in one pass (the accelerator setting) gives the same
    monkeypatch.setattr(losses_mod, "_chunk", lambda t: t.shape[0])
    z2 = z.detach().clone().requires_grad_(True)
    (_pick_log_probs(z2, idx) * w).sum().backward()
    torch.testing.assert_close(z2.grad, ref_z.grad, atol=1e-5, rtol=1e-5)
