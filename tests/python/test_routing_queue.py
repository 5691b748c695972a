"""The fair queue (issue 13 item 9): priority order, weighted fairness across teams, limits,
deadlines and cancellation. Simulated on the asyncio loop: a fixed number of slots, a driver
that frees them and calls `wake()`; nothing asserts on wall-clock time."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.config_routing import QueueConfig
from gateway.context import RequestContext
from gateway.errors import Fault, GatewayError
from gateway.routing.queue import FairQueue


class Ctx:
    """The three fields the queue reads (a stand-in for RequestContext)."""

    __slots__ = ("name", "principal", "priority", "timings")

    def __init__(self, name: str = "", team: str | None = "t", priority: int = 0) -> None:
        self.name = name
        self.principal = None if team is None else SimpleNamespace(team=team)
        self.priority = priority
        self.timings: dict[str, int] = {}


def ctx_of(c: Ctx) -> RequestContext:
    return cast(RequestContext, c)


def run(main: Callable[[asyncio.AbstractEventLoop], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        return await main(asyncio.get_running_loop())

    return asyncio.run(go())


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class Pool:
    """`slots` free slots; a request takes one when it has one, else waits in the queue and
    re-checks after each wake (the dispatcher's loop)."""

    def __init__(self, q: FairQueue, loop: asyncio.AbstractEventLoop, slots: int = 0) -> None:
        self.q = q
        self.loop = loop
        self.free = slots
        self.served: list[Ctx] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def request(self, c: Ctx, deadline: float) -> None:
        while self.free == 0:
            await self.q.wait(ctx_of(c), deadline)
        self.free -= 1
        self.served.append(c)

    def submit(self, c: Ctx, deadline: float | None = None) -> asyncio.Task[None]:
        t = self.loop.create_task(self.request(c, deadline or self.loop.time() + 3600))
        self.tasks.append(t)
        return t

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.free += 1
            self.q.wake()


def queue(loop: asyncio.AbstractEventLoop, **kw: Any) -> FairQueue:
    return FairQueue(QueueConfig(**{"max_wait_ms": 60_000, **kw}), loop)


def test_priority_first_then_fifo_within_a_team() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[str]:
        pool = Pool(queue(loop), loop)
        for name, prio in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 1), ("high2", 5)]:
            pool.submit(Ctx(name, priority=prio))
        await settle()
        assert len(pool.q) == 5
        for _ in range(5):
            pool.release()
            await settle()
        await asyncio.gather(*pool.tasks)
        assert len(pool.q) == 0
        return [c.name for c in pool.served]

    assert run(main) == ["high1", "high2", "mid", "low1", "low2"]


def share(weights: dict[str, int], capacity: int, b_load: int = 1, ticks: int = 300) -> Counter[str]:
    """Team `a` offers 10 requests per tick, team `b` `b_load`; `capacity` slots free per tick."""

    async def main(loop: asyncio.AbstractEventLoop) -> Counter[str]:
        pool = Pool(queue(loop, team_weights=weights, max_queued=100_000), loop)
        for _ in range(ticks):
            for _ in range(10):
                pool.submit(Ctx(team="a"))
            for _ in range(b_load):
                pool.submit(Ctx(team="b"))
            await settle()
            pool.release(capacity)
            await settle()
        for t in pool.tasks:
            t.cancel()
        await asyncio.gather(*pool.tasks, return_exceptions=True)
        assert len(pool.q) == 0
        return Counter(c.principal.team for c in pool.served)  # type: ignore[union-attr]

    counts: Counter[str] = run(main)
    assert counts.total() == capacity * ticks
    return counts


def test_equal_weights_equal_service_at_ten_to_one_load() -> None:
    counts = share({}, capacity=2)
    assert counts["b"] / counts["a"] == pytest.approx(1.0, rel=0.1)


def test_weights_three_to_one_give_three_to_one_service() -> None:
    counts = share({"a": 3, "b": 1}, capacity=4)
    assert counts["a"] / counts["b"] == pytest.approx(3.0, rel=0.1)
    # both backlogged: the shares are the weights whatever each offers
    counts = share({"a": 3, "b": 1}, capacity=4, b_load=5)
    assert counts["a"] / counts["b"] == pytest.approx(3.0, rel=0.1)
    # a team offering less than its share gets all it asks for
    counts = share({"a": 1, "b": 3}, capacity=8)
    assert counts["b"] / counts.total() == pytest.approx(1 / 8, rel=0.1)


def test_no_principal_is_team_empty_and_fifo() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[str]:
        pool = Pool(queue(loop), loop)
        for i in range(3):
            pool.submit(Ctx(str(i), team=None))
        await settle()
        pool.release(3)
        await asyncio.gather(*pool.tasks)
        return [c.name for c in pool.served]

    assert run(main) == ["0", "1", "2"]


def refusal(main: Callable[[asyncio.AbstractEventLoop], Awaitable[Any]]) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        run(main)
    err = info.value
    assert err.fault is Fault.UPSTREAM_CAPACITY and err.fault.status == 429
    assert ("retry-after", "1") in err.headers
    return err


def test_no_queue_refuses_at_once() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        await FairQueue(QueueConfig(), loop).wait(ctx_of(Ctx()), loop.time() + 10)

    refusal(main)


def test_queue_full_refuses() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        pool = Pool(queue(loop, max_queued=2), loop)
        pool.submit(Ctx())
        pool.submit(Ctx())
        await settle()
        assert len(pool.q) == 2
        try:
            await pool.q.wait(ctx_of(Ctx()), loop.time() + 10)
        finally:
            assert len(pool.q) == 2
            pool.release(2)
            await asyncio.gather(*pool.tasks)

    refusal(main)


def test_deadline_refuses_and_counts_the_wait() -> None:
    c = Ctx()

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        q = queue(loop)
        try:
            await q.wait(ctx_of(c), loop.time() + 0.01)
        finally:
            assert len(q) == 0

    refusal(main)
    assert c.timings["queue"] > 0


def test_max_wait_caps_a_later_deadline() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        await queue(loop, max_wait_ms=5).wait(ctx_of(Ctx()), loop.time() + 3600)

    refusal(main)


def test_deadline_already_passed_refuses_without_queueing() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        q = queue(loop)
        try:
            await q.wait(ctx_of(Ctx()), loop.time() - 1)
        finally:
            assert len(q) == 0

    refusal(main)


def test_cancelled_waiter_is_removed_and_the_next_is_served() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[str]:
        pool = Pool(queue(loop), loop)
        first = pool.submit(Ctx("gone"))
        pool.submit(Ctx("next"))
        await settle()
        first.cancel()
        await settle()
        assert len(pool.q) == 1
        pool.release()
        await asyncio.gather(*pool.tasks, return_exceptions=True)
        assert len(pool.q) == 0
        return [c.name for c in pool.served]

    assert run(main) == ["next"]


def test_cancelled_after_its_wake_passes_the_slot_on() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[str]:
        pool = Pool(queue(loop), loop)
        first = pool.submit(Ctx("gone"))
        pool.submit(Ctx("next"))
        await settle()
        pool.release()  # wakes "gone" ...
        first.cancel()  # ... which leaves before it runs again
        await asyncio.gather(*pool.tasks, return_exceptions=True)
        return [c.name for c in pool.served]

    assert run(main) == ["next"]


def test_woken_waiter_that_lost_the_race_keeps_its_place() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[str]:
        pool = Pool(queue(loop), loop)
        for name in ("a", "b", "c"):
            pool.submit(Ctx(name))
        await settle()
        pool.q.wake()  # "a" is woken, but no slot is free (someone unqueued took it)
        await settle()
        assert len(pool.q) == 3  # "a" queued again ...
        pool.release(3)
        await asyncio.gather(*pool.tasks)
        return [c.name for c in pool.served]

    assert run(main) == ["a", "b", "c"]  # ... at the front


def test_wake_with_nobody_waiting_is_a_no_op() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        q = queue(loop)
        for _ in range(3):
            q.wake()
        assert len(q) == 0
        pool = Pool(q, loop)
        pool.submit(Ctx("x"))  # a wake before anyone waited is not saved up
        await settle()
        assert len(q) == 1
        pool.release()
        await asyncio.gather(*pool.tasks)

    run(main)


def test_expired_entries_do_not_pile_up() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        q = queue(loop)
        pool = Pool(q, loop)
        pool.submit(Ctx("stays"))
        doomed = [pool.submit(Ctx(), loop.time() + 0.001) for _ in range(500)]
        await asyncio.gather(*doomed, return_exceptions=True)
        assert len(q) == 1
        assert len(q._heap) <= 2 * len(q) + 64
        pool.release()
        await asyncio.gather(*pool.tasks, return_exceptions=True)
        assert [c.name for c in pool.served] == ["stays"]

    run(main)
