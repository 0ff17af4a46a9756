"""Verify-forward cost vs tokens verified, per CPU product: the decoder layers on the
library GEMM or on oneDNN with prepacked weights (`dspark.packed_linear`), and the LM head
through each of `Target.lm_head`'s kernels (library, blockwise `skinny_linear`, packed).
Same process, same cache, interleaved, median of `--reps`.

    python tools/bench_lm_head.py                      # embedded Gemma, fp32, context 256
    python tools/bench_lm_head.py --rows 1 4 8 16 --context 512

Prints a markdown table: per row count, the whole verify forward with library layers and
library head, with library layers and the blockwise head (what was used before
dspark.packed_linear, for up to 48 rows), as shipped (packed layers, the head kernel the
target picks), and the head alone per kernel; then the ratio to the 1-token forward.
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
    packing = t.packing

    def timed(n: int, mode: str, layers: bool, head: str | None) -> float:
        ids = torch.randint(10, 1000, (1, n), generator=g)
        h = torch.randn(1, n, t.hidden_size, dtype=t.dtype)

        def forward():
            with torch.inference_mode():
                t.forward(ids, cache, logits="all")
                t.rollback(cache, n)

        def head_only():
            with torch.inference_mode():
                t.lm_head(h)

        t.use_packed_linears(layers and packing)
        try:
            with t.head_kernel_forced(head):
                return _median_ms(forward if mode == "forward" else head_only, args.reps)
        finally:
            t.use_packed_linears(packing)

    kernels = [k for k in target_mod.HEAD_KERNELS if k != "packed" or packing]
    base = timed(1, "forward", True, None)
    print(f"`python tools/bench_lm_head.py --context {args.context} --rows {' '.join(map(str, args.rows))}`  ")
    print(f"{date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"target {args.model} {args.dtype}, context {args.context}, oneDNN packing {'on' if packing else 'unavailable'}\n")
    print("| tokens verified | forward, library layers + library head ms | forward, library layers + blockwise head ms "
          "(before dspark.packed_linear) | forward as shipped ms (head kernel) | speed-up vs before | "
          + " | ".join(f"head alone, {k} ms" for k in kernels) + " | forward as shipped / 1-token forward |")
    print("|---|---|---|---|---|" + "---|" * len(kernels) + "---|")
    for n in args.rows:
        f_lib = timed(n, "forward", False, "library")
        f_old = timed(n, "forward", False, "blockwise") if n <= target_mod._SKINNY_ROWS[1] else f_lib
        f_new = timed(n, "forward", True, None)
        with torch.inference_mode():
            chosen = t._head_kernel(torch.zeros(n, t.hidden_size, dtype=t.dtype), t.model.get_output_embeddings())
        heads = [timed(n, "head", True, k) if k != "blockwise" or n <= target_mod._SKINNY_ROWS[1] else float("nan")
                 for k in kernels]
        print(f"| {n} | {f_lib:.1f} | {f_old:.1f} | {f_new:.1f} ({chosen}) | {f_old / f_new:.2f}x | "
              + " | ".join(f"{x:.1f}" for x in heads) + f" | {f_new / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
