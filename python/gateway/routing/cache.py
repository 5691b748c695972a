"""Exact response cache and single-flight for one public model (issue 13 item 8).

Wanted per request (`ResponseCache.wanted`): the model's `cache.enabled`, or the request's
`x-fastpath-cache: on`; `x-fastpath-cache: off` opts out. The dispatcher then calls `open` with
its attempt loop as `start`; `open` answers from the cache (`ctx.cache = "hit"`: a `ReplayCall`,
nothing upstream), joins an identical call in flight (`"shared"`, unary only), or runs `start`
(`"miss"`) and records what the relay reads from the call, stored once the call ended cleanly.

- The key is a hash of the tenant (the principal's team, else its key id, else `anon`), the
  endpoint, the stream flag, the public model and the client's exact body bytes: a byte of
  difference is another entry, and one tenant never sees another's answers.
- `cache-control: no-cache` skips the lookup and single-flight (the caller wants its own
  answer); `no-store` skips the store. Both still go upstream through the same recording.
- Replies are what the relay got from the call: a unary body byte for byte; a stream's frames
  (the first read, each `next`, `finish`'s tail) read for read, so a replay is event-identical
  (upstream ids such as `chatcmpl-...` included) and response stages see the same reads and
  token counts as on the original (the text grows with the bytes read). Usage is the stored
  usage (settlement charges a hit as the original: the cache saves upstream work, it is not a
  discount).
- Single-flight: the first of identical unary requests of a tenant leads (runs `start`); the
  rest wait for its body and replay it. The leader failing with a `GatewayError` fails them
  with a copy of it (the same request would fail the same way, and retrying it once per
  follower is the stampede single-flight exists to avoid). A leader that went away without an
  answer (its client disconnected, it was cancelled) leaves them to elect a new leader among
  themselves.
- Backends: `memory` (a per-worker, per-model LRU with TTL and `max_entries`) or `redis`
  (`SET key value PX ttl` / `GET`, msgpack values, on `limits.redis.url` through the repo's
  pipelined RESP client, one connection per worker shared by every model). A Redis failure is a
  miss (logged once per outage; Redis is then left alone for `limits.redis.retry_interval_ms`),
  never a failed request. Single-flight is per worker with either backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .. import redis_resp
from ..config_routing import CacheBackend, CacheConfig
from ..errors import GatewayError
from ..schemas import Usage

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall
    from ..worker import Worker

log = logging.getLogger("gateway.cache")

#: Request header: `on` caches a request of a model without `cache.enabled`, `off` opts out.
CACHE_HEADER = "x-fastpath-cache"
#: Redis key prefix of cache entries (the rest is the key's hex digest).
REDIS_PREFIX = "fastpath:cache:"
#: Stores sent to Redis and not answered yet, per model and worker, past which a store is
#: skipped: stores are not waited for, so nothing else would stop a burst of misses from queueing
#: megabytes ahead of every lookup (the cache is best effort; a lookup is on the request path).
MAX_PENDING_STORES = 64

Start = Callable[[], Awaitable["tuple[UpstreamCall, bytes]"]]


class Entry(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One cached reply. Unary: `frames == [body]`. Stream: the frames of each read (the
    first read's, even when empty, then every non-empty `next`), then `tail` (`finish`'s).
    `tokens[i]` is the generated tokens after read i (None: the upstream does not report
    them), so response stages count a replay as they counted the original. The text is not
    kept per read (reading `completion_text` after every read copies all of it so far: a
    quadratic cost over a stream): a replay's text grows with the bytes sent, `nbytes` being
    the frames' total, which is all a stage needs (never more text than bytes sent)."""

    stream: bool
    frames: list[bytes]
    tail: bytes
    usage: Usage | None
    text: str
    nbytes: int
    tokens: list[int] | None


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Entry).decode


def _size(e: Entry) -> int:
    """What an entry holds in memory, near enough for a cap (its frames, tail and text)."""
    return e.nbytes + len(e.tail) + len(e.text)


def _copy_usage(u: Usage | None) -> Usage | None:
    """Usage is a mutable Struct and settlement may fill it in: every request gets its own."""
    return None if u is None else Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def _copy_error(err: GatewayError) -> GatewayError:
    """One instance per follower: re-raising one exception object in many tasks chains their
    tracebacks onto it."""
    return GatewayError(err.fault, err.message, param=err.param, headers=err.headers, code=err.code)


class ReplayCall:
    """An `UpstreamCall` that replays an entry: no upstream, nothing to release or abort."""

    __slots__ = ("_e", "_i")

    def __init__(self, entry: Entry, consumed: int = 0) -> None:
        self._e = entry
        #: reads handed out so far
        self._i = consumed

    async def first(self, deadline: float) -> bytes:
        self._i = 1
        return self._e.frames[0]

    async def next(self, deadline: float) -> bytes | None:
        i = self._i
        frames = self._e.frames
        if i >= len(frames):
            return None
        self._i = i + 1
        return frames[i]

    def finish(self) -> tuple[bytes, GatewayError | None]:
        return self._e.tail, None

    async def body(self, deadline: float) -> bytes:
        self._i = 1
        return self._e.frames[0]

    def usage(self) -> Usage | None:
        return _copy_usage(self._e.usage)

    @property
    def completion_text(self) -> str:
        """The text so far, spread over the reads by their bytes (computed only when a stage
        reads it: nothing per read)."""
        e = self._e
        i = self._i
        if i >= len(e.frames) or not e.nbytes:
            return e.text
        return e.text[: len(e.text) * sum(map(len, e.frames[:i])) // e.nbytes]

    @property
    def generated_tokens(self) -> int | None:
        tokens = self._e.tokens
        if tokens is None or not self._i:
            return None
        return tokens[min(self._i, len(tokens)) - 1]

    def abort(self) -> None:
        return None

    def release(self) -> None:
        return None


class _Flight:
    """An in-flight unary call that identical requests wait for. Resolved once: an `Entry`
    (the body), a `GatewayError` (the leader failed), or None (the leader went away)."""

    __slots__ = ("done",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[Entry | GatewayError | None] = loop.create_future()


class RecordingCall:
    """A proxy of the real call that keeps what the relay reads from it, and stores it once the
    call ended cleanly (`release` after a body, or after `finish` reported no error)."""

    __slots__ = (
        "_cache",
        "_call",
        "_flight",
        "_frames",
        "_key",
        "_ok",
        "_size",
        "_store",
        "_stream",
        "_tail",
        "_tokens",
    )

    def __init__(
        self,
        cache: ResponseCache,
        call: UpstreamCall,
        key: bytes,
        store: bool,
        first: bytes | None,
        flight: _Flight | None,
    ) -> None:
        self._cache = cache
        self._call = call
        self._key = key
        self._store = store
        #: a stream (its first read done: `first`) or a unary call (None)
        self._stream = first is not None
        self._flight = flight
        self._ok = False
        self._tail = b""
        #: None: not recording (a unary call until its body; over the size cap)
        self._frames: list[bytes] | None = None
        self._tokens: list[int] | None = None
        self._size = 0
        if first is not None:  # a stream: its first read is already done
            self._begin(first)

    def _begin(self, out: bytes) -> None:
        """The first read. Tokens are tracked when the upstream reports them from the start
        (Triton always does, OpenAI never): nothing per read otherwise."""
        self._size = len(out)
        if self._size > self._cache.max_entry_bytes:
            return
        self._frames = [out]
        tokens = self._call.generated_tokens
        if tokens is not None:
            self._tokens = [tokens]

    def _record(self, out: bytes) -> None:
        frames = self._frames
        if frames is None:
            return
        self._size += len(out)
        if self._size > self._cache.max_entry_bytes:
            self._frames = self._tokens = None  # too big to keep: stop holding it
            return
        frames.append(out)
        if self._tokens is not None:
            self._tokens.append(self._call.generated_tokens or 0)

    def _entry(self, stream: bool) -> Entry | None:
        frames = self._frames
        if frames is None:
            return None
        call = self._call
        text = call.completion_text
        if self._size + len(self._tail) + len(text) > self._cache.max_entry_bytes:
            return None
        return Entry(stream, frames, self._tail, _copy_usage(call.usage()), text, self._size, self._tokens)

    # ---- the UpstreamCall protocol -----------------------------------------------------------
    async def first(self, deadline: float) -> bytes:
        out = await self._call.first(deadline)
        self._stream = True
        self._begin(out)
        return out

    async def next(self, deadline: float) -> bytes | None:
        out = await self._call.next(deadline)
        if out and self._frames is not None:
            self._record(out)
        return out

    def finish(self) -> tuple[bytes, GatewayError | None]:
        tail, err = self._call.finish()
        self._tail = tail
        self._ok = err is None
        return tail, err

    async def body(self, deadline: float) -> bytes:
        flight = self._flight
        try:
            body = await self._call.body(deadline)
        except GatewayError as err:
            if flight is not None:
                self._cache._land(self._key, flight, err)
            raise
        except BaseException:
            if flight is not None:
                self._cache._land(self._key, flight, None)
            raise
        self._begin(body)
        self._ok = True
        if flight is not None:
            entry = self._entry(False)
            if entry is None:  # too big to store: the followers get it all the same
                call = self._call
                entry = Entry(
                    False, [body], b"", _copy_usage(call.usage()), call.completion_text, len(body), None
                )
            self._cache._land(self._key, flight, entry)
        return body

    def usage(self) -> Usage | None:
        return self._call.usage()

    @property
    def completion_text(self) -> str:
        return self._call.completion_text

    @property
    def generated_tokens(self) -> int | None:
        return self._call.generated_tokens

    def abort(self) -> None:
        self._ok = False
        self._frames = None
        if self._flight is not None:
            self._cache._land(self._key, self._flight, None)
        self._call.abort()

    def release(self) -> None:
        self._call.release()
        if self._flight is not None:  # released before its body was read: nothing to share
            self._cache._land(self._key, self._flight, None)
        if self._ok and self._store:
            entry = self._entry(self._stream)
            if entry is not None:
                self._cache._put(self._key, entry)
        self._frames = None


class _RedisRef:
    """One Redis client per worker (per URL), shared by every model's cache."""

    __slots__ = ("client", "refs")

    def __init__(self, client: redis_resp.Client) -> None:
        self.client = client
        self.refs = 0


#: (id of the worker, Redis URL) -> its shared client
_REDIS: dict[tuple[int, str], _RedisRef] = {}


class ResponseCache:
    """Per model, per worker: the exact cache and the single-flight table (see the module)."""

    __slots__ = (
        "_clock",
        "_down_until",
        "_enabled",
        "_flights",
        "_loop",
        "_mem",
        "_mem_bytes",
        "_model",
        "_pending",
        "_redis",
        "_redis_key",
        "_redis_ok",
        "_retry_s",
        "_single_flight",
        "_ttl_ms",
        "_ttl_s",
        "max_bytes",
        "max_entries",
        "max_entry_bytes",
    )

    def __init__(
        self, cfg: CacheConfig, model: str, worker: Worker, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._enabled = cfg.enabled
        self._model = model.encode()
        self._ttl_s = float(cfg.ttl_s)
        self._ttl_ms = cfg.ttl_s * 1000
        self.max_entries = cfg.max_entries
        self.max_entry_bytes = cfg.max_entry_bytes
        self.max_bytes = cfg.max_bytes
        #: memory backend: the bytes its entries hold (frames, tail, text)
        self._mem_bytes = 0
        self._single_flight = cfg.single_flight
        self._loop = worker.loop
        #: the TTL clock (the worker's loop clock; tests inject one)
        self._clock = clock if clock is not None else worker.loop.time
        self._flights: dict[bytes, _Flight] = {}
        #: memory backend: key -> (expiry, entry), least recently used first
        self._mem: OrderedDict[bytes, tuple[float, Entry]] | None = None
        self._redis: redis_resp.Client | None = None
        self._redis_key: tuple[int, str] | None = None
        self._redis_ok = True
        self._down_until = 0.0
        self._retry_s = 0.0
        self._pending = 0
        if cfg.backend is CacheBackend.REDIS:
            r = worker.cfg.limits.redis
            self._retry_s = r.retry_interval_ms / 1000
            self._redis_key = (id(worker), r.url)
            ref = _REDIS.get(self._redis_key)
            if ref is None:
                timeout_s = r.timeout_ms / 1000
                client = redis_resp.make_client(
                    r.url,
                    timeout_s=timeout_s,
                    connect_timeout_s=timeout_s,
                    backoff_min_s=min(0.05, self._retry_s),
                    backoff_max_s=self._retry_s,
                )
                ref = _REDIS[self._redis_key] = _RedisRef(client)
            ref.refs += 1
            self._redis = ref.client
        else:
            self._mem = OrderedDict()

    # ---- lifecycle (a pipeline Part's) -------------------------------------------------------
    def start(self, worker: Worker) -> None:
        self._loop = worker.loop

    async def close(self) -> None:
        """Drop this model's share of the worker's Redis client (the last one closes it)."""
        key = self._redis_key
        if key is None:
            return
        self._redis_key = None
        self._redis = None
        ref = _REDIS.get(key)
        if ref is None:
            return
        ref.refs -= 1
        if ref.refs <= 0:
            del _REDIS[key]
            await ref.client.close()

    # ---- the request path --------------------------------------------------------------------
    def wanted(self, ctx: RequestContext) -> bool:
        """The model caches, or the request opts in (`x-fastpath-cache: on`) or out (`off`)."""
        opt = ctx.headers.get(CACHE_HEADER)
        if opt is None:
            return self._enabled
        opt = opt.strip().lower()
        if opt == "on":
            return True
        if opt == "off":
            return False
        return self._enabled

    def key(self, ctx: RequestContext) -> bytes:
        """16 bytes: tenant, endpoint, stream flag, public model and the exact body."""
        p = ctx.principal
        tenant = (p.team or p.key_id or "anon") if p is not None else "anon"
        h = hashlib.blake2b(digest_size=16)
        t = tenant.encode()
        h.update(
            b"%d:%s|%s|%c|%d:"
            % (len(t), t, ctx.endpoint.value.encode(), 115 if ctx.stream else 117, len(self._model))
        )
        h.update(self._model)
        h.update(b"|")
        h.update(ctx.body)
        return h.digest()

    async def open(self, ctx: RequestContext, start: Start) -> tuple[UpstreamCall, bytes]:
        """The call that answers `ctx` and, for a stream, its first frames (see the module)."""
        key = self.key(ctx)
        no_cache = no_store = False
        cc = ctx.headers.get("cache-control")
        if cc is not None:
            cc = cc.lower()
            no_cache = "no-cache" in cc
            no_store = "no-store" in cc
        if not no_cache:
            entry = self._get_mem(key) if self._mem is not None else await self._get_redis(key)
            if entry is not None and entry.stream == ctx.stream:
                ctx.cache = "hit"
                if ctx.stream:
                    return ReplayCall(entry, 1), entry.frames[0]
                return ReplayCall(entry), b""
        if ctx.stream:
            ctx.cache = "miss"
            call, first = await start()
            return RecordingCall(self, call, key, not no_store, first, None), first
        if not self._single_flight or no_cache:
            ctx.cache = "miss"
            call, first = await start()
            return RecordingCall(self, call, key, not no_store, None, None), first
        flights = self._flights
        while (flight := flights.get(key)) is not None:
            # shielded: a follower cancelled (its client gone) must not cancel the flight
            result = await asyncio.shield(flight.done)
            if isinstance(result, Entry):
                ctx.cache = "shared"
                return ReplayCall(result), b""
            if isinstance(result, GatewayError):
                ctx.cache = "shared"
                raise _copy_error(result)
            # the leader went away without an answer: the first follower to get here leads
        flight = flights[key] = _Flight(self._loop)
        ctx.cache = "miss"
        try:
            call, first = await start()
        except GatewayError as err:
            self._land(key, flight, err)
            raise
        except BaseException:
            self._land(key, flight, None)
            raise
        return RecordingCall(self, call, key, not no_store, None, flight), first

    def _land(self, key: bytes, flight: _Flight, result: Entry | GatewayError | None) -> None:
        """The flight is over: wake its followers (once) and let new requests start anew."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.done.done():
            flight.done.set_result(result)

    # ---- backends ----------------------------------------------------------------------------
    def _get_mem(self, key: bytes) -> Entry | None:
        mem = self._mem
        assert mem is not None
        found = mem.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            del mem[key]
            self._mem_bytes -= _size(found[1])
            return None
        mem.move_to_end(key)
        return found[1]

    async def _get_redis(self, key: bytes) -> Entry | None:
        client = self._redis
        if client is None or (self._down_until and self._loop.time() < self._down_until):
            return None
        try:
            raw = await client.execute("GET", REDIS_PREFIX + key.hex())
        except redis_resp.RedisError as exc:
            self._redis_failed(exc)
            return None
        self._redis_up()
        if raw is None:
            return None
        try:
            return _decode(raw)
        except msgspec.DecodeError:
            return None  # written by another version: a miss, overwritten on the store

    def _put(self, key: bytes, entry: Entry) -> None:
        mem = self._mem
        if mem is not None:
            old = mem.pop(key, None)
            if old is not None:
                self._mem_bytes -= _size(old[1])
            mem[key] = (self._clock() + self._ttl_s, entry)
            self._mem_bytes += _size(entry)
            while len(mem) > self.max_entries or self._mem_bytes > self.max_bytes:
                self._mem_bytes -= _size(mem.popitem(last=False)[1][1])
            return
        client = self._redis
        if (
            client is None
            or self._pending >= MAX_PENDING_STORES
            or (self._down_until and self._loop.time() < self._down_until)
        ):
            return
        self._pending += 1
        fut = client.execute("SET", REDIS_PREFIX + key.hex(), _encode(entry), "PX", self._ttl_ms)
        fut.add_done_callback(self._stored)

    def _stored(self, fut: asyncio.Future[Any]) -> None:
        self._pending -= 1
        if fut.cancelled():
            return
        exc = fut.exception()  # retrieved: never "exception was never retrieved"
        if exc is None:
            self._redis_up()
        elif isinstance(exc, redis_resp.RedisError):
            self._redis_failed(exc)

    def _redis_failed(self, exc: Exception) -> None:
        self._down_until = self._loop.time() + self._retry_s
        if self._redis_ok:
            self._redis_ok = False
            log.warning("response cache: Redis failed (%s); cache lookups are misses until it is back", exc)

    def _redis_up(self) -> None:
        self._down_until = 0.0
        if not self._redis_ok:
            self._redis_ok = True
            log.warning("response cache: Redis is back")

    def __len__(self) -> int:
        """Entries held in memory (memory backend; 0 for Redis)."""
        return len(self._mem) if self._mem is not None else 0
