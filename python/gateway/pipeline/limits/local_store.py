"""The `local` limits store: `_fastpath.LocalLimiter` token buckets (GCRA on integers), in-flight
gauges and budget counters in this worker process. A decision is synchronous, so it is atomic
within the worker (no await between check and take); with N workers each enforces the full
limits on its own share of the traffic, and budgets restart with the process. Also the fallback
of the Redis store under `fail_open`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ... import _fastpath
from ...config import Config
from ...quota import BUDGET, CONC, RPD, RPM, TPM, WINDOWED, Lease, Plan
from .store import Decision, State

DAY_S = 86_400


def month_number(now_s: float) -> int:
    """UTC calendar month as a number: year * 12 + month - 1."""
    t = time.gmtime(now_s)
    return t.tm_year * 12 + t.tm_mon - 1


class BudgetState:
    """What one budget (nano-USD) or quota (requests, tokens) counted in its UTC day and UTC
    month (other windows count as 0)."""

    __slots__ = ("day", "day_spent", "month", "month_spent")

    def __init__(self, day: int, month: int) -> None:
        self.day = day
        self.day_spent = 0
        self.month = month
        self.month_spent = 0


class LocalStore:
    is_sync = True
    cache_refusals = False
    __slots__ = ("_buckets", "_budgets", "_clock", "_inflight", "_max_budgets")

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self._buckets = _fastpath.LocalLimiter(cfg.limits.max_tracked_keys)
        #: gauge name -> requests in flight (entries at 0 are removed, so the dict stays small)
        self._inflight: dict[str, int] = {}
        self._budgets: dict[str, BudgetState] = {}
        self._max_budgets = cfg.limits.max_tracked_keys
        #: wall clock (Unix seconds) for the budget windows; a parameter for tests
        self._clock = clock

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        return None

    async def close(self) -> None:
        return None

    async def settled(self) -> None:
        return None

    async def decide(self, plan: Plan, tokens: int, cost: int) -> Decision:
        return self.decide_now(plan, tokens, cost)

    def decide_now(self, plan: Plan, tokens: int, cost: int) -> Decision:
        """All checks, then all takes, in one synchronous step. Buckets are taken as they are
        checked; a refusal gives back those taken before it."""
        buckets = self._buckets
        checks = plan.checks
        states: list[State | None] = [None] * len(checks)
        day = month = now_s = 0
        if plan.has_windows:
            now = self._clock()
            now_s = int(now)
            day = now_s // DAY_S
            month = month_number(now)
        refused = -1
        waived: tuple[int, ...] = ()
        for i, c in enumerate(checks):
            kind = c.kind
            if kind == CONC:
                held = self._inflight.get(c.local_key, 0)
                if held < c.limit:
                    continue
                states[i] = (False, held, 0, 0)
            elif kind in WINDOWED:
                amount = cost if kind == BUDGET else 1 if kind == RPD else tokens
                spent_day, spent_month = self.spent(c.local_key, day, month)
                window = 0
                if amount > 0:
                    if c.limit and spent_day + amount > c.limit:
                        window = 1
                    elif c.limit2 and spent_month + amount > c.limit2:
                        window = 2
                states[i] = (not window, spent_day, spent_month, window)
                if not window:
                    continue
            else:
                res = states[i] = buckets.acquire(c.local_key, 1 if kind == RPM else tokens, c.limit, c.limit)
                if res[0]:
                    continue
            if c.enforce:
                refused = i
                break
            waived += (i,)  # a shadow check: not taken, the request goes on
        if refused >= 0:
            self._refund(plan, states, refused, tokens)
            return Decision(self, refused, states, day, month, now_s, waived)
        for i in plan.settle_indices:
            if waived and i in waived:
                continue
            c = checks[i]
            if c.kind == CONC:
                self._inflight[c.local_key] = self._inflight.get(c.local_key, 0) + 1
            elif c.kind in WINDOWED:
                b = self._take_budget(c.local_key, day, month, cost if c.kind == BUDGET else tokens)
                states[i] = (True, b.day_spent, b.month_spent, 0)
        if plan.has_windows:  # requests per day are taken but never settled (not in settle_indices)
            for i, c in enumerate(checks):
                if c.kind == RPD and not (waived and i in waived):
                    b = self._take_budget(c.local_key, day, month, 1)
                    states[i] = (True, b.day_spent, b.month_spent, 0)
        return Decision(self, -1, states, day, month, now_s, waived)

    def _refund(self, plan: Plan, states: list[State | None], refused: int, tokens: int) -> None:
        """A refusal takes nothing: give back the buckets taken before it, then read every
        bucket (but the refusing one) as it is now, for the headers."""
        buckets = self._buckets
        for i, c in enumerate(plan.checks):
            kind = c.kind
            if (kind != RPM and kind != TPM) or i == refused:
                continue
            amount = 1 if kind == RPM else tokens
            state = states[i]
            if i < refused and amount and state is not None and state[0]:
                buckets.refund(c.local_key, amount)
            states[i] = buckets.acquire(c.local_key, 0, c.limit, c.limit)

    def spent(self, name: str, day: int, month: int) -> tuple[int, int]:
        """Nano-USD a budget has spent in this UTC day and month."""
        b = self._budgets.get(name)
        if b is None:
            return 0, 0
        return (b.day_spent if b.day == day else 0), (b.month_spent if b.month == month else 0)

    def tracks_budget(self, name: str) -> bool:
        return name in self._budgets

    def _take_budget(self, name: str, day: int, month: int, cost: int) -> BudgetState:
        b = self._budgets.get(name)
        if b is None:
            if cost == 0:
                return BudgetState(day, month)
            if len(self._budgets) >= self._max_budgets:
                self._sweep_budgets(month)
            b = self._budgets[name] = BudgetState(day, month)
        if b.day != day:
            b.day, b.day_spent = day, 0
        if b.month != month:
            b.month, b.month_spent = month, 0
        b.day_spent += cost
        b.month_spent += cost
        return b

    def _sweep_budgets(self, month: int) -> None:
        """Drop budgets of past months; if that is not enough, arbitrary ones (they start over:
        fail-open, like a busy bucket evicted from the limiter)."""
        budgets = self._budgets
        for name in [n for n, b in budgets.items() if b.month != month]:
            del budgets[name]
        excess = len(budgets) - (self._max_budgets - self._max_budgets // 8 - 1)
        for name in list(budgets)[: max(0, excess)]:
            del budgets[name]

    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None:
        buckets = self._buckets
        waived = lease.waived
        for c in lease.plan.settle_checks:
            if waived and c in waived:
                continue
            name = c.local_key
            if c.kind == CONC:
                left = self._inflight.get(name, 0) - 1
                if left > 0:
                    self._inflight[name] = left
                else:
                    self._inflight.pop(name, None)
            elif c.kind == TPM:
                if unused_tokens > 0:
                    buckets.refund(name, unused_tokens)
                elif unused_tokens < 0:
                    buckets.charge(name, -unused_tokens, c.limit)
            else:  # a budget gives back money, a token quota tokens
                unused = unused_cost if c.kind == BUDGET else unused_tokens
                b = self._budgets.get(name) if unused else None
                if b is not None:
                    if b.day == lease.day:
                        b.day_spent = max(0, b.day_spent - unused)
                    if b.month == lease.month:
                        b.month_spent = max(0, b.month_spent - unused)

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]:
        """Read exactly: the tightest token bucket as it is now."""
        best: tuple[int, int, int] | None = None
        for c in lease.plan.checks:
            if c.kind == TPM:
                res = self._buckets.acquire(c.local_key, 0, c.limit, c.limit)
                if best is None or res[1] < best[1]:
                    best = (c.limit, res[1], res[2])
        assert best is not None
        return best

    def peek(self, name: str, limit: int) -> tuple[bool, int, int, int]:
        """A bucket's state, read without taking."""
        return self._buckets.acquire(name, 0, limit, limit)
