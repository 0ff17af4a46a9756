"""Serving engine throughput without HTTP: :class:`serve.service.ServeEngine` stepped in a loop.

    python tools/bench_engine.py --dtype float32 --drafter none --temperature 1 --concurrency 1 8

The same requests as ``tools/bench_serve.py`` (``Question: ...\\nAnswer:`` first turns of the
8 benchmark files, round-robin, fixed max_tokens, seeded), c requests in flight at a time,
at least max(8, 2c) requests per level, after one warm-up request. Prints aggregate
completion tokens per second, tau (tokens per request round) and the share of the wall
time spent inside the engine's steps (drafter, target, sampling) per level. Compare it
with ``bench_serve.py`` at the same settings to see what the HTTP server adds, or run it on two commits to compare engines.
"""

from __future__ import annotations

import argparse
import time

from dspark.benchmarks import BENCHMARKS, load_first_turns
from serve.api import ServeSettings, build_service
from serve.service import ServeRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--drafter", default="none", help="none, ngram or a drafter directory")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (round-robin over the files)")
    ap.add_argument("--lm-head", default="auto", choices=["auto", "screen", "full"], help="as python -m serve --lm-head")
    ap.add_argument("--cpu-gemm", default="auto", choices=["auto", "library"], help="as python -m serve --cpu-gemm")
    ap.add_argument("--decoder", default="auto", choices=["auto", "hf"], help="as python -m serve --decoder")
    args = ap.parse_args()
    if min(args.concurrency) < 1:
        ap.error("--concurrency values must be >= 1")
    per = [load_first_turns(n, -(-args.prompts // len(BENCHMARKS))) for n in BENCHMARKS]
    prompts = [f"Question: {per[i % len(per)][i // len(per)]}\nAnswer:" for i in range(args.prompts)]
    policy = args.policy if args.drafter != "none" else "auto"
    svc = build_service(ServeSettings(target=args.target, dtype=args.dtype, drafter=args.drafter, policy=policy, lm_head=args.lm_head,
                                      cpu_gemm=args.cpu_gemm, decoder=args.decoder))

    def run(c: int, n: int) -> float:
        t0, toks, sent, live = time.perf_counter(), 0, 0, 0
        while sent < n or svc.has_work():
            while live < c and sent < n:
                req = ServeRequest(prompt=prompts[sent % len(prompts)], max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=sent)
                svc.submit(f"r{sent}", req)
                sent += 1
                live += 1
            for ev in svc.step():
                toks += len(ev.token_ids)
                live -= ev.finish_reason is not None
        return toks / (time.perf_counter() - t0)

    def tau() -> tuple[int, int, float]:
        m = svc.metrics.snapshot()
        return m["accepted_tokens_total"], m["request_rounds_total"], m["engine_seconds_total"]

    run(1, 1)  # warm-up
    print(f"| engine ({args.drafter}, {args.dtype}, T={args.temperature:g}, lm-head {args.lm_head}, cpu-gemm {args.cpu_gemm}, decoder {args.decoder}) "
          "| c | tok/s | tau | inside the engine's steps |\n|---|---|---|---|---|")
    for c in args.concurrency:
        a0, r0, e0 = tau()
        t0 = time.perf_counter()
        tps = run(c, max(8, 2 * c))
        wall = time.perf_counter() - t0
        a1, r1, e1 = tau()
        print(f"| | {c} | {tps:.1f} | {(a1 - a0 + r1 - r0) / max(r1 - r0, 1):.2f} | {(e1 - e0) / wall:.0%} |", flush=True)


if __name__ == "__main__":
    main()
