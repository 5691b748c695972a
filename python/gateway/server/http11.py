"""HTTP/1.1 keep-alive on the worker's event loop, presenting RSGI to the app.

One `Connection` (an `asyncio.Protocol`) per socket feeds httptools (llhttp, strict: both
Content-Length and Transfer-Encoding, a repeated Content-Length, bad chunk framing or an unknown
transfer coding are parse errors -> 400 and close). Each request becomes an `Exchange`: the RSGI
`protocol` object the app answers on (`response_bytes`, `response_stream` -> `send_bytes`, body
reads, `client_disconnect()`), and a `Scope`. Pipelined requests are served in order, one at a
time; a parsed request waits in a short queue (reading pauses beyond it).

Limits, all from `server.*`: header count and bytes (431), the head's size while it arrives
(431), the body (the app answers 413; the engine stops buffering past the limit), the time a head
may take and an idle keep-alive connection may wait (`header_read_timeout_ms`: 408 if part of a
head came, else a silent close; one sweep timer per worker, nothing armed per request). The body
deadline and the JSON of every error are the app's, as on granian. A response sent before its
request's body was read closes the connection after a lingering half-close (the client reads the
reply instead of a reset).

A WebSocket opening (`Upgrade: websocket`) is checked here (RFC 6455: GET, `Connection:
Upgrade`, version 13, a 16-byte key; else a 400 / 405 JSON) and handed to the app as RSGI's
`scope.proto == "ws"`; from then on the connection's bytes go to its `ws_conn.WsExchange`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httptools
from granian.rsgi import ProtocolClosed  # type: ignore[attr-defined]

from ..edge import ClientResolver
from ..errors import Fault, GatewayError
from . import proxy_protocol, websocket
from .ws_conn import WsExchange

log = logging.getLogger("gateway.server")

App = Callable[[Any, Any], Awaitable[None]]

_STATUS = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus if s.value >= 200
}  # 1xx replies are never the app's
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})
_LAST_CHUNK = b"0\r\n\r\n"
#: parsed requests waiting behind the one being served before reading pauses
_MAX_QUEUED = 8
#: a closing connection that owes us a body: how long its bytes are read and dropped
_LINGER_S = 2.0
_CLOSED = "fastpath: connection closed"


class Headers:
    """RSGI request headers: `get(lower-case name)` (the first value), `get_all`, `items()` (every
    header as sent, in order, names lower-cased), `keys`, `values`, `in`."""

    __slots__ = ("_d", "_list", "get")

    def __init__(self, d: dict[str, str], items: list[tuple[str, str]]) -> None:
        self._d = d
        self._list = items
        self.get = d.get  # the builtin, unwrapped: the hot path's header reads

    def items(self) -> list[tuple[str, str]]:
        return self._list

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._list if k == name]

    def keys(self) -> list[str]:
        return [k for k, _ in self._list]

    def values(self) -> list[str]:
        return [v for _, v in self._list]

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def __len__(self) -> int:
        return len(self._list)


class Scope:
    """RSGI HTTP scope (the fields granian's has)."""

    __slots__ = (
        "authority",
        "client",
        "headers",
        "http_version",
        "method",
        "path",
        "query_string",
        "scheme",
        "server",
    )
    proto = "http"
    rsgi_version = "1.5"

    def __init__(
        self, method: str, path: str, query: str, headers: Headers, client: str, server: str, version: str
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query
        self.headers = headers
        self.client = client
        self.server = server
        self.http_version = version
        self.scheme = "http"
        self.authority = headers.get("host")


class WsScope(Scope):
    """RSGI WebSocket scope."""

    __slots__ = ()
    proto = "ws"


class Server:
    """Per-worker engine state: the app, the limits, the open connections and the sweep timer."""

    def __init__(self, app: App, server_cfg: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.max_body = int(server_cfg.max_body_bytes)
        self.max_headers = int(server_cfg.max_headers)
        self.max_header_bytes = int(server_cfg.max_header_bytes)
        #: bytes a head may span while it arrives (granian: its parser buffer)
        self.head_cap = max(self.max_header_bytes * 2, 65536)
        self.head_timeout_s = server_cfg.header_read_timeout_ms / 1000
        #: `server.proxy_protocol`: who may send a PROXY header (every connection must); None: off
        self.proxy_from: ClientResolver | None = None
        if getattr(server_cfg, "proxy_protocol", False):
            self.proxy_from = ClientResolver(server_cfg)
        self.connections: set[Connection] = set()
        self.closing = False
        self._id_prefix = "e" + os.urandom(5).hex() + "-"
        self._id_counter = 0
        self._sweep_s = max(0.05, min(1.0, self.head_timeout_s / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        #: set while stopping: resolved when the last connection is gone
        self.drained: asyncio.Future[None] | None = None

    def __call__(self) -> Connection:
        """The protocol factory for `loop.create_server`."""
        if self._sweeper is None and not self.closing:
            self._sweeper = self.loop.call_later(self._sweep_s, self._sweep)
        return Connection(self)

    def request_id(self) -> str:
        """For the engine's own error replies (the app's requests number their own)."""
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:x}"

    def _sweep(self) -> None:
        """Head and keep-alive deadlines, once per interval for all connections: cheaper than a
        timer armed and cancelled per request."""
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.connections):
            if 0.0 < conn.deadline <= now:
                conn.expired()
        if self.connections and not self.closing:
            self._sweeper = self.loop.call_later(self._sweep_s, self._sweep)

    async def shutdown(self, grace_s: float) -> None:
        """Graceful stop: idle connections close now, busy ones after their response (with
        `connection: close`); whatever still runs after `grace_s` is aborted (its request task is
        cancelled, so the pipeline settles and observes it as a disconnect)."""
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self.drained = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.drained), grace_s)
        for conn in list(self.connections):
            conn.abort()
        for _ in range(3):  # let the cancelled request tasks run their `finally`s
            await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class Connection(asyncio.Protocol):
    """One client connection: httptools callbacks, the request queue, flow control both ways."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.local = ""
        #: loop time by which the next head must be complete (idle or mid-head); 0: none
        self.deadline = 0.0
        self.closed = False
        self.write_paused = False
        self._drain: list[asyncio.Future[None]] = []
        # the head being parsed
        self._url = b""
        self._hdict: dict[str, str] = {}
        self._hlist: list[tuple[str, str]] = []
        self._hbytes = 0
        self._in_head = False
        self._head_bytes = 0  # bytes read while a head was incomplete (slow heads)
        self._incoming: Exchange | WsExchange | None = None  # headers done, body still arriving
        self._current: Exchange | WsExchange | None = None  # being served
        self._queue: deque[Exchange | WsExchange] = deque()
        self._read_paused = False
        self._pending_error: GatewayError | None = None  # a head refused: answered in turn
        self._lingering = False
        #: bytes of a PROXY protocol header still arriving (None: none expected)
        self._proxy_buf: bytes | None = None
        self._upgrade: WsExchange | None = None  # a WebSocket opening parsed
        self._ws: WsExchange | None = None  # upgraded: every byte is its

    # ---- transport events -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.transport = t
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = _addr(t.get_extra_info("peername"))
        self.local = _addr(t.get_extra_info("sockname"))
        proxies = self.server.proxy_from
        if proxies is not None:
            if not proxies.is_trusted(self.client):
                log.warning("connection from %s closed: not a trusted PROXY protocol peer", self.client)
                t.abort()
                return
            self._proxy_buf = b""
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.server.head_timeout_s
        if self.server.closing:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = 0.0
        server = self.server
        server.connections.discard(self)
        if not server.connections and server.drained is not None and not server.drained.done():
            server.drained.set_result(None)
        for fut in self._drain:
            if not fut.done():
                fut.set_result(None)
        self._drain.clear()
        for ex in (self._current, self._incoming, *self._queue):
            if ex is not None:
                ex.lost()
        self._queue.clear()

    def eof_received(self) -> bool | None:
        # No half-close (hyper's default, so granian's): a client that stops sending is gone,
        # and a request in flight for it is cancelled through its disconnect signal.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for fut in self._drain:
            if not fut.done():
                fut.set_result(None)
        self._drain.clear()

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its low-water mark: back-pressure from
        a slow reader reaches whoever sends (the relay, which then stops reading upstream)."""
        fut = self.loop.create_future()
        self._drain.append(fut)
        await fut
        if self.closed:
            raise ProtocolClosed(_CLOSED)

    def data_received(self, data: bytes) -> None:
        if self._ws is not None:
            self._ws.data_received(data)
            return
        if self._lingering or self._pending_error is not None:
            return  # a closing connection: what it still sends is dropped
        if self._proxy_buf is not None:
            buf = self._proxy_buf + data
            try:
                found = proxy_protocol.parse(buf)
            except proxy_protocol.ProxyHeaderError as exc:
                log.warning("connection from %s closed: %s", self.client, exc)
                assert self.transport is not None
                self.transport.abort()
                return
            if found is None:
                self._proxy_buf = buf
                return
            used, client = found
            self._proxy_buf = None
            if client is not None:
                self.client = client
            data = buf[used:]
            if not data:
                return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.server.head_cap:
                self._refuse_head(_too_large_head(self.server.head_cap))
                return
        try:
            self.parser.feed_data(data)
        except _HeadRefused as exc:
            self._refuse_head(exc.err)
        except httptools.HttpParserUpgrade as exc:
            if self._upgrade is not None:  # a WebSocket: what follows its head is frames
                self._ws = self._upgrade
                rest = data[exc.args[0] :] if exc.args else b""
                if rest:
                    self._ws.data_received(rest)
                return
            # Upgrade / CONNECT: the request itself was served as plain HTTP; nothing after it
            # on this connection is HTTP/1.1, so the connection ends with its response.
            for ex in (self._incoming, *self._queue, self._current):
                if ex is not None:
                    ex.keep_alive = False
            if self._pending_error is None:
                self._pending_error = _UPGRADE_STOP
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__  # a callback's raise, wrapped by httptools
            if isinstance(cause, _HeadRefused):
                self._refuse_head(cause.err)
                return
            err = GatewayError(Fault.INVALID_REQUEST, f"Malformed HTTP/1.1 request: {exc}.")
            if self._incoming is not None:  # mid-body (chunk framing): the body read raises
                ex, self._incoming = self._incoming, None
                ex.fail(err)
                self._pending_error = _UPGRADE_STOP
            else:
                self._refuse_head(err)

    # ---- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._hdict = {}
        self._hlist = []
        self._hbytes = 0
        self._in_head = True
        self._head_bytes = 0
        if self.deadline == 0.0:  # a pipelined head: its time counts too
            self.deadline = self.loop.time() + self.server.head_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.head_cap:
            raise _HeadRefused(_too_large_head(self.server.head_cap))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer fields: not the request's headers
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        self._hbytes += len(key) + len(val) + 4
        self._hlist.append((key, val))
        s = self.server
        if len(self._hlist) > s.max_headers:
            raise _HeadRefused(
                GatewayError(Fault.HEADERS_TOO_LARGE, f"Too many request headers (limit {s.max_headers}).")
            )
        if self._hbytes > s.max_header_bytes:
            raise _HeadRefused(
                GatewayError(
                    Fault.HEADERS_TOO_LARGE, f"Request headers are larger than {s.max_header_bytes} bytes."
                )
            )
        self._hdict.setdefault(key, val)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadline = 0.0
        p = self.parser
        url = self._url.decode("latin-1")
        path, _, query = url.partition("?")
        version = p.get_http_version()
        headers = Headers(self._hdict, self._hlist)
        method = p.get_method().decode("ascii")
        ex: Exchange | WsExchange
        if websocket.is_upgrade(headers):
            bad = websocket.handshake_error(method, headers)
            if bad is not None:
                status, message, extra = bad
                fault = Fault.METHOD_NOT_ALLOWED if status == 405 else Fault.INVALID_REQUEST
                raise _HeadRefused(GatewayError(fault, message, headers=extra))
            scope: Scope = WsScope(method, path, query, headers, self.client, self.local, version)
            ex = self._upgrade = WsExchange(self, scope, headers.get("sec-websocket-key") or "")
        else:
            scope = Scope(method, path, query, headers, self.client, self.local, version)
            ex = Exchange(self, scope)
            ex.keep_alive = p.should_keep_alive()
            ex.chunked = version == "1.1"
            ex.expect_continue = self._hdict.get("expect", "").lower() == "100-continue"
        self._incoming = ex
        if self._current is None:
            self._start(ex)
        else:
            self._queue.append(ex)
            if len(self._queue) >= _MAX_QUEUED and not self._read_paused and self.transport is not None:
                self._read_paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self._incoming
        if ex is not None:
            ex.feed(body)

    def on_message_complete(self) -> None:
        ex = self._incoming
        if ex is not None:
            self._incoming = None
            ex.complete()

    # ---- request turns ------------------------------------------------------------------------
    def _start(self, ex: Exchange | WsExchange) -> None:
        self._current = ex
        self.loop.create_task(self._serve(ex))

    async def _serve(self, ex: Exchange | WsExchange) -> None:
        try:
            await self.server.app(ex.scope, ex)
        except ProtocolClosed:
            pass  # the client left mid-body or mid-reply
        except asyncio.CancelledError:
            if not self.closed:
                log.warning("request on %s cancelled before it answered", self.client)
        except Exception:
            log.exception("the app failed on %s %s", ex.scope.method, ex.scope.path)
        self._finished(ex)

    def _finished(self, ex: Exchange | WsExchange) -> None:
        """The app returned: end the response, then the next request in line, or wait idle."""
        if self.closed:
            return
        if type(ex) is WsExchange:  # the connection ends with it
            self._current = None
            ex.finished()
            return
        assert type(ex) is Exchange
        if ex.state == _STREAMING:
            ex.end_stream()
        elif ex.state == _NONE:
            err = GatewayError(Fault.INTERNAL, "The server did not answer the request.")
            ex.response_bytes(err.status, _error_headers(self.server.request_id()), err.body())
        self._current = None
        if not ex.keep_alive or self.server.closing or not ex.body_done:
            self._close(lingering=not ex.body_done)
            return
        if self._queue:
            nxt = self._queue.popleft()
            if self._read_paused and len(self._queue) < _MAX_QUEUED // 2 and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            self._start(nxt)
            return
        if self._pending_error is not None:
            self._reply_error(self._pending_error)
            return
        if not self._in_head:
            self.deadline = self.loop.time() + self.server.head_timeout_s

    def _refuse_head(self, err: GatewayError) -> None:
        """A head the engine refuses (malformed, over a limit): answered after the requests
        before it, then the connection closes."""
        self._in_head = False
        self.deadline = 0.0
        self._pending_error = err
        if self._current is None and not self._queue:
            self._reply_error(err)

    def _reply_error(self, err: GatewayError) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        if err is not _UPGRADE_STOP:
            rid = self.server.request_id()
            log.info("request %s from %s refused: %s", rid, self.client, err.message)
            head = _response_head(err.status, [*_error_headers(rid), *err.headers], len(err.body()), True)
            t.write(head + err.body())
        self._close(lingering=True)

    def _close(self, lingering: bool) -> None:
        """Close after what was written. Lingering: half-close first and drop what the client
        still sends for a while (a reset would destroy our reply in the client's buffer)."""
        t = self.transport
        if t is None or self.closed:
            return
        self.deadline = 0.0
        if not lingering:
            t.close()
            return
        self._lingering = True
        if self._read_paused:
            self._read_paused = False
            t.resume_reading()
        try:
            t.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            t.close()
            return
        self.deadline = self.loop.time() + _LINGER_S

    def expired(self) -> None:
        """The sweep found the deadline passed: a slow head gets 408, an idle connection (or a
        lingering one) just closes."""
        self.deadline = 0.0
        t = self.transport
        if t is None or self.closed:
            return
        if self._lingering or not self._in_head:
            t.close()
            return
        self._in_head = False
        err = GatewayError(Fault.REQUEST_TIMEOUT, "The request head was not received in time.")
        self._pending_error = err
        if self._current is None and not self._queue:
            self._reply_error(err)

    def shutdown(self) -> None:
        """Stopping: close now if idle; otherwise the response in flight ends the connection."""
        if self._ws is not None:
            self._ws.going_away()
            return
        if self._current is None and self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _HeadRefused(Exception):
    def __init__(self, err: GatewayError) -> None:
        super().__init__(err.message)
        self.err = err


#: not an answer: the connection stops reading HTTP and closes after the requests before
_UPGRADE_STOP = GatewayError(Fault.INVALID_REQUEST, "")

_NONE, _SENT, _STREAMING, _ENDED = 0, 1, 2, 3


class Exchange:
    """One request/response on a connection: the RSGI `protocol` object the app answers on."""

    __slots__ = (
        "_chunks",
        "_error",
        "_head",
        "_lost",
        "_waiter",
        "body_done",
        "chunked",
        "conn",
        "expect_continue",
        "keep_alive",
        "overflow",
        "received",
        "scope",
        "state",
    )

    def __init__(self, conn: Connection, scope: Scope) -> None:
        self.conn = conn
        self.scope = scope
        self.state = _NONE
        self.keep_alive = True
        self.chunked = True
        self.expect_continue = False
        self.body_done = False
        self.overflow = False
        self.received = 0
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._head = b""  # a stream's head, written with its first chunk

    # ---- body in --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.overflow:
            return
        self.received += len(data)
        self._chunks.append(data)
        if self.received > self.conn.server.max_body:
            self.overflow = True  # the app answers 413; nothing more is kept
        self._wake()

    def complete(self) -> None:
        self.body_done = True
        self._wake()

    def fail(self, err: BaseException) -> None:
        self._error = err
        self._wake()

    def lost(self) -> None:
        if self._error is None:
            self._error = ProtocolClosed(_CLOSED)
        self._wake()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            if self.conn.transport is not None and not self.conn.closed:
                self.conn.transport.write(_CONTINUE)
        fut = self._waiter = self.conn.loop.create_future()
        try:
            await fut
        finally:
            self._waiter = None

    async def __call__(self) -> bytes:
        """The whole body (what arrived, once past the limit: the app answers 413)."""
        while not (self.body_done or self.overflow):
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def __aiter__(self) -> Exchange:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self.body_done or self.overflow:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            await self._wait()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = []
        return data

    async def client_disconnect(self) -> None:
        """Resolves when the client's connection is gone (RSGI's disconnect signal)."""
        if self.conn.closed:
            return
        if self._lost is None:
            self._lost = self.conn.loop.create_future()
        await self._lost

    # ---- response out -----------------------------------------------------------------------
    def _closes(self) -> bool:
        """Whether the connection ends with this response (known before its head is written)."""
        if not self.body_done or self.conn.server.closing or self.conn._pending_error is not None:
            self.keep_alive = False
        return not self.keep_alive

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.state != _NONE:
            raise RuntimeError("the response has already started")
        self.state = _SENT
        conn = self.conn
        t = conn.transport
        if t is None or conn.closed:
            return
        head = _response_head(status, headers, len(body), self._closes())
        if self.scope.method == "HEAD" or status in _NO_BODY_STATUS:
            t.write(head)
        elif len(body) <= 65536:
            t.write(head + body)
        else:
            t.write(head)
            t.write(body)

    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.response_bytes(status, headers, body.encode())

    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.response_bytes(status, headers, b"")

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport:
        if self.state != _NONE:
            raise RuntimeError("the response has already started")
        self.state = _STREAMING
        if self.scope.method == "HEAD":
            self.chunked = False
        lines = [_STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if self.chunked:
            lines.append("transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0 (or HEAD): the close ends the body
        if self._closes():
            lines.append("connection: close\r\n")
        lines.append("\r\n")
        self._head = "".join(lines).encode("latin-1")
        # normally the first send_bytes carries the head; this writes it if none comes at once
        self.conn.loop.call_soon(self._flush_head)
        return StreamTransport(self)

    def _flush_head(self) -> None:
        head, self._head = self._head, b""
        t = self.conn.transport
        if head and t is not None and not self.conn.closed:
            t.write(head)

    def end_stream(self) -> None:
        self.state = _ENDED
        t = self.conn.transport
        if t is None or self.conn.closed:
            return
        head, self._head = self._head, b""
        if self.chunked and self.scope.method != "HEAD":
            t.write(head + _LAST_CHUNK)
        elif head:
            t.write(head)


class StreamTransport:
    """RSGI's stream transport. `send_bytes` returns once the bytes are in the socket's buffer
    and that buffer is below its high-water mark, so the sender runs at the client's pace."""

    __slots__ = ("_ex",)

    def __init__(self, ex: Exchange) -> None:
        self._ex = ex

    async def send_bytes(self, data: bytes) -> None:
        ex = self._ex
        conn = ex.conn
        t = conn.transport
        if conn.closed or t is None or ex.state != _STREAMING:
            raise ProtocolClosed(_CLOSED)
        if not data or ex.scope.method == "HEAD":
            return  # an empty chunk would end a chunked body
        head = ex._head
        if head:
            ex._head = b""
        if ex.chunked:
            t.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
        else:
            t.write(head + data if head else data)
        if conn.write_paused:
            await conn.drain()

    async def send_str(self, data: str) -> None:
        await self.send_bytes(data.encode())


def _response_head(status: int, headers: list[tuple[str, str]], length: int, close: bool) -> bytes:
    line = _STATUS.get(status) or f"HTTP/1.1 {status} Unknown\r\n"
    parts = [line, *[f"{k}: {v}\r\n" for k, v in headers]]
    if status not in _NO_BODY_STATUS:
        parts.append(f"content-length: {length}\r\n")
    parts.append("connection: close\r\n\r\n" if close else "\r\n")
    return "".join(parts).encode("latin-1")


def _error_headers(request_id: str) -> list[tuple[str, str]]:
    return [("content-type", "application/json"), ("x-request-id", request_id)]


def _too_large_head(cap: int) -> GatewayError:
    return GatewayError(Fault.HEADERS_TOO_LARGE, f"The request head is larger than {cap} bytes.")


def _addr(peer: Any) -> str:
    """RSGI's "ip:port" ("[ip]:port" for IPv6; "" for a Unix socket)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return ""
