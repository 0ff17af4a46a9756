"""Abuse the HTTP server on loopback: a fuzz corpus and a bounded soak (#11 items 15-16).

    python tools/soak_serve.py                      # tiny random Gemma 3, n-gram drafter
    python tools/soak_serve.py --fuzz 3000 --soak 2000 --concurrency 32
    python tools/soak_serve.py --target gemma3-270m --drafter outputs/gemma_dspark/drafter --soak 300

Fuzz: a seeded corpus of malformed and boundary requests (broken and non-object JSON,
every field of /v1/completions and /v1/chat/completions given wrong types, extreme,
negative, NaN-like and huge values, unknown fields, wrong methods and paths, huge and
non-UTF-8 bodies), sent one at a time. Every answer must be 2xx or a 4xx whose body is an
OpenAI-style ``{"error": {...}}``; a 5xx, a malformed error body or no answer within the
timeout is a failure.

Soak: ``--soak`` requests from ``--concurrency`` client threads, mixing non-streaming and
streaming completions and chats, clients that disconnect mid-stream, and malformed bodies.
Reported: requests lost (no complete answer for a request we did not abandon: must be 0),
5xx (must be 0), the engine's active slots and the server's in-flight count afterwards
(must return to 0), the server's resident memory (all its processes) before and after,
and p50 / p99 latency of the completed requests. The exit status is 1 when a must fails.

The default target is a tiny random-init Gemma 3 with a byte-level tokenizer (the
server's robustness, not its speed, is under test); ``--target`` serves a real one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* helpers (tiny model, server process)

from tests.serve.server_util import ServerProcess  # noqa: E402

MODEL = "soak"
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

# ---------------------------------------------------------------------------- fuzz corpus
WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, -1e308, 1e-320, 0.5, -0.5, "", "x", "1", "nan",
         "inf", "-inf", "\x00", "\ud800", "é" * 50, "<eos>" * 20, [], [1], ["a"], [[1]], {}, {"a": 1}, "a" * 20000,
         list(range(300)), [None]]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                     "stream_options", "n", "logprobs", "echo", "presence_penalty", "user", "return_token_ids"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "stream", "stream_options", "n", "tools", "response_format"]


def _valid_completion(rng: random.Random) -> dict:
    return {"model": MODEL, "prompt": rng.choice(["Question: 2+2?\nAnswer:", "hi", "def f(x):"]), "max_tokens": rng.randint(1, 8),
            "temperature": rng.choice([0.0, 0.7, 1.0])}


def _valid_chat(rng: random.Random) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(["hi", "add 2 and 3"])}], "max_tokens": rng.randint(1, 8)}


def fuzz_case(rng: random.Random, i: int) -> tuple[str, str, dict, bytes | None, object]:
    """(method, path, headers, raw body or None, json body or None) for case i."""
    kind = i % 10
    chat = rng.random() < 0.4
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = _valid_chat(rng) if chat else _valid_completion(rng)
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    if kind <= 3:  # one field set to a weird value
        base[rng.choice(fields)] = rng.choice(WEIRD)
        return "POST", path, AUTH, None, base
    if kind == 4:  # several weird fields, some unknown keys
        for _ in range(rng.randint(2, 5)):
            base[rng.choice(fields + ["zzz", "", "__proto__"])] = rng.choice(WEIRD)
        return "POST", path, AUTH, None, base
    if kind == 5:  # a field removed, or the body replaced by a non-object JSON value
        if rng.random() < 0.5 and base:
            base.pop(rng.choice(list(base)))
            return "POST", path, AUTH, None, base
        return "POST", path, AUTH, None, rng.choice([[], [base], "text", 3, None, True])
    if kind == 6:  # broken bytes: truncated JSON, garbage, non-UTF-8, empty, huge
        raw = json.dumps(base).encode()
        return "POST", path, AUTH, rng.choice([raw[: rng.randint(0, len(raw) - 1)], b"\xff\xfe\x00garbage", b"", b"{" * 5000,
                                                b'{"model": "soak", "prompt": "' + b"z" * 200_000 + b'"}', raw + b"trailing"]), None
    if kind == 7 and chat:  # malformed messages
        base["messages"] = rng.choice([[{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": ["a", 1]}],
                                       [{"role": "system", "content": "s"}], [{"role": "user", "content": {"x": 1}}] * 3, [None]])
        return "POST", path, AUTH, None, base
    if kind == 8:  # boundary values of the numeric fields
        base[rng.choice(["max_tokens", "temperature", "top_p", "seed"])] = rng.choice([0, -1, 65, 10**9, 2.5, -0.0, 100.0, 1e-9])
        return "POST", path, AUTH, None, base
    # wrong method, unknown path, missing / wrong key
    return rng.choice([("GET", path, AUTH, None, None), ("PUT", "/v1/models", AUTH, None, base),
                       ("POST", "/v1/nothing", AUTH, None, base), ("POST", path, {}, None, base),
                       ("POST", path, {"Authorization": "Bearer nope"}, None, base), ("GET", "/metrics", AUTH, None, None),
                       ("GET", "/v1/models", AUTH, None, None), ("DELETE", path, AUTH, None, None)])


def _openai_error(r: httpx.Response) -> bool:
    try:
        err = r.json().get("error")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str)


def run_fuzz(base: str, n: int, seed: int, timeout: float) -> dict:
    rng = random.Random(seed)
    codes: dict[int, int] = {}
    failures: list[str] = []
    with httpx.Client(timeout=timeout) as c:
        for i in range(n):
            method, path, headers, raw, body = fuzz_case(rng, i)
            if raw is None and (body is not None or method == "POST"):
                raw = json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as \ud800
            kw = {"content": raw, "headers": {**headers, "content-type": "application/json"}} if raw is not None else {"headers": headers}
            try:
                r = c.request(method, base + path, **kw)
            except httpx.HTTPError as e:
                failures.append(f"case {i} {method} {path}: no answer ({type(e).__name__})")
                continue
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append(f"case {i} {method} {path}: {r.status_code} {r.text[:200]}")
            elif r.status_code >= 400 and path.startswith("/v1/") and r.status_code not in (404, 405) and not _openai_error(r):
                failures.append(f"case {i} {method} {path}: {r.status_code} without an OpenAI-style error body: {r.text[:200]}")
    return {"cases": n, "codes": dict(sorted(codes.items())), "failures": failures}


# ---------------------------------------------------------------------------- soak
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: dict[str, int] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0

    def add(self, kind: str, code: int | None, ok: bool, seconds: float, tokens: int = 0, why: str = "") -> None:
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if code is not None:
                self.codes[code] = self.codes.get(code, 0) + 1
            if not ok:
                self.lost.append(f"{kind}: {why}")
            elif kind in ("complete", "chat", "stream", "chat-stream"):
                self.latencies.append(seconds)
                self.tokens += tokens


def _stream_ok(lines: list[str]) -> tuple[bool, int]:
    """A complete SSE answer: data chunks, the last non-empty line ``data: [DONE]``."""
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return False, 0
    toks = 0
    for d in data[:-1]:
        obj = json.loads(d)
        if "error" in obj:
            return False, 0
        if obj.get("usage"):
            toks = obj["usage"]["completion_tokens"]
    return True, toks


# request mix of the soak: (kind, share)
MIX = [("complete", 0.45), ("chat", 0.10), ("stream", 0.17), ("chat-stream", 0.08), ("disconnect", 0.10), ("malformed", 0.10)]


def soak_one(c: httpx.Client, base: str, rng: random.Random, i: int, max_tokens: int, tally: Tally) -> None:
    kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    chat = kind.startswith("chat") or (kind in ("disconnect", "malformed") and rng.random() < 0.3)
    body = _valid_chat(rng) if chat else _valid_completion(rng)
    body["max_tokens"] = rng.randint(1, max_tokens)
    body["temperature"] = rng.choice([0.0, 0.7, 1.0])
    if rng.random() < 0.5:
        body["seed"] = i
    path = base + ("/v1/chat/completions" if chat else "/v1/completions")
    t0 = time.perf_counter()
    try:
        if kind in ("complete", "chat"):
            r = c.post(path, json=body, headers=AUTH)
            resp = r.json() if r.status_code == 200 else {}
            ok = bool(resp.get("choices")) and "usage" in resp
            tally.add(kind, r.status_code, ok, time.perf_counter() - t0, resp["usage"]["completion_tokens"] if ok else 0,
                      why=f"{r.status_code} {r.text[:120]}")
        elif kind in ("stream", "chat-stream"):  # read to the end
            body.update(stream=True, stream_options={"include_usage": True})
            with c.stream("POST", path, json=body, headers=AUTH) as r:
                lines = list(r.iter_lines())
            ok, toks = _stream_ok(lines) if r.status_code == 200 else (False, 0)
            tally.add(kind, r.status_code, ok, time.perf_counter() - t0, toks, why=f"{r.status_code} incomplete stream ({len(lines)} lines)")
        elif kind == "disconnect":  # the client walks away after the first chunk
            body.update(stream=True, max_tokens=max_tokens)
            with c.stream("POST", path, json=body, headers=AUTH) as r:
                code = r.status_code
                next(r.iter_lines(), None)
            tally.add(kind, code, code == 200, time.perf_counter() - t0, why=f"{code} before the disconnect")
        else:
            raw = rng.choice([b'{"model": "soak", "prompt": ', b"[]", json.dumps({**body, "max_tokens": -3}).encode(),
                              json.dumps({**body, "temperature": "hot"}).encode()])
            r = c.post(path, content=raw, headers=AUTH)
            tally.add(kind, r.status_code, r.status_code == 400 and _openai_error(r), time.perf_counter() - t0,
                      why=f"{r.status_code} {r.text[:120]}")
    except httpx.HTTPError as e:
        tally.add(kind, None, False, time.perf_counter() - t0, why=f"{type(e).__name__}: {e}")


def server_rss(proc: psutil.Process) -> int:
    """Resident bytes of the server and all its children (LitServe's API + worker)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_soak(server: ServerProcess, n: int, concurrency: int, max_tokens: int, seed: int, timeout: float) -> dict:
    tally = Tally()
    clients = threading.local()
    rngs = [random.Random(seed * 100_003 + i) for i in range(n)]

    def one(i: int) -> None:
        if not hasattr(clients, "c"):
            clients.c = httpx.Client(timeout=timeout)
        soak_one(clients.c, server.base, rngs[i], i, max_tokens, tally)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(tally.latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"requests": n, "wall_s": wall, "kinds": dict(sorted(tally.kinds.items())), "codes": dict(sorted(tally.codes.items())),
            "lost": tally.lost, "p50_s": pct(0.5), "p99_s": pct(0.99), "completion_tokens": tally.tokens,
            "mean_s": statistics.fmean(lat) if lat else float("nan")}


def settle(server: ServerProcess, seconds: float = 30.0) -> tuple[float, float]:
    """Wait until the engine has no active request and the API nothing in flight."""
    deadline = time.monotonic() + seconds
    active = inflight = float("nan")
    while time.monotonic() < deadline:
        active = server.metric("dspark_active_requests", AUTH)
        inflight = server.metric("dspark_http_inflight_requests", AUTH)
        if active == 0 and inflight == 0:
            break
        time.sleep(0.3)
    return active, inflight


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="", help="model path or name (default: a tiny random Gemma 3 made on the fly)")
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fuzz", type=int, default=2000, help="fuzz cases (0: skip)")
    ap.add_argument("--soak", type=int, default=2000, help="soak requests (0: skip)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request seconds before it counts as lost")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="dspark-soak-") as tmp:
        target = args.target
        if not target:
            from tests.train.tiny_model import make_tiny_model_dir

            target = str(make_tiny_model_dir(Path(tmp) / "tiny"))
        server = ServerProcess(
            ["--target", target, "--dtype", args.dtype, "--drafter", args.drafter, "--policy", args.policy, "--api-key", KEY,
             "--model-name", MODEL, "--max-batch", str(args.concurrency), "--max-queue", str(2 * args.concurrency),
             "--max-context", "512", "--max-tokens-limit", str(max(64, args.max_tokens)), "--log-level", "warning"],
            Path(tmp) / "server.log", timeout=600,
        )
        proc = psutil.Process(server.proc.pid)
        report: dict = {}
        try:
            httpx.post(server.base + "/v1/completions", json=_valid_completion(random.Random(0)), headers=AUTH, timeout=120)  # warm-up
            rss0 = server_rss(proc)
            if args.fuzz:
                report["fuzz"] = run_fuzz(server.base, args.fuzz, args.seed, args.timeout)
            if args.soak:
                report["soak"] = run_soak(server, args.soak, args.concurrency, args.max_tokens, args.seed, args.timeout)
            active, inflight = settle(server)
            rss1 = server_rss(proc)
            report.update(active_after=active, inflight_after=inflight, rss_before_mb=rss0 / 2**20, rss_after_mb=rss1 / 2**20,
                          server_alive=server.proc.poll() is None)
        finally:
            server.stop()

    cmd = "python tools/soak_serve.py " + " ".join(sys.argv[1:])
    print(f"\n`{cmd}`  ")
    print(f"{dt.date.today()}, {platform.machine()}, target {args.target or 'tiny random Gemma 3'}, drafter {args.drafter}\n")
    fails: list[str] = []
    if "fuzz" in report:
        f = report["fuzz"]
        print(f"fuzz: {f['cases']} cases, status codes {f['codes']}, failures {len(f['failures'])}")
        for line in f["failures"][:20]:
            print("  ", line)
        fails += f["failures"]
    if "soak" in report:
        s = report["soak"]
        five = sum(v for k, v in s["codes"].items() if k >= 500)
        print(f"soak: {s['requests']} requests at concurrency {args.concurrency} in {s['wall_s']:.0f} s; kinds {s['kinds']}")
        print(f"  status codes {s['codes']}; lost {len(s['lost'])}; 5xx {five}; "
              f"latency p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s; {s['completion_tokens']} completion tokens")
        for line in s["lost"][:20]:
            print("  ", line)
        fails += s["lost"] + ([f"{five} responses were 5xx"] if five else [])
    print(f"after: active slots {report['active_after']:g}, in flight {report['inflight_after']:g}; "
          f"server RSS {report['rss_before_mb']:.0f} MiB before, {report['rss_after_mb']:.0f} MiB after; alive {report['server_alive']}")
    if report["active_after"] != 0 or report["inflight_after"] != 0:
        fails.append("slots or in-flight requests were not freed")
    if not report["server_alive"]:
        fails.append("the server died")
    print("PASS" if not fails else f"FAIL ({len(fails)} problems)")
    return 0 if not fails else 1


if __name__ == "__main__":
    raise SystemExit(main())
