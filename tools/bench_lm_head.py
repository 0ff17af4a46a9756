"""Verify-forward cost vs tokens verified, with the library LM-head product and with the
blockwise one (`dspark.target.skinny_linear`) that `Target.lm_head` uses for 4..48 rows on
CPU in fp32. Same process, same cache, interleaved, median of `--reps`.

    python tools/bench_lm_head.py                      # embedded Gemma, fp32, context 256
    python tools/bench_lm_head.py --rows 1 4 8 16 --context 512

Prints a markdown table: per row count, the whole verify forward (body + head) and the
head alone, library vs blockwise, and the 1-token forward as the unit a decode step costs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    if args.context < 1 or args.reps < 1 or min(args.rows) < 1:
        ap.error("--context, --reps and every --rows value must be >= 1")

    from dspark import target as target_mod
    from dspark.target import Target

    t = Target.load(args.model, dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    cache = t.new_cache()
    with torch.inference_mode():
        t.forward(torch.randint(10, 1000, (1, args.context), generator=g), cache, logits="none")
        t.rollback(cache, 0)
    window = target_mod._SKINNY_ROWS
    off = (10**9, 10**9)

    def timed(n: int, mode: str, skinny: bool) -> float:
        target_mod._SKINNY_ROWS = window if skinny else off
        ids = torch.randint(10, 1000, (1, n), generator=g)
        h = torch.randn(1, n, t.hidden_size, dtype=t.dtype)

        def forward():
            with torch.inference_mode():
                t.forward(ids, cache, logits="all")
                t.rollback(cache, n)

        def head():
            with torch.inference_mode():
                t.lm_head(h)

        try:
            return _median_ms(forward if mode == "forward" else head, args.reps)
        finally:
            target_mod._SKINNY_ROWS = window

    base = timed(1, "forward", False)
    print(f"`python tools/bench_lm_head.py --context {args.context} --rows {' '.join(map(str, args.rows))}`  ")
    print(f"{date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"target {args.model} {args.dtype}, context {args.context}, blockwise window {window}\n")
    print("| tokens verified | forward, library head ms | forward, blockwise head ms | speed-up | "
          "head alone, library ms | head alone, blockwise ms | forward as shipped / 1-token forward |")
    print("|---|---|---|---|---|---|---|")
    for n in args.rows:
        f_lib, f_blk = timed(n, "forward", False), timed(n, "forward", True)
        h_lib, h_blk = timed(n, "head", False), timed(n, "head", True)
        used = window[0] <= n <= window[1]
        print(f"| {n} | {f_lib:.1f} | {f_blk:.1f}{'' if used else ' (not used)'} | {f_lib / f_blk:.2f}x | "
              f"{h_lib:.1f} | {h_blk:.1f} | {f_blk / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
