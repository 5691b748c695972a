"""The Rust SSE parser against a small pure-Python WHATWG reference, however the bytes are split."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _fastpath

Event = tuple[str | None, str, str | None, int | None]

_LINE_END = re.compile(r"\r\n|\r|\n")


def reference_parse(stream: bytes) -> list[Event]:
    """WHATWG `text/event-stream` interpretation of a whole stream (html.spec.whatwg.org, 9.2.6).

    `event` is None for the default type, `id` is the last event ID (None until one is set), and
    `retry` is a valid retry field of the event's own block (ASCII digits, fitting in 64 bits).
    """
    text = stream.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    *lines, _unterminated = _LINE_END.split(text)
    events: list[Event] = []
    data: list[str] = []
    event_type = ""
    last_id: str | None = None
    retry: int | None = None
    for line in lines:
        if line == "":
            if data:
                events.append((event_type or None, "\n".join(data), last_id, retry))
            data, event_type, retry = [], "", None
            continue
        if line.startswith(":"):
            continue
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event_type = value
        elif field == "id" and "\0" not in value:
            last_id = value
        elif field == "retry" and value and all(c in "0123456789" for c in value) and int(value) < 2**64:
            retry = int(value)
    return events


def as_tuples(events: list[_fastpath.SseEvent]) -> list[Event]:
    return [(e.event, e.data, e.id, e.retry) for e in events]


def parse_split(stream: bytes, offsets: list[int], max_event_bytes: int = 1 << 20) -> list[Event]:
    parser = _fastpath.SseParser(max_event_bytes)
    got: list[Event] = []
    bounds = [0, *sorted(offsets), len(stream)]
    for lo, hi in itertools.pairwise(bounds):
        got += as_tuples(parser.feed(stream[lo:hi]))
    assert parser.finish() == []
    assert parser.buffered == 0
    return got


# ---- stream generator -----------------------------------------------------------------------

# Values: any text without line breaks (colons, NUL, non-BMP and combining chars included).
_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
_digits = st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["", "12a", "0x1", "١٢", "9" * 25]))
_field_line = st.one_of(
    st.tuples(st.sampled_from(["data", "event", "id", "retry", "foo", "Data", "dat"]), _value),
    st.tuples(st.just("retry"), _digits),
    st.tuples(st.just("data"), st.sampled_from(["", "[DONE]", '{"a": "b\\n"}', " lead"])),
).flatmap(lambda fv: st.sampled_from([f"{fv[0]}:{fv[1]}", f"{fv[0]}: {fv[1]}", f"{fv[0]}:  {fv[1]}", fv[0]]))
_line = st.one_of(_field_line, _field_line, st.just(""), st.just(""), _value.map(lambda v: ":" + v))
_stream = st.builds(
    lambda bom, lines, ends, tail: (
        ("\ufeff" if bom else "") + "".join(ln + end for ln, end in zip(lines, ends, strict=False)) + tail
    ).encode(),
    st.booleans(),
    st.lists(_line, max_size=24),
    st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=24, max_size=24),
    st.sampled_from(["", "data: unterminated", "data: x\n", "\r"]),
)


@settings(max_examples=150, deadline=None)
@given(_stream)
def test_every_single_split_matches_the_reference(stream: bytes) -> None:
    want = reference_parse(stream)
    for i in range(len(stream) + 1):
        assert parse_split(stream, [i]) == want, f"split at {i}"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_multi_splits_match_the_reference(data: st.DataObject) -> None:
    stream = data.draw(_stream)
    offsets = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert parse_split(stream, offsets) == reference_parse(stream)


def test_byte_at_a_time_with_crlf_split_and_bom() -> None:
    stream = "\ufeff: c\r\ndata: é\r\rid: 1\revent: e\r\ndata\r\n\r\ndata:\u2028x\n\n".encode()
    want = [(None, "é", None, None), ("e", "", "1", None), (None, "\u2028x", "1", None)]
    assert reference_parse(stream) == want
    assert parse_split(stream, list(range(len(stream)))) == want


def test_known_stream_fields() -> None:
    stream = b"retry: 250\nid: a\x00b\nid: 7\nevent: upd\ndata: 1\ndata:  2\n\nevent: gone\n\ndata\n\n"
    assert as_tuples(_fastpath.SseParser().feed(stream)) == [
        ("upd", "1\n 2", "7", 250),
        (None, "", "7", None),
    ]


def test_unterminated_event_is_discarded_at_finish() -> None:
    parser = _fastpath.SseParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.buffered > 0
    assert parser.finish() == []
    assert parser.buffered == 0


def test_event_repr_and_equality() -> None:
    (a,) = _fastpath.SseParser().feed(b"data: x\n\n")
    (b,) = _fastpath.SseParser().feed(b"data:x\r\n\r\n")
    assert a == b
    assert "x" in repr(a)


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 100],  # one long pending line
        [b"data: 0123456789\n" * 8],  # many short data lines of one event
        [b"data: 01234", b"56789" * 20 + b"\n\n"],  # a line completed across feeds
    ],
)
def test_size_limit_raises_sse_error(chunks: list[bytes]) -> None:
    parser = _fastpath.SseParser(max_event_bytes=64)
    with pytest.raises(_fastpath.SseError, match="64 bytes") as info:
        for chunk in chunks:
            parser.feed(chunk)
    assert isinstance(info.value, _fastpath.FastpathError)
    assert isinstance(info.value, ValueError)


def test_size_limit_is_per_event() -> None:
    parser = _fastpath.SseParser(max_event_bytes=64)
    events: list[_fastpath.SseEvent] = []
    for _ in range(101):
        events += parser.feed(b"data: " + b"x" * 50 + b"\n\n")
    assert len(events) == 101
