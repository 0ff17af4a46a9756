"""Config validation at start: a bad key or value fails with a message naming it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from train.paths import conf_dir


class ConfigError(ValueError):
    pass


def repo_path(p: str | Path) -> Path:
    """Relative paths resolve against the repository root (the parent of conf/)."""
    p = Path(p)
    return p if p.is_absolute() else Path(conf_dir()).parent / p


def _need(cfg: DictConfig, key: str) -> object:
    try:
        val = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        val = None
    if val is None:
        raise ConfigError(f"config value {key} is required (e.g. {key}=...)")
    return val


def validate(cfg: DictConfig) -> None:
    for key in ("target.path", "target.dtype", "drafter.name", "data.train_file", "trainer.max_steps"):
        _need(cfg, key)
    init = str(cfg.drafter.get("init", "random"))
    checks = [
        ("target.dtype", cfg.target.dtype in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32"),
        ("drafter.name", cfg.drafter.name in ("dspark", "dflash", "eagle3", "ngram"), "dspark, dflash, eagle3 or ngram"),
        ("drafter.gamma", int(cfg.drafter.gamma) >= 1, ">= 1"),
        ("drafter.draft_vocab_size", int(cfg.drafter.get("draft_vocab_size", 0)) >= 0, ">= 0"),
        ("drafter.init", init == "random" or (init == "target" and cfg.drafter.name in ("dspark", "dflash")),
         "random or target (target: dspark and dflash drafters only)"),
        ("data.responses", cfg.data.responses in ("onpolicy", "regenerate", "reference"), "onpolicy, regenerate or reference"),
        ("data.heldout_fraction", 0 <= float(cfg.data.heldout_fraction) < 1, "in [0, 1)"),
        ("data.max_length", int(cfg.data.max_length) >= 8, ">= 8"),
        ("trainer.max_steps", int(cfg.trainer.max_steps) >= 1, ">= 1"),
        ("trainer.batch_size", int(cfg.trainer.batch_size) >= 1, ">= 1"),
        ("trainer.lr", float(cfg.trainer.lr) > 0, "> 0"),
        ("trainer.features", cfg.trainer.features in ("offline", "online"), "offline or online"),
        ("trainer.feature_storage", cfg.trainer.get("feature_storage", "bfloat16") in ("bfloat16", "float8_e4m3fn"), "bfloat16 or float8_e4m3fn"),
        ("trainer.target_topk", int(cfg.trainer.get("target_topk", 0)) >= 0, ">= 0 (0: the exact target distribution)"),
        ("trainer.target_topk_scope", cfg.trainer.get("target_topk_scope", "full") in ("draft_vocab", "full"), "draft_vocab or full"),
        ("eval.temperatures", all(float(t) >= 0 for t in cfg.eval.temperatures), ">= 0"),
        ("eval.ngram_fallback", int(cfg.eval.get("ngram_fallback", 0) or 0) >= 0, ">= 0 (0: off)"),
    ]
    tr = cfg.trainer
    devices, strategy = tr.get("devices", 1), str(tr.get("strategy", "auto"))
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    # -1 / "auto": every device there is; a list: those device ids
    several = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1) or (
        not isinstance(devices, (int, str)) and len(list(devices)) > 1)
    nodes = int(tr.get("num_nodes", 1))
    _rank, world = launched_rank()
    in_fit = strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook")
    if world > 1:
        # torchrun / SLURM started this command `world` times: each process is one Lightning
        # process; rank 0 prepares, the others join the fit (pipeline._follow)
        per_node = devices if isinstance(devices, int) and devices > 0 else None
        checks += [
            ("trainer.strategy", not in_fit and strategy != "auto",
             f"a strategy that joins an already launched process group (ddp, fsdp, ...), not {strategy!r}: "
             f"this command was started {world} times by a launcher"),
            ("trainer.devices", per_node is None or per_node * nodes == world,
             f"devices x num_nodes = {world}, the number of processes the launcher started"),
        ]
    else:
        checks += [
            ("trainer.num_nodes", nodes == 1,
             "1 for a single command; for several machines start it on every node with torchrun or srun "
             "(docs/scaling.md), which sets WORLD_SIZE / SLURM_NTASKS"),
            ("trainer.strategy", not several or in_fit,
             "ddp_spawn or ddp_fork with several devices in one command ('ddp' and 'fsdp' expect a launcher such as "
             "torchrun to start the command once per process)"),
        ]
    for key, ok, want in checks:
        if not ok:
            raise ConfigError(f"config value {key}={OmegaConf.select(cfg, key)!r} is invalid: expected {want}")
    if not repo_path(cfg.data.train_file).exists():
        raise ConfigError(f"data.train_file: {repo_path(cfg.data.train_file)} not found")


def launched_rank() -> tuple[int, int]:
    """(rank, world size) when an external launcher started this command in several
    processes (torchrun: RANK / WORLD_SIZE; SLURM: SLURM_PROCID / SLURM_NTASKS); (0, 1) otherwise."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if int(os.environ.get(world, "1") or 1) > 1:
            return int(os.environ.get(rank, "0") or 0), int(os.environ[world])
    return 0, 1
