"""The HTTP server end to end on a tiny random Gemma 3: the real `openai` client,
OpenAI-style errors, API key, disconnects, overload (503) and a 500-request load test,
and fp32 greedy identity with plain AR decoding for every scheduler policy."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest
import torch

from dspark.drafters import build_drafter
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.target import Target
from tests.serve.server_util import ServerProcess
from tests.train.tiny_model import make_tiny_model_dir

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = ServerProcess(
        ["--target", str(tiny_dir), "--dtype", "float32", "--drafter", "ngram", "--policy", "static", "--api-key", KEY,
         "--max-batch", "4", "--max-queue", "12", "--max-context", "256", "--max-tokens-limit", "64", "--model-name", "tiny"],
        tmp_path_factory.mktemp("log") / "server.log",
    )
    yield s
    s.stop()


def test_openai_client_completes_chats_and_streams(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 8
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.7, seed=1)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens <= 6 and isinstance(text, str)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    stream = list(client.completions.create(model="tiny", prompt="abc", max_tokens=5, stream=True, temperature=0))
    streamed = "".join(ch.choices[0].text for ch in stream)
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0).choices[0].text
    assert streamed == full  # greedy: the stream and the one-shot answer agree


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_bench_serve_drives_a_running_openai_server(server, api, tmp_path):
    """tools/bench_serve.py --openai-url: the same load against any OpenAI-compatible server
    (here ours, with an API key); tokens counted from usage, tau from our /metrics."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_serve.py", "--openai-url", server.base + "/v1", "--model", "tiny", "--api", api,
         "--api-key", KEY, "--label", "ours-tiny", "--concurrency", "1", "2", "--max-tokens", "6", "--prompts", "8",
         "--min-requests", "4", "--max-prompt-chars", "120", "--plot", "", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.loads(out.read_text())["ours-tiny"]
    for c in ("1", "2"):
        assert res[c]["errors"] == 0 and res[c]["requests"] == 4 and res[c]["agg_tps"] > 0
        assert res[c]["tau"] is not None and res[c]["tau"] >= 1.0  # from the dspark_* counters
        t = res[c]["time_s"]  # the server's own time accounting, nested: engine <= service <= worker
        assert 0 < t["engine"] <= t["service"] <= t["worker"] and t["loop_gap"] >= 0
        assert t["worker"] + t["loop_gap"] <= res[c]["wall_s"] * 1.05 + 0.05
    assert "| ours-tiny |" in proc.stdout and "Where the server's time went" in proc.stdout


def test_api_key_is_required(server):
    r = httpx.get(server.base + "/v1/models")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


BAD = [
    ("malformed json", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("max_tokens string", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ("max_tokens zero", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ("max_tokens above limit", {"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens must be in"),
    ("temperature type", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("prompt type", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt must be"),
    ("prompt too long", {"model": "tiny", "prompt": "y" * 400, "max_tokens": 4}, 400, "context is 256 tokens"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    # found by tools/soak_serve.py: quoting a lone surrogate made rendering the 404 raise (500)
    ("model with a lone surrogate", b'{"model": "\\ud800", "prompt": "x"}', 404, "does not exist"),
    ("stop type", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop"),
    ("n > 1", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n=1"),
]


@pytest.mark.parametrize("name,body,status,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests_get_openai_errors(server, name, body, status, msg):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base + "/v1/completions", headers=AUTH, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert msg in err["message"] and {"message", "type", "param", "code"} <= set(err)


@pytest.mark.parametrize("messages,msg", [
    ([], "non-empty list"),
    ([{"role": "user", "content": ""}], "all empty"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "wizard", "content": "x"}], "role"),
    ("hello", "non-empty list"),
])
def test_bad_chat_requests(server, messages, msg):
    r = httpx.post(server.base + "/v1/chat/completions", headers=AUTH, json={"model": "tiny", "messages": messages}, timeout=30)
    assert r.status_code == 400 and msg in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_its_slot(server):
    """A client that goes away mid-stream cancels its request. The tiny target can decode all
    64 tokens before the server sees the disconnect; such an attempt (it finished normally)
    proves nothing, so it is retried, up to three times."""
    names = {k: f'dspark_finished_requests_total{{reason="{k}"}}' for k in ("cancelled", "length", "stop")}
    for _attempt in range(3):
        before = {k: server.metric(n, AUTH) for k, n in names.items()}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", server.base + "/v1/completions", headers=AUTH,
                          json={"model": "tiny", "prompt": "q", "max_tokens": 64, "stream": True, "temperature": 1.0}) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first chunk arrived: the request is decoding
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = {k: server.metric(n, AUTH) for k, n in names.items()}
            if sum(now.values()) > sum(before.values()) and server.metric("dspark_active_requests", AUTH) == 0:
                break
            time.sleep(0.2)
        if now["cancelled"] > before["cancelled"]:
            break
    assert now["cancelled"] > before["cancelled"], f"no attempt was cancelled: finished counters {now} (before the last: {before})"
    assert server.metric("dspark_http_inflight_requests", AUTH) == 0


def _post(base: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(base + "/v1/completions", headers=AUTH, json=body, timeout=120)
    return r.status_code, r.json()


def test_burst_beyond_the_queue_gets_503_and_the_server_keeps_serving(server):
    """40 simultaneous requests against 4 batch slots + 12 queue places: the overflow gets
    503, the rest 200. On a loaded 2-core box the client's threads can start so slowly that
    the tiny target drains the queue before it fills; such an attempt (all 200) proves
    nothing about the overflow, so it is retried, up to three times."""
    body = {"model": "tiny", "prompt": "burst", "max_tokens": 64, "temperature": 1.0}
    for _attempt in range(3):
        with cf.ThreadPoolExecutor(40) as ex:
            codes = [c for c, _ in ex.map(lambda _: _post(server.base, body), range(40))]
        assert set(codes) <= {200, 503} and codes.count(200) >= 16
        if codes.count(503):
            break
    assert codes.count(503) > 0, f"no attempt overflowed the queue: {codes}"
    code, resp = _post(server.base, {"model": "tiny", "prompt": "after", "max_tokens": 4})
    assert code == 200 and resp["usage"]["completion_tokens"] <= 4


def test_500_requests_at_concurrency_16_zero_errors(server):
    def one(i: int) -> tuple[int, int]:
        code, resp = _post(server.base, {"model": "tiny", "prompt": f"load {i}", "max_tokens": 8, "temperature": 1.0, "seed": i})
        return code, resp.get("usage", {}).get("completion_tokens", -1)

    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(500)))
    codes = [c for c, _ in results]
    assert codes.count(200) == 500, {c: codes.count(c) for c in set(codes)}
    assert all(1 <= n <= 8 for _, n in results)


@pytest.fixture(scope="module")
def dspark_dir(tiny_dir, tmp_path_factory):
    t = Target.load(str(tiny_dir), dtype="float32")
    torch.manual_seed(0)
    d = build_drafter("dspark", t, gamma=5, feature_layers=[0, 1], num_layers=1, mask_token_id=3)
    path = tmp_path_factory.mktemp("drafter") / "dspark"
    d.save_pretrained(str(path))
    return path


# Every policy keeps greedy identity under concurrency in process (tests/serve/test_service.py);
# through HTTP, with a server of its own each (~16 s to start), the n-gram path and the
# trained-model drafter under the async scheduler, the most involved one.
@pytest.mark.parametrize("policy", ["static", "async"])
def test_greedy_fp32_identity_through_the_server(tiny_dir, dspark_dir, tmp_path, policy):
    t = Target.load(str(tiny_dir), dtype="float32")
    g = torch.Generator().manual_seed(5)
    base = torch.randint(4, t.vocab_size, (10,), generator=g).tolist()
    prompts = [(base * 5)[:40], torch.randint(4, t.vocab_size, (25,), generator=g).tolist(), (base * 3)[:17]]
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0.0))
    want = [ar_generate(t, p, cfg).tokens for p in prompts]
    drafter = "ngram" if policy == "static" else ("none" if policy == "none" else str(dspark_dir))
    s = ServerProcess(["--target", str(tiny_dir), "--dtype", "float32", "--drafter", drafter, "--policy", policy,
                       "--gamma", "5", "--model-name", "tiny", "--max-batch", "2"], tmp_path / "server.log")
    try:
        def ask(p):
            r = httpx.post(s.base + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        alone = ask(prompts[0])
        with cf.ThreadPoolExecutor(6) as ex:  # 6 concurrent requests on 2 slots
            together = list(ex.map(ask, prompts * 2))
    finally:
        s.stop()
    assert alone == want[0]
    assert together == want * 2, f"policy {policy}: concurrent greedy output differs from AR"
