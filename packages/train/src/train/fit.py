"""Stage 4: the Lightning fit, resumable from the last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from train.data import Example
from train.module import DistillModule


class ExampleDataset(Dataset):
    """Examples, with their cached target features when a FeatureCache is given, and the
    target's cached top-k log-probabilities when a TopkCache is given too."""

    def __init__(self, examples: list[Example], cache: Any = None, topk: Any = None) -> None:
        self.examples, self.cache, self.topk = examples, cache, topk
        if cache is not None:
            cache.check(examples)
        if topk is not None and cache is None:
            raise ValueError("a top-k cache needs the feature cache it was built from")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        if self.cache is None:
            return self.examples[i]
        return (self.examples[i], *self.cache[i], *(self.topk[i] if self.topk is not None else ()))


def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
    """Right-pad token ids (0), loss masks (0) and cached features (0) to the longest example."""
    cached = isinstance(batch[0], tuple)
    exs = [b[0] for b in batch] if cached else batch
    T = max(len(e.input_ids) for e in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    mask = torch.zeros(len(exs), T, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    out = {"input_ids": ids, "loss_mask": mask}
    if cached:
        f0, h0 = batch[0][1], batch[0][2]
        feats = f0.new_zeros((len(exs), T, f0.shape[-1]))
        final = h0.new_zeros((len(exs), T, h0.shape[-1]))
        for i, (_, f, h, *_) in enumerate(batch):
            feats[i, : f.shape[0]] = f
            final[i, : h.shape[0]] = h
        out.update(feats=feats, final=final)
        if len(batch[0]) == 5:  # top-k ids and log-probs: padding rows hold id 0 with log-prob -inf
            k = batch[0][3].shape[-1]
            top_ids = torch.zeros(len(exs), T, k, dtype=torch.long)
            top_logp = torch.full((len(exs), T, k), -torch.inf)
            for i, b in enumerate(batch):
                top_ids[i, : b[3].shape[0]] = b[3]
                top_logp[i, : b[4].shape[0]] = b[4]
            out.update(top_ids=top_ids, top_logp=top_logp)
    return out


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16-mixed where bf16 is native, else 32-true; anything else as given."""
    if precision != "auto":
        return precision
    from dspark.target import fast_bf16

    return "bf16-mixed" if fast_bf16("cuda" if torch.cuda.is_available() else "cpu") else "32-true"


def fit(
    module: DistillModule,
    examples: list[Example],
    out_dir: Path,
    max_steps: int,
    batch_size: int,
    precision: str = "32-true",
    grad_clip: float = 1.0,
    ckpt_every: int = 50,
    logger: Any = False,
    seed: int = 0,
    progress: bool = True,
    features: Any = None,
    topk: Any = None,
    run_key: str | None = None,
    log_every: int = 10,
) -> Path:
    """Train for ``max_steps`` optimiser steps; resumes from ``out_dir/last.ckpt`` if an
    earlier run was interrupted. ``features``: a :class:`train.features.FeatureCache`
    (offline mode) or None (the module runs the target in the step); ``topk``: a
    :class:`train.features.TopkCache` (truncated targets, no LM head in the step). Returns the path of
    the last Lightning checkpoint. ``run_key`` names the configuration being trained: a
    checkpoint left by a run with another key (other data, steps or settings) is deleted,
    never resumed."""
    L.seed_everything(seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_key is not None:
        stamp = out_dir / "run_key.txt"
        old = stamp.read_text().strip() if stamp.exists() else None
        if old != run_key:
            stale = list(out_dir.glob("*.ckpt"))
            if stale:
                print(f"[train] fit: {len(stale)} checkpoint(s) in {out_dir} belong to another configuration "
                      f"({old or 'unknown'}); starting from scratch", flush=True)
            for f in stale:
                f.unlink()
            from dspark.cache_dir import atomic_write_text

            atomic_write_text(stamp, run_key + "\n")
    loader = DataLoader(
        ExampleDataset(examples, features, topk), batch_size=batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed), drop_last=len(examples) > batch_size,
    )
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_train_steps=ckpt_every, save_top_k=0)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        precision=resolve_precision(precision),
        gradient_clip_val=grad_clip,
        callbacks=[ckpt],
        logger=logger,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(log_every, max_steps)),  # a short run still logs
        default_root_dir=str(out_dir),
    )
    last = out_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    trainer.save_checkpoint(str(last))
    return last
