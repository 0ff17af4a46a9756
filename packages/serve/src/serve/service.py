"""The serving engine without HTTP: requests in, text deltas out, one step at a time.

:class:`ServeEngine` owns the target, the drafter, the prefix scheduler and a
:class:`~dspark.engine.SpeculativeEngine` (continuous batching: requests join and leave
between steps). It tokenizes, enforces the context and token limits, turns token ids
into text deltas (holding back partial UTF-8 characters and any text that could still
become a stop string), and keeps the serving metrics. The LitServe layer
(:mod:`serve.api`) only translates HTTP to :class:`ServeRequest` and events to JSON.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dspark.engine import SpeculativeEngine
from dspark.errors import InvalidRequestError
from dspark.generate import GenerationConfig
from dspark.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class ServeRequest:
    """One generation request, already translated from HTTP.

    prompt: raw text (completions; tokenized as is) or token ids; messages: chat turns
    (rendered with the target's prompt format). Exactly one of the two is set.
    """

    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p))


@dataclass
class Event:
    """What one step produced for one request."""

    uid: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """Incremental detokenization and stop strings for one request.

    Tokens are decoded in a short window: ``ids[prefix:read]`` is the context already turned
    into text, and only what decoding ``ids[prefix:]`` adds past that context is appended,
    so text is never lost even when a tokenizer's decode of a longer sequence is not an
    extension of its decode of a shorter one (the old whole-text diff then sent nothing for
    the rest of the request). An incomplete UTF-8 character (decoded as U+FFFD at the end)
    waits for its next bytes. Text that could still grow into a stop string is held back;
    on a stop the text ends before it and the token count ends with the token that
    completed the stop string.
    """

    def __init__(self, decode: Any, stops: Sequence[str] = ()) -> None:
        self.decode, self.stops = decode, tuple(stops)
        self.ids: list[int] = []
        self.text = ""  # everything detokenized so far (only ever grows)
        self.sent = ""  # what the client has received (a prefix of text)
        self.prefix = self.read = 0
        self.marks: list[tuple[int, int, int]] = [(0, 0, 0)]  # (tokens read, len(text), window start) per absorption

    def _absorb(self, final: bool) -> None:
        if self.read == len(self.ids):
            return
        ctx = self.decode(self.ids[self.prefix : self.read])
        full = self.decode(self.ids[self.prefix :])
        if full.endswith("\ufffd") and not final:
            return  # part of a multi-byte character: wait for the rest
        # ctx is already in self.text: what the new ids add is what full has past ctx's
        # length, also when the two decodes differ earlier (a decode that is not
        # prefix-stable, e.g. one that recases or cleans up the start of the window;
        # appending from the first difference would repeat text the client already has)
        self.text += full[len(ctx):]
        self.marks.append((len(self.ids), len(self.text), self.prefix))
        self.prefix, self.read = self.read, len(self.ids)

    def _tokens_through(self, end: int) -> int:
        """The fewest tokens whose text reaches character ``end``: the absorption that
        crossed it is re-decoded one token at a time within its own window."""
        for (n0, l0, _), (n1, l1, p) in zip(self.marks, self.marks[1:]):
            if l1 >= end:
                ctx = self.decode(self.ids[p:n0])
                for n in range(n0 + 1, n1):
                    piece = self.decode(self.ids[p:n])
                    if not piece.endswith("\ufffd") and l0 + len(piece) - len(ctx) >= end:
                        return n
                return n1
        return len(self.ids)

    def push(self, toks: Sequence[int], final: bool) -> tuple[str, bool, int]:
        """Add new tokens. Returns (text to send now, whether a stop string ended it,
        tokens that count as completion tokens so far)."""
        self.ids.extend(int(t) for t in toks)
        self._absorb(final)
        start = max(0, len(self.sent) - max((len(s) for s in self.stops), default=0))
        hit = _find_stop_end(self.text, self.stops, start)
        if hit is not None:
            cut, end = hit
            visible = self.text[: max(cut, len(self.sent))]
            count = self._tokens_through(end)
        else:
            visible = self.text if final else self.text[: len(self.text) - _held_back(self.text, self.stops)]
            count = len(self.ids)
        delta = visible[len(self.sent) :]
        self.sent += delta
        return delta, hit is not None, count


@dataclass
class _Live:
    uid: str
    rid: int
    prompt_tokens: int
    stream: TextStream
    ids: list[int] = field(default_factory=list)


class ServeMetrics:
    """Counters and gauges for /metrics (a plain dict snapshot, rendered elsewhere)."""

    def __init__(self, positions: int, window_s: float = 10.0) -> None:
        self.positions = positions
        self.requests_total = 0
        self.finished = {"stop": 0, "length": 0, "cancelled": 0}
        self.tokens_total = 0
        self.steps_total = 0
        self.request_rounds = 0  # sum over steps of the requests verified in that step
        self.verify_tokens_total = 0  # draft tokens sent to the target
        self.drafted_rounds = 0  # request rounds that verified at least one draft token
        self.accepted_total = 0
        self.reached = [0] * positions  # rounds whose verified prefix reached position k
        self.accepted_at = [0] * positions  # ... and accepted it
        self._recent: deque[tuple[float, int]] = deque()
        self.window_s = window_s
        self.active = 0
        self.queued = 0
        # where a serving process's time goes (seconds, summed since start): inside the
        # engine's step (drafter + target + sampling), inside the whole service step (adds
        # admission and detokenisation), inside the worker's step (adds the hand-off of its
        # outputs to LitServe; set by serve.api), and between a worker step's end and the next
        # step's start while work was pending (the serving loop's own overhead; set by serve.api)
        self.engine_seconds = 0.0
        self.service_seconds = 0.0
        self.worker_seconds = 0.0
        self.loop_gap_seconds = 0.0

    def record_step(self, rounds: Sequence[tuple[int, int, int]], new_tokens: int) -> None:
        now = time.monotonic()
        self.steps_total += 1
        self.tokens_total += new_tokens
        self._recent.append((now, new_tokens))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        for _rid, verified, accepted in rounds:
            self.request_rounds += 1
            self.verify_tokens_total += verified
            self.drafted_rounds += verified > 0
            self.accepted_total += accepted
            for k in range(min(verified, self.positions)):
                self.reached[k] += 1
                self.accepted_at[k] += int(k < accepted)

    def tokens_per_second(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        rr = max(self.request_rounds, 1)
        return {
            "requests_total": self.requests_total,
            "request_rounds_total": self.request_rounds,
            "verify_tokens_total": self.verify_tokens_total,
            "drafted_rounds_total": self.drafted_rounds,
            "accepted_tokens_total": self.accepted_total,
            "finished_total": dict(self.finished),
            "generated_tokens_total": self.tokens_total,
            "steps_total": self.steps_total,
            "tau": (self.accepted_total + self.request_rounds) / rr if self.request_rounds else 0.0,
            "verify_tokens_per_request_step": self.verify_tokens_total / rr if self.request_rounds else 0.0,
            "acceptance_by_position": [a / n if n else None for a, n in zip(self.accepted_at, self.reached)],
            "tokens_per_second": self.tokens_per_second(),
            "active_requests": self.active,
            "queued_requests": self.queued,
            "engine_seconds_total": self.engine_seconds,
            "service_seconds_total": self.service_seconds,
            "worker_seconds_total": self.worker_seconds,
            "loop_gap_seconds_total": self.loop_gap_seconds,
        }


class ServeEngine:
    """Target + drafter + scheduler, driven by :meth:`step` from one thread.

    :meth:`submit` and :meth:`cancel` may be called from other threads: they only queue
    work that the next :meth:`step` applies, so the engine itself is never shared.
    max_batch: most requests decoding at once (the rest wait in order);
    max_context: prompt + max_tokens must fit; max_tokens_limit: the largest max_tokens.
    """

    def __init__(
        self,
        target: Any,
        drafter: Any,
        num_draft: int = 7,
        scheduler: Any = None,
        max_batch: int = 16,
        max_context: int = 4096,
        max_tokens_limit: int = 2048,
    ) -> None:
        self.target, self.drafter = target, drafter
        self.engine = SpeculativeEngine(target, drafter, num_draft=num_draft if drafter is not None else 0, scheduler=scheduler)
        self.max_batch, self.max_context, self.max_tokens_limit = max_batch, max_context, max_tokens_limit
        self.metrics = ServeMetrics(max(num_draft, 1))
        self._lock = threading.Lock()
        self._waiting: deque[tuple[str, ServeRequest, list[int]]] = deque()
        self._cancels: set[str] = set()
        self._live: dict[str, _Live] = {}
        self._by_rid: dict[int, str] = {}

    # ------------------------------------------------------------------ admission
    def encode(self, req: ServeRequest) -> list[int]:
        """Prompt token ids; raises InvalidRequestError naming what is wrong."""
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages")
        if req.messages is not None:
            ids = self.target.encode_prompt(req.messages)
        elif isinstance(req.prompt, str):
            if not req.prompt:
                raise InvalidRequestError("prompt must not be empty")
            ids = [int(i) for i in self.target.tokenizer(req.prompt)["input_ids"]]
        else:
            ids = [int(i) for i in req.prompt]
            if not ids:
                raise InvalidRequestError("prompt must not be empty")
            bad = [i for i in ids if not 0 <= i < self.target.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token ids outside [0, {self.target.vocab_size}): {bad[:5]}")
        return ids

    def validate(self, req: ServeRequest, ids: list[int]) -> None:
        if not 1 <= req.max_tokens <= self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {req.max_tokens}")
        if len(ids) + req.max_tokens > self.max_context:
            raise InvalidRequestError(
                f"this server's context is {self.max_context} tokens; the prompt has {len(ids)} and max_tokens "
                f"asks for {req.max_tokens} more. Shorten the prompt or lower max_tokens."
            )
        req.sampling()  # raises on bad temperature / top_p / top_k
        if any(not isinstance(s, str) or not s for s in req.stop):
            raise InvalidRequestError("stop must be a non-empty string or a list of them")

    def submit(self, uid: str, req: ServeRequest) -> int:
        """Validate and queue a request; returns its prompt length. Thread-safe."""
        ids = self.encode(req)
        self.validate(req, ids)
        with self._lock:
            self._waiting.append((uid, req, ids))
            self.metrics.requests_total += 1
        return len(ids)

    def cancel(self, uid: str) -> None:
        """Stop a request (client gone); frees its slot at the next step. Thread-safe."""
        with self._lock:
            self._cancels.add(uid)

    def live_ids(self) -> list[str]:
        """Ids of the requests decoding now."""
        return list(self._live)

    @property
    def num_active(self) -> int:
        return len(self._live)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._live or self._waiting or self._cancels)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[Event]:
        """Apply cancels, admit waiting requests up to max_batch, run one engine step and
        return the events (text deltas and finishes) it produced."""
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:
            self.metrics.service_seconds += time.perf_counter() - t0

    def _step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            kept = deque()
            for item in self._waiting:
                if item[0] in cancels:
                    events.append(Event(item[0], "", [], "cancelled", len(item[2]), 0))
                else:
                    kept.append(item)
            self._waiting = kept
            admit = []
            while self._waiting and len(self._live) + len(admit) < self.max_batch:
                admit.append(self._waiting.popleft())
            self.metrics.queued = len(self._waiting)
        for uid in cancels:
            live = self._live.pop(uid, None)
            if live is not None:
                self.engine.cancel(live.rid)
                del self._by_rid[live.rid]
                events.append(Event(uid, "", [], "cancelled", live.prompt_tokens, len(live.ids)))
        for uid, req, ids in admit:
            cfg = GenerationConfig(max_new_tokens=req.max_tokens, sampling=req.sampling(), seed=req.seed)
            rid = self.engine.add_request(ids, cfg, seed=req.seed)
            self._live[uid] = _Live(uid, rid, len(ids), TextStream(self.target.decode, tuple(req.stop)))
            self._by_rid[rid] = uid
        for e in events:
            if e.finish_reason is not None:
                self.metrics.finished[e.finish_reason] += 1
        if not self.engine.has_unfinished():
            self.metrics.active = len(self._live)
            return events
        t0 = time.perf_counter()
        gained = self.engine.step()
        self.metrics.engine_seconds += time.perf_counter() - t0
        self.metrics.record_step(self.engine.last_round, sum(len(t) for t in gained.values()))
        for rid, toks in gained.items():
            uid = self._by_rid.get(rid)
            if uid is None:
                continue
            ev = self._advance(self._live[uid], toks)
            events.append(ev)
            if ev.finish_reason is not None:
                self.metrics.finished[ev.finish_reason] += 1
        self.metrics.active = len(self._live)
        return events

    def _advance(self, live: _Live, toks: list[int]) -> Event:
        before = len(live.ids)
        live.ids.extend(toks)
        finish: FinishReason | None = self.engine.finish_reason(live.rid)
        delta, stopped, count = live.stream.push(toks, final=finish is not None)
        if stopped:
            finish = "stop"
            del live.ids[count:]  # tokens past the stop string are not part of the completion
        if finish is not None:
            self.engine.cancel(live.rid)  # frees the slot (a no-op cleanup if it already finished)
            self._live.pop(live.uid, None)
            self._by_rid.pop(live.rid, None)
        return Event(live.uid, delta, list(toks[: max(0, len(live.ids) - before)]), finish, live.prompt_tokens, len(live.ids))


def sps_profile_key(target: Any, batch_tokens: Sequence[int]) -> dict[str, Any]:
    """What a cached SPS profile depends on (scheduler.cached_sps): a profile measured
    with other kernels or another decoder path is not reused."""
    from dspark.scheduler import machine_key

    return {"model": target.name, "dtype": str(target.dtype), "machine": machine_key(), "tokens": list(batch_tokens),
            "kind": "slot-verify-forward", "plain_step": "next_tokens", "lm_head": str(target.screen_head),
            "packed_linears": target.packed_linears, "decoder": _decoder_path(target)}


def _decoder_path(target: Any) -> str:
    from dspark import batch_verify
    from dspark.slot_cache import _fast_decoder

    if not batch_verify.supports(target):
        return "hf-cache"
    return "hf-slots" if _fast_decoder(target, target.fast_decoder) is None else "fast-slots"


def profile_target_sps(target: Any, batch_tokens: Sequence[int], context: int = 256, repeats: int = 5) -> Any:
    """SPS(B): steps per second of one target verify forward of B tokens after a
    ``context``-token prefix (KV cache, rolled back after each step), on the path the
    engine runs (the slot cache and its decoder step where the target supports them).
    B = 1 is a plain decoding step as the engine runs it: the forward, then the next token
    through ``target.next_tokens`` (the LM head's fp16 screen where the target uses it),
    so the draft gate compares drafting with what plain decoding really costs. B > 1 takes
    the full LM head over every row (an upper bound where sampled drafts are verified
    through the screen)."""
    import torch

    from dspark import batch_verify
    from dspark.sampling import SamplingParams
    from dspark.scheduler import profile_sps

    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, target.vocab_size, (1, context), generator=gen)
    blocks = {b: torch.randint(0, target.vocab_size, (1, b), generator=gen) for b in batch_tokens}
    plain = SamplingParams(temperature=1.0)
    if batch_verify.supports(target):
        from dspark.slot_cache import SlotKVCache

        kv = SlotKVCache(target, slots=1, capacity=context + max(batch_tokens))
        kv.add(0)
        kv.forward([0], [prefix[0].tolist()], logits="last_hidden")

        def forward(b: int, want: str) -> torch.Tensor:
            out = kv.forward([0], [blocks[b][0].tolist()], logits=want)[0]
            kv.rollback(0, b)
            return out
    else:
        cache = target.new_cache()
        target.forward(prefix, cache, logits="none")
        target.rollback(cache, 0)

        def forward(b: int, want: str) -> torch.Tensor:
            out = target.forward(blocks[b], cache, logits="none" if want == "last_hidden" else "all",
                                 final_hidden=want == "last_hidden")
            target.rollback(cache, b)
            return out.final_hidden[:, -1:] if want == "last_hidden" else out.logits

    def step(b: int) -> None:
        if b == 1:
            target.next_tokens(forward(1, "last_hidden")[:, -1], plain, gen)
        else:
            forward(b, "all")

    with torch.inference_mode():
        return profile_sps(step, list(batch_tokens), repeats=repeats)


def _find_stop_end(text: str, stops: Sequence[str], start: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in ``text[start:]``, or None."""
    hits = [(i, i + len(s)) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to send yet: an incomplete UTF-8 character
    (decoded as U+FFFD) and, before it, a suffix that may still grow into a stop string
    (both: a stop string may end in the character still being decoded)."""
    n = 0
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
        n += 1
    body = text[: len(text) - n]
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(body)), 0, -1):
            if body.endswith(s[:k]):
                best = max(best, k)
                break
    return n + best
