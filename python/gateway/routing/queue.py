"""Fair queuing for capped routes (issue 13 item 9): when every deployment is at its
`max_concurrent`, a request waits for a freed slot instead of getting a blind 429.

Order: the highest `ctx.priority` (the tier's) first; within one priority, start-time fair
queuing (SFQ, Goyal et al.) across teams with weight `team_weights.get(team, 1)`; FIFO within a
team. Each waiter gets a virtual start tag `S = max(V, F_team)` and its team's finish tag moves
to `S + 1 / weight`; `V` is the start tag last served. A team that sends 10x the load of another
therefore gets its weighted share of the freed slots, not 10x, while an idle team's tag
catches up with `V` (no credit hoarded while idle).

A woken waiter may find no slot (a request that was not queued took it first): the dispatcher
then calls `wait()` again for the same context before awaiting anything else, and the queue
hands it back its old place (its tag, its arrival order and its original time limit) rather
than a new one at the back. `wake()` and any other `wait()` forget that remembered place.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import TYPE_CHECKING

from ..errors import Fault, GatewayError

if TYPE_CHECKING:
    from ..config_routing import QueueConfig
    from ..context import RequestContext

_RETRY_AFTER = (("retry-after", "1"),)

_QUEUED, _WOKEN, _GONE = 0, 1, 2


class _Waiter:
    __slots__ = ("ctx", "fut", "key", "state", "until")

    def __init__(self, ctx: RequestContext, key: tuple[int, float, int], until: float) -> None:
        self.ctx = ctx
        #: heap order: (-priority, virtual start tag, arrival number)
        self.key = key
        self.until = until
        self.state = _QUEUED
        self.fut: asyncio.Future[None] | None = None

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


class FairQueue:
    """Per worker, per route. Single-threaded (the worker's loop): no locks."""

    __slots__ = (
        "_finish",
        "_heap",
        "_loop",
        "_max_queued",
        "_max_wait_s",
        "_queued",
        "_rewait",
        "_seq",
        "_vtime",
        "_weights",
    )

    def __init__(self, cfg: QueueConfig, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._max_wait_s = cfg.max_wait_ms / 1000
        self._max_queued = cfg.max_queued
        self._weights = cfg.team_weights
        #: live waiters; the heap also holds cancelled / expired ones until popped (lazy removal)
        self._queued = 0
        self._heap: list[_Waiter] = []
        self._seq = 0
        #: per priority: the virtual time (start tag last served)
        self._vtime: dict[int, float] = {}
        #: per (priority, team): the finish tag of the team's last queued request
        self._finish: dict[tuple[int, str], float] = {}
        #: the waiter last woken, until it either queues again (keeping its place) or is forgotten
        self._rewait: _Waiter | None = None

    def __len__(self) -> int:
        return self._queued

    def _refuse(self, why: str) -> GatewayError:
        return GatewayError(Fault.UPSTREAM_CAPACITY, why, headers=_RETRY_AFTER)

    def _enqueue(self, ctx: RequestContext, until: float) -> _Waiter:
        priority = ctx.priority
        principal = ctx.principal
        team = "" if principal is None else principal.team
        start = self._vtime.get(priority, 0.0)
        last = self._finish.get((priority, team))
        if last is not None and last > start:
            start = last
        self._finish[priority, team] = start + 1.0 / self._weights.get(team, 1)
        self._seq += 1
        return _Waiter(ctx, (-priority, start, self._seq), until)

    async def wait(self, ctx: RequestContext, deadline: float) -> None:
        """Wait until `wake()` picks this request, or raise 429 `upstream_capacity` (no queue,
        queue full, or `min(deadline, now + max_wait)` passed on the loop's clock). Called again
        right after a wake that found no slot, the request keeps its place."""
        now = self._loop.time()
        w = self._rewait
        self._rewait = None
        if w is not None and w.ctx is ctx:
            # its old place: the tag it was served at (the virtual time then, unless the
            # clocks started over since) and its arrival number
            prio, start, seq = w.key
            w.key = (prio, min(start, self._vtime.get(-prio, 0.0)), seq)
        else:
            if self._max_wait_s == 0:
                raise self._refuse("Every deployment of this model is at capacity.")
            if self._queued >= self._max_queued:
                raise self._refuse("Every deployment of this model is at capacity and its queue is full.")
            until = min(deadline, now + self._max_wait_s)
            if until <= now:
                raise self._refuse("No deployment of this model had capacity in time.")
            w = self._enqueue(ctx, until)
        if w.until <= now:
            raise self._refuse("No deployment of this model had capacity in time.")
        fut: asyncio.Future[None] = self._loop.create_future()
        w.fut = fut
        w.state = _QUEUED
        heapq.heappush(self._heap, w)
        self._queued += 1
        timer = self._loop.call_at(w.until, self._expire, w)
        t0 = time.perf_counter_ns()
        try:
            await fut
        except asyncio.CancelledError:
            if w.state == _WOKEN:
                self.wake()  # the freed slot was ours: pass it on
            elif w.state == _QUEUED:
                self._remove(w)
            raise
        finally:
            timer.cancel()
            ctx.timings["queue"] = ctx.timings.get("queue", 0) + time.perf_counter_ns() - t0
        if w.state != _WOKEN:
            raise self._refuse("No deployment of this model had capacity in time.")
        self._rewait = w

    def wake(self) -> None:
        """A slot freed in the route: wake the next waiter in order (O(1) with none queued)."""
        self._rewait = None
        if not self._queued:
            return
        heap = self._heap
        while heap:
            w = heapq.heappop(heap)
            if w.state != _QUEUED:
                continue
            w.state = _WOKEN
            self._queued -= 1
            self._vtime[-w.key[0]] = w.key[1]
            assert w.fut is not None
            w.fut.set_result(None)
            break
        if not self._queued:
            self._reset()

    def _expire(self, w: _Waiter) -> None:
        if w.state == _QUEUED and w.fut is not None and not w.fut.done():
            self._remove(w)
            w.fut.set_result(None)

    def _remove(self, w: _Waiter) -> None:
        """Lazy removal: marked gone, dropped from the heap when popped or when compacted."""
        w.state = _GONE
        self._queued -= 1
        if not self._queued:
            self._reset()
        elif len(self._heap) > 2 * self._queued + 64:
            self._heap = [x for x in self._heap if x.state == _QUEUED]
            heapq.heapify(self._heap)

    def _reset(self) -> None:
        """Nobody waits: every team is idle, so the virtual clocks start over (bounded state)."""
        self._heap.clear()
        self._vtime.clear()
        self._finish.clear()
