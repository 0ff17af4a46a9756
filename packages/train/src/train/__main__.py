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


def execute(cfg: DictConfig) -> int:
    """Run the pipeline on a composed config: 0 on success; bad config or input prints what to
    fix on stderr (no traceback) and returns 2. ``main`` is this behind Hydra's command line;
    the tests call it in process."""
    from train.data import DataError
    from train.pipeline import run
    from train.regenerate import ResponsesError

    try:
        run(cfg)
    except ConfigError as e:
        print(f"[train] config error: {e}", file=sys.stderr)
        return 2
    except (DataError, ResponsesError) as e:  # bad input, not a bug: the message says what to fix
        print(f"[train] data error: {e}", file=sys.stderr)
        return 2
    return 0


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    code = execute(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
