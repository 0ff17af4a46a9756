"""Stage 4: the Lightning fit, resumable from the last checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

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
            return i, self.examples[i]
        return i, (self.examples[i], *self.cache[i], *(self.topk[i] if self.topk is not None else ()))


def _dist() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchSampler(Sampler[list[int]]):
    """The data order as a pure function of (seed, optimiser step), the same for any number
    of processes: step s of epoch e = s // per_epoch takes the k-th slice of ``global_batch``
    indices of that epoch's permutation (drop_last when the data holds more than one batch),
    and each rank takes its share of that slice. One process with batch B and W processes
    with B / W each therefore see the same examples at every step, and a run resumed at
    step ``start`` continues exactly where the interrupted one stopped (no dataloader state
    needed: the step is in the checkpoint). Rank and world size are read when iterating, so
    a sampler built before processes are spawned serves each of them."""

    def __init__(self, n: int, global_batch: int, total_steps: int, seed: int = 0, start: int = 0) -> None:
        if n < 1:
            raise ValueError("no training examples")
        if global_batch < 1 or total_steps < 1:
            raise ValueError(f"global batch ({global_batch}) and steps ({total_steps}) must be >= 1")
        self.n, self.B, self.total, self.seed, self.start = n, global_batch, total_steps, seed, start
        self.per_epoch = max(1, n // global_batch)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        e, k = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        glob = perm[k * self.B : (k + 1) * self.B]
        if len(glob) < world:
            raise ValueError(f"a global batch of {len(glob)} examples cannot be split over {world} processes")
        return glob.tensor_split(world)[rank].tolist()

    def __iter__(self):
        rank, world = _dist()
        for step in range(self.start, self.total):
            yield self.batch(step, rank, world)

    def __len__(self) -> int:
        # the whole run is one epoch of total_steps batches: a resumed run's loop counts its
        # restored batches against this length and stops at max_steps with the iterator
        return self.total


class StepLoader(DataLoader):
    """A DataLoader whose position lives in the optimiser step (GlobalBatchSampler), so
    resuming mid-epoch is exact; its state records the order's parameters and refuses a
    checkpoint written with another order."""

    def state_dict(self) -> dict[str, Any]:
        bs = self.batch_sampler
        return {"order": "global-step", "seed": bs.seed, "global_batch": bs.B, "examples": bs.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state and state != mine:
            raise ValueError(f"the checkpoint was written with data order {state}, this run uses {mine}")


def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
    """Right-pad token ids (0), loss masks (0) and cached features (0) to the longest example.
    Items may come as (dataset index, item): the indices go to ``batch["index"]`` (they seed
    per-example randomness, so it does not depend on how a batch is split over processes)."""
    index = None
    if batch and isinstance(batch[0], tuple) and len(batch[0]) == 2 and isinstance(batch[0][0], int):
        index = torch.tensor([b[0] for b in batch], dtype=torch.long)
        batch = [b[1] for b in batch]
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
    if index is not None:
        out["index"] = index
    return out


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16-mixed where bf16 is native, else 32-true; anything else as given."""
    if precision != "auto":
        return precision
    from dspark.target import fast_bf16

    return "bf16-mixed" if fast_bf16("cuda" if torch.cuda.is_available() else "cpu") else "32-true"


class _SaveLastOnEnd(L.Callback):
    """Write ``last.ckpt`` when training ends, inside the training processes (with spawned
    processes the launching one holds no usable trainer afterwards)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path))


def _checkpoint_step(path: Path) -> int:
    """The optimiser step a Lightning checkpoint was written at (0 when there is none)."""
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])



def _launched_rank() -> int:
    """This process's rank when torchrun / SLURM started the command several times, else 0."""
    from train.config import launched_rank

    return launched_rank()[0]


def claim_run_dir(out_dir: Path, run_key: str) -> None:
    """Make ``out_dir`` belong to ``run_key``: checkpoints of another configuration (other
    data, steps or settings) are deleted, never resumed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / "run_key.txt"
    old = stamp.read_text().strip() if stamp.exists() else None
    if old != run_key:
        stale = list(out_dir.glob("*.ckpt"))
        if stale:
            print(f"[train] fit: {len(stale)} checkpoint(s) in {out_dir} belong to another configuration "
                  f"({old or 'unknown'}); starting from scratch", flush=True)
        for f in stale:
            f.unlink(missing_ok=True)
        from dspark.cache_dir import atomic_write_text

        atomic_write_text(stamp, run_key + "\n")


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
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> Path:
    """Train for ``max_steps`` optimiser steps; resumes from ``out_dir/last.ckpt`` if an
    earlier run was interrupted. ``features``: a :class:`train.features.FeatureCache`
    (offline mode) or None (the module runs the target in the step); ``topk``: a
    :class:`train.features.TopkCache` (truncated targets, no LM head in the step). Returns the path of
    the last Lightning checkpoint. ``run_key`` names the configuration being trained: a
    checkpoint left by a run with another key (other data, steps or settings) is deleted,
    never resumed.

    ``batch_size`` is the global batch: with ``devices`` x ``num_nodes`` processes (any
    Lightning ``strategy``: ddp, ddp_spawn, fsdp, ...) each takes its share of every global
    batch (GlobalBatchSampler), and the module normalises its loss over the global batch, so
    N processes train the same drafter as one, up to float summation order."""
    L.seed_everything(seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_key is not None and _launched_rank() == 0:  # other ranks of a launched run: rank 0 claimed it
        claim_run_dir(out_dir, run_key)
    last = out_dir / "last.ckpt"
    start = min(_checkpoint_step(last), max_steps)
    sampler = GlobalBatchSampler(len(examples), batch_size, max_steps, seed=seed, start=start)
    loader = StepLoader(ExampleDataset(examples, features, topk), batch_sampler=sampler, collate_fn=collate)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_train_steps=ckpt_every, save_top_k=0)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        use_distributed_sampler=False,  # GlobalBatchSampler splits each global batch by rank itself
        precision=resolve_precision(precision),
        gradient_clip_val=grad_clip,
        callbacks=[ckpt, _SaveLastOnEnd(last)],
        logger=logger,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(log_every, max_steps)),  # a short run still logs
        default_root_dir=str(out_dir),
    )
    world = trainer.num_devices * trainer.num_nodes
    if world > 1 and rank_zero_only.rank == 0:
        share = [len(x) for x in torch.arange(min(batch_size, len(examples))).tensor_split(world)]
        print(f"[train] fit: {world} processes ({trainer.num_nodes} node(s) x {trainer.num_devices} device(s), "
              f"strategy {strategy}); global batch {batch_size} -> per-process {share}", flush=True)
    if start:
        print(f"[train] fit: resuming at step {start} of {max_steps} from {last}", flush=True)
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    if torch.distributed.is_initialized():
        # a launched run (torchrun / SLURM): the group ends with the fit; rank 0 runs the later
        # stages alone and the module's loss must not wait for peers there
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if world > 1:
        # spawned or forked workers trained copies: this process's module takes the weights they saved
        module.load_state_dict(torch.load(last, map_location="cpu", weights_only=False)["state_dict"])
    return last
