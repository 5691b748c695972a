"""An in-loop gRPC transport: HTTP/2 (the pure-Python `h2` state machine) on an `asyncio.Protocol`.

The same narrow interface as `grpc_transport.GrpcioTransport`, without grpcio's threads: every
frame is read, parsed and handed to the waiting reader inside the worker's event loop, so a
streamed token costs one socket read and one future wake-up (see
benchmarks/results/2026-11-23-triton-stream.md for what grpc.aio's poller hand-offs cost).

One HTTP/2 connection per transport (every call multiplexes on it), opened lazily in the running
loop: prior knowledge for grpc://, TLS with ALPN "h2" for grpcs://. gRPC framing on top
(1-byte compressed flag + 4-byte big-endian length + message; status in the trailers or in a
Trailers-Only response). Deadlines are loop timers (RST_STREAM CANCEL + DEADLINE_EXCEEDED);
`cancel()` resets the stream. A lost connection or GOAWAY fails the calls it carried with
UNAVAILABLE; the next call reconnects, and after a failed connect, calls fail fast with
UNAVAILABLE until a capped backoff (100 ms doubling to 2 s, like the grpcio channel options in
triton_grpc.py) has passed.

Local flow-control windows are large (16 MiB, connection and streams) and received data is
acknowledged as soon as it is parsed, so `h2` sends a WINDOW_UPDATE only every 8 MiB. A consumer
that reads slower than the server writes is not pushed back (token streams are small; the
max message size bounds each message).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl as ssl_mod
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, cast
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import DataFrame as _DataFrame

from .grpc_transport import SERVICE, RpcError

#: Our receive windows (connection and per stream): big, so WINDOW_UPDATEs are rare.
_WINDOW: Final = 16 * 1024 * 1024
_MAX_FRAME: Final = 1024 * 1024
_DEFAULT_MAX_MESSAGE: Final = 4 * 1024 * 1024
_MIN_BACKOFF_S: Final = 0.1
_MAX_BACKOFF_S: Final = 2.0

_C = grpc.StatusCode
_BY_VALUE: Final = {c.value[0]: c for c in grpc.StatusCode}
#: The gRPC spec's HTTP -> gRPC status mapping (doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC: Final = {
    400: _C.INTERNAL,
    401: _C.UNAUTHENTICATED,
    403: _C.PERMISSION_DENIED,
    404: _C.UNIMPLEMENTED,
    429: _C.UNAVAILABLE,
    502: _C.UNAVAILABLE,
    503: _C.UNAVAILABLE,
    504: _C.UNAVAILABLE,
}
#: RST_STREAM error code -> gRPC status (the spec's "Errors" section).
_RST_TO_GRPC: Final = {
    h2.errors.ErrorCodes.REFUSED_STREAM: _C.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: _C.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: _C.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: _C.PERMISSION_DENIED,
}


def grpc_timeout(timeout_s: float) -> bytes:
    """The `grpc-timeout` header value (at most 8 digits, then a unit)."""
    ms = max(1, math.ceil(timeout_s * 1000))
    if ms < 100_000_000:
        return b"%dm" % ms
    return b"%dS" % min(math.ceil(timeout_s), 99_999_999)


def _split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gRPC target must be host:port, got {target!r}")
    return host.strip("[]"), int(port)


class _H2(h2.connection.H2Connection):
    """`h2`, tolerant of one grpc-core server quirk: after a deadline it may send Trailers-Only,
    RST_STREAM(NO_ERROR) and then the trailers again. `h2` calls a frame on a stream closed by
    END_STREAM a connection error (and would drop every call on the connection); grpc's own
    clients ignore it, so this drops just that frame."""

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        if type(frame) is _DataFrame:
            # the hot path, as `h2` does it minus its eager `repr(frame)` for the trace log
            # (a tenth of the per-token cost); DATA on a closed stream is handled in there
            frames, events = self._receive_data_frame(frame)
            self._prepare_for_sending(frames)
            return events
        try:
            return super()._receive_frame(frame)
        except h2.exceptions.StreamClosedError:
            sid = frame.stream_id
            if not (sid & 1 and sid <= self.highest_outbound_stream_id):
                raise
            return []


class _Call:
    """One RPC's state, shared by the connection (which fills it) and the caller's handle."""

    __slots__ = (
        "body",
        "buf",
        "conn",
        "deadline",
        "ended",
        "error",
        "headers",
        "loop",
        "max_message",
        "msgs",
        "need",
        "sid",
        "started",
        "timer",
        "waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        deadline: float,
    ) -> None:
        self.loop = loop
        self.headers = headers
        self.body = body
        self.deadline = deadline
        self.max_message = _DEFAULT_MAX_MESSAGE
        self.msgs: deque[bytes] = deque()
        self.buf = bytearray()
        self.need = 5  # bytes `buf` must hold before the next parse step can progress
        self.waiter: asyncio.Future[None] | None = None
        self.error: RpcError | None = None
        self.ended = False  # finished (clean end or error); no more events expected
        self.started = False
        self.sid = 0
        self.conn: _Connection | None = None
        self.timer: asyncio.TimerHandle | None = loop.call_at(deadline, self._expired)

    def over(self) -> bool:
        return self.ended

    # ---- filled by the connection -----------------------------------------------------------
    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def feed(self, data: bytes) -> None:
        """DATA payload -> complete gRPC messages (a message may span frames; a frame may hold
        several). Copies only what a message needs when it arrives whole."""
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self.need:
                return
            data = bytes(buf)
            buf.clear()
        n = len(data)
        pos = 0
        msgs = self.msgs
        while n - pos >= 5:
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if data[pos]:
                self.fail(_C.INTERNAL, "compressed gRPC message without a negotiated encoding", reset=True)
                return
            if length > self.max_message:
                self.fail(
                    _C.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({length} vs. {self.max_message})",
                    reset=True,
                )
                return
            end = pos + 5 + length
            if end > n:
                self.need = 5 + length
                break
            msgs.append(data[pos + 5 : end])
            pos = end
        else:
            self.need = 5
        if pos < n:
            buf += memoryview(data)[pos:]
        if msgs:
            self.wake()

    def finish(self, error: RpcError | None) -> None:
        """The call is over: OK (error None) or failed. Idempotent; the first outcome wins."""
        if self.ended:
            return
        self.ended = True
        if error is not None:
            self.error = error
        elif self.buf:
            self.error = RpcError(_C.INTERNAL, "the stream ended inside a gRPC message")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        if conn is not None:
            conn.release(self)
        self.wake()

    def fail(self, code: grpc.StatusCode, details: str, *, reset: bool, drop: bool = False) -> None:
        """End with an error; `reset`: tell the server (RST_STREAM CANCEL); `drop`: discard the
        messages not read yet (a local cancel or deadline, as grpcio does)."""
        if self.ended:
            return
        if drop:
            self.msgs.clear()
        conn = self.conn
        if reset and conn is not None and self.sid:
            conn.reset(self.sid)
        self.finish(RpcError(code, details))

    def _expired(self) -> None:
        self.timer = None
        self.fail(_C.DEADLINE_EXCEEDED, "Deadline Exceeded", reset=True, drop=True)


class H2Call:
    """The caller's handle on one streaming call (`grpc_transport.StreamCall`)."""

    __slots__ = ("_call", "_transport")

    def __init__(self, transport: H2Transport, call: _Call) -> None:
        self._transport = transport
        self._call = call

    async def read(self) -> bytes | None:
        call = self._call
        if not call.started:
            await self._transport._start(call)
        while True:
            if call.msgs:
                return call.msgs.popleft()
            err = call.error
            if err is not None:
                raise RpcError(err.code, err.details)
            if call.ended:
                return None
            fut = call.loop.create_future()
            call.waiter = fut
            try:
                await fut
            finally:
                call.waiter = None

    def cancel(self) -> None:
        self._call.fail(_C.CANCELLED, "Locally cancelled by application!", reset=True, drop=True)

    def __del__(self) -> None:
        # Abandoned without cancel() or reading to the end: free the server's slot.
        call = self._call
        if not call.ended:
            with contextlib.suppress(Exception):
                call.loop.call_soon(self.cancel)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection; the calls on it by stream id."""

    def __init__(self, owner: H2Transport) -> None:
        self.owner = owner
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = _H2(cfg)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        #: calls waiting for a stream slot (the peer's SETTINGS_MAX_CONCURRENT_STREAMS)
        self.queued: deque[asyncio.Future[None]] = deque()
        #: request bodies that did not fit the peer's flow-control window yet
        self.pending: dict[int, memoryview] = {}
        self.usable = True  # False after GOAWAY or loss: no new streams
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = self.h2
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME,
            },
        )
        conn.max_inbound_frame_size = _MAX_FRAME
        conn.initiate_connection()
        conn.increment_flow_control_window(_WINDOW - 65_535)
        self.transport.write(conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._abort(f"HTTP/2 protocol error: {exc}")
            return
        calls = self.calls
        ev: Any
        for ev in events:
            t = type(ev)
            if t is h2.events.DataReceived:
                sid = ev.stream_id
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                call = calls.get(sid)
                if call is not None and ev.data:
                    call.feed(ev.data)
            elif t is h2.events.ResponseReceived:
                call = calls.get(ev.stream_id)
                if call is not None:
                    self._headers(call, ev.headers, ev.stream_ended is not None)
            elif t is h2.events.TrailersReceived:
                call = calls.get(ev.stream_id)
                if call is not None:
                    self._trailers(call, ev.headers)
            elif t is h2.events.StreamEnded:
                call = calls.get(ev.stream_id)
                if call is not None:  # ended without trailers
                    call.finish(RpcError(_C.INTERNAL, "the server ended the stream without a gRPC status"))
            elif t is h2.events.StreamReset:
                call = calls.get(ev.stream_id)
                if call is not None:
                    code = _RST_TO_GRPC.get(ev.error_code, _C.INTERNAL)
                    call.finish(RpcError(code, f"Stream reset by the server: {ev.error_code!r}"))
            elif t is h2.events.WindowUpdated or t is h2.events.RemoteSettingsChanged:
                if self.pending:
                    self._send_pending()
                if t is h2.events.RemoteSettingsChanged:
                    self._admit()
            elif t is h2.events.ConnectionTerminated:
                self._goaway(ev)
        out = conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.usable = False
        self.owner._forget(self)
        detail = f"Socket closed: {exc}" if exc else "Socket closed"
        for call in list(self.calls.values()):
            call.conn = None
            call.finish(RpcError(_C.UNAVAILABLE, detail))
        self.calls.clear()
        self.pending.clear()
        while self.queued:
            fut = self.queued.popleft()
            if not fut.done():
                fut.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    # ---- events -------------------------------------------------------------------------------
    def _headers(self, call: _Call, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        status = 0
        grpc_status: bytes | None = None
        message = b""
        for k, v in headers:
            if k == b":status":
                status = int(v)
            elif k == b"grpc-status":
                grpc_status = v
            elif k == b"grpc-message":
                message = v
        if grpc_status is not None:  # Trailers-Only
            self._status(call, grpc_status, message)
        elif status != 200:
            code = _HTTP_TO_GRPC.get(status, _C.UNKNOWN)
            call.fail(code, f"Received http2 header with status: {status}", reset=not ended)
        # else: the messages follow

    def _trailers(self, call: _Call, headers: list[tuple[bytes, bytes]]) -> None:
        grpc_status: bytes | None = None
        message = b""
        for k, v in headers:
            if k == b"grpc-status":
                grpc_status = v
            elif k == b"grpc-message":
                message = v
        if grpc_status is None:
            call.finish(RpcError(_C.INTERNAL, "the server's trailers carry no grpc-status"))
        else:
            self._status(call, grpc_status, message)

    @staticmethod
    def _status(call: _Call, grpc_status: bytes, message: bytes) -> None:
        try:
            code = _BY_VALUE.get(int(grpc_status), _C.UNKNOWN)
        except ValueError:
            code = _C.UNKNOWN
        if code is _C.OK:
            call.finish(None)
        else:
            call.finish(RpcError(code, unquote(message.decode("utf-8", "replace"))))

    def _goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        """No new streams here; calls the server will not process fail now (all of them unless
        the GOAWAY is graceful); the others finish or fail when the socket closes."""
        self.usable = False
        self.owner._forget(self)
        last = ev.last_stream_id if ev.error_code == h2.errors.ErrorCodes.NO_ERROR else -1
        detail = f"GOAWAY from the server ({ev.error_code!r})"
        for sid, call in list(self.calls.items()):
            if last is None or sid > last:
                call.finish(RpcError(_C.UNAVAILABLE, detail))
        while self.queued:
            fut = self.queued.popleft()
            if not fut.done():
                fut.set_result(None)
        if not self.calls and self.transport is not None:
            self.transport.close()

    def _abort(self, detail: str) -> None:
        self.usable = False
        self.owner._forget(self)
        for call in list(self.calls.values()):
            call.finish(RpcError(_C.INTERNAL, detail))
        if self.transport is not None:
            self.transport.abort()

    # ---- streams ------------------------------------------------------------------------------
    def has_room(self) -> bool:
        return self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams

    async def wait_room(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queued.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    def _admit(self) -> None:
        room = self.h2.remote_settings.max_concurrent_streams - self.h2.open_outbound_streams
        while room > 0 and self.queued:
            fut = self.queued.popleft()
            if not fut.done():
                fut.set_result(None)
                room -= 1

    def open(self, call: _Call) -> None:
        conn = self.h2
        sid = conn.get_next_available_stream_id()
        call.sid = sid
        call.conn = self
        self.calls[sid] = call
        conn.send_headers(sid, call.headers)
        body = call.body
        call.body = b""
        call.headers = []
        if len(body) <= min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size):
            conn.send_data(sid, body, end_stream=True)
        else:
            self.pending[sid] = memoryview(body)
            self._send_pending()
        assert self.transport is not None
        self.transport.write(conn.data_to_send())

    def _send_pending(self) -> None:
        conn = self.h2
        for sid, view in list(self.pending.items()):
            try:
                while view:
                    room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if room <= 0:
                        break
                    chunk, view = view[:room], view[room:]
                    conn.send_data(sid, chunk.tobytes(), end_stream=not view)
            except h2.exceptions.StreamClosedError:
                view = memoryview(b"")
            if view:
                self.pending[sid] = view
            else:
                del self.pending[sid]

    def reset(self, sid: int) -> None:
        self.pending.pop(sid, None)
        if self.transport is None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self.transport.write(self.h2.data_to_send())

    def release(self, call: _Call) -> None:
        call.conn = None
        if self.calls.pop(call.sid, None) is not None:
            self.pending.pop(call.sid, None)
            if self.queued:
                # h2 counts a stream open until both sides closed it; admit on the next turn
                asyncio.get_running_loop().call_soon(self._admit)
            if not self.usable and not self.calls and self.transport is not None:
                self.transport.close()

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.transport.write(self.h2.data_to_send())
            self.transport.close()


class H2Transport:
    """gRPC over one in-loop HTTP/2 connection (`grpc_transport.Transport`)."""

    __slots__ = (
        "_backoff_s",
        "_conn",
        "_connecting",
        "_down_error",
        "_down_until",
        "_ssl",
        "authority",
        "host",
        "max_message_bytes",
        "port",
        "root_certificates",
        "target",
        "tls",
    )

    def __init__(
        self,
        target: str,
        *,
        tls: bool,
        root_certificates: bytes | None,
        options: Sequence[tuple[str, Any]] = (),
        max_message_bytes: int | None = None,
    ) -> None:
        """`options`: grpcio channel options; only `grpc.max_receive_message_length` is used
        (`max_message_bytes` wins when given)."""
        self.target = target
        self.host, self.port = _split_target(target)
        self.authority = target.encode()
        self.tls = tls
        self.root_certificates = root_certificates
        limit = dict(options).get("grpc.max_receive_message_length")
        if max_message_bytes is None:
            max_message_bytes = int(limit) if limit and int(limit) > 0 else _DEFAULT_MAX_MESSAGE
        self.max_message_bytes = max_message_bytes
        self._ssl: ssl_mod.SSLContext | None = None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._backoff_s = _MIN_BACKOFF_S
        self._down_until = 0.0
        self._down_error = ""

    # ---- calls --------------------------------------------------------------------------------
    def _new_call(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> _Call:
        loop = asyncio.get_running_loop()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if self.tls else b"http"),
            (b":path", (SERVICE + method).encode()),
            (b":authority", self.authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"fastpath-gateway"),
            (b"grpc-timeout", grpc_timeout(timeout_s)),
        ]
        for k, v in metadata:
            headers.append((k.lower().encode(), v.encode()))
        body = b"\x00" + len(request).to_bytes(4, "big") + request
        call = _Call(loop, headers, body, loop.time() + timeout_s)
        call.max_message = self.max_message_bytes
        conn = self._conn
        if conn is not None and conn.usable and conn.has_room():
            call.started = True
            conn.open(call)
        return call

    async def _start(self, call: _Call) -> None:
        call.started = True
        try:
            while not call.over():
                remaining = call.deadline - call.loop.time()
                if remaining <= 0:
                    call.fail(_C.DEADLINE_EXCEEDED, "Deadline Exceeded", reset=False)
                    return
                async with asyncio.timeout(remaining):
                    conn = await self._connection()
                if call.over():
                    return
                if conn.usable and conn.has_room():
                    conn.open(call)
                    return
                if conn.usable:
                    await conn.wait_room()
        except RpcError as exc:
            call.finish(exc)
        except TimeoutError:
            call.fail(_C.DEADLINE_EXCEEDED, "Deadline Exceeded", reset=False)
        except asyncio.CancelledError:
            call.fail(_C.CANCELLED, "Locally cancelled by application!", reset=False)
            raise

    async def unary(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> bytes:
        handle = H2Call(self, self._new_call(method, request, timeout_s, metadata))
        try:
            msg = await handle.read()
            if msg is None:
                raise RpcError(_C.INTERNAL, "the server sent no response message")
            if await handle.read() is not None:
                raise RpcError(_C.INTERNAL, "the server sent more than one response message")
            return msg
        finally:
            handle.cancel()  # a no-op once the call ended

    def stream(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> H2Call:
        return H2Call(self, self._new_call(method, request, timeout_s, metadata))

    # ---- the connection -----------------------------------------------------------------------
    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        loop = asyncio.get_running_loop()
        if self._connecting is None:
            if loop.time() < self._down_until:
                raise RpcError(_C.UNAVAILABLE, self._down_error)
            self._connecting = loop.create_future()
            task = loop.create_task(self._connect(self._connecting))
            # the outcome lives in the future; the task itself needs no awaiting
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return await asyncio.shield(self._connecting)

    async def _connect(self, result: asyncio.Future[_Connection]) -> None:
        loop = asyncio.get_running_loop()
        try:
            ssl_ctx: ssl_mod.SSLContext | None = None
            if self.tls:
                if self._ssl is None:
                    roots = self.root_certificates
                    ctx = ssl_mod.create_default_context(cadata=roots.decode() if roots else None)
                    ctx.set_alpn_protocols(["h2"])
                    self._ssl = ctx
                ssl_ctx = self._ssl
            _, conn = await loop.create_connection(
                lambda: _Connection(self),
                self.host,
                self.port,
                ssl=ssl_ctx,
                server_hostname=self.host if ssl_ctx is not None else None,
            )
            if ssl_ctx is not None and conn.transport is not None:
                sslobj = conn.transport.get_extra_info("ssl_object")
                alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
                if alpn not in (None, "h2"):
                    conn.transport.close()
                    raise OSError(f"the server negotiated {alpn!r}, not h2")
        except (OSError, ssl_mod.SSLError) as exc:
            self._connecting = None
            self._down_error = f"failed to connect to {self.target}: {exc}"
            self._down_until = loop.time() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)
            if not result.done():
                result.set_exception(RpcError(_C.UNAVAILABLE, self._down_error))
                result.exception()  # retrieved: nobody may be waiting any more
            return
        except BaseException as exc:
            self._connecting = None
            if not result.done():
                result.set_exception(RpcError(_C.UNAVAILABLE, f"connect to {self.target} failed: {exc!r}"))
                result.exception()
            raise
        self._connecting = None
        self._backoff_s = _MIN_BACKOFF_S
        self._conn = conn
        if not result.done():
            result.set_result(conn)

    def channel_state(self, now: float) -> str:
        """gRPC's connectivity state name of the channel, for `/metrics` (read off the request
        path; `now` on the loop's clock)."""
        conn = self._conn
        if conn is not None and conn.usable:
            return "ready"
        if self._connecting is not None:
            return "connecting"
        return "transient_failure" if now < self._down_until else "idle"

    def _forget(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            if conn.transport is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(conn.lost)
