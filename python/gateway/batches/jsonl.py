"""A batch input file: JSONL, one request a line, validated whole on upload (a bad line is a
400 naming it) and read again, already valid, when the batch runs."""

from __future__ import annotations

import msgspec

#: what a batch may call: the inference endpoints the job queue runs
URLS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/completions"})
_MAX_CUSTOM_ID = 512


class InputLine(msgspec.Struct, frozen=True):
    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class LineError(ValueError):
    """A line that is not a batch request; `line` counts from 1."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


class _Stream(msgspec.Struct):
    stream: bool | None = None


_decode = msgspec.json.Decoder(InputLine).decode
_stream = msgspec.json.Decoder(_Stream).decode


def parse(data: bytes, max_lines: int) -> list[tuple[int, InputLine]]:
    """(line number, request) for every non-blank line; LineError at the first bad one."""
    out: list[tuple[int, InputLine]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(out) >= max_lines:
            raise LineError(number, f"the file has more than {max_lines} requests")
        try:
            line = _decode(raw)
        except msgspec.ValidationError as exc:
            raise LineError(number, f"not a batch request: {exc}") from None
        except msgspec.DecodeError:
            raise LineError(number, "not a JSON object") from None
        if not line.custom_id or len(line.custom_id) > _MAX_CUSTOM_ID:
            raise LineError(number, f"`custom_id` must be 1-{_MAX_CUSTOM_ID} characters")
        if line.custom_id in seen:
            raise LineError(number, f"duplicate `custom_id` {line.custom_id!r}")
        seen.add(line.custom_id)
        if line.method != "POST":
            raise LineError(number, f"`method` must be POST, got {line.method!r}")
        if line.url not in URLS:
            raise LineError(number, f"`url` must be one of {', '.join(sorted(URLS))}, got {line.url!r}")
        if not bytes(line.body).lstrip().startswith(b"{"):
            raise LineError(number, "`body` must be a JSON object")
        try:
            streamed = _stream(line.body).stream
        except msgspec.ValidationError:
            raise LineError(number, "`body.stream` must be a boolean") from None
        if streamed:
            raise LineError(number, "`body.stream: true` is not supported in a batch")
        out.append((number, line))
    if not out:
        raise LineError(1, "the file has no requests")
    return out
