"""Stage 3: the offline target-feature cache ("cached target outputs" of the design card).

For every training example the target runs once; the outputs of the feature layers and
the final normed hidden state are stored per token, memory-mapped, in shards:

    <root>/<key>/shard-00000.bin    rows of (m+1)*d values, bf16 (or fp8 e4m3 + a scale per row and layer)
    <root>/<key>/shard-00000.json   which examples the shard holds; written after the .bin, so it commits it
    <root>/<key>/manifest.json      written last: sizes, bytes/token, where each example lives

``key`` hashes the target, its dtype, the feature layers, the storage type and the
examples' token ids, so every experiment with the same target and data (dspark, dflash,
eagle3) reads the same cache. A shard is written to a temporary file and renamed; its
.json is written only after that, and a reader only trusts shards whose .json and byte
size agree, so an interrupted or disk-full build never leaves a shard that is read
back: the next run rebuilds the missing shards and keeps the finished ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark.cache_dir import atomic_write_text
from dspark.errors import DSparkError

STORAGE = ("bfloat16", "float8_e4m3fn")
FP8_MAX = 448.0


class FeatureCacheError(DSparkError, RuntimeError):
    """The feature cache cannot be written or does not match what training asks for."""


def cache_key(target_id: str, dtype: str, layers: Sequence[int], storage: str, examples: Sequence[Any]) -> str:
    h = hashlib.sha256(json.dumps([target_id, dtype, list(layers), storage]).encode())
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _row_bytes(width: int, d: int, storage: str) -> int:
    return width * d * 2 if storage == "bfloat16" else width * d + 4 * width


def _plan(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous example ranges [a, b) of about ``shard_tokens`` tokens each."""
    out, a, n = [], 0, 0
    for i, L in enumerate(lengths):
        if n and n + L > shard_tokens:
            out.append((a, i))
            a, n = i, 0
        n += L
    out.append((a, len(lengths)))
    return out


def _encode(x: torch.Tensor, storage: str) -> bytes:
    """x [T, W, d] float -> the shard bytes of those T rows."""
    if storage == "bfloat16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [T, W, 1]
    q = (xf / scale).to(torch.float8_e4m3fn).contiguous().view(torch.uint8).numpy()  # [T, W, d]
    s = scale.squeeze(-1).contiguous().numpy().view(np.uint8)  # [T, W*4]
    return np.concatenate([q.reshape(q.shape[0], -1), s.reshape(s.shape[0], -1)], axis=1).tobytes()


def _write_shard(path: Path, chunks: list[bytes], expected: int) -> None:
    """Write a shard's bytes atomically; a full disk raises a clear error and leaves nothing."""
    free = shutil.disk_usage(path.parent).free
    if free < expected + (64 << 20):
        raise FeatureCacheError(
            f"not enough disk space for feature shard {path.name}: it needs {expected / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free in {path.parent}. Free space or set trainer.features=online."
        )
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        if tmp.stat().st_size != expected:
            raise FeatureCacheError(f"feature shard {path.name}: wrote {tmp.stat().st_size} bytes, expected {expected}")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise FeatureCacheError(
                f"disk full while writing feature shard {path.name} in {path.parent}; nothing of it was kept. "
                "Free space and rerun (finished shards are reused) or set trainer.features=online."
            ) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build(
    target: Any,
    examples: Sequence[Any],
    layers: Sequence[int],
    root: Path,
    storage: str = "bfloat16",
    shard_tokens: int = 1 << 15,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Compute (or finish computing) the cache for ``examples``; returns its directory."""
    if storage not in STORAGE:
        raise FeatureCacheError(f"trainer.feature_storage must be one of {STORAGE}, got {storage!r}")
    key = cache_key(target.name, str(target.dtype), layers, storage, examples)
    out = Path(root) / key
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    d, width = target.hidden_size, len(layers) + 1
    rb = _row_bytes(width, d, storage)
    lengths = [len(e.input_ids) for e in examples]
    plan = _plan(lengths, shard_tokens)
    where: list[list[int]] = [[0, 0, 0]] * len(examples)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(lengths), desc="target features", unit="tok")
    for s, (a, b) in enumerate(plan):
        bin_path, meta_path = out / f"shard-{s:05d}.bin", out / f"shard-{s:05d}.json"
        n_tok = sum(lengths[a:b])
        offs = np.cumsum([0, *lengths[a:b]])[:-1].tolist()
        for i, o in zip(range(a, b), offs):
            where[i] = [s, int(o), lengths[i]]
        if _shard_ok(bin_path, meta_path, key, a, b, n_tok * rb):
            if bar:
                bar.update(n_tok)
            continue
        meta_path.unlink(missing_ok=True)
        encoded: dict[int, bytes] = {}
        # batches of similar lengths: right padding to the longest row of a batch costs
        # ~23 % more tokens in example order on the default data, ~2 % sorted. A row does
        # not see its batch-mates (causal attention, padding after it), so only the float
        # rounding of differently shaped products can change with the order.
        order = sorted(range(a, b), key=lambda i: (lengths[i], i))
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            T = max(lengths[i] for i in idx)
            ids = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : lengths[i]] = torch.tensor(examples[i].input_ids)
            res = target.forward(ids, taps=list(layers), final_hidden=True, logits="none")
            stack = torch.stack([*(res.taps[L % target.num_layers] for L in layers), res.final_hidden], dim=2)  # [B, T, W, d]
            for r, i in enumerate(idx):
                encoded[i] = _encode(stack[r, : lengths[i]].cpu(), storage)
            if bar:
                bar.update(sum(lengths[i] for i in idx))
        _write_shard(bin_path, [encoded[i] for i in range(a, b)], n_tok * rb)
        atomic_write_text(meta_path, json.dumps({"key": key, "examples": [a, b], "tokens": n_tok, "bytes": n_tok * rb}))
    if bar:
        bar.close()
    total = sum(lengths)
    manifest = {
        "key": key, "target": target.name, "target_dtype": str(target.dtype), "layers": list(layers), "hidden": d,
        "storage": storage, "num_examples": len(examples), "num_tokens": total, "shards": len(plan),
        "bytes_per_token": rb, "bytes_total": total * rb,
        "published_bytes_per_token": 6 + 2 * width * d,
        "published_formula": "6 + 2(m+1)d (token id + loss mask + m feature layers and the final hidden, bf16); 6 + 12d at m = 5",
        "examples": where,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest))
    return out


def _shard_ok(bin_path: Path, meta_path: Path, key: str, a: int, b: int, nbytes: int) -> bool:
    if not (bin_path.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("key") == key and meta.get("examples") == [a, b] and bin_path.stat().st_size == nbytes == meta.get("bytes")


class FeatureCache:
    """Read side: ``cache[i]`` -> (feats [T, m*d], final hidden [T, d]) for example i."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        self.path = Path(path)
        mp = self.path / "manifest.json"
        if not mp.exists():
            raise FeatureCacheError(f"{self.path} has no manifest.json: the cache was never finished; rerun the features stage")
        self.m = json.loads(mp.read_text())
        self.dtype = dtype
        self.width, self.d, self.storage = len(self.m["layers"]) + 1, self.m["hidden"], self.m["storage"]
        rb = self.m["bytes_per_token"]
        self._maps = []
        for s in range(self.m["shards"]):
            p = self.path / f"shard-{s:05d}.bin"
            meta = self.path / f"shard-{s:05d}.json"
            if not (p.exists() and meta.exists()) or p.stat().st_size != json.loads(meta.read_text())["bytes"]:
                raise FeatureCacheError(f"feature shard {p} is missing or has the wrong size; delete {self.path} and rerun")
            self._maps.append(np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, rb))

    def __len__(self) -> int:
        return self.m["num_examples"]

    def check(self, examples: Sequence[Any]) -> None:
        if len(examples) != len(self):
            raise FeatureCacheError(f"feature cache {self.path} holds {len(self)} examples, training has {len(examples)}")
        for i, e in enumerate(examples):
            if self.m["examples"][i][2] != len(e.input_ids):
                raise FeatureCacheError(f"feature cache {self.path} does not match example {i} (length differs)")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, off, n = self.m["examples"][i]
        raw = np.array(self._maps[s][off : off + n])  # copy out of the map: [n, row bytes]
        W, d = self.width, self.d
        if self.storage == "bfloat16":
            x = torch.from_numpy(raw.view(np.int16).reshape(n, W, d)).view(torch.bfloat16)
        else:
            q = torch.from_numpy(raw[:, : W * d].copy()).view(torch.float8_e4m3fn).reshape(n, W, d).float()
            scale = torch.from_numpy(raw[:, W * d :].copy().view(np.float32).reshape(n, W, 1))
            x = q * scale
        x = x.to(self.dtype)
        return x[:, :-1].reshape(n, (W - 1) * d), x[:, -1]


# ---------------------------------------------------------------------------------------
# Truncated target distributions: the target's top-k log-probabilities per token, so that
# training never runs the 262k-row LM head (dspark.losses.truncated_terms).
#
#     <feature dir>/topk-<k>/shard-00000.bin   rows of k int32 ids + k fp32 log-probs
#     <feature dir>/topk-<k>/shard-00000.json  commits the shard (as for the features)
#     <feature dir>/topk-<k>/manifest.json     written last
#
# A row is filled only where training reads it: position t, whose hidden state predicts
# token t+1, when token t+1 is a loss token. Other rows hold id 0 with log-prob -inf.
# The rows come from the cached (storage-rounded) final hidden states, exactly what the
# exact path of training feeds the LM head.
#
# Conditioned on the draft vocabulary (<feature dir>/topk-<k>-vocab<K>-<digest>/, the
# default of the pipeline: trainer.target_topk_scope=draft_vocab): only the K rows of the
# head that the drafter can propose are computed (K/V of the cost: 16x less at 16k of
# 262k) and the log-probs are normalised over them. That distribution, p(x | x in vocab),
# is the one a drafter restricted to the vocabulary should match: it maximises the
# acceptance sum_x min(p(x), q(x)) over such drafters. What it drops is the size of the
# target's mass outside the vocabulary, so the acceptance labels of the confidence head
# read higher by at most that mass (~6 % on average at 16k); the held-out tau_est is still
# measured against the exact distribution.


def _topk_rows(target: Any, final: torch.Tensor, need: torch.Tensor, k: int, chunk: int,
               head: torch.Tensor | None = None, head_ids: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """final [n, d], need [n] bool -> ids [n, k] int32, log-probs [n, k] fp32.

    With ``head`` [K, d] (the target's LM-head rows of the draft vocabulary ``head_ids``
    [K]) the log-probabilities are over those K tokens only, i.e. the target's distribution
    conditioned on the draft vocabulary, and the ids are the target ids ``head_ids[j]``."""
    n = final.shape[0]
    ids = np.zeros((n, k), dtype=np.int32)
    logp = np.full((n, k), -np.inf, dtype=np.float32)
    rows = need.nonzero().flatten()
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        with torch.no_grad():
            h = final[r].to(target.dtype)
            if head is None:
                z = target.lm_head(h).float()
            else:
                z = target.softcap((h @ head.t()).float())
            # top-k of the logits, then one logsumexp: the same values as topk(log_softmax(z))
            # without writing a second [rows, V] tensor
            top = z.topk(k, -1)
            vals = top.values - torch.logsumexp(z, -1, keepdim=True)
            idx = top.indices if head_ids is None else head_ids[top.indices]
        ids[r.numpy()] = idx.to(torch.int32).numpy()
        logp[r.numpy()] = vals.numpy()
    return ids, logp


def vocab_digest(vocab_ids: torch.Tensor) -> str:
    """A short hash of a draft vocabulary's target ids (in draft order)."""
    return hashlib.sha256(torch.as_tensor(vocab_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:12]


def build_topk(target: Any, examples: Sequence[Any], features: "FeatureCache", k: int, chunk: int = 256, progress: bool = True,
               vocab_ids: torch.Tensor | None = None) -> Path:
    """Compute (or finish computing) the top-``k`` target log-probabilities for ``examples``
    next to their feature cache; returns the directory. Resumable per shard.

    ``vocab_ids`` (a draft vocabulary's target ids): the log-probabilities are those of the
    target's distribution conditioned on that vocabulary (only its K rows of the LM head
    are computed: K/V of the full head's cost), the k tokens its most likely ones. Without
    it: the full vocabulary."""
    if k < 1:
        raise FeatureCacheError(f"trainer.target_topk must be >= 1 to build a top-k cache, got {k}")
    features.check(examples)
    head = head_ids = digest = None
    if vocab_ids is None:
        k = min(int(k), int(target.vocab_size))
        out = features.path / f"topk-{k}"
        key = f"{features.m['key']}-topk{k}"
    else:
        head_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if head_ids.dim() != 1 or not len(head_ids) or int(head_ids.min()) < 0 or int(head_ids.max()) >= target.vocab_size:
            raise FeatureCacheError(f"vocab_ids must be a non-empty 1-D tensor of target ids in [0, {target.vocab_size})")
        k = min(int(k), len(head_ids))
        digest = vocab_digest(head_ids)
        out = features.path / f"topk-{k}-vocab{len(head_ids)}-{digest}"
        key = f"{features.m['key']}-topk{k}-vocab{digest}"
        head = target.get_lm_head_weight().detach()[head_ids].to(target.dtype).contiguous()
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rb = 8 * k
    where = features.m["examples"]
    shards: dict[int, list[int]] = {}
    for i, (s, _, _) in enumerate(where):
        shards.setdefault(s, []).append(i)
    need_rows = [int(sum(e.loss_mask[1:])) for e in examples]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(need_rows), desc=f"target top-{k}", unit="tok")
    for s, idx in sorted(shards.items()):
        bin_path, meta_path = out / f"shard-{s:05d}.bin", out / f"shard-{s:05d}.json"
        n_tok = sum(where[i][2] for i in idx)
        if _shard_ok(bin_path, meta_path, key, idx[0], idx[-1] + 1, n_tok * rb):
            if bar:
                bar.update(sum(need_rows[i] for i in idx))
            continue
        meta_path.unlink(missing_ok=True)
        chunks: list[bytes] = []
        for i in idx:
            _, final = features[i]
            mask = torch.tensor(examples[i].loss_mask, dtype=torch.bool)
            need = torch.zeros_like(mask)
            need[:-1] = mask[1:]
            ids, logp = _topk_rows(target, final, need, k, chunk, head, head_ids)
            chunks.append(np.concatenate([ids.view(np.uint8), logp.view(np.uint8)], axis=1).tobytes())
            if bar:
                bar.update(need_rows[i])
        _write_shard(bin_path, chunks, n_tok * rb)
        atomic_write_text(meta_path, json.dumps({"key": key, "examples": [idx[0], idx[-1] + 1], "tokens": n_tok, "bytes": n_tok * rb}))
    if bar:
        bar.close()
    atomic_write_text(out / "manifest.json", json.dumps({
        "key": key, "k": k, "features": features.m["key"], "bytes_per_token": rb, "shards": len(shards),
        "num_examples": len(examples), "rows_filled": sum(need_rows),
        "scope": "full" if head_ids is None else "draft_vocab",
        "vocab_size": int(target.vocab_size) if head_ids is None else len(head_ids),
        "vocab_digest": None if head_ids is None else digest,
    }))
    return out


class TopkCache:
    """Read side of :func:`build_topk`: ``cache[i]`` -> (ids [T, k] long, log-probs [T, k] fp32)."""

    def __init__(self, path: Path, features: "FeatureCache", vocab_ids: torch.Tensor | None = None) -> None:
        """``vocab_ids``: the draft vocabulary of the drafter that will read the cache; a cache
        conditioned on another vocabulary (``build_topk(vocab_ids=...)``) is refused."""
        self.path = Path(path)
        mp = self.path / "manifest.json"
        if not mp.exists():
            raise FeatureCacheError(f"{self.path} has no manifest.json: the top-k cache was never finished; rerun the features stage")
        self.m = json.loads(mp.read_text())
        if self.m["features"] != features.m["key"]:
            raise FeatureCacheError(f"top-k cache {self.path} belongs to features {self.m['features']}, not {features.m['key']}")
        if self.m.get("scope") == "draft_vocab":
            if vocab_ids is None or vocab_digest(vocab_ids) != self.m["vocab_digest"]:
                raise FeatureCacheError(
                    f"top-k cache {self.path} holds the target's distribution conditioned on draft vocabulary "
                    f"{self.m['vocab_digest']} ({self.m['vocab_size']} ids), not on "
                    f"{'the full vocabulary' if vocab_ids is None else vocab_digest(vocab_ids)}: build one for this vocabulary"
                )
        self.scope = self.m.get("scope", "full")
        self.k, self.where = self.m["k"], features.m["examples"]
        self._maps = {}
        for s in range(self.m["shards"]):
            p = self.path / f"shard-{s:05d}.bin"
            if not p.exists():
                raise FeatureCacheError(f"top-k shard {p} is missing; delete {self.path} and rerun")
            self._maps[s] = np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, 8 * self.k)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, off, n = self.where[i]
        raw = np.array(self._maps[s][off : off + n])
        k = self.k
        ids = torch.from_numpy(raw[:, : 4 * k].copy().view(np.int32)).long()
        logp = torch.from_numpy(raw[:, 4 * k :].copy().view(np.float32))
        return ids, logp
