"""Stage `limits`, backend `redis`: the same limits as the local backend, held in Redis so that
every worker process and every gateway instance shares them exactly.

One round trip per decision: a Lua script (EVALSHA, EVAL on NOSCRIPT) checks the concurrency
lease set, the requests bucket and the tokens bucket of one key and, only when all three admit,
takes a request, reserves the tokens and adds the lease, atomically; a refused request changes
nothing (expired leases are pruned, nothing is counted). Time comes from Redis `TIME` inside the
script, so gateway clocks do not matter. Every key has a TTL: a bucket's key expires when the
bucket would be full again (a full bucket is no key at all), a lease set when its newest lease
expires. Keys are hash-tagged per principal (`{key_id}`): one decision touches one cluster slot.

Buckets are GCRA with the theoretical arrival time kept relative to the last update: `d`, the
bucket's debt in units of 1/60,000,000 token (a microsecond at one token per minute), and `t`,
when it was written. All integers (exact in Lua's doubles below 2**53, see
`config.REDIS_MAX_RATE`): the debt drains by `rate` units per microsecond; a cost `c` fits when
`debt + c * 60e6 <= burst * 60e6`.

Settlement (refund unused reserved tokens, charge use beyond them, drop the lease) is a second
script, sent off the critical path after the reply. Concurrency leases expire `lease_ttl_ms`
after their last renewal; while requests run, each worker renews its leases every third of that.

Redis down or slow: every call has a deadline (`timeout_ms`); on a failure Redis is left alone
for `retry_interval_ms`, and meanwhile `fail_open` serves with this worker's local limits (one
log line per interval at most) and `fail_closed` answers 503 `limiter_unavailable`. The next
call after the interval tries Redis again: recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..config import Config, OnError
from ..context import RequestContext
from ..errors import Fault, GatewayError
from .limits import (
    _CONCURRENCY_RETRY_MS,
    _TOKEN_STATE,
    Lease,
    LimitsStage,
    _rate_limited,
    duration,
    tokens_refused_message,
    tokens_used,
)
from .reframe import counted_prompt_tokens

log = logging.getLogger("gateway.limits")

_LIB = """
if redis.replicate_commands then redis.replicate_commands() end
local U = 60000000
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
local function fdiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b)
  local q = fdiv(a, b)
  if q * b < a then q = q + 1 end
  return q
end
local function debt(key, rate)
  local v = redis.call('HMGET', key, 'd', 't')
  local d = tonumber(v[1])
  if not d then return 0 end
  local e = now - tonumber(v[2])
  if e < 0 then e = 0 end
  if e >= cdiv(d, rate) then return 0 end
  return d - e * rate
end
local function store(key, d, rate)
  if d <= 0 then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'd', string.format('%d', d), 't', string.format('%d', now))
    redis.call('PEXPIRE', key, cdiv(cdiv(d, rate), 1000) + 1000)
  end
end
"""

#: KEYS: requests bucket, tokens bucket, lease set.
#: ARGV: rpm, tpm, token cost, max concurrent (0 = no such limit), lease member, lease ttl ms.
#: -> {code (0 admitted, 1 concurrency, 2 requests, 3 tokens), requests remaining, reset ms,
#:     retry ms, tokens remaining, reset ms, retry ms}
ACQUIRE = (
    _LIB
    + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local maxc = tonumber(ARGV[4])
local ttl = tonumber(ARGV[6])
local dr = 0
local dt = 0
if rpm > 0 then dr = debt(KEYS[1], rpm) end
if tpm > 0 then dt = debt(KEYS[2], tpm) end
local code = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then code = 1 end
end
if code == 0 and rpm > 0 and dr + U > rpm * U then code = 2 end
if code == 0 and tpm > 0 and dt + cost * U > tpm * U then code = 3 end
if code == 0 then
  if rpm > 0 then
    dr = dr + U
    store(KEYS[1], dr, rpm)
  end
  if tpm > 0 and cost > 0 then
    dt = dt + cost * U
    store(KEYS[2], dt, tpm)
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[3], now + ttl * 1000, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
local function state(d, rate, c)
  if rate <= 0 then return 0, 0, 0 end
  local left = rate * U - d
  local rem = 0
  if left > 0 then rem = fdiv(left, U) end
  local reset = cdiv(cdiv(d, rate), 1000)
  local retry = 0
  if c > rate then retry = reset
  elseif d + c * U > rate * U then retry = cdiv(cdiv(d + c * U - rate * U, rate), 1000) end
  return rem, reset, retry
end
local r1, r2, r3 = state(dr, rpm, 1)
local t1, t2, t3 = state(dt, tpm, cost)
if code == 0 then r3 = 0; t3 = 0 end
return {code, r1, r2, r3, t1, t2, t3}
"""
)

#: KEYS: tokens bucket, lease set. ARGV: tpm (0 = none), tokens to give back (< 0: to charge),
#: lease member ('' = none).
SETTLE = (
    _LIB
    + """
local tpm = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local d = debt(KEYS[1], tpm) - delta * U
  if d < 0 then d = 0 end
  store(KEYS[1], d, tpm)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
return 1
"""
)

#: KEYS: one lease set. ARGV: lease ttl ms, members still running.
RENEW = (
    _LIB
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl * 1000, ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
)


_SHA = {s: hashlib.sha1(s.encode()).hexdigest() for s in (ACQUIRE, SETTLE, RENEW)}


class RedisLease(Lease):
    """A lease taken in Redis (a lease from the local fallback is a plain `Lease`)."""

    __slots__ = ("member", "tokens_remaining", "tokens_reset_ms")

    def __init__(
        self,
        key: str,
        tpm: int | None,
        prompt_tokens: int,
        reserved_tokens: int,
        member: str,
        tokens_remaining: int,
        tokens_reset_ms: int,
    ) -> None:
        super().__init__(key, tpm, prompt_tokens, reserved_tokens, member != "")
        #: this request's entry in the key's lease set ('' when the key has no concurrency limit)
        self.member = member
        self.tokens_remaining = tokens_remaining
        self.tokens_reset_ms = tokens_reset_ms


class _RedisDown(Exception):
    """Redis is failing (or was within `retry_interval_ms`)."""


class RedisLimitsStage:
    """Same interface and replies as `LimitsStage`; the state lives in Redis."""

    name = "limits"
    __slots__ = (
        "_client",
        "_down_until",
        "_fail_open",
        "_last_log",
        "_lease_ttl_ms",
        "_limit_headers",
        "_live",
        "_local",
        "_member_prefix",
        "_members",
        "_prefix",
        "_renewer",
        "_retry_s",
        "_tasks",
        "_timeout_s",
        "_where",
    )

    def __init__(self, cfg: Config) -> None:
        r = cfg.limits.redis
        # A blocking pool: a burst beyond max_connections waits for a connection (within the
        # call's deadline) instead of failing over. Reads and writes are bounded by `_run`'s
        # deadline (redis-py's own socket_timeout would add an asyncio.wait_for task per
        # command); connecting by socket_connect_timeout. No retries: a failure is reported.
        pool = aioredis.BlockingConnectionPool.from_url(
            r.url,
            max_connections=r.max_connections,
            timeout=None,
            socket_timeout=None,
            socket_connect_timeout=r.timeout_ms / 1000,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        url = urlsplit(r.url)
        self._where = f"{url.hostname}:{url.port or 6379}" if url.hostname else "unix socket"
        self._timeout_s = r.timeout_ms / 1000
        self._retry_s = r.retry_interval_ms / 1000
        self._fail_open = r.on_error is OnError.FAIL_OPEN
        self._lease_ttl_ms = r.lease_ttl_ms
        self._prefix = r.key_prefix
        #: the local limiter: the fallback of `fail_open`, and the reserve arithmetic's helpers
        self._local = LimitsStage(cfg)
        self._limit_headers = self._local._limit_headers
        self._down_until = 0.0
        self._last_log = -1e9
        self._member_prefix = os.urandom(6).hex() + ":"
        self._members = 0
        #: lease member -> lease set key, for renewal while the request runs
        self._live: dict[str, str] = {}
        self._renewer: asyncio.Task[None] | None = None
        #: settlements in flight (strong references until they finish)
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the request side ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None
        tier = principal.tier
        rpm, tpm, max_concurrent = tier.rpm, tier.tpm, tier.max_concurrent
        prompt = reserved = 0
        if tpm is not None:
            prompt = counted_prompt_tokens(ctx)
            reserved = prompt + self._local._completion_reserve(ctx)
        member = ""
        if max_concurrent is not None:
            self._members += 1
            member = f"{self._member_prefix}{self._members:x}"
        key = principal.key_id
        keys = self._keys(key)
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            return await self._fallback(ctx, None)
        try:
            res = await self._run(
                ACQUIRE, keys, (rpm or 0, tpm or 0, reserved, max_concurrent or 0, member, self._lease_ttl_ms)
            )
        except _RedisDown as exc:
            cause = exc.__cause__
            if member and isinstance(cause, (TimeoutError, RedisTimeoutError)):
                # the script may have run: drop the lease it may have added
                self._spawn(self._release(keys[2], member))
            return await self._fallback(ctx, cause)
        except asyncio.CancelledError:
            if member:
                self._spawn(self._release(keys[2], member))
            raise
        code, r_rem, r_reset, r_retry, t_rem, t_reset, t_retry = (int(v) for v in res)
        headers = self._limit_headers[principal.tier_name]
        if rpm is not None:
            headers += (
                ("x-ratelimit-remaining-requests", str(r_rem)),
                ("x-ratelimit-reset-requests", duration(r_reset)),
            )
        if tpm is not None:
            headers += (
                ("x-ratelimit-remaining-tokens", str(t_rem)),
                ("x-ratelimit-reset-tokens", duration(t_reset)),
            )
        ctx.ratelimit_headers = headers
        if code == 0:
            ctx.lease = RedisLease(key, tpm, prompt, reserved, member, t_rem, t_reset)
            if member:
                self._live[member] = keys[2]
                if self._renewer is None:
                    self._renewer = loop.create_task(self._renew_loop())
            return
        if code == 1:
            raise _rate_limited(
                f"Too many concurrent requests for this API key (limit {max_concurrent}).",
                _CONCURRENCY_RETRY_MS,
            )
        if code == 2:
            raise _rate_limited(f"Rate limit reached: {rpm} requests per minute for this API key.", r_retry)
        assert tpm is not None
        raise _rate_limited(tokens_refused_message(reserved, tpm), t_retry)

    async def _fallback(self, ctx: RequestContext, cause: BaseException | None) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_log >= max(self._retry_s, 10.0):
            self._last_log = now
            what = type(cause).__name__ if cause is not None else "unavailable"
            log.warning(
                "limits: Redis at %s failed (%s); %s for %g s",
                self._where,
                what,
                "serving with this worker's local limits"
                if self._fail_open
                else "refusing requests (fail_closed)",
                self._retry_s,
            )
        if not self._fail_open:
            raise GatewayError(
                Fault.LIMITER_UNAVAILABLE,
                "The rate limiter is unavailable; retry shortly.",
                headers=(("retry-after", str(max(1, -(-int(self._retry_s * 1000) // 1000)))),),
            )
        await self._local.on_request(ctx)

    # ---- the finish side ----------------------------------------------------------------------
    def on_finish(self, ctx: RequestContext) -> None:
        lease = ctx.lease
        if lease is None:
            return
        if not isinstance(lease, RedisLease):
            self._local.on_finish(ctx)
            return
        ctx.lease = None
        member = lease.member
        if member:
            self._live.pop(member, None)
        tpm = lease.tpm
        unused = 0
        if tpm is not None:
            unused = lease.reserved_tokens - tokens_used(ctx, lease.prompt_tokens)
            if ctx.status == 0:  # a reply is still to come: its headers show the settled state
                remaining = min(tpm, max(0, lease.tokens_remaining + unused))
                reset = max(0, lease.tokens_reset_ms - unused * 60_000 // tpm)
                ctx.ratelimit_headers = (
                    *(h for h in ctx.ratelimit_headers if h[0] not in _TOKEN_STATE),
                    ("x-ratelimit-remaining-tokens", str(remaining)),
                    ("x-ratelimit-reset-tokens", duration(reset)),
                )
        if unused or member:
            keys = self._keys(lease.key)
            self._spawn(self._settle(keys, tpm or 0, unused, member))

    async def _settle(self, keys: tuple[str, str, str], tpm: int, unused: int, member: str) -> None:
        # On failure the refund is lost (the key is charged more, never less) and the lease expires.
        with contextlib.suppress(_RedisDown):
            await self._run(SETTLE, (keys[1], keys[2]), (tpm, unused, member))

    async def _release(self, lease_set: str, member: str) -> None:
        with contextlib.suppress(_RedisDown):
            await self._run(SETTLE, (lease_set, lease_set), (0, 0, member), force=True)

    async def _renew_loop(self) -> None:
        try:
            while self._live:
                await asyncio.sleep(self._lease_ttl_ms / 3000)
                by_set: dict[str, list[str]] = {}
                for member, lease_set in self._live.items():
                    by_set.setdefault(lease_set, []).append(member)
                for lease_set, members in by_set.items():
                    try:
                        await self._run(RENEW, (lease_set,), (self._lease_ttl_ms, *members), force=True)
                    except _RedisDown:
                        break
        finally:
            self._renewer = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- Redis --------------------------------------------------------------------------------
    def _keys(self, key_id: str) -> tuple[str, str, str]:
        base = f"{self._prefix}{{{key_id}}}:"
        return base + "r", base + "t", base + "c"

    async def _run(
        self, script: str, keys: tuple[str, ...], args: tuple[int | str, ...], force: bool = False
    ) -> list[Any]:
        """One script call under the deadline: EVALSHA, then EVAL when Redis does not know the
        script (first use, or Redis restarted). Raises `_RedisDown` on any failure."""
        loop = asyncio.get_running_loop()
        if not force and loop.time() < self._down_until:
            raise _RedisDown
        client = self._client
        try:
            async with asyncio.timeout(self._timeout_s):
                try:
                    res = await cast(
                        Awaitable[list[Any]], client.evalsha(_SHA[script], len(keys), *keys, *args)
                    )
                except NoScriptError:
                    res = await cast(Awaitable[list[Any]], client.eval(script, len(keys), *keys, *args))
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = loop.time() + self._retry_s
            raise _RedisDown from exc
        if self._down_until:
            self._down_until = 0.0
            log.warning("limits: Redis at %s answers again; limits are shared again", self._where)
        return res
