"""Drafter checkpoints in Hugging Face style: a directory with config.json (drafter
config, the target's identity and text config, STS temperatures) and model.safetensors
(trainable weights and the draft vocabulary; never the target's frozen embedding or LM
head). Written atomically: a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dspark.cache_dir import atomic_dir
from dspark.drafters.vocab import DraftVocab
from dspark.errors import DSparkError, ModelLoadError
from dspark.heads.calibration import STSCalibrator

FORMAT = 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def save_drafter(drafter: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise DSparkError(f"{path} already exists; refusing to overwrite a checkpoint")
    meta = {
        "dspark_format": FORMAT,
        "drafter_class": type(drafter).__name__,
        "drafter": drafter.cfg.to_dict(),
        "target_config": drafter.target_config.to_dict(),
        "calibration": drafter.calibrator.to_dict(),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise ModelLoadError(f"{path} is not a drafter checkpoint (needs {CONFIG} and {WEIGHTS})")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("dspark_format") != FORMAT:
        raise ModelLoadError(f"{path}: unsupported checkpoint format {meta.get('dspark_format')!r}")
    return meta


def load_drafter(path: str | Path, target: Any, cls: type | None = None) -> Any:
    """Rebuild a drafter from ``path`` and attach it to ``target`` (identity-checked)."""
    from transformers import AutoConfig

    from dspark.drafters.eagle3 import Eagle3Drafter
    from dspark.drafters.linked import DraftConfig
    from dspark.drafters.parallel import ParallelDrafter

    classes = {"ParallelDrafter": ParallelDrafter, "Eagle3Drafter": Eagle3Drafter}
    meta = read_config(path)
    if meta.get("drafter_class") not in classes:
        raise ModelLoadError(f"{path}: unknown drafter class {meta.get('drafter_class')!r}")
    tc = dict(meta["target_config"])
    target_config = AutoConfig.for_model(tc.pop("model_type"), **tc)
    cfg = DraftConfig(**meta["drafter"])
    state = load_file(str(Path(path) / WEIGHTS))
    vocab = DraftVocab(state["vocab.ids"], cfg.target_vocab_size)
    drafter = (cls or classes[meta["drafter_class"]])(cfg, target_config, vocab)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    drafter.calibrator = STSCalibrator.from_dict(meta.get("calibration", {}))
    drafter.attach(target)
    if cfg.target_name and cfg.target_name != target.name:
        raise ValueError(f"drafter at {path} was trained for target {cfg.target_name!r}, not {target.name!r}")
    return drafter.to(dtype=torch.float32).eval()
