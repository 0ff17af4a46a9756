"""LitServe layer: OpenAI-compatible HTTP in front of :class:`~serve.service.ServeEngine`.

Process layout (LitServe's): the uvicorn API process runs :class:`OpenAIEndpoints`, which
parses and validates requests (``serve.protocol``), puts them on LitServe's request
queue and streams the worker's events back as JSON or server-sent events. One inference
worker runs :class:`SpeculativeAPI` under a continuous-batching loop: every loop step is
one engine step over all active requests. A client that disconnects sends a cancel
message through the same queue, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from serve import protocol
from serve.protocol import ProtocolError

log = logging.getLogger("serve")


@dataclass
class ServeSettings:
    """Everything ``python -m serve`` configures (see ``python -m serve --help``)."""

    target: str = "gemma3-270m"
    dtype: str = "auto"  # auto: bfloat16 where the device computes it natively (CUDA, AVX512-BF16 / AMX), else float32
    drafter: str = "ngram"  # ngram | none | a saved drafter directory
    policy: str = "auto"  # auto (sync with a confidence head, else static) | none | static | threshold | sync | async
    gamma: int = 7
    threshold: float = 0.5
    max_batch: int = 16
    max_queue: int = 64  # requests waiting beyond max_batch before new ones get 503
    max_context: int = 4096
    max_tokens_limit: int = 2048
    model_name: str = ""
    api_key: str | None = None
    draft_gate: bool = True  # sync / async: skip drafting in steps where plain decoding is expected to be faster
    ngram_fallback: int = 0  # >0, trained drafters: prompt lookup for rows whose context repeats an n-gram this long
    sps_refresh: bool = False
    sps_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    metrics_file: str = ""
    threads: int = 0  # torch intra-op threads of the engine process (0: torch's default, one per core)
    lm_head: str = "auto"  # auto: the LM head's exact fp16 screen where it measures faster (CPU, fp32) | screen | full
    cpu_gemm: str = "auto"  # auto: few-row fp32 CPU products through oneDNN on prepacked weights where available | library
    decoder: str = "auto"  # auto: decoding steps through dspark.fast_decoder where it supports the target | hf

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"--dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.policy not in ("auto", "none", "static", "threshold", "sync", "async"):
            raise ValueError(f"--policy must be auto, none, static, threshold, sync or async, got {self.policy!r}")
        for name in ("gamma", "max_batch", "max_context", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.ngram_fallback < 0:
            raise ValueError(f"--ngram-fallback must be >= 0, got {self.ngram_fallback}")
        if self.ngram_fallback and self.drafter in ("ngram", "none"):
            raise ValueError("--ngram-fallback puts prompt lookup in front of a trained drafter; --drafter is " + self.drafter)
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.lm_head not in ("auto", "screen", "full"):
            raise ValueError(f"--lm-head must be auto, screen or full, got {self.lm_head!r}")
        if self.cpu_gemm not in ("auto", "library"):
            raise ValueError(f"--cpu-gemm must be auto or library, got {self.cpu_gemm!r}")
        if self.decoder not in ("auto", "hf"):
            raise ValueError(f"--decoder must be auto or hf, got {self.decoder!r}")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not self.model_name:
            tail = "ar" if self.drafter == "none" or self.policy == "none" else Path(self.drafter).name
            self.model_name = f"{Path(self.target).name}+{tail}"
        if not self.metrics_file:
            self.metrics_file = str(Path(tempfile.gettempdir()) / f"dspark-serve-metrics-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")


def build_service(s: ServeSettings, device: str = "cpu"):
    """Target, drafter, scheduler (with its SPS profile) and the engine. No HTTP here."""
    from dspark.drafters import NgramDrafter, load_drafter
    from dspark.scheduler import PrefixScheduler, cached_sps
    from dspark.target import Target
    from serve.service import ServeEngine, profile_target_sps, sps_profile_key

    target = Target.load(s.target, dtype=s.dtype, device=device)
    target.screen_head = {"auto": None, "screen": True, "full": False}[s.lm_head]
    if s.cpu_gemm == "library":
        target.use_packed_linears(False)
    target.fast_decoder = {"auto": None, "hf": False}[s.decoder]
    if s.drafter == "none" or s.policy == "none":
        drafter = None
    elif s.drafter == "ngram":
        drafter = NgramDrafter(num_tokens=s.gamma)
    else:
        drafter = load_drafter(s.drafter, target)
        if target.dtype != next(drafter.parameters()).dtype:
            drafter = drafter.to(target.dtype)
        if s.ngram_fallback:
            from dspark.drafters.fallback import NgramFallbackDrafter

            drafter = NgramFallbackDrafter(drafter, min_match=s.ngram_fallback, num_tokens=s.gamma)
    scheduler = None
    policy = s.policy
    if policy == "auto":
        policy = "sync" if getattr(drafter, "conf", None) is not None else "static"
    if drafter is not None and policy in ("threshold", "sync", "async") and getattr(drafter, "conf", None) is None:
        raise ValueError(f"--policy {policy} needs a drafter with a confidence head (a trained dspark drafter); use --policy static")
    if drafter is not None:
        sps = None
        if policy in ("sync", "async"):
            key = sps_profile_key(target, s.sps_tokens)
            t0 = time.perf_counter()
            sps = cached_sps(key, lambda: profile_target_sps(target, s.sps_tokens), refresh=s.sps_refresh)
            log.info("SPS profile ready in %.1f s: %s", time.perf_counter() - t0, sps.to_dict())
        log.info("scheduler policy: %s", policy)
        scheduler = PrefixScheduler(policy=policy, sps=sps, gamma=s.gamma, threshold=s.threshold, draft_gate=s.draft_gate)
    return ServeEngine(target, drafter, num_draft=s.gamma, scheduler=scheduler, max_batch=s.max_batch,
                       max_context=s.max_context, max_tokens_limit=s.max_tokens_limit)


class _Loop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop, minus its idle busy-wait."""

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.002)
            return
        await super().run(lit_api, *args, **kwargs)


class SpeculativeAPI(ls.LitAPI):
    """The inference worker: owns the :class:`ServeEngine`; each ``step`` is one engine step."""

    def __init__(self, settings: ServeSettings, spec: LitSpec) -> None:
        super().__init__(max_batch_size=settings.max_batch, stream=True, spec=spec, loop=_Loop(), api_path="/v1/_engine")
        self.settings = settings

    def setup(self, device: str) -> None:
        # Every torch call of the engine runs on this one thread. LitServe calls step()
        # through asyncio.to_thread, i.e. on whichever thread of the default executor is
        # free; with OpenMP every new calling thread gets its own team of worker threads,
        # and several teams spinning on a 2-core box slowed c=1 decoding (docs/serving.md).
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dspark-engine")
        self._engine_thread.submit(self._setup, device).result()
        log.info("engine ready: %s", self.settings.model_name)

    def _setup(self, device: str) -> None:
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)
        self.service = build_service(self.settings, device if str(device).startswith("cuda") else "cpu")
        self._acks: deque[Output] = deque()
        self._last_metrics = 0.0
        self._pending_since: float | None = None  # end of the last step that left work pending
        self._write_metrics(force=True)

    # the loop calls these ---------------------------------------------------------
    def has_capacity(self) -> bool:
        return True  # ServeEngine queues beyond max_batch itself; the API layer bounds the queue

    def has_active_requests(self) -> bool:
        return bool(self._acks) or self.service.has_work()

    def add_request(self, uid: str, request: dict[str, Any]) -> None:
        from dspark.errors import InvalidRequestError
        from serve.service import ServeRequest

        if request.get("kind") == "cancel":
            self.service.cancel(request["uid"])
            self._acks.append(Output(uid, {}, LitAPIStatus.FINISH_STREAMING))
            return
        try:
            req = ServeRequest(**request["request"])
            self.service.submit(uid, req)
        except (InvalidRequestError, ValueError, TypeError) as e:
            self._acks.append(Output(uid, protocol.error_body(str(e), 400), LitAPIStatus.OK))
            self._acks.append(Output(uid, {}, LitAPIStatus.FINISH_STREAMING))

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        pool = getattr(self, "_engine_thread", None)
        if pool is None:  # set up by hand (tests): run here
            return self._step(prev_outputs)
        return pool.submit(self._step, prev_outputs).result()

    def _step(self, prev_outputs: list[Output] | None) -> list[Output]:
        t0 = time.perf_counter()
        m = self.service.metrics
        if self._pending_since is not None:
            m.loop_gap_seconds += t0 - self._pending_since
        outs, finished = self._step_inner()
        m.worker_seconds += time.perf_counter() - t0
        pending = self.service.has_work()
        self._write_metrics(force=finished or not pending)  # after the accounting, so a snapshot holds whole steps
        self._pending_since = time.perf_counter() if pending else None
        return outs

    def _step_inner(self) -> tuple[list[Output], bool]:
        outs: list[Output] = []
        while self._acks:
            outs.append(self._acks.popleft())
        try:
            events = self.service.step()
        except Exception as e:  # keep serving: fail the requests in flight, not the server
            log.exception("engine step failed")
            events = []
            for uid in self.service.live_ids():
                self.service.cancel(uid)
                outs.append(Output(uid, protocol.error_body(f"internal error in the engine: {e}", 500), LitAPIStatus.OK))
                outs.append(Output(uid, {}, LitAPIStatus.FINISH_STREAMING))
            self.service.step()  # apply the cancels
        finished = False
        for ev in events:
            outs.append(Output(ev.uid, asdict(ev), LitAPIStatus.OK))
            if ev.finish_reason is not None:
                finished = True
                outs.append(Output(ev.uid, {}, LitAPIStatus.FINISH_STREAMING))
        return outs, finished

    def encode_response(self, output: Any) -> Any:
        return output

    def _write_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_metrics < 0.25:
            return
        self._last_metrics = now
        path = Path(self.settings.metrics_file)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.service.metrics.snapshot()))
        os.replace(tmp, path)


class OpenAIEndpoints(LitSpec):
    """/v1/completions, /v1/chat/completions, /v1/models and /metrics."""

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__()
        self.api_path = "/v1/_engine"  # LitServe's request-queue key; the routes are below
        self.settings = settings
        self.created = int(time.time())
        self.inflight = 0
        self.rejected = 0
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> JSONResponse | None:
        key = self.settings.api_key
        if not key:
            return None
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if hmac.compare_digest(token.encode(), key.encode()):
            return None
        return JSONResponse(protocol.error_body("invalid or missing API key (send Authorization: Bearer <key>)", 401, code="invalid_api_key"), 401)

    @staticmethod
    def _error(e: ProtocolError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def _submit(self, payload: dict[str, Any]):
        uid = str(uuid.uuid4())
        q: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
        return uid, self._server.data_streamer(q, event, send_status=True)

    def _cancel(self, uid: str) -> None:
        self.response_buffer.pop(uid, None)
        self.request_queue.put((self.response_queue_id, str(uuid.uuid4()), time.monotonic(), {"kind": "cancel", "uid": uid}))

    async def _events(self, stream):
        async for data, status in stream:
            if status == LitAPIStatus.ERROR:
                yield {"error": {"message": f"inference worker error: {data}", "type": "server_error", "param": None, "code": None}}
                return
            yield json.loads(data) if isinstance(data, str) else data

    # ------------------------------------------------------------------ endpoints
    async def models(self, request: Request):
        if (bad := self._auth(request)) is not None:
            return bad
        return JSONResponse(protocol.models_list(self.settings.model_name, self.created))

    async def metrics(self, request: Request):
        if (bad := self._auth(request)) is not None:
            return bad
        try:
            snap = json.loads(Path(self.settings.metrics_file).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            snap = {}
        text = protocol.prometheus_text(snap, {"inflight_requests": self.inflight, "rejected_requests_total": self.rejected})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        if (bad := self._auth(request)) is not None:
            return bad
        try:
            body = protocol.parse_json(await request.body())
            parse = protocol.parse_chat if chat else protocol.parse_completion
            sreq, opts = parse(body, self.settings.model_name)
            stream, include_usage = opts["stream"], opts["include_usage"]
        except ProtocolError as e:
            return self._error(e)
        if self.inflight >= self.settings.max_batch + self.settings.max_queue:
            self.rejected += 1
            return JSONResponse(
                protocol.error_body(f"server busy: {self.inflight} requests in flight (limit {self.settings.max_batch + self.settings.max_queue}); retry later", 503),
                status_code=503, headers={"Retry-After": "1"},
            )
        self.inflight += 1
        uid, raw = self._submit({"kind": "generate", "request": asdict(sreq)})
        events = self._events(raw)
        done = handed = False
        try:
            first = await events.__anext__()
            if "error" in first:
                done = True
                status = 500 if first["error"].get("type") == "server_error" else 400
                return JSONResponse(first if status == 500 else protocol.error_body(first["error"]["message"], 400), status_code=status)
            rid = protocol.new_id("chatcmpl" if chat else "cmpl")
            model = self.settings.model_name
            if stream:
                gen = self._stream(uid, rid, model, chat, include_usage, first, events, opts["return_token_ids"])
                done = handed = True  # the generator owns the cleanup from here
                return StreamingResponse(gen, media_type="text/event-stream")
            text, ev, ids = first["text"], first, list(first["token_ids"])
            while ev["finish_reason"] is None:
                ev = await events.__anext__()
                if "error" in ev:
                    done = True
                    return JSONResponse(ev, status_code=500)
                text += ev["text"]
                ids += ev["token_ids"]
            done = True
            build = protocol.chat_response if chat else protocol.completion_response
            resp = build(rid, model, text, ev["finish_reason"], ev["prompt_tokens"], ev["completion_tokens"])
            if opts["return_token_ids"]:
                resp["choices"][0]["token_ids"] = ids
            return JSONResponse(resp)
        except StopAsyncIteration:
            done = True
            return JSONResponse(protocol.error_body("the inference worker ended the request without a result", 500), status_code=500)
        finally:
            if not handed:
                self.inflight -= 1
                if done:
                    self.response_buffer.pop(uid, None)
                else:  # cancelled (client gone) before a response was built
                    self._cancel(uid)

    async def _stream(self, uid, rid, model, chat, include_usage, first, events, token_ids=False):
        finished = False
        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield protocol.sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
            ev = first
            while True:
                if "error" in ev:
                    yield protocol.sse(ev)
                    finished = True
                    break
                if ev["text"] or ev["finish_reason"] is not None or token_ids:
                    if chat:
                        delta = {"content": ev["text"]} if ev["text"] else {}
                        chunk = protocol.chat_chunk(rid, model, delta, ev["finish_reason"])
                    else:
                        chunk = protocol.completion_chunk(rid, model, ev["text"], ev["finish_reason"])
                    if token_ids:
                        chunk["choices"][0]["token_ids"] = ev["token_ids"]
                    yield protocol.sse(chunk)
                if ev["finish_reason"] is not None:
                    finished = True
                    if include_usage:
                        yield protocol.sse(protocol.usage_chunk(rid, model, obj, ev["prompt_tokens"], ev["completion_tokens"]))
                    yield protocol.sse("[DONE]")
                    break
                ev = await events.__anext__()
        finally:
            self.inflight -= 1
            if finished:
                self.response_buffer.pop(uid, None)
            else:  # the client went away mid-stream: free the slot
                self._cancel(uid)


def build_server(settings: ServeSettings) -> ls.LitServer:
    """A LitServer with one inference worker (the engine batches requests itself)."""
    spec = OpenAIEndpoints(settings)
    api = SpeculativeAPI(settings, spec)
    return ls.LitServer(api, accelerator="auto", devices=1, workers_per_device=1, timeout=False)
