"""Stage `reframe`: upstream answers -> what the client gets, with `usage` always known.

Unary: the body passes through; if the upstream gave no `usage`, the fastpath counts it and
the gateway adds it. Streams: the Rust `ChatStreamReframer` re-frames each upstream read in one
call, records usage (stripping the usage chunk the gateway asked for if the client did not),
and the relay here adds keep-alive pings, deadlines, and always ends with `[DONE]` or an
explicit error event.
"""

from __future__ import annotations

import time
from typing import Any

from .. import _fastpath
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..schemas import Usage
from ..upstreams.httpclient import Connection, UpstreamProtocolError, UpstreamTimeout
from ..upstreams.openai_http import map_transport_error
from ..usage import counted_prompt_tokens
from . import respond

#: A client sending this request header gets, before `[DONE]`, an SSE comment with the stream's
#: timing as the gateway saw it (TTFT from request arrival, gaps between upstream reads), so a
#: benchmark can split model latency from gateway latency. Comments are ignored by SSE clients.
TIMING_HEADER = "x-fastpath-timing"


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


class StreamLimits:
    __slots__ = ("idle_s", "ping_s", "stream_deadline")

    def __init__(self, idle_s: float, ping_s: float, stream_deadline: float) -> None:
        self.idle_s = idle_s
        self.ping_s = ping_s
        self.stream_deadline = stream_deadline


class LiveBudget:
    """Live budget enforcement (`limits.live_budget_enforcement`): completion tokens counted on
    the stream against what the key's budget allows this stream (`Lease.stream_token_limit`).
    The stream ends after the upstream read that passes it (overshoot: at most that read).

    Cheap on the hot path: upstream bytes are an upper bound of the tokens they can carry, so
    the text is only counted (BPE, just the text that is new since the last count) once the
    count so far plus the bytes since could pass the limit."""

    __slots__ = ("counted", "encoding", "limit", "note", "offset", "unchecked")

    def __init__(self, limit: int, encoding: str, note: str) -> None:
        self.limit = limit
        self.encoding = encoding
        self.note = note
        self.counted = 0
        self.offset = 0
        self.unchecked = 0

    def over(self, reframer: _fastpath.ChatStreamReframer, nbytes: int) -> bool:
        self.unchecked += nbytes
        if self.counted + self.unchecked <= self.limit:
            return False
        text = reframer.completion_text
        new = text[self.offset :]
        # Count up to the last space (BPE words begin with their space, so counting piece by
        # piece then matches counting the whole); the rest waits for the next count.
        cut = new.rfind(" ")
        if cut <= 0:
            cut = len(new)
        if cut:
            self.counted += _fastpath.count_tokens(new[:cut], self.encoding)
            self.offset += cut
        self.unchecked = 4 * (len(new) - cut)  # UTF-8 bytes at most: at least as many as tokens
        return self.counted > self.limit

    def message(self) -> str:
        return (
            f"Budget exceeded: the stream was ended after {self.counted} completion tokens, the most "
            f"that the {self.note} allows."
        )


async def relay_stream(ctx: RequestContext, protocol: Any, conn: Connection, limits: StreamLimits) -> None:
    """Upstream SSE -> client SSE. Headers go out with the first upstream event, so an error
    the upstream reports before any content becomes a proper JSON error reply instead."""
    loop = conn.pool.loop  # not get_running_loop(): a getpid() syscall per call on CPython 3.11
    reframer = _fastpath.ChatStreamReframer(strip_usage=not ctx.client_wants_usage)
    t0 = time.perf_counter_ns()
    try:
        first = await conn.read(min(limits.stream_deadline, loop.time() + limits.idle_s), "first byte")
    except (UpstreamTimeout, UpstreamProtocolError) as exc:
        conn.abort()
        raise map_transport_error(exc) from None
    try:
        out = reframer.feed(first)
    except _fastpath.SseError as exc:
        conn.abort()
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The upstream stream is malformed: {exc}") from None
    if reframer.error is not None and reframer.events <= 1:
        conn.abort()
        raise GatewayError(Fault.UPSTREAM_ERROR, f"The upstream failed the stream: {reframer.error[:500]}")
    first_ns = time.perf_counter_ns()
    ctx.timings["ttfb"] = first_ns - t0
    writer = respond.start_stream(protocol, ctx)
    gaps = ReadGaps(loop.time())
    ended_ok = False
    lease = ctx.lease
    live: LiveBudget | None = None
    if lease is not None and lease.stream_token_limit is not None and ctx.route is not None:
        live = LiveBudget(lease.stream_token_limit, ctx.route.encoding, lease.budget_note)
    try:
        if out:
            await writer.send(out)
        if live is not None and live.over(reframer, len(first)):
            await _end_with_error(ctx, writer, Fault.RATE_LIMITED, live.message(), "budget_exceeded")
            return
        idle_deadline = loop.time() + limits.idle_s
        next_ping = loop.time() + limits.ping_s
        while first:
            deadline, phase = idle_deadline, "idle"
            if next_ping < deadline:
                deadline, phase = next_ping, "ping"
            if limits.stream_deadline < deadline:
                deadline, phase = limits.stream_deadline, "stream"
            try:
                data = await conn.read(deadline, phase)
            except UpstreamTimeout as exc:
                if exc.phase != "ping":
                    raise
                await writer.send(_fastpath.PING)
                next_ping = loop.time() + limits.ping_s
                continue
            if not data:
                break
            now = loop.time()
            gaps.add(now)
            idle_deadline = now + limits.idle_s
            next_ping = now + limits.ping_s
            out = reframer.feed(data)
            if out:
                await writer.send(out)
            if live is not None and live.over(reframer, len(data)):
                # The read that passed the budget went out (it is charged: the client gets what
                # it pays for), the upstream is closed, and what it produced is settled.
                await _end_with_error(ctx, writer, Fault.RATE_LIMITED, live.message(), "budget_exceeded")
                return
        tail = reframer.finish()
        if reframer.done:
            if ctx.client_wants_usage and reframer.usage is None:
                tail += reframer.usage_chunk(*_stream_usage(ctx, reframer))
            if ctx.headers.get(TIMING_HEADER) is not None:
                tail += gaps.comment((first_ns - ctx.start_ns) / 1e6)
            await writer.send(tail + _fastpath.DONE)
            ended_ok = True
        else:
            fault = Fault.UPSTREAM_BAD_RESPONSE
            msg = "The upstream ended the stream without [DONE]."
            await respond.end_stream_with_error(ctx, writer, msg, fault.type, fault.code, tail)
    except UpstreamTimeout as exc:
        fault = Fault.STREAM_TIMEOUT if exc.phase == "stream" else Fault.UPSTREAM_TIMEOUT
        msg = (
            "The stream exceeded its maximum duration."
            if exc.phase == "stream"
            else f"The upstream went silent mid-stream ({exc})."
        )
        await _end_with_error(ctx, writer, fault, msg)
    except (UpstreamProtocolError, _fastpath.SseError) as exc:
        await _end_with_error(ctx, writer, Fault.UPSTREAM_BAD_RESPONSE, f"The upstream stream broke: {exc}")
    finally:
        writer.close()
        if ended_ok:
            conn.release()
        else:
            conn.abort()
        _settle_stream_usage(ctx, reframer)


async def _end_with_error(
    ctx: RequestContext, writer: respond.StreamWriter, fault: Fault, message: str, code: str | None = None
) -> None:
    await respond.end_stream_with_error(ctx, writer, message, fault.type, code or fault.code)


def _stream_usage(ctx: RequestContext, reframer: _fastpath.ChatStreamReframer) -> tuple[int, int]:
    assert ctx.route is not None
    return counted_prompt_tokens(ctx), reframer.completion_tokens(ctx.route.encoding)


def _settle_stream_usage(ctx: RequestContext, reframer: _fastpath.ChatStreamReframer) -> None:
    """What this stream cost, also when it broke off: the upstream's numbers, else our counts."""
    usage = reframer.usage
    if usage is not None:
        ctx.usage = Usage(*usage)
    elif ctx.route is not None:
        prompt, completion = _stream_usage(ctx, reframer)
        ctx.usage = Usage(prompt, completion, prompt + completion)
