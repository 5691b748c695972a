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
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgspec

from .. import _fastpath
from ..errors import Fault, GatewayError
from ..timing import ReadGaps
from . import respond

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..routing.dispatch import Dispatch
    from ..schemas import Usage
    from ..upstreams.base import UpstreamCall

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

    def on_end(self, ctx: RequestContext) -> bytes:
        """The upstream stream ended well and `ctx.usage` is final: frames (or SSE comments) to
        send before `[DONE]` (b"": none)."""
        ...


class FrameFilter(Protocol):
    """A delta hook that also sees a stream's frames before they go out (an output guard that
    holds back and rewrites text, a tool-call assembler). Only hooks that have `rewrite` are
    filters: a stream without one sends the adapter's frames untouched, at no extra cost."""

    def rewrite(self, frames: bytes) -> bytes:
        """One read's frames -> the frames to send now (it may hold some back); raises
        `GatewayError` to end the stream instead (nothing of this read goes out)."""
        ...

    def drain(self) -> bytes:
        """The upstream ended well: what is still held (may raise `GatewayError`)."""
        ...


class EndCheck(Protocol):
    """A delta hook whose verdict on the stream is async (a classifier scoring windows of text
    off the stream's path): awaited once the upstream ended well, before the tail and `[DONE]`
    go out; an error ends the stream with it instead. Streams without one pay nothing."""

    async def check_end(self, call: UpstreamCall) -> GatewayError | None: ...


class BodyCheck(Protocol):
    """A response stage with an async verdict on a unary reply (after every `on_body`): raises
    `GatewayError` to answer with it instead."""

    async def check_body(self, ctx: RequestContext, body: bytes) -> None: ...


class RetryUpstream(Exception):
    """Raised by a response stage's `on_body` (unary) to have the relay call the upstream once
    more with `body` (a tool-call repair turn); the stage sees the new reply in `on_body` again
    and must not ask twice. Usage is the sum of both calls."""

    def __init__(self, body: bytes) -> None:
        super().__init__("retry upstream")
        self.body = body


class ResponseStage(Protocol):
    name: str

    def on_stream(self, ctx: RequestContext) -> DeltaHook | None:
        """A stream starts: this request's hook, or None when the stage has nothing to do for
        it (then it costs nothing per read)."""
        ...

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        """A unary reply body, before it is sent; may rewrite it or raise `GatewayError`."""
        ...


class _Live:
    """An open stream, for the keep-alive pings: its writer and when it last sent."""

    __slots__ = ("last", "writer")

    def __init__(self, writer: respond.StreamWriter, now: float) -> None:
        self.writer = writer
        self.last = now


class _Pings:
    """Keep-alive comments while upstreams are silent (long prefill, queueing): one timer per
    worker, not per stream, that every `ping_s / 2` pings each open stream that sent nothing for
    `ping_s` (so a silent stream gets a ping within 1.5 x `ping_s`). A timer, not a read deadline:
    cancelling a pending read is not safe on every transport (grpc.aio). Per stream it costs a
    set insertion and removal (a libuv timer per stream cost more)."""

    __slots__ = ("_handle", "_loop", "_ping_s", "_tasks", "live")

    def __init__(self, loop: asyncio.AbstractEventLoop, ping_s: float) -> None:
        self._loop = loop
        self._ping_s = ping_s
        self.live: set[_Live] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, writer: respond.StreamWriter) -> _Live:
        live = _Live(writer, self._loop.time())
        self.live.add(live)
        if self._handle is None:
            self._handle = self._loop.call_later(self._ping_s / 2, self._tick)
        return live

    def _tick(self) -> None:
        self._handle = None
        if not self.live:
            return
        now = self._loop.time()
        for live in self.live:
            if now - live.last >= self._ping_s:
                live.last = now
                task = self._loop.create_task(self._send(live.writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._handle = self._loop.call_later(self._ping_s / 2, self._tick)

    @staticmethod
    async def _send(writer: respond.StreamWriter) -> None:
        # The client went away: the relay notices on its next send.
        with contextlib.suppress(Exception):
            await writer.send(_fastpath.PING)


Settle = Callable[["RequestContext"], None]


class Relay:
    """Per worker: the stream limits of the config and the response stages, in reverse order."""

    __slots__ = ("_body_checks", "_dispatch", "_loop", "_pings", "_stages", "max_stream_s", "ping_s")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_stream_s: float,
        ping_s: float,
        stages: tuple[ResponseStage, ...],
        dispatch: Dispatch,
    ) -> None:
        self._loop = loop
        self.max_stream_s = max_stream_s
        self.ping_s = ping_s
        self._stages = stages
        self._body_checks = tuple(cast("BodyCheck", s) for s in stages if hasattr(s, "check_body"))
        self._pings = _Pings(loop, ping_s)
        self._dispatch = dispatch

    def run(self, ctx: RequestContext, protocol: Any, settle: Settle) -> Coroutine[Any, Any, None]:
        """The coroutine that answers the request (not itself a coroutine: one frame less on
        every resumption of a stream's reads)."""
        if ctx.stream:
            return self._stream(ctx, protocol, settle)
        dialect = ctx.dialect
        if dialect is not None and dialect.local:  # answered by the gateway (count_tokens)
            return dialect.answer(ctx, protocol, settle)
        return self._unary(ctx, protocol, settle)

    def _limits(self, ctx: RequestContext) -> tuple[float, float]:
        """The answering deployment's total deadline and idle timeout (a replayed call: ours)."""
        dep = ctx.deployment
        if dep is None or ctx.attempt_t0 == 0.0:
            return self._loop.time() + self.max_stream_s, self.max_stream_s
        adapter = dep.adapter
        return ctx.attempt_t0 + min(self.max_stream_s, adapter.total_timeout_s), adapter.idle_timeout_s

    async def _fetch(self, ctx: RequestContext) -> bytes:
        t0 = time.perf_counter_ns()
        call, _ = await self._dispatch.open(ctx)
        deadline, _ = self._limits(ctx)
        try:
            body = await call.body(deadline)
        except BaseException:
            call.abort()
            self._dispatch.finish(ctx, False)
            raise
        call.release()
        self._dispatch.finish(ctx, True)
        ctx.timings["upstream"] = ctx.timings.get("upstream", 0) + time.perf_counter_ns() - t0
        ctx.usage = call.usage()
        return body

    async def _unary(self, ctx: RequestContext, protocol: Any, settle: Settle) -> None:
        body = await self._fetch(ctx)
        try:
            for stage in self._stages:
                body = stage.on_body(ctx, body)
        except RetryUpstream as retry:
            first = ctx.usage
            ctx.body = ctx.upstream_body = retry.body
            ctx.body_parts = None
            body = await self._fetch(ctx)
            ctx.usage = _add_usage(first, ctx.usage)
            for stage in self._stages:
                body = stage.on_body(ctx, body)
        for check in self._body_checks:
            await check.check_body(ctx, body)
        if ctx.dialect is not None:  # the client's API's reply (Anthropic's `message`)
            body = await ctx.dialect.unary(ctx, body)
        settle(ctx)  # before the reply: its headers show the settled state
        ctx.timings["total"] = time.perf_counter_ns() - ctx.start_ns
        respond.send_json(protocol, ctx, 200, body)

    async def _stream(self, ctx: RequestContext, protocol: Any, settle: Settle) -> None:
        loop = self._loop
        t0 = time.perf_counter_ns()
        call, out = await self._dispatch.open(ctx)  # retries, fallbacks and hedges are in there
        first_ns = ctx.first_ns = time.perf_counter_ns()
        ctx.timings["ttfb"] = first_ns - t0
        deadline, idle_s = self._limits(ctx)
        try:
            hooks = [h for s in self._stages if (h := s.on_stream(ctx)) is not None]
            filters = [cast("FrameFilter", h) for h in hooks if hasattr(h, "rewrite")] if hooks else None
            # a client of another API (ctx.dialect): a writer that translates every send
            dialect = ctx.dialect
            if dialect is None:
                writer = respond.start_stream(protocol, ctx)
            else:
                writer = dialect.start_stream(protocol, ctx)
        except BaseException:
            call.abort()
            self._dispatch.finish(ctx, False)
            raise
        live = self._pings.add(writer)
        gaps = ctx.gaps = ReadGaps(loop.time())
        ended_ok = False
        try:
            while True:
                if out:
                    nbytes = len(out)  # before filters: an upper bound of the read's new text
                    if filters:
                        for f in filters:
                            out = f.rewrite(out)
                    if out:
                        await writer.send(out)
                        live.last = loop.time()
                    if hooks:
                        for hook in hooks:
                            err = hook.on_delta(call, nbytes)
                            if err is not None:
                                # what went out is charged: the client got it; the upstream stops
                                call.abort()
                                await _end_with_error(ctx, writer, err)
                                return
                idle_until = loop.time() + idle_s
                try:
                    step = await call.next(min(deadline, idle_until))
                except TimeoutError:
                    # which limit was the binding one (a timer may fire a hair before its time)
                    if deadline <= idle_until:
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
            if filters:
                for f in filters:
                    tail = f.rewrite(tail) + f.drain()
            if err is not None:
                await _end_with_error(ctx, writer, err, tail)
                return
            if hooks:
                for hook in hooks:
                    if hasattr(hook, "check_end"):
                        err = await cast("EndCheck", hook).check_end(call)
                        if err is not None:  # the held tail stays unsent
                            await _end_with_error(ctx, writer, err)
                            return
                ctx.usage = call.usage()
                for hook in hooks:
                    tail += hook.on_end(ctx)
            if ctx.headers.get(TIMING_HEADER) is not None:
                tail += gaps.comment((first_ns - ctx.start_ns) / 1e6)
            await writer.send(tail + _fastpath.DONE)
            ended_ok = True
        except GatewayError as err:
            await _end_with_error(ctx, writer, err)
        finally:
            self._pings.live.discard(live)
            writer.close()
            if ended_ok:
                call.release()
            else:
                call.abort()
            self._dispatch.finish(ctx, ended_ok)
            ctx.usage = call.usage()
            settle(ctx)


def _add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    """Both calls of a repaired reply are charged."""
    if a is None or b is None:
        return b or a
    return msgspec.structs.replace(
        b,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
    )


async def _end_with_error(
    ctx: RequestContext, writer: respond.StreamWriter, err: GatewayError, head: bytes = b""
) -> None:
    """End a started stream the only way a client can tell: `head` (frames still owed), an
    error event, then `[DONE]`. The code is kept on the context for the observers."""
    log.info("request %s: stream ended with error %s: %s", ctx.request_id, err.code, err.message)
    ctx.stream_error = err.code
    await writer.send(head + _fastpath.sse_error(err.message, err.fault.type, err.code) + _fastpath.DONE)
