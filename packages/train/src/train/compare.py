"""Compare runs side by side (Table-1 style) from MLflow, and write the table to a markdown file.

    python -m train.compare --runs gemma_dspark gemma_dflash gemma_eagle3 gemma_ngram \\
        --out docs/compare.md

For each run name the latest finished run is used; tau comes from its tau.json artifact.
With several runs, a last column gives each macro tau over the first run's, +- its standard
error, paired by prompt where both runs carry per-prompt records (two drafters decode the
same prompts with the same per-prompt seeds, so their sampling noise is partly shared and
cancels in the ratio). `--out` replaces the file it names (docs/results.md is a hand-kept
log: do not point it there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from dspark.cache_dir import atomic_write_text
from train.config import repo_path
from train.evaluate import tau_influence


def load_results(tracking_uri: str, experiment: str, names: list[str]) -> dict[str, tuple[dict, object]]:
    import mlflow
    from mlflow.artifacts import load_text

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["attributes.start_time DESC"])
    out: dict[str, tuple[dict, object]] = {}
    for name in names:
        match = [r for r in runs if r.info.run_name == name and r.info.status == "FINISHED"]
        if not match:
            raise SystemExit(f"no finished MLflow run named {name!r} in experiment {experiment!r} at {tracking_uri}")
        run = match[0]
        out[name] = (json.loads(load_text(f"runs:/{run.info.run_id}/tau.json")), run)
    return out


def ratio_with_se(num: float, num_se: float | None, den: float, den_se: float | None) -> tuple[float, float | None]:
    """num / den and its standard error for independent estimates (first-order delta
    method: relative errors add in quadrature). The error is None where either input's is."""
    if den <= 0:
        raise ValueError(f"ratio against a non-positive tau ({den})")
    r = num / den
    if num_se is None or den_se is None:
        return r, None
    return r, r * ((num_se / num) ** 2 + (den_se / den) ** 2) ** 0.5


def paired_ratio_se(num: dict, den: dict, benches: list[str]) -> float | None:
    """Standard error of macro(num) / macro(den) where both runs decoded the same prompts
    (``per_prompt`` records, [emitted, rounds] in prompt order, on every benchmark). The two
    runs' errors on one prompt are correlated: same prompt and same seed, so the target's
    random stream, and much of its text, is shared until their rounds diverge (measured per-
    prompt correlation 0.5-0.8 between drafters, ~0 between seeds: docs/results.md). Pairing
    by prompt removes the shared part. Delta method: dQ = Q (dM_a / M_a - dM_b / M_b),
    dM = mean over benchmarks of each benchmark's mean influence. None where a benchmark
    lacks the records, their prompt counts differ, or a benchmark has fewer than 2 prompts."""
    m_a, m_b = num["macro"]["tau"], den["macro"]["tau"]
    q = m_a / m_b
    var = 0.0
    for b in benches:
        pa, pb = num.get(b, {}).get("per_prompt"), den.get(b, {}).get("per_prompt")
        if not pa or not pb or len(pa) != len(pb) or len(pa) < 2:
            return None
        if sum(r for _, r in pa) <= 0 or sum(r for _, r in pb) <= 0:
            return None  # a prompt may end before its first round (it then weighs nothing), a benchmark may not
        g = [da / m_a - db / m_b for da, db in zip(tau_influence(pa), tau_influence(pb))]
        n = len(g)
        var += sum(x * x for x in g) / (n * (n - 1))
    return q * var**0.5 / len(benches)


def table(results: dict[str, tuple[dict, object]]) -> str:
    """One markdown table per temperature; with two or more runs a last column gives each
    run's macro tau over the first run's, with its standard error, so a reader sees at once
    whether a difference is larger than the evaluation's noise."""
    temps = sorted({t for res, _ in results.values() for t in res}, reverse=True)
    names = list(results)
    first = results[names[0]][0]
    benches = [b for b in first[temps[0]] if b != "macro"]
    lines = []
    for t in temps:
        base = first.get(t, {}).get("macro")
        ratio_col = len(names) > 1 and base is not None
        head = "| run | " + " | ".join(benches) + " | macro |" + (f" macro / {names[0]}'s |" if ratio_col else "")
        lines += [f"\n**{t}**\n", head, "|---|" + "---|" * (len(benches) + 1 + ratio_col)]
        for name, (res, _) in results.items():
            if t in res:
                row = res[t]
                se = row["macro"].get("tau_se")
                macro = f"{row['macro']['tau']:.2f}" + (f" ± {se:.2f}" if se is not None else "")
                line = f"| {name} | " + " | ".join(f"{row[b]['tau']:.2f}" for b in benches) + f" | {macro} |"
                if ratio_col and name == names[0]:
                    line += " 1.000 |"  # itself: no error
                elif ratio_col:
                    r, rse = ratio_with_se(row["macro"]["tau"], se, base["tau"], base.get("tau_se"))
                    pse = paired_ratio_se(row, first[t], benches)
                    if pse is not None:
                        line += f" {r:.3f} ± {pse:.3f} |"
                    else:
                        line += f" {r:.3f}" + (f" ± {rse:.3f} (unpaired)" if rse is not None else "") + " |"
                lines.append(line)
        if ratio_col:
            lines.append(
                "\nThe ratio's ± is paired by prompt (the runs decoded the same prompts with the same seeds; "
                "the noise they share cancels); \"(unpaired)\": a run without per-prompt records, "
                "errors added as if independent."
            )
    return "\n".join(lines)


def load_bench_tau_est(results: dict[str, tuple[dict, object]]) -> dict[str, dict]:
    """The runs' teacher-forced benchmark tau_est (artifact bench_tau_est.json), for the
    runs that have one (eval.tau_est_prompts > 0, a trained drafter)."""
    from mlflow.artifacts import load_text

    out = {}
    for name, (_, run) in results.items():
        try:
            out[name] = json.loads(load_text(f"runs:/{run.info.run_id}/bench_tau_est.json"))
        except Exception:  # noqa: BLE001 - runs without the stage (n-gram, older runs) have no artifact
            continue
    return out


def tau_est_table(bt: dict[str, dict]) -> str:
    """Teacher-forced tau_est on the benchmarks' prompts, one row per run; with two or more
    runs, each macro's difference from the first run's, paired prompt by prompt (every run
    scored on the same target continuations)."""
    if not bt:
        return ""
    from train.bench_tau import paired_difference

    names = list(bt)
    first = bt[names[0]]
    benches = [b for b in first if b != "macro"]
    diff_col = len(names) > 1
    lines = ["\n**teacher-forced tau_est on the benchmarks' prompts** (the target's own T = 1 continuations, "
             "the same for every run)\n",
             "| run | " + " | ".join(benches) + " | macro |" + (f" macro - {names[0]}'s |" if diff_col else ""),
             "|---|" + "---|" * (len(benches) + 1 + diff_col)]
    for name, row in bt.items():
        se = row["macro"].get("se")
        line = f"| {name} | " + " | ".join(f"{row[b]['tau_est']:.3f}" if b in row else "–" for b in benches)
        line += f" | {row['macro']['tau_est']:.3f}" + (f" ± {se:.3f}" if se is not None else "") + " |"
        if diff_col:
            d, dse = paired_difference(row, first, benches)
            line += f" {d:+.3f}" + (f" ± {dse:.3f}" if dse is not None else "") + " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="MLflow run names (= experiment names)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="dspark")
    ap.add_argument("--out", default=None, help="write the table to this markdown file (e.g. docs/results.md)")
    args = ap.parse_args(argv)
    results = load_results(args.tracking_uri, args.experiment, args.runs)
    body = table(results)
    extra = tau_est_table(load_bench_tau_est(results))
    if extra:
        body += "\n" + extra
    print(body)
    if args.out:
        meta = "\n".join(
            f"- {name}: run {run.info.run_id[:8]}, git {run.data.tags.get('git_commit', '?')[:8]}, "
            f"{run.data.metrics.get('wall_seconds', float('nan')) / 60:.1f} min"
            for name, (_, run) in results.items()
        )
        text = (
            f"# Results: tau per benchmark\n\nGenerated {dt.date.today()} by "
            f"`python -m train.compare {' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n{meta}\n{body}\n"
        )
        atomic_write_text(repo_path(args.out), text)


if __name__ == "__main__":
    main()
