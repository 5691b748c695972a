"""The Responses stream translator the gateway uses (Rust `_fastpath.ResponsesStream`) against its
Python reference (`responses_stream.ChatToResponses`): the same events, in the same order, with the
same sequence numbers and the same final (stored) response object, for the same relay sends, cut
anywhere."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway import _fastpath
from gateway.responses_stream import ChatToResponses, native
from gateway.responses_wire import ResponsesRequest, decode_request

Chunk = dict[str, Any]


def choice(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> Chunk:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def calls(
    index: int, call_id: str | None, name: str | None, args: str, pieces: int, rng: random.Random
) -> list[Chunk]:
    """One tool call: its head, then its arguments cut into `pieces` at random places."""
    head: dict[str, Any] = {"index": index, "type": "function", "function": {"name": name, "arguments": ""}}
    if call_id is not None:
        head["id"] = call_id
    out = [choice({"tool_calls": [head]})]
    cuts = sorted(rng.sample(range(1, len(args)), min(pieces, len(args)) - 1)) if len(args) > 1 else []
    for a, b in zip([0, *cuts], [*cuts, len(args)], strict=True):
        out.append(choice({"tool_calls": [{"index": index, "function": {"arguments": args[a:b]}}]}))
    return out


def text(t: str, pieces: int) -> list[Chunk]:
    step = max(1, len(t) // pieces)
    return [choice({"content": t[i : i + step]}) for i in range(0, len(t), step)]


def usage(p: int, c: int) -> Chunk:
    return {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}


def error(code: Any) -> Chunk:
    return {
        "error": {"message": 'upstream went away "x"', "type": "upstream_error", "param": None, "code": code}
    }


ARGS = '{"city": "Zürich", "days": [1, 2, 3], "note": "a \\"quoted\\" line\\n"}'


def cases(rng: random.Random) -> dict[str, list[Any]]:
    """Each case: the relay's frames in order (a dict is a chunk, bytes is sent as it is)."""
    role = choice({"role": "assistant", "content": ""})
    return {
        "text": [role, *text('Hello, wörld "q"\n\t\u0001 — done.', 9), choice({}, "stop"), usage(12, 9)],
        "length stop": [role, *text("cut short", 3), choice({}, "length"), usage(5, 3)],
        "content filter": [role, *text("no", 1), choice({}, "content_filter")],
        "tool calls split": [
            role,
            *calls(0, "call_a", "lookup", ARGS, 40, rng),
            *calls(1, None, "other", "{}", 1, rng),
            choice({}, "tool_calls"),
            usage(30, 41),
        ],
        "text then tools": [
            role,
            *text("Let me look.", 4),
            *calls(0, "call_a", "lookup", ARGS, 7, rng),
            choice({}, "tool_calls"),
            usage(1, 2),
        ],
        "tool then text": [*calls(0, "", None, ARGS, 3, rng), *text("after", 2), choice({}, "stop")],
        "interleaved calls": [
            *calls(0, "a", "f", '{"x":1}', 2, rng),
            *calls(1, "b", "g", '{"y":2}', 2, rng),
            choice({"tool_calls": [{"index": 0, "function": {"arguments": " "}}]}),
            choice({}, "tool_calls"),
        ],
        "error mid text": [role, *text("partial", 3), error("upstream_unavailable"), b": ping\n\n"],
        "error mid call": [*calls(0, "a", "f", ARGS, 5, rng), error(503)],
        "error without code": [error(None)],
        "error empty code": [error("")],
        "noise": [
            b": ping\n\n",
            role,
            b"data: not json\n\n",
            b"event: x\ndata: {}\n\n",
            {"choices": [], "usage": {"prompt_tokens": None}},
            choice({"content": "other choice"}, index=1),
            {"choices": None},
            *text("ok", 1),
            b": x-fastpath-timing ttfb=3\n\n",
            choice({}, "stop"),
            usage(0, 1),
        ],
        "empty": [],
    }


def frames(seq: list[Any]) -> bytes:
    out = b"".join(x if isinstance(x, bytes) else b"data: %s\n\n" % json.dumps(x).encode() for x in seq)
    return out + b"data: [DONE]\n\n: after the end\n\n"


def parse(raw: bytes) -> list[tuple[str, Any]]:
    """Events as (name, data), comments as ("comment", text)."""
    out: list[tuple[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            out.append(("comment", block))
            continue
        name, _, data = block.partition("\ndata: ")
        assert name.startswith("event: ")
        out.append((name[7:], json.loads(data)))
    return out


def request(body: dict[str, Any]) -> ResponsesRequest:
    return decode_request(json.dumps(body).encode())[0]


REQUESTS = {
    "plain": {"model": "m", "input": "hi"},
    "full": {
        "model": 'm"odel',
        "input": "hi",
        "instructions": "Be brief ✓",
        "previous_response_id": "resp_prev",
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "tool_choice": "required",
        "temperature": 0.5,
        "max_output_tokens": 64,
        "metadata": {"k": "v"},
        "text": {"format": {"type": "json_object"}},
        "user": "u1",
        "store": False,
    },
}


@pytest.mark.parametrize("req_name", list(REQUESTS))
@pytest.mark.parametrize("seed", range(4))
def test_rust_equals_python(req_name: str, seed: int) -> None:
    rng = random.Random(seed)
    req = request(REQUESTS[req_name])
    for name, seq in cases(rng).items():
        data = frames(seq)
        rust, python = native(req, 7), ChatToResponses(req, 7)
        # the relay's sends: grouped arbitrarily, cut inside frames (seed 0: one frame a send)
        out, ref, at = b"", python.start(), 0
        while at < len(data):
            end = data.index(b"\n\n", at) + 2 if seed == 0 else min(len(data), at + rng.randint(1, 90))
            out += rust.feed(data[at:end])
            if python.response is None:  # the writer's rule: nothing after the end
                ref += python.feed(data[at:end])
            at = end
        assert parse(out) == parse(ref), name
        events = [d for n, d in parse(out) if n != "comment"]
        assert [e["sequence_number"] for e in events] == list(range(len(events))), name
        assert all(e["type"] == n for n, e in parse(out) if n != "comment"), name
        assert rust.done and python.response is not None, name
        stored = rust.response()
        assert stored is not None and json.loads(stored) == python.response, name
        assert rust.status == python.response["status"], name
        assert rust.feed(b"data: [DONE]\n\n") == b"", name


def test_echo_must_be_an_object() -> None:
    with pytest.raises(_fastpath.FastpathError):
        _fastpath.ResponsesStream("resp_1", "m", 0, None, b"[]")
    with pytest.raises(_fastpath.FastpathError):
        _fastpath.ResponsesStream("resp_1", "m", 0, None, b"{")
