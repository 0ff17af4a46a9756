"""Target adapter: KV rollback (also past the sliding window), taps, loading and errors."""

from __future__ import annotations

import json

import pytest
import torch

from dspark import embedded
from dspark.cache_dir import atomic_dir, sha256_file
from dspark.errors import CorruptCacheError, ModelLoadError
from dspark.target import Target
from tests.tiny import tiny_gemma3, tiny_qwen3

TARGETS = {"gemma3": lambda: tiny_gemma3(vocab=64, sliding_window=8), "qwen3": lambda: tiny_qwen3(vocab=64)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_rollback_past_sliding_window_matches_fresh_forward(name):
    t = TARGETS[name]()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 64, (1, 30), generator=g)
    cache = t.new_cache()
    t.forward(seq[:, :10], cache)
    t.rollback(cache, 0)
    pos = 10
    # rounds of "feed 5, keep 2" walk well past the 8-token window
    while pos < 25:
        t.forward(torch.randint(3, 64, (1, 5), generator=g), cache)  # junk that gets rolled back
        t.rollback(cache, 5)
        t.forward(seq[:, pos : pos + 2], cache)
        t.rollback(cache, 0)
        pos += 2
    assert t.cache_length(cache) == pos
    probe = seq[:, pos : pos + 3]
    got = t.forward(probe, cache).logits
    fresh = t.forward(seq[:, : pos + 3]).logits[:, -3:]
    torch.testing.assert_close(got, fresh, rtol=1e-4, atol=1e-4)


def test_taps_and_final_hidden():
    t = tiny_gemma3(layers=3)
    out = t.forward(torch.tensor([[1, 5, 6, 7]]), taps=(0, -1), final_hidden=True)
    assert set(out.taps) == {0, 2}
    assert out.taps[0].shape == (1, 4, t.hidden_size) and out.final_hidden.shape == (1, 4, t.hidden_size)
    torch.testing.assert_close(t.lm_head(out.final_hidden), out.logits)
    assert not torch.allclose(out.taps[2], out.final_hidden)  # the tap is the raw, un-normed output
    with pytest.raises(ValueError, match="out of range"):
        t.forward(torch.tensor([[1]]), taps=(3,))
    assert out.logits.dtype == torch.float32
    assert t.embed(torch.tensor([[1]])).shape == (1, 1, t.hidden_size)


def test_logits_modes():
    t = tiny_gemma3()
    ids = torch.tensor([[1, 5, 6, 7]])
    full = t.forward(ids).logits
    torch.testing.assert_close(t.forward(ids, logits="last").logits, full[:, -1:])
    assert t.forward(ids, logits="none").logits is None
    with pytest.raises(ValueError, match="\\[B, n\\]"):
        t.forward(torch.tensor([1, 2]))


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 17, 48, 49])
def test_skinny_lm_head_matches_the_library_product(rows):
    """The blockwise LM head used for a verify forward's few rows equals F.linear (fp32, up to
    summation order), whichever side of the row window, including a ragged last block."""
    from dspark import target as target_mod

    torch.manual_seed(rows)
    w = torch.randn(1000, 24)
    h = torch.randn(1, rows, 24)
    ref = torch.nn.functional.linear(h, w)
    got = target_mod.skinny_linear(h, w, block=384)
    assert got.shape == ref.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # through Target.lm_head, with the softcap, against the library's own head
    t = tiny_gemma3(vocab=1000)
    hid = torch.randn(2, (rows + 1) // 2, t.hidden_size)
    fast = t.lm_head(hid)  # the timed choice
    with t.head_kernel_forced("library"):
        lib = t.lm_head(hid)
    torch.testing.assert_close(fast, lib, rtol=1e-5, atol=1e-5)
    if rows <= 48:
        with t.head_kernel_forced("blockwise"):
            torch.testing.assert_close(t.lm_head(hid), lib, rtol=1e-5, atol=1e-5)


def test_load_local_directory_round_trip(tmp_path):
    t = tiny_qwen3()
    t.model.save_pretrained(tmp_path / "m")
    loaded = Target.load(str(tmp_path / "m"), dtype="float32")
    ids = torch.tensor([[1, 4, 9]])
    torch.testing.assert_close(loaded.forward(ids).logits, t.forward(ids).logits)
    assert loaded.tokenizer is None  # weights only: token-level API still works
    # no dtype: "auto", as training and serving (bf16 only where its products are native)
    from dspark.target import fast_bf16

    assert Target.load(str(tmp_path / "m")).dtype == (torch.bfloat16 if fast_bf16() else torch.float32)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no/such-model'"):
        Target.load("no/such-model")
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        Target.load(str(tmp_path / "f.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Target.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype"):
        Target.load(str(tmp_path / "empty"), dtype="int8")


def _fake_cached_copy(path):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    files = {"model.safetensors": {"sha256": sha256_file(path / "model.safetensors"), "bytes": 700}}
    (path / embedded.MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}))


def test_corrupted_cached_copy_is_detected(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    path = embedded.embedded_cache_path()
    _fake_cached_copy(path)
    assert embedded.ensure_embedded() == path  # intact copy passes
    data = bytearray((path / "model.safetensors").read_bytes())
    data[10] ^= 0xFF  # same size, one flipped byte
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sha256.*Delete"):
        embedded.ensure_embedded()
    (path / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CorruptCacheError, match="bytes"):
        embedded.ensure_embedded()
    (path / embedded.MANIFEST).unlink()
    with pytest.raises(CorruptCacheError, match="incomplete"):
        embedded.ensure_embedded()


def test_atomic_dir_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise OSError("disk full")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "done.bin").write_bytes(b"x")
    assert (final / "done.bin").exists()
