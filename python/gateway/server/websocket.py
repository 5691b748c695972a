"""RFC 6455 for the uvloop engine, sans I/O: the upgrade handshake's checks and reply, a frame
parser for what a client sends, and the frames a server writes.

Written here rather than taken from `wsproto`: its handshake runs on h11 while the engine parses
HTTP with httptools, and it has no message size limit (a client could make the worker buffer any
amount before a message ends); the server side of the framing is small. The parser refuses as
the RFC says, with the close code to send: an unmasked frame, reserved bits, an unknown opcode, a
fragmented or long control frame, a continuation with nothing to continue, a new message inside
a fragmented one -> 1002; text (or a close reason) that is not UTF-8 -> 1007, checked as the
fragments arrive; a message over the limit -> 1009, decided from the frame header before its
payload is kept. Control frames between the fragments of a message are delivered in place.
Unmasking (client frames only; the server's are unmasked): one big-integer XOR for short
payloads, numpy's uint32 XOR from 2 KiB (1 MiB: ~0.4 ms against ~6.5 ms; numpy is already a
dependency, imported on the first long frame).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from typing import Any

#: RFC 6455 1.3: appended to the client's key before the SHA-1
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = frozenset({TEXT, BINARY})
_CONTROL = frozenset({CLOSE, PING, PONG})

NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED = 1000, 1001, 1002, 1003
NO_STATUS, INVALID_DATA, POLICY, TOO_BIG, INTERNAL = 1005, 1007, 1008, 1009, 1011
#: codes a peer may send in a close frame (RFC 6455 7.4.1 and the IANA registry); 3000-4999: apps
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class WsError(Exception):
    """The peer broke the protocol: close with `code` (and drop the connection)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---- the handshake ------------------------------------------------------------------------------
def is_upgrade(headers: Any) -> bool:
    """Whether a request asks for a WebSocket (`Upgrade: websocket`, any case)."""
    up = headers.get("upgrade")
    return up is not None and "websocket" in up.lower()


def handshake_error(method: str, headers: Any) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """Why an upgrade request is not a valid RFC 6455 opening (status, message, extra headers),
    or None. Origin is not checked: API clients send none or any, and the key is the credential
    (browsers may not set `Authorization` on a WebSocket, so a browser page cannot use one)."""
    if method != "GET":
        return 405, "A WebSocket opening must be a GET.", (("allow", "GET"),)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "upgrade" not in tokens:
        return 400, "A WebSocket opening needs `Connection: Upgrade`.", ()
    if headers.get("sec-websocket-version") != "13":
        # RFC 6455 4.4: an error status "such as 426" and the versions served (400: the taxonomy's)
        return 400, "Only WebSocket version 13 is supported.", (("sec-websocket-version", "13"),)
    key = headers.get("sec-websocket-key")
    try:
        ok = key is not None and len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        return 400, "Invalid Sec-WebSocket-Key.", ()
    return None


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _GUID).digest()).decode()


def accept_reply(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        f"sec-websocket-accept: {accept_key(key)}\r\n\r\n"
    ).encode("latin-1")


# ---- frames out ---------------------------------------------------------------------------------
_SHORT = struct.Struct("!BB").pack
_MID = struct.Struct("!BBH").pack  # an event (~200 bytes) takes this one: one pack, one concat
_LONG = struct.Struct("!BBQ").pack


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server's)."""
    n = len(payload)
    if n < 126:
        return _SHORT(0x80 | opcode, n) + payload
    if n < 65536:
        return _MID(0x80 | opcode, 126, n) + payload
    return _LONG(0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason.encode()[:123])


#: from this many bytes numpy unmasks faster than the big-integer XOR
_NUMPY_FROM = 2048


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    if n >= _NUMPY_FROM:
        return _unmask_numpy(payload, mask)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _unmask_numpy(payload: bytes, mask: bytes) -> bytes:
    import numpy as np

    n = len(payload)
    a = np.frombuffer(payload, dtype=np.uint8).copy()  # writable, aligned
    q = n & ~3
    words = a[:q].view(np.uint32)
    words ^= np.frombuffer(mask, dtype=np.uint32)[0]  # the same byte order on both sides
    a[q:] ^= np.frombuffer(mask[: n - q], dtype=np.uint8)
    return a.tobytes()


# ---- frames in ----------------------------------------------------------------------------------
#: what `FrameParser.feed` yields: (opcode, payload). TEXT: str; BINARY, PING, PONG: bytes;
#: CLOSE: (code, reason) with code NO_STATUS when the frame had none
Event = tuple[int, Any]


class FrameParser:
    """A client's frames -> whole messages and control frames, under `max_message` bytes."""

    __slots__ = ("_buf", "_decoder", "_kept", "_op", "_parts", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = b""
        self._op: int | None = None  # the opcode of a fragmented message being assembled
        self._parts: list[bytes] = []
        self._kept = 0
        self._decoder: codecs.IncrementalDecoder | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame, the fragments of an incomplete message."""
        return len(self._buf) + self._kept

    def feed(self, data: bytes) -> list[Event]:
        """The events `data` completes; raises WsError on a protocol violation."""
        buf = self._buf + data if self._buf else data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if b0 & 0x70:
                raise WsError(PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
            if not b1 & 0x80:
                raise WsError(PROTOCOL_ERROR, "a client frame must be masked")
            if op in _CONTROL:
                if not fin or n > 125:
                    raise WsError(PROTOCOL_ERROR, "a control frame must be final and at most 125 bytes")
            elif op in _DATA:
                if self._op is not None:
                    raise WsError(PROTOCOL_ERROR, "a new message inside a fragmented one")
            elif op == CONT:
                if self._op is None:
                    raise WsError(PROTOCOL_ERROR, "a continuation frame with nothing to continue")
            else:
                raise WsError(PROTOCOL_ERROR, f"unknown opcode {op:#x}")
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
                if n >> 63:
                    raise WsError(PROTOCOL_ERROR, "a payload length with its top bit set")
            if op not in _CONTROL and self._kept + n > self.max_message:
                raise WsError(TOO_BIG, f"a message over {self.max_message} bytes")
            start = pos + head + 4
            if end - start < n:
                break
            payload = unmask(buf[start : start + n], buf[pos + head : start])
            pos = start + n
            if op in _CONTROL:
                events.append(_control(op, payload))
                continue
            if op != CONT:
                self._op = op
                if op == TEXT:
                    self._decoder = codecs.getincrementaldecoder("utf-8")()
            if self._decoder is not None:
                try:
                    self._decoder.decode(payload, final=bool(fin))
                except UnicodeDecodeError:
                    raise WsError(INVALID_DATA, "text that is not UTF-8") from None
            if not fin:
                self._parts.append(payload)
                self._kept += n
                continue
            if self._parts:
                self._parts.append(payload)
                payload = b"".join(self._parts)
                self._parts = []
                self._kept = 0
            msg_op, self._op, self._decoder = self._op, None, None
            events.append((TEXT, payload.decode()) if msg_op == TEXT else (BINARY, payload))
        self._buf = buf[pos:] if pos < end else b""
        return events


def _control(op: int, payload: bytes) -> Event:
    if op != CLOSE:
        return (op, payload)
    if not payload:
        return (CLOSE, (NO_STATUS, ""))
    if len(payload) == 1:
        raise WsError(PROTOCOL_ERROR, "a close frame with a 1-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise WsError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WsError(INVALID_DATA, "a close reason that is not UTF-8") from None
    return (CLOSE, (code, reason))
