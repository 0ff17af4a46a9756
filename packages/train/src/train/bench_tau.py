"""Teacher-forced tau_est on the benchmarks' prompts, paired across drafters.

Decoded tau (train.evaluate) is what a user gets, but it is noisy: which text the target
samples changes from run to run, and a prompt's tau moves with it (docs/results.md: the
per-prompt tau of one drafter under two seeds correlates ~0). This module removes that
part of the noise from drafter comparisons. The target samples one continuation per
benchmark prompt once (T = 1, seeded per prompt, no drafter: the target's own output
distribution) and keeps it on disk, shared by every experiment on that target. Each drafter
is then scored teacher-forced on the same token sequences, at every response position, with
the estimate training logs (``tau_est``: 1 + sum_k prod_{j<=k} a_j, a_j the mean acceptance
probability of draft slot j, 1 - TV between the target's and the drafter's distributions
at T = 1). Two drafters see identical text and anchors, so their per-prompt values are
paired and a small difference between them is readable.

It is an estimate of decoded tau, not a measurement of it: on held-out training prompts the
two agreed within their noise (1.353 teacher-forced vs 1.334 decoded, docs/results.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspark.benchmarks import load_first_turns
from dspark.cache_dir import atomic_write_text


def continuations_key(fingerprint: str, prompts: dict[str, list[str]], max_new_tokens: int, seed: int) -> str:
    h = hashlib.sha256(json.dumps([fingerprint, prompts, max_new_tokens, seed], sort_keys=True).encode())
    return h.hexdigest()[:16]


def target_continuations(
    target: Any,
    benchmarks: Sequence[str],
    prompts_per_benchmark: int,
    max_new_tokens: int,
    cache_dir: Path,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    fingerprint: str | None = None,
) -> dict[str, list[dict]]:
    """{benchmark: [{"prompt_ids", "response_ids", "finish"}, ...]}: the target's own T = 1
    continuation of each of the first ``prompts_per_benchmark`` prompts (prompt i seeded
    ``seed + i``, as train.evaluate seeds it). Sampled once and kept in ``cache_dir``
    (written whole, then renamed), keyed by the target's weights, the prompts, the length
    and the seed; not by the dtype the target runs in (fp32 and bf16 sample slightly
    different text, both the target's own: the file's meta records which)."""
    from dspark.engine import SpeculativeEngine
    from dspark.generate import GenerationConfig
    from dspark.sampling import SamplingParams
    from train.regenerate import target_fingerprint

    if prompts_per_benchmark < 1:
        raise ValueError(f"prompts_per_benchmark must be >= 1, got {prompts_per_benchmark}")
    texts = {b: load_first_turns(b, prompts_per_benchmark) for b in benchmarks}
    fp = fingerprint or target_fingerprint(target)
    path = Path(cache_dir) / f"{continuations_key(fp, texts, max_new_tokens, seed)}.json"
    if path.exists():
        return json.loads(path.read_text())["continuations"]
    engine = SpeculativeEngine(target, None, num_draft=1)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=1.0))
    jobs = [(b, i, target.encode_prompt(t)) for b in benchmarks for i, t in enumerate(texts[b])]
    out: dict[str, list[dict]] = {b: [] for b in benchmarks}
    bar = tqdm(total=len(jobs), desc="benchmark continuations", disable=not progress)
    for c in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[c : c + max(1, batch_size)]
        rids = [engine.add_request(ids, cfg, seed=seed + i) for _, i, ids in chunk]
        while any(engine.finish_reason(r) is None for r in rids):
            engine.step()
        for (b, _, ids), r in zip(chunk, rids):
            res = engine.pop_result(r)
            out[b].append({"prompt_ids": list(ids), "response_ids": list(res.tokens), "finish": res.finish_reason})
        bar.update(len(chunk))
    bar.close()
    meta = {"target_fingerprint": fp, "target_dtype": str(target.dtype), "benchmarks": list(benchmarks),
            "prompts_per_benchmark": prompts_per_benchmark, "max_new_tokens": max_new_tokens, "seed": seed, "temperature": 1.0}
    atomic_write_text(path, json.dumps({"meta": meta, "continuations": out}))
    return out


def bench_tau_est(target: Any, drafter: Any, kind: str, continuations: dict[str, list[dict]], seed: int = 0,
                  progress: bool = True) -> dict[str, dict]:
    """{benchmark: {"tau_est", "se", "per_prompt"}, "macro": {"tau_est", "se"}}: the
    teacher-forced tau_est of ``drafter`` on each continuation, every response position an
    anchor, exact target distributions (the target's LM head). A benchmark's value is the
    mean over its prompts, its ``se`` their standard error; the macro's is the mean over
    benchmarks. Deterministic for a given drafter and continuations."""
    import torch

    from train.data import Example
    from train.fit import collate
    from train.module import DistillModule

    if not continuations:
        raise ValueError("bench_tau_est needs continuations for at least one benchmark")
    was = next(drafter.parameters()).dtype
    drafter = drafter.float()
    longest = max(len(c["response_ids"]) for cs in continuations.values() for c in cs)
    # Eagle3's unroll over gamma steps: the drafts a round verifies (training may unroll more)
    module = DistillModule(drafter, target, kind, anchors_per_seq=max(longest, 1), ttt_steps=drafter.cfg.gamma, seed=seed)
    result: dict[str, dict] = {}
    bar = tqdm(total=sum(len(v) for v in continuations.values()), desc="benchmark tau_est", disable=not progress)
    try:
        with torch.no_grad():
            for bench, conts in continuations.items():
                vals = []
                for c in conts:
                    p, r = list(c["prompt_ids"]), list(c["response_ids"])
                    bar.update(1)
                    if len(r) < 2:
                        continue  # no anchor: an anchor needs a response token after it
                    batch = collate([Example(f"{bench}", p + r, [0] * len(p) + [1] * len(r))])
                    o = module.ttt_loss(batch) if kind == "eagle3" else module.block_loss(batch)
                    vals.append(float(o["tau_est"]))
                n = len(vals)
                mean = sum(vals) / n if n else float("nan")
                se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n * (n - 1))) if n > 1 else None
                result[bench] = {"tau_est": mean, "se": se, "per_prompt": vals}
    finally:
        bar.close()
        drafter.to(was)
    benches = list(continuations)
    ses = [result[b]["se"] for b in benches]
    result["macro"] = {
        "tau_est": sum(result[b]["tau_est"] for b in benches) / len(benches),
        "se": None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses)) / len(benches),
    }
    return result


def paired_difference(a: dict, b: dict, benches: Sequence[str]) -> tuple[float, float | None]:
    """macro(a) - macro(b) and its standard error, paired prompt by prompt (both scored on
    the same continuations). The error is None where a benchmark's per-prompt lists differ
    in length or hold fewer than 2 prompts."""
    diff = a["macro"]["tau_est"] - b["macro"]["tau_est"]
    var = 0.0
    for bench in benches:
        pa, pb = a.get(bench, {}).get("per_prompt"), b.get(bench, {}).get("per_prompt")
        if not pa or not pb or len(pa) != len(pb) or len(pa) < 2:
            return diff, None
        d = [x - y for x, y in zip(pa, pb)]
        m = sum(d) / len(d)
        var += sum((x - m) ** 2 for x in d) / (len(d) * (len(d) - 1))
    return diff, math.sqrt(var) / len(benches)
