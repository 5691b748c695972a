"""ChatStreamReframer, ChunkEmitter and sse_error: byte-exact frames however the upstream splits them."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import pytest
from conftest import assert_rss_bounded
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _fastpath

ID, MODEL, CREATED = "chatcmpl-42", "gpt-4o-mini", 1_700_000_000
HEAD = {"id": ID, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL}
CONTENT = [
    "Hello",
    ', "world"',
    "\n\tline2 \\ /",
    "héllo 日本語 ",
    "😀👩\u200d👩\u200d👧",
    "\x00ctrl\x1f",
    "é\u0301",
]
TOOL_ARGS = ["", '{"city": ', '"Paris"}']
USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}


def dumps(obj: Any, ensure_ascii: bool = False) -> bytes:
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode()


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**HEAD, "system_fingerprint": "fp_1", "choices": [choice], "usage": None}


def payloads(ensure_ascii: bool) -> tuple[list[bytes], bytes]:
    """(the chunks a client sees, the upstream's usage-only chunk), as upstream JSON text."""
    chunks = [chat_chunk({"role": "assistant", "content": ""})]
    chunks += [chat_chunk({"content": text}) for text in CONTENT]
    chunks += [
        chat_chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": a}}
                ]
            }
        )
        for a in TOOL_ARGS
    ]
    chunks += [chat_chunk({}, finish="stop")]
    usage = {**HEAD, "choices": [], "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 0}}}
    return [dumps(c, ensure_ascii) for c in chunks], dumps(usage, ensure_ascii)


def upstream_wire(events: list[bytes]) -> bytes:
    """Frames payloads the many ways upstreams do: comments, no space after the colon, `event` and
    `id` fields, CRLF and CR line ends; then `[DONE]`."""
    prefixes = [b"data: ", b"data:", b"event: message\ndata: ", b"id: 9\r\ndata: "]
    ends = [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"]
    out = [b": OPENROUTER PROCESSING\n\n"]
    for i, payload in enumerate(events):
        out.append(prefixes[i % 4] + payload + ends[i % 3])
        if i % 5 == 0:
            out.append(b": ping\r\n\r\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def reframe(
    stream: bytes, offsets: list[int], strip_usage: bool
) -> tuple[bytes, _fastpath.ChatStreamReframer]:
    r = _fastpath.ChatStreamReframer(strip_usage=strip_usage)
    bounds = [0, *sorted(offsets), len(stream)]
    out = b"".join(r.feed(stream[lo:hi]) for lo, hi in itertools.pairwise(bounds))
    return out + r.finish(), r


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def frame_json(data: bytes) -> Any:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    body = data[len(b"data: ") : -2]
    assert b"\n" not in body and b"\r" not in body
    return json.loads(body)


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["raw-utf8", "u-escapes"])
@pytest.mark.parametrize("strip_usage", [True, False], ids=["strip-usage", "keep-usage"])
def test_every_split_reframes_to_the_same_bytes(ensure_ascii: bool, strip_usage: bool) -> None:
    chunks, usage = payloads(ensure_ascii)
    stream = upstream_wire([*chunks, usage])
    want = b"".join(map(frame, chunks)) + (b"" if strip_usage else frame(usage))
    for i in range(len(stream) + 1):
        out, r = reframe(stream, [i], strip_usage)
        assert out == want, f"split at {i}"
        assert r.done
        assert r.usage == (11, 22, 33)
        assert r.completion_text == "".join(CONTENT) + "".join(TOOL_ARGS)
    assert b"[DONE]" not in out
    assert (r.events, r.invalid_events, r.error) == (len(chunks) + 2, 0, None)
    assert (r.finish_reason, r.chunk_id, r.model, r.created) == ("stop", ID, MODEL, CREATED)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_multi_splits_reframe_to_the_same_bytes(data: st.DataObject) -> None:
    chunks, usage = payloads(ensure_ascii=data.draw(st.booleans()))
    stream = upstream_wire([*chunks, usage])
    offsets = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    out, r = reframe(stream, offsets, strip_usage=True)
    assert out == b"".join(map(frame, chunks))
    assert r.completion_text == "".join(CONTENT) + "".join(TOOL_ARGS)


def test_usage_on_a_chunk_with_choices_is_recorded_and_emitted() -> None:
    payload = dumps({**chat_chunk({"content": "x"}, "stop"), "usage": USAGE})
    out, r = reframe(frame(payload) + b"data: [DONE]\n\n", [], strip_usage=True)
    assert out == frame(payload)
    assert r.usage == (11, 22, 33)


def test_multi_line_data_is_passed_through_line_by_line() -> None:
    stream = b'data: {"id": "x",\r\ndata: "choices": [{"delta": {"content": "a"}}]}\n\n'
    out, r = reframe(stream, [], strip_usage=True)
    assert out == b'data: {"id": "x",\ndata: "choices": [{"delta": {"content": "a"}}]}\n\n'
    assert (r.chunk_id, r.completion_text, r.invalid_events) == ("x", "a", 0)


def test_error_payload_is_recorded_and_emitted() -> None:
    error = b'{"message": "Rate limit \\"exceeded\\"", "type": "rate_limit_error", "code": "429"}'
    stream = b'data: {"error": ' + error + b"}\n\n"
    out, r = reframe(stream, [], strip_usage=True)
    assert out == frame(b'{"error": ' + error + b"}")
    assert r.error == error.decode()
    assert json.loads(r.error)["type"] == "rate_limit_error"
    assert (r.events, r.done) == (1, False)
    _, r = reframe(b'data: {"error": null, "choices": []}\n\n', [], strip_usage=True)
    assert r.error is None


def test_non_json_data_is_counted_and_emitted_unchanged() -> None:
    good = dumps(chat_chunk({"content": "ok"}))
    stream = b"data: not json\n\n" + frame(good) + b'data: {"choices": [{"delta": {"content": "lost"}}]\n\n'
    out, r = reframe(stream, [], strip_usage=True)
    assert (
        out == b"data: not json\n\n" + frame(good) + b'data: {"choices": [{"delta": {"content": "lost"}}]\n\n'
    )
    assert (r.invalid_events, r.events, r.completion_text) == (2, 3, "ok")


def test_text_completion_stream() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "gpt-3.5-turbo-instruct"}
    chunks = [
        dumps({**head, "choices": [{"text": t, "index": 0, "finish_reason": None}]}) for t in ["a", "b"]
    ]
    out, r = reframe(b"".join(map(frame, chunks)) + b"data: [DONE]\n\n", [], strip_usage=True)
    assert out == b"".join(map(frame, chunks))
    assert r.completion_text == "ab"
    usage = frame_json(r.usage_chunk(3, 4))
    assert usage == {
        **head,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def test_usage_chunk_uses_the_first_chunk_identity() -> None:
    chunks, _ = payloads(ensure_ascii=False)
    _, r = reframe(upstream_wire(chunks), [], strip_usage=True)
    assert r.usage is None
    assert frame_json(r.usage_chunk(5, 7)) == {
        **HEAD,
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    assert r.completion_tokens("cl100k_base") == _fastpath.count_tokens(r.completion_text, "cl100k_base")
    assert r.completion_tokens() == _fastpath.count_tokens(r.completion_text)
    with pytest.raises(_fastpath.UnknownEncodingError):
        r.completion_tokens("nope")


def test_finish_delivers_an_event_missing_only_its_blank_line() -> None:
    r = _fastpath.ChatStreamReframer(strip_usage=True)
    assert r.feed(b'data: {"choices": []}\ndata: [DO') == b""
    assert r.finish() == b'data: {"choices": []}\n\n'
    assert not r.done


def test_oversized_event_raises_sse_error() -> None:
    r = _fastpath.ChatStreamReframer(strip_usage=True, max_event_bytes=128)
    with pytest.raises(_fastpath.SseError):
        r.feed(b"data: " + b"x" * 200)


# ---- ChunkEmitter and sse_error ---------------------------------------------------------------


def compact(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


TRICKY = (
    'quote " backslash \\ newline \n tab \t nul \x00 us \x1f del \x7f 😀 non-BMP 𝄞 ZWJ 👩\u200d💻 </script>'
)


def test_chunk_emitter_frames_are_exact_compact_json() -> None:
    e = _fastpath.ChunkEmitter(TRICKY, "m\n", 42)
    head = {"id": TRICKY, "object": "chat.completion.chunk", "created": 42, "model": "m\n"}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {**head, "choices": [{"index": choice.pop("index", 0), **choice}]}

    assert e.role() == compact(chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
    assert e.role("tool", 2) == compact(
        chunk({"index": 2, "delta": {"role": "tool", "content": ""}, "finish_reason": None})
    )
    assert e.content(TRICKY) == compact(chunk({"delta": {"content": TRICKY}, "finish_reason": None}))
    assert e.content("x", index=1) == compact(
        chunk({"index": 1, "delta": {"content": "x"}, "finish_reason": None})
    )
    assert e.finish("stop") == compact(chunk({"delta": {}, "finish_reason": "stop"}))
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert e.usage(3, 4) == compact({**head, "choices": [], "usage": usage})


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(max_size=8))
def test_chunk_emitter_round_trips_any_text(text: str, model: str) -> None:
    e = _fastpath.ChunkEmitter("id", model, 1)
    got = frame_json(e.content(text))
    assert got["choices"][0]["delta"]["content"] == text
    assert got["model"] == model


def test_sse_error_frame() -> None:
    assert frame_json(_fastpath.sse_error(TRICKY, "server_error")) == {
        "error": {"message": TRICKY, "type": "server_error", "param": None, "code": None}
    }
    assert _fastpath.sse_error("m", type="t", code="c", param="p") == compact(
        {"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}
    )


def test_constants() -> None:
    assert _fastpath.DONE == b"data: [DONE]\n\n"
    assert _fastpath.PING == b": ping\n\n"
    assert _fastpath.BUILD_PROFILE in ("release", "debug")
    assert _fastpath.__version__.count(".") == 2


# ---- native hygiene ---------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_reframer_memory_is_bounded() -> None:
    chunks, usage = payloads(ensure_ascii=True)
    stream = upstream_wire([*chunks, usage])
    pieces = [stream[i : i + 97] for i in range(0, len(stream), 97)]

    def run(feeds: int) -> None:
        r = _fastpath.ChatStreamReframer(strip_usage=True)
        for n in range(feeds):
            if n % 200 == 0:
                r = _fastpath.ChatStreamReframer(strip_usage=n % 400 == 0)
            r.feed(pieces[n % len(pieces)])
            if n % 50 == 0:
                r.usage_chunk(1, 2)
                r.finish()

    assert_rss_bounded(run)
