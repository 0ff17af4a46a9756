"""Load benchmark of `python -m serve`: scheduler policies x concurrency, on loopback.

    python tools/bench_serve.py --drafter outputs/gemma_dspark/drafter
    python tools/bench_serve.py --drafter outputs/gemma_dspark/drafter --concurrency 1 4 16 \\
        --policies none static:3 static:7 sync async --max-tokens 64

For every policy a fresh server is started (same target, same drafter); for every
concurrency c, c streaming clients send a fixed list of benchmark prompts (first turns,
round-robin over the benchmark files) with a fixed max_tokens and temperature, one
request after another. Reported per (policy, c): aggregate tokens/s (all completion
tokens / wall time), per-user tokens/s (each request's tokens / its latency, averaged),
mean verify tokens per request per step and tau (from the server's /metrics counters),
errors and, for our server, where its time went (its dspark_*_seconds_total counters:
engine steps, service steps, worker steps, gaps between steps with work pending, as
shares of the client's wall time). Prints markdown tables and writes a plot (--plot).

`--openai-url URL` drives a server that is already running instead (ours, vLLM, SGLang,
anything OpenAI-compatible) with the same requests, once per --concurrency level, so two
servers are compared by two runs of the same command:

    python tools/bench_serve.py --openai-url http://127.0.0.1:8000 --model <served name> \\
        --api completions --label "vLLM-CPU 0.32" --concurrency 1 8

tau is read from the server's /metrics where it exposes it (ours: dspark_* counters;
vLLM: vllm:spec_decode_* counters), else shown as n/a. Two definitions: tau = tokens per
request round, rounds without a draft included (ours only); "drafted" tau = 1 + accepted /
rounds that verified a draft, which is what vLLM reports as its mean acceptance length
(its counters skip rounds where the proposer found nothing). Compare servers on the
second one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, policy: str, gamma: int, log: Path, gate: bool = True) -> tuple[subprocess.Popen, str]:
    port = free_port()
    drafter = "none" if policy == "none" else args.drafter
    cmd = [sys.executable, "-m", "serve", "--port", str(port), "--target", args.target, "--dtype", args.dtype,
           "--drafter", drafter, "--policy", policy, "--gamma", str(gamma), "--model-name", args.model,
           "--max-batch", str(max(args.concurrency)), "--max-queue", "64", "--log-level", "warning"]
    if not gate:
        cmd.append("--no-draft-gate")
    if args.sps_refresh and not getattr(args, "_refreshed", False) and policy in ("sync", "async"):
        cmd.append("--sps-refresh")
        args._refreshed = True
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {policy} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).text == "ok":
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server for {policy} not ready:\n{log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def counters(base: str, headers: dict | None = None) -> dict[str, float]:
    """Prometheus counters of /metrics, summed over label sets ({} when the server has none)."""
    out: dict[str, float] = {}
    try:
        text = httpx.get(base + "/metrics", timeout=10, headers=headers).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            try:
                k, v = line.rsplit(" ", 1)
                out[k.split("{", 1)[0]] = out.get(k.split("{", 1)[0], 0.0) + float(v)
            except ValueError:
                continue
    return out


def one_request(base: str, prompt: str, args, seed: int) -> tuple[int, float, int]:
    """-> (completion tokens, seconds, http status). Streams with include_usage; a server
    that sends no usage is counted by its non-empty text chunks."""
    common = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": seed,
              "stream": True, "stream_options": {"include_usage": True}}
    if args.api == "completions":
        path, body = "/v1/completions", {**common, "prompt": f"Question: {prompt}\nAnswer:"}
    else:
        path, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    t0 = time.perf_counter()
    tokens = chunks = 0
    with httpx.stream("POST", base + path, json=body, timeout=600, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return 0, time.perf_counter() - t0, r.status_code
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices") or ():
                    if ch.get("text") or (ch.get("delta") or {}).get("content"):
                        chunks += 1
    return tokens or chunks, time.perf_counter() - t0, 200


def run_level(base: str, prompts: list[str], c: int, args) -> dict:
    n = max(args.requests_per_client * c, args.min_requests)
    work = [(prompts[i % len(prompts)], i) for i in range(n)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    before = counters(base, headers)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(c) as ex:
        res = list(ex.map(lambda w: one_request(base, w[0], args, w[1]), work))
    wall = time.perf_counter() - t0
    after = counters(base, headers)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    ok = [(t, s) for t, s, code in res if code == 200]
    codes: dict[str, int] = {}
    for _, _, code in res:
        if code != 200:
            codes[str(code)] = codes.get(str(code), 0) + 1
    rounds = d.get("dspark_request_rounds_total", 0)
    drafts = d.get("vllm:spec_decode_num_drafts_total", 0)
    tau_drafted = None  # 1 + accepted / rounds that had a draft: what vLLM reports as mean acceptance length
    if rounds:  # ours: tokens per request round, rounds without a draft included
        tau = (d.get("dspark_accepted_tokens_total", 0) + rounds) / rounds
        if d.get("dspark_drafted_rounds_total", 0):
            tau_drafted = 1 + d.get("dspark_accepted_tokens_total", 0) / d["dspark_drafted_rounds_total"]
    elif drafts:  # vLLM counts only the rounds where its proposer found a draft
        tau, tau_drafted = None, 1 + d.get("vllm:spec_decode_num_accepted_tokens_total", 0) / drafts
    else:
        tau = None
    return {
        "requests": n,
        "errors": n - len(ok),
        "error_codes": codes,
        "agg_tps": sum(t for t, _ in ok) / wall,
        "user_tps": statistics.mean(t / s for t, s in ok) if ok else 0.0,
        "verify_per_req_step": d.get("dspark_verify_tokens_total", 0) / rounds if rounds else None,
        "tau": tau,
        "tau_drafted": tau_drafted,
        "wall_s": wall,
        # ours only: the server's own time accounting over this level, seconds
        "time_s": {k: d[f"dspark_{k}_seconds_total"] for k in ("engine", "service", "worker", "loop_gap")
                   if f"dspark_{k}_seconds_total" in d},
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--dtype", default="auto", help="auto (as the server): bfloat16 where native, else float32")
    ap.add_argument("--drafter", help="drafter directory (or ngram); required unless --openai-url")
    ap.add_argument("--openai-url", help="drive this running OpenAI-compatible server instead of starting ours")
    ap.add_argument("--model", default="bench", help="model name sent in requests (with --openai-url: the served name)")
    ap.add_argument("--api", choices=["chat", "completions"], default="chat",
                    help="chat: benchmark first turns as user messages; completions: 'Question: ...\\nAnswer:' prompts")
    ap.add_argument("--api-key", default=None, help="bearer token for a server that needs one")
    ap.add_argument("--label", default=None, help="row name for --openai-url (default: the URL)")
    ap.add_argument("--max-prompt-chars", type=int, default=0, help="cut prompts to this many characters (0: whole; for small-context servers)")
    ap.add_argument("--policies", nargs="+", default=["none", "static:1", "static:3", "static:7", "sync", "sync/nogate", "async"],
                    help="none | static:G | threshold | sync | async, optionally /nogate (sync/async without draft gating)")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32, help="distinct benchmark prompts (round-robin over the files)")
    ap.add_argument("--plot", default="docs/img/bench_serve.png")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--sps-refresh", action="store_true", help="re-profile SPS(B) at the first server start (run on an idle machine)")
    args = ap.parse_args()
    if not args.openai_url and not args.drafter:
        ap.error("--drafter is required (or --openai-url to drive a running server)")
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.prompts < 1:
        ap.error("--concurrency, --max-tokens and --prompts must be >= 1")

    from dspark.benchmarks import BENCHMARKS, load_first_turns

    per = max(1, args.prompts // len(BENCHMARKS))
    lists = [load_first_turns(b, per) for b in BENCHMARKS]
    prompts = [p for group in zip(*lists) for p in group][: args.prompts]
    if args.max_prompt_chars > 0:
        prompts = [p[: args.max_prompt_chars] for p in prompts]
    logdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    results: dict[str, dict[int, dict]] = {}

    def measure(label: str, base: str) -> None:
        one_request(base, prompts[0], args, 0)  # warm-up
        results[label] = {}
        for c in args.concurrency:
            r = results[label][c] = run_level(base, prompts, c, args)
            print(f"{label:>10} c={c:>2}: {r['agg_tps']:6.1f} tok/s aggregate, {r['user_tps']:5.1f} per user, "
                  f"verify {_fmt(r['verify_per_req_step'])}/req/step, tau {_fmt(r['tau'])}, drafted tau {_fmt(r['tau_drafted'])}, "
                  f"errors {r['errors']}", flush=True)

    if args.openai_url:
        base = args.openai_url.rstrip("/")
        measure(args.label or args.openai_url, base[:-3] if base.endswith("/v1") else base)
    for pol in ([] if args.openai_url else args.policies):
        base_pol, _, flag = pol.partition("/")
        name, _, g = base_pol.partition(":")
        gamma = int(g) if g else args.gamma
        proc, base = start(args, name, gamma, logdir / f"{pol.replace(':', '_').replace('/', '_')}.log", gate=flag != "nogate")
        try:
            measure(pol, base)
        finally:
            stop(proc)

    cpu = platform.processor() or platform.machine()
    print(f"\n`python tools/bench_serve.py {' '.join(sys.argv[1:])}`  ")
    served = f"server {args.openai_url}, model {args.model}" if args.openai_url else \
        f"target {args.target} {args.dtype}, drafter {args.drafter}"
    print(f"{dt.date.today()}, {cpu}, {os.cpu_count()} CPUs, {served}, {args.api} API, "
          f"T={args.temperature}, max_tokens {args.max_tokens}\n")
    cs = args.concurrency
    print("| policy | " + " | ".join(f"c={c} agg / user tok/s" for c in cs) + " |")
    print("|---|" + "---|" * len(cs))
    for pol, rows in results.items():
        print(f"| {pol} | " + " | ".join(f"{rows[c]['agg_tps']:.1f} / {rows[c]['user_tps']:.1f}" for c in cs) + " |")
    print("\nMean verify tokens per request per step (tau; drafted tau in brackets):\n")
    print("| policy | " + " | ".join(f"c={c}" for c in cs) + " |")
    print("|---|" + "---|" * len(cs))
    for pol, rows in results.items():
        print(f"| {pol} | " + " | ".join(f"{_fmt(rows[c]['verify_per_req_step'])} ({_fmt(rows[c]['tau'])}; "
                                         f"{_fmt(rows[c]['tau_drafted'])})" for c in cs) + " |")
    if any(r.get("time_s") for rows in results.values() for r in rows.values()):
        print("\nWhere the server's time went, as shares of the client's wall time: inside the engine's steps /"
              " + admission and detokenisation / + output hand-off / between steps with work pending:\n")
        print("| policy | " + " | ".join(f"c={c}" for c in cs) + " |")
        print("|---|" + "---|" * len(cs))
        for pol, rows in results.items():
            cells = []
            for c in cs:
                t, w = rows[c].get("time_s") or {}, rows[c]["wall_s"]
                cells.append(" / ".join(f"{t[k] / w:.0%}" if k in t else "n/a" for k in ("engine", "service", "worker", "loop_gap")))
            print(f"| {pol} | " + " | ".join(cells) + " |")
    errs = sum(r["errors"] for rows in results.values() for r in rows.values())
    codes: dict[str, int] = {}
    for rows in results.values():
        for r in rows.values():
            for k, v in r["error_codes"].items():
                codes[k] = codes.get(k, 0) + v
    print(f"\nerrors: {errs}" + (f" (HTTP status counts {codes})" if codes else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for pol, rows in results.items():
            axes[0].plot(cs, [rows[c]["agg_tps"] for c in cs], marker="o", label=pol)
            axes[1].plot(cs, [rows[c]["user_tps"] for c in cs], marker="o", label=pol)
            if all(rows[c]["verify_per_req_step"] is not None for c in cs):
                axes[2].plot(cs, [rows[c]["verify_per_req_step"] for c in cs], marker="o", label=pol)
        for ax, title in zip(axes, ["aggregate tokens/s", "per-user tokens/s", "verify tokens / request / step"]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.set_xlabel("concurrent clients")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
