"""Data-parallel training (issue #13): the data order as a function of the optimiser step,
the loss normalised over the global batch, and two CPU processes (gloo) that train the same
drafter as one process with the same global batch, also across a kill and a resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.train.test_data import char_target
from tests.train.test_fit import Crash, examples, make_module
from train.fit import GlobalBatchSampler, StepLoader, fit


def test_global_batches_split_over_processes_and_resume_mid_epoch():
    s = GlobalBatchSampler(n=21, global_batch=8, total_steps=9, seed=3)
    assert s.per_epoch == 2 and len(s) == 9
    for step in range(9):
        whole = s.batch(step)
        assert len(whole) == 8 and len(set(whole)) == 8
        halves = s.batch(step, 0, 2) + s.batch(step, 1, 2)
        thirds = s.batch(step, 0, 3) + s.batch(step, 1, 3) + s.batch(step, 2, 3)
        assert halves == whole and thirds == whole  # each process takes its share of the same batch
    # an epoch's two batches are disjoint; the next epoch reshuffles
    assert not set(s.batch(0)) & set(s.batch(1)) and s.batch(2) != s.batch(0)
    # a sampler resumed at step 5 yields exactly what the uninterrupted one yields from step 5
    resumed = GlobalBatchSampler(n=21, global_batch=8, total_steps=9, seed=3, start=5)
    assert list(resumed) == list(s)[5:]
    # fewer examples than one global batch: the whole set, each step
    small = GlobalBatchSampler(n=5, global_batch=8, total_steps=2)
    assert sorted(small.batch(0)) == list(range(5))
    with pytest.raises(ValueError, match="cannot be split over 8 processes"):
        small.batch(0, 0, 8)
    with pytest.raises(ValueError, match="no training examples"):
        GlobalBatchSampler(n=0, global_batch=8, total_steps=2)


def test_loader_state_refuses_another_data_order():
    s = GlobalBatchSampler(n=10, global_batch=4, total_steps=3, seed=1)
    loader = StepLoader(list(range(10)), batch_sampler=s)
    state = loader.state_dict()
    loader.load_state_dict(state)  # same order: fine
    with pytest.raises(ValueError, match="data order"):
        loader.load_state_dict({**state, "seed": 2})


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=False)["state_dict"].items()}


@pytest.mark.parametrize("kind,strategy", [("dspark", "ddp_spawn"), ("eagle3", "ddp_fork")])
def test_two_processes_train_the_same_drafter_as_one_and_resume_after_a_kill(tmp_path, monkeypatch, kind, strategy):
    t = char_target()
    exs = examples(t, 20)  # 20 examples, global batch 8: drop-last epochs of 2 steps, reshuffled
    steps, common = 6, dict(max_steps=6, batch_size=8, ckpt_every=2, progress=False, seed=5)
    one = fit(make_module(t, kind, steps), exs, tmp_path / "one", **common)
    ddp = dict(accelerator="cpu", devices=2, strategy=strategy)
    module = make_module(t, kind, steps)
    two = fit(module, exs, tmp_path / "two", **common, **ddp)
    w1, w2 = _weights(one), _weights(two)
    # the launching process's module holds what the workers trained
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v.float(), w2[k])
    assert set(w1) == set(w2)
    moved = max(float((w1[k] - v).abs().max()) for k, v in _weights_at_init(t, kind).items())
    assert moved > 1e-3  # training changed the weights, so agreement below means something
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    # killed after step 3 (last checkpoint at step 2), then resumed: the same weights again
    import train.fit as fit_mod

    real = L.Trainer

    def killing(**kw):
        kw["callbacks"] = kw["callbacks"] + [Crash(3, RuntimeError)]
        return real(**kw)

    monkeypatch.setattr(fit_mod.L, "Trainer", killing)
    with pytest.raises(Exception, match="simulated kill"):
        fit(make_module(t, kind, steps), exs, tmp_path / "killed", **common, **ddp)
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=False)["global_step"] == 2
    monkeypatch.setattr(fit_mod.L, "Trainer", real)
    resumed = fit(make_module(t, kind, steps), exs, tmp_path / "killed", **common, **ddp)
    assert torch.load(resumed, weights_only=False)["global_step"] == steps
    w3 = _weights(resumed)
    for k in w1:
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _weights_at_init(t, kind) -> dict[str, torch.Tensor]:
    return {f"drafter.{k}": v.float() for k, v in make_module(t, kind, 1).drafter.state_dict().items()}
