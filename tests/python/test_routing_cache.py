"""`gateway.routing.cache`: the exact response cache and single-flight, driven the way the relay
drives a call (unary: `body` then `release`; stream: the first frames, `next` until None,
`finish`, `release`) against fake `start()` callbacks; the Redis backend against the shared
Redis at 127.0.0.1:6379 (skipped when there is none). No wall clock: TTLs run on an injected
clock, concurrency is ordered by events."""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import REDIS_URL, bare_worker, free_port, redis_or_skip

from gateway.config import TierConfig, parse
from gateway.config_routing import CacheBackend, CacheConfig
from gateway.context import Endpoint
from gateway.errors import Fault, GatewayError
from gateway.principal import Principal
from gateway.routing.cache import MAX_PENDING_STORES, Entry, ReplayCall, ResponseCache
from gateway.schemas import Usage
from gateway.worker import Worker

FAR = 1e12  # a deadline that never passes


class Ctx:
    """The fields of `RequestContext` the cache reads and writes."""

    def __init__(
        self,
        body: bytes = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        *,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        team: str | None = "team-a",
        key_id: str = "k1",
    ) -> None:
        self.body = body
        self.stream = stream
        self.endpoint = Endpoint.CHAT
        self.headers = headers or {}
        self.principal = (
            None
            if team is None
            else Principal(key_id, b"", team, "default", TierConfig(), None, math.inf, False)
        )
        self.cache: str | None = None


class FakeCall:
    """A small `UpstreamCall`: a unary body or a stream of reads, with the text growing per read
    (`texts[i]` after read i) and optional per-read token counts."""

    def __init__(
        self,
        *,
        body: bytes = b'{"id":"chatcmpl-1","choices":[]}',
        reads: list[bytes] | None = None,
        texts: list[str] | None = None,
        tokens: list[int] | None = None,
        tail: bytes = b"data: tail\n\n",
        finish_error: GatewayError | None = None,
        body_error: GatewayError | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self._body = body
        self.reads = reads or []
        self.texts = texts or [""] * len(self.reads)
        self.tokens = tokens
        self.tail = tail
        self.finish_error = finish_error
        self.body_error = body_error
        self.gate = gate
        self.i = 0
        self.released = self.aborted = False

    async def first(self, deadline: float) -> bytes:
        self.i = 1
        return self.reads[0]

    async def next(self, deadline: float) -> bytes | None:
        if self.i >= len(self.reads):
            return None
        self.i += 1
        return self.reads[self.i - 1]

    def finish(self) -> tuple[bytes, GatewayError | None]:
        return self.tail, self.finish_error

    async def body(self, deadline: float) -> bytes:
        if self.gate is not None:
            await self.gate.wait()
        if self.body_error is not None:
            raise self.body_error
        self.i = 1
        return self._body

    def usage(self) -> Usage | None:
        return Usage(3, 5, 8)

    @property
    def completion_text(self) -> str:
        if not self.texts:
            return "hello"
        return self.texts[min(self.i, len(self.texts)) - 1] if self.i else ""

    @property
    def generated_tokens(self) -> int | None:
        if self.tokens is None or not self.i:
            return None
        return self.tokens[min(self.i, len(self.tokens)) - 1]

    def abort(self) -> None:
        self.aborted = True

    def release(self) -> None:
        self.released = True


class Starter:
    """A `start()` callback: counts calls, hands out calls made by `make`."""

    def __init__(self, make: Callable[[], FakeCall], error: GatewayError | None = None) -> None:
        self.make = make
        self.error = error
        self.calls = 0
        self.made: list[FakeCall] = []

    async def __call__(self) -> tuple[Any, bytes]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        call = self.make()
        self.made.append(call)
        if call.reads:
            return call, await call.first(FAR)
        return call, b""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(main: Callable[[Worker], Awaitable[None]]) -> None:
    async def wrapper() -> None:
        await main(bare_worker(asyncio.get_running_loop()))

    asyncio.run(wrapper())


def cache_of(worker: Worker, clock: Clock | None = None, **kw: Any) -> ResponseCache:
    kw.setdefault("enabled", True)
    return ResponseCache(CacheConfig(**kw), "m", worker, clock=clock)


async def unary(cache: ResponseCache, ctx: Ctx, start: Starter) -> bytes:
    """What the relay does with a unary call."""
    call, first = await cache.open(ctx, start)  # type: ignore[arg-type]
    assert first == b""
    try:
        body = await call.body(FAR)
    except BaseException:
        call.abort()
        raise
    call.release()
    return body


async def stream(
    cache: ResponseCache, ctx: Ctx, start: Starter
) -> tuple[list[bytes], list[str], list[int | None]]:
    """What the relay does with a stream: every read, the text and tokens seen after each."""
    call, first = await cache.open(ctx, start)  # type: ignore[arg-type]
    reads, texts, tokens = [first], [call.completion_text], [call.generated_tokens]
    while (out := await call.next(FAR)) is not None:
        reads.append(out)
        texts.append(call.completion_text)
        tokens.append(call.generated_tokens)
    tail, err = call.finish()
    reads.append(tail)
    if err is None:
        call.release()
    else:
        call.abort()
    return reads, texts, tokens


def streamed_call(n: int = 4, **kw: Any) -> FakeCall:
    reads = [f'data: {{"id":"chatcmpl-9","delta":"t{i}"}}\n\n'.encode() for i in range(n)]
    texts = ["".join(f"t{j}" for j in range(i + 1)) for i in range(n)]
    return FakeCall(reads=reads, texts=texts, **kw)


# ---- wanted ------------------------------------------------------------------------------------
def test_wanted_follows_the_model_and_the_request_header() -> None:
    async def main(worker: Worker) -> None:
        on, off = cache_of(worker), cache_of(worker, enabled=False)
        assert on.wanted(Ctx()) and not off.wanted(Ctx())  # type: ignore[arg-type]
        assert off.wanted(Ctx(headers={"x-fastpath-cache": "on"}))  # type: ignore[arg-type]
        assert off.wanted(Ctx(headers={"x-fastpath-cache": " ON "}))  # type: ignore[arg-type]
        assert not on.wanted(Ctx(headers={"x-fastpath-cache": "off"}))  # type: ignore[arg-type]
        assert on.wanted(Ctx(headers={"x-fastpath-cache": "bogus"}))  # type: ignore[arg-type]

    run(main)


# ---- hits ----------------------------------------------------------------------------------------
def test_unary_hit_is_byte_identical_and_costs_no_upstream_call() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        start = Starter(lambda: FakeCall(body=b'{"id":"chatcmpl-abc","x":"\xc3\xa9"}'))
        ctx1, ctx2 = Ctx(), Ctx()
        b1 = await unary(cache, ctx1, start)
        b2 = await unary(cache, ctx2, start)
        assert (ctx1.cache, ctx2.cache) == ("miss", "hit")
        assert b1 == b2 and start.calls == 1
        assert start.made[0].released
        call, _ = await cache.open(Ctx(), start)  # type: ignore[arg-type]
        assert isinstance(call, ReplayCall)
        u1, u2 = call.usage(), call.usage()
        assert u1 == Usage(3, 5, 8) and u1 is not u2  # every request its own (settlement fills it)

    run(main)


def test_stream_hit_replays_every_read_and_what_stages_saw() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        start = Starter(lambda: streamed_call(5, tokens=[1, 2, 3, 4, 5]))
        ctx1, ctx2 = Ctx(stream=True), Ctx(stream=True)
        first = await stream(cache, ctx1, start)
        again = await stream(cache, ctx2, start)
        assert (ctx1.cache, ctx2.cache) == ("miss", "hit") and start.calls == 1
        (reads, texts, tokens), (reads2, texts2, tokens2) = first, again
        assert reads2 == reads and tokens2 == tokens  # read for read, tokens after each read
        assert reads[0].startswith(b'data: {"id":"chatcmpl-9"')
        # the text grows with the bytes read, never by more, and ends as the original's
        assert texts2[-1] == texts[-1] and texts2[0] == texts[-1][: len(texts2[0])]
        grown = [len(b) - len(a) for a, b in itertools.pairwise(texts2)]
        assert all(0 <= g <= len(r) for g, r in zip(grown, reads2[1:], strict=False))

    run(main)


def test_stream_and_unary_of_one_body_are_separate_entries() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        await stream(cache, Ctx(stream=True), Starter(lambda: streamed_call(2)))
        ctx = Ctx(stream=False)
        start = Starter(FakeCall)
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and start.calls == 1

    run(main)


def test_a_byte_of_difference_is_another_entry() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        start = Starter(FakeCall)
        await unary(cache, Ctx(body=b'{"a":1}'), start)
        ctx = Ctx(body=b'{"a":1} ')
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and start.calls == 2

    run(main)


# ---- what is not stored --------------------------------------------------------------------------
def test_stream_ending_with_an_error_or_aborted_is_not_stored() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        err = GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "no end")
        await stream(cache, Ctx(stream=True), Starter(lambda: streamed_call(3, finish_error=err)))
        assert len(cache) == 0
        call, _ = await cache.open(Ctx(stream=True), Starter(lambda: streamed_call(3)))  # type: ignore[arg-type]
        await call.next(FAR)
        call.abort()  # a response stage ended it, or the client went away
        call.release()  # (even a stray release after abort stores nothing)
        assert len(cache) == 0

    run(main)


def test_unary_body_failure_is_not_stored() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker, single_flight=False)
        err = GatewayError(Fault.UPSTREAM_ERROR, "boom")
        with pytest.raises(GatewayError):
            await unary(cache, Ctx(), Starter(lambda: FakeCall(body_error=err)))
        assert len(cache) == 0

    run(main)


def test_no_cache_skips_the_lookup_but_stores_and_no_store_skips_the_store() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        start = Starter(FakeCall)
        ctx = Ctx(headers={"cache-control": "no-store"})
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and len(cache) == 0
        await unary(cache, Ctx(), start)  # stored now
        ctx = Ctx(headers={"cache-control": "No-Cache"})
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and start.calls == 3 and len(cache) == 1
        ctx = Ctx(headers={"cache-control": "no-cache, no-store"})
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and start.calls == 4
        ctx = Ctx()
        await unary(cache, ctx, start)
        assert ctx.cache == "hit" and start.calls == 4

    run(main)


def test_tenants_are_isolated_and_keys_of_one_team_share() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        start = Starter(FakeCall)
        await unary(cache, Ctx(team="a", key_id="k1"), start)
        other_team = Ctx(team="b", key_id="k1")
        await unary(cache, other_team, start)
        same_team = Ctx(team="a", key_id="k2")
        await unary(cache, same_team, start)
        anon = Ctx(team=None)
        await unary(cache, anon, start)
        no_team = Ctx(team="", key_id="k1")  # a key without a team: its own key id
        await unary(cache, no_team, start)
        assert (other_team.cache, same_team.cache, anon.cache, no_team.cache) == (
            "miss",
            "hit",
            "miss",
            "miss",
        )
        assert start.calls == 4

    run(main)


def test_entries_over_max_entry_bytes_are_not_stored() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker, max_entry_bytes=64)
        await unary(cache, Ctx(), Starter(lambda: FakeCall(body=b"x" * 100)))
        await stream(cache, Ctx(stream=True), Starter(lambda: streamed_call(8)))
        assert len(cache) == 0
        await unary(cache, Ctx(body=b"small"), Starter(lambda: FakeCall(body=b"y" * 10)))
        assert len(cache) == 1

    run(main)


# ---- memory backend: LRU and TTL ----------------------------------------------------------------
def test_lru_evicts_the_least_recently_used() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker, max_entries=2)
        start = Starter(FakeCall)
        a, b, c = (Ctx(body=x) for x in (b"a", b"b", b"c"))
        await unary(cache, a, start)
        await unary(cache, b, start)
        await unary(cache, Ctx(body=b"a"), start)  # a is now the most recent
        await unary(cache, c, start)  # evicts b
        assert len(cache) == 2
        hits = []
        for body in (b"a", b"c", b"b"):
            ctx = Ctx(body=body)
            await unary(cache, ctx, start)
            hits.append(ctx.cache)
        assert hits == ["hit", "hit", "miss"]

    run(main)


def test_memory_is_capped_in_bytes_too() -> None:
    """`max_bytes` holds whatever `max_entries` would allow: the least recent go first."""

    async def main(worker: Worker) -> None:
        cache = cache_of(worker, max_bytes=250)
        start = Starter(lambda: FakeCall(body=b"z" * 100))
        for body in (b"a", b"b", b"c"):
            await unary(cache, Ctx(body=body), start)
        assert len(cache) == 2  # 3 x 100 bytes > 250: `a` went
        ctx = Ctx(body=b"a")
        await unary(cache, ctx, start)
        assert ctx.cache == "miss"
        ctx = Ctx(body=b"c")
        await unary(cache, ctx, start)
        assert ctx.cache == "hit"

    run(main)


def test_entries_expire_after_ttl() -> None:
    async def main(worker: Worker) -> None:
        clock = Clock()
        cache = cache_of(worker, clock, ttl_s=10)
        start = Starter(FakeCall)
        await unary(cache, Ctx(), start)
        clock.now += 9.9
        ctx = Ctx()
        await unary(cache, ctx, start)
        assert ctx.cache == "hit"
        clock.now += 0.2
        ctx = Ctx()
        await unary(cache, ctx, start)
        assert ctx.cache == "miss" and start.calls == 2

    run(main)


# ---- single-flight -------------------------------------------------------------------------------
def test_single_flight_100_identical_requests_make_one_upstream_call() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker, max_entry_bytes=16)  # too big to store: still shared
        gate = asyncio.Event()
        start = Starter(lambda: FakeCall(body=b'{"id":"chatcmpl-one","n":12345}', gate=gate))
        ctxs = [Ctx() for _ in range(100)]
        tasks = [asyncio.ensure_future(unary(cache, ctx, start)) for ctx in ctxs]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        bodies = await asyncio.gather(*tasks)
        assert start.calls == 1
        assert set(bodies) == {b'{"id":"chatcmpl-one","n":12345}'}
        verdicts = [c.cache for c in ctxs]
        assert verdicts.count("miss") == 1 and verdicts.count("shared") == 99
        assert len(cache) == 0 and not cache._flights

    run(main)


def test_single_flight_is_per_tenant_and_off_for_streams_and_when_disabled() -> None:
    async def main(worker: Worker) -> None:
        for cache, ctxs in (
            (cache_of(worker), [Ctx(team="a"), Ctx(team="b")]),
            (cache_of(worker, single_flight=False), [Ctx(), Ctx()]),
            (cache_of(worker), [Ctx(), Ctx(headers={"cache-control": "no-cache"})]),
        ):
            gate = asyncio.Event()
            start = Starter(lambda gate=gate: FakeCall(gate=gate))  # type: ignore[misc]
            tasks = [asyncio.ensure_future(unary(cache, ctx, start)) for ctx in ctxs]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(*tasks)
            assert start.calls == 2

    run(main)


def test_leader_error_reaches_every_follower() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        gate = asyncio.Event()
        err = GatewayError(Fault.UPSTREAM_TIMEOUT, "slow", headers=(("retry-after", "1"),))
        start = Starter(lambda: FakeCall(gate=gate, body_error=err))
        ctxs = [Ctx() for _ in range(10)]
        tasks = [asyncio.ensure_future(unary(cache, ctx, start)) for ctx in ctxs]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert start.calls == 1
        assert all(isinstance(r, GatewayError) and r.code == "upstream_timeout" for r in results)
        assert all(r.headers == (("retry-after", "1"),) for r in results if isinstance(r, GatewayError))
        assert len({id(r) for r in results}) == 10  # one instance each
        assert [c.cache for c in ctxs].count("shared") == 9 and len(cache) == 0

    run(main)


def test_leader_start_failure_reaches_every_follower() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        gate = asyncio.Event()

        class SlowFail(Starter):
            async def __call__(self) -> tuple[Any, bytes]:
                self.calls += 1
                await gate.wait()
                raise GatewayError(Fault.UPSTREAM_UNAVAILABLE, "all deployments down")

        start = SlowFail(FakeCall)
        tasks = [asyncio.ensure_future(unary(cache, Ctx(), start)) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert start.calls == 1
        assert all(isinstance(r, GatewayError) and r.code == "upstream_unavailable" for r in results)

    run(main)


def test_a_leader_gone_hands_over_to_a_follower() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        gates = [asyncio.Event(), asyncio.Event()]
        start = Starter(lambda: FakeCall(gate=gates[start.calls - 1], body=b"B%d" % start.calls))
        leader = asyncio.ensure_future(unary(cache, Ctx(), start))
        await asyncio.sleep(0)
        ctxs = [Ctx() for _ in range(5)]
        followers = [asyncio.ensure_future(unary(cache, ctx, start)) for ctx in ctxs]
        await asyncio.sleep(0)
        leader.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await leader
        for _ in range(3):
            await asyncio.sleep(0)
        gates[1].set()
        bodies = await asyncio.gather(*followers)
        assert start.calls == 2 and set(bodies) == {b"B2"}
        assert [c.cache for c in ctxs].count("miss") == 1
        assert start.made[0].aborted

    run(main)


def test_a_follower_gone_leaves_the_flight_alone() -> None:
    async def main(worker: Worker) -> None:
        cache = cache_of(worker)
        gate = asyncio.Event()
        start = Starter(lambda: FakeCall(gate=gate))
        leader = asyncio.ensure_future(unary(cache, Ctx(), start))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(unary(cache, Ctx(), start))
        other = asyncio.ensure_future(unary(cache, Ctx(), start))
        await asyncio.sleep(0)
        follower.cancel()
        gate.set()
        assert await leader == await other
        assert follower.cancelled() and start.calls == 1

    run(main)


# ---- Redis backend -------------------------------------------------------------------------------
def redis_worker(loop: asyncio.AbstractEventLoop, url: str = REDIS_URL) -> Worker:
    cfg = parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        f"limits: {{redis: {{url: '{url}', timeout_ms: 500, retry_interval_ms: 60000}}}}\n"
    )
    return Worker(cfg, loop)


def test_redis_backend_shares_entries_across_workers() -> None:
    r = redis_or_skip()
    body = b'{"test":"%s"}' % uuid.uuid4().hex.encode()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        w1, w2 = redis_worker(loop), redis_worker(loop)
        c1 = ResponseCache(CacheConfig(enabled=True, backend=CacheBackend.REDIS, ttl_s=30), "m", w1)
        c1b = ResponseCache(CacheConfig(enabled=True, backend=CacheBackend.REDIS), "m2", w1)
        c2 = ResponseCache(CacheConfig(enabled=True, backend=CacheBackend.REDIS), "m", w2)
        assert c1._redis is c1b._redis and c1._redis is not c2._redis  # one client per worker
        start = Starter(lambda: FakeCall(body=b'{"id":"chatcmpl-r"}'))
        sstart = Starter(lambda: streamed_call(6, tokens=[1, 2, 3, 4, 5, 6]))
        first = await unary(c1, Ctx(body=body), start)
        s1 = await stream(c1, Ctx(body=body, stream=True), sstart)
        await c1._redis.barrier()  # type: ignore[union-attr]  # the SETs were not waited for
        ctx, sctx = Ctx(body=body), Ctx(body=body, stream=True)
        assert await unary(c2, ctx, start) == first
        assert await stream(c2, sctx, sstart) == s1
        assert (ctx.cache, sctx.cache, start.calls, sstart.calls) == ("hit", "hit", 1, 1)
        keys = [k for k in r.keys("fastpath:cache:*") if 0 < r.pttl(k) <= 30_000]
        assert len(keys) >= 2
        r.delete(*keys)
        for c in (c1, c1b, c2):
            await c.close()
        assert c1._redis is None

    try:
        asyncio.run(main())
    finally:
        r.close()


def test_redis_down_is_a_miss_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        worker = redis_worker(asyncio.get_running_loop(), f"redis://127.0.0.1:{free_port()}/0")
        cache = ResponseCache(CacheConfig(enabled=True, backend=CacheBackend.REDIS), "m", worker)
        start = Starter(FakeCall)
        for _ in range(3):
            ctx = Ctx()
            assert await unary(cache, ctx, start) == b'{"id":"chatcmpl-1","choices":[]}'
            assert ctx.cache == "miss"
        assert start.calls == 3
        await cache.close()

    asyncio.run(main())
    assert sum("Redis failed" in r.message for r in caplog.records) == 1  # logged once


def test_redis_value_of_another_version_is_a_miss() -> None:
    r = redis_or_skip()

    async def main() -> None:
        cache = ResponseCache(
            CacheConfig(enabled=True, backend=CacheBackend.REDIS),
            "m",
            redis_worker(asyncio.get_running_loop()),
        )
        ctx = Ctx(body=uuid.uuid4().bytes)
        r.set("fastpath:cache:" + cache.key(ctx).hex(), b"\x93garbage", px=10_000)  # type: ignore[arg-type]
        start = Starter(FakeCall)
        await unary(cache, ctx, start)  # type: ignore[arg-type]
        assert ctx.cache == "miss" and start.calls == 1
        r.delete("fastpath:cache:" + cache.key(ctx).hex())  # type: ignore[arg-type]
        await cache.close()

    try:
        asyncio.run(main())
    finally:
        r.close()


def test_entry_round_trips_through_msgpack() -> None:
    import msgspec

    e = Entry(True, [b"a", b""], b"t", Usage(1, 2, 3), "x\u00e9", 1, [1, 2])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(e), type=Entry) == e


def test_redis_stores_past_the_pending_cap_are_skipped() -> None:
    r = redis_or_skip()

    async def main() -> None:
        cache = ResponseCache(
            CacheConfig(enabled=True, backend=CacheBackend.REDIS),
            "m",
            redis_worker(asyncio.get_running_loop()),
        )
        cache._pending = MAX_PENDING_STORES  # as if that many stores were unanswered
        ctx = Ctx(body=uuid.uuid4().bytes)
        await unary(cache, ctx, Starter(FakeCall))
        await cache._redis.barrier()  # type: ignore[union-attr]
        assert r.exists("fastpath:cache:" + cache.key(ctx).hex()) == 0  # type: ignore[arg-type]
        cache._pending = 0
        await unary(cache, Ctx(body=ctx.body), Starter(FakeCall))
        await cache._redis.barrier()  # type: ignore[union-attr]
        assert cache._pending == 0
        assert r.delete("fastpath:cache:" + cache.key(ctx).hex()) == 1  # type: ignore[arg-type]
        await cache.close()

    try:
        asyncio.run(main())
    finally:
        r.close()
