"""Stage 2: on-policy responses. The drafter must learn the target's own distribution, so
answers are sampled from the target itself.

Sampling runs in static left-padded batches with a KV cache (one decoder call per new token
for the whole batch), the LM head as one ``W @ h.T`` product and exact inverse-CDF sampling
in fp32 with one uniform per row from that row's own generator. Row ``id`` is seeded with
``seed + hash(id)``, so a prompt's sample does not depend on where a previous run stopped
(batch composition can still change the last bits of a bf16 forward). Results are appended
to a JSONL file keyed by prompt id and fsync'ed after every batch, so an interrupted run
resumes where it stopped, whatever order results were written in; a torn last line is
ignored.

Each record keeps the generated token ids next to the text: decoding and re-encoding text
does not always give back the same ids, and the drafter should see exactly what the target
wrote.

``python -m train.regenerate`` makes a response file with a provenance sidecar
(``<file>.meta.json``: target fingerprint, sampling, seed, command, date); the pipeline
refuses a shipped file whose fingerprint does not match the target it trains against.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dspark.cache_dir import atomic_write_text
from dspark.errors import DSparkError

META_SUFFIX = ".meta.json"


class ResponsesError(DSparkError, ValueError):
    """A response file is unusable for this target or these prompts; the message says why."""


@dataclass
class Record:
    id: str
    response: str
    response_ids: list[int] | None = None
    finish: str = ""


def read_done(path: Path) -> dict[str, Record]:
    """id -> record already in ``path`` (a torn or malformed line is skipped)."""
    done: dict[str, Record] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
                ids = obj.get("response_ids")
                done[obj["id"]] = Record(obj["id"], obj["response"], [int(t) for t in ids] if ids is not None else None, obj.get("finish", ""))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def row_seed(seed: int, row_id: str) -> int:
    return seed + int(row_id, 16) % (2**31)


def target_fingerprint(target: Any) -> str:
    """A short id of the target's weights and tokenizer layout, the same whichever dtype it
    was loaded in (weights are rounded to bf16 before hashing)."""
    h = hashlib.sha256()
    h.update(json.dumps([target.vocab_size, target.hidden_size, target.num_layers]).encode())
    w = target.get_lm_head_weight()
    for rows in (w[:512], w[-512:]):
        h.update(rows.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    for name, p in target.model.named_parameters():
        if name.endswith("norm.weight"):
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def sample_batch(
    target: Any,
    prompts: Sequence[Sequence[int]],
    gens: Sequence[torch.Generator],
    max_new_tokens: int,
    temperature: float,
    stops: set[int],
) -> list[tuple[list[int], str]]:
    """Sample a continuation for every prompt in one left-padded batch.

    prompts: token id lists (any lengths); gens: one generator per prompt.
    Returns (new ids, "stop" | "length") per prompt. At temperature 0 it is greedy and equals
    plain incremental decoding (fp32). Exact: each token is drawn by inverse CDF from the
    full-vocabulary fp32 softmax.
    """
    from transformers import DynamicCache

    B = len(prompts)
    if B == 0:
        return []
    if len(gens) != B:
        raise ValueError(f"need one generator per prompt, got {len(gens)} for {B}")
    L = max(len(p) for p in prompts)
    dev = target.device
    ids = torch.zeros((B, L), dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(list(p))
        att[i, L - len(p) :] = 1
    pos = (att.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at position 0
    cache = DynamicCache(config=target.model.config)
    W = target.get_lm_head_weight()
    softcap = getattr(target.config, "final_logit_softcapping", None)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    cur_ids, cur_pos = ids, pos
    for _ in range(max_new_tokens):
        o = target.forward(cur_ids, cache, logits="none", final_hidden=True,
                           model_kwargs={"attention_mask": att.to(dev), "position_ids": cur_pos.to(dev)})
        h = o.final_hidden[:, -1]
        logits = (W @ h.T).T.float()  # [B, V]; this layout is the fast one on CPU for few rows
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
            u = torch.stack([torch.rand((), generator=g) for g in gens]).to(cdf.device)[:, None] * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(int(t))
                done[i] = int(t) in stops
        if all(done):
            break
        cur_ids, cur_pos = nxt[:, None].cpu(), cur_pos[:, -1:] + 1
        att = torch.cat([att, torch.ones((B, 1), dtype=torch.long)], 1)
    return [(o, "stop" if d else "length") for o, d in zip(out, done)]


def regenerate(
    target: Any,
    rows: Sequence[dict],
    out_path: str | Path,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> dict[str, Record]:
    """Sample a response for every row ({'id', 'turns'}) not yet in ``out_path``; rows are
    taken in the given order (batched by similar prompt length within a window).
    Returns id -> record for the rows that have one (all of them unless the time budget
    ran out first)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    todo = [r for r in rows if r["id"] not in done]
    stops = set(target.eos_token_ids)
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="responses", disable=not progress)
    new_tokens = 0
    with open(out_path, "a", encoding="utf-8") as f:
        if out_path.stat().st_size and not _ends_with_newline(out_path):
            f.write("\n")  # isolate a torn last line from the records appended after it
        window = batch_size * 4
        for w0 in range(0, len(todo), window):
            chunk = todo[w0 : w0 + window]
            enc = [(r, target.encode_prompt(r["turns"][0])) for r in chunk]
            enc.sort(key=lambda x: len(x[1]))  # similar lengths share a batch: less padding
            for b0 in range(0, len(enc), batch_size):
                if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                    bar.close()
                    return {r["id"]: done[r["id"]] for r in rows if r["id"] in done}
                batch = enc[b0 : b0 + batch_size]
                gens = [torch.Generator().manual_seed(row_seed(seed, r["id"])) for r, _ in batch]
                res = sample_batch(target, [p for _, p in batch], gens, max_new_tokens, temperature, stops)
                for (r, _), (ids, finish) in zip(batch, res):
                    rec = Record(r["id"], target.decode(ids), ids, finish)
                    done[r["id"]] = rec
                    new_tokens += len(ids)
                    f.write(json.dumps(rec.__dict__, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {r["id"]: done[r["id"]] for r in rows if r["id"] in done}


# ----------------------------------------------------------------------------- provenance
def write_meta(path: Path, meta: dict) -> None:
    atomic_write_text(Path(str(path) + META_SUFFIX), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


def load_shipped(path: str | Path, target: Any, temperature: float | None = None) -> tuple[dict[str, Record], dict]:
    """Read a response file made by ``python -m train.regenerate`` and check it belongs to
    ``target``. Raises :class:`ResponsesError` naming the mismatch."""
    path = Path(path)
    meta_path = Path(str(path) + META_SUFFIX)
    if not path.exists():
        raise ResponsesError(f"response file {path} not found")
    if not meta_path.exists():
        raise ResponsesError(f"response file {path} has no provenance file {meta_path.name}; "
                             "make it with `python -m train.regenerate` or use data.responses=regenerate")
    meta = json.loads(meta_path.read_text())
    fp = target_fingerprint(target)
    if meta.get("target_fingerprint") != fp:
        raise ResponsesError(
            f"response file {path} was sampled from target {meta.get('target')!r} (fingerprint "
            f"{meta.get('target_fingerprint')}), not from this target {target.name!r} (fingerprint {fp}): "
            "training on another model's outputs is off-policy. Use data.responses=regenerate for this target."
        )
    if temperature is not None and meta.get("temperature") != temperature:
        raise ResponsesError(f"response file {path} was sampled at T={meta.get('temperature')}, config asks for T={temperature}")
    return read_done(path), meta


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from dspark.target import Target
    from train.config import repo_path
    from train.data import interleave_domains, read_prompts

    ap = argparse.ArgumentParser(prog="python -m train.regenerate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32", help="dtype the target samples in (float32: exact on any CPU)")
    ap.add_argument("--prompts", default="data/train/prompts.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="number of prompts (domain-interleaved order)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--time-budget", type=float, default=None, help="stop cleanly after this many seconds (rerun resumes)")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    target = Target.load(a.target, dtype=a.dtype)
    prompts_path = repo_path(a.prompts)
    rows = interleave_domains(list(read_prompts(prompts_path)), salt=str(a.seed))
    if a.limit:
        rows = rows[: a.limit]
    out = repo_path(a.out)
    before = len(read_done(out))
    t0 = time.perf_counter()
    res = regenerate(target, rows, out, a.max_new_tokens, a.temperature, a.seed, a.batch_size, time_budget_s=a.time_budget)
    n_tok = sum(len(r.response_ids or []) for r in res.values())
    command = "python -m train.regenerate " + " ".join(sys.argv[1:] if argv is None else argv)
    meta_path = Path(str(out) + META_SUFFIX)
    history = json.loads(meta_path.read_text()).get("history", []) if meta_path.exists() else []
    history.append({"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "rows_added": len(res) - before, "seconds": round(time.perf_counter() - t0, 1)})
    meta = {
        "target": target.name,
        "target_fingerprint": target_fingerprint(target),
        "dtype": a.dtype,
        "temperature": a.temperature,
        "top_k": None,
        "top_p": None,
        "max_new_tokens": a.max_new_tokens,
        "seed": a.seed,
        "seeding": "row id seeded with seed + int(id, 16) % 2**31 (train.regenerate.row_seed)",
        "prompt_file": a.prompts,
        "prompt_file_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
        "order": "domains interleaved, each in a seeded hash order (train.data.interleave_domains)",
        "prompt_format": target.prompt_format.plain_template if not target.prompt_format.uses_chat_template(target.tokenizer) else "chat template",
        "rows": len(res),
        "response_tokens": n_tok,
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "history": history,  # every run that added rows (a rerun resumes per prompt id)
    }
    write_meta(out, meta)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    _main()
