"""Decode-speed benchmark on the real target: HF generate vs our AR loop vs HF prompt
lookup vs our engine with the n-gram drafter, same prompts, same run.

    python tools/bench_decode.py --prompts-per-benchmark 1 --max-new-tokens 128 --dtypes bfloat16 float32

Methods run prompt-major (every method on prompt 1, then prompt 2, ...) so slow drift of
the machine hits them alike. Prints a markdown table: tokens/s, ratio to HF generate in
the same run, tau (accepted length, ours only) and how many outputs are identical to HF
generate's. Greedy (T=0) is the speed/identity comparison; T=1 rows show sampling.

Trained drafters (``--drafters``) get one row per ``--policies`` entry: ``static`` verifies
every draft (gamma), ``sync`` / ``async`` let the hardware-aware prefix scheduler pick each
round's verify length from the drafter's calibrated confidences and this machine's
profiled SPS curve (cached like the server's), with the draft gate the server uses
(``--no-draft-gate`` turns it off): the configuration ``python -m serve`` runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dspark.benchmarks import BENCHMARKS, load_first_turns
from dspark.drafters import NgramDrafter, load_drafter
from dspark.engine import SpeculativeEngine
from dspark.generate import GenerationConfig, ar_generate
from dspark.metrics import SpecStats, merge_all
from dspark.sampling import SamplingParams
from dspark import fast_decoder
from dspark.scheduler import PrefixScheduler, SPSProfile, cached_sps
from dspark.target import Target

SPS_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)  # the server's default profile points


@dataclass
class Row:
    tokens: int = 0
    seconds: float = 0.0
    identical: int = 0
    stats: list[SpecStats] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def hf_generate(t: Target, ids: list[int], n: int, temperature: float, seed: int, lookup: int = 0) -> list[int]:
    kw: dict = {"max_new_tokens": n, "eos_token_id": t.eos_token_ids, "pad_token_id": t.eos_token_ids[0]}
    if temperature == 0:
        kw.update(do_sample=False, top_k=None, top_p=None)
    else:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    if lookup:
        kw.update(prompt_lookup_num_tokens=lookup)
    out = t.model.generate(torch.tensor([ids]), **kw)
    return out[0, len(ids) :].tolist()


def hf_step_ar(t: Target, p: list[int], cfg: GenerationConfig):
    """Our AR loop with every step through transformers' forward (no lean decoder step)."""
    t.fast_decoder = False
    try:
        return ar_generate(t, p, cfg)
    finally:
        t.fast_decoder = None


def full_head_ar(t: Target, p: list[int], cfg: GenerationConfig):
    """Our AR loop with every token picked from the full fp32 LM head (no fp16 screen)."""
    with t.screen_mode(False):
        return ar_generate(t, p, cfg)


def sps_profile(t: Target) -> SPSProfile:
    """The same cached verify-forward profile ``python -m serve`` uses for this target/machine."""
    from serve.service import profile_target_sps, sps_profile_key

    return cached_sps(sps_profile_key(t, SPS_TOKENS), lambda: profile_target_sps(t, SPS_TOKENS))


def make_scheduler(policy: str, t: Target, args: argparse.Namespace) -> PrefixScheduler | None:
    if policy == "static":
        return None  # the engine verifies every draft
    return PrefixScheduler(policy=policy, sps=sps_profile(t), gamma=args.num_draft, draft_gate=not args.no_draft_gate)


def bench(t: Target, prompts: list[list[int]], args: argparse.Namespace, temperature: float) -> dict[str, Row]:
    params = SamplingParams(temperature=temperature)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=params, seed=args.seed)
    engine = SpeculativeEngine(t, NgramDrafter(max_ngram=args.ngram_max, num_tokens=args.num_draft), args.num_draft)
    methods: dict[str, Callable[[list[int]], tuple[list[int], SpecStats | None]]] = {}
    if not args.no_hf:
        methods["HF generate"] = lambda p: (hf_generate(t, p, args.max_new_tokens, temperature, args.seed), None)
    methods["ours: AR loop"] = lambda p: ((r := ar_generate(t, p, cfg)).tokens, r.stats)
    if fast_decoder.supports(t) is None and not args.only_drafters:  # where the lean decoder step applies: the loop without it
        methods["ours: AR loop, HF decoder step"] = lambda p: ((r := hf_step_ar(t, p, cfg)).tokens, r.stats)
    if t._screened_head() is not None and not args.only_drafters:  # where the LM head's fp16 screen applies: the loop without it
        methods["ours: AR loop, full LM head"] = lambda p: ((r := full_head_ar(t, p, cfg)).tokens, r.stats)
    if not args.no_hf:
        methods[f"HF prompt lookup ({args.hf_lookup_tokens})"] = lambda p: (
            hf_generate(t, p, args.max_new_tokens, temperature, args.seed, lookup=args.hf_lookup_tokens), None
        )
    if not args.only_drafters:
        methods[f"ours: engine + n-gram (k={args.num_draft})"] = lambda p: ((r := engine.generate([p], cfg)[0]).tokens, r.stats)
    for path in args.drafters:  # trained drafter checkpoints, each in its own engine per policy
        d = load_drafter(path, t)
        d = d.to(t.dtype) if t.dtype != torch.float32 else d
        variants = [d]
        if args.ngram_fallback:
            from dspark.drafters.fallback import NgramFallbackDrafter

            variants.append(NgramFallbackDrafter(d, min_match=args.ngram_fallback, num_tokens=args.num_draft))
        for d, policy in ((v, pol) for v in variants for pol in args.policies):
            if policy != "static" and getattr(d, "conf", None) is None:
                print(f"skipping {policy} for {path}: {d.name} has no confidence head", file=sys.stderr)
                continue
            sched = make_scheduler(policy, t, args)
            # static: one row per --gammas entry (the drafts verified every round)
            for gamma in (args.gammas or [args.num_draft]) if policy == "static" else [args.num_draft]:
                eng = SpeculativeEngine(t, d, gamma, scheduler=sched)
                gate = f" gamma {gamma}" if policy == "static" else ("" if args.no_draft_gate else ", gated")
                methods[f"ours: engine + {d.name} ({policy}{gate}) `{path}`"] = lambda p, eng=eng: ((r := eng.generate([p], cfg)[0]).tokens, r.stats)
    rows = {m: Row() for m in methods}
    ar_generate(t, prompts[0][:32], GenerationConfig(max_new_tokens=8, sampling=params, seed=args.seed))  # warm-up
    for p in tqdm(prompts, desc=f"{t.dtype} T={temperature}", file=sys.stderr):
        ref: list[int] | None = None
        for name, fn in methods.items():
            t0 = time.perf_counter()
            toks, stats = fn(p)
            dt_s = time.perf_counter() - t0
            row = rows[name]
            row.tokens += len(toks)
            row.seconds += dt_s
            if stats is not None:
                row.stats.append(stats)
            ref = toks if ref is None else ref
            row.identical += toks == ref
    return rows


def table(results: list[tuple[str, float, dict[str, Row]]], n_prompts: int) -> str:
    first = next(iter(results[0][2])) if results else "?"
    lines = [
        f"| dtype | T | method | tokens/s | vs {first} | tau | identical to {first} |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, temp, rows in results:
        base = next(iter(rows.values())).tps
        for name, r in rows.items():
            tau = f"{merge_all(r.stats).tau:.2f}" if r.stats else "n/a"
            ident = f"{r.identical}/{n_prompts}" if temp == 0 else "(sampled)"
            lines.append(f"| {dtype} | {temp:g} | {name} | {r.tps:.1f} | {r.tps / base:.2f}x | {tau} | {ident} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS))
    ap.add_argument("--prompts-per-benchmark", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0])
    ap.add_argument("--num-draft", type=int, default=7)
    ap.add_argument("--gammas", nargs="+", type=int, default=None,
                    help="static policy: one row per number of drafts verified each round (default: --num-draft)")
    ap.add_argument("--only-drafters", action="store_true",
                    help="rows: the AR loop (the baseline) and the trained drafters only")
    ap.add_argument("--ngram-max", type=int, default=3)
    ap.add_argument("--hf-lookup-tokens", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--drafters", nargs="*", default=[], help="trained drafter checkpoints (e.g. outputs/gemma_dspark/drafter)")
    ap.add_argument("--policies", nargs="+", default=["static"], choices=["static", "sync", "async"],
                    help="verify-length policies for --drafters rows (sync/async need a confidence head)")
    ap.add_argument("--ngram-fallback", type=int, default=0, metavar="N",
                    help="also run each trained drafter with prompt lookup in front (n-gram >= N tokens; 0: off)")
    ap.add_argument("--no-draft-gate", action="store_true", help="sync/async: never skip drafting (the server gates by default)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF rows (the AR loop is then the baseline)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    n_prompts = 0
    for dtype in args.dtypes:
        t = Target.load(args.target, dtype=dtype)
        prompts = [t.encode_prompt(p) for b in args.benchmarks for p in load_first_turns(b, args.prompts_per_benchmark)]
        n_prompts = len(prompts)
        for temp in args.temperatures:
            results.append((dtype, temp, bench(t, prompts, args, temp)))
        del t
    cmd = "python tools/bench_decode.py " + " ".join(sys.argv[1:])
    print(f"\n`{cmd}`  ")
    print(
        f"{dt.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{n_prompts} prompts ({', '.join(args.benchmarks)}; first turn), {args.max_new_tokens} new tokens max\n"
    )
    print(table(results, n_prompts))


if __name__ == "__main__":
    main()
