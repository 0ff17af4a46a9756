"""``python -m train experiment=<target>_<drafter>``: the project's main job.

Stages: prompts -> on-policy responses -> target features -> Lightning distillation ->
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
    from train.data import DataError
    from train.pipeline import run
    from train.regenerate import ResponsesError

    try:
        run(cfg)
    except ConfigError as e:
        print(f"[train] config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DataError, ResponsesError) as e:  # bad input, not a bug: the message says what to fix
        print(f"[train] data error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
