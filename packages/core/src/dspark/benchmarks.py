"""The benchmark prompt files (data/eval/*.jsonl): one JSON object per line with ``turns``.

Evaluation follows the paper's protocol: first user turn only, in file order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dspark.errors import DSparkError

BENCHMARKS = ("gsm8k", "math500", "aime25", "mbpp", "humaneval", "livecodebench", "mt-bench", "arena-hard-v2")


def data_dir() -> Path:
    """``$DSPARK_DATA``, else the repository's data/ directory."""
    if env := os.environ.get("DSPARK_DATA"):
        return Path(env)
    return Path(__file__).resolve().parents[4] / "data"


def load_first_turns(name: str, n: int | None = None, start: int = 0, root: Path | None = None) -> list[str]:
    """First user turn of rows ``start .. start+n`` of benchmark ``name``."""
    path = (root or data_dir()) / "eval" / f"{name}.jsonl"
    if not path.exists():
        raise DSparkError(f"benchmark file {path} not found (known: {', '.join(BENCHMARKS)})")
    out: list[str] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= start or not line.strip():
                continue
            try:
                turns = json.loads(line)["turns"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DSparkError(f"{path}:{lineno}: not a JSON object with 'turns' ({e})") from e
            out.append(turns[0])
            if n is not None and len(out) >= n:
                break
    return out
