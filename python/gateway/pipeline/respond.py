"""Stage `respond`: status, headers and body onto the RSGI protocol.

Every reply carries `x-request-id` and the security headers (`EDGE`, set once per worker by
`configure`); error replies are always OpenAI error JSON from the taxonomy. Streams are
unbuffered (`cache-control: no-cache`, `x-accel-buffering: no`).
"""

from __future__ import annotations

from typing import Any

from ..config import ServerConfig
from ..context import RequestContext
from ..edge import security_headers
from ..errors import GatewayError

JSON = ("content-type", "application/json")
SSE_HEADERS = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
)
#: The security response headers (`server.security_headers`), one tuple spliced into every reply.
EDGE: tuple[tuple[str, str], ...] = ()


def configure(server: ServerConfig) -> None:
    """Once per worker process (one Gateway per process): the headers every reply carries."""
    global EDGE
    EDGE = security_headers(server)


def head(request_id: str, ctype: tuple[str, str] = JSON) -> list[tuple[str, str]]:
    """The headers of a plain reply (models, health, admin routes)."""
    return [ctype, *EDGE, ("x-request-id", request_id)]


def server_timing(ctx: RequestContext) -> tuple[str, str]:
    parts = [f"{k};dur={v / 1e6:.3f}" for k, v in ctx.timings.items()]
    if ctx.attempts > 1:  # retried, failed over or hedged: how many upstream attempts it took
        parts.append(f'attempts;desc="{ctx.attempts}"')
    return ("server-timing", ", ".join(parts))


def send_json(protocol: Any, ctx: RequestContext, status: int, body: bytes) -> None:
    ctx.status = status
    protocol.response_bytes(
        status,
        [
            JSON,
            *EDGE,
            ("x-request-id", ctx.request_id),
            server_timing(ctx),
            *ctx.ratelimit_headers,
            *ctx.reply_headers,
        ],
        body,
    )


def send_error(
    protocol: Any, request_id: str, err: GatewayError, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    """`extra`: the request's own reply headers (`x-ratelimit-*`, guard decisions), once the
    stages that set them have run."""
    headers = [JSON, *EDGE, ("x-request-id", request_id), *err.headers, *extra]
    protocol.response_bytes(err.status, headers, err.body())


class StreamWriter:
    """Owns the RSGI stream transport and drops it explicitly on close().

    granian ends a streamed HTTP response when the transport object is freed. An exception's
    traceback cycle (asyncio futures make them) can keep a frame that references it alive
    until the next GC pass, leaving the client waiting for the final chunk; so no frame holds
    the transport itself, only this writer, and the pipeline closes it when the stream ends."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    async def send(self, data: bytes) -> None:
        if self._transport is not None:
            await self._transport.send_bytes(data)

    def close(self) -> None:
        self._transport = None


def start_stream(protocol: Any, ctx: RequestContext) -> StreamWriter:
    ctx.status = 200
    return StreamWriter(
        protocol.response_stream(
            200,
            [
                *SSE_HEADERS,
                *EDGE,
                ("x-request-id", ctx.request_id),
                server_timing(ctx),
                *ctx.ratelimit_headers,
                *ctx.reply_headers,
            ],
        )
    )
