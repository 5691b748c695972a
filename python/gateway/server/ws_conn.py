"""The uvloop engine's RSGI WebSocket protocol: what a request with `scope.proto == "ws"` hands
the app, the same interface as granian's (`accept()` -> a transport with `receive()`,
`send_str()`, `send_bytes()`; `close(status)`), over one `http11.Connection` once its upgrade
request was parsed (the framing: `websocket.py`).

The engine answers pings and the peer's close (echoing its code, then closing the TCP
connection); the app sees whole text / bytes messages and one close message (`kind` 0). Flow
control both ways: a send returns once the frame is in the socket's buffer and that buffer is
below its high-water mark (a client that stops reading stops the sender, and through it the
relay's upstream reads); parsed messages the app has not taken yet are at most a few (reading
pauses beyond them), each at most `server.max_body_bytes` (a larger one: close 1009). Stopping,
`receive()` answers a close message whose `data` is 1001 (a peer's close has None), so an app
may finish what it is doing first; whatever it then closes with, the code sent is 1001. Before
`accept()` the app may refuse the upgrade with an HTTP reply (`response_bytes`, this engine
only) or `close(status)` (that status, no body: as granian). Beyond RSGI, the transport's
`send_texts(list[bytes])` sends several text messages in one call (an app uses it where it is).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from granian.rsgi import ProtocolClosed  # type: ignore[attr-defined]

from . import websocket as ws

if TYPE_CHECKING:
    from .http11 import Connection, Scope

log = logging.getLogger("gateway.server")

#: parsed messages the app has not taken before reading pauses
_MAX_QUEUED = 4
#: messages sent in one turn of the loop go out in one write, up to this many bytes
_CORK_BYTES = 65536
#: after our close frame: how long the peer's close may take before the socket closes anyway
_CLOSE_WAIT_S = 2.0
_CLOSED = "fastpath: websocket closed"


class Message:
    """RSGI's WebsocketMessage: `kind` 0 closed (`data`: None, or 1001 when the server stops), 1
    bytes, 2 str."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: int, data: bytes | str | int | None) -> None:
        self.kind = kind
        self.data = data


CLOSED = Message(0, None)
#: what `receive()` answers once the server is stopping
GOING = Message(0, ws.GOING_AWAY)


class WsExchange:
    """One upgrade request on a connection: the RSGI WebSocket protocol object."""

    __slots__ = (
        "_cork",
        "_corked",
        "_paused",
        "_queue",
        "_waiter",
        "accepted",
        "answered",
        "body_done",
        "close_sent",
        "conn",
        "going",
        "keep_alive",
        "key",
        "parser",
        "peer_closed",
        "scope",
        "state",
    )

    def __init__(self, conn: Connection, scope: Scope, key: str) -> None:
        self.conn = conn
        self.scope = scope
        self.key = key
        self.state = 0
        self.keep_alive = False  # the connection is never HTTP again
        self.body_done = False
        self.accepted = False
        self.answered = False  # the 101, or a refusal, was written
        self.close_sent = False
        self.peer_closed = False
        self.going = False  # the server is stopping
        self.parser = ws.FrameParser(conn.server.max_body)
        self._queue: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._cork: list[bytes] = []  # the app's frames not yet written (see WsTransport)
        self._corked = 0

    # ---- the connection's calls (as on an HTTP exchange) -------------------------------------
    def feed(self, data: bytes) -> None:
        """An upgrade request's body: not the app's (RSGI gives a WebSocket none)."""

    def complete(self) -> None:
        self.body_done = True

    def fail(self, err: BaseException) -> None:
        self.lost()

    def lost(self) -> None:
        self.peer_closed = True
        self._push(CLOSED)

    def data_received(self, data: bytes) -> None:
        if self.peer_closed or self.conn.closed:
            return
        try:
            events = self.parser.feed(data)
        except ws.WsError as exc:
            log.info("websocket from %s failed: %s (close %d)", self.conn.client, exc.reason, exc.code)
            self._fail(exc.code, exc.reason)
            return
        t = self.conn.transport
        for op, payload in events:
            if op == ws.TEXT:
                self._push(Message(2, payload))
            elif op == ws.BINARY:
                self._push(Message(1, payload))
            elif op == ws.PING:
                if self.accepted and not self.close_sent and t is not None:
                    self.flush()
                    t.write(ws.frame(ws.PONG, payload))
            elif op == ws.CLOSE:
                code = payload[0]
                if not self.close_sent and self.accepted and t is not None:
                    self.close_sent = True  # the echo (RFC 6455 5.5.1), then the TCP close
                    self.flush()
                    t.write(ws.frame(ws.CLOSE, b"") if code == ws.NO_STATUS else ws.close_frame(code))
                self.peer_closed = True
                self._push(CLOSED)
                if t is not None:
                    t.close()
                return
        if len(self._queue) >= _MAX_QUEUED and not self._paused and t is not None:
            self._paused = True
            t.pause_reading()

    def going_away(self) -> None:
        """The server is stopping: a `receive()` waiting now, or the next one, answers `GOING`."""
        self.going = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def finished(self) -> None:
        """The app returned: close what it left open."""
        if not self.answered:
            from ..errors import Fault, GatewayError
            from .http11 import _error_headers

            err = GatewayError(Fault.INTERNAL, "The server did not answer the request.")
            self._refuse(err.status, _error_headers(self.conn.server.request_id()), err.body())
        elif not self.close_sent:
            self._send_close(ws.GOING_AWAY if self.going else ws.NORMAL)

    # ---- RSGI --------------------------------------------------------------------------------
    async def accept(self) -> WsTransport:
        t = self.conn.transport
        if self.answered or self.conn.closed or t is None:
            raise ProtocolClosed(_CLOSED)
        self.answered = self.accepted = True
        t.write(ws.accept_reply(self.key))
        return WsTransport(self)

    def close(self, status: int | None = None) -> tuple[int, bool]:
        if not self.answered:  # refused before accept: that status, no body (as granian does it)
            refused = status or 403
            self._refuse(refused, [], b"")
            return refused, False
        code = ws.GOING_AWAY if self.going else status or ws.NORMAL
        if not self.close_sent:
            self._send_close(code)
        return code, True

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Refuse the upgrade with an HTTP reply (this engine's; granian's has no such call)."""
        if self.answered:
            raise RuntimeError("the upgrade was already answered")
        self._refuse(status, headers, body)

    # ---- internals ---------------------------------------------------------------------------
    def _refuse(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        from .http11 import _response_head

        self.answered = True
        conn = self.conn
        t = conn.transport
        if t is not None and not conn.closed:
            t.write(_response_head(status, headers, len(body), True) + body)
            t.close()

    def _send_close(self, code: int) -> None:
        """Our close frame; the peer's answers it (then the socket closes), or the sweep closes
        the socket `_CLOSE_WAIT_S` later."""
        self.close_sent = True
        conn = self.conn
        t = conn.transport
        if t is None or conn.closed:
            return
        self.flush()
        t.write(ws.close_frame(code))
        if self.peer_closed:
            t.close()
        else:
            conn.deadline = conn.loop.time() + _CLOSE_WAIT_S
            if self._paused:  # the peer's close frame must be read
                self._paused = False
                t.resume_reading()

    def _fail(self, code: int, reason: str) -> None:
        """A protocol violation: our close frame (once the upgrade was accepted), no wait."""
        t = self.conn.transport
        if self.accepted and not self.close_sent and t is not None:
            self.flush()
            t.write(ws.close_frame(code, reason))
        self.close_sent = self.peer_closed = True
        self._push(CLOSED)
        if t is not None:
            t.close()

    def flush(self) -> None:
        """The corked frames, in one write (before any frame the engine writes itself)."""
        out = self._cork
        if not out:
            return
        self._cork = []
        self._corked = 0
        t = self.conn.transport
        if t is not None and not self.conn.closed:
            t.write(out[0] if len(out) == 1 else b"".join(out))

    def _push(self, msg: Message) -> None:
        self._queue.append(msg)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class WsTransport:
    """RSGI's WebSocket transport. A send is corked until the loop's next turn (or
    `_CORK_BYTES`): the events of one upstream read leave in one write, not one syscall each;
    then, as on HTTP, a send waits while the socket's buffer is above its high-water mark."""

    __slots__ = ("_ex",)

    def __init__(self, ex: WsExchange) -> None:
        self._ex = ex

    async def receive(self) -> Message:
        ex = self._ex
        while True:
            if ex.going:
                return GOING
            if ex._queue:
                msg = ex._queue.popleft()
                if ex._paused and len(ex._queue) < _MAX_QUEUED // 2 and ex.conn.transport is not None:
                    ex._paused = False
                    ex.conn.transport.resume_reading()
                return msg
            if ex.peer_closed or ex.close_sent or ex.conn.closed:
                return CLOSED
            fut = ex._waiter = ex.conn.loop.create_future()
            try:
                await fut
            finally:
                ex._waiter = None

    async def send_str(self, data: str) -> None:
        await self.send(ws.TEXT, data.encode())

    async def send_bytes(self, data: bytes) -> None:
        await self.send(ws.BINARY, data)

    async def send_texts(self, payloads: list[bytes]) -> None:
        """Text messages already UTF-8, in one call (this engine's, not RSGI's: a stream's
        events without a coroutine, a decode and an encode each)."""
        frame, text = ws.frame, ws.TEXT
        await self._out(b"".join([frame(text, p) for p in payloads]))

    async def send(self, op: int, payload: bytes) -> None:
        await self._out(ws.frame(op, payload))

    async def _out(self, frames: bytes) -> None:
        ex = self._ex
        conn = ex.conn
        t = conn.transport
        if ex.close_sent or conn.closed or t is None:
            raise ProtocolClosed(_CLOSED)
        cork = ex._cork
        cork.append(frames)
        if len(cork) == 1:
            conn.loop.call_soon(ex.flush)
        ex._corked += len(frames)
        if ex._corked >= _CORK_BYTES:
            ex.flush()
        if conn.write_paused:
            await conn.drain()
