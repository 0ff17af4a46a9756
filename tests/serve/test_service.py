"""ServeEngine without HTTP: greedy identity for every scheduler policy, continuous
batching with a slot limit, cancellation, stop strings, limits and metrics."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import NgramDrafter, build_drafter
from dspark.errors import InvalidRequestError
from dspark.generate import GenerationConfig, ar_generate
from dspark.sampling import SamplingParams
from dspark.scheduler import PrefixScheduler, SPSProfile
from dspark.target import Target
from serve.protocol import prometheus_text
from serve.service import ServeEngine, ServeRequest, TextStream, _held_back
from tests.tiny import tiny_gemma3
from tests.train.tiny_model import make_tiny_model_dir

SPS = SPSProfile([1, 4, 8, 16, 32, 64], [100.0, 95.0, 80.0, 60.0, 40.0, 20.0])


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Target:
    return Target.load(str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))), dtype="float32")


def prompts(target: Target, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randint(4, target.vocab_size, (12,), generator=g).tolist()
    return [(base * 4)[: 20 + 7 * i] if i % 2 == 0 else torch.randint(4, target.vocab_size, (30 + i,), generator=g).tolist() for i in range(n)]


def run_all(svc: ServeEngine, reqs: dict[str, ServeRequest], max_steps: int = 2000) -> dict[str, list]:
    out: dict[str, list] = {u: [] for u in reqs}
    for u, r in reqs.items():
        svc.submit(u, r)
    for _ in range(max_steps):
        if not svc.has_work():
            break
        for ev in svc.step():
            out[ev.uid].append(ev)
    assert not svc.has_work(), "requests did not finish"
    return out


def engine(target, policy: str, max_batch: int = 16) -> ServeEngine:
    if policy == "none":
        return ServeEngine(target, None, max_batch=max_batch)
    if policy == "static":
        drafter = NgramDrafter(num_tokens=5)
    else:
        torch.manual_seed(0)
        drafter = build_drafter("dspark", target, gamma=5, feature_layers=[0, 1], num_layers=1, mask_token_id=3)
    sch = PrefixScheduler(policy=policy, sps=SPS, gamma=5, threshold=0.3)
    return ServeEngine(target, drafter, num_draft=5, scheduler=sch, max_batch=max_batch)


@pytest.mark.parametrize("policy", ["none", "static", "threshold", "sync", "async"])
def test_greedy_identity_every_policy_under_concurrency(target, policy):
    ps = prompts(target, 6)
    want = [ar_generate(target, p, GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0.0), stop_token_ids=[])).tokens for p in ps]
    svc = engine(target, policy, max_batch=4)  # 6 requests, 4 slots: some join later
    reqs = {f"r{i}": ServeRequest(prompt=p, max_tokens=24, temperature=0.0) for i, p in enumerate(ps)}
    got = run_all_no_eos(svc, reqs)
    for i in range(len(ps)):
        assert got[f"r{i}"] == want[i], f"request {i} differs from AR under policy {policy}"


def run_all_no_eos(svc: ServeEngine, reqs: dict[str, ServeRequest]) -> dict[str, list[int]]:
    """Like run_all, with end-of-sequence ignored so every request runs to max_tokens."""
    orig = svc.engine.add_request

    def add(ids, cfg, seed=None):
        cfg.stop_token_ids = []
        return orig(ids, cfg, seed)

    svc.engine.add_request = add
    evs = run_all(svc, reqs)
    return {u: [t for e in es for t in e.token_ids] for u, es in evs.items()}


def test_slot_limit_queue_and_finish_events(target):
    svc = engine(target, "static", max_batch=2)
    reqs = {f"r{i}": ServeRequest(prompt=p, max_tokens=6, temperature=1.0, seed=i) for i, p in enumerate(prompts(target, 5))}
    for u, r in reqs.items():
        svc.submit(u, r)
    peak = 0
    finished = {}
    while svc.has_work():
        for ev in svc.step():
            assert ev.completion_tokens <= 6
            if ev.finish_reason:
                finished[ev.uid] = ev
        peak = max(peak, svc.num_active)
        assert svc.metrics.queued <= 3
    assert peak == 2 and set(finished) == set(reqs)
    assert all(e.finish_reason in ("length", "stop") for e in finished.values())
    snap = svc.metrics.snapshot()
    assert snap["requests_total"] == 5 and snap["finished_total"]["length"] + snap["finished_total"]["stop"] == 5
    assert snap["tau"] >= 1.0 and snap["active_requests"] == 0


def test_cancel_frees_the_slot_and_engine_state(target):
    svc = engine(target, "sync", max_batch=1)
    ps = prompts(target, 2)
    svc.submit("a", ServeRequest(prompt=ps[0], max_tokens=200, temperature=1.0, seed=0))
    svc.submit("b", ServeRequest(prompt=ps[1], max_tokens=3, temperature=1.0, seed=1))
    svc.step()
    svc.step()
    assert svc.num_active == 1 and svc.metrics.queued == 1
    svc.cancel("a")
    evs = svc.step()
    assert any(e.uid == "a" and e.finish_reason == "cancelled" for e in evs)
    assert "a" not in svc._live and all(r.rid != 0 for r in svc.engine._requests.values())
    done = []
    while svc.has_work():
        done += [e.uid for e in svc.step() if e.finish_reason]
    assert done == ["b"] and svc.engine._requests == {} and svc._live == {}
    # a queued request can be cancelled before it ever runs
    svc.submit("c", ServeRequest(prompt=ps[0], max_tokens=5))
    svc.cancel("c")
    assert [e.finish_reason for e in svc.step()] == ["cancelled"]


def test_stop_strings_cut_the_text_and_finish(target):
    svc = engine(target, "none")
    p = prompts(target, 1)[0]
    ref = run_all(svc, {"x": ServeRequest(prompt=p, max_tokens=30, temperature=0.0)})["x"]
    full = "".join(e.text for e in ref)
    cut = next(i for i in range(1, len(full) - 2) if full.find(full[i : i + 2]) == i)
    stop = full[cut : cut + 2]
    svc2 = engine(target, "none")
    evs = run_all(svc2, {"y": ServeRequest(prompt=p, max_tokens=30, temperature=0.0, stop=(stop,))})["y"]
    text = "".join(e.text for e in evs)
    assert text == full[:cut] and evs[-1].finish_reason == "stop" and stop not in text


def test_held_back_text():
    assert _held_back("abc\ufffd", ()) == 1
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz",)) == 0


def test_limits_give_clear_errors(target):
    svc = ServeEngine(target, None, max_context=64, max_tokens_limit=32)
    with pytest.raises(InvalidRequestError, match="context is 64 tokens"):
        svc.submit("a", ServeRequest(prompt=list(range(4, 60)), max_tokens=16))
    with pytest.raises(InvalidRequestError, match="max_tokens must be in"):
        svc.submit("a", ServeRequest(prompt=[5, 6], max_tokens=33))
    with pytest.raises(InvalidRequestError, match="outside"):
        svc.submit("a", ServeRequest(prompt=[5, 10**6], max_tokens=3))
    with pytest.raises(InvalidRequestError, match="empty"):
        svc.submit("a", ServeRequest(prompt="", max_tokens=3))
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        svc.submit("a", ServeRequest(messages=[{"role": "user", "content": "  "}], max_tokens=3))
    assert not svc.has_work()


def test_metrics_count_rounds_with_and_without_a_draft():
    """tau counts every request round; drafted_rounds_total only those that verified a
    draft (vLLM's num_drafts), so both definitions of tau can be read off /metrics."""
    from serve.service import ServeMetrics

    m = ServeMetrics(positions=4)
    m.record_step([(1, 3, 2), (2, 0, 0)], new_tokens=4)
    m.record_step([(1, 4, 0)], new_tokens=1)
    snap = m.snapshot()
    assert snap["request_rounds_total"] == 3 and snap["drafted_rounds_total"] == 2
    assert snap["accepted_tokens_total"] == 2 and snap["tau"] == (2 + 3) / 3
    assert 1 + snap["accepted_tokens_total"] / snap["drafted_rounds_total"] == 2.0
    assert "dspark_drafted_rounds_total 2" in prometheus_text(snap)


def test_prometheus_text_is_well_formed(target):
    svc = engine(target, "static")
    run_all(svc, {"a": ServeRequest(prompt=prompts(target, 1)[0], max_tokens=8, temperature=0.0)})
    text = prometheus_text(svc.metrics.snapshot(), {"inflight_requests": 0})
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for want in ("dspark_tau", "dspark_acceptance_by_position", "dspark_verify_tokens_per_request_step",
                 "dspark_tokens_per_second", "dspark_queue_depth", "dspark_http_inflight_requests"):
        assert want in names
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])  # every sample has a numeric value
    snap = svc.metrics.snapshot()
    # time accounting: the engine's steps are part of the service's steps
    assert 0 < snap["engine_seconds_total"] <= snap["service_seconds_total"]
    assert "dspark_engine_seconds_total" in names and "dspark_loop_gap_seconds_total" in names


class _CharTokenizer:
    """ids 4.. are the characters 'a'..; 1 is EOS. ``unstable_after``: decoding more than
    that many ids capitalises the first character (a decode that is not prefix-stable)."""

    chat_template = None
    eos_token_id = 1

    def __init__(self, unstable_after: int | None = None) -> None:
        self.unstable_after = unstable_after

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(chr(ord("a") + (i - 4) % 26) for i in ids if i >= 4)
        if self.unstable_after is not None and len(ids) > self.unstable_after:
            text = text[:1].upper() + text[1:]
        return text


def test_stop_string_ending_in_a_partial_utf8_character_is_held_back():
    """Issue #11 defect 1: stop "a€", decoded text "xa\\ufffd" then "xa€": the client must
    receive "x", never the "a" that begins the stop string."""
    assert _held_back("xa\ufffd", ("a€",)) == 2
    pieces = [b"x", b"a", b"\xe2", b"\x82\xac", b"tail"]
    stream = TextStream(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"), ("a€",))
    sent, stopped = "", False
    for i in range(len(pieces)):
        delta, stopped, count = stream.push([i], final=False)
        sent += delta
        if stopped:
            break
    assert sent == "x" and stopped and count == 4  # the tokens up to the one completing the stop


def test_text_is_not_lost_when_decode_is_not_prefix_stable(target):
    """Issue #11 defect 3: re-decoding all ids with a tokenizer whose decode of a longer
    sequence is not an extension of a shorter one used to stall the stream for good."""
    t = Target(target.model, _CharTokenizer(unstable_after=5), name="unstable")
    svc = ServeEngine(t, NgramDrafter(num_tokens=4), num_draft=4)
    evs = run_all(svc, {"x": ServeRequest(prompt=prompts(target, 1)[0], max_tokens=24, temperature=0.0)})["x"]
    ids = [i for e in evs for i in e.token_ids]
    text = "".join(e.text for e in evs)
    assert len(ids) == 24 and text.lower() == _CharTokenizer().decode(ids)


def test_stop_cut_trims_token_ids_and_usage(target):
    """Issue #11 defect 2: after a stop-string cut, token_ids and completion_tokens must end
    with the token that completed the stop string, also when one engine step brought
    several tokens past it (accepted drafts)."""
    from serve.service import _Live

    class OneStep:  # the engine's side of a step that gained 6 tokens, still running
        def finish_reason(self, rid):
            return None

        def cancel(self, rid):
            pass

    t = Target(target.model, _CharTokenizer(), name="chars")
    svc = ServeEngine(t, None)
    svc.engine = OneStep()
    live = _Live("u", 0, 3, TextStream(t.decode, ("cd",)))
    svc._live["u"], svc._by_rid[0] = live, "u"
    first = svc._advance(live, [4, 5])  # "ab"
    ev = svc._advance(live, [6, 7, 8, 9, 10, 11])  # "cdefgh": the stop "cd" then 4 more tokens
    assert first.text + ev.text == "ab" and ev.finish_reason == "stop"
    assert first.token_ids + ev.token_ids == [4, 5, 6, 7] and ev.completion_tokens == 4


def test_settings_name_bad_head_and_gemm_choices():
    from serve.api import ServeSettings

    with pytest.raises(ValueError, match="--lm-head"):
        ServeSettings(lm_head="int8")
    with pytest.raises(ValueError, match="--cpu-gemm"):
        ServeSettings(cpu_gemm="onednn")
    assert ServeSettings(cpu_gemm="library").cpu_gemm == "library"
    with pytest.raises(ValueError, match="--decoder"):
        ServeSettings(decoder="compiled")


def test_sps_profile_key_names_the_decoder_path():
    """A profile measured on HF's forward is not reused for the fast step, and the other way."""
    from serve.service import profile_target_sps, sps_profile_key

    t = tiny_gemma3(vocab=64)
    assert sps_profile_key(t, [1, 2])["decoder"] == "fast-slots"
    t.fast_decoder = False
    assert sps_profile_key(t, [1, 2])["decoder"] == "hf-slots"
    prof = profile_target_sps(t, [1, 2, 4], context=16, repeats=1)
    assert all(prof(b) > 0 for b in (1, 2, 4))
