"""``python -m train experiment=<target>_<drafter>``: the project's main job.

Today it resolves the config and loads the target; the training stages (responses,
feature cache, Lightning distillation, STS calibration, evaluation) land with issue #4.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from train.paths import conf_dir


def run(cfg: DictConfig) -> int:
    from dspark.prompts import PromptFormat
    from dspark.target import Target

    t = cfg.target
    fmt = PromptFormat(**OmegaConf.to_container(t.prompt_format, resolve=True))
    target = Target.load(t.path, dtype=t.dtype, prompt_format=fmt)
    print(
        f"[train] target {target.name} loaded: {target.num_layers} layers, hidden {target.hidden_size}, "
        f"vocab {target.vocab_size}, {target.dtype}."
    )
    print(
        f"[train] NOT YET IMPLEMENTED: training the '{cfg.drafter.name}' drafter lands with issue #4 "
        "(responses -> feature cache -> Lightning distillation -> STS -> evaluation). Nothing was trained.",
        file=sys.stderr,
    )
    return 2


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
