"""The CPU a response-cache hit costs, in process (memory backend): `wanted` + `open` (key hash,
lookup, the `ReplayCall`) + draining the replay the way the relay does (unary: `body`, `usage`,
`release`; stream: the first frames, `next` until None, `finish`, `usage`, `release`), against
the same drain of a plain fake call with no cache in front. The relay's own sends are not in
either number (a hit sends what a miss would). Also a miss's recording overhead: the
`RecordingCall` proxy and its store, against the bare call. With `--redis URL`, hits on the
Redis backend too (this process's CPU: the GET, its reply's parse, the msgpack decode; not
redis-server's).

    .venv/bin/python benchmarks/cache_cost.py [--calls 50000] [--repeat 3] [--frames 64] [--concurrency 1]
        [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import TierConfig, parse
from gateway.config_routing import CacheBackend, CacheConfig
from gateway.context import Endpoint
from gateway.principal import Principal
from gateway.routing.cache import ResponseCache
from gateway.schemas import Usage
from gateway.worker import Worker

FAR = 1e12
CFG = "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
BODY = (
    b'{"model":"m","messages":[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"' + b"Summarise the following text. " * 30 + b'"}],"max_tokens":64}'
)
REPLY = (
    b'{"id":"chatcmpl-x","object":"chat.completion","choices":[{"message":{"content":"'
    + b"w " * 200
    + b'"}}]}'
)


class Ctx:
    """The fields of `RequestContext` the cache reads (a real one costs the same to read)."""

    __slots__ = ("body", "cache", "endpoint", "headers", "principal", "stream")

    def __init__(self, stream: bool, principal: Principal) -> None:
        self.body = BODY
        self.stream = stream
        self.endpoint = Endpoint.CHAT
        self.headers: dict[str, str] = {}
        self.principal = principal
        self.cache: str | None = None


class Call:
    """A fake upstream call with nothing behind it (the baseline drain)."""

    __slots__ = ("frames", "i", "u")

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.i = 0
        self.u = Usage(300, 64, 364)

    async def first(self, deadline: float) -> bytes:
        self.i = 1
        return self.frames[0]

    async def next(self, deadline: float) -> bytes | None:
        if self.i >= len(self.frames):
            return None
        self.i += 1
        return self.frames[self.i - 1]

    def finish(self) -> tuple[bytes, None]:
        return b'data: {"finish":"stop"}\n\n', None

    async def body(self, deadline: float) -> bytes:
        return REPLY

    def usage(self) -> Usage:
        return self.u

    @property
    def completion_text(self) -> str:
        return "w " * self.i

    @property
    def generated_tokens(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def release(self) -> None:
        return None


async def drain_unary(call: Any) -> int:
    body = await call.body(FAR)
    call.release()
    call.usage()
    return len(body)


async def drain_stream(call: Any, first: bytes) -> int:
    n = len(first)
    while (out := await call.next(FAR)) is not None:
        n += len(out)
    tail, _ = call.finish()
    call.release()
    call.usage()
    return n + len(tail)


def cpu_us(
    calls: int, one: Callable[[], Awaitable[Any]], loop: asyncio.AbstractEventLoop, conc: int
) -> float:
    """CPU per request with `conc` requests in flight (Redis: the calls of one loop iteration
    share a write and a read)."""

    async def many(n: int) -> None:
        for _ in range(n):
            await one()

    async def all_of() -> None:
        await asyncio.gather(*(many(calls // conc) for _ in range(conc)))

    t0 = time.process_time()
    loop.run_until_complete(all_of())
    return (time.process_time() - t0) / (calls // conc * conc) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    ap.add_argument("--redis", default=None, help="also the Redis backend, e.g. redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    cfg = CFG
    if args.redis:
        cfg += f"limits: {{redis: {{url: '{args.redis}', timeout_ms: 1000}}}}\n"
    worker = Worker(parse(cfg), loop)
    backends = [("memory", ResponseCache(CacheConfig(enabled=True), "m", worker))]
    if args.redis:
        backends.append(
            ("redis", ResponseCache(CacheConfig(enabled=True, backend=CacheBackend.REDIS), "m", worker))
        )
    principal = Principal("k", b"", "team-a", "default", TierConfig(), None, math.inf, False)
    frames = [
        b'data: {"id":"chatcmpl-x","choices":[{"delta":{"content":"w%d "}}]}\n\n' % i
        for i in range(args.frames)
    ]

    async def start_unary() -> tuple[Any, bytes]:
        return Call([]), b""

    async def start_stream() -> tuple[Any, bytes]:
        call = Call(frames)
        return call, await call.first(FAR)

    # prime: one miss each, stored
    for _, cache in backends:
        for stream, start in ((False, start_unary), (True, start_stream)):
            ctx = Ctx(stream, principal)
            ctx.headers = {"cache-control": "no-cache"}
            call, first = loop.run_until_complete(cache.open(ctx, start))  # type: ignore[arg-type]
            loop.run_until_complete(drain_stream(call, first) if stream else drain_unary(call))
            assert ctx.cache == "miss", ctx.cache
        if cache._redis is not None:
            loop.run_until_complete(cache._redis.barrier())  # the SETs are not waited for

    def hit(cache: ResponseCache, stream: bool) -> Callable[[], Awaitable[int]]:
        async def one() -> int:
            ctx = Ctx(stream, principal)
            assert cache.wanted(ctx)  # type: ignore[arg-type]
            call, first = await cache.open(ctx, start_stream if stream else start_unary)  # type: ignore[arg-type]
            assert ctx.cache == "hit"
            return await (drain_stream(call, first) if stream else drain_unary(call))

        return one

    def bare(stream: bool) -> Callable[[], Awaitable[int]]:
        async def one() -> int:
            Ctx(stream, principal)
            call, first = await (start_stream() if stream else start_unary())
            return await (drain_stream(call, first) if stream else drain_unary(call))

        return one

    def miss(cache: ResponseCache, stream: bool) -> Callable[[], Awaitable[int]]:
        async def one() -> int:
            ctx = Ctx(stream, principal)
            ctx.headers = {"cache-control": "no-cache"}  # always a miss, recorded and stored
            call, first = await cache.open(ctx, start_stream if stream else start_unary)  # type: ignore[arg-type]
            return await (drain_stream(call, first) if stream else drain_unary(call))

        return one

    with open("/proc/loadavg") as f:
        load0 = f.read().strip()
    print(
        f"python {platform.python_version()}, {args.calls} calls per cell, {args.frames}-frame stream, "
        f"body {len(BODY)} B, reply {len(REPLY)} B, {args.concurrency} in flight; loadavg {load0}"
    )
    print("| backend | case | no cache µs/req | hit µs/req | miss (record+store) µs/req |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeat):
        for name, cache in backends:
            for stream in (False, True):
                b = cpu_us(args.calls, bare(stream), loop, args.concurrency)
                h = cpu_us(args.calls, hit(cache, stream), loop, args.concurrency)
                m = cpu_us(args.calls, miss(cache, stream), loop, args.concurrency)
                case = f"stream ({args.frames} frames)" if stream else "unary"
                print(f"| {name} | {case} | {b:.2f} | {h:.2f} | {m:.2f} |")
    with open("/proc/loadavg") as f:
        print(f"loadavg at end: {f.read().strip()}")
    for _, cache in backends:
        loop.run_until_complete(cache.close())
    loop.close()


if __name__ == "__main__":
    main()
