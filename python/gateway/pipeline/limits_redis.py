"""Stage `limits`, backend `redis`: the same limits as the local backend, held in Redis so that
every worker process and every gateway instance shares them exactly.

One round trip per decision: a Lua script (EVALSHA, EVAL on NOSCRIPT) reads every check of the
request's plan (`limits.Plan`: concurrency lease sets, requests and tokens buckets, budget
hashes; of the key, the key on this model, and the key's team) and, only when all admit, takes
a request, reserves the tokens and the cost and adds the leases, atomically; a refused request
changes nothing (expired leases are pruned, nothing is counted). Time comes from Redis `TIME`
inside the script, so gateway clocks do not matter; the budget windows (UTC day, UTC calendar
month) are computed there from it too. Every key has a TTL: a bucket's key expires when the
bucket would be full again (a full bucket is no key at all), a lease set when its newest lease
expires, a budget hash 33 days after its last write. The keys of one decision share one hash
tag (`{key_id}`, or `{team:<team>}` when the team has shared limits): one cluster slot.

A budget hash holds `d`/`ds` (UTC day number, nano-USD spent that day) and `m`/`ms` (UTC month
number, nano-USD spent that month); a stored window that is not the current one counts as 0.

Buckets are GCRA with the theoretical arrival time kept relative to the last update: `d`, the
bucket's debt in units of 1/60,000,000 token (a microsecond at one token per minute), and `t`,
when it was written. All integers (exact in Lua's doubles below 2**53, see
`config.REDIS_MAX_RATE`): the debt drains by `rate` units per microsecond; a cost `c` fits when
`debt + c * 60e6 <= burst * 60e6`.

Settlement (refund unused reserved tokens and money, charge use beyond them, drop the leases)
is a second script, sent after the reply and not waited for; it adjusts the budget windows
the reservation was made in, or nothing once they have ended. Concurrency leases expire `lease_ttl_ms`
after their last renewal; while requests run, each worker renews its leases every third of that.

Redis is spoken to by `redis_resp` (not redis-py: several times its CPU per call), one pipelined
connection per worker, so a settlement or lease release sent without waiting still reaches
Redis before any later decision of this worker.

Redis down or slow: every call has a deadline (`timeout_ms`); on a failure Redis is left alone
for `retry_interval_ms`, and meanwhile `fail_open` serves with this worker's local limits (one
log line per interval at most) and `fail_closed` answers 503 `limiter_unavailable`. The next
call after the interval tries Redis again: recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from .. import redis_resp
from ..config import Config, OnError
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..quota import BUDGET, CONC, RPM, TPM, Lease, Plan
from ..usage import cost_used, tokens_used
from .limits import (
    _CONCURRENCY_RETRY_MS,
    _TOKEN_STATE,
    KIND_CODE,
    LimitsStage,
    _rate_limited,
    budget_refused,
    duration,
    tokens_refused_message,
)

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

#: Days since 1970-01-01 -> the UTC calendar month as year * 12 + month - 1 (H. Hinnant's
#: civil_from_days, on integers).
_CIVIL = """
local function month_of(days)
  local z = days + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y * 12 + m - 1
end
"""

#: KEYS: one per check, in the plan's order. ARGV: lease member, lease ttl ms, then 4 per check:
#: kind ('c' lease set, 'r' bucket, 'b' budget hash), limit, limit2, cost.
#:   'c': at most `limit` live leases; 'r': GCRA of `limit` per minute (= burst), cost tokens;
#:   'b': nano-USD spent in the UTC day (<= limit) and month (<= limit2), 0 = none, -1 = nothing.
#: Every check is read; only when all admit are all taken (a refused request changes nothing).
#: -> {code (0 admitted, else the index of the first refusing check), now s, UTC day, UTC month,
#:     then 3 per check: 'r': remaining, reset ms, retry ms; 'c': leases held;
#:     'b': day spent, month spent, the refusing window (0, 1 day, 2 month)}
ACQUIRE = (
    _LIB
    + _CIVIL
    + """
local member = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = #KEYS
local day = fdiv(now, 86400000000)
local month = -1
local code = 0
local st = {}
local over = {}
for i = 1, n do
  local kind = ARGV[4 * i - 1]
  local a = tonumber(ARGV[4 * i])
  local c = tonumber(ARGV[4 * i + 2])
  local key = KEYS[i]
  if kind == 'r' then
    st[i] = debt(key, a)
    if code == 0 and st[i] + c * U > a * U then code = i end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    st[i] = redis.call('ZCARD', key)
    if code == 0 and st[i] >= a then code = i end
  else
    local b = tonumber(ARGV[4 * i + 1])
    if month < 0 then month = month_of(day) end
    local v = redis.call('HMGET', key, 'd', 'ds', 'm', 'ms')
    local sd = 0
    local sm = 0
    if tonumber(v[1]) == day then sd = tonumber(v[2]) end
    if tonumber(v[3]) == month then sm = tonumber(v[4]) end
    st[i] = {sd, sm}
    over[i] = 0
    if c > 0 then
      if a ~= 0 and sd + c > a then over[i] = 1 elseif b ~= 0 and sm + c > b then over[i] = 2 end
    end
    if code == 0 and over[i] > 0 then code = i end
  end
end
if code == 0 then
  for i = 1, n do
    local kind = ARGV[4 * i - 1]
    local a = tonumber(ARGV[4 * i])
    local c = tonumber(ARGV[4 * i + 2])
    local key = KEYS[i]
    if kind == 'r' then
      if c > 0 then
        st[i] = st[i] + c * U
        store(key, st[i], a)
      end
    elseif kind == 'c' then
      redis.call('ZADD', key, now + ttl * 1000, member)
      redis.call('PEXPIRE', key, ttl)
      st[i] = st[i] + 1
    elseif c > 0 then
      local s = st[i]
      s[1] = s[1] + c
      s[2] = s[2] + c
      redis.call('HSET', key, 'd', string.format('%d', day), 'ds', string.format('%d', s[1]),
                 'm', string.format('%d', month), 'ms', string.format('%d', s[2]))
      redis.call('PEXPIRE', key, BUDGET_TTL_MS)
    end
  end
end
local out = {code, fdiv(now, 1000000), day, month}
for i = 1, n do
  local kind = ARGV[4 * i - 1]
  local a = tonumber(ARGV[4 * i])
  local c = tonumber(ARGV[4 * i + 2])
  if kind == 'r' then
    local d = st[i]
    local left = a * U - d
    local rem = 0
    if left > 0 then rem = fdiv(left, U) end
    local reset = cdiv(cdiv(d, a), 1000)
    local retry = 0
    if code ~= 0 then
      if c > a then retry = reset
      elseif d + c * U > a * U then retry = cdiv(cdiv(d + c * U - a * U, a), 1000) end
    end
    out[#out + 1] = rem
    out[#out + 1] = reset
    out[#out + 1] = retry
  elseif kind == 'c' then
    out[#out + 1] = st[i]
    out[#out + 1] = 0
    out[#out + 1] = 0
  else
    out[#out + 1] = st[i][1]
    out[#out + 1] = st[i][2]
    out[#out + 1] = over[i]
  end
end
return out
"""
).replace("BUDGET_TTL_MS", str(33 * 86_400_000))  # the longest month, and a day to settle

#: KEYS: what the lease holds (token buckets, lease sets, budget hashes). ARGV: lease member,
#: tokens to give back (< 0: to charge), nano-USD to give back (< 0: to charge), the UTC day and
#: month of the reservation, then 2 per key: kind ('r', 'c', 'b'), limit per minute ('r').
SETTLE = (
    _LIB
    + """
local member = ARGV[1]
local dt = tonumber(ARGV[2])
local dc = tonumber(ARGV[3])
local day = ARGV[4]
local month = ARGV[5]
for i = 1, #KEYS do
  local kind = ARGV[4 + 2 * i]
  local key = KEYS[i]
  if kind == 'r' then
    if dt ~= 0 then
      local a = tonumber(ARGV[5 + 2 * i])
      local d = debt(key, a) - dt * U
      if d < 0 then d = 0 end
      store(key, d, a)
    end
  elseif kind == 'c' then
    if member ~= '' then redis.call('ZREM', key, member) end
  elseif dc ~= 0 then
    -- a window that has ended since the reservation is left alone
    local v = redis.call('HMGET', key, 'd', 'ds', 'm', 'ms')
    if v[1] == day then
      local s = tonumber(v[2]) - dc
      if s < 0 then s = 0 end
      redis.call('HSET', key, 'ds', string.format('%d', s))
    end
    if v[3] == month then
      local s = tonumber(v[4]) - dc
      if s < 0 then s = 0 end
      redis.call('HSET', key, 'ms', string.format('%d', s))
    end
  end
end
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


class RedisLease(Lease):
    """A lease taken in Redis (a lease from the local fallback is a plain `Lease`)."""

    __slots__ = ("member", "tokens_limit", "tokens_remaining", "tokens_reset_ms")

    def __init__(
        self, key: str, plan: Plan, prompt_tokens: int, reserved_tokens: int, reserved_cost: int, member: str
    ) -> None:
        super().__init__(key, plan, prompt_tokens, reserved_tokens, reserved_cost)
        #: this request's entry in its lease sets ('' when no concurrency limit applies)
        self.member = member
        #: the tightest token bucket after the decision, for the settled reply's headers
        self.tokens_limit = 0
        self.tokens_remaining = 0
        self.tokens_reset_ms = 0


class _Names:
    """A plan's Redis side: its keys, its lease sets, and what settlement touches."""

    __slots__ = ("keys", "lease_sets", "plan", "settle_args", "settle_keys")

    def __init__(self, plan: Plan, prefix: str) -> None:
        self.plan = plan
        self.keys = tuple(prefix + c.local_key for c in plan.checks)
        self.lease_sets = tuple(prefix + c.local_key for c in plan.checks if c.kind == CONC)
        self.settle_keys = tuple(prefix + c.local_key for c in plan.settle_checks)
        self.settle_args = tuple(x for c in plan.settle_checks for x in (KIND_CODE[c.kind], c.limit))


class _RedisDown(Exception):
    """Redis is failing (or was within `retry_interval_ms`)."""


class RedisLimitsStage:
    """Same interface and replies as `LimitsStage`; the state lives in Redis."""

    name = "limits"
    __slots__ = (
        "_acquire",
        "_client",
        "_down_until",
        "_fail_open",
        "_last_log",
        "_lease_ttl_ms",
        "_live",
        "_local",
        "_member_prefix",
        "_members",
        "_names",
        "_prefix",
        "_refused",
        "_renew",
        "_renewer",
        "_retry_s",
        "_settle",
        "_timeout_s",
        "_where",
    )

    def __init__(self, cfg: Config) -> None:
        r = cfg.limits.redis
        self._timeout_s = r.timeout_ms / 1000
        self._retry_s = r.retry_interval_ms / 1000
        # One pipelined connection per worker (Redis runs one command at a time anyway, and
        # the Lua scripts are atomic: `max_connections` is an upper bound, one is used). Every
        # call has the `timeout_ms` deadline, connecting too; no retries: a failure is
        # reported. Reconnecting backs off at most `retry_interval_ms`, so the first call after
        # that interval really tries Redis again.
        self._client = redis_resp.Redis(
            r.url,
            timeout_s=self._timeout_s,
            connect_timeout_s=self._timeout_s,
            backoff_min_s=min(0.05, self._retry_s),
            backoff_max_s=self._retry_s,
        )
        self._where = self._client.where
        self._acquire = self._client.register_script(ACQUIRE)
        self._settle = self._client.register_script(SETTLE)
        self._renew = self._client.register_script(RENEW)
        self._fail_open = r.on_error is OnError.FAIL_OPEN
        self._lease_ttl_ms = r.lease_ttl_ms
        self._prefix = r.key_prefix
        #: the local limiter: the fallback of `fail_open`, and the plans and reservations
        self._local = LimitsStage(cfg)
        #: plan -> its Redis keys and static script arguments (plans are cached, so are these)
        self._names: dict[int, _Names] = {}
        self._down_until = 0.0
        self._last_log = -1e9
        self._member_prefix = os.urandom(6).hex() + ":"
        self._members = 0
        #: lease member -> its lease sets, for renewal while the request runs
        self._live: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None
        #: (key id, model) -> (monotonic time until which it is refused, message, headers): a request
        #: refused by a requests-per-minute bucket is refused until the bucket's retry time
        #: whatever any worker does meanwhile (admissions never make it sooner), so repeats are
        #: answered here, off the network. Exact; token, budget and concurrency refusals depend
        #: on each request's size or on releases, so they are not cached.
        self._refused: dict[tuple[str, str], tuple[float, str, tuple[tuple[str, str], ...]]] = {}

    def _names_of(self, plan: Plan) -> _Names:
        names = self._names.get(id(plan))
        if names is None or names.plan is not plan:
            if len(self._names) >= 10_000:
                self._names.clear()
            names = self._names[id(plan)] = _Names(plan, self._prefix)
        return names

    # ---- the request side ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None and ctx.route is not None
        local = self._local
        plan = local.plan(principal, ctx.route.name)
        if not plan.checks:  # no limit applies to this key and model: no round trip
            return
        now = time.monotonic()  # not the loop's: get_running_loop() is a getpid() syscall on 3.11
        refused = self._refused.get((principal.key_id, ctx.route.name)) if self._refused else None
        if refused is not None:
            wait_ms = int((refused[0] - now) * 1000)
            if wait_ms > 0:
                ctx.ratelimit_headers = tuple(
                    (k, duration(wait_ms) if k == "x-ratelimit-reset-requests" else v) for k, v in refused[2]
                )
                raise _rate_limited(refused[1], wait_ms)
            del self._refused[(principal.key_id, ctx.route.name)]
        prompt, tokens, cost = local.reservation(ctx, plan)
        member = ""
        if plan.has_conc:
            self._members += 1
            member = f"{self._member_prefix}{self._members:x}"
        names = self._names_of(plan)
        if now < self._down_until:
            return await self._fallback(ctx, None)
        args: list[int | str] = [member, self._lease_ttl_ms]
        costs = (0, 1, tokens, cost)  # by kind: CONC, RPM, TPM, BUDGET
        for c in plan.checks:
            args += (KIND_CODE[c.kind], c.limit, c.limit2, costs[c.kind])
        try:
            res = await self._run(self._acquire, names.keys, args)
        except _RedisDown as exc:
            cause = exc.__cause__
            if member and isinstance(cause, redis_resp.OutcomeUnknownError):
                # the script may have run: drop the lease it may have added
                self._release(names.lease_sets, member)
            return await self._fallback(ctx, cause)
        except asyncio.CancelledError:
            if member:  # sent after the decision on the same connection: it runs after it
                self._release(names.lease_sets, member)
            raise
        code, now_s, day, month = (int(v) for v in res[:4])
        vals = [int(v) for v in res[4:]]
        headers: tuple[tuple[str, str], ...] = ()
        tightest: dict[int, tuple[int, int, int]] = {}
        for i, c in enumerate(plan.checks):
            if c.kind == RPM or c.kind == TPM:
                rem = vals[3 * i]
                best = tightest.get(c.kind)
                if best is None or rem < best[1]:
                    tightest[c.kind] = (c.limit, rem, vals[3 * i + 1])
        for kind, what in ((RPM, "requests"), (TPM, "tokens")):
            best = tightest.get(kind)
            if best is not None:
                headers += (
                    (f"x-ratelimit-limit-{what}", str(best[0])),
                    (f"x-ratelimit-remaining-{what}", str(best[1])),
                    (f"x-ratelimit-reset-{what}", duration(best[2])),
                )
        ctx.ratelimit_headers = headers
        if code == 0:
            lease = RedisLease(principal.key_id, plan, prompt, tokens, cost, member)
            lease.day, lease.month = day, month
            best = tightest.get(TPM)
            if best is not None:
                lease.tokens_limit, lease.tokens_remaining, lease.tokens_reset_ms = best
            ctx.lease = lease
            if plan.has_budget:
                checks = enumerate(plan.checks)
                budgets = [(c, vals[3 * i], vals[3 * i + 1]) for i, c in checks if c.kind == BUDGET]
                local.stream_allowance(ctx, lease, budgets)
            if member:
                self._live[member] = names.lease_sets
                if self._renewer is None:
                    self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
            return
        i = code - 1
        c = plan.checks[i]
        if c.kind == CONC:
            raise _rate_limited(
                f"Too many concurrent requests for this {c.scope} (limit {c.limit}).", _CONCURRENCY_RETRY_MS
            )
        if c.kind == RPM:
            message = f"Rate limit reached: {c.limit} requests per minute for this {c.scope}."
            retry_ms = vals[3 * i + 2]
            if len(self._refused) >= 10_000:
                self._refused.clear()
            self._refused[(principal.key_id, ctx.route.name)] = (
                time.monotonic() + retry_ms / 1000,
                message,
                headers,
            )
            raise _rate_limited(message, retry_ms)
        if c.kind == TPM:
            raise _rate_limited(tokens_refused_message(tokens, c.limit, c.scope), vals[3 * i + 2])
        monthly = vals[3 * i + 2] == 2
        limit, spent = (c.limit2, vals[3 * i + 1]) if monthly else (c.limit, vals[3 * i])
        raise budget_refused(c.scope, monthly, limit, spent, cost, now_s)

    async def _fallback(self, ctx: RequestContext, cause: BaseException | None) -> None:
        now = time.monotonic()
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
        plan = lease.plan
        unused = 0
        if plan.tpm_limits:
            unused = lease.reserved_tokens - tokens_used(ctx, lease.prompt_tokens)
            tpm = lease.tokens_limit
            if ctx.status == 0 and tpm:  # a reply is still to come: its headers show the settled state
                remaining = min(tpm, max(0, lease.tokens_remaining + unused))
                reset = max(0, lease.tokens_reset_ms - unused * 60_000 // tpm)
                ctx.ratelimit_headers = (
                    *(h for h in ctx.ratelimit_headers if h[0] not in _TOKEN_STATE),
                    ("x-ratelimit-remaining-tokens", str(remaining)),
                    ("x-ratelimit-reset-tokens", duration(reset)),
                )
        unused_cost = lease.reserved_cost - cost_used(ctx, lease) if plan.has_budget else 0
        if (unused or unused_cost or member) and time.monotonic() >= self._down_until:
            # Not waited for. On failure (or while Redis is down) the refund is lost (the key
            # is charged more, never less) and the lease expires.
            names = self._names_of(plan)
            args = (member, unused, unused_cost, lease.day, lease.month, *names.settle_args)
            self._client.evalsha_nowait(self._settle, names.settle_keys, args)

    def _release(self, lease_sets: tuple[str, ...], member: str) -> None:
        """Drop `member` from its lease sets (not waited for; if it fails, the lease expires)."""
        args = (member, 0, 0, 0, -1, *(x for _ in lease_sets for x in ("c", 0)))
        self._client.evalsha_nowait(self._settle, lease_sets, args)

    async def _renew_loop(self) -> None:
        try:
            while self._live:
                await asyncio.sleep(self._lease_ttl_ms / 3000)
                by_set: dict[str, list[str]] = {}
                for member, lease_sets in self._live.items():
                    for lease_set in lease_sets:
                        by_set.setdefault(lease_set, []).append(member)
                for lease_set, members in by_set.items():
                    try:
                        await self._run(self._renew, (lease_set,), (self._lease_ttl_ms, *members), force=True)
                    except _RedisDown:
                        break
        finally:
            self._renewer = None

    async def settled(self) -> None:
        """Wait until the settlements and releases sent so far have run (or failed)."""
        with contextlib.suppress(redis_resp.RedisError):
            await self._client.barrier()

    async def close(self) -> None:
        """Stop renewing, let the settlements in flight finish, close the connection."""
        renewer = self._renewer
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        await self._client.close()

    # ---- Redis --------------------------------------------------------------------------------
    async def _run(
        self, sha: str, keys: Sequence[str], args: Sequence[int | str], force: bool = False
    ) -> Any:
        """One script call under the deadline (NOSCRIPT is handled by the client). Raises
        `_RedisDown` on any failure."""
        if not force and time.monotonic() < self._down_until:
            raise _RedisDown
        try:
            res = await self._client.evalsha(sha, keys, args)
        except (redis_resp.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self._retry_s
            raise _RedisDown from exc
        if self._down_until:
            self._down_until = 0.0
            log.warning("limits: Redis at %s answers again; limits are shared again", self._where)
        return res
