"""Stage 1 of training: prompts -> tokenised examples with an assistant-only loss mask.

Prompt files are JSONL, one object per line with ``turns`` (user messages) and optionally
``reference`` (the dataset's own answer), ``domain``, ``source``. Every row gets a stable
id from its content, so splits and resumable stages do not depend on line order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark.errors import DSparkError


class DataError(DSparkError, ValueError):
    """A prompt file or an example is unusable; the message names the file and line."""


@dataclass(frozen=True)
class PromptRow:
    id: str
    turns: list[str]
    reference: str | None = None
    domain: str = ""


def row_id(turns: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(turns), ensure_ascii=False).encode()).hexdigest()[:16]


def read_prompts(path: str | Path, limit: int | None = None):
    """Parse a JSONL prompt file into a ``datasets.Dataset`` (columns id, turns, reference,
    domain). A malformed line fails with its line number; duplicate prompts are dropped."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"prompt file {path} not found")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            turns = obj.get("turns") if isinstance(obj, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise DataError(f"{path}:{lineno}: expected an object with 'turns', a non-empty list of non-empty strings")
            ref = obj.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise DataError(f"{path}:{lineno}: 'reference' must be a string")
            rid = row_id(turns)
            if rid in seen:
                continue
            seen.add(rid)
            rows.append({"id": rid, "turns": turns, "reference": ref, "domain": str(obj.get("domain", ""))})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"prompt file {path} has no rows")
    return datasets.Dataset.from_list(rows)


def split_heldout(ds, fraction: float, salt: str = "heldout"):
    """Deterministic split by row id: (train, heldout). The held-out part feeds STS
    calibration; the same id always lands on the same side."""
    if not 0 <= fraction < 1:
        raise DataError(f"heldout fraction must be in [0, 1), got {fraction}")

    def is_heldout(ex: dict) -> bool:
        h = int(hashlib.sha256(f"{salt}:{ex['id']}".encode()).hexdigest()[:8], 16)
        return h % 10_000 < fraction * 10_000

    return ds.filter(lambda ex: not is_heldout(ex)), ds.filter(is_heldout)


def interleave_domains(rows: Sequence[dict], salt: str = "0") -> list[dict]:
    """A deterministic order in which every prefix mixes the domains: each domain's rows in
    a seeded hash order, then taken round-robin (math, code, chat, math, ...). The prompt
    file is sorted by domain, so its first N lines would be all math."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(str(r.get("domain", "")), []).append(r)
    for d in by.values():
        d.sort(key=lambda r: hashlib.sha256(f"{salt}:{r['id']}".encode()).hexdigest())
    out: list[dict] = []
    queues = [by[k] for k in sorted(by)]
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


@dataclass
class Example:
    id: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant (response) tokens only


def build_example(
    target: Any, row_id_: str, turns: Sequence[str], response: str, max_length: int, response_ids: Sequence[int] | None = None
) -> Example | None:
    """First user turn (chat template or plain template) + response + EOS, truncated to
    max_length. ``response_ids`` (what the target sampled, ending in its own stop token when
    it stopped) are used as they are instead of re-encoding the text. None when truncation
    leaves no response token."""
    prompt = target.encode_prompt(turns[0])
    if response_ids is not None:
        resp = [int(t) for t in response_ids]
    else:
        resp = target.tokenizer(response, add_special_tokens=False)["input_ids"] + target.eos_token_ids[:1]
    ids = (prompt + resp)[:max_length]
    mask = ([0] * len(prompt) + [1] * len(resp))[:max_length]
    if sum(mask) == 0:
        return None
    return Example(row_id_, ids, mask)


def check_loss_masks(examples: Iterable[Example]) -> tuple[int, int]:
    """Fail loudly if the loss mask is all ones or all zeros over the whole set (a broken
    template or response join); returns (supervised tokens, total tokens)."""
    sup = tot = 0
    for ex in examples:
        sup += sum(ex.loss_mask)
        tot += len(ex.loss_mask)
    if tot == 0 or sup == 0:
        raise DataError("loss mask is all zeros: no assistant token to learn from (check the prompt template / responses)")
    if sup == tot:
        raise DataError("loss mask is all ones: prompts are being trained on (check the prompt template)")
    return sup, tot
