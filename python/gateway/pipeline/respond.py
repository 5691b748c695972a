"""Stage `respond`: status, headers and body onto the RSGI protocol.

Every reply carries `x-request-id`; error replies are always OpenAI error JSON from the
taxonomy. Streams are unbuffered (`cache-control: no-cache`, `x-accel-buffering: no`).
"""

from __future__ import annotations

from typing import Any

from ..context import RequestContext
from ..errors import GatewayError

JSON = ("content-type", "application/json")
SSE_HEADERS = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
)


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
    headers = [JSON, ("x-request-id", request_id), *err.headers, *extra]
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
                ("x-request-id", ctx.request_id),
                server_timing(ctx),
                *ctx.ratelimit_headers,
                *ctx.reply_headers,
            ],
        )
    )
