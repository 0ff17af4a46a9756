"""``python -m train experiment=<target>_<drafter>``: the project's main job.

Stages: prompts -> responses -> target features (online) -> Lightning distillation ->
STS calibration -> evaluation, tracked in MLflow; see train/pipeline.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from train.config import ConfigError
from train.paths import conf_dir


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    from train.pipeline import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"[train] config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
