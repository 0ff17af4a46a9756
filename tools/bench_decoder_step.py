"""The target's decoding step on the slot KV cache: the lean Gemma 3 step
(`dspark.fast_decoder`) against transformers' forward, same cache layout, interleaved
(docs/benchmarks.md, "The lean Gemma 3 decoder step").

    python tools/bench_decoder_step.py                      # R requests x n new tokens: 1x1 1x8 2x1 4x1 8x1 2x8
    python tools/bench_decoder_step.py --shapes 8x1 --reps 6
    python tools/bench_decoder_step.py --paths lean compiled   # torch.compile of its elementwise parts

Each request holds a random 100-240-token context of the embedded Gemma (fp32); a step
feeds n tokens per request and is rolled back. Prints the median ms of each round of
`--steps` steps, `--reps` rounds per path, the paths alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from dspark import fast_decoder
from dspark.slot_cache import SlotKVCache
from dspark.target import Target


PATHS = ("lean", "compiled", "hf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1x1", "1x8", "2x1", "4x1", "8x1", "2x8"], help="RxN")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--paths", nargs="+", default=["lean", "hf"], choices=PATHS,
                    help="lean: dspark.fast_decoder eager; compiled: the same with its elementwise parts "
                         "through torch.compile; hf: transformers' forward. Ratios are against the first.")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    slots = max(r for r, _ in shapes)
    t = Target.load("gemma3-270m", dtype="float32")
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(100, 20000, (100 + 20 * r,), generator=g).tolist() for r in range(slots)]
    def make(path: str) -> SlotKVCache:
        """A slot cache for ``path`` holding every request's context."""
        kv = SlotKVCache(t, slots=slots, capacity=512, fast=path != "hf")
        if path == "compiled":  # its own step object: the lean one stays eager
            kv.fast = fast_decoder.FastGemma3(t, compile=True)
        for r in range(slots):
            kv.add(r)
        kv.forward(list(range(slots)), ctx, logits="last_hidden")
        return kv

    caches = {path: make(path) for path in args.paths}

    def step(kv: SlotKVCache, R: int, n: int) -> torch.Tensor:
        out, _ = kv.forward(list(range(R)), [[123] * n] * R, logits="last_hidden")
        for r in range(R):
            kv.rollback(r, n)
        return out

    if "compiled" in caches:  # compile every shape before timing (one-time cost, reported)
        s = time.perf_counter()
        got = [step(caches["compiled"], R, n) for R, n in shapes]
        print(f"compile warm-up: {time.perf_counter() - s:.0f} s, compiled: {caches['compiled'].fast.compiled}")
        ref = caches["lean"] if "lean" in caches else make("lean")
        for (R, n), a in zip(shapes, got):
            b = step(ref, R, n)
            print(f"compiled vs eager, {R}x{n}: max |diff| {(a - b).abs().max().item():.2e} "
                  f"of max |h| {b.abs().max().item():.1f}")
    first = args.paths[0]
    print("| requests x tokens | " + " | ".join(f"{p} ms (rounds)" for p in args.paths) + " | "
          + " | ".join(f"{p} / {first}" for p in args.paths[1:]) + " |")
    print("|---" * (2 * len(args.paths)) + "|")
    for R, n in shapes:
        res: dict[str, list[float]] = {p: [] for p in args.paths}
        for _ in range(args.reps):
            for path in args.paths:
                ts = []
                for _ in range(args.steps):
                    s = time.perf_counter()
                    step(caches[path], R, n)
                    ts.append(time.perf_counter() - s)
                ts.sort()
                res[path].append(1e3 * ts[len(ts) // 2])
        med = {p: sorted(v)[len(v) // 2] for p, v in res.items()}
        cells = [f"{med[p]:.0f} ({' '.join(f'{x:.0f}' for x in res[p])})" for p in args.paths]
        ratios = [f"{med[p] / med[first]:.2f}" for p in args.paths[1:]]
        print(f"| {R} x {n} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
