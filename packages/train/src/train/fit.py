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
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
    """Right-pad token ids (0) and loss masks (0) to the longest example."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    return {"input_ids": ids, "loss_mask": mask}


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
) -> Path:
    """Train for ``max_steps`` optimiser steps; resumes from ``out_dir/last.ckpt`` if an
    earlier run was interrupted. Returns the path of the last Lightning checkpoint."""
    L.seed_everything(seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        ExampleDataset(examples), batch_size=batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed), drop_last=len(examples) > batch_size,
    )
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_train_steps=ckpt_every, save_top_k=0)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        precision=precision,
        gradient_clip_val=grad_clip,
        callbacks=[ckpt],
        logger=logger,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(out_dir),
    )
    last = out_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    trainer.save_checkpoint(str(last))
    return last
