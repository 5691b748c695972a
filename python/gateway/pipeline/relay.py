"""The relay: the one response side, for every adapter, streamed and unary.

It owns what every upstream kind shares: the first-byte, idle and max-stream deadlines, one
keep-alive ping timer, the response stages (reverse order: a delta hook per streamed read, a
body hook per unary reply), the `x-fastpath-timing` comment, `[DONE]` or the error event, and
settlement (once, on every exit path). Before the first frame nothing is sent: an upstream
failure there is a `GatewayError` for the pipeline to answer as JSON. After it, the stream always
ends with `[DONE]` or an error event then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .. import _fastpath
from ..errors import Fault, GatewayError
from . import respond

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import Adapter, UpstreamCall

log = logging.getLogger("gateway.relay")

#: A client sending this request header gets, before `[DONE]`, an SSE comment with the stream's
#: timing as the gateway saw it (TTFT from request arrival, gaps between upstream reads), so a
#: benchmark can split model latency from gateway latency. Comments are ignored by SSE clients.
TIMING_HEADER = "x-fastpath-timing"


class DeltaHook(Protocol):
    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        """After a read's frames went out (`nbytes` of them: an upper bound of the new text's
        tokens). An error ends the stream with it; the call is aborted."""
        ...


class ResponseStage(Protocol):
    name: str

    def on_stream(self, ctx: RequestContext) -> DeltaHook | None:
        """A stream starts: this request's hook, or None when the stage has nothing to do for
        it (then it costs nothing per read)."""
        ...

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        """A unary reply body, before it is sent; may rewrite it or raise `GatewayError`."""
        ...


class ReadGaps:
    """Gaps between upstream reads (the inter-token latency as the gateway sees it)."""

    __slots__ = ("count", "last", "max", "total")

    def __init__(self, start: float) -> None:
        self.last = start
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, now: float) -> None:
        gap = now - self.last
        self.last = now
        self.count += 1
        self.total += gap
        if gap > self.max:
            self.max = gap

    def comment(self, ttft_ms: float) -> bytes:
        mean = self.total / self.count * 1e3 if self.count else 0.0
        return (
            f": server-timing ttft;dur={ttft_ms:.3f}, gap-mean;dur={mean:.3f}, "
            f'gap-max;dur={self.max * 1e3:.3f}, reads;desc="{self.count + 1}"\n\n'
        ).encode()


class _Pinger:
    """Keep-alive comments while the upstream is silent (long prefill, queueing): one timer per
    stream, firing every `ping_s`, that pings only if nothing was sent meanwhile. A timer, not a
    read deadline: cancelling a pending read is not safe on every transport (grpc.aio)."""

    __slots__ = ("_handle", "_loop", "_ping_s", "_tasks", "_writer", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: respond.StreamWriter, ping_s: float) -> None:
        self._loop = loop
        self._writer = writer
        self._ping_s = ping_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self.last + ping_s, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        due = self.last + self._ping_s
        if now >= due:
            task = self._loop.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.last = now
            due = now + self._ping_s
        self._handle = self._loop.call_at(due, self._tick)

    async def _send(self) -> None:
        # The client went away: the relay notices on its next send.
        with contextlib.suppress(Exception):
            await self._writer.send(_fastpath.PING)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


Settle = Callable[["RequestContext"], None]


class Relay:
    """Per worker: the stream limits of the config and the response stages, in reverse order."""

    __slots__ = ("_loop", "_stages", "max_stream_s", "ping_s")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_stream_s: float,
        ping_s: float,
        stages: tuple[ResponseStage, ...],
    ) -> None:
        self._loop = loop
        self.max_stream_s = max_stream_s
        self.ping_s = ping_s
        self._stages = stages

    async def run(self, ctx: RequestContext, adapter: Adapter, protocol: Any, settle: Settle) -> None:
        now = self._loop.time()
        if ctx.stream:
            deadline = now + min(self.max_stream_s, adapter.total_timeout_s)
            call = await adapter.start(ctx, deadline)
            await self._stream(ctx, adapter, call, protocol, deadline, settle)
        else:
            deadline = now + adapter.total_timeout_s
            call = await adapter.start(ctx, deadline)
            await self._unary(ctx, call, protocol, deadline, settle)

    async def _unary(
        self, ctx: RequestContext, call: UpstreamCall, protocol: Any, deadline: float, settle: Settle
    ) -> None:
        t0 = time.perf_counter_ns()
        try:
            body = await call.body(deadline)
        except BaseException:
            call.abort()
            raise
        call.release()
        ctx.timings["upstream"] = time.perf_counter_ns() - t0
        ctx.usage = call.usage()
        for stage in self._stages:
            body = stage.on_body(ctx, body)
        settle(ctx)  # before the reply: its headers show the settled state
        ctx.timings["total"] = time.perf_counter_ns() - ctx.start_ns
        respond.send_json(protocol, ctx, 200, body)

    async def _stream(
        self,
        ctx: RequestContext,
        adapter: Adapter,
        call: UpstreamCall,
        protocol: Any,
        deadline: float,
        settle: Settle,
    ) -> None:
        loop = self._loop
        t0 = time.perf_counter_ns()
        try:
            out = await call.first(min(deadline, loop.time() + adapter.first_byte_timeout_s))
        except BaseException:
            call.abort()
            raise
        first_ns = time.perf_counter_ns()
        ctx.timings["ttfb"] = first_ns - t0
        hooks = [h for s in self._stages if (h := s.on_stream(ctx)) is not None]
        writer = respond.start_stream(protocol, ctx)
        pinger = _Pinger(loop, writer, self.ping_s)
        gaps = ReadGaps(loop.time())
        idle_s = adapter.idle_timeout_s
        ended_ok = False
        try:
            while True:
                if out:
                    await writer.send(out)
                    pinger.last = loop.time()
                    if hooks:
                        for hook in hooks:
                            err = hook.on_delta(call, len(out))
                            if err is not None:
                                # what went out is charged: the client got it; the upstream stops
                                call.abort()
                                await _end_with_error(ctx, writer, err)
                                return
                try:
                    step = await call.next(min(deadline, loop.time() + idle_s))
                except TimeoutError:
                    if loop.time() >= deadline:
                        err = GatewayError(Fault.STREAM_TIMEOUT, "The stream exceeded its maximum duration.")
                    else:
                        err = GatewayError(Fault.UPSTREAM_TIMEOUT, "The upstream went silent mid-stream.")
                    await _end_with_error(ctx, writer, err)
                    return
                if step is None:
                    break
                out = step
                gaps.add(loop.time())
            tail, err = call.finish()
            if err is not None:
                await _end_with_error(ctx, writer, err, tail)
                return
            if ctx.headers.get(TIMING_HEADER) is not None:
                tail += gaps.comment((first_ns - ctx.start_ns) / 1e6)
            await writer.send(tail + _fastpath.DONE)
            ended_ok = True
        except GatewayError as err:
            await _end_with_error(ctx, writer, err)
        finally:
            pinger.stop()
            writer.close()
            if ended_ok:
                call.release()
            else:
                call.abort()
            ctx.usage = call.usage()
            settle(ctx)


async def _end_with_error(
    ctx: RequestContext, writer: respond.StreamWriter, err: GatewayError, head: bytes = b""
) -> None:
    """End a started stream the only way a client can tell: `head` (frames still owed), an
    error event, then `[DONE]`. The code is kept on the context for the observers."""
    log.info("request %s: stream ended with error %s: %s", ctx.request_id, err.code, err.message)
    ctx.stream_error = err.code
    await writer.send(head + _fastpath.sse_error(err.message, err.fault.type, err.code) + _fastpath.DONE)
