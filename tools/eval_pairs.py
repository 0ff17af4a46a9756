"""Benchmark tau of several drafter checkpoints on the same prompts, with paired errors.

    python tools/eval_pairs.py --runs dspark=outputs/gemma_dspark/drafter dflash=outputs/gemma_dflash/drafter \\
        --prompts-per-benchmark 4 --temperature 1

Every run decodes the same first turns of the 8 benchmark files with the same per-prompt
seeds (``train.evaluate.evaluate``, the main job's stage 6, batched). A ``name=path@seed``
entry uses another seed for that run (``@1``: what a second sample of the same drafter
gives). For each run the table gives the macro tau and its standard error, the time, and
its macro tau over the first run's with two errors: as if the runs were independent
(``train.compare.ratio_with_se``) and paired by prompt (``train.compare.paired_ratio_se``),
plus the correlation of per-prompt tau with the first run. ``--no-wave-forward`` runs the
target's layers in one forward over all drafts (the engine before the two-wave forward),
for timing the two against each other. ``--dense NAME ...`` builds those runs'
full-vocabulary draft probabilities in every propose, as the engine did before proposals
over a draft vocabulary stayed compact (same tokens; for timing the two). ``--out`` keeps
the raw results as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dspark.benchmarks import BENCHMARKS


def _per_prompt_tau(res: dict, benches: list[str]) -> list[float]:
    return [e / r if r else float("nan") for b in benches for e, r in res[b]["per_prompt"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, metavar="NAME=PATH[@SEED]", help="drafter checkpoints to evaluate")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS))
    ap.add_argument("--prompts-per-benchmark", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-wave-forward", action="store_true", help="one target forward over every draft of a round")
    ap.add_argument("--dense", nargs="*", default=[], metavar="NAME",
                    help="runs whose proposals carry full-vocabulary draft probabilities, built in propose (what the "
                         "engine did before proposals over a draft vocabulary stayed compact): for timing the two")
    ap.add_argument("--out", default=None, help="write every run's results (tau.json format) here")
    args = ap.parse_args()

    import dspark.engine as engine_mod
    from dspark.drafters import load_drafter
    from dspark.target import Target
    from train.compare import paired_ratio_se, ratio_with_se
    from train.evaluate import evaluate

    runs = []
    unknown = set(args.dense) - {spec.partition("=")[0] for spec in args.runs}
    if unknown:
        raise SystemExit(f"--dense names runs that --runs does not give: {sorted(unknown)}")
    for spec in args.runs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"--runs entries are NAME=PATH[@SEED], got {spec!r}")
        path, _, seed = rest.partition("@")
        runs.append((name, path, int(seed) if seed else args.seed))
    if args.no_wave_forward:
        real_init = engine_mod.SpeculativeEngine.__init__

        def init(self, *a, **k):
            real_init(self, *a, **k)
            self.wave_forward = False

        engine_mod.SpeculativeEngine.__init__ = init
    target = Target.load(args.target, dtype=args.dtype)
    key = f"T={args.temperature:g}"
    results, seconds = {}, {}
    for name, path, seed in runs:
        drafter = load_drafter(path, target)
        if name in args.dense:
            real_propose = drafter.propose

            def propose(state, _real=real_propose):
                prop = _real(state)
                prop.probs  # noqa: B018 - builds the full [B, K, V] tensor now, inside the draft step
                return prop

            drafter.propose = propose
        t0 = time.perf_counter()
        res = evaluate(target, drafter, args.benchmarks, args.prompts_per_benchmark, args.max_new_tokens,
                       [args.temperature], args.gamma, seed=seed, progress=True, batch_size=args.batch_size)
        seconds[name] = time.perf_counter() - t0
        results[name] = res
        m = res[key]["macro"]
        print(f"{name}: macro tau {m['tau']:.3f} ± {m['tau_se'] or float('nan'):.3f}, {seconds[name]:.0f} s", flush=True)
        if args.out:
            from dspark.cache_dir import atomic_write_text

            atomic_write_text(Path(args.out), json.dumps(results, indent=1))
    first = runs[0][0]
    base = results[first][key]
    benches = list(args.benchmarks)
    print(f"\n{args.prompts_per_benchmark} prompts per benchmark, {args.max_new_tokens} new tokens, T = {args.temperature:g}, "
          f"gamma {args.gamma}, batch {args.batch_size}{', one forward per round' if args.no_wave_forward else ''}\n")
    print(f"| run | seed | macro tau | seconds | / {first}'s | ± independent | ± paired | per-prompt correlation with {first} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, seed in runs:
        row = results[name][key]
        m = row["macro"]
        r, ind = ratio_with_se(m["tau"], m["tau_se"], base["macro"]["tau"], base["macro"]["tau_se"])
        pse = paired_ratio_se(row, base, benches)
        a, b = _per_prompt_tau(row, benches), _per_prompt_tau(base, benches)
        ok = [(x, y) for x, y in zip(a, b) if x == x and y == y]
        corr = statistics.correlation([x for x, _ in ok], [y for _, y in ok]) if name != first and len(ok) > 2 else 1.0
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {seed} | {m['tau']:.3f} ± {fmt(m['tau_se'])} | {seconds[name]:.0f} | {r:.3f} | "
              f"{fmt(ind) if name != first else '–'} | {fmt(pse) if name != first else '–'} | {corr:.2f} |")


if __name__ == "__main__":
    main()
