"""The acceptance bad-input suite: malformed and hostile requests against the real gateway over
real sockets. Every reply the gateway itself writes must be the exact status with an OpenAI
error body (`{"error": {"message", "type", "param", "code"}}`, DESIGN.md §4) and an
`x-request-id`; nothing may hang, crash the worker or leak a traceback.

Requests are written as raw bytes (no HTTP client library between the test and the wire), so
lying lengths, trickled bodies and odd framing are exactly what the gateway sees.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import ENGINE, Gateway, MockUpstream, free_port, run_gateway

#: Every socket operation gives up after this long: a hang is a failure, never a stuck run.
TIMEOUT_S = 10.0
#: Every response read by this module, for the suite-wide checks at the end.
SEEN: list[Response] = []

# Limits of the `strict` gateway (module fixture below).
STRICT_MAX_BODY = 65_536
STRICT_MAX_HEADERS = 20
STRICT_MAX_HEADER_BYTES = 4_096
STRICT_BODY_TIMEOUT_MS = 1_000
STRICT_FIRST_BYTE_TIMEOUT_MS = 500
DEFAULT_MAX_JSON_DEPTH = 64
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_BODY = 4 * 1024 * 1024


# ---- raw HTTP/1.1 helpers -----------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    interim: list[int]  # statuses of 1xx responses that came before this one

    def json(self) -> Any:
        return json.loads(self.body)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if not self.fill():
                raise AssertionError(f"connection closed before {sep!r}; got {self.buf[:300]!r}")
        out, self.buf = self.buf[:i], self.buf[i + len(sep) :]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.fill():
                raise AssertionError(f"connection closed after {len(self.buf)} of {n} body bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self.fill():
            pass
        out, self.buf = self.buf, b""
        return out


def read_response(sock: socket.socket) -> Response:
    """Read exactly one HTTP/1.1 response (skipping 1xx interim ones) from `sock`."""
    reader = _Reader(sock)
    interim: list[int] = []
    while True:
        head = reader.until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        assert parts[0].startswith("HTTP/1."), f"not an HTTP response: {head[:200]!r}"
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while size := int(reader.until(b"\r\n").split(b";")[0], 16):
            body += reader.exactly(size)
            reader.exactly(2)
        while reader.until(b"\r\n"):  # trailers
            pass
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.rest()
    resp = Response(status, headers, body, interim)
    SEEN.append(resp)
    return resp


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)


def exchange(port: int, data: bytes) -> Response:
    """Send `data` as is and read one response."""
    with connect(port) as sock:
        sock.sendall(data)
        return read_response(sock)


def build(
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    content_type: str | None = "application/json",
) -> bytes:
    """A raw request; Content-Length is added for a body unless a header already frames it."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    names = {k.lower() for k, _ in headers}
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def wait_readable(sock: socket.socket, timeout_s: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout_s)
    return bool(readable)


def chat(**extra: Any) -> bytes:
    body: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return json.dumps(body).encode()


def completion(**extra: Any) -> bytes:
    body: dict[str, Any] = {"model": "echo", "prompt": "hi"}
    body.update(extra)
    return json.dumps(body).encode()


def nested(depth: int, *, objects: bool = False) -> str:
    """A JSON value `depth` levels deep."""
    if objects:
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


def assert_error(
    resp: Response,
    status: int,
    type_: str,
    code: str,
    param: str | None = None,
) -> dict[str, Any]:
    """Exact status, OpenAI error JSON with the given type/code/param, and an x-request-id."""
    assert resp.status == status, (resp.status, resp.body[:500])
    assert resp.headers.get("x-request-id"), resp.headers
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    doc = resp.json()
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == type_, err
    assert err["code"] == code, err
    assert err["param"] == param, err
    return dict(err)


def find_forwarded(upstream: MockUpstream, marker: str) -> dict[str, Any]:
    """The mock's record of the one request whose body carries `"user": marker`."""
    hits = [
        e
        for e in upstream.events()
        if e.get("event") == "request" and isinstance(e.get("body"), dict) and e["body"].get("user") == marker
    ]
    assert len(hits) == 1, f"expected one forwarded request with user={marker}, got {len(hits)}"
    return hits[0]


# ---- a gateway with small limits and timeouts ---------------------------------------------------
def strict_config(upstream_port: int, down_port: int) -> str:
    return f"""\
server:
  host: 127.0.0.1
  max_body_bytes: {STRICT_MAX_BODY}
  max_headers: {STRICT_MAX_HEADERS}
  max_header_bytes: {STRICT_MAX_HEADER_BYTES}
  body_read_timeout_ms: {STRICT_BODY_TIMEOUT_MS}
  header_read_timeout_ms: 1000
providers:
  - name: mock
    base_url: http://127.0.0.1:{upstream_port}/v1
    api_key: sk-upstream-secret
    first_byte_timeout_ms: {STRICT_FIRST_BYTE_TIMEOUT_MS}
    idle_timeout_ms: 2000
  - name: down
    base_url: http://127.0.0.1:{down_port}/v1
    connect_timeout_ms: 2000
models:
  - name: echo
    provider: mock
    upstream_model: mock-echo
  - name: down-model
    provider: down
"""


@pytest.fixture(scope="module")
def strict(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Small body/header limits, a 1 s body deadline, a 0.5 s first-byte timeout, and a model
    routed to a port where nothing listens."""
    text = strict_config(mock_upstream.port, free_port())
    with run_gateway(tmp_path_factory.mktemp("strict"), mock_upstream, config_text=text) as g:
        yield g


# ---- the table: one request, one exact error ----------------------------------------------------
@dataclass(frozen=True)
class Case:
    body: bytes | None
    status: int
    type: str
    code: str
    param: str | None = None
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = "application/json"
    #: response headers that must be present with exactly this value
    expect_headers: tuple[tuple[str, str], ...] = ()
    #: substrings the error message must / must not contain
    message_has: str | None = None
    message_lacks: tuple[str, ...] = ()


BAD = "invalid_request_error"
VALID_MSG = [{"role": "user", "content": "hi"}]

_raw_401_body = json.dumps(
    {
        "error": {
            "message": "Incorrect API key provided: sk-upst****cret. Find your key at https://example/keys",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
)
RAW_401 = (
    "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(_raw_401_body)}\r\nConnection: close\r\n\r\n{_raw_401_body}"
)

CASES: dict[str, Case] = {
    # -- not JSON / not an object --
    "json-truncated": Case(b'{"model": "echo", "messages": [', 400, BAD, "invalid_json"),
    "json-trailing-garbage": Case(chat() + b" xyz", 400, BAD, "invalid_json"),
    "json-two-objects": Case(chat() + chat(), 400, BAD, "invalid_json"),
    "json-single-quotes": Case(b"{'model': 'echo', 'messages': []}", 400, BAD, "invalid_json"),
    "json-nan-literal": Case(chat()[:-1] + b', "temperature": NaN}', 400, BAD, "invalid_json"),
    "json-invalid-utf8": Case(
        b'{"model":"echo","messages":[{"role":"user","content":"\xff\xfe"}]}', 400, BAD, "invalid_json"
    ),
    "json-raw-control-char": Case(
        b'{"model":"echo","messages":[{"role":"user","content":"a\x00b"}]}', 400, BAD, "invalid_json"
    ),
    "empty-body": Case(b"", 400, BAD, "invalid_json"),
    "whitespace-body": Case(b" \r\n\t ", 400, BAD, "invalid_json"),
    "no-body-no-length": Case(None, 400, BAD, "invalid_json"),
    "top-level-array": Case(b"[]", 400, BAD, "invalid_request"),
    "top-level-string": Case(b'"str"', 400, BAD, "invalid_request"),
    "top-level-null": Case(b"null", 400, BAD, "invalid_request"),
    "top-level-number": Case(b"42", 400, BAD, "invalid_request"),
    # -- nesting beyond server.max_json_depth (64) --
    "deep-array-unknown-field": Case(
        chat()[:-1] + f', "x": {nested(100)}}}'.encode(), 400, BAD, "json_too_deep"
    ),
    "deep-object-unknown-field": Case(
        chat()[:-1] + f', "x": {nested(100, objects=True)}}}'.encode(), 400, BAD, "json_too_deep"
    ),
    "deep-in-message-content": Case(
        ('{"model":"echo","messages":[{"role":"user","content":' + nested(100) + "}]}").encode(),
        400,
        BAD,
        "json_too_deep",
    ),
    "deep-one-over-limit": Case(
        chat()[:-1] + f', "x": {nested(DEFAULT_MAX_JSON_DEPTH)}}}'.encode(), 400, BAD, "json_too_deep"
    ),
    "deep-unclosed-brackets": Case(b'{"model":"echo","x":' + b"[" * 100_000, 400, BAD, "json_too_deep"),
    # -- wrong types and values --
    "messages-not-a-list": Case(chat(messages="hi"), 400, BAD, "invalid_type", "messages"),
    "messages-item-null": Case(chat(messages=[None]), 400, BAD, "invalid_type", "messages[0]"),
    "role-not-a-string": Case(
        chat(messages=[{"role": 1, "content": "hi"}]), 400, BAD, "invalid_type", "messages[0].role"
    ),
    "role-missing": Case(
        chat(messages=[{"content": "hi"}]), 400, BAD, "missing_required_parameter", "messages[0].role"
    ),
    "content-a-number": Case(
        chat(messages=[{"role": "user", "content": 5}]), 400, BAD, "invalid_type", "messages[0].content"
    ),
    "max-tokens-string": Case(chat(max_tokens="10"), 400, BAD, "invalid_type", "max_tokens"),
    "max-tokens-negative": Case(chat(max_tokens=-1), 400, BAD, "integer_below_min_value", "max_tokens"),
    "stream-string": Case(chat(stream="true"), 400, BAD, "invalid_type", "stream"),
    "stream-options-not-object": Case(
        chat(stream=True, stream_options="yes"), 400, BAD, "invalid_type", "stream_options"
    ),
    "n-zero": Case(chat(n=0), 400, BAD, "integer_below_min_value", "n"),
    "n-1000": Case(chat(n=1000), 400, BAD, "integer_above_max_value", "n"),
    "n-float": Case(chat(n=1.5), 400, BAD, "invalid_type", "n"),
    "n-bool": Case(chat(n=True), 400, BAD, "invalid_type", "n"),
    "model-a-number": Case(chat(model=4), 400, BAD, "invalid_type", "model"),
    "model-empty": Case(chat(model=""), 400, BAD, "missing_required_parameter", "model"),
    "model-missing": Case(
        json.dumps({"messages": VALID_MSG}).encode(), 400, BAD, "missing_required_parameter", "model"
    ),
    "messages-missing": Case(
        json.dumps({"model": "echo"}).encode(), 400, BAD, "missing_required_parameter", "messages"
    ),
    "messages-empty": Case(chat(messages=[]), 400, BAD, "empty_array", "messages"),
    "completions-prompt-missing": Case(
        b'{"model":"echo"}', 400, BAD, "missing_required_parameter", "prompt", path="/v1/completions"
    ),
    "completions-prompt-object": Case(
        completion(prompt={"a": 1}), 400, BAD, "invalid_type", "prompt", path="/v1/completions"
    ),
    # -- unknown model / route / method --
    "unknown-model": Case(chat(model="no-such-model"), 404, "not_found_error", "model_not_found", "model"),
    "unknown-model-stream": Case(
        chat(model="no-such-model", stream=True), 404, "not_found_error", "model_not_found", "model"
    ),
    "upstream-name-not-public": Case(
        chat(model="mock-slow"), 404, "not_found_error", "model_not_found", "model"
    ),
    "unknown-route": Case(chat(), 404, "not_found_error", "route_not_found", path="/v2/chat/completions"),
    "unknown-route-get": Case(None, 404, "not_found_error", "route_not_found", method="GET", path="/admin"),
    "route-trailing-slash": Case(
        chat(), 404, "not_found_error", "route_not_found", path="/v1/chat/completions/"
    ),
    "get-chat": Case(
        None,
        405,
        BAD,
        "method_not_allowed",
        method="GET",
        content_type=None,
        expect_headers=(("allow", "POST"),),
    ),
    "put-chat": Case(
        chat(), 405, BAD, "method_not_allowed", method="PUT", expect_headers=(("allow", "POST"),)
    ),
    "delete-completions": Case(
        None,
        405,
        BAD,
        "method_not_allowed",
        method="DELETE",
        path="/v1/completions",
        expect_headers=(("allow", "POST"),),
    ),
    "post-models": Case(
        chat(), 405, BAD, "method_not_allowed", path="/v1/models", expect_headers=(("allow", "GET"),)
    ),
    "post-healthz": Case(
        b"", 405, BAD, "method_not_allowed", path="/healthz", expect_headers=(("allow", "GET"),)
    ),
    # -- content types --
    "ctype-text-plain": Case(chat(), 415, BAD, "unsupported_media_type", content_type="text/plain"),
    "ctype-form-urlencoded": Case(
        b"model=echo&messages=hi",
        415,
        BAD,
        "unsupported_media_type",
        content_type="application/x-www-form-urlencoded",
    ),
    "ctype-multipart": Case(
        b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\necho\r\n--xx--\r\n',
        415,
        BAD,
        "unsupported_media_type",
        content_type="multipart/form-data; boundary=xx",
    ),
    "ctype-xml": Case(
        b"<model>echo</model>", 415, BAD, "unsupported_media_type", content_type="application/xml"
    ),
    "ctype-json-lookalike": Case(
        chat(), 415, BAD, "unsupported_media_type", content_type="application/jsonx"
    ),
    # -- headers over the limits the app enforces (default: 16 KiB in total) --
    "header-too-large": Case(
        chat(),
        431,
        BAD,
        "headers_too_large",
        headers=(("x-big", "a" * (DEFAULT_MAX_HEADER_BYTES + 100)),),
    ),
    "headers-too-large-in-sum": Case(
        chat(),
        431,
        BAD,
        "headers_too_large",
        headers=tuple((f"x-h{i}", "b" * 1000) for i in range(20)),
    ),
    # -- the upstream fails (mock knobs, forwarded in the body) --
    "upstream-500": Case(
        chat(mock={"status": 500}),
        502,
        "upstream_error",
        "upstream_error",
        expect_headers=(("x-upstream-error-code", "500"),),
    ),
    "upstream-500-stream": Case(
        chat(stream=True, mock={"status": 500}),
        502,
        "upstream_error",
        "upstream_error",
        expect_headers=(("x-upstream-error-code", "500"),),
    ),
    "upstream-502": Case(
        chat(mock={"status": 502}),
        502,
        "upstream_error",
        "upstream_error",
        expect_headers=(("x-upstream-error-code", "502"),),
    ),
    "upstream-503": Case(
        chat(mock={"status": 503}),
        503,
        "upstream_error",
        "upstream_unavailable",
        expect_headers=(("x-upstream-error-code", "503"),),
    ),
    "upstream-504": Case(
        chat(mock={"status": 504}),
        504,
        "timeout_error",
        "upstream_timeout",
        expect_headers=(("x-upstream-error-code", "504"),),
    ),
    "upstream-429": Case(
        chat(mock={"status": 429}),
        429,
        "rate_limit_error",
        "upstream_rate_limited",
        expect_headers=(("x-upstream-error-code", "429"),),
    ),
    "upstream-401": Case(
        chat(mock={"status": 401}),
        502,
        "upstream_error",
        "upstream_auth",
        expect_headers=(("x-upstream-error-code", "401"),),
        message_lacks=("mock error",),
    ),
    "upstream-403": Case(
        chat(mock={"status": 403}),
        502,
        "upstream_error",
        "upstream_auth",
        expect_headers=(("x-upstream-error-code", "403"),),
        message_lacks=("mock error",),
    ),
    "upstream-401-mentions-key": Case(
        chat(mock={"raw": RAW_401}),
        502,
        "upstream_error",
        "upstream_auth",
        expect_headers=(("x-upstream-error-code", "401"),),
        message_lacks=("sk-", "API key", "example/keys"),
    ),
    "upstream-400-rejected": Case(
        chat(mock={"status": 400}),
        400,
        BAD,
        "upstream_rejected",
        expect_headers=(("x-upstream-error-code", "400"),),
        message_has="mock error (status 400)",
    ),
    "upstream-404": Case(
        chat(mock={"status": 404}),
        502,
        "upstream_error",
        "upstream_error",
        expect_headers=(("x-upstream-error-code", "404"),),
    ),
    "upstream-raw-not-http": Case(
        chat(mock={"raw": "SSH-2.0-OpenSSH_9.6\r\n\r\n"}), 502, "upstream_error", "upstream_bad_response"
    ),
    "upstream-raw-garbage-then-close": Case(
        chat(mock={"raw": "\x00\x01garbage"}), 502, "upstream_error", "upstream_bad_response"
    ),
    "upstream-raw-redirect": Case(
        chat(
            mock={
                "raw": "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"
            }
        ),
        502,
        "upstream_error",
        "upstream_bad_response",
        expect_headers=(("x-upstream-error-code", "302"),),
    ),
    "upstream-raw-200-not-json": Case(
        chat(mock={"raw": "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!"}),
        502,
        "upstream_error",
        "upstream_bad_response",
    ),
    "upstream-raw-short-body": Case(
        chat(mock={"raw": "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"}),
        502,
        "upstream_error",
        "upstream_bad_response",
    ),
    "upstream-raw-bad-status-line": Case(
        chat(mock={"raw": "HTTP/1.1 abc Nope\r\nContent-Length: 0\r\n\r\n"}),
        502,
        "upstream_error",
        "upstream_bad_response",
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in CASES.items()])
def test_bad_request(gateway: Gateway, case: Case) -> None:
    data = build(case.method, case.path, case.body, case.headers, case.content_type)
    resp = exchange(gateway.port, data)
    err = assert_error(resp, case.status, case.type, case.code, case.param)
    for name, value in case.expect_headers:
        assert resp.headers.get(name) == value, (name, resp.headers)
    if case.message_has is not None:
        assert case.message_has in err["message"], err
    for secret in case.message_lacks:
        assert secret not in resp.body.decode("utf-8", "replace"), err


# ---- limits and timeouts that need a gateway with small settings -------------------------------
STRICT_CASES: dict[str, Case] = {
    "too-many-headers": Case(
        chat(),
        431,
        BAD,
        "headers_too_large",
        headers=tuple((f"x-h{i}", "v") for i in range(STRICT_MAX_HEADERS + 5)),
    ),
    "header-bytes-over-limit": Case(
        chat(), 431, BAD, "headers_too_large", headers=(("x-big", "a" * (STRICT_MAX_HEADER_BYTES + 10)),)
    ),
    "body-over-limit-fully-sent": Case(chat(pad="p" * STRICT_MAX_BODY), 413, BAD, "body_too_large"),
    "upstream-hangs": Case(chat(mock={"hang": True}), 504, "timeout_error", "upstream_timeout"),
    "upstream-slow-head": Case(chat(mock={"first_delay_ms": 3000}), 504, "timeout_error", "upstream_timeout"),
    "upstream-down": Case(
        chat(model="down-model"),
        503,
        "upstream_error",
        "upstream_unavailable",
        expect_headers=(("retry-after", "1"),),
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in STRICT_CASES.items()])
def test_bad_request_strict_limits(strict: Gateway, case: Case) -> None:
    data = build(case.method, case.path, case.body, case.headers, case.content_type)
    resp = exchange(strict.port, data)
    assert_error(resp, case.status, case.type, case.code, case.param)
    for name, value in case.expect_headers:
        assert resp.headers.get(name) == value, (name, resp.headers)


def test_retry_after_on_upstream_429_and_503(gateway: Gateway) -> None:
    """DESIGN.md §4: `retry-after` on 429 and 503, also when the upstream sent none."""
    for status in (429, 503):
        resp = exchange(gateway.port, build(body=chat(mock={"status": status})))
        assert resp.status == status
        assert resp.headers.get("retry-after", "").isdigit(), (status, resp.headers)


# ---- body framing: sizes, lying lengths, trickled bytes ----------------------------------------
def test_declared_length_over_limit_rejected_before_body_is_sent(gateway: Gateway) -> None:
    """413 arrives while the client has sent only the head and 1 KiB of a 50 MB body."""
    head = build(body=None, headers=(("Content-Length", str(50_000_000)),))
    with connect(gateway.port) as sock:
        sock.sendall(head + b"x" * 1024)
        assert wait_readable(sock, TIMEOUT_S), "no answer while the body was still owed"
        resp = read_response(sock)
    assert_error(resp, 413, BAD, "body_too_large")
    assert str(DEFAULT_MAX_BODY) in resp.json()["error"]["message"]


def test_expect_continue_over_limit_gets_413_not_100(gateway: Gateway) -> None:
    head = build(
        body=None, headers=(("Expect", "100-continue"), ("Content-Length", str(DEFAULT_MAX_BODY + 1)))
    )
    with connect(gateway.port) as sock:
        sock.sendall(head)
        resp = read_response(sock)
    assert resp.interim == [], "the gateway invited a body it was going to refuse"
    assert_error(resp, 413, BAD, "body_too_large")


def test_chunked_body_over_limit(strict: Gateway) -> None:
    """No Content-Length: the limit is enforced as chunks arrive; 413 before the client is done."""
    head = build(body=None, headers=(("Transfer-Encoding", "chunked"),))
    piece = b"2000\r\n" + b"a" * 0x2000 + b"\r\n"
    chunks_total = 4 * STRICT_MAX_BODY // 0x2000  # four times the limit, if nobody stops us
    with connect(strict.port) as sock:
        sock.sendall(head)
        sent = 0
        while sent < chunks_total and not wait_readable(sock, 0.01):
            try:
                sock.sendall(piece)
            except OSError:  # the gateway answered and closed: read the answer
                break
            sent += 1
        resp = read_response(sock)
    assert_error(resp, 413, BAD, "body_too_large")
    assert sent < chunks_total, "the whole oversized body was accepted before the 413"


def test_chunked_body_within_limit_is_served(strict: Gateway) -> None:
    """Control for the test above: chunked framing itself is fine."""
    body = chat()
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    resp = exchange(strict.port, build(body=framed, headers=(("Transfer-Encoding", "chunked"),)))
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["object"] == "chat.completion"


def test_length_declares_more_than_sent_times_out(strict: Gateway) -> None:
    body = chat()
    head = build(body=None, headers=(("Content-Length", str(len(body) + 100)),))
    with connect(strict.port) as sock:
        sock.sendall(head + body)
        resp = read_response(sock)
    assert_error(resp, 408, BAD, "request_timeout")


def test_length_declares_less_than_sent_does_not_hang(gateway: Gateway) -> None:
    """The gateway reads the declared 10 bytes (truncated JSON) and answers at once; the rest
    is the HTTP layer's business (a next request on the connection), never a hang."""
    body = chat()
    head = build(body=None, headers=(("Content-Length", "10"),))
    with connect(gateway.port) as sock:
        sock.sendall(head + body)
        resp = read_response(sock)
    assert_error(resp, 400, BAD, "invalid_json")


def test_slow_loris_body_times_out(strict: Gateway) -> None:
    """One byte every 100 ms never completes a 200-byte body within the 1 s body deadline."""
    head = build(body=None, headers=(("Content-Length", "200"),))
    with connect(strict.port) as sock:
        sock.sendall(head)
        trickled = 0
        while trickled < 200 and not wait_readable(sock, 0.1):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            trickled += 1
        assert trickled < 200, "the whole trickled body was sent without a 408"
        resp = read_response(sock)
    assert_error(resp, 408, BAD, "request_timeout")


def test_slow_headers_are_cut_off(strict: Gateway) -> None:
    """A head that never ends is dropped after server.header_read_timeout_ms (by the HTTP layer)."""
    with connect(strict.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        reader = _Reader(sock)
        rest = reader.rest()  # raises socket.timeout (a failure) if the server never lets go
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]


def test_content_length_and_chunked_together(gateway: Gateway) -> None:
    """RFC 9112 §6.3: granian lets Transfer-Encoding win over Content-Length and closes the
    connection; the uvloop engine (llhttp, strict) refuses the request outright (400, close)."""
    body = b'{"model":"echo"}'
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    )
    resp = exchange(gateway.port, raw)
    if ENGINE == "uvloop":
        assert_error(resp, 400, BAD, "invalid_request")
    else:  # the gateway decoded the chunked body (`{"model":"echo"}`), not 3 bytes of it
        assert_error(resp, 400, BAD, "missing_required_parameter", "messages")
    assert resp.headers.get("connection") == "close"


# ---- rejected by the HTTP layer (granian) before the app runs -----------------------------------
# These cannot carry the gateway's JSON error or x-request-id: granian answers them itself. What
# the suite requires is the right status and a closed connection, never a hang or a crash.
HTTP_LAYER_CASES: dict[str, tuple[bytes, int]] = {
    "content-length-not-a-number": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        400,
    ),
    "content-length-negative": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
        400,
    ),
    "content-length-conflicting": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    "request-line-garbage": (b"GARBAGE\r\n\r\n", 400),
    "headers-over-parser-count": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
        431,
    ),
    "header-over-parser-buffer": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        431,
    ),
}


@pytest.mark.parametrize("raw,status", [pytest.param(*v, id=k) for k, v in HTTP_LAYER_CASES.items()])
def test_rejected_by_http_layer(gateway: Gateway, raw: bytes, status: int) -> None:
    with connect(gateway.port) as sock:
        with contextlib.suppress(OSError):  # the server may close while a huge head is still sent
            sock.sendall(raw)
        resp = read_response(sock)
        assert resp.status == status, resp
        assert _Reader(sock).rest() == b"", "the connection stayed open after a framing error"


# ---- request ids --------------------------------------------------------------------------------
def test_error_honours_a_well_formed_request_id(gateway: Gateway) -> None:
    rid = f"client-{uuid.uuid4().hex}"
    resp = exchange(gateway.port, build(body=b"{", headers=(("X-Request-Id", rid),)))
    assert_error(resp, 400, BAD, "invalid_json")
    assert resp.headers["x-request-id"] == rid


@pytest.mark.parametrize(
    "rid", ["has space", "x" * 200, "semi;colon", "<script>"], ids=["space", "long", "semi", "html"]
)
def test_error_replaces_a_malformed_request_id(gateway: Gateway, rid: str) -> None:
    resp = exchange(gateway.port, build(body=b"{", headers=(("X-Request-Id", rid),)))
    assert_error(resp, 400, BAD, "invalid_json")
    assert resp.headers["x-request-id"] != rid


# ---- accepted edge cases: controls for the rejections above --------------------------------------
ACCEPTED: dict[str, tuple[bytes, str | None]] = {
    "depth-exactly-at-limit": (chat()[:-1] + f', "x": {nested(DEFAULT_MAX_JSON_DEPTH - 1)}}}'.encode(), None),
    "brackets-inside-strings": (chat(messages=[{"role": "user", "content": "[{" * 500}]), None),
    "ctype-charset": (chat(), "application/json; charset=utf-8"),
    "ctype-uppercase": (chat(), "Application/JSON"),
    "ctype-plus-json": (chat(), "application/vnd.api+json"),
    "ctype-absent": (chat(), None),
}


@pytest.mark.parametrize("body,ctype", [pytest.param(*v, id=k) for k, v in ACCEPTED.items()])
def test_accepted_edge_case(gateway: Gateway, body: bytes, ctype: str | None) -> None:
    resp = exchange(gateway.port, build(body=body, content_type=ctype))
    assert resp.status == 200, resp.body[:300]
    assert resp.headers.get("x-request-id")
    assert resp.json()["object"] == "chat.completion"


def test_odd_sampling_values_are_refused_and_valid_ones_forwarded(gateway: Gateway) -> None:
    """Sampling parameters are checked as OpenAI checks them (tests/python/test_validation.py has
    the table); a valid value is forwarded as sent."""
    resp = exchange(gateway.port, build(body=chat(temperature=[0.5, 1])))
    assert_error(resp, 400, BAD, "invalid_type", "temperature")
    marker = uuid.uuid4().hex
    resp = exchange(gateway.port, build(body=chat(temperature=1.25, user=marker)))
    assert resp.status == 200, resp.body[:300]
    forwarded = find_forwarded(gateway.upstream or pytest.fail("no upstream"), marker)
    assert forwarded["body"]["temperature"] == 1.25


# ---- the client never chooses the upstream -------------------------------------------------------
HOSTILE_FIELDS = {
    "api_base": "http://169.254.169.254/latest",
    "base_url": "http://127.0.0.1:1/v1",
    "api_key": "sk-client-chosen",
    "custom_llm_provider": "evil",
    "extra_headers": {"Host": "evil.example"},
}


def test_client_cannot_choose_upstream_host_or_key(gateway: Gateway) -> None:
    assert gateway.upstream is not None
    marker = uuid.uuid4().hex
    headers = (
        ("X-Upstream-Host", "evil.example"),
        ("X-Forwarded-Host", "evil.example"),
        ("Authorization", "Bearer sk-client-chosen"),
        ("OpenAI-Base-URL", "http://evil.example/v1"),
    )
    resp = exchange(gateway.port, build(body=chat(user=marker, **HOSTILE_FIELDS), headers=headers))
    assert resp.status == 200, resp.body[:300]  # served by the configured mock, not port 1
    event = find_forwarded(gateway.upstream, marker)
    body, fwd_headers = event["body"], event["headers"]
    assert isinstance(body, dict) and isinstance(fwd_headers, dict)
    for key in HOSTILE_FIELDS:
        assert key not in body, f"{key} was forwarded: {body}"
    assert body["model"] == "mock-echo" and body["messages"] == VALID_MSG
    assert fwd_headers["authorization"] == "Bearer sk-upstream-secret"
    assert fwd_headers["host"] == f"127.0.0.1:{gateway.upstream.port}"
    for name in ("x-upstream-host", "x-forwarded-host", "openai-base-url"):
        assert name not in fwd_headers


def test_escaped_host_choosing_key_is_not_forwarded(gateway: Gateway) -> None:
    """`"api\\u005fbase"` is the key `api_base` to any JSON parser upstream."""
    assert gateway.upstream is not None
    marker = uuid.uuid4().hex
    body = chat(user=marker)[:-1] + b', "api\\u005fbase": "http://169.254.169.254/"}'
    resp = exchange(gateway.port, build(body=body))
    assert resp.status == 200, resp.body[:300]
    forwarded = find_forwarded(gateway.upstream, marker)["body"]
    assert "api_base" not in forwarded, forwarded


# ---- after everything: still alive, nothing leaked ------------------------------------------------
def test_zz_gateways_survived_and_leaked_nothing(gateway: Gateway, strict: Gateway) -> None:
    for g in (gateway, strict):
        assert g.proc.poll() is None, "the gateway process died"
        resp = exchange(g.port, build("GET", "/healthz", content_type=None))
        assert resp.status == 200 and resp.json() == {"status": "ok"}
    for resp in SEEN:  # every response this module read (all of them when run as a whole)
        assert b"Traceback" not in resp.body, resp.body[:500]
        assert resp.status != 500, f"an internal error reached a client: {resp.body[:300]!r}"
