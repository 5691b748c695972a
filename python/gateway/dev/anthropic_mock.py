"""The mock's Anthropic-wire endpoint, `POST /v1/messages`, standing in for Anthropic's API
(which cannot be reached here) behind the `anthropic` provider kind.

It speaks the Messages wire exactly and independently of the gateway's translation: the same
deterministic "model" as the OpenAI routes (echo the last user text, one token per word; a
forced tool call answers `{"echo": ...}`), `max_tokens` and `stop_sequences`, stream events
(`message_start`, `content_block_*`, `ping`, `message_delta`, `message_stop`; tool input as
`input_json_delta` pieces, one per word), Anthropic's error shape, and the `mock` knobs
(`status`, `first_delay_ms`, `chunk_delay_ms`, `drop_after_chunks`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from .openai_mock import (
    JSONDict,
    Knobs,
    _answered,
    _status_line,
    chunk,
    count_words,
    read_body,
    response_bytes,
    split_pieces,
    truncate,
)

if TYPE_CHECKING:
    from .openai_mock import MockConnection, Request

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> bytes:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    return ""


def plan(
    body: JSONDict, counter: int, cached: int | None = None
) -> tuple[JSONDict, list[tuple[str, JSONDict]]]:
    """The unary message and the stream's events for one request; `cached` (the knob): that many
    prompt tokens are reported as prompt-cache reads (Anthropic leaves them out of input_tokens)."""
    model, messages, max_tokens = body.get("model"), body.get("messages"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise AnthropicError(400, "model: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise AnthropicError(400, "max_tokens: Field required (an integer >= 1)")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise AnthropicError(400, "messages: at least one message is required")
    system = body.get("system")
    prompt = count_words(_text(system)) + sum(count_words(_text(m.get("content"))) + 3 for m in messages)
    last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    tools, choice = body.get("tools"), body.get("tool_choice")
    tool: str | None = None
    if (
        isinstance(tools, list)
        and tools
        and isinstance(choice, dict)
        and choice.get("type") in ("any", "tool")
    ):
        name = choice.get("name") if choice.get("type") == "tool" else tools[0].get("name")
        tool = name if isinstance(name, str) else None
    text = orjson.dumps({"echo": last}).decode() if tool is not None else "You said: " + last
    stops = body.get("stop_sequences")
    matched = None
    if tool is None and isinstance(stops, list):
        cut = len(text)
        for s in stops:
            at = text.find(s) if isinstance(s, str) and s else -1
            if 0 <= at < cut:
                cut, matched = at, s
        text = text[:cut]
    pieces, truncated = truncate(split_pieces(text), max_tokens)
    reason = (
        "max_tokens"
        if truncated
        else "tool_use"
        if tool is not None
        else "stop_sequence"
        if matched
        else "end_turn"
    )
    sequence = matched if reason == "stop_sequence" else None
    msg_id = f"msg_mock_{counter}"
    out_tokens = len(pieces)
    if tool is not None:
        block: JSONDict = {"type": "tool_use", "id": f"toolu_mock_{counter}", "name": tool, "input": {}}
        final = {**block, "input": orjson.loads("".join(pieces)) if not truncated else {}}
        delta_type, field = "input_json_delta", "partial_json"
    else:
        block = {"type": "text", "text": ""}
        final = {"type": "text", "text": "".join(pieces)}
        delta_type, field = "text_delta", "text"
    usage: JSONDict = {"input_tokens": prompt, "output_tokens": out_tokens}
    if cached is not None:
        read = min(cached, prompt)
        usage = {**usage, "input_tokens": prompt - read, "cache_read_input_tokens": read}
    message: JSONDict = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [final],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage,
    }
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events: list[tuple[str, JSONDict]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
        ("ping", {"type": "ping"}),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, field: p}},
        )
        for p in pieces
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": out_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return message, events


def messages_route(conn: MockConnection, req: Request) -> Coroutine[Any, Any, None] | None:
    """`POST /v1/messages`: an inline answer (None), or a coroutine for delays and streams."""
    state = conn.state
    body = read_body(conn, req)
    stream = isinstance(body, dict) and body.get("stream") is True
    state.completions += 1
    try:
        if not isinstance(body, dict):
            raise AnthropicError(400, "The request body is not valid JSON.")
        if not req.headers.get("x-api-key") or not req.headers.get("anthropic-version"):
            raise AnthropicError(401, "x-api-key and anthropic-version headers are required")
        knobs = Knobs.from_body(body, str(body.get("model")))
        if knobs.status is not None and knobs.status != 200:
            raise AnthropicError(knobs.status, f"mock error (status {knobs.status})")
        message, events = plan(body, state.next_request_id(), knobs.cached_tokens)
    except AnthropicError as err:
        _answered(state, err.status)
        conn.write(response_bytes(err.status, err.body(), keep_alive=req.keep_alive))
        return None
    _answered(state, 200)
    if not stream:
        data = response_bytes(200, orjson.dumps(message), keep_alive=req.keep_alive)
        if knobs.first_delay_ms <= 0:
            conn.write(data)
            return None
        return _later(conn, data, knobs.first_delay_ms / 1000)
    return _stream(conn, req, events, knobs)


async def _later(conn: MockConnection, data: bytes, delay: float) -> None:
    await asyncio.sleep(delay)
    conn.write(data)


async def _stream(
    conn: MockConnection, req: Request, events: list[tuple[str, JSONDict]], knobs: Knobs
) -> None:
    if knobs.first_delay_ms > 0:
        await asyncio.sleep(knobs.first_delay_ms / 1000)
    head = _status_line(200) + (
        "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
        f"Connection: {'keep-alive' if req.keep_alive else 'close'}\r\n\r\n"
    ).encode("latin-1")
    conn.write(head)
    for n, (name, data) in enumerate(events):
        if n and knobs.chunk_delay_ms > 0:
            await asyncio.sleep(knobs.chunk_delay_ms / 1000)
        if conn.lost:
            return
        if knobs.drop_after_chunks is not None and n >= knobs.drop_after_chunks:
            conn.close()
            return
        conn.write(chunk(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))))
    conn.write(b"0\r\n\r\n")
