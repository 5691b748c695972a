"""The relay's OpenAI chat frames -> the Responses API's stream events, for one stream.

`response.created` / `response.in_progress` first; text opens a `message` item
(`response.output_item.added`, `response.content_part.added`) and streams
`response.output_text.delta`; each tool call opens a `function_call` item and streams
`response.function_call_arguments.delta`; at `[DONE]` the open items close (`*.done` events)
and `response.completed` (or `incomplete` on a length stop) carries the whole response, which
the dialect then stores. An error event becomes `error` + `response.failed`. Pings and comments
pass through (SSE comments). Every event has `type` and `sequence_number`. Choice 0 only.

`ChatToResponses` is the Python reference of the Rust `_fastpath.ResponsesStream` the dialect
uses on the hot path (`native` builds it; tests hold the two to the same events).
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import _fastpath
from .anthropic_stream import ChatFrames, _Chunk
from .responses_wire import (
    ResponsesRequest,
    call_item,
    incomplete_reason,
    message_item,
    response_object,
    usage_of,
)

_encode = msgspec.json.Encoder().encode


def _event(kind: str, seq: int, body: dict[str, Any]) -> bytes:
    data = _encode({"type": kind, "sequence_number": seq, **body})
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)


def native(req: ResponsesRequest, prompt_tokens: int = 0) -> _fastpath.ResponsesStream:
    """The Rust translator for `req`: the response object's fixed fields are rendered once, the
    echo handed over as JSON."""
    return _fastpath.ResponsesStream(
        req.id, req.model, req.created_at, req.previous_response_id, _encode(req.echo), prompt_tokens
    )


class _Call:
    __slots__ = ("args", "call_id", "delta", "name", "out")

    def __init__(self, call_id: str, name: str, out: int, item_id: str) -> None:
        self.call_id = call_id
        self.name = name
        self.out = out
        self.args: list[str] = []
        #: the arguments delta event around its sequence number and JSON string
        self.delta = (
            b"event: response.function_call_arguments.delta\ndata: {"
            b'"type":"response.function_call_arguments.delta","sequence_number":%d,'
            b'"item_id":"' + item_id.encode() + b'","output_index":' + str(out).encode() + b',"delta":%s}\n\n'
        )


class ChatToResponses(ChatFrames):
    __slots__ = (
        "_calls",
        "_completion",
        "_delta",
        "_finish",
        "_msg_out",
        "_next_out",
        "_open",
        "_output",
        "_prompt",
        "_req",
        "_seq",
        "_text",
        "response",
    )

    def __init__(self, req: ResponsesRequest, prompt_tokens: int) -> None:
        super().__init__()
        self._req = req
        self._seq = 0
        self._prompt = prompt_tokens
        self._completion = 0
        self._finish: str | None = None
        #: output items in order, each filled when it closes
        self._output: list[dict[str, Any]] = []
        self._next_out = 0
        self._msg_out = -1  # the message item's output index (-1: none open)
        self._text: list[str] = []
        self._calls: dict[int, _Call] = {}
        self._open: _Call | None = None
        item_id = "msg_" + req.id[5:]
        #: the text delta event around its JSON string: one `%` per chunk
        self._delta = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"sequence_number":%d,"item_id":"' + item_id.encode() + b'","output_index":%d,'
            b'"content_index":0,"delta":%s,"logprobs":[]}\n\n'
        )
        #: the final response object (set at `[DONE]` or an error); `done`: nothing more to send
        self.response: dict[str, Any] | None = None

    def _ev(self, kind: str, body: dict[str, Any]) -> bytes:
        seq = self._seq
        self._seq = seq + 1
        return _event(kind, seq, body)

    def start(self) -> bytes:
        r = response_object(self._req, "in_progress", [], None)
        return self._ev("response.created", {"response": r}) + self._ev(
            "response.in_progress", {"response": r}
        )

    def _chunk(self, c: _Chunk) -> bytes:
        if c.error is not None:
            return self._fail(c.error.message or "", c.error.code if isinstance(c.error.code, str) else None)
        out = b""
        if c.usage is not None:
            self._prompt = c.usage.prompt_tokens
            self._completion = c.usage.completion_tokens
        for choice in c.choices or ():
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    if self._msg_out < 0:
                        out += self._open_message()
                    self._text.append(delta.content)
                    seq = self._seq
                    self._seq = seq + 1
                    out += self._delta % (seq, self._msg_out, _encode(delta.content))
                for call in delta.tool_calls or ():
                    out += self._call(call.index, call.id, call.function)
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
        return out

    def _open_message(self) -> bytes:
        out = self._close_call()
        i = self._msg_out = self._next_out
        self._next_out += 1
        self._output.append({})
        item = message_item(self._req, "", "in_progress")
        item["content"] = []
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (
            out
            + self._ev("response.output_item.added", {"output_index": i, "item": item})
            + self._ev(
                "response.content_part.added",
                {"item_id": item["id"], "output_index": i, "content_index": 0, "part": part},
            )
        )

    def _close_message(self) -> bytes:
        i = self._msg_out
        if i < 0:
            return b""
        self._msg_out = -1
        text = "".join(self._text)
        item = message_item(self._req, text)
        self._output[i] = item
        part = item["content"][0]
        ids = {"item_id": item["id"], "output_index": i, "content_index": 0}
        return (
            self._ev("response.output_text.done", {**ids, "text": text, "logprobs": []})
            + self._ev("response.content_part.done", {**ids, "part": part})
            + self._ev("response.output_item.done", {"output_index": i, "item": item})
        )

    def _call(self, index: int, call_id: str | None, fn: Any) -> bytes:
        out = b""
        call = self._calls.get(index)
        if call is None:
            out += self._close_message() + self._close_call()
            i = self._next_out
            self._next_out += 1
            self._output.append({})
            name = (fn.name if fn is not None else None) or ""
            cid = call_id or f"call_{self._req.id[5:]}_{index}"
            call = self._calls[index] = self._open = _Call(cid, name, i, f"fc_{self._req.id[5:]}_{index}")
            item = call_item(self._req, index, call.call_id, name, "")
            item["status"] = "in_progress"
            out += self._ev("response.output_item.added", {"output_index": i, "item": item})
        args = fn.arguments if fn is not None else None
        if args:
            call.args.append(args)
            seq = self._seq
            self._seq = seq + 1
            out += call.delta % (seq, _encode(args))
        return out

    def _close_call(self) -> bytes:
        call = self._open
        if call is None:
            return b""
        self._open = None
        index = next(k for k, v in self._calls.items() if v is call)
        item = call_item(self._req, index, call.call_id, call.name, "".join(call.args))
        self._output[call.out] = item
        return self._ev(
            "response.function_call_arguments.done",
            {
                "item_id": item["id"],
                "output_index": call.out,
                "arguments": item["arguments"],
                "name": call.name,
            },
        ) + self._ev("response.output_item.done", {"output_index": call.out, "item": item})

    def _end(self) -> bytes:
        out = self._close_message() + self._close_call()
        self.done = True
        reason = incomplete_reason(self._finish)
        usage = usage_of(self._prompt, self._completion)
        output = [item for item in self._output if item]
        r = self.response = response_object(
            self._req, "incomplete" if reason else "completed", output, usage, reason
        )
        return out + self._ev("response.incomplete" if reason else "response.completed", {"response": r})

    def _fail(self, message: str, code: str | None) -> bytes:
        self.done = True
        output = [item for item in self._output if item]
        err = {"code": code or "server_error", "message": message}
        r = self.response = response_object(self._req, "failed", output, None, error=err)
        return self._ev("error", {"code": code, "message": message, "param": None}) + self._ev(
            "response.failed", {"response": r}
        )
