"""Stage 2: responses. The drafter must learn the target's own distribution, so answers
are regenerated with the target (batched, seeded per prompt). Results are appended to a
JSONL file keyed by prompt id and fsync'ed, so an interrupted run resumes where it
stopped, whatever order results were written in; a torn last line is ignored."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig


def read_done(path: Path) -> dict[str, str]:
    """id -> response already in ``path`` (a torn or malformed trailing line is skipped)."""
    done: dict[str, str] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
                done[obj["id"]] = obj["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def regenerate(
    target: Any,
    rows: Sequence[dict],
    out_path: str | Path,
    cfg: GenerationConfig,
    batch_size: int = 8,
    drafter: Any = None,
    progress: bool = True,
) -> dict[str, str]:
    """Generate a response for every row ({'id', 'turns'}) not yet in ``out_path``.
    Row ``id`` is seeded with ``cfg.seed`` + a hash of the id, so results do not depend on
    batching or on where a previous run stopped. Returns id -> response for all rows."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    todo = [r for r in rows if r["id"] not in done]
    engine = SpeculativeEngine(target, drafter, num_draft=7 if drafter is not None else 0)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="responses", disable=not progress)
    with open(out_path, "a", encoding="utf-8") as f:
        if out_path.stat().st_size and not _ends_with_newline(out_path):
            f.write("\n")  # isolate a torn last line from the records appended after it
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            rids = [
                engine.add_request(target.encode_prompt(r["turns"][0]), cfg, None if cfg.seed is None else cfg.seed + int(r["id"], 16) % (2**31))
                for r in batch
            ]
            while engine.has_unfinished():
                engine.step()
            for r, rid in zip(batch, rids):
                text = target.decode(engine.pop_result(rid).tokens)
                done[r["id"]] = text
                f.write(json.dumps({"id": r["id"], "response": text}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return {r["id"]: done[r["id"]] for r in rows}
