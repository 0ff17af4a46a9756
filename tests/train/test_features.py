"""The offline target-feature cache: exact bf16 round trip, fp8 within its precision,
sharding, sharing between experiments, and failure safety (disk full, no space,
truncated shard, examples that do not match)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from tests.tiny import tiny_gemma3
from train import features as F
from train.data import Example
from train.fit import ExampleDataset, collate

LAYERS = [0, 1]


@pytest.fixture(scope="module")
def target():
    return tiny_gemma3(vocab=64, layers=3)


def examples(n=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        L = 5 + 3 * i
        out.append(Example(f"e{i}", torch.randint(4, 64, (L,), generator=g).tolist(), [0] * 2 + [1] * (L - 2)))
    return out


def solo(target, e):
    r = target.forward(torch.tensor([e.input_ids]), taps=LAYERS, final_hidden=True, logits="none")
    return torch.cat([r.taps[i] for i in LAYERS], -1)[0], r.final_hidden[0]


def assert_bf16_of(got, want):
    """`got` is what the cache returns for a feature whose one-sequence fp32 value is `want`.
    The cache computes it in a padded batch, where fp32 sums run in another order, so the
    value it rounds can differ from `want` in the last fp32 bits and, rarely, land on the
    other side of a bf16 rounding boundary. What must hold exactly: the stored value is a
    bf16 number (nothing else is lost in the round trip), it is at most one bf16 step from
    `want`, and almost every element is exactly `want`'s bf16 rounding."""
    assert got.shape == want.shape
    assert torch.equal(got, got.to(torch.bfloat16).float())
    step = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 8)  # one bf16 step at |want|
    assert bool(((got - want).abs() <= step + 1e-30).all())
    same = (got == want.to(torch.bfloat16).float()).float().mean()
    assert float(same) >= 0.99


def test_bf16_round_trip_is_exact_and_sharded(target, tmp_path):
    exs = examples()
    path = F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, batch_size=3, progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert m["shards"] > 1 and m["num_tokens"] == sum(len(e.input_ids) for e in exs)
    d = target.hidden_size
    assert m["bytes_per_token"] == 2 * 3 * d and m["published_bytes_per_token"] == 6 + 2 * 3 * d
    cache = F.FeatureCache(path, dtype=torch.float32)
    cache.check(exs)
    for i, e in enumerate(exs):
        f, h = cache[i]
        wf, wh = solo(target, e)
        for got, want in ((f, wf), (h, wh)):
            assert_bf16_of(got, want)
    # the same target + data + layers is the same cache: a second build computes nothing
    stamp = (path / "shard-00000.bin").stat().st_mtime_ns
    assert F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, progress=False) == path
    assert (path / "shard-00000.bin").stat().st_mtime_ns == stamp
    # other data -> another cache
    assert F.build(target, exs[:3], LAYERS, tmp_path, shard_tokens=40, progress=False) != path


def test_fp8_storage_halves_the_bytes_within_e4m3_precision(target, tmp_path):
    exs = examples(3)
    path = F.build(target, exs, LAYERS, tmp_path, storage="float8_e4m3fn", progress=False)
    cache = F.FeatureCache(path, dtype=torch.float32)
    assert cache.m["bytes_per_token"] == 3 * (target.hidden_size + 4)
    for i, e in enumerate(exs):
        f, _ = cache[i]
        wf, _ = solo(target, e)
        err = (f - wf).abs() / wf.abs().amax(-1, keepdim=True)
        assert float(err.max()) <= 2**-4 + 1e-6  # e4m3: 3 mantissa bits, scaled per row and layer
    with pytest.raises(F.FeatureCacheError, match="feature_storage"):
        F.build(target, exs, LAYERS, tmp_path, storage="int4", progress=False)


def test_disk_full_leaves_no_shard_and_a_rerun_finishes(target, tmp_path, monkeypatch):
    exs = examples()
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(F.os, "fsync", fsync)
    with pytest.raises(F.FeatureCacheError, match="disk full while writing feature shard shard-00001.bin"):
        F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, progress=False)
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["shard-00000.bin", "shard-00000.json"]  # no half-written shard, no tmp, no manifest
    with pytest.raises(F.FeatureCacheError, match="never finished"):
        F.FeatureCache(path)
    monkeypatch.setattr(F.os, "fsync", real_fsync)
    stamp = (path / "shard-00000.bin").stat().st_mtime_ns
    assert F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, progress=False) == path
    assert (path / "shard-00000.bin").stat().st_mtime_ns == stamp  # the finished shard was kept
    cache = F.FeatureCache(path, dtype=torch.float32)
    f, _ = cache[len(exs) - 1]
    assert torch.equal(f, solo(target, exs[-1])[0].to(torch.bfloat16).float())


def test_too_little_free_space_is_refused_before_writing(target, tmp_path, monkeypatch):
    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(F.FeatureCacheError, match="not enough disk space"):
        F.build(target, examples(2), LAYERS, tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.bin"))


def test_damaged_or_mismatching_cache_is_refused(target, tmp_path):
    exs = examples(4)
    path = F.build(target, exs, LAYERS, tmp_path, shard_tokens=20, progress=False)
    with pytest.raises(F.FeatureCacheError, match="holds 4 examples"):
        F.FeatureCache(path).check(exs[:3])
    other = [Example(e.id, e.input_ids + [5], e.loss_mask + [1]) for e in exs]
    with pytest.raises(F.FeatureCacheError, match="does not match example 0"):
        F.FeatureCache(path).check(other)
    shard = path / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(F.FeatureCacheError, match="wrong size"):
        F.FeatureCache(path)


def test_collate_pads_cached_features(target, tmp_path):
    exs = examples(3)
    cache = F.FeatureCache(F.build(target, exs, LAYERS, tmp_path, progress=False))
    batch = collate([ExampleDataset(exs, cache)[i] for i in range(3)])
    T = max(len(e.input_ids) for e in exs)
    assert batch["feats"].shape == (3, T, 2 * target.hidden_size) and batch["final"].shape == (3, T, target.hidden_size)
    assert batch["feats"].dtype == torch.bfloat16 and float(batch["feats"][0, len(exs[0].input_ids):].abs().sum()) == 0


def test_topk_cache_holds_the_targets_top_log_probs_where_training_reads_them(target, tmp_path):
    exs = examples()
    path = F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, batch_size=3, progress=False)
    cache = F.FeatureCache(path, dtype=torch.float32)
    k = 5
    tdir = F.build_topk(target, exs, cache, k, progress=False)
    top = F.TopkCache(tdir, cache)
    for i, e in enumerate(exs):
        ids, logp = top[i]
        _, h = cache[i]
        want = torch.log_softmax(target.lm_head(h).float(), -1).topk(k, -1)
        need = torch.tensor(e.loss_mask[1:] + [0], dtype=torch.bool)  # row t is read when token t+1 is a loss token
        assert torch.equal(ids[need], want.indices[need])
        torch.testing.assert_close(logp[need], want.values[need])
        assert bool(torch.isinf(logp[~need]).all())
    # resumable per shard: a lost shard is rebuilt, the others are reused as they are
    (tdir / "manifest.json").unlink()
    (tdir / "shard-00001.bin").unlink()
    stamp = (tdir / "shard-00000.bin").stat().st_mtime_ns
    assert F.build_topk(target, exs, cache, k, progress=False) == tdir
    assert (tdir / "shard-00000.bin").stat().st_mtime_ns == stamp and (tdir / "shard-00001.bin").exists()
    again = F.TopkCache(tdir, cache)
    assert all(torch.equal(again[i][0], top[i][0]) for i in range(len(exs)))
    # batches carry the top-k rows; padding rows hold log-prob -inf
    batch = collate([ExampleDataset(exs, cache, again)[i] for i in (0, 6)])
    assert batch["top_ids"].shape == (2, len(exs[6].input_ids), k)
    assert bool(torch.isinf(batch["top_logp"][0, len(exs[0].input_ids):]).all())
    # a top-k cache built for other features is refused
    other = F.FeatureCache(F.build(target, exs[:3], LAYERS, tmp_path, progress=False))
    with pytest.raises(F.FeatureCacheError, match="belongs to features"):
        F.TopkCache(tdir, other)


def test_topk_cache_conditioned_on_a_draft_vocabulary(target, tmp_path):
    """build_topk(vocab_ids=...) stores the target's distribution restricted to the draft
    vocabulary and renormalised over it, computing only those rows of the LM head; readers
    with another vocabulary (or none) are refused."""
    exs = examples()
    cache = F.FeatureCache(F.build(target, exs, LAYERS, tmp_path, shard_tokens=40, batch_size=3, progress=False), dtype=torch.float32)
    vocab = torch.tensor([7, 3, 60, 12, 1, 33, 20, 45, 9, 50])  # draft order, not sorted
    k = 4
    tdir = F.build_topk(target, exs, cache, k, progress=False, vocab_ids=vocab)
    assert tdir != F.build_topk(target, exs, cache, k, progress=False)  # the full-vocabulary cache lives apart
    top = F.TopkCache(tdir, cache, vocab)
    assert top.scope == "draft_vocab" and top.m["vocab_size"] == len(vocab)
    for i, e in enumerate(exs):
        ids, logp = top[i]
        _, h = cache[i]
        sub = torch.log_softmax(target.lm_head(h).float()[:, vocab], -1)  # the full head, then restricted: same values
        want = sub.topk(k, -1)
        need = torch.tensor(e.loss_mask[1:] + [0], dtype=torch.bool)
        assert torch.equal(ids[need], vocab[want.indices[need]])
        torch.testing.assert_close(logp[need], want.values[need], atol=2e-5, rtol=1e-5)
        # a proper distribution over the vocabulary: the k values are its largest, and sum below 1
        assert bool((logp[need].exp().sum(-1) <= 1 + 1e-5).all()) and bool(torch.isin(ids[need], vocab).all())
        assert bool(torch.isinf(logp[~need]).all())
    with pytest.raises(F.FeatureCacheError, match="conditioned on draft vocabulary"):
        F.TopkCache(tdir, cache, vocab.flip(0))
    with pytest.raises(F.FeatureCacheError, match="the full vocabulary"):
        F.TopkCache(tdir, cache)
    with pytest.raises(F.FeatureCacheError, match="vocab_ids must be"):
        F.build_topk(target, exs, cache, k, progress=False, vocab_ids=torch.tensor([3, 64]))
