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
from dspark.metrics import merge_all
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
) -> dict[str, dict[str, dict]]:
    """{"T=<t>": {benchmark: {tau, acceptance_rate, per_position, rounds, tokens_per_second}},
    with a "macro" entry (mean tau over benchmarks) per temperature."""
    engine = SpeculativeEngine(target, drafter, num_draft=gamma)
    out: dict[str, dict[str, dict]] = {}
    jobs = [(t, b) for t in temperatures for b in benchmarks]
    bar = tqdm(total=len(jobs) * prompts_per_benchmark, desc="evaluate", disable=not progress)
    for temp in temperatures:
        table: dict[str, dict] = {}
        for bench in benchmarks:
            stats = []
            for i, text in enumerate(load_first_turns(bench, prompts_per_benchmark)):
                cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temp), seed=seed + i)
                stats.append(engine.generate([target.encode_prompt(text)], cfg)[0].stats)
                bar.update(1)
            s = merge_all(stats)
            table[bench] = {
                "tau": s.tau,
                "acceptance_rate": s.acceptance_rate,
                "per_position": s.per_position(gamma),
                "rounds": s.rounds,
                "tokens_per_second": s.tokens_per_second,
            }
        table["macro"] = {"tau": sum(v["tau"] for v in table.values()) / len(benchmarks)}
        out[f"T={temp:g}"] = table
    bar.close()
    return out


def tau_markdown(results: dict[str, dict[str, dict]], name: str) -> str:
    temps = list(results)
    benches = [b for b in results[temps[0]] if b != "macro"]
    lines = ["| drafter | T | " + " | ".join(benches) + " | macro |", "|---|---|" + "---|" * (len(benches) + 1)]
    for t in temps:
        row = results[t]
        lines.append(f"| {name} | {t[2:]} | " + " | ".join(f"{row[b]['tau']:.2f}" for b in benches) + f" | {row['macro']['tau']:.2f} |")
    return "\n".join(lines)
