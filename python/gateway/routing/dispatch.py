"""The dispatcher: between the `route` stage and the adapters, it makes the upstream attempts of
one request until one answers: picks a deployment (priority group, balancer, capacity, fair
queue), retries within the route's budget, falls back to other models by error class, and
hedges a slow first token. All of it happens before anything reached the client: it returns a
call whose head (unary) or first frames (stream) have arrived, and the relay takes it from there.

When the relay is done with the call it calls `finish`, which gives the deployment's slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from ..config_routing import ErrorClass
from ..errors import Fault, GatewayError
from .classify import BREAKER_FAILURES, classify, retry_after_s

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall
    from . import Route
    from .deployment import Deployment

log = logging.getLogger("gateway.routing")

#: what an attempt yields: the call, its first frames (streams), the deployment, the start time
Attempt = tuple["UpstreamCall", bytes, "Deployment", float]


def _no_deployment(route: Route) -> GatewayError:
    return GatewayError(
        Fault.UPSTREAM_UNAVAILABLE,
        f"No deployment of the model `{route.name}` is available (all ejected or unhealthy).",
        headers=(("retry-after", "1"),),
    )


class Dispatch:
    """Per worker. Stateless itself: the state is on the routes and their deployments."""

    __slots__ = ("_loop", "_rand", "max_stream_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, max_stream_s: float) -> None:
        self._loop = loop
        self.max_stream_s = max_stream_s
        self._rand = random.Random()

    async def open(self, ctx: RequestContext) -> tuple[UpstreamCall, bytes]:
        """An answering call and, for a stream, its first frames. Raises `GatewayError`."""
        route = ctx.route
        assert route is not None
        cache = route.cache
        try:
            if cache is not None and cache.wanted(ctx):
                try:
                    return await cache.open(ctx, lambda: self._attempts(ctx, route))
                finally:
                    _count(route, f"cache_{ctx.cache}")
            return await self._attempts(ctx, route)
        finally:
            _note(ctx)

    def finish(self, ctx: RequestContext, ok: bool) -> None:
        """The relay is done with the call (once, any outcome): the slot is free again."""
        dep = ctx.deployment
        t0 = ctx.attempt_t0
        if dep is None or t0 == 0.0:
            return
        ctx.attempt_t0 = 0.0
        dep.outstanding -= 1
        if ok and not ctx.stream:
            dep.latency.add(self._loop.time() - t0)
        owner = dep.owner
        if owner is not None and owner.queue is not None:
            owner.queue.wake()

    # ---- the attempt loop ------------------------------------------------------------------
    async def _attempts(self, ctx: RequestContext, route: Route) -> tuple[UpstreamCall, bytes]:
        loop = self._loop
        now = loop.time()
        route.budget.request(now)
        tried: list[Deployment] = []
        current = route
        visited = [route]
        per_route = 0
        last: GatewayError | None = None
        while True:
            dep = await self._pick(ctx, current, tried, now)
            cls = ErrorClass.CONNECT
            if dep is not None:
                per_route += 1
                try:
                    if ctx.stream and current.hedge.enabled:
                        call, first, dep, t0 = await self._hedged(ctx, current, dep, tried)
                    else:
                        ctx.attempts += 1
                        call, first, dep, t0 = await self._attempt(ctx, current, dep)
                except GatewayError as err:
                    last = err
                    cls = classify(err)
                    tried.append(dep)
                    ctx.deployment = dep  # who failed last, for the reply header and the ledger
                    now = loop.time()
                    log.info(
                        "request %s: attempt %d on %s failed (%s): %s",
                        ctx.request_id, ctx.attempts, dep.name, cls.value, err.message,
                    )  # fmt: skip
                    wait = self._retry_wait(current, cls, err, per_route, tried)
                    if wait is not None and route.budget.try_retry(now):
                        _count(route, "retry")
                        if wait > 0:
                            await asyncio.sleep(wait)
                            now = loop.time()
                        continue
                else:
                    ctx.deployment = dep
                    ctx.attempt_t0 = t0
                    return call, first
            elif last is None:
                last = _no_deployment(current)
            nxt = _fallback(route, cls, visited)
            if nxt is None:
                raise last
            log.info(
                "request %s: falling back from %s to %s (%s)",
                ctx.request_id,
                current.name,
                nxt.name,
                cls.value,
            )
            _count(route, "fallback")
            current = nxt
            visited.append(nxt)
            per_route = 0

    def _retry_wait(
        self, route: Route, cls: ErrorClass, err: GatewayError, done: int, tried: list[Deployment]
    ) -> float | None:
        """Seconds to wait before the next attempt on `route`; None: no retry there."""
        r = route.retry
        if cls not in r.errors or done >= r.max_attempts:
            return None
        cap = min(r.max_backoff_ms, r.backoff_ms * (1 << min(done - 1, 16))) / 1000
        wait = self._rand.uniform(0, cap)  # full jitter
        after = retry_after_s(err) if cls is ErrorClass.RATE_LIMITED else None
        if after is not None and all(d in tried for d in route.deployments):
            # only deployments that asked to wait are left: honour it, or give up on this route
            if after * 1000 > r.max_retry_after_ms:
                return None
            wait = max(wait, after)
        return wait

    async def _pick(
        self, ctx: RequestContext, route: Route, tried: list[Deployment], now: float
    ) -> Deployment | None:
        """A deployment for the next attempt: the first priority group with an untried usable
        one that has room; else a tried one (a retry on the same deployment). Every usable one
        full: wait in the route's fair queue. None: nothing usable at all."""
        balancer = route.balancer
        assert balancer is not None
        queue = route.queue
        woken = False
        while True:
            groups = route.usable(now)
            if not tried and not route.capped:  # the common case: no filtering at all
                for g in groups:
                    if g:
                        dep = balancer.pick(ctx, g)
                        dep.breaker.on_pick(now)
                        return dep
                return None
            if queue is not None and not woken and len(queue):
                # others wait for a slot: a newcomer queues behind them (else it would take
                # the slot that was freed for the one the queue woke)
                await queue.wait(ctx, now + self.max_stream_s)
                woken = True
                now = self._loop.time()
                continue
            room = False
            for exclude in (True, False) if tried else (False,):
                for g in groups:
                    cands = [d for d in g if not d.full() and not (exclude and d in tried)]
                    if cands:
                        dep = balancer.pick(ctx, cands)
                        dep.breaker.on_pick(now)
                        return dep
                    room = room or any(g)
            if not room:
                return None
            if queue is None:
                raise GatewayError(
                    Fault.UPSTREAM_CAPACITY,
                    f"Every deployment of the model `{route.name}` is at its concurrency limit.",
                    headers=(("retry-after", "1"),),
                )
            await queue.wait(ctx, now + self.max_stream_s)
            woken = True
            now = self._loop.time()

    async def _attempt(self, ctx: RequestContext, route: Route, dep: Deployment) -> Attempt:
        """One upstream attempt up to its head (unary) or first frames (stream)."""
        loop = self._loop
        adapter = dep.adapter
        t0 = loop.time()
        deadline = t0 + adapter.total_timeout_s
        dep.outstanding += 1
        call: UpstreamCall | None = None
        try:
            call = await adapter.start(ctx, dep, body_for(ctx, dep), deadline)
            first = b""
            if ctx.stream:
                first = await call.first(
                    min(deadline, t0 + self.max_stream_s, t0 + adapter.first_byte_timeout_s)
                )
        except BaseException as exc:
            dep.outstanding -= 1
            if route.queue is not None:
                route.queue.wake()
            if call is not None:
                call.abort()
            if isinstance(exc, GatewayError):
                dep.breaker.record(classify(exc) not in BREAKER_FAILURES, loop.time())
            else:  # cancelled (client gone, hedge lost): says nothing about the deployment
                dep.breaker.cancel(loop.time())
            raise
        now = loop.time()
        dep.breaker.record(True, now)
        if ctx.stream:
            dep.ttft.add(now - t0)
        return call, first, dep, t0

    async def _hedged(
        self, ctx: RequestContext, route: Route, dep: Deployment, tried: list[Deployment]
    ) -> Attempt:
        """No first token after the deployment's TTFT quantile: a second attempt elsewhere;
        the first to produce a token wins and the other is cancelled."""
        h = route.hedge
        stats = dep.ttft
        delay = stats.quantile(h.quantile) if stats.count >= h.min_samples else h.after_ms / 1000
        ctx.attempts += 1
        if delay <= 0:
            return await self._attempt(ctx, route, dep)
        loop = self._loop
        pending = {loop.create_task(self._attempt(ctx, route, dep))}
        hedges = 0
        errors: list[BaseException] = []
        try:
            while pending:
                timeout = delay if hedges < h.max_hedges else None
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    now = loop.time()
                    busy = [*tried, dep]
                    other = (
                        await self._pick(ctx, route, busy, now)
                        if len(busy) < len(route.deployments)
                        else None
                    )
                    hedges += 1
                    if other is None or other in busy or not route.budget.try_retry(now):
                        continue
                    log.info(
                        "request %s: hedging %s with %s after %.0f ms",
                        ctx.request_id,
                        dep.name,
                        other.name,
                        delay * 1000,
                    )
                    ctx.attempts += 1
                    _count(route, "hedge")
                    tried.append(other)
                    pending.add(loop.create_task(self._attempt(ctx, route, other)))
                    continue
                winner: Attempt | None = None
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        errors.append(exc)
                    elif winner is None:
                        winner = task.result()
                    else:  # two finished at once: the later one loses
                        _drop(route, task.result())
                if winner is not None:
                    return winner
            raise errors[0]
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
                # it answered before it could be cancelled (this request itself was cancelled
                # while waiting): nobody takes it, so give its slot and connection back
                if not task.cancelled() and task.exception() is None:
                    _drop(route, task.result())


def _count(route: Route, event: str) -> None:
    events = route.events
    events[event] = events.get(event, 0) + 1


def _drop(route: Route, attempt: Attempt) -> None:
    call, _, dep, _ = attempt
    call.abort()
    dep.outstanding -= 1
    if route.queue is not None:
        route.queue.wake()


def _fallback(route: Route, cls: ErrorClass, visited: list[Route]) -> Route | None:
    """The next model of the first fallback rule of `route` matching `cls`."""
    for on, targets in route.fallbacks:
        if cls in on:
            for target in targets:
                if target not in visited:
                    return target
    return None


def _note(ctx: RequestContext) -> None:
    """Who answered and how: `x-fastpath-route` and `x-fastpath-cache` on every reply."""
    dep = ctx.deployment
    headers = ctx.reply_headers
    if dep is not None or ctx.attempts:
        who = dep.name if dep is not None else "none"
        headers += (("x-fastpath-route", f"{who}; attempts={ctx.attempts}"),)
    if ctx.cache is not None:
        headers += (("x-fastpath-cache", ctx.cache),)
    ctx.reply_headers = headers


def body_for(ctx: RequestContext, dep: Deployment) -> bytes:
    """The upstream body for `dep`: the route stage's bytes when they name its model, else the
    stage's template with its model spliced in (made on first need; reused by every retry)."""
    parts = ctx.body_parts
    if parts is None:
        if dep.upstream_model_json == ctx.body_model:
            return ctx.upstream_body
        from ..upstream_body import split_template

        parts = ctx.body_parts = split_template(ctx.upstream_body)
    return parts[0] + dep.upstream_model_json + parts[1]
