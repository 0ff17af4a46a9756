"""Library GEMM (MKL) vs oneDNN on prepacked weights, the measurements behind
`dspark.packed_linear` (docs/benchmarks.md, "Verify-forward cost per kernel").

    python tools/bench_cpu_gemm.py shapes   # Gemma 3 270M's layer matrices, 1-16 rows (cache-resident)
    python tools/bench_cpu_gemm.py topk     # the top-k cache's 256-row LM-head chunk, with log-softmax + top-64
    python tools/bench_cpu_gemm.py markov   # one Markov transition row: [256] x [256, 32768], fp32 vs fp16

`shapes` prints, per [out, in] weight and row count, the median microseconds of `F.linear`
and of `mkldnn._linear_pointwise` on a weight reordered once, and their largest difference.
`topk` loads the embedded Gemma (fp32) and times `Target.lm_head` for 256 rows with the head
kernel forced to library and to packed, alone and followed by log-softmax and top-64, twice
each, interleaved. `markov` times one missed Markov transition row of the default DSpark
drafter (rank 256, 32k draft vocabulary) as `dspark.heads.markov.TransitionRows` computed it
(fp32, `w1 @ w2.T`), on a contiguous transposed fp32 copy, and from an fp16 copy (the
default for large fp32 CPU heads), with the fp16 row's largest error.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F


def _median_s(f, n: int = 30) -> float:
    """Median seconds of ``n`` calls of ``f()`` after 3 warm-up calls."""
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[len(ts) // 2]


def shapes() -> None:
    def t(f, n=30):
        return _median_s(f, n) * 1e6

    for (o, i) in [(1024, 640), (640, 1024), (2048, 640), (640, 2048)]:
        W = torch.randn(o, i)
        res = []
        for R in (1, 4, 8, 16):
            h = torch.randn(R, i)
            Wp = torch.ops.mkldnn._reorder_linear_weight(W, R)
            a = t(lambda: F.linear(h, W))
            b = t(lambda: torch.ops.mkldnn._linear_pointwise(h, Wp, None, "none", [], ""))
            err = (torch.ops.mkldnn._linear_pointwise(h, Wp, None, "none", [], "") - F.linear(h, W)).abs().max().item()
            res.append(f"R{R}: mkl {a:.0f} dnn {b:.0f} ({err:.1e})")
        print((o, i), "  ".join(res), flush=True)


def topk() -> None:
    from dspark.target import Target

    t = Target.load("gemma3-270m", dtype="float32")
    h = torch.randn(256, 640) * 3

    def step():
        with torch.no_grad():
            lg = t.lm_head(h)
            lp = torch.log_softmax(lg.float(), -1)
            return lp.topk(64, -1)

    def tm(f):
        f()
        s = time.perf_counter()
        f()
        f()
        return (time.perf_counter() - s) / 2 * 1e3

    for k in ("library", "packed", "library", "packed"):
        with t.head_kernel_forced(k):
            a = tm(lambda: t.lm_head(h))
            b = tm(step)
        print(k, "head %.0f ms, head+log_softmax+topk %.0f ms" % (a, b), flush=True)


def markov() -> None:
    torch.manual_seed(0)
    w2 = torch.randn(32768, 256) * 0.05
    w1 = torch.randn(100, 256)
    w2t, w2h = w2.T.contiguous(), w2.half()

    rows = itertools.cycle(range(100))

    def t(f, n=40):  # a different row of w1 each call
        return _median_s(lambda: f(next(rows)), n) * 1e3

    ref = lambda i: (w1[i : i + 1] @ w2.T)[0]  # noqa: E731
    half = lambda i: F.linear(w1[i : i + 1].half(), w2h)[0].float()  # noqa: E731
    print("fp32 w1 @ w2.T: %.2f ms" % t(ref))
    print("fp32 on a contiguous w2.T copy: %.2f ms" % t(lambda i: (w1[i : i + 1] @ w2t)[0]))
    print("fp16 copy: %.2f ms" % t(half))
    err = max(float(((half(i) - ref(i)).abs().max() / ref(i).abs().max())) for i in range(20))
    print("fp16 row: largest error %.1e of the row's largest entry" % err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["shapes", "topk", "markov"])
    args = ap.parse_args()
    {"shapes": shapes, "topk": topk, "markov": markov}[args.what]()


if __name__ == "__main__":
    main()
