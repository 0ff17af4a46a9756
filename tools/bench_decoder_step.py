"""The target's decoding step on the slot KV cache: the lean Gemma 3 step
(`dspark.fast_decoder`) against transformers' forward, same cache layout, interleaved
(docs/benchmarks.md, "The lean Gemma 3 decoder step").

    python tools/bench_decoder_step.py                      # R requests x n new tokens: 1x1 1x8 2x1 4x1 8x1 2x8
    python tools/bench_decoder_step.py --shapes 8x1 --reps 6

Each request holds a random 100-240-token context of the embedded Gemma (fp32); a step
feeds n tokens per request and is rolled back. Prints the median ms of each round of
`--steps` steps, `--reps` rounds per path, fast and HF alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from dspark.slot_cache import SlotKVCache
from dspark.target import Target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1x1", "1x8", "2x1", "4x1", "8x1", "2x8"], help="RxN")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    slots = max(r for r, _ in shapes)
    t = Target.load("gemma3-270m", dtype="float32")
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(100, 20000, (100 + 20 * r,), generator=g).tolist() for r in range(slots)]
    caches = {}
    for fast in (True, False):
        kv = SlotKVCache(t, slots=slots, capacity=512, fast=fast)
        for r in range(slots):
            kv.add(r)
        kv.forward(list(range(slots)), ctx, logits="last_hidden")
        caches[fast] = kv

    def step(kv: SlotKVCache, R: int, n: int) -> None:
        kv.forward(list(range(R)), [[123] * n] * R, logits="last_hidden")
        for r in range(R):
            kv.rollback(r, n)

    print("| requests x tokens | lean step ms (rounds) | HF forward ms (rounds) | HF / lean |")
    print("|---|---|---|---|")
    for R, n in shapes:
        res: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.reps):
            for fast in (True, False):
                ts = []
                for _ in range(args.steps):
                    s = time.perf_counter()
                    step(caches[fast], R, n)
                    ts.append(time.perf_counter() - s)
                ts.sort()
                res[fast].append(1e3 * ts[len(ts) // 2])
        a, b = sorted(res[True])[len(res[True]) // 2], sorted(res[False])[len(res[False]) // 2]
        print(f"| {R} x {n} | {a:.0f} ({' '.join(f'{x:.0f}' for x in res[True])}) | "
              f"{b:.0f} ({' '.join(f'{x:.0f}' for x in res[False])}) | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
