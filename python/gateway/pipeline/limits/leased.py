"""Leased limits (`mode: leased`): a worker takes a *slice* of a key's (or team's) RPM, TPM or
budget from Redis in one script call, decides requests locally on it (a counter: no round trip),
tops it up in the background before it runs out and gives back what is unused when the key goes
idle or the worker stops. Redis then spends one script call per slice, not per request.

Why it stays truthful: every unit a worker admits was first taken from the same Redis bucket or
budget the exact path uses, so a slice is admission moved earlier in time, never extra
admission. The bound (docs/limits.md): over any interval, at most the exact limit's admissions
plus the slices workers held when it began (each slice <= limit / (2 x workers), so <= limit / 2
in all); 0 beyond it when no slice was held (a fresh key, a key idle for `slice_idle_ms`).
Budgets (fixed UTC day / month windows, no refill) are never overspent. Refusals can come early
by what other workers hold. Concurrency limits, shadow checks and limits too small to slice
(< `MIN_UNITS_PER_WORKER` x workers) stay exact: their part of a plan goes to `RedisStore`.
A worker killed holding a slice loses it: a bucket refills it within its window (the slice's
share of a minute), a budget counts it as spent until its window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ... import redis_resp
from ...config import Config
from ...quota import BUDGET, RPM, TPM, Check, Lease, Plan
from .local_store import DAY_S, month_number
from .redis_store import LUA_LIB, LUA_MONTH_OF, SETTLE, RedisStore
from .store import Decision, State, StoreUnavailable

log = logging.getLogger("gateway.limits")

#: a limit smaller than this many units per worker in the fleet is not sliced (stays exact)
MIN_UNITS_PER_WORKER = 8
#: the smallest slice is the limit / (this x workers); the largest the limit / (2 x workers)
MIN_SLICE_DIVISOR = 64
#: how long a worker's registration lives without renewal (ms), renewed every second
WORKER_TTL_MS = 3_000

# Take up to `want` units from each key, or nothing unless at least `need` are there. KEYS: the
# buckets / budget hashes (one hash tag). ARGV: 5 per key: kind ('r' bucket, 'b' budget),
# limit, limit2, want, need. -> {now s, UTC day, UTC month (or -1), then 4 per key: given, then
# 'r': remaining, reset ms, retry ms (for `need`, when nothing was given); 'b': day spent,
# month spent (after), the window `need` does not fit (0, 1 day, 2 month)}.
GRANT = (
    LUA_LIB
    + LUA_MONTH_OF
    + """
local day = fdiv(now, 86400000000)
local month = -1
local out = {fdiv(now, 1000000), day, -1}
for i = 1, #KEYS do
  local j = 5 * i - 4
  local kind = ARGV[j]
  local a = tonumber(ARGV[j + 1])
  local want = tonumber(ARGV[j + 3])
  local need = tonumber(ARGV[j + 4])
  local key = KEYS[i]
  if kind == 'r' then
    local d = debt(key, a)
    local avail = fdiv(a * U - d, U)
    local give = want
    if give > avail then give = avail end
    local retry = 0
    if give < need or give <= 0 then
      give = 0
      if need > a then
        retry = cdiv(cdiv(d, a), 1000)
      else
        retry = cdiv(cdiv(d + need * U - a * U, a), 1000)
      end
    else
      d = d + give * U
      store(key, d, a)
    end
    local rem = 0
    if a * U > d then rem = fdiv(a * U - d, U) end
    out[#out + 1] = give
    out[#out + 1] = rem
    out[#out + 1] = cdiv(cdiv(d, a), 1000)
    out[#out + 1] = retry
  else
    local b = tonumber(ARGV[j + 2])
    if month < 0 then month = month_of(day); out[3] = month end
    local v = redis.call('HMGET', key, 'd', 'ds', 'm', 'ms')
    local sd = 0
    local sm = 0
    if tonumber(v[1]) == day then sd = tonumber(v[2]) end
    if tonumber(v[3]) == month then sm = tonumber(v[4]) end
    local avail = want
    if a ~= 0 and a - sd < avail then avail = a - sd end
    if b ~= 0 and b - sm < avail then avail = b - sm end
    local give = avail
    local over = 0
    if give < need or give <= 0 then
      give = 0
      if a ~= 0 and sd + need > a then over = 1 else over = 2 end
    else
      sd = sd + give
      sm = sm + give
      redis.call('HSET', key, 'd', string.format('%d', day), 'ds', string.format('%d', sd),
                 'm', string.format('%d', month), 'ms', string.format('%d', sm))
      if tonumber(v[1]) ~= day then redis.call('PEXPIRE', key, BUDGET_TTL_MS) end
    end
    out[#out + 1] = give
    out[#out + 1] = sd
    out[#out + 1] = sm
    out[#out + 1] = over
  end
end
return out
"""
).replace("BUDGET_TTL_MS", str(33 * 86_400_000))

# A worker says it is alive; -> how many are (the slices' divisor). KEYS: the registry (a ZSET of
# worker -> expiry ms). ARGV: this worker, its TTL ms.
HELLO = """
local tm = redis.call('TIME')
local now = tm[1] * 1000 + math.floor(tm[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""


def slice_limit(c: Check) -> int:
    """The units a check's slices come out of: its limit, or a budget's tighter window."""
    if c.kind == BUDGET:
        return min(x for x in (c.limit, c.limit2) if x) if (c.limit or c.limit2) else 0
    return c.limit


class Slice:
    """This worker's share of one check's limit, and what it last heard from Redis."""

    __slots__ = (
        "check",
        "day",
        "dry_need",
        "dry_until",
        "key",
        "last_used",
        "left",
        "month",
        "over",
        "pending",
        "reading",
        "reading_at",
        "target",
        "used",
        "waiting",
    )

    def __init__(self, check: Check, key: str, target: int) -> None:
        self.check = check
        self.key = key
        #: units held here and not yet admitted (< 0: a settlement charged beyond the slice)
        self.left = 0
        #: the slice size aimed at (adapted to this worker's traffic by the renewer)
        self.target = target
        #: units admitted since the renewer last looked, and when the slice was last used
        self.used = 0
        self.last_used = time.monotonic()
        #: a refused grant: refuse `dry_need` units or more locally until then (monotonic)
        self.dry_until = 0.0
        self.dry_need = 0
        #: a budget's refusal: the window that is spent (1 day, 2 month)
        self.over = 0
        #: the grant in flight (requests short of units wait for it), and how many wait
        self.pending: asyncio.Future[None] | None = None
        self.waiting = 0
        #: the last grant's reading: bucket (remaining, reset ms) / budget (day, month spent)
        self.reading = (0, 0)
        self.reading_at = 0.0
        #: the budget windows the slice was taken in
        self.day = 0
        self.month = 0

    def state(self, now: float, fits: int, retry_ms: int = 0) -> State:
        """The check's state for the stage: Redis's last reading moved on by the time since it,
        plus this slice (remaining = Redis remaining + local remaining, approximately)."""
        c = self.check
        if c.kind == BUDGET:
            left = max(self.left, 0)
            return (fits, max(0, self.reading[0] - left), max(0, self.reading[1] - left), retry_ms)
        limit = c.limit
        refilled = int((now - self.reading_at) * limit / 60)
        remaining = min(limit, self.reading[0] + refilled + max(self.left, 0))
        return (fits, remaining, (limit - remaining) * 60_000 // limit, retry_ms)


class Parts:
    """A plan split into its leased checks (decided on slices) and the exact rest."""

    __slots__ = ("exact", "exact_plan", "leased", "plan", "workers")

    def __init__(self, plan: Plan, workers: int) -> None:
        self.plan = plan
        self.workers = workers
        checks = plan.checks
        self.leased = tuple(
            i for i, c in enumerate(checks) if c.leased and slice_limit(c) >= MIN_UNITS_PER_WORKER * workers
        )
        self.exact = tuple(i for i in range(len(checks)) if i not in self.leased)
        self.exact_plan = (
            Plan([checks[i] for i in self.exact], plan.in_price, plan.out_price, plan.cached_price)
            if self.exact
            else None
        )


class LeasedStore:
    is_sync = False
    #: an RPM refusal holds until its retry time but for slices given back meanwhile (early
    #: refusals, never extra admissions)
    cache_refusals = True
    __slots__ = (
        "_client",
        "_day",
        "_grant",
        "_hello",
        "_hello_at",
        "_idle_s",
        "_loop",
        "_me",
        "_parts",
        "_prefix",
        "_registry",
        "_renew_s",
        "_renewer",
        "_settle",
        "_slices",
        "shared",
        "workers",
    )

    def __init__(self, cfg: Config, shared: RedisStore) -> None:
        r = cfg.limits.redis
        self.shared = shared
        self._client = shared.client
        self._grant = self._client.register_script(GRANT)
        self._settle = self._client.register_script(SETTLE)
        self._hello = self._client.register_script(HELLO)
        self._prefix = r.key_prefix
        self._registry = r.key_prefix + "workers"
        self._renew_s = r.slice_renew_ms / 1000
        self._idle_s = r.slice_idle_ms / 1000
        self._me = os.urandom(6).hex()
        #: workers in the fleet (the registry's count; until it answers, this instance's)
        self.workers = max(1, int(os.environ.get("FASTPATH_GATEWAY_WORKERS") or 0) or (os.cpu_count() or 1))
        self._hello_at = -1e9
        self._slices: dict[str, Slice] = {}
        self._parts: dict[int, Parts] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._day = (0, 0, 0)  # (UTC day, its month number, Unix second it was computed)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.shared.start(loop)

    def decide_now(self, plan: Plan, tokens: int, cost: int) -> Decision:
        raise NotImplementedError("LeasedStore decides asynchronously")

    def _parts_of(self, plan: Plan) -> Parts:
        parts = self._parts.get(id(plan))
        if parts is None or parts.plan is not plan or parts.workers != self.workers:
            if len(self._parts) >= 10_000:
                self._parts.clear()
            parts = self._parts[id(plan)] = Parts(plan, self.workers)
        return parts

    # ---- decisions ----------------------------------------------------------------------------
    async def decide(self, plan: Plan, tokens: int, cost: int) -> Decision:
        parts = self._parts_of(plan)
        if not parts.leased:
            return await self.shared.decide(plan, tokens, cost)
        if self._hello_at < 0:
            await self._say_hello()
            parts = self._parts_of(plan)
            if not parts.leased:
                return await self.shared.decide(plan, tokens, cost)
        amounts = (0, 1, tokens, cost)  # by kind: CONC, RPM, TPM, BUDGET
        states: list[State | None] = [None] * len(plan.checks)
        day = month = 0
        if plan.has_budget:
            day, month = self._today()
        refused = await self._take(parts, amounts, states, day, month)
        now_s = int(time.time())
        if refused >= 0:
            self._read_exact(parts, states)
            return Decision(self, refused, states, day, month, now_s)
        exact_plan = parts.exact_plan
        if exact_plan is None:
            return Decision(self, -1, states, day, month, now_s)
        try:
            d = await self.shared.decide(exact_plan, tokens, cost)
        except BaseException:
            self._give_back(parts, amounts)
            raise
        exact = parts.exact
        for j, i in enumerate(exact):
            states[i] = d.states[j]
        if d.refused >= 0:
            self._give_back(parts, amounts)
            self._read_exact(parts, states)
            return Decision(self, exact[d.refused], states, d.day, d.month, d.now_s)
        waived = tuple(exact[j] for j in d.waived)
        return Decision(self, -1, states, day or d.day, month or d.month, d.now_s, waived, d.member)

    def _today(self) -> tuple[int, int]:
        """The UTC day and month numbers now (the month computed once per day)."""
        now = time.time()
        day = int(now) // DAY_S
        if day != self._day[0]:
            self._day = (day, month_number(now), int(now))
        return day, self._day[1]

    def _slice(self, c: Check, day: int, month: int) -> Slice:
        s = self._slices.get(c.local_key)
        if s is None:
            s = self._slices[c.local_key] = Slice(c, self._prefix + c.local_key, self._min_slice(c))
            if self._renewer is None:
                loop = self._loop or asyncio.get_running_loop()
                self._renewer = loop.create_task(self._renew_loop())
        elif c.kind == BUDGET and (s.day, s.month) != (day, month) and s.pending is None:
            self._return(s)  # a new budget window: the old slice goes back (to its month)
        if c.kind == BUDGET and s.left == 0:
            s.day, s.month = day, month
        return s

    def _min_slice(self, c: Check) -> int:
        return max(1, slice_limit(c) // (MIN_SLICE_DIVISOR * self.workers))

    async def _take(
        self,
        parts: Parts,
        amounts: tuple[int, int, int, int],
        states: list[State | None],
        day: int,
        month: int,
    ) -> int:
        """Take every leased check's units from its slice, all or none, granting what is short
        (one script call for the plan). Returns the index of a refusing check, or -1."""
        checks = parts.plan.checks
        counted: list[Slice] = []  # slices this request waits on (a grant asks for all waiters)
        try:
            for _ in range(8):
                now = time.monotonic()
                short: list[tuple[int, Slice, int]] = []
                for i in parts.leased:
                    c = checks[i]
                    need = amounts[c.kind]
                    s = self._slice(c, day, month)
                    if need <= 0 or s.left >= need:
                        continue
                    if now < s.dry_until and need >= s.dry_need:
                        states[i] = self._dry_state(s, now)
                        return i
                    short.append((i, s, need))
                    if s not in counted:
                        s.waiting += 1
                        counted.append(s)
                if not short:
                    for i in parts.leased:
                        c = checks[i]
                        need = amounts[c.kind]
                        s = self._slices[c.local_key]
                        s.left -= need
                        s.used += need
                        s.last_used = now
                        states[i] = s.state(now, 1)
                    return -1
                pending = next((s.pending for _, s, _ in short if s.pending is not None), None)
                if pending is not None:  # a grant is on its way: wait for it, then look again
                    await asyncio.shield(pending)
                    continue
                refused = await self._grant_short(short, states)
                if refused >= 0:
                    return refused
        finally:
            for s in counted:
                s.waiting -= 1
        i = parts.leased[0]  # contended eight times over: refuse, briefly
        states[i] = self._slices[checks[i].local_key].state(time.monotonic(), 0, 100)
        return i

    async def _grant_short(self, short: list[tuple[int, Slice, int]], states: list[State | None]) -> int:
        """One grant call for the slices short of units. Returns a refusing index, or -1."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        wants = []
        for _, s, need in short:
            s.pending = fut
            cap = max(1, slice_limit(s.check) // (2 * self.workers))
            want = max(s.target, min(cap, need * s.waiting)) + need - s.left
            wants.append((s, want, need - s.left))
        try:
            got = await self._call_grant(wants)
        finally:
            for _, s, _ in short:
                s.pending = None
            fut.set_result(None)
        now = time.monotonic()
        for (i, s, _), given in zip(short, got, strict=True):
            if not given:
                states[i] = self._dry_state(s, now)
                return i
        return -1

    def _dry_state(self, s: Slice, now: float) -> State:
        """A refusal's state: a bucket's retry time, or the budget window that is spent."""
        if s.check.kind == BUDGET:
            return s.state(now, 0, s.over)
        return s.state(now, 0, max(1, int((s.dry_until - now) * 1000)))

    async def _call_grant(self, wants: list[tuple[Slice, int, int]]) -> list[int]:
        """Ask Redis for slices; records what it said on each. Returns what was given, per slice."""
        keys = [s.key for s, _, _ in wants]
        args: list[int | str] = []
        for s, want, need in wants:
            c = s.check
            args += ("r" if c.kind != BUDGET else "b", c.limit, c.limit2, want, max(need, 0))
        res = await self.shared.run_script(self._grant, keys, args)
        now = time.monotonic()
        vals = [int(v) for v in res]
        day, month = vals[1], vals[2]
        given = []
        for k, (s, _, need) in enumerate(wants):
            give, x, y, z = vals[3 + 4 * k : 7 + 4 * k]
            s.reading, s.reading_at = (x, y), now
            if s.check.kind == BUDGET:
                if give and s.left <= 0:
                    s.day, s.month = day, month
                if not give:
                    # another worker may give a slice back: ask again after a renewal interval
                    s.dry_until, s.dry_need, s.over = now + self._renew_s, max(need, 1), z
            elif not give:
                s.dry_until, s.dry_need = now + z / 1000, max(need, 1)
            s.left += give
            given.append(give)
        return given

    def _give_back(self, parts: Parts, amounts: tuple[int, int, int, int]) -> None:
        """The exact part refused (or failed): what the leased part took goes back to its slices."""
        for i in parts.leased:
            c = parts.plan.checks[i]
            s = self._slices.get(c.local_key)
            if s is not None:
                s.left += amounts[c.kind]
                s.used -= amounts[c.kind]

    def _read_exact(self, parts: Parts, states: list[State | None]) -> None:
        """States the headers need that this decision did not read (not asked: full)."""
        for i in parts.exact:
            c = parts.plan.checks[i]
            if states[i] is None and (c.kind == RPM or c.kind == TPM):
                states[i] = (1, c.limit, 0, 0)
        for i in parts.leased:
            if states[i] is None:
                c = parts.plan.checks[i]
                s = self._slices.get(c.local_key)
                states[i] = s.state(time.monotonic(), 1) if s is not None else (1, c.limit, 0, 0)

    # ---- settlement ---------------------------------------------------------------------------
    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None:
        plan = lease.plan
        parts = self._parts_of(plan)
        checks = plan.checks
        for i in parts.leased:
            c = checks[i]
            if c.kind == TPM and unused_tokens:
                self._refund(c, unused_tokens, lease)
            elif c.kind == BUDGET and unused_cost:
                self._refund(c, unused_cost, lease)
        if parts.exact_plan is not None and (parts.exact_plan.settle_checks or lease.member):
            inner = Lease(
                lease.key, parts.exact_plan, lease.prompt_tokens, lease.reserved_tokens, lease.reserved_cost
            )
            inner.member, inner.day, inner.month = lease.member, lease.day, lease.month
            inner.waived, inner.tokens_state = lease.waived, lease.tokens_state
            self.shared.settle(inner, unused_tokens, unused_cost)

    def _refund(self, c: Check, amount: int, lease: Lease) -> None:
        """Unused units go back to the slice they came from (or to Redis if it is gone)."""
        s = self._slices.get(c.local_key)
        if s is not None and (c.kind != BUDGET or (s.day, s.month) == (lease.day, lease.month)):
            s.left += amount
            return
        dt, dc = (amount, 0) if c.kind != BUDGET else (0, amount)
        kind = "r" if c.kind != BUDGET else "b"
        args = ("", dt, dc, lease.day, lease.month, kind, c.limit)
        self._client.evalsha_nowait(self._settle, (self._prefix + c.local_key,), args)

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]:
        return self.shared.tokens_after(lease, unused_tokens)

    # ---- the background ------------------------------------------------------------------------
    def _return(self, s: Slice) -> None:
        """Give a slice's units back to Redis (not waited for; lost if it fails: the key is
        charged more, never less) and forget them."""
        left, s.left = s.left, 0
        if not left:
            return
        c = s.check
        if c.kind == BUDGET:
            args: tuple[Any, ...] = ("", 0, left, s.day, s.month, "b", c.limit)
        else:
            args = ("", left, 0, 0, -1, "r", c.limit)
        self._client.evalsha_nowait(self._settle, (s.key,), args)

    async def _say_hello(self) -> None:
        """Register this worker; learn how many workers share the limits."""
        self._hello_at = time.monotonic()
        try:
            n = await self.shared.run_script(self._hello, (self._registry,), (self._me, WORKER_TTL_MS))
        except StoreUnavailable:
            return
        self.workers = max(1, int(n))

    async def _renew_loop(self) -> None:
        try:
            while self._slices:
                await asyncio.sleep(self._renew_s)
                now = time.monotonic()
                if now - self._hello_at >= WORKER_TTL_MS / 3000:
                    await self._say_hello()
                for key, s in list(self._slices.items()):
                    if s.pending is not None:
                        continue
                    if now - s.last_used >= self._idle_s:
                        self._return(s)
                        del self._slices[key]
                        continue
                    self._adapt(s)
                    if s.left * 2 < s.target and now >= s.dry_until and not s.waiting:
                        await self._top_up(s)
        except asyncio.CancelledError:
            raise
        except Exception:  # never leave the slices without a renewer silently
            log.exception("limits: the leased-limits renewer failed")
        finally:
            self._renewer = None

    def _adapt(self, s: Slice) -> None:
        """Slice = this worker's rate x two renewal intervals, within [min, limit / (2 x workers)]."""
        c = s.check
        rate = s.used / self._renew_s
        s.used = 0
        cap = max(1, slice_limit(c) // (2 * self.workers))
        s.target = min(cap, max(self._min_slice(c), int(rate * self._renew_s * 2)))

    async def _top_up(self, s: Slice) -> None:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        s.pending = fut
        try:
            with contextlib.suppress(StoreUnavailable):
                await self._call_grant([(s, s.target - s.left, 1)])
        finally:
            s.pending = None
            fut.set_result(None)

    async def settled(self) -> None:
        await self.shared.settled()

    async def close(self) -> None:
        """Stop renewing, give every slice back, then close the shared store (which lets what
        was sent finish)."""
        renewer = self._renewer
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        for s in self._slices.values():
            self._return(s)
        self._slices.clear()
        with contextlib.suppress(redis_resp.RedisError):
            await self.shared.settled()
        await self.shared.close()
