"""Deterministic OpenAI-compatible upstream for end-to-end tests, ``make run`` and benchmarks.

It stands in for OpenAI/vLLM, which cannot run here. The HTTP/1.1 server is written directly on
``asyncio.Protocol`` (no web framework) so that the bytes on the wire are under our control: exact
chunked framing (one HTTP chunk per SSE event), abrupt drops, verbatim raw responses, stalled
requests and write back-pressure are all things a gateway must be tested against.

Usage::

    python -m gateway.dev.openai_mock --host 127.0.0.1 --port 9100 [--ready-file PATH]

Per-request behaviour is steered by an optional top-level ``"mock": {...}`` object in the request
body (see :class:`Knobs`). Process-wide faults (see :class:`Faults`: an error status for a fraction of
completions, a slow tail, hangs) are set at start (``--fault-status`` ...) or at runtime with
``POST /_mock/faults`` (``GET`` reads, ``DELETE`` clears), so that one of several mock upstreams can be
broken under load without touching the requests; a request's own knobs win over them. Observability
for tests lives under ``/_mock/events`` and ``/_mock/stats`` (``DELETE`` resets the counters).
Started with ``--verify-signing SECRET`` (or ``OPENAI_MOCK_SIGNING_SECRET``), every ``/v1/`` request
must carry a valid, fresh gateway signature (:mod:`gateway.signing`), else it is answered 401.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import hashlib
import http
import itertools
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import orjson

from ..signing import DEFAULT_HEADER, DEFAULT_MAX_SKEW_S, verify

__all__ = ["MODEL_IDS", "Faults", "Knobs", "MockServer", "MockState", "main", "serve"]

log = logging.getLogger("gateway.dev.openai_mock")

JSONDict = dict[str, Any]

MODEL_IDS: Final[tuple[str, ...]] = ("mock-echo", "mock-slow", "gpt-4o-mini", "gpt-4o")
#: Fixed ``created`` of the model list, so ``/v1/models`` is byte-for-byte reproducible.
MODELS_CREATED: Final = 1_700_000_000
#: ``mock-slow`` streams with this inter-chunk delay unless the request overrides it.
SLOW_MODEL_CHUNK_DELAY_MS: Final = 50.0
TOOL_CALL_ID: Final = "call_mock_0"

MAX_HEADER_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
#: Transport write-buffer high-water mark; above it a stream waits for ``resume_writing``.
WRITE_HIGH_WATER: Final = 64 * 1024
DEFAULT_MAX_EVENTS: Final = 10_000

_WORD_RE: Final = re.compile(r"\S+")
_PIECE_RE: Final = re.compile(r"\S+\s*")
_LEADING_WS_RE: Final = re.compile(r"\s*")
_HEX_RE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DONE_FRAME: Final = b"data: [DONE]\n\n"
_CHUNKED_END: Final = b"0\r\n\r\n"
_ERROR_TYPES: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    409: ("conflict_error", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


# --------------------------------------------------------------------------------------------------
# Errors, knobs and the deterministic "model"
# --------------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape; raising it keeps validation linear."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        default_type, default_code = _ERROR_TYPES.get(
            status, ("invalid_request_error", None) if status < 500 else ("server_error", None)
        )
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else default_code
        self.type = type_ if type_ is not None else default_type

    def body(self) -> bytes:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return orjson.dumps({"error": err})


def _get_int(obj: JSONDict, key: str, *, minimum: int, param: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HTTPError(400, f"{param} must be an integer >= {minimum}", param=param)
    return value


def _get_float(obj: JSONDict, key: str, *, param: str) -> float:
    value = obj.get(key, 0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise HTTPError(400, f"{param} must be a number >= 0", param=param)
    return float(value)


def _get_bool(obj: JSONDict, key: str, *, param: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPError(400, f"{param} must be a boolean", param=param)
    return value


@dataclass(slots=True)
class Knobs:
    """Per-request behaviour, from the request's optional top-level ``"mock"`` object.

    The gateway forwards unknown body fields, so tests steer the upstream from the client side.
    """

    first_delay_ms: float = 0.0  #: sleep before the response headers / first chunk
    chunk_delay_ms: float = 0.0  #: sleep between stream chunks (SSE events)
    words: int | None = None  #: generate ``"w0 w1 ..."`` with this many words instead of echoing
    status: int | None = None  #: answer with this HTTP status and an OpenAI error "mock error"
    #: stream: close the connection (FIN, buffered bytes flushed) after N SSE events, counting the role
    #: chunk; no ``[DONE]``, no chunked terminator. N >= the event count before [DONE] means no drop.
    drop_after_chunks: int | None = None
    no_usage: bool = False  #: omit ``usage`` everywhere
    hang: bool = False  #: accept the request and never answer
    raw: str | None = None  #: written verbatim as the whole HTTP response, then the connection closes
    #: the reply text verbatim (a tool call's arguments when one is made) instead of the echo
    content: str | None = None
    #: stream ``content`` as the pieces between these character offsets (not word by word)
    split_at: list[int] | None = None
    #: call this tool (any name, offered or not) with ``content`` as its arguments
    tool: str | None = None
    #: used instead of ``content`` when the last message is a tool result (a repair turn)
    content_after_tool: str | None = None
    #: a scripted conversation (agent loops): turn k (k = the assistant messages so far) plays
    #: step k, the last step once past the end; a step is ``{"tool": name?, "content": text}``,
    #: where ``{turn}`` becomes k and ``{last_tool}`` the last tool message's content
    script: list[JSONDict] | None = None
    #: report this many prompt tokens as served from a prompt cache (OpenAI's
    #: ``prompt_tokens_details.cached_tokens``; Anthropic's ``cache_read_input_tokens``)
    cached_tokens: int | None = None

    @classmethod
    def from_body(cls, body: JSONDict, model: str) -> Knobs:
        mock = body.get("mock")
        if mock is None:
            mock = {}
        if not isinstance(mock, dict):
            raise HTTPError(400, "mock must be an object", param="mock")
        chunk_delay = _get_float(mock, "chunk_delay_ms", param="mock.chunk_delay_ms")
        if model == "mock-slow" and "chunk_delay_ms" not in mock:
            chunk_delay = SLOW_MODEL_CHUNK_DELAY_MS
        status = _get_int(mock, "status", minimum=200, param="mock.status")
        if status is not None and status > 599:
            raise HTTPError(400, "mock.status must be a valid HTTP status", param="mock.status")
        raw = mock.get("raw")
        if raw is not None and not isinstance(raw, str):
            raise HTTPError(400, "mock.raw must be a string", param="mock.raw")
        return cls(
            first_delay_ms=_get_float(mock, "first_delay_ms", param="mock.first_delay_ms"),
            chunk_delay_ms=chunk_delay,
            words=_get_int(mock, "words", minimum=0, param="mock.words"),
            status=status,
            drop_after_chunks=_get_int(mock, "drop_after_chunks", minimum=0, param="mock.drop_after_chunks"),
            no_usage=_get_bool(mock, "no_usage", param="mock.no_usage"),
            hang=_get_bool(mock, "hang", param="mock.hang"),
            raw=raw,
            content=_get_str(mock, "content"),
            split_at=_get_offsets(mock),
            tool=_get_str(mock, "tool"),
            content_after_tool=_get_str(mock, "content_after_tool"),
            cached_tokens=_get_int(mock, "cached_tokens", minimum=0, param="mock.cached_tokens"),
            script=_get_script(mock),
        )


def _get_str(mock: JSONDict, key: str) -> str | None:
    value = mock.get(key)
    if value is not None and not isinstance(value, str):
        raise HTTPError(400, f"mock.{key} must be a string", param=f"mock.{key}")
    return value


def _get_script(mock: JSONDict) -> list[JSONDict] | None:
    value = mock.get("script")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(v, dict)
            and isinstance(v.get("content"), str)
            and isinstance(v.get("tool", ""), str)
            and set(v) <= {"tool", "content"}
            for v in value
        )
    ):
        raise HTTPError(
            400, "mock.script must be a non-empty list of {tool?, content} objects", param="mock.script"
        )
    return value


def _scripted(knobs: Knobs, messages: list[JSONDict]) -> None:
    """This turn's step of ``knobs.script`` into ``knobs.tool`` / ``knobs.content``."""
    script = knobs.script
    if script is None:
        return
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    step = script[min(turn, len(script) - 1)]
    last_tool = next(
        (content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "tool"), ""
    )
    knobs.tool = step.get("tool") or None
    knobs.content = step["content"].replace("{turn}", str(turn)).replace("{last_tool}", last_tool)


def _get_offsets(mock: JSONDict) -> list[int] | None:
    value = mock.get("split_at")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
        raise HTTPError(400, "mock.split_at must be a list of positive integers", param="mock.split_at")
    return sorted(value)


def _pieces_at(text: str, offsets: list[int]) -> list[str]:
    """``text`` cut at the given character offsets (tests: a finding split at every offset)."""
    cuts = [0, *(o for o in offsets if o < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]


_FAULT_FIELDS: Final = frozenset(
    {
        "status",
        "status_rate",
        "first_delay_ms",
        "slow_tail_rate",
        "slow_tail_ms",
        "hang_rate",
        "retry_after",
        "seed",
    }
)


def _get_rate(obj: JSONDict, key: str, default: float) -> float:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise HTTPError(400, f"{key} must be a number between 0 and 1", param=key)
    return float(value)


@dataclass(slots=True, frozen=True)
class Faults:
    """Process-wide faults for completion requests: how one upstream of several misbehaves.

    Each completion draws three numbers from the process's random source (seeded for reproducible
    runs), whatever is configured, so a seed gives the same faults for the same request order.
    A request's own ``mock`` knobs win: its ``status``, ``hang``, ``raw`` or ``first_delay_ms``
    replace the matching fault.
    """

    status: int | None = None  #: answer with this status (an OpenAI error body) ...
    status_rate: float = 1.0  #: ... for this fraction of completion requests
    first_delay_ms: float = 0.0  #: before every answer's headers
    slow_tail_rate: float = 0.0  #: this fraction of requests gets ...
    slow_tail_ms: float = 0.0  #: ... this much more first-byte delay
    hang_rate: float = 0.0  #: this fraction is accepted and never answered
    retry_after: str | None = None  #: a ``Retry-After`` header on the mock's error answers

    @classmethod
    def from_json(cls, obj: object) -> Faults:
        if not isinstance(obj, dict):
            raise HTTPError(400, "faults must be a JSON object")
        unknown = sorted(set(obj) - _FAULT_FIELDS)
        if unknown:
            raise HTTPError(400, f"unknown fault fields: {', '.join(unknown)}", param=unknown[0])
        status = _get_int(obj, "status", minimum=100, param="status")
        if status is not None and status > 599:
            raise HTTPError(400, "status must be a valid HTTP status", param="status")
        retry_after = obj.get("retry_after")
        if retry_after is not None and not isinstance(retry_after, str):
            raise HTTPError(400, "retry_after must be a string", param="retry_after")
        return cls(
            status=status,
            status_rate=_get_rate(obj, "status_rate", 1.0),
            first_delay_ms=_get_float(obj, "first_delay_ms", param="first_delay_ms"),
            slow_tail_rate=_get_rate(obj, "slow_tail_rate", 0.0),
            slow_tail_ms=_get_float(obj, "slow_tail_ms", param="slow_tail_ms"),
            hang_rate=_get_rate(obj, "hang_rate", 0.0),
            retry_after=retry_after,
        )

    def to_json(self) -> JSONDict:
        return {
            "status": self.status,
            "status_rate": self.status_rate,
            "first_delay_ms": self.first_delay_ms,
            "slow_tail_rate": self.slow_tail_rate,
            "slow_tail_ms": self.slow_tail_ms,
            "hang_rate": self.hang_rate,
            "retry_after": self.retry_after,
        }


def count_words(text: str) -> int:
    """The mock's "tokenizer": one token per whitespace-separated word."""
    return len(_WORD_RE.findall(text))


def split_pieces(text: str) -> list[str]:
    """Split ``text`` into per-token stream deltas that concatenate back to ``text`` exactly.

    Each piece is a word plus its trailing whitespace; leading whitespace sticks to the first piece.
    """
    pieces: list[str] = _PIECE_RE.findall(text)
    if not pieces:
        return [text] if text else []
    lead = _LEADING_WS_RE.match(text)
    if lead is not None and lead.end():
        pieces[0] = text[: lead.end()] + pieces[0]
    return pieces


def truncate(pieces: list[str], limit: int | None) -> tuple[list[str], bool]:
    """Apply ``max_tokens``; a truncated text loses the whitespace after its last word."""
    if limit is None or len(pieces) <= limit:
        return pieces, False
    out = pieces[:limit]
    if out:
        out[-1] = out[-1].rstrip()
    return out, True


def content_text(content: object) -> str:
    """Text of a message ``content``: a string, or the text parts of a content list joined by spaces."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
        return " ".join(texts)
    return ""


@dataclass(slots=True)
class Plan:
    """Everything needed to render one completion, streamed or not, so both paths agree exactly."""

    chat: bool
    rid: str
    model: str
    created: int
    choices: list[list[str]]  #: per choice: content pieces (tool-call argument pieces for tool calls)
    finish: list[str]
    tool_name: str | None
    prompt_tokens: int
    stream: bool
    include_usage: bool
    knobs: Knobs
    #: the stop string that ended the text (vLLM's `stop_reason`), when one did
    stop_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(pieces) for pieces in self.choices)

    def usage(self) -> JSONDict:
        completion = self.completion_tokens
        usage: JSONDict = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        cached = self.knobs.cached_tokens
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(cached, self.prompt_tokens)}
        return usage


def _require_model(body: JSONDict) -> str:
    model = body.get("model")
    if model is None:
        raise HTTPError(400, "you must provide a model parameter")
    if not isinstance(model, str) or not model:
        raise HTTPError(400, "model must be a non-empty string", param="model")
    return model


def _common(body: JSONDict, model: str) -> tuple[int, bool, bool, int | None, Knobs]:
    n = _get_int(body, "n", minimum=1, param="n") or 1
    if n > 128:
        raise HTTPError(400, "n must be <= 128", param="n")
    stream = _get_bool(body, "stream", param="stream")
    opts = body.get("stream_options")
    include_usage = False
    if isinstance(opts, dict):
        include_usage = _get_bool(opts, "include_usage", param="stream_options.include_usage")
    elif opts is not None:
        raise HTTPError(400, "stream_options must be an object", param="stream_options")
    limits = [
        v
        for v in (
            _get_int(body, "max_tokens", minimum=1, param="max_tokens"),
            _get_int(body, "max_completion_tokens", minimum=1, param="max_completion_tokens"),
        )
        if v is not None
    ]
    return n, stream, include_usage, min(limits) if limits else None, Knobs.from_body(body, model)


def _tool_name(body: JSONDict) -> str | None:
    """Name of the function to call, when ``tools`` + ``tool_choice`` force a tool call."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise HTTPError(400, "tool_choice.function.name must be a string", param="tool_choice")
        return name
    if choice == "required":
        first = tools[0]
        fn = first.get("function") if isinstance(first, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise HTTPError(400, "tools[0].function.name must be a string", param="tools")
        return name
    return None


def plan_chat(body: JSONDict, rid: str) -> Plan:
    model = _require_model(body)
    messages = body.get("messages")
    if messages is None:
        raise HTTPError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise HTTPError(400, "messages must be a non-empty array of objects", param="messages")
    n, stream, include_usage, limit, knobs = _common(body, model)
    _scripted(knobs, messages)
    prompt_tokens = sum(count_words(content_text(m.get("content"))) + 3 for m in messages)
    last_user = next(
        (content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    echo = " ".join(f"w{i}" for i in range(knobs.words)) if knobs.words is not None else last_user
    tool_name = knobs.tool or _tool_name(body)
    fmt = body.get("response_format")
    json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    if knobs.content_after_tool is not None and messages[-1].get("role") == "tool":
        text = knobs.content_after_tool
    elif knobs.content is not None:
        text = knobs.content
    elif tool_name is not None or json_mode:
        text = orjson.dumps({"echo": echo}).decode()
    elif knobs.words is not None:
        text = echo
    else:
        text = "You said: " + echo
    text, matched = _cut_at_stop(text, body.get("stop"))
    split = _pieces_at(text, knobs.split_at) if knobs.split_at is not None else split_pieces(text)
    pieces, truncated = truncate(split, limit)
    done = "tool_calls" if tool_name is not None else "stop"
    return Plan(
        chat=True,
        rid=rid,
        model=model,
        created=int(time.time()),
        choices=[list(pieces) for _ in range(n)],
        finish=["length" if truncated else done] * n,
        tool_name=tool_name,
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
        knobs=knobs,
        stop_reason=None if truncated else matched,
    )


def _cut_at_stop(text: str, stop: object) -> tuple[str, str | None]:
    """OpenAI's `stop`: the text ends before the first stop string found in it (-> that string)."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut, matched = len(text), None
    for s in stops:
        at = text.find(s) if isinstance(s, str) and s else -1
        if 0 <= at < cut:
            cut, matched = at, s
    return text[:cut], matched


def _prompts(prompt: object) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [str(p) for p in prompt]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [" ".join(str(p) for p in prompt)]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [" ".join(str(t) for t in p) for p in prompt]
    raise HTTPError(400, "prompt must be a string, an array of strings or an array of tokens", param="prompt")


def plan_completion(body: JSONDict, rid: str) -> Plan:
    model = _require_model(body)
    if body.get("prompt") is None:
        raise HTTPError(
            400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    prompts = _prompts(body["prompt"])
    n, stream, include_usage, limit, knobs = _common(body, model)
    choices: list[list[str]] = []
    finish: list[str] = []
    for prompt in prompts:
        text = (
            " ".join(f"w{i}" for i in range(knobs.words)) if knobs.words is not None else " echo: " + prompt
        )
        pieces, truncated = truncate(split_pieces(text), limit)
        for _ in range(n):
            choices.append(list(pieces))
            finish.append("length" if truncated else "stop")
    return Plan(
        chat=False,
        rid=rid,
        model=model,
        created=int(time.time()),
        choices=choices,
        finish=finish,
        tool_name=None,
        prompt_tokens=sum(count_words(p) for p in prompts),
        stream=stream,
        include_usage=include_usage,
        knobs=knobs,
    )


def render_body(plan: Plan) -> JSONDict:
    """The non-streamed response object."""
    choices: list[JSONDict] = []
    for i, pieces in enumerate(plan.choices):
        text = "".join(pieces)
        if not plan.chat:
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": plan.finish[i]})
            continue
        message: JSONDict
        if plan.tool_name is not None:
            call = {
                "id": TOOL_CALL_ID,
                "type": "function",
                "function": {"name": plan.tool_name, "arguments": text},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:
            message = {"role": "assistant", "content": text}
        choice: JSONDict = {"index": i, "message": message, "logprobs": None, "finish_reason": plan.finish[i]}
        if plan.stop_reason is not None:
            choice["stop_reason"] = plan.stop_reason
        choices.append(choice)
    body: JSONDict = {
        "id": plan.rid,
        "object": "chat.completion" if plan.chat else "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
    }
    if not plan.knobs.no_usage:
        body["usage"] = plan.usage()
    return body


def render_stream(plan: Plan) -> Iterator[bytes]:
    """The SSE events (``data: ...\\n\\n``) of a streamed response, without HTTP chunk framing."""
    usage_on = plan.include_usage and not plan.knobs.no_usage
    obj_name = "chat.completion.chunk" if plan.chat else "text_completion"
    head = {"id": plan.rid, "object": obj_name, "created": plan.created, "model": plan.model}

    def frame(choices: list[JSONDict]) -> bytes:
        obj: JSONDict = {**head, "choices": choices}
        if usage_on:
            obj["usage"] = None
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def choice(i: int, delta: JSONDict, piece: str, finish: str | None) -> JSONDict:
        if plan.chat:
            out: JSONDict = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None and plan.stop_reason is not None:
                out["stop_reason"] = plan.stop_reason
            return out
        return {"text": piece, "index": i, "logprobs": None, "finish_reason": finish}

    if plan.chat:
        for i in range(len(plan.choices)):
            first: JSONDict = {"role": "assistant", "content": ""}
            if plan.tool_name is not None:
                fn = {"name": plan.tool_name, "arguments": ""}
                call = {"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": fn}
                first = {"role": "assistant", "content": None, "tool_calls": [call]}
            yield frame([choice(i, first, "", None)])
    steps = max((len(p) for p in plan.choices), default=0)
    for step in range(steps):
        for i, pieces in enumerate(plan.choices):
            if step >= len(pieces):
                continue
            piece = pieces[step]
            if plan.tool_name is not None:
                delta: JSONDict = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            else:
                delta = {"content": piece}
            yield frame([choice(i, delta, piece, None)])
    for i in range(len(plan.choices)):
        yield frame([choice(i, {}, "", plan.finish[i])])
    if usage_on:
        yield b"data: " + orjson.dumps({**head, "choices": [], "usage": plan.usage()}) + b"\n\n"
    yield _DONE_FRAME


# --------------------------------------------------------------------------------------------------
# Shared state: events and counters for tests
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ActiveStream:
    """A stream in flight; exposed live in ``/_mock/stats`` so tests can watch back-pressure."""

    stream: str
    conn: int
    path: str
    model: str
    chunks_written: int = 0
    write_paused: bool = False


class MockState:
    """Events and counters shared by all connections of one server.

    Events live in a bounded deque so that a long benchmark cannot grow the mock without limit.
    """

    def __init__(
        self, max_events: int = DEFAULT_MAX_EVENTS, faults: Faults | None = None, seed: int | None = None
    ) -> None:
        self.events: deque[JSONDict] = deque(maxlen=max_events)
        self.conns: set[MockConnection] = set()
        self.active: dict[str, ActiveStream] = {}
        self.total_connections = 0
        self.faults = faults or Faults()
        self.seed = seed
        self.rng = random.Random(seed)
        #: (secret, header, max skew s): verify every `/v1/` request's signature (None: off)
        self.signing: tuple[str, str, float] | None = None
        self._conn_counter = 0
        self._request_counter = 0
        self.reset_counters()

    def reset_counters(self) -> None:
        """``DELETE /_mock/stats``: start counting afresh (e.g. between phases of a test)."""
        self.requests = 0  #: every request but ``/_mock/*`` (health checks included)
        self.completions = 0  #: completion requests, faulted ones included
        self.completions_by_status: dict[int, int] = {}  #: the status each completion was answered
        self.faulted = {"status": 0, "hang": 0, "slow_tail": 0}
        self.streams = 0
        self.completed_streams = 0
        self.aborted_streams = 0
        self.dropped_streams = 0
        self.aborted_requests = 0

    def set_faults(self, faults: Faults, seed: int | None) -> None:
        self.faults = faults
        if seed is not None:
            self.seed = seed
            self.rng.seed(seed)

    def next_conn_id(self) -> int:
        self._conn_counter += 1
        return self._conn_counter

    def next_request_id(self) -> int:
        self._request_counter += 1
        return self._request_counter

    def record(
        self, event: str, conn: int, path: str | None = None, model: str | None = None, **extra: Any
    ) -> None:
        self.events.append(
            {"t": time.monotonic(), "event": event, "conn": conn, "path": path, "model": model, **extra}
        )

    def stats(self) -> JSONDict:
        return {
            "open_connections": len(self.conns),
            "total_connections": self.total_connections,
            "requests": self.requests,
            "completions": self.completions,
            "completions_by_status": {str(k): v for k, v in sorted(self.completions_by_status.items())},
            "faulted": dict(self.faulted),
            "streams": self.streams,
            "completed_streams": self.completed_streams,
            "aborted_streams": self.aborted_streams,
            "dropped_streams": self.dropped_streams,
            "aborted_requests": self.aborted_requests,
            "active_streams": [
                {
                    "stream": s.stream,
                    "conn": s.conn,
                    "path": s.path,
                    "model": s.model,
                    "chunks_written": s.chunks_written,
                    "write_paused": s.write_paused,
                }
                for s in self.active.values()
            ],
        }


# --------------------------------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def response_bytes(
    status: int,
    body: bytes,
    *,
    keep_alive: bool,
    content_type: str = "application/json",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    head = (
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in extra)
        + f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return _status_line(status) + head.encode("latin-1") + body


def chunk(payload: bytes) -> bytes:
    """Frame ``payload`` as one HTTP/1.1 chunk."""
    return b"%x\r\n" % len(payload) + payload + b"\r\n"


def parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``pos``; ``None`` while incomplete, else (body, end offset)."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 4096:
                raise HTTPError(400, "invalid chunk size line")
            return None
        size_field = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        if not _HEX_RE.fullmatch(size_field):
            raise HTTPError(400, "invalid chunk size")
        size = int(size_field, 16)
        pos = eol + 2
        if size == 0:
            while True:  # optional trailers, ended by an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(out) + size > MAX_BODY_BYTES:
            raise HTTPError(413, "request body too large")
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise HTTPError(400, "chunk data not followed by CRLF")
        out += buf[pos : pos + size]
        pos += size + 2


class MockConnection(asyncio.Protocol):
    """One client connection: parses requests, answers simple ones inline and slow ones in a task.

    Only one request is in flight per connection (no pipelining); bytes that arrive meanwhile are
    buffered. When the peer goes away the running task is cancelled, which is how a stream learns it
    was aborted even while it sleeps between chunks.
    """

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.id = 0
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._open = False  # False once either side started closing
        self._lost = False
        self._busy = False
        self._wrote = False  # whether the current request got any response bytes
        self._continue_sent = False
        self._task: asyncio.Task[None] | None = None
        self._write_ok = asyncio.Event()
        self._write_ok.set()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._open = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # e.g. a non-TCP socket; latency only, not correctness
                log.debug("TCP_NODELAY not set: %s", exc)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        st = self.state
        self.id = st.next_conn_id()
        st.conns.add(self)
        st.total_connections += 1
        st.record("conn_open", self.id)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                self.abort()
            return
        self._process()

    def eof_received(self) -> bool:
        # A half-closed client is treated as gone: that is what a cancelling client looks like.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._lost = True
        self._write_ok.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.state.conns.discard(self)
        self.state.record("conn_close", self.id, error=repr(exc) if exc else None)

    def pause_writing(self) -> None:
        self._write_ok.clear()

    def resume_writing(self) -> None:
        self._write_ok.set()

    # -- plumbing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self._wrote = True
        self.transport.write(data)

    def close(self) -> None:
        """Close after flushing what was written (FIN, not RST)."""
        self._open = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._open = False
        if self.transport is not None:
            self.transport.abort()

    def cancel(self) -> asyncio.Task[None] | None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        return task

    def send_error(self, err: HTTPError, *, keep_alive: bool) -> None:
        self.write(response_bytes(err.status, err.body(), keep_alive=keep_alive))

    def send_json(self, obj: object, *, keep_alive: bool, status: int = 200) -> None:
        self.write(response_bytes(status, orjson.dumps(obj), keep_alive=keep_alive))

    def _parse(self) -> Request | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):  # RFC 9112: ignore stray CRLFs before a request line
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise HTTPError(431, "request headers too large")
            return None
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HTTPError(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPError(400, "malformed header line")
            headers[name.lower()] = value.strip()
        start = end + 4
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise HTTPError(501, f"unsupported transfer-encoding {te!r}")
            parsed = parse_chunked(buf, start)
            if parsed is None:
                self._maybe_continue(headers)
                return None
            body, stop = parsed
        else:
            length = headers.get("content-length", "0")
            if not (length.isascii() and length.isdigit()):
                raise HTTPError(400, "invalid content-length")
            size = int(length)
            if size > MAX_BODY_BYTES:
                raise HTTPError(413, "request body too large")
            if len(buf) < start + size:
                self._maybe_continue(headers)
                return None
            body, stop = bytes(buf[start : start + size]), start + size
        del buf[:stop]
        self._continue_sent = False
        conn_hdr = headers.get("connection", "").lower()
        keep_alive = "close" not in conn_hdr if version == "HTTP/1.1" else "keep-alive" in conn_hdr
        return Request(method, target.split("?", 1)[0], headers, body, keep_alive)

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if not self._continue_sent and headers.get("expect", "").lower() == "100-continue":
            self._continue_sent = True
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _process(self) -> None:
        """Answer every complete buffered request until one needs a task or the buffer runs dry."""
        while self._open and not self._busy:
            try:
                req = self._parse()
            except HTTPError as err:
                self.send_error(err, keep_alive=False)
                self.close()
                return
            if req is None:
                return
            self._wrote = False
            try:
                coro = route(self, req)
            except HTTPError as err:
                self.send_error(err, keep_alive=req.keep_alive)
                coro = None
            except Exception:
                log.exception("handler failed for %s %s", req.method, req.path)
                self._fail()
                return
            if coro is not None:
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._run(coro, req))
                return
            if not req.keep_alive:
                self.close()
                return

    async def _run(self, coro: Coroutine[Any, Any, None], req: Request) -> None:
        try:
            await coro
        except HTTPError as err:
            if self._open:
                self.send_error(err, keep_alive=req.keep_alive)
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.path)
            self._fail()
        finally:
            self._task = None
            self._busy = False
            if self._open:
                if req.keep_alive:
                    self._process()
                else:
                    self.close()

    def _fail(self) -> None:
        """A bug in the mock: answer 500 if nothing was sent yet, else cut the connection."""
        if self._open and not self._wrote:
            self.send_error(HTTPError(500, "openai-mock internal error"), keep_alive=False)
            self.close()
        else:
            self.abort()

    async def wait_writable(self, active: ActiveStream) -> None:
        """Back-pressure: wait while the transport buffer is above the high-water mark."""
        if not self._write_ok.is_set():
            active.write_paused = True
            try:
                await self._write_ok.wait()
            finally:
                active.write_paused = False

    @property
    def lost(self) -> bool:
        return self._lost


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------

Handler = Coroutine[Any, Any, None]


def _invalid_url(req: Request) -> HTTPError:
    return HTTPError(404, f"Invalid URL ({req.method} {req.path})", type_="invalid_request_error")


def route(conn: MockConnection, req: Request) -> Handler | None:
    """Answer ``req`` inline, or return a coroutine for answers that must wait (delays, streams, hang)."""
    path, method, state = req.path, req.method, conn.state
    if path.startswith("/_mock/"):
        if path == "/_mock/events" and method == "GET":
            conn.send_json({"events": list(state.events)}, keep_alive=req.keep_alive)
        elif path == "/_mock/events" and method == "DELETE":
            state.events.clear()
            conn.send_json({"cleared": True}, keep_alive=req.keep_alive)
        elif path == "/_mock/stats" and method == "GET":
            loop_module = type(asyncio.get_running_loop()).__module__  # "uvloop" or "asyncio.*"
            conn.send_json({**state.stats(), "loop": loop_module}, keep_alive=req.keep_alive)
        elif path == "/_mock/stats" and method == "DELETE":
            state.reset_counters()
            conn.send_json({"cleared": True}, keep_alive=req.keep_alive)
        elif path == "/_mock/faults":
            _faults_route(conn, req)
        else:
            raise _invalid_url(req)
        return None

    state.requests += 1
    if state.signing is not None and path.startswith("/v1/"):
        secret, header, skew = state.signing
        why = verify(req.headers.get(header), secret, method, path, req.body, max_skew_s=skew)
        if why is not None:
            state.record("signature_rejected", conn.id, path, None, method=method, reason=why)
            raise HTTPError(401, f"Request signature refused: {why}", code="invalid_signature")
    if path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
        return _completion(conn, req, chat=path == "/v1/chat/completions")
    if path == "/v1/embeddings" and method == "POST":
        return _embeddings(conn, req)
    if path == "/v1/messages" and method == "POST":  # Anthropic's wire (the `anthropic` provider)
        from .anthropic_mock import messages_route

        return messages_route(conn, req)
    state.record("request", conn.id, path, None, method=method, stream=False, headers=req.headers, body=None)
    if method == "GET" and path == "/health":
        conn.send_json({"status": "ok"}, keep_alive=req.keep_alive)
    elif method == "GET" and path == "/v1/models":
        conn.send_json({"object": "list", "data": [_model(m) for m in MODEL_IDS]}, keep_alive=req.keep_alive)
    elif method == "GET" and path.startswith("/v1/models/"):
        model_id = path[len("/v1/models/") :]
        if model_id not in MODEL_IDS:
            raise HTTPError(
                404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        conn.send_json(_model(model_id), keep_alive=req.keep_alive)
    else:
        raise _invalid_url(req)
    return None


def _faults_route(conn: MockConnection, req: Request) -> None:
    """``GET`` the process faults, ``POST`` a new set (every field absent takes its default;
    ``"seed"`` re-seeds the random source), ``DELETE`` clears them (the seed is not a fault: the
    random source goes on)."""
    state = conn.state
    if req.method == "POST":
        try:
            obj = orjson.loads(req.body or b"{}")
        except orjson.JSONDecodeError:
            raise HTTPError(400, "faults must be a JSON object") from None
        faults = Faults.from_json(obj)
        seed = _get_int(obj, "seed", minimum=0, param="seed")
        state.set_faults(faults, seed)
        log.info("faults set: %s", faults)
    elif req.method == "DELETE":
        state.set_faults(Faults(), None)
    elif req.method != "GET":
        raise _invalid_url(req)
    conn.send_json({**state.faults.to_json(), "seed": state.seed}, keep_alive=req.keep_alive)


def _model(model_id: str) -> JSONDict:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "fastpath-mock"}


def read_body(conn: MockConnection, req: Request, *, streams: bool = True) -> Any:
    """The request's JSON body (None when it is not JSON), recorded first as a `request` event:
    every model route records what it was sent, parsed or not. `streams`: the route honours the
    body's `stream` flag (embeddings never stream)."""
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        body = None
    model = body.get("model") if isinstance(body, dict) else None
    conn.state.record(
        "request",
        conn.id,
        req.path,
        model if isinstance(model, str) else None,
        method=req.method,
        stream=streams and isinstance(body, dict) and body.get("stream") is True,
        headers=req.headers,
        body=body,
    )
    return body


def _completion(conn: MockConnection, req: Request, *, chat: bool) -> Handler | None:
    state = conn.state
    body = read_body(conn, req)
    state.completions += 1
    if not isinstance(body, dict):
        _answered(state, 400)
        raise HTTPError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)",
        )
    counter = state.next_request_id()
    try:
        plan = (
            plan_chat(body, f"chatcmpl-mock-{counter}")
            if chat
            else plan_completion(body, f"cmpl-mock-{counter}")
        )
    except HTTPError as err:
        _answered(state, err.status)
        raise
    knobs = _with_faults(state, plan.knobs, body.get("mock") or {})
    first_delay = knobs.first_delay_ms / 1000.0
    if knobs.raw is not None:
        return _raw(conn, req, plan, knobs.raw.encode("utf-8"), first_delay)
    if knobs.hang:
        return _hang(conn, req, plan)
    if knobs.status is not None and knobs.status != 200:
        error = HTTPError(knobs.status, f"mock error (status {knobs.status})")
        retry_after = state.faults.retry_after
        extra = () if retry_after is None else (("Retry-After", retry_after),)
        data = response_bytes(knobs.status, error.body(), keep_alive=req.keep_alive, extra=extra)
        _answered(state, knobs.status)
    elif plan.stream:
        _answered(state, 200)
        return _stream(conn, req, plan)
    else:
        data = response_bytes(200, orjson.dumps(render_body(plan)), keep_alive=req.keep_alive)
        _answered(state, 200)
    if first_delay > 0:
        return _delayed(conn, req, plan, data, first_delay)
    conn.write(data)
    return None


# --------------------------------------------------------------------------------------------------
# Embeddings: deterministic feature hashing, in OpenAI's wire format
# --------------------------------------------------------------------------------------------------

#: Vector sizes of OpenAI's embedding models (others: EMBED_DEFAULT_DIM); `dimensions` overrides,
#: except for ada-002 which, like OpenAI's, refuses it.
EMBED_DIMS: Final[dict[str, int]] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
EMBED_DEFAULT_DIM: Final = 64
EMBED_MAX_INPUTS: Final = 2048


def embed_text(words: Sequence[str], dim: int) -> list[float]:
    """A unit vector from the hashed words (feature hashing: each word adds +-1 to a bucket), so
    texts sharing words are close; no words: a vector seeded by nothing, the same each time.
    Values are float32-exact, so float and base64 answers carry the same numbers."""
    vec = [0.0] * dim
    for w in words:
        h = int.from_bytes(hashlib.blake2b(w.lower().encode(), digest_size=8).digest(), "little")
        vec[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    if not any(vec):
        vec[0] = 1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return array.array("f", [v / norm for v in vec]).tolist()


def _embedding_inputs(inp: object) -> list[list[str]]:
    """OpenAI's input shapes -> words per input (token ids count as words); errors as OpenAI's."""
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not inp:
        raise HTTPError(400, "'$.input' is invalid. Please check the API reference.", param="input")
    if len(inp) > EMBED_MAX_INPUTS:
        raise HTTPError(400, f"'$.input' is too long. Maximum length is {EMBED_MAX_INPUTS}.", param="input")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in inp):
        return [[str(x) for x in inp]]
    out: list[list[str]] = []
    for x in inp:
        if isinstance(x, str) and x:
            out.append(_WORD_RE.findall(x) or [x])
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            out.append([str(t) for t in x])
        else:
            raise HTTPError(400, "'$.input' is invalid. Please check the API reference.", param="input")
    return out


def render_embeddings(body: JSONDict, model: str, float_only: bool, no_usage: bool) -> JSONDict:
    """The whole answer; raises HTTPError for what OpenAI refuses. `float_only`: ignore
    `encoding_format` (an upstream that cannot send base64)."""
    inputs = _embedding_inputs(body.get("input"))
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise HTTPError(
            400,
            f"Invalid value for 'encoding_format': {fmt!r}.",
            param="encoding_format",
            code="invalid_value",
        )
    dim = EMBED_DIMS.get(model, EMBED_DEFAULT_DIM)
    dimensions = _get_int(body, "dimensions", minimum=1, param="dimensions")
    if dimensions is not None:
        if model == "text-embedding-ada-002":
            raise HTTPError(400, "This model does not support specifying dimensions.", param="dimensions")
        dim = dimensions
    data = []
    for i, words in enumerate(inputs):
        vec: list[float] | str = embed_text(words, dim)
        if fmt == "base64" and not float_only:
            vec = base64.b64encode(array.array("f", vec).tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    out: JSONDict = {"object": "list", "data": data, "model": model}
    if not no_usage:
        tokens = sum(len(w) for w in inputs)
        out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return out


def _embeddings(conn: MockConnection, req: Request) -> Handler | None:
    """``POST /v1/embeddings``; knobs: ``status``, ``first_delay_ms``, ``no_usage``, ``float_only``;
    of the process faults only ``first_delay_ms`` applies."""
    state = conn.state
    body = read_body(conn, req, streams=False)
    if not isinstance(body, dict):
        raise HTTPError(400, "We could not parse the JSON body of your request.")
    model = _require_model(body)
    knobs = Knobs.from_body(body, model)
    mock = body.get("mock") or {}
    if "first_delay_ms" not in mock:  # a slow embedding model for callers that send no knobs
        knobs.first_delay_ms = state.faults.first_delay_ms
    if knobs.status is not None and knobs.status != 200:
        raise HTTPError(knobs.status, f"mock error (status {knobs.status})")
    float_only = _get_bool(mock, "float_only", param="mock.float_only")
    data = response_bytes(
        200,
        orjson.dumps(render_embeddings(body, model, float_only, knobs.no_usage)),
        keep_alive=req.keep_alive,
    )
    if knobs.first_delay_ms > 0:

        async def later() -> None:
            await asyncio.sleep(knobs.first_delay_ms / 1000)
            conn.write(data)

        return later()
    conn.write(data)
    return None


def _answered(state: MockState, status: int) -> None:
    state.completions_by_status[status] = state.completions_by_status.get(status, 0) + 1


def _with_faults(state: MockState, knobs: Knobs, mock: JSONDict) -> Knobs:
    """The request's knobs with the process faults filled in where the request set nothing."""
    faults, rng = state.faults, state.rng
    # always three draws, so a seed reproduces the same faults whatever is configured
    status_draw, hang_draw, tail_draw = rng.random(), rng.random(), rng.random()
    if knobs.raw is not None:
        return knobs
    if "hang" not in mock and hang_draw < faults.hang_rate:
        state.faulted["hang"] += 1
        knobs.hang = True
        return knobs
    if "status" not in mock and faults.status is not None and status_draw < faults.status_rate:
        state.faulted["status"] += 1
        knobs.status = faults.status
    if "first_delay_ms" not in mock:
        knobs.first_delay_ms = faults.first_delay_ms
        if tail_draw < faults.slow_tail_rate:
            state.faulted["slow_tail"] += 1
            knobs.first_delay_ms += faults.slow_tail_ms
    return knobs


async def _guard_request(conn: MockConnection, req: Request, plan: Plan, work: Callable[[], Handler]) -> None:
    """Run ``work``, recording ``request_aborted`` if the peer leaves before it is answered."""
    try:
        await work()
    except asyncio.CancelledError:
        if conn.lost:
            conn.state.aborted_requests += 1
            conn.state.record("request_aborted", conn.id, req.path, plan.model, id=plan.rid)
        raise


async def _delayed(conn: MockConnection, req: Request, plan: Plan, data: bytes, delay: float) -> None:
    async def work() -> None:
        await asyncio.sleep(delay)
        conn.write(data)

    await _guard_request(conn, req, plan, work)


async def _raw(conn: MockConnection, req: Request, plan: Plan, data: bytes, delay: float) -> None:
    async def work() -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        conn.write(data)
        conn.close()  # the framing of a raw response is unknown, so the connection cannot be reused

    await _guard_request(conn, req, plan, work)


async def _hang(conn: MockConnection, req: Request, plan: Plan) -> None:
    async def work() -> None:
        await asyncio.get_running_loop().create_future()  # resolved never; cancelled when the peer leaves

    await _guard_request(conn, req, plan, work)


def _stream_head(keep_alive: bool) -> bytes:
    return _status_line(200) + (
        "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode("latin-1")


async def _stream(conn: MockConnection, req: Request, plan: Plan) -> None:
    """Write the SSE stream, one HTTP chunk per event, honouring delays, drops and back-pressure."""
    state, knobs = conn.state, plan.knobs
    active = ActiveStream(plan.rid, conn.id, req.path, plan.model)
    state.streams += 1
    state.active[plan.rid] = active
    state.record("stream_start", conn.id, req.path, plan.model, stream=plan.rid)
    outcome = "aborted"
    try:
        if knobs.first_delay_ms > 0:
            await asyncio.sleep(knobs.first_delay_ms / 1000.0)
        head_bytes = _stream_head(req.keep_alive)
        head: bytes | None = head_bytes  # None once sent: headers ride with the first event
        drop = knobs.drop_after_chunks
        delay = knobs.chunk_delay_ms / 1000.0
        if drop == 0:
            conn.write(head_bytes)
            conn.close()
            outcome = "dropped"
            return
        for payload in render_stream(plan):
            if head is None:  # not the first event: pace, and let the loop notice a departed peer
                await asyncio.sleep(delay)
            await conn.wait_writable(active)
            if conn.lost:
                return
            data = chunk(payload)
            if payload is _DONE_FRAME:
                data += _CHUNKED_END
            if head is not None:
                data = head + data
                head = None
            conn.write(data)
            active.chunks_written += 1
            if drop is not None and active.chunks_written >= drop and payload is not _DONE_FRAME:
                conn.close()
                outcome = "dropped"
                return
        outcome = "completed"
    except OSError as exc:  # the write itself failed: the peer is gone
        log.debug("stream write failed: %s", exc)
    finally:
        state.active.pop(plan.rid, None)
        _finish_stream(conn, req, plan, active, outcome)


def _finish_stream(
    conn: MockConnection, req: Request, plan: Plan, active: ActiveStream, outcome: str
) -> None:
    state = conn.state
    extra = {"stream": plan.rid, "chunks_written": active.chunks_written}
    if outcome == "completed":
        state.completed_streams += 1
        state.record("stream_end", conn.id, req.path, plan.model, dropped=False, **extra)
    elif outcome == "dropped":
        state.dropped_streams += 1
        state.record("stream_end", conn.id, req.path, plan.model, dropped=True, **extra)
    else:
        state.aborted_streams += 1
        state.record("stream_aborted", conn.id, req.path, plan.model, **extra)
        log.warning(
            "stream_aborted conn=%d path=%s model=%s stream=%s chunks_written=%d",
            conn.id,
            req.path,
            plan.model,
            plan.rid,
            active.chunks_written,
        )


# --------------------------------------------------------------------------------------------------
# Server lifecycle and CLI
# --------------------------------------------------------------------------------------------------


class MockServer:
    """A running mock: the ``asyncio.Server`` plus its :class:`MockState`, usable as an async context."""

    def __init__(self, server: asyncio.Server, state: MockState, host: str) -> None:
        self.server = server
        self.state = state
        self.host = host
        self.port: int = server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (no ``/v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client wants as ``base_url``."""
        return self.url + "/v1"

    async def aclose(self) -> None:
        """Stop listening, cut every connection and wait for in-flight handlers to unwind."""
        self.server.close()
        tasks = [t for t in (c.cancel() for c in list(self.state.conns)) if t is not None]
        for conn in list(self.state.conns):
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def __aenter__(self) -> MockServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    backlog: int = 1024,
    faults: Faults | None = None,
    seed: int | None = None,
    signing: tuple[str, str, float] | None = None,
) -> MockServer:
    """Start listening on the running loop and return at once; ``port=0`` picks a free port.
    ``signing``: (secret, header, max skew s) to verify on every ``/v1/`` request."""
    state = MockState(max_events, faults, seed)
    state.signing = signing
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockConnection(state), host, port, backlog=backlog, reuse_address=True
    )
    return MockServer(server, state, host)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.dev.openai_mock", description="Deterministic OpenAI-compatible mock upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--ready-file", help="write 'http://HOST:PORT' here once listening; removed on exit")
    parser.add_argument("--max-events", type=int, default=DEFAULT_MAX_EVENTS, help="events kept in memory")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib asyncio loop")
    parser.add_argument("--log-level", default="INFO")
    faults = parser.add_argument_group("process-wide faults (also: POST /_mock/faults)")
    faults.add_argument("--fault-status", type=int, help="answer completions with this HTTP status ...")
    faults.add_argument("--fault-status-rate", type=float, default=1.0, help="... this fraction of them")
    faults.add_argument("--first-delay-ms", type=float, default=0.0, help="delay before every answer")
    faults.add_argument("--slow-tail-rate", type=float, default=0.0, help="this fraction of requests ...")
    faults.add_argument("--slow-tail-ms", type=float, default=0.0, help="... waits this much longer")
    faults.add_argument("--hang-rate", type=float, default=0.0, help="this fraction never answers")
    faults.add_argument("--retry-after", help="Retry-After header on the mock's error answers")
    faults.add_argument("--seed", type=int, help="seed of the fault draws (reproducible runs)")
    signing = parser.add_argument_group("request signing (gateway.signing)")
    signing.add_argument(
        "--verify-signing",
        metavar="SECRET",
        default=os.environ.get("OPENAI_MOCK_SIGNING_SECRET"),
        help="answer 401 to /v1/ requests without a valid signature (env: OPENAI_MOCK_SIGNING_SECRET)",
    )
    signing.add_argument("--signing-header", default=DEFAULT_HEADER)
    signing.add_argument("--signing-max-skew-s", type=float, default=DEFAULT_MAX_SKEW_S)
    args = parser.parse_args(argv)
    args.signing = (
        (args.verify_signing, args.signing_header.lower(), args.signing_max_skew_s)
        if args.verify_signing
        else None
    )
    try:
        args.faults = Faults.from_json(
            {
                "status": args.fault_status,
                "status_rate": args.fault_status_rate,
                "first_delay_ms": args.first_delay_ms,
                "slow_tail_rate": args.slow_tail_rate,
                "slow_tail_ms": args.slow_tail_ms,
                "hang_rate": args.hang_rate,
                "retry_after": args.retry_after,
            }
        )
    except HTTPError as err:
        flag = {"status": "fault-status", "status_rate": "fault-status-rate"}.get(
            str(err.param), str(err.param)
        )
        parser.error(f"--{flag.replace('_', '-')}: {err.message}")
    return args


def _write_ready_file(path: str, url: str) -> None:
    """Atomically, so a poller never reads a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(url + "\n")
    os.replace(tmp, path)


async def _amain(args: argparse.Namespace) -> int:
    mock = await serve(
        args.host,
        args.port,
        max_events=args.max_events,
        faults=args.faults,
        seed=args.seed,
        signing=args.signing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"openai-mock listening on {mock.url}", flush=True)
    if args.ready_file:
        _write_ready_file(args.ready_file, mock.url)
    try:
        await stop.wait()
    finally:
        await mock.aclose()
        if args.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.ready_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="openai-mock: %(message)s", stream=sys.stderr)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop not installed; using the asyncio loop")
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
