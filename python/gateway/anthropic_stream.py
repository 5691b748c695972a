"""Streams between the two wires, one upstream read (or relay send) at a time.

`ChatToMessages`: the OpenAI frames the relay sends (chunks, the usage chunk, `[DONE]`, error
events, pings, comments) -> Anthropic's stream events (`message_start`, `content_block_start` /
`_delta` / `_stop`, `message_delta` with the stop reason and usage, `message_stop`, `ping`,
`error`). The Python reference of the Rust `_fastpath.MessagesStream` the dialect uses on the hot
path (tests hold the two to the same output).

`MessagesToChat`: an Anthropic upstream's events -> OpenAI chunk frames (the `anthropic`
provider kind), with what the relay and the response stages need (text, usage, finish).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from .anthropic_wire import error_type_of, stop_reason, tool_input

_encode = msgspec.json.Encoder().encode


class _Fn(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _DeltaCall(msgspec.Struct, gc=False):
    index: int = 0
    id: str | None = None
    function: _Fn | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: list[_DeltaCall] | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    stop_reason: Any = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Error(msgspec.Struct, gc=False):
    message: str | None = None
    type: str | None = None
    code: Any = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: _Error | None = None


_chunk = msgspec.json.Decoder(_Chunk)
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_DONE = b"[DONE]"


def event(name: bytes, data: bytes) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name, data)


class ChatFrames:
    """The read side both client-dialect translators share (inherited, so no extra call per
    chunk): the relay's sends -> frames, a `data:` chunk to the subclass's `_chunk`, `[DONE]` to
    its `_end`, nothing once `done`. The framers emit whole events, so a send splits on blank
    lines; a partial tail waits for the next."""

    __slots__ = ("_buf", "done")

    #: what a keep-alive ping comment becomes (by default it passes through as it is)
    _ping = b": ping\n\n"

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self._buf:
            data = self._buf + data
        parts = data.split(b"\n\n")
        self._buf = parts.pop()
        out = b""
        for frame in parts:
            if not frame or self.done:
                continue
            if frame[:1] == b":":  # pings and the timing comment
                out += self._ping if frame == b": ping" else frame + b"\n\n"
                continue
            if not frame.startswith(b"data: "):
                continue
            payload = frame[6:]
            if payload == _DONE:
                out += self._end()
                continue
            try:
                chunk = _chunk.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            out += self._chunk(chunk)
        return out

    def _chunk(self, c: _Chunk) -> bytes:
        raise NotImplementedError

    def _end(self) -> bytes:
        raise NotImplementedError


class ChatToMessages(ChatFrames):
    """OpenAI chat frames -> Anthropic stream events, for one stream; `message_start` leads the
    first send, a keep-alive ping becomes Anthropic's `ping` event. Choice 0 only (a Messages
    request never asks for more)."""

    __slots__ = (
        "_block",
        "_calls",
        "_finish",
        "_input",
        "_matched",
        "_model",
        "_msg_id",
        "_next",
        "_output",
        "_started",
        "_stops",
    )

    _ping = _PING

    def __init__(self, msg_id: str, model: str, input_tokens: int, stops: list[str] | None) -> None:
        super().__init__()
        self._msg_id = msg_id
        self._model = model
        self._input = input_tokens
        self._output = 0
        self._stops = stops
        self._started = False
        #: the open content block's index (-1: none), the next block's index
        self._block = -1
        self._next = 0
        #: OpenAI tool-call index -> Anthropic block index
        self._calls: dict[int, int] = {}
        self._finish: str | None = None
        self._matched: Any = None

    def _start(self) -> bytes:
        self._started = True
        msg: dict[str, Any] = {
            "id": self._msg_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input, "output_tokens": 0},
        }
        return event(b"message_start", b'{"type":"message_start","message":%s}' % _encode(msg))

    def _close(self) -> bytes:
        if self._block < 0:
            return b""
        i, self._block = self._block, -1
        return event(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % i)

    def _open(self, block: bytes) -> tuple[bytes, int]:
        out = self._close()
        i = self._block = self._next
        self._next += 1
        return out + event(
            b"content_block_start",
            b'{"type":"content_block_start","index":%d,"content_block":%s}' % (i, block),
        ), i

    def feed(self, data: bytes) -> bytes:
        if self._started:
            return ChatFrames.feed(self, data)
        return self._start() + ChatFrames.feed(self, data)

    def _chunk(self, c: _Chunk) -> bytes:
        out = b""
        if c.error is not None:
            err = c.error
            self.done = True
            kind = error_type_of(err.type, err.code if isinstance(err.code, str) else None)
            body = {"type": "error", "error": {"type": kind, "message": err.message or ""}}
            return out + event(b"error", _encode(body))
        if c.usage is not None:
            self._input = c.usage.prompt_tokens
            self._output = c.usage.completion_tokens
        for choice in c.choices or ():
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    i = self._block
                    if i < 0 or i in self._calls.values():
                        head, i = self._open(b'{"type":"text","text":""}')
                        out += head
                    out += event(
                        b"content_block_delta",
                        b'{"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":%s}}'
                        % (i, _encode(delta.content)),
                    )
                for call in delta.tool_calls or ():
                    i = self._calls.get(call.index, -1)
                    fn = call.function
                    if i < 0:
                        block = {
                            "type": "tool_use",
                            "id": call.id or f"toolu_{self._msg_id}_{call.index}",
                            "name": (fn.name if fn is not None else None) or "",
                            "input": {},
                        }
                        head, i = self._open(_encode(block))
                        self._calls[call.index] = i
                        out += head
                    if fn is not None and fn.arguments:
                        out += event(
                            b"content_block_delta",
                            b'{"type":"content_block_delta","index":%d,'
                            b'"delta":{"type":"input_json_delta","partial_json":%s}}'
                            % (i, _encode(fn.arguments)),
                        )
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
                self._matched = choice.stop_reason
        return out

    def _end(self) -> bytes:
        self.done = True
        reason, sequence = stop_reason(self._finish, self._matched, self._stops)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": self._input, "output_tokens": self._output},
        }
        return (
            self._close()
            + event(b"message_delta", _encode(delta))
            + event(b"message_stop", b'{"type":"message_stop"}')
        )


# ---- Anthropic upstream -> OpenAI chunks ---------------------------------------------------------


class _ABlock(msgspec.Struct, gc=False):
    type: str = ""
    id: str | None = None
    name: str | None = None
    text: str | None = None


class _ADelta(msgspec.Struct, gc=False):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _AUsage(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


def _prompt_of(usage: _AUsage | dict[str, Any]) -> tuple[int, int]:
    """Anthropic's prompt usage in OpenAI's convention: (prompt tokens, cached prompt tokens).
    Anthropic's `input_tokens` leaves out the prompt-cache reads and writes; OpenAI's
    `prompt_tokens` includes the cached part (`prompt_tokens_details.cached_tokens`). Cache reads
    are the cached tokens; cache writes count as ordinary prompt tokens."""
    if isinstance(usage, dict):
        fields = [
            usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
        ]
    else:
        fields = [usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens]
    given, read, written = (int(x) if isinstance(x, int) else 0 for x in fields)
    return given + read + written, read


class _AMessage(msgspec.Struct, gc=False):
    id: str = ""
    model: str = ""
    usage: _AUsage | None = None


class _AError(msgspec.Struct, gc=False):
    type: str = ""
    message: str = ""


class _AEvent(msgspec.Struct, gc=False):
    type: str
    index: int = 0
    message: _AMessage | None = None
    content_block: _ABlock | None = None
    delta: _ADelta | None = None
    usage: _AUsage | None = None
    error: _AError | None = None


_aevent = msgspec.json.Decoder(_AEvent)

#: Anthropic stop_reason -> OpenAI finish_reason
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}


class MessagesToChat:
    """An Anthropic upstream's stream events -> OpenAI `chat.completion.chunk` frames."""

    __slots__ = (
        "_created",
        "_id",
        "_model",
        "_tools",
        "cached_tokens",
        "done",
        "error",
        "events",
        "finish_reason",
        "input_tokens",
        "output_tokens",
        "text",
    )

    def __init__(self, model: str) -> None:
        self._id = ""
        self._model = model
        self._created = int(time.time())
        #: Anthropic block index -> OpenAI tool-call index
        self._tools: dict[int, int] = {}
        self.done = False
        self.error: str | None = None
        self.events = 0
        self.finish_reason: str | None = None
        #: the prompt tokens, cache reads and writes included (OpenAI's convention: `_prompt_of`)
        self.input_tokens: int | None = None
        #: the prompt tokens read from Anthropic's prompt cache
        self.cached_tokens = 0
        self.output_tokens: int | None = None
        #: the completion text (and tool arguments) so far, for counting
        self.text: list[str] = []

    def _frame(
        self, delta: dict[str, Any] | None, finish: str | None = None, matched: str | None = None
    ) -> bytes:
        choices: list[dict[str, Any]] = []
        if delta is not None:
            choices.append({"index": 0, "delta": delta, "finish_reason": finish})
            if matched is not None:  # vLLM's field: the stop string that ended the text
                choices[0]["stop_reason"] = matched
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        return b"data: %s\n\n" % _encode(chunk)

    def usage_frame(self, prompt: int, completion: int, cached: int = 0) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        if cached:
            chunk["usage"]["prompt_tokens_details"] = {"cached_tokens": cached}
        return b"data: %s\n\n" % _encode(chunk)

    def on_event(self, data: str) -> bytes:
        """One Anthropic event's data (the `event:` name repeats its `type`)."""
        self.events += 1
        try:
            e = _aevent.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return b""
        t = e.type
        if t == "content_block_delta" and e.delta is not None:
            d = e.delta
            if d.type == "text_delta" and d.text:
                self.text.append(d.text)
                return self._frame({"content": d.text})
            if d.type == "input_json_delta" and d.partial_json:
                self.text.append(d.partial_json)
                index = self._tools.get(e.index, 0)
                return self._frame(
                    {"tool_calls": [{"index": index, "function": {"arguments": d.partial_json}}]}
                )
            return b""
        if t == "message_start" and e.message is not None:
            m = e.message
            self._id = m.id
            self._model = m.model or self._model
            if m.usage is not None and m.usage.input_tokens is not None:
                self.input_tokens, self.cached_tokens = _prompt_of(m.usage)
            return self._frame({"role": "assistant", "content": ""})
        if t == "content_block_start" and e.content_block is not None:
            b = e.content_block
            if b.type == "tool_use":
                index = self._tools[e.index] = len(self._tools)
                call = {
                    "index": index,
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": ""},
                }
                return self._frame({"tool_calls": [call]})
            if b.type == "text" and b.text:
                self.text.append(b.text)
                return self._frame({"content": b.text})
            return b""
        if t == "message_delta":
            if e.usage is not None:
                if e.usage.output_tokens is not None:
                    self.output_tokens = e.usage.output_tokens
                if e.usage.input_tokens is not None:
                    self.input_tokens, self.cached_tokens = _prompt_of(e.usage)
            if e.delta is not None and e.delta.stop_reason is not None:
                self.finish_reason = FINISH.get(e.delta.stop_reason, "stop")
                return self._frame({}, self.finish_reason, e.delta.stop_sequence)
            return b""
        if t == "message_stop":
            self.done = True
            return b""
        if t == "error":
            err = e.error or _AError()
            self.error = err.message or err.type
            body = {
                "error": {
                    "message": err.message,
                    "type": err.type or "api_error",
                    "param": None,
                    "code": None,
                }
            }
            return b"data: %s\n\n" % _encode(body)
        return b""  # ping, content_block_stop, unknown events


def chat_from_message(body: bytes, model_fallback: str) -> tuple[bytes, int, int, int] | None:
    """A unary Anthropic `message` -> (an OpenAI chat.completion, prompt, completion, cached
    prompt tokens); None when the body is not a message."""
    try:
        msg = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(msg, dict) or msg.get("type") != "message":
        return None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for b in msg.get("content") or ():
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif b.get("type") == "tool_use":
            calls.append(
                {
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b.get("name"), "arguments": _encode(b.get("input") or {}).decode()},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    raw_usage = msg.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    prompt, cached = _prompt_of(usage)
    completion = int(usage.get("output_tokens") or 0)
    reason = msg.get("stop_reason")
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": FINISH.get(reason, "stop") if isinstance(reason, str) else "stop",
    }
    if isinstance(msg.get("stop_sequence"), str):
        choice["stop_reason"] = msg["stop_sequence"]
    out_usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out_usage["prompt_tokens_details"] = {"cached_tokens": cached}
    out = {
        "id": msg.get("id") or "",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model") or model_fallback,
        "choices": [choice],
        "usage": out_usage,
    }
    return _encode(out), prompt, completion, cached


__all__ = [
    "FINISH",
    "ChatFrames",
    "ChatToMessages",
    "MessagesToChat",
    "chat_from_message",
    "event",
    "tool_input",
]
