"""RFC 6455 framing and handshake of the uvloop engine (server/websocket.py): masking, lengths,
fragmentation, control frames between fragments, the refusals and their close codes; then the
same refusals on the wire, against a gateway, with raw sockets."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.server import websocket as ws


def client_frame(op: int, payload: bytes, fin: bool = True, mask: bytes | None = None, rsv: int = 0) -> bytes:
    """A client's frame: masked unless `mask` is b""."""
    key = os.urandom(4) if mask is None else mask
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | op
    m = 0x80 if key else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    return head + key + (ws.unmask(payload, key) if key else payload)


def parse(data: bytes, max_message: int = 1 << 20) -> list[ws.Event]:
    return ws.FrameParser(max_message).feed(data)


def refused(data: bytes, max_message: int = 1 << 20) -> int:
    with pytest.raises(ws.WsError) as info:
        parse(data, max_message)
    return info.value.code


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 2047, 2048, 2049, 2051, 70_001])
def test_unmask_both_ways_equal_the_bytewise_definition(n: int) -> None:
    payload, mask = os.urandom(n), os.urandom(4)
    assert ws.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_accept_key_is_rfc_6455s_example() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_masked_hello_of_rfc_6455_section_5_7() -> None:
    data = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    assert parse(data) == [(ws.TEXT, "Hello")]


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_lengths_both_ways(n: int) -> None:
    payload = os.urandom(n)
    assert parse(client_frame(ws.BINARY, payload)) == [(ws.BINARY, payload)]
    out = ws.frame(ws.BINARY, payload)  # a server frame: unmasked, the shortest length form
    head = 2 if n < 126 else 4 if n < 65536 else 10
    assert len(out) == head + n and out[0] == 0x82 and not out[1] & 0x80 and out[head:] == payload


def test_fragments_with_control_frames_between_them_and_split_anywhere() -> None:
    text = "héllo wörld"
    raw = text.encode()
    stream = (
        client_frame(ws.TEXT, raw[:2], fin=False)  # splits the é
        + client_frame(ws.PING, b"p1")
        + client_frame(ws.CONT, raw[2:7], fin=False)
        + client_frame(ws.PONG, b"")
        + client_frame(ws.CONT, raw[7:])
        + client_frame(ws.BINARY, b"\x00\xff")
        + client_frame(ws.CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    expected = [
        (ws.PING, b"p1"),
        (ws.PONG, b""),
        (ws.TEXT, text),
        (ws.BINARY, b"\x00\xff"),
        (ws.CLOSE, (1000, "bye")),
    ]
    assert parse(stream) == expected
    for step in (1, 3, 7):  # fed in pieces: the same events
        p = ws.FrameParser(1 << 20)
        got: list[ws.Event] = []
        for i in range(0, len(stream), step):
            got += p.feed(stream[i : i + step])
        assert got == expected
        assert p.buffered == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (client_frame(0x3, b"x"), "reserved data opcode"),
        (client_frame(0xB, b"x"), "reserved control opcode"),
        (client_frame(ws.TEXT, b"x", mask=b""), "unmasked"),
        (client_frame(ws.TEXT, b"x", rsv=0x40), "RSV1 without an extension"),
        (client_frame(ws.PING, b"x", fin=False), "fragmented control frame"),
        (client_frame(ws.PING, b"x" * 126), "control frame over 125 bytes"),
        (client_frame(ws.CONT, b"x"), "continuation of nothing"),
        (client_frame(ws.TEXT, b"a", fin=False) + client_frame(ws.TEXT, b"b"), "a message inside one"),
        (client_frame(ws.CLOSE, b"\x03"), "1-byte close payload"),
        (client_frame(ws.CLOSE, struct.pack("!H", 1005)), "close code 1005 on the wire"),
        (client_frame(ws.CLOSE, struct.pack("!H", 999)), "close code below 1000"),
        (client_frame(ws.CLOSE, struct.pack("!H", 2000)), "unassigned close code"),
        (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"mask", "64-bit length with its top bit"),
    ],
)
def test_protocol_errors_are_1002(data: bytes, why: str) -> None:
    assert refused(data) == ws.PROTOCOL_ERROR, why


def test_an_application_close_code_passes() -> None:
    assert parse(client_frame(ws.CLOSE, struct.pack("!H", 4001))) == [(ws.CLOSE, (4001, ""))]
    assert parse(client_frame(ws.CLOSE, b"")) == [(ws.CLOSE, (ws.NO_STATUS, ""))]


def test_invalid_utf8_is_1007_as_soon_as_its_fragment_arrives() -> None:
    assert refused(client_frame(ws.TEXT, b"ok \xff")) == ws.INVALID_DATA
    # the first fragment alone already fails: nothing waits for the message's end
    assert refused(client_frame(ws.TEXT, b"\xc3\x28", fin=False)) == ws.INVALID_DATA
    assert refused(client_frame(ws.CLOSE, struct.pack("!H", 1000) + b"\xff")) == ws.INVALID_DATA
    # a truncated sequence at the message's end
    assert refused(client_frame(ws.TEXT, b"\xc3", fin=False) + client_frame(ws.CONT, b"")) == ws.INVALID_DATA
    # binary is not text: any bytes
    assert parse(client_frame(ws.BINARY, b"\xff")) == [(ws.BINARY, b"\xff")]


def test_too_big_is_1009_from_the_header_before_the_payload() -> None:
    header_only = client_frame(ws.BINARY, b"x" * 2000)[:8]  # 2-byte length + mask, no payload
    assert refused(header_only, max_message=1000) == ws.TOO_BIG
    fragments = client_frame(ws.TEXT, b"a" * 600, fin=False) + client_frame(ws.CONT, b"b" * 600)
    assert refused(fragments, max_message=1000) == ws.TOO_BIG
    exact = client_frame(ws.TEXT, b"a" * 500, fin=False) + client_frame(ws.CONT, b"b" * 500)
    assert parse(exact, max_message=1000) == [(ws.TEXT, "a" * 500 + "b" * 500)]
    # control frames do not count against a message
    p = ws.FrameParser(1000)
    assert p.feed(client_frame(ws.TEXT, b"a" * 900, fin=False)) == []
    assert p.buffered == 900
    assert p.feed(client_frame(ws.PING, b"x" * 125)) == [(ws.PING, b"x" * 125)]


class _Headers(dict[str, str]):
    pass


KEY = base64.b64encode(b"0123456789abcdef").decode()


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        (
            "GET",
            {"connection": "keep-alive, Upgrade", "sec-websocket-version": "13", "sec-websocket-key": KEY},
            0,
        ),
        ("POST", {"connection": "upgrade", "sec-websocket-version": "13", "sec-websocket-key": KEY}, 405),
        ("GET", {"connection": "keep-alive", "sec-websocket-version": "13", "sec-websocket-key": KEY}, 400),
        ("GET", {"connection": "upgrade", "sec-websocket-version": "8", "sec-websocket-key": KEY}, 400),
        ("GET", {"connection": "upgrade", "sec-websocket-version": "13", "sec-websocket-key": "short"}, 400),
        ("GET", {"connection": "upgrade", "sec-websocket-version": "13"}, 400),
    ],
)
def test_handshake_checks(method: str, headers: dict[str, str], status: int) -> None:
    bad = ws.handshake_error(method, _Headers(headers))
    assert (bad[0] if bad else 0) == status


# ---- on the wire ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    limits = "responses:\n  websocket: {max_connection_ms: 3000, idle_timeout_ms: 3000}\n"
    text = gateway_config(mock_upstream.port, max_body_bytes=4096) + limits
    with run_gateway(tmp_path_factory.mktemp("ws-frames"), mock_upstream, config_text=text) as g:
        yield g


def upgrade(g: Gateway, version: str = "13") -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    s.sendall(
        (
            "GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def read_close(s: socket.socket) -> int:
    """The server's close frame's code (server frames are unmasked), then the socket ends."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data[0] == 0x80 | ws.CLOSE, data[:20]
    code: int = struct.unpack_from("!H", data, 2)[0]
    return code


def test_wire_upgrade_answers_101_with_the_accept_key(gw: Gateway) -> None:
    s, head = upgrade(gw)
    try:
        assert head.startswith(b"HTTP/1.1 101 ")
        assert f"\r\nsec-websocket-accept: {ws.accept_key(KEY)}\r\n".encode() in head
        s.sendall(client_frame(ws.PING, b"hi"))
        assert s.recv(64) == ws.frame(ws.PONG, b"hi")
        s.sendall(client_frame(ws.CLOSE, struct.pack("!H", 1000)))
        assert read_close(s) == 1000
    finally:
        s.close()


def test_wire_bad_version_is_refused(gw: Gateway) -> None:
    s, head = upgrade(gw, version="8")
    s.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"sec-websocket-version: 13" in head.lower()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(0x3, b"x"), ws.PROTOCOL_ERROR),
        (client_frame(ws.TEXT, b"x", mask=b""), ws.PROTOCOL_ERROR),
        (client_frame(ws.TEXT, b"\xff\xfe"), ws.INVALID_DATA),
        (client_frame(ws.TEXT, b"x" * 5000), ws.TOO_BIG),
    ],
)
def test_wire_refusals_close_with_their_code(gw: Gateway, frame: bytes, code: int) -> None:
    s, head = upgrade(gw)
    try:
        assert head.startswith(b"HTTP/1.1 101 ")
        s.sendall(frame)
        assert read_close(s) == code
    finally:
        s.close()


def test_wire_upgrade_on_an_unknown_path_is_a_404(gw: Gateway) -> None:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(
        (
            "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 404 ")
    assert b'"type":"not_found_error"' in data


def test_wire_connection_time_limit_ends_between_responses(gw: Gateway) -> None:
    """`max_connection_ms` (3 s here) is checked between responses: after the response, the
    wait for the next message ends at the limit with its error event, then close 1000."""
    with connect(f"ws://127.0.0.1:{gw.port}/v1/responses", open_timeout=20) as c:
        c.send(json.dumps({"type": "response.create", "model": "echo", "input": "just in time"}))
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "error"):
            events.append(json.loads(c.recv(timeout=30)))
        assert events[-1]["type"] == "response.completed"
        event = json.loads(c.recv(timeout=30))
        assert event["type"] == "error" and event["error"]["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed) as info:
            c.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1000
