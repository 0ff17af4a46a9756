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
