"""Each Triton kernel against its torch reference, same inputs, same run.

    python tools/bench_kernels.py                 # CUDA: speed ratios + agreement
    python tools/bench_kernels.py --small         # small shapes (CPU / interpreter check)

Without a CUDA device Triton cannot run natively; with TRITON_INTERPRET=1 the kernels run
on CPU through the interpreter (~100x slower than torch), which checks agreement only:
the script then prints agreement and says speed numbers need a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], reps: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def cases(small: bool, dev: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, K, V = (8, 7, 3000) if small else (64, 7, 262144)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    tok = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    lens = torch.randint(0, K + 1, (B,), generator=g)
    u, noise = torch.rand(B, K, generator=g), torch.empty(B, V).exponential_(generator=g)
    rej = [x.to(dev) for x in (p, tok, lens, q, u, noise)]
    Bh, G, Kv, R, D = (4, 7, 2000, 32, 64) if small else (64, 7, 32768, 256, 640)
    base = torch.randn(Bh, G, Kv, generator=g)
    w1, w2 = torch.randn(Kv + 1, R, generator=g) * 0.05, torch.randn(Kv, R, generator=g) * 0.05
    prev0 = torch.randint(0, Kv, (Bh,), generator=g)
    hn = torch.empty(Bh, G, Kv).exponential_(generator=g)
    hid = torch.randn(Bh, G, D, generator=g)
    cw, cb = torch.randn(3 * R, 2 * R + D, generator=g) * 0.05, torch.zeros(3 * R)
    heads = [x.to(dev) for x in (base, w1, w2, prev0, hn, hid, cw, cb)]
    N, Vd = (64, 3000) if small else (4096, 32768)
    d, t = torch.randn(N, Vd, generator=g), torch.randn(N, Vd, generator=g)
    y = torch.randint(0, Vd, (N,), generator=g)
    loss = [x.to(dev) for x in (d, t, y)]
    return rej, heads, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes (for the CPU interpreter)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dev = "cuda" if cuda else "cpu"
    from dspark.kernels import reference as ref

    tri = None
    if cuda or interp:
        from dspark.kernels import triton_kernels as tri
    rej, heads, loss = cases(args.small, dev)
    base, w1, w2, prev0, hn, hid, cw, cb = heads
    d, t, y = loss

    def loss_fb(impl):
        def run():
            x = d.clone().requires_grad_(True)
            ce, l1, _ = impl.distill_loss(x, t, y)
            (ce.sum() + l1.sum()).backward()
            return ce.detach(), l1.detach(), x.grad
        return run

    jobs = {
        "rejection sampler (sampled)": lambda impl: (lambda: impl.rejection_sample(*rej)),
        "rejection sampler (greedy, incl. target argmax)": lambda impl: (lambda: impl.rejection_greedy(rej[0].argmax(-1), rej[1], rej[2])),
        "Markov head sampler (T=1)": lambda impl: (lambda: impl.markov_sample(base, w1, w2, prev0, 1.0, hn)),
        "RNN head sampler (T=1)": lambda impl: (lambda: impl.rnn_sample(base, hid, w1, cw, cb, w2, prev0, 1.0, hn)),
        "distillation loss fwd+bwd": lambda impl: loss_fb(impl),
    }
    prefix = "TRITON_INTERPRET=1 " if interp else ""
    print(f"`{prefix}python tools/bench_kernels.py {' '.join(sys.argv[1:])}`  ")
    card = torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)"
    print(f"{dt.date.today()}, {card}, torch {torch.__version__}, {'small' if args.small else 'full'} shapes, "
          f"{'Triton interpreter' if interp and not cuda else 'native'}\n")
    print("| kernel | torch ms | triton ms | torch / triton | agreement |")
    print("|---|---|---|---|---|")
    for name, make in jobs.items():
        ref_ms = timed(make(ref), args.reps, cuda)
        if tri is None:
            print(f"| {name} | {ref_ms:.2f} | n/a | pending (needs a GPU) | n/a |")
            continue
        a, b = make(ref)(), make(tri)()
        agree = all(
            torch.equal(x, y_) if x.dtype == torch.long else torch.allclose(x.float(), y_.float(), rtol=1e-4, atol=1e-5)
            for x, y_ in zip(a, b)
        )
        worst = max(float((x.float() - y_.float()).abs().max()) for x, y_ in zip(a, b) if x.dtype != torch.long)  if any(x.dtype != torch.long for x in a) else 0.0
        tri_ms = timed(make(tri), 1 if interp and not cuda else args.reps, cuda)
        ratio = "interpreter: not a speed" if interp and not cuda else f"{ref_ms / tri_ms:.2f}x"
        print(f"| {name} | {ref_ms:.2f} | {tri_ms:.2f} | {ratio} | {'identical / within tol' if agree else 'MISMATCH'} (max abs diff {worst:.1e}) |")


if __name__ == "__main__":
    main()
