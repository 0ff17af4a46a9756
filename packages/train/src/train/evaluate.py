"""Stage 6: tau on the benchmark prompt files with the real decoding loop (batch 1, first
turn, seeded per prompt), per benchmark and temperature, with per-position conditional
acceptance. Same metric functions as core and serving (dspark.metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from dspark.benchmarks import load_first_turns
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig
from dspark.metrics import merge_all, per_position_counts
from dspark.sampling import SamplingParams


def evaluate(
    target: Any,
    drafter: Any,
    benchmarks: Sequence[str],
    prompts_per_benchmark: int,
    max_new_tokens: int,
    temperatures: Sequence[float],
    gamma: int,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 1,
    greedy_prompts_per_benchmark: int | None = None,
) -> dict[str, dict[str, dict]]:
    """{"T=<t>": {benchmark: {tau, tau_se, prompts, acceptance_rate, per_position, rounds,
    tokens_per_second, per_prompt, per_position_counts}},
    with a "macro" entry (mean tau over benchmarks) per temperature. ``batch_size`` requests
    decode together through the engine's continuous batching (tau is a per-request
    statistic; tokens_per_second is then a per-request rate inside a batch, not a batch-1 speed).
    ``greedy_prompts_per_benchmark``: the first prompts of each benchmark decoded at T = 0
    (default, or more than ``prompts_per_benchmark``: as many as at the other temperatures)."""
    engine = SpeculativeEngine(target, drafter, num_draft=gamma)
    out: dict[str, dict[str, dict]] = {}
    greedy = min(greedy_prompts_per_benchmark or prompts_per_benchmark, prompts_per_benchmark)
    counts = {t: greedy if t == 0 else prompts_per_benchmark for t in temperatures}
    prompts = {b: load_first_turns(b, max(counts.values())) for b in benchmarks}
    bar = tqdm(total=sum(counts[t] for t in temperatures) * len(benchmarks), desc="evaluate", disable=not progress)
    for temp in temperatures:
        jobs = [(b, i, text) for b in benchmarks for i, text in enumerate(prompts[b][: counts[temp]])]
        stats: dict[str, list] = {b: [] for b in benchmarks}
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temp))
        for c in range(0, len(jobs), max(1, batch_size)):
            chunk = jobs[c : c + max(1, batch_size)]
            # prompt i of a benchmark is seeded seed + i at every batch size; a request's
            # tokens and acceptance do not depend on its batchmates (per-request generators)
            rids = [engine.add_request(target.encode_prompt(text), cfg, seed=seed + i) for _, i, text in chunk]
            while any(engine.finish_reason(r) is None for r in rids):
                engine.step()
            for (b, _, _), r in zip(chunk, rids):
                stats[b].append(engine.pop_result(r).stats)
            bar.update(len(chunk))
        table: dict[str, dict] = {}
        for bench in benchmarks:
            s = merge_all(stats[bench])
            table[bench] = {
                "tau": s.tau,
                "tau_se": tau_standard_error(stats[bench]),
                "prompts": len(stats[bench]),
                "acceptance_rate": s.acceptance_rate,
                "per_position": s.per_position(gamma),
                "per_position_counts": per_position_counts(s.draft_lens, s.accepted, gamma),
                "rounds": s.rounds,
                "tokens_per_second": s.tokens_per_second,
                # [emitted, rounds] per prompt, in prompt order: lets train.compare pair two
                # runs prompt by prompt (the prompts are the same files and indices)
                "per_prompt": [[sum(a + 1 for a in st.accepted), len(st.accepted)] for st in stats[bench]],
            }
        ses = [v["tau_se"] for v in table.values()]
        macro_se = None if any(e is None for e in ses) else (sum(e * e for e in ses) ** 0.5) / len(benchmarks)
        table["macro"] = {"tau": sum(v["tau"] for v in table.values()) / len(benchmarks), "tau_se": macro_se}
        out[f"T={temp:g}"] = table
    bar.close()
    return out


def tau_standard_error(stats: Sequence[Any]) -> float | None:
    """Standard error of a benchmark's pooled tau = sum(accepted + 1) / rounds over its
    prompts, with the prompt as the sampling unit (the ratio estimator's linearisation:
    rounds within one generation are not independent). None with fewer than 2 prompts."""
    per = [(sum(a + 1 for a in st.accepted), len(st.accepted)) for st in stats if st.accepted]
    n = len(per)
    if n < 2:
        return None
    return (sum(d * d for d in tau_influence(per)) / (n * (n - 1))) ** 0.5


def tau_influence(pairs: Sequence[Sequence[int]]) -> list[float]:
    """Per-prompt linearised influence on a pooled tau = sum(emitted) / sum(rounds):
    (e_i - tau r_i) / mean(r); its mean is exactly zero."""
    emitted, rounds = sum(e for e, _ in pairs), sum(r for _, r in pairs)
    tau, rbar = emitted / rounds, rounds / len(pairs)
    return [(e - tau * r) / rbar for e, r in pairs]


def tau_markdown(results: dict[str, dict[str, dict]], name: str) -> str:
    temps = list(results)
    benches = [b for b in results[temps[0]] if b != "macro"]
    lines = ["| drafter | T | " + " | ".join(benches) + " | macro |", "|---|---|" + "---|" * (len(benches) + 1)]
    for t in temps:
        row = results[t]
        se = row["macro"].get("tau_se")
        macro = f"{row['macro']['tau']:.2f}" + (f" ± {se:.2f}" if se is not None else "")
        lines.append(f"| {name} | {t[2:]} | " + " | ".join(f"{row[b]['tau']:.2f}" for b in benches) + f" | {macro} |")
    return "\n".join(lines)
