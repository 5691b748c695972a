"""The `redis` limits store: the same checks as the local store, held in Redis so that every
worker process and every gateway instance shares them exactly. One round trip per decision (a
Lua script, EVALSHA; the client re-sends it with EVAL on NOSCRIPT), a settlement script sent
after the reply and not waited for, and concurrency slots as leases renewed while requests run.

Redis is spoken to by `redis_resp` (not redis-py: several times its CPU per call), one pipelined
connection per worker, so a settlement sent without waiting still reaches Redis before any later
decision of this worker. Every call has a deadline (`timeout_ms`); after a failure Redis is left
alone for `retry_interval_ms` (`StoreUnavailable`: the stage answers 503 under `fail_closed`,
`FailOpenStore` decides locally under `fail_open`), then tried again: recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from ... import redis_resp
from ...config import Config, OnError
from ...quota import CONC, RPM, TPM, Lease, Plan
from .store import Decision, State, StoreUnavailable

log = logging.getLogger("gateway.limits")

#: Token refunds wait at most this long for a decision to carry them (`RedisStore._refunds`).
REFUND_DELAY_S = 0.01

#: The scripts' kind codes, by `CheckKind`: a lease set, a bucket (RPM and TPM), a window hash
#: (a budget, requests per day: settled by money or not at all; 'q', tokens per day / month:
#: settled by tokens).
KIND_CODE = ("c", "r", "r", "b", "b", "q")

# Shared by the scripts: Redis `TIME` (gateway clocks do not matter; the budget windows are
# computed from it too), floor and ceiling division on integers, and the GCRA buckets.
#
# A bucket keeps its theoretical arrival time relative to the last update: `d`, its debt in units
# of 1/60,000,000 token (a microsecond at one token per minute), and `t`, when it was written, as
# one string `d:t` (GET, then SET with its PX: two commands, the fewest a bucket can cost).
# All integers, exact in Lua's doubles below 2**53 (see `config.REDIS_MAX_RATE`): the debt drains
# by `rate` units per microsecond; a cost `c` fits when `debt + c * 60e6 <= burst * 60e6`. A full
# bucket is no key at all; a bucket's key expires when the bucket would be full again.
LUA_LIB = """
local U = 60000000
local tm = redis.call('TIME')
local now = tm[1] * 1000000 + tm[2]
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
  local v = redis.pcall('GET', key)
  if not v then return 0 end
  if type(v) == 'table' then
    -- a bucket of a version before 2026-12 (a hash): it starts over, once
    redis.call('DEL', key)
    return 0
  end
  local p = string.find(v, ':', 1, true)
  local d = tonumber(string.sub(v, 1, p - 1))
  local e = now - tonumber(string.sub(v, p + 1))
  if e < 0 then e = 0 end
  if e * rate >= d then return 0 end
  return d - e * rate
end
local function store(key, d, rate)
  if d <= 0 then
    redis.call('DEL', key)
  else
    -- a TTL (not exact arithmetic): full again, and a second's margin
    redis.call('SET', key, string.format('%d:%d', d, now), 'PX', math.ceil(d / (rate * 1000)) + 1000)
  end
end
"""

#: Days since 1970-01-01 -> the UTC calendar month as year * 12 + month - 1 (H. Hinnant's
#: civil_from_days, on integers). Needs `fdiv` (LUA_LIB).
LUA_MONTH_OF = """
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

# The decision. KEYS: one per check, in the plan's order (they share one hash tag, `{key_id}`
# or `{team:<team>}` when the team has shared limits: one Redis Cluster slot). ARGV: lease
# member, lease ttl ms, then 6 per check: kind, limit, limit2, cost, enforce (1, or 0: shadow),
# give back (tokens a settlement of this worker left unused, given back first, whatever the
# decision: `RedisStore.settle` defers pure token refunds to ride on the next decision).
#   'c': a lease set (ZSET member -> expiry): at most `limit` live leases;
#   'r': a GCRA bucket of `limit` per minute (= burst), taking `cost` tokens;
#   'b' / 'q': a window hash (a budget, or a quota counting requests or tokens in its place):
#        `d`/`ds` (UTC day number, nano-USD spent that day) and `m`/`ms` (UTC
#        month number, spent that month; a stored window that is not the current one counts as
#        0), at most `limit` a day and `limit2` a month (0 = none, -1 = nothing); 33 days TTL
#        from the first write of its last UTC day (the longest month, and a day to settle).
# Every check is read (expired leases are pruned); only when no enforced check refuses are all
# taken but the shadow checks that would refuse (a refused request changes nothing).
# -> {code (0 admitted, else the index of the first refusing enforced check), now s, UTC day,
#     UTC month, then 4 per check: fits (1/0), then 'r': the debt (after the take when taken:
#     `bucket_state` derives remaining, reset and retry in Python, exact integers, less Lua), 0, 0;
#     'c': leases held, 0, 0; 'b': day spent, month spent, the window it does not fit (0, 1, 2)}
# Written for Redis CPU (it runs on every request; benchmarks/exact_decision_cost.py,
# benchmarks/results/2026-12-05-exact-decision.md): Redis's Lua spends ~0.1-0.2 µs per C function
# call and per table, so the same arithmetic and commands as `LUA_LIB`'s `debt` / `store` and
# `month_of` are inlined (no closures made per call), strings become numbers by arithmetic
# coercion (`x + 0`: the same conversion as `tonumber`, no call), the library functions are looked
# up once, no table is made per check (the state lives in the reply table, allocated once at its
# usual size; slot 3 of a bucket marks a refund to write back until the reply is complete), the
# day comes from TIME's seconds (floor(now / 86400e6) = floor(s / 86400)), and a budget hash whose
# windows are current is written in 2 fields, not 4. Replies, keys, values and TTLs are the same.
ACQUIRE = """
local rcall, rpcall = redis.call, redis.pcall
local find, sub, fmt, ceil = string.find, string.sub, string.format, math.ceil
local tm = rcall('TIME')
local sec = tm[1] + 0
local now = sec * 1000000 + tm[2]
local day = (sec - sec % 86400) / 86400
local n = #KEYS
local out = {0, sec, day, -1, 0, 0, 0, 0, 0, 0, 0, 0}
local code = 0
local today = nil
local dirty = false
for i = 1, n do
  local j = 6 * i - 3
  local kind = ARGV[j]
  local a = ARGV[j + 1] + 0
  local c = ARGV[j + 3] + 0
  local key = KEYS[i]
  local o = 4 * i
  local fits = 1
  if kind == 'r' then
    local d = 0
    local v = rpcall('GET', key)
    if v then
      if type(v) == 'table' then
        rcall('DEL', key)
      else
        local p = find(v, ':', 1, true)
        d = sub(v, 1, p - 1) + 0
        local e = now - sub(v, p + 1)
        if e < 0 then e = 0 end
        if e * a >= d then d = 0 else d = d - e * a end
      end
    end
    local given = 0
    local g = ARGV[j + 5] + 0
    if g > 0 and d > 0 then
      d = d - g * 60000000
      if d < 0 then d = 0 end
      dirty = true
      given = 1
    end
    if d + c * 60000000 > a * 60000000 then fits = 0 end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = fits, d, given, 0
  elseif kind == 'c' then
    local held = rcall('ZCARD', key)
    if held >= a then
      rcall('ZREMRANGEBYSCORE', key, '-inf', now)
      held = rcall('ZCARD', key)
    end
    if held >= a then fits = 0 end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = fits, held, 0, 0
  else
    local b = ARGV[j + 2] + 0
    local month = out[4]
    if month < 0 then
      -- `month_of` with floor(a / b) as (a - a % b) / b: all positive here, no call
      local z = day + 719468
      local era = (z - z % 146097) / 146097
      local doe = z - era * 146097
      local yoe = doe - (doe - doe % 1460) / 1460 + (doe - doe % 36524) / 36524
      yoe = yoe - (doe - doe % 146096) / 146096
      yoe = (yoe - yoe % 365) / 365
      local y = yoe + era * 400
      local doy = doe - (365 * yoe + (yoe - yoe % 4) / 4 - (yoe - yoe % 100) / 100)
      local mp = (5 * doy + 2 - (5 * doy + 2) % 153) / 153
      local m = mp + 3
      if mp >= 10 then m = mp - 9 end
      if m <= 2 then y = y + 1 end
      month = y * 12 + m - 1
      out[4] = month
    end
    local v = rcall('HMGET', key, 'd', 'ds', 'm', 'ms')
    local sd = 0
    local sm = 0
    local td = tonumber(v[1]) == day
    local tmo = tonumber(v[3]) == month
    if td then sd = v[2] + 0 end
    if tmo then sm = v[4] + 0 end
    today = today or {}
    if not td then today[i] = 0 elseif tmo then today[i] = 2 else today[i] = 1 end
    local over = 0
    if c > 0 then
      if a ~= 0 and sd + c > a then over = 1 elseif b ~= 0 and sm + c > b then over = 2 end
    end
    if over > 0 then fits = 0 end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = fits, sd, sm, over
  end
  if code == 0 and fits == 0 and ARGV[j + 4] == '1' then code = i end
end
if code == 0 then
  for i = 1, n do
    local o = 4 * i
    local j = 6 * i - 3
    if out[o + 1] == 1 then
      local kind = ARGV[j]
      local c = ARGV[j + 3] + 0
      if kind == 'r' then
        if c > 0 then
          local d = out[o + 2] + c * 60000000
          out[o + 2] = d
          rcall('SET', KEYS[i], fmt('%d:%d', d, now), 'PX', ceil(d / (ARGV[j + 1] * 1000)) + 1000)
          out[o + 3] = 0
        end
      elseif kind == 'c' then
        local ttl = ARGV[2] + 0
        rcall('ZADD', KEYS[i], now + ttl * 1000, ARGV[1])
        rcall('PEXPIRE', KEYS[i], ttl)
        out[o + 2] = out[o + 2] + 1
      elseif c > 0 then
        local sd = out[o + 2] + c
        local sm = out[o + 3] + c
        out[o + 2], out[o + 3] = sd, sm
        if today[i] == 2 then
          rcall('HSET', KEYS[i], 'ds', fmt('%d', sd), 'ms', fmt('%d', sm))
        else
          rcall('HSET', KEYS[i], 'd', fmt('%d', day), 'ds', fmt('%d', sd), 'm', fmt('%d', out[4]),
                     'ms', fmt('%d', sm))
          if today[i] == 0 then rcall('PEXPIRE', KEYS[i], BUDGET_TTL_MS) end
        end
      end
    end
  end
end
if dirty then
  for i = 1, n do
    if out[4 * i + 3] == 1 and ARGV[6 * i - 3] == 'r' then
      out[4 * i + 3] = 0
      local d = out[4 * i + 2]
      if d <= 0 then
        rcall('DEL', KEYS[i])
      else
        rcall('SET', KEYS[i], fmt('%d:%d', d, now), 'PX', ceil(d / (ARGV[6 * i - 2] * 1000)) + 1000)
      end
    end
  end
end
out[1] = code
for k = 4 * n + 5, 12 do out[k] = nil end
return out
""".replace("BUDGET_TTL_MS", str(33 * 86_400_000))

# The settlement: give back unused reserved tokens and money, charge use beyond them, drop the
# leases. KEYS: what the lease holds (token buckets, lease sets, budget hashes). ARGV: lease
# member, tokens to give back (< 0: to charge), nano-USD to give back (< 0: to charge), the UTC
# day and month of the reservation, then 2 per key: kind ('r', 'c', 'b', 'q'), limit per minute
# ('r').
# It adjusts the budget windows the reservation was made in, or nothing once they have ended.
SETTLE = (
    LUA_LIB
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
  else
    -- a budget gives back money, a token quota ('q') tokens
    local x = dc
    if kind == 'q' then x = dt end
    -- a window that has ended since the reservation is left alone
    local v = {}
    if x ~= 0 then v = redis.call('HMGET', key, 'd', 'ds', 'm', 'ms') end
    if x ~= 0 and v[1] == day then
      local s = tonumber(v[2]) - x
      if s < 0 then s = 0 end
      redis.call('HSET', key, 'ds', string.format('%d', s))
    end
    if x ~= 0 and v[3] == month then
      local s = tonumber(v[4]) - x
      if s < 0 then s = 0 end
      redis.call('HSET', key, 'ms', string.format('%d', s))
    end
  end
end
return 1
"""
)

# Lease renewal: a concurrency lease expires `lease_ttl_ms` after its last renewal (so a crashed
# worker cannot leak slots); while requests run, each worker renews its leases every third of
# that. KEYS: one lease set. ARGV: lease ttl ms, members still running.
RENEW = (
    LUA_LIB
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl * 1000, ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bucket_state(fits: int, debt: int, limit: int, cost: int) -> State:
    """A bucket's state from its debt (units of 1/60e6 token): (fits, remaining, reset ms, retry
    ms when it does not fit), on Python's exact integers (the script only returns the debt)."""
    full = limit * 60_000_000
    remaining = (full - debt) // 60_000_000 if full > debt else 0
    reset = _cdiv(_cdiv(debt, limit), 1000)
    retry = 0
    if not fits:
        over = debt + cost * 60_000_000 - full
        retry = reset if cost > limit else _cdiv(_cdiv(over, limit), 1000)
    return (fits, remaining, reset, retry)


class PlanKeys:
    """A plan's Redis side: its keys, the static script arguments, what settlement touches."""

    __slots__ = ("check_args", "keys", "lease_sets", "plan", "settle_args", "settle_keys", "tpm_keys")

    def __init__(self, plan: Plan, prefix: str) -> None:
        self.plan = plan
        self.keys = tuple(prefix + c.local_key for c in plan.checks)
        #: per check: kind, limit, limit2 (the cost and enforce follow)
        self.check_args = tuple((KIND_CODE[c.kind], c.limit, c.limit2, int(c.enforce)) for c in plan.checks)
        self.lease_sets = tuple(prefix + c.local_key for c in plan.checks if c.kind == CONC)
        self.settle_keys = tuple(prefix + c.local_key for c in plan.settle_checks)
        self.settle_args = tuple(x for c in plan.settle_checks for x in (KIND_CODE[c.kind], c.limit))
        #: (Redis key, limit) of the token buckets: where deferred refunds go
        self.tpm_keys = tuple((prefix + c.local_key, c.limit) for c in plan.checks if c.kind == TPM)


class RedisStore:
    is_sync = False
    cache_refusals = True
    __slots__ = (
        "_acquire",
        "_client",
        "_down_until",
        "_fail_open",
        "_flush_handle",
        "_keys",
        "_last_log",
        "_lease_ttl_ms",
        "_live",
        "_loop",
        "_member_prefix",
        "_members",
        "_prefix",
        "_refunds",
        "_renew",
        "_renewer",
        "_retry_s",
        "_settle",
        "_where",
    )

    def __init__(self, cfg: Config) -> None:
        r = cfg.limits.redis
        timeout_s = r.timeout_ms / 1000
        self._retry_s = r.retry_interval_ms / 1000
        # One pipelined connection per worker (Redis runs one command at a time anyway, and the
        # scripts are atomic: `max_connections` is an upper bound, one is used). Every call has
        # the `timeout_ms` deadline, connecting too; no retries: a failure is reported.
        # Reconnecting backs off at most `retry_interval_ms`, so the first call after that
        # interval really tries Redis again.
        self._client = redis_resp.make_client(
            r.url,
            timeout_s=timeout_s,
            connect_timeout_s=timeout_s,
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
        #: plan -> its Redis keys and static script arguments (plans are cached, so are these)
        self._keys: dict[int, PlanKeys] = {}
        self._down_until = 0.0
        self._last_log = -1e9
        self._member_prefix = os.urandom(6).hex() + ":"
        self._members = 0
        #: lease member -> its lease sets, for renewal while the request runs
        self._live: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: bucket key -> [tokens to give back, its limit]: settlements that only refund tokens,
        #: carried by this worker's next decision on the bucket (one script call per request,
        #: not two), or sent on their own after `REFUND_DELAY_S`. Late refunds only refuse
        #: sooner; charges and concurrency releases are never deferred.
        self._refunds: dict[str, list[int]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _keys_of(self, plan: Plan) -> PlanKeys:
        keys = self._keys.get(id(plan))
        if keys is None or keys.plan is not plan:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            keys = self._keys[id(plan)] = PlanKeys(plan, self._prefix)
        return keys

    # ---- decisions ----------------------------------------------------------------------------
    def decide_now(self, plan: Plan, tokens: int, cost: int) -> Decision:
        raise NotImplementedError("RedisStore decides asynchronously")

    async def decide(self, plan: Plan, tokens: int, cost: int) -> Decision:
        member = ""
        if plan.has_conc:
            self._members += 1
            member = f"{self._member_prefix}{self._members:x}"
        keys = self._keys_of(plan)
        if time.monotonic() < self._down_until:
            raise self._unavailable(None)
        args: list[int | str] = [member, self._lease_ttl_ms]
        costs = (0, 1, tokens, cost, 1, tokens)  # by kind: CONC, RPM, TPM, BUDGET, RPD, TOKQ
        refunds = self._refunds
        for c, (kind_code, limit, limit2, enforce), key in zip(
            plan.checks, keys.check_args, keys.keys, strict=True
        ):
            refund = refunds.pop(key, None) if refunds and c.kind == TPM else None
            args += (kind_code, limit, limit2, costs[c.kind], enforce, refund[0] if refund else 0)
        try:
            res = await self._run(self._acquire, keys.keys, args)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if member and isinstance(cause, redis_resp.OutcomeUnknownError):
                # the script may have run: drop the lease it may have added
                self._release(keys.lease_sets, member)
            raise self._unavailable(cause) from cause
        except asyncio.CancelledError:
            if member:  # sent after the decision on the same connection: it runs after it
                self._release(keys.lease_sets, member)
            raise
        code, now_s, day, month = (int(v) for v in res[:4])
        vals = [int(v) for v in res[4:]]
        states: list[State | None] = [
            bucket_state(vals[j], vals[j + 1], c.limit, costs[c.kind])
            if c.kind == RPM or c.kind == TPM
            else (vals[j], vals[j + 1], vals[j + 2], vals[j + 3])
            for j, c in zip(range(0, len(vals), 4), plan.checks, strict=True)
        ]
        waived: tuple[int, ...] = ()
        if code == 0:
            waived = tuple(i for i, s in enumerate(states) if s is not None and not s[0])
            if member:
                self._live[member] = keys.lease_sets
                if self._renewer is None:
                    loop = self._loop or asyncio.get_running_loop()
                    self._renewer = loop.create_task(self._renew_loop())
        return Decision(self, code - 1, states, day, month, now_s, waived, member)

    def _unavailable(self, cause: BaseException | None) -> StoreUnavailable:
        """Log (once per interval at most) and say so."""
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
        return StoreUnavailable(self._retry_s)

    # ---- settlement ---------------------------------------------------------------------------
    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None:
        member = lease.member
        if member:
            self._live.pop(member, None)
        if (unused_tokens or unused_cost or member) and time.monotonic() >= self._down_until:
            # Not waited for. On failure (or while Redis is down) the refund is lost (the key is
            # charged more, never less) and the lease expires.
            keys = self._keys_of(lease.plan)
            plan = lease.plan
            if (
                unused_tokens > 0
                and not member
                and not unused_cost
                and not lease.waived
                and not plan.has_tokq
            ):
                self._defer_refund(keys, unused_tokens)
                return
            settle_keys, settle_args = keys.settle_keys, keys.settle_args
            if lease.waived:  # shadow checks that took nothing: nothing to give back there
                kept = [
                    (k, c)
                    for k, c in zip(settle_keys, lease.plan.settle_checks, strict=True)
                    if c not in lease.waived
                ]
                settle_keys = tuple(k for k, _ in kept)
                settle_args = tuple(x for _, c in kept for x in (KIND_CODE[c.kind], c.limit))
            args = (member, unused_tokens, unused_cost, lease.day, lease.month, *settle_args)
            self._client.evalsha_nowait(self._settle, settle_keys, args)

    def _defer_refund(self, keys: PlanKeys, tokens: int) -> None:
        refunds = self._refunds
        for key, limit in keys.tpm_keys:
            entry = refunds.get(key)
            if entry is None:
                if len(refunds) >= 10_000:
                    self._flush_refunds()
                refunds[key] = [tokens, limit]
            else:
                entry[0] += tokens
        if self._flush_handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._flush_handle = loop.call_later(REFUND_DELAY_S, self._flush_refunds)

    def _flush_refunds(self) -> None:
        """Send the deferred refunds no decision has carried (one settlement per bucket)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        refunds, self._refunds = self._refunds, {}
        for key, (tokens, limit) in refunds.items():
            self._client.evalsha_nowait(self._settle, (key,), ("", tokens, 0, 0, -1, "r", limit))

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]:
        """Estimated from the decision (exact when no other request of the key ran meanwhile):
        no round trip before the reply."""
        state = lease.tokens_state
        assert state is not None
        tpm, remaining, reset = state
        return (
            tpm,
            min(tpm, max(0, remaining + unused_tokens)),
            max(0, reset - unused_tokens * 60_000 // tpm),
        )

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
                    except StoreUnavailable:
                        break
        finally:
            self._renewer = None

    async def settled(self) -> None:
        self._flush_refunds()
        with contextlib.suppress(redis_resp.RedisError):
            await self._client.barrier()

    async def close(self) -> None:
        """Stop renewing, let the settlements in flight finish, close the connection."""
        self._flush_refunds()
        renewer = self._renewer
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        await self._client.close()

    # ---- Redis --------------------------------------------------------------------------------
    @property
    def client(self) -> redis_resp.Client:
        """The connection (the leased store sends its scripts on it too: one ordered pipe)."""
        return self._client

    async def run_script(self, sha: str, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """`_run` for the leased store: the same deadline, back-off and recovery."""
        return await self._run(sha, keys, args)

    async def _run(
        self, sha: str, keys: Sequence[str], args: Sequence[int | str], force: bool = False
    ) -> Any:
        """One script call under the deadline (NOSCRIPT is handled by the client). Raises
        `StoreUnavailable` on any failure, or without trying within `retry_interval_ms` of one."""
        if not force and time.monotonic() < self._down_until:
            raise StoreUnavailable(self._retry_s)
        try:
            res = await self._client.evalsha(sha, keys, args)
        except (redis_resp.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self._retry_s
            raise StoreUnavailable(self._retry_s) from exc
        if self._down_until:
            self._down_until = 0.0
            log.warning("limits: Redis at %s answers again; limits are shared again", self._where)
        return res
