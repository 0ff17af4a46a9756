"""OpenAI wire format <-> :class:`~serve.service.ServeRequest`, as plain dicts.

Parsing checks every field's type and range and raises :class:`ProtocolError` with the
offending parameter, which the HTTP layer returns as an OpenAI-style error body:
``{"error": {"message", "type", "param", "code"}}``. No HTTP library is imported here.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from serve.service import ServeRequest

MAX_STOP_SEQUENCES = 4


class ProtocolError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.code = code or ("invalid_request_error" if status == 400 else None)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error", 503: "server_overloaded"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    # messages quote client input, which JSON lets carry lone surrogates (\ud800) that UTF-8
    # cannot encode: escape them, or rendering the error itself would fail with a 500
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _common(body: dict[str, Any], served_model: str, default_max_tokens: int) -> dict[str, Any]:
    model = body.get("model")
    if model is None:
        raise ProtocolError("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise ProtocolError(f"model must be a string, got {type(model).__name__}", "model")
    if model != served_model:
        raise ProtocolError(f"The model `{model}` does not exist; this server serves `{served_model}`", "model", 404, "model_not_found")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key, None)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not _is_int(max_tokens):
        raise ProtocolError(f"{key} must be an integer, got {json.dumps(max_tokens)}", key)
    if max_tokens <= 0:
        raise ProtocolError(f"{key} must be at least 1, got {max_tokens}", key)
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_num(temperature) or not 0 <= temperature <= 2:
        raise ProtocolError(f"temperature must be a number in [0, 2], got {json.dumps(temperature)}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise ProtocolError(f"top_p must be a number in (0, 1], got {json.dumps(top_p)}", "top_p")
    top_k = body.get("top_k", 0)
    top_k = 0 if top_k is None else top_k
    if not _is_int(top_k) or top_k < 0:
        raise ProtocolError(f"top_k must be a non-negative integer, got {json.dumps(top_k)}", "top_k")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ProtocolError(f"seed must be an integer, got {json.dumps(seed)}", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ProtocolError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise ProtocolError(f"stop takes 1 to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise ProtocolError("only n=1 is supported", "n")
    stream = body.get("stream", False)
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ProtocolError(f"stream must be a boolean, got {json.dumps(stream)}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ProtocolError("stream_options must be an object", "stream_options")
    for unsupported in ("logprobs", "tools", "functions", "logit_bias"):
        if body.get(unsupported) not in (None, False, [], {}):
            raise ProtocolError(f"{unsupported} is not supported by this server", unsupported)
    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool):
        raise ProtocolError("return_token_ids must be a boolean", "return_token_ids")
    return dict(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed, stop=stops,
        stream=stream, include_usage=bool(opts.get("include_usage", False)), return_token_ids=rti,
    )


def _split(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c.pop(k) for k in ("stream", "include_usage", "return_token_ids")}


def parse_completion(body: dict[str, Any], served_model: str, default_max_tokens: int = 16) -> tuple[ServeRequest, dict[str, bool]]:
    """-> (request, options: stream, include_usage, return_token_ids). OpenAI's default
    max_tokens for completions is 16; ``return_token_ids`` (an extension) adds the
    generated token ids to the choice."""
    c = _common(body, served_model, default_max_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        pass
    elif not isinstance(prompt, str):
        raise ProtocolError("prompt must be a string, a list of token ids, or a list with one of those", "prompt")
    if not prompt:
        raise ProtocolError("prompt must not be empty", "prompt")
    if body.get("echo"):
        raise ProtocolError("echo is not supported by this server", "echo")
    if body.get("suffix"):
        raise ProtocolError("suffix is not supported by this server", "suffix")
    opts = _split(c)
    return ServeRequest(prompt=prompt, **c), opts


def parse_chat(body: dict[str, Any], served_model: str, default_max_tokens: int = 512) -> tuple[ServeRequest, dict[str, bool]]:
    c = _common(body, served_model, default_max_tokens)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ProtocolError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ProtocolError(f"messages[{i}] must be an object", f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise ProtocolError(f"messages[{i}].role must be system, user or assistant, got {json.dumps(role)}", f"messages[{i}].role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ProtocolError(f"messages[{i}].content parts must all be text", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ProtocolError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise ProtocolError("messages are all empty", "messages")
    if out[-1]["role"] != "user":
        raise ProtocolError("the last message must come from the user", "messages")
    opts = _split(c)
    return ServeRequest(messages=out, **c), opts


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, usage_: dict | None = None) -> dict:
    out = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish)}],
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": _finish(finish)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(finish)}],
    }


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dspark"}]}


def prometheus_text(snap: dict[str, Any], http: dict[str, int] | None = None) -> str:
    """Render a :meth:`ServeMetrics.snapshot` (plus HTTP-side gauges) in the Prometheus
    text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP dspark_{name} {help_}")
        lines.append(f"# TYPE dspark_{name} {kind}")
        for labels, v in samples:
            lines.append(f"dspark_{name}{labels} {float(v):.6g}")

    metric("requests_total", "counter", "Requests accepted by the engine.", [("", snap.get("requests_total", 0))])
    metric("finished_requests_total", "counter", "Finished requests by reason.",
           [(f'{{reason="{k}"}}', v) for k, v in snap.get("finished_total", {}).items()])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", snap.get("generated_tokens_total", 0))])
    metric("engine_steps_total", "counter", "Engine steps (draft -> verify -> commit rounds).", [("", snap.get("steps_total", 0))])
    metric("request_rounds_total", "counter", "Request-steps: one per request verified in a step.", [("", snap.get("request_rounds_total", 0))])
    metric("verify_tokens_total", "counter", "Draft tokens sent to the target for verification.", [("", snap.get("verify_tokens_total", 0))])
    metric("drafted_rounds_total", "counter", "Request-steps that verified at least one draft token (vLLM's num_drafts).",
           [("", snap.get("drafted_rounds_total", 0))])
    metric("accepted_tokens_total", "counter", "Draft tokens accepted.", [("", snap.get("accepted_tokens_total", 0))])
    metric("tau", "gauge", "Mean tokens per request per step (accepted drafts + 1), since start.", [("", snap.get("tau", 0.0))])
    metric("verify_tokens_per_request_step", "gauge", "Mean draft tokens verified per request per step.",
           [("", snap.get("verify_tokens_per_request_step", 0.0))])
    pos = [(f'{{position="{k + 1}"}}', v) for k, v in enumerate(snap.get("acceptance_by_position", [])) if v is not None]
    metric("acceptance_by_position", "gauge", "Conditional acceptance of draft position k, given position k-1 was accepted.", pos)
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", [("", snap.get("tokens_per_second", 0.0))])
    metric("active_requests", "gauge", "Requests decoding now.", [("", snap.get("active_requests", 0))])
    metric("queue_depth", "gauge", "Requests waiting for a decoding slot.", [("", snap.get("queued_requests", 0))])
    for key, help_ in (("engine_seconds_total", "Seconds inside the engine's steps (drafter, target, sampling)."),
                       ("service_seconds_total", "Seconds inside the service's steps (engine plus admission and detokenisation)."),
                       ("worker_seconds_total", "Seconds inside the inference worker's steps (service plus output hand-off)."),
                       ("loop_gap_seconds_total", "Seconds between a worker step's end and the next step's start while work was pending.")):
        metric(key, "counter", help_, [("", snap.get(key, 0.0))])
    for k, v in (http or {}).items():
        metric(f"http_{k}", "gauge", f"HTTP layer: {k.replace('_', ' ')}.", [("", v)])
    return "\n".join(lines) + "\n"
