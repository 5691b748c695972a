"""The Responses API over a WebSocket (OpenAI's WebSocket mode): `GET /v1/responses` upgraded,
then many responses, one after another, on the one connection.

The upgrade request is the credential: the auth stage's own check runs on its headers
(`Authorization: Bearer` or `x-api-key`) before the upgrade is accepted; a refusal is the HTTP
error JSON (401, ...) on the uvloop engine, the same status without a body on granian (RSGI cannot
answer an upgrade with a body). Each client message `{"type": "response.create", ...}` carries
a Responses create body (its `stream` and `background` are transport fields: ignored) and runs
through the whole pipeline as `POST /v1/responses` with `stream: true` and the upgrade's headers,
so auth, limits, guards, routing, the conversation store (`previous_response_id`), the ledger and
the observers apply per response, on the generation serving when the message arrives. Its
Responses stream events go out one per text message: the SSE `data:` payloads, byte for byte.

A refused response (bad body, 429, 404 of a previous response) is an `error` event,
`{"type": "error", "status": N, "error": {...}}` (OpenAI's error object), and the connection stays
open; a key no longer valid (401) closes it with 1008 after the event. A message sent while a
response runs waits for it (one is held; reading stops beyond it: OpenAI processes a connection's
responses sequentially). A client that closes mid-response cancels it (the upstream call is
aborted; status 499 to the observers). Limits: `responses.websocket.idle_timeout_ms` (no message
and no response running) and `max_connection_ms` (checked between responses) each end the
connection with an error event and close 1000; a message over `server.max_body_bytes` closes
with 1009 (the uvloop engine does it while the message arrives); an internal failure with 1011;
a stopping uvloop worker closes with 1001 once the response in flight is done (its engine's close
message says 1001). On granian the close frame carries no code (RSGI's `close(status)` there
sends none) and a stop does not announce itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
from granian.rsgi import ProtocolClosed  # type: ignore[attr-defined]

from .. import _fastpath
from ..context import Endpoint, RequestContext
from ..errors import JSON_ERRORS, Fault, GatewayError, json_error, quote
from . import respond
from .responses import RESPONSES

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("gateway.ws")

NORMAL, GOING_AWAY, POLICY, TOO_BIG, INTERNAL = 1000, 1001, 1008, 1009, 1011
_CLOSE = 0  # RSGI WebsocketMessage kinds (1: bytes, 2: str)
PATH = Endpoint.RESPONSES.value
_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode
#: fields of a create body that belong to HTTP, not to a socket's responses
_TRANSPORT_FIELDS = ("type", "stream", "background")


def error_event(err: GatewayError) -> str:
    return _event(err.status, err.body())


def _event(status: int, body: bytes) -> str:
    """`{"type":"error","status":N,"error":{...}}` from an error reply's `{"error":{...}}`."""
    return f'{{"type":"error","status":{status},{body[1:].decode()}'


def _refuse(protocol: Any, request_id: str, err: GatewayError) -> None:
    if hasattr(protocol, "response_bytes"):  # the uvloop engine's: the error JSON
        respond.send_error(protocol, request_id, err)
    else:  # granian's WebSocket protocol has no HTTP reply: the status, no body
        protocol.close(err.status)


class _Sink:
    """The RSGI HTTP protocol one response is served onto: its SSE stream becomes text
    messages; an error reply is kept, for the socket's error event."""

    __slots__ = ("_gone", "_many", "_rest", "_transport", "error")

    def __init__(self, transport: Any, gone: asyncio.Event) -> None:
        self._transport = transport
        #: the uvloop engine's `send_texts` (a read's events in one call); granian: None
        self._many = getattr(transport, "send_texts", None)
        self._gone = gone
        self._rest = b""
        self.error: tuple[int, bytes] | None = None

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.error = (status, body)

    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.error = (status, body.encode())

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _Sink:
        return self

    async def client_disconnect(self) -> None:
        await self._gone.wait()

    async def send_bytes(self, data: bytes) -> None:
        """SSE frames (`event: X\\ndata: {...}\\n\\n`, comments for pings) -> one text message
        per frame's data."""
        buf = self._rest + data if self._rest else data
        frames = buf.split(b"\n\n")
        self._rest = frames.pop()
        payloads = []
        for frame in frames:
            i = frame.find(b"data: ")
            if i >= 0:
                payloads.append(frame[i + 6 :])
        if not payloads:
            return
        if self._many is not None:
            await self._many(payloads)  # the translator's JSON: UTF-8 already
            return
        send = self._transport.send_str
        for payload in payloads:
            await send(payload.decode())

    async def send_str(self, data: str) -> None:
        await self.send_bytes(data.encode())


class ResponsesSocket:
    """One accepted connection: its messages in order, one response at a time."""

    def __init__(self, gw: Gateway, scope: Any, transport: Any, client: str) -> None:
        self.gw = gw
        self.headers = scope.headers
        self.transport = transport
        self.client = client
        w = gw.cfg.responses.websocket
        loop = gw._loop
        self.loop = loop
        self.idle_s = w.idle_timeout_ms / 1000
        self.deadline = loop.time() + w.max_connection_ms / 1000
        self.max_message = gw.cfg.server.max_body_bytes
        self.max_depth = gw.cfg.server.max_json_depth
        self.gone = asyncio.Event()

    async def run(self) -> int:
        """Serve until the client leaves or a limit ends it; the close code."""
        rx: asyncio.Task[Any] | None = None
        resp: asyncio.Task[int | None] | None = None
        held: Any = None
        try:
            while True:
                if held is None:
                    rx = rx or self.loop.create_task(self._receive())
                    left = self.deadline - self.loop.time()
                    done, _ = await asyncio.wait({rx}, timeout=max(0.0, min(self.idle_s, left)))
                    if not done:
                        return await self._limit(left <= self.idle_s)
                    msg, rx = rx.result(), None
                else:
                    msg, held = held, None
                if msg.kind == _CLOSE:
                    return NORMAL
                if self.loop.time() >= self.deadline:
                    return await self._limit(True)
                body = self._body(msg.data)
                if isinstance(body, GatewayError):
                    if body.fault is Fault.BODY_TOO_LARGE:
                        return TOO_BIG
                    await self.transport.send_str(error_event(body))
                    continue
                resp = self.loop.create_task(self._respond(body))
                rx = self.loop.create_task(self._receive())
                await asyncio.wait({resp, rx}, return_when=asyncio.FIRST_COMPLETED)
                if rx.done():
                    held, rx = rx.result(), None
                    if held.kind == _CLOSE and held.data != GOING_AWAY:  # (the server stopping
                        self.gone.set()  # lets it finish) the client left: the response is cancelled
                code = await resp
                if code is not None:
                    return code
        finally:
            for task in (rx, resp):
                if task is not None and not task.done():
                    task.cancel()

    async def _receive(self) -> Any:
        return await self.transport.receive()  # granian's is an awaitable, not a coroutine

    def _body(self, data: str | bytes | None) -> bytes | GatewayError:
        """A client event -> the create body to serve (`stream: true`), or why not."""
        raw = data.encode() if isinstance(data, str) else (data or b"")
        if len(raw) > self.max_message:
            return GatewayError(Fault.BODY_TOO_LARGE, f"A message is larger than {self.max_message} bytes.")
        depth = self.max_depth  # as decode checks a body: before the parser recurses
        if raw.count(b"[") + raw.count(b"{") > depth and _fastpath.json_depth_exceeds(raw, depth):
            return GatewayError(Fault.JSON_TOO_DEEP, f"The message is nested deeper than {depth} levels.")
        try:
            event = _decode(raw)
        except JSON_ERRORS as exc:
            return json_error(exc)
        if not isinstance(event, dict):
            return GatewayError(Fault.INVALID_JSON, "A message must be a JSON object (a client event).")
        kind = event.get("type")
        if kind != "response.create":
            return GatewayError(
                Fault.INVALID_REQUEST,
                f"Unknown client event type {quote(str(kind))!r}; send `response.create`.",
                param="type",
                code="unknown_event_type",
            )
        for name in _TRANSPORT_FIELDS:
            event.pop(name, None)
        event["stream"] = True
        return _encode(event)

    async def _respond(self, body: bytes) -> int | None:
        """One response through the pipeline; a close code when the connection must end."""
        gw = self.gw
        pipeline = gw.pipeline  # the generation serving now, to this response's end
        assert pipeline is not None
        start = time.perf_counter_ns()
        rid = gw._request_id(None)
        ctx = RequestContext(rid, Endpoint.RESPONSES, body, start, self.headers, self.client, RESPONSES)
        sink = _Sink(self.transport, self.gone)
        task = asyncio.current_task(self.loop)
        assert task is not None
        active = gw._active  # the generation's in-flight count (it closes once this drains)
        active[0] += 1
        metrics = pipeline.metrics  # the in-flight gauge, as app.py keeps it for HTTP
        if metrics is not None:
            metrics.v[metrics.inflight] += 1.0
        try:
            await pipeline.serve(ctx, sink, task)
        finally:
            active[0] -= 1
            if metrics is not None:
                metrics.v[metrics.inflight] -= 1.0
        if self.gone.is_set():
            return NORMAL
        if sink.error is not None:
            status, err_body = sink.error
            await self.transport.send_str(_event(status, err_body))
            if status == 401:  # the key was revoked or expired since the upgrade
                return POLICY
        return None

    async def _limit(self, total: bool) -> int:
        if total:
            err = GatewayError(
                Fault.INVALID_REQUEST,
                "The WebSocket connection reached its time limit; open a new one to continue.",
                code="websocket_connection_limit_reached",
            )
        else:
            err = GatewayError(
                Fault.REQUEST_TIMEOUT,
                f"No message for {self.idle_s:g} s: the WebSocket connection is closed.",
                code="websocket_idle_timeout",
            )
        await self.transport.send_str(error_event(err))
        return NORMAL


#: this worker process's open connections (one Gateway per worker process)
_open = [0]


async def serve(gw: Gateway, scope: Any, protocol: Any, request_id: str, client: str) -> None:
    """An upgrade request: checked and authenticated, then served until it closes."""
    pipeline = gw.pipeline
    try:
        cfg = gw.cfg.responses
        if scope.path != PATH or pipeline is None:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, f"Unknown WebSocket route: {quote(scope.path)}")
        if not (cfg.enabled and cfg.websocket.enabled):
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "The Responses WebSocket mode is off.")
        gw._check_headers(scope.headers)
        auth = next((s for s in pipeline.request_stages if s.name == "auth"), None)
        if auth is not None:
            await auth.authenticate(scope.headers)  # type: ignore[attr-defined]
        if _open[0] >= cfg.websocket.max_connections:
            raise GatewayError(
                Fault.RATE_LIMITED,
                f"Too many WebSocket connections on this gateway worker (at most "
                f"{cfg.websocket.max_connections}); retry later or use another connection.",
                code="websocket_connections_exceeded",
            )
    except GatewayError as err:
        log.info("websocket upgrade %s from %s refused: %s", request_id, client, err.message)
        _refuse(protocol, request_id, err)
        return
    _open[0] += 1  # counted before the accept's await: concurrent upgrades see it
    try:
        transport = await protocol.accept()
    except BaseException:
        _open[0] -= 1
        raise
    code = INTERNAL
    try:
        code = await ResponsesSocket(gw, scope, transport, client).run()
    except ProtocolClosed:
        code = NORMAL  # the client left: nothing more goes out
    except Exception:
        log.exception("websocket %s from %s failed", request_id, client)
    finally:
        _open[0] -= 1
        protocol.close(code)
