"""The budget curve (issue #10): tau against optimiser steps, one point per MLflow run.

    python tools/plot_budget.py --runs gemma_dspark_top64_150 gemma_dspark gemma_dspark_4x

For each run name, the newest finished MLflow run of that name that logged a held-out
tau_est is read: its `trainer.max_steps` parameter, the teacher-forced held-out tau_est on
the target's own text and on reference answers, and the benchmark macro tau at T = 1.
Prints a markdown table and writes a plot (--out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _row(client, name: str) -> dict | None:
    runs = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for r in runs:
        m = r.data.metrics
        if "heldout_tau_est_onpolicy" in m and "trainer.max_steps" in r.data.params:
            return {
                "run": name,
                "steps": int(r.data.params["trainer.max_steps"]),
                "onpolicy": m["heldout_tau_est_onpolicy"],
                "reference": m.get("heldout_tau_est_reference"),
                "tau_T1": m.get("tau_macro_T1"),
            }
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="MLflow run names (experiment_name of each job)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--out", default="docs/img/budget_curve.png")
    args = ap.parse_args(argv)

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=args.tracking_uri)
    rows = []
    for name in args.runs:
        row = _row(client, name)
        if row is None:
            print(f"error: no finished MLflow run named {name!r} with a held-out tau_est in {args.tracking_uri}", file=sys.stderr)
            return 2
        rows.append(row)
    rows.sort(key=lambda r: r["steps"])

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    print("| run | steps | held-out tau_est, target's text | on reference answers | benchmark macro tau, T=1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {f(r['onpolicy'])} | {f(r['reference'])} | {f(r['tau_T1'])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [r["steps"] for r in rows]
    for key, label in (("onpolicy", "held-out tau_est (target's text)"), ("reference", "held-out tau_est (reference)"),
                       ("tau_T1", "benchmark macro tau, T=1")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("optimiser steps (batch 8)")
    ax.set_ylabel("tau (gamma 7)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
