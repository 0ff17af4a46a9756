"""Training stages 3-4 on a tiny target: anchors, the three objectives, Lightning fit,
and resume after an interruption."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dspark.drafters import build_drafter
from tests.train.test_data import char_target
from train.anchors import sample_anchors
from train.data import build_example
from train.fit import collate, fit
from train.module import DistillModule


def test_anchor_sampling_rules():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    anchors, valid, slots = sample_anchors(mask, gamma=3, max_anchors=10)
    a0 = anchors[0][valid[0]].tolist()
    assert a0 == [2, 3, 4, 7]  # position and next both loss tokens
    assert slots[0][valid[0]].tolist() == [[True, True, True], [True, True, False], [True, False, False], [True, False, False]]
    assert anchors[1][valid[1]].tolist() == [1] and slots[1][0].tolist() == [True, False, False]
    few, v, _ = sample_anchors(mask, gamma=3, max_anchors=2, generator=torch.Generator().manual_seed(0))
    assert int(v[0].sum()) == 2 and set(few[0][v[0]].tolist()) <= {2, 3, 4, 7}


def examples(t, n=32):
    return [build_example(t, str(i), [f"what is {i}+{i}?"], f"It is {2 * i}. Yes, {2 * i}.", 64) for i in range(n)]


def make_module(t, kind, steps):
    torch.manual_seed(0)
    kw = {} if kind == "eagle3" else dict(num_layers=1, mask_token_id=3, rank=16)
    d = build_drafter(kind, t, gamma=4, feature_layers=[0, 1], **kw)
    return DistillModule(d, t, kind, lr=3e-3, total_steps=steps, anchors_per_seq=8, ttt_steps=3)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_training_lowers_the_loss(tmp_path, kind):
    t = char_target()
    exs = examples(t)
    m = make_module(t, kind, 40)
    batch = collate(exs[:8])

    def measure():
        m.gen.manual_seed(1)
        with torch.no_grad():
            out = m.ttt_loss(batch) if kind == "eagle3" else m.block_loss(batch)
        return float(out["loss"]), float(out["tau_est"])

    (l0, tau0) = measure()
    fit(m, exs, tmp_path, max_steps=40, batch_size=8, progress=False)
    (l1, tau1) = measure()
    if kind == "eagle3":
        # soft CE against a near-uniform random target is bounded below by its entropy;
        # what must move is the match to the target: the analytic tau estimate
        assert tau1 > tau0 + 0.05 and l1 < l0
    else:
        assert l1 < 0.95 * l0


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_truncated_targets_train_like_the_exact_ones(tmp_path, kind):
    """With the target's top-k cached (trainer.target_topk) the step reads no LM head; on a
    vocabulary the k tokens cover, the loss equals the exact one, and training works."""
    from train import features as F
    from train.fit import ExampleDataset

    t = char_target()
    exs = examples(t)
    cache = F.FeatureCache(F.build(t, exs, [0, 1], tmp_path / "f", progress=False), dtype=torch.float32)
    full = F.TopkCache(F.build_topk(t, exs, cache, t.vocab_size, progress=False), cache)
    ds = ExampleDataset(exs, cache, full)
    batch = collate([ds[i] for i in range(8)])
    exact = {k: v for k, v in batch.items() if not k.startswith("top_")}
    m = make_module(t, kind, 30)
    losses = []
    for b in (exact, batch):
        m.gen.manual_seed(1)
        with torch.no_grad():
            losses.append(float((m.ttt_loss(b) if kind == "eagle3" else m.block_loss(b))["loss"]))
    assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0])
    # a truncated cache: training through fit lowers the exact loss
    top4 = F.TopkCache(F.build_topk(t, exs, cache, 4, progress=False), cache)
    fit(m, exs, tmp_path / "fit", max_steps=30, batch_size=8, progress=False, features=cache, topk=top4)
    m.gen.manual_seed(1)
    with torch.no_grad():
        after = m.ttt_loss(exact) if kind == "eagle3" else m.block_loss(exact)
    assert float(after["loss"]) < losses[0]


class Crash(L.Callback):
    """Raises ``exc`` once ``at`` optimiser steps are done (inside spawned workers too)."""

    def __init__(self, at: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
        self.at, self.exc = at, exc

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at:
            raise self.exc("simulated kill")


def test_interrupted_training_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    t = char_target()
    exs = examples(t)
    import train.fit as fit_mod

    real_trainer = L.Trainer

    def crashing(**kw):
        kw["callbacks"] = kw["callbacks"] + [Crash(15)]
        return real_trainer(**kw)

    monkeypatch.setattr(fit_mod.L, "Trainer", crashing)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        fit(make_module(t, "dspark", 20), exs, tmp_path, max_steps=20, batch_size=4, ckpt_every=10, progress=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10
    monkeypatch.setattr(fit_mod.L, "Trainer", real_trainer)
    fit(make_module(t, "dspark", 20), exs, tmp_path, max_steps=20, batch_size=4, ckpt_every=10, progress=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 20


def test_a_checkpoint_of_another_configuration_is_never_resumed(tmp_path, monkeypatch, capsys):
    """An interrupted run resumes only the configuration it was training: a leftover
    checkpoint of another one (other steps, data, loss) is deleted, not continued."""
    t = char_target()
    exs = examples(t)
    fit(make_module(t, "dspark", 10), exs, tmp_path, max_steps=10, batch_size=4, progress=False, run_key="A")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10
    # same key: finished work is resumed (nothing left to do)
    fit(make_module(t, "dspark", 10), exs, tmp_path, max_steps=10, batch_size=4, progress=False, run_key="A")
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10
    # another key with more steps: trains from step 0, all of its own steps
    seen = []
    import train.fit as fit_mod

    real_trainer = L.Trainer

    class First(L.Callback):
        def on_train_start(self, trainer, *args) -> None:
            seen.append(trainer.global_step)

    def watching(**kw):
        kw["callbacks"] = kw["callbacks"] + [First()]
        return real_trainer(**kw)

    monkeypatch.setattr(fit_mod.L, "Trainer", watching)
    fit(make_module(t, "dspark", 12), exs, tmp_path, max_steps=12, batch_size=4, progress=False, run_key="B")
    assert seen == [0] and "belong to another configuration" in capsys.readouterr().out
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 12
