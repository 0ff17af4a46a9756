"""Locating the repository's Hydra tree (conf/)."""

from __future__ import annotations

import os
from pathlib import Path


def conf_dir() -> str:
    """``$DSPARK_CONF_DIR``, else the repo's conf/ (editable install), else ./conf."""
    if env := os.environ.get("DSPARK_CONF_DIR"):
        return str(Path(env).resolve())
    here = Path(__file__).resolve()
    for cand in (here.parents[4] / "conf" if len(here.parents) > 4 else None, Path.cwd() / "conf"):
        if cand is not None and (cand / "config.yaml").exists():
            return str(cand)
    raise FileNotFoundError("cannot find the Hydra config tree conf/; set DSPARK_CONF_DIR")
