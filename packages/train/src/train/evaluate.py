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
                "tau_se": tau_standard_error(stats),
                "prompts": len(stats),
                "acceptance_rate": s.acceptance_rate,
                "per_position": s.per_position(gamma),
                "rounds": s.rounds,
                "tokens_per_second": s.tokens_per_second,
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
    emitted, rounds = sum(e for e, _ in per), sum(r for _, r in per)
    tau, rbar = emitted / rounds, rounds / n
    var = sum(((e - tau * r) / rbar) ** 2 for e, r in per) / (n * (n - 1))
    return var**0.5


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
