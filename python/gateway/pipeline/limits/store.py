"""What the `limits` stage asks of a store: one all-or-nothing decision per request (`Decision`),
then the settlement of the lease it took. The stage owns the plans, the replies and the headers;
a store only counts. `FailOpenStore` serves a shared store's decisions from a local one while the
shared one is down.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ...quota import Lease, Plan

#: One check's state after a decision, in the order of the plan's checks:
#: (fits, a, b, c) where for RPM/TPM a = remaining, b = reset ms, c = retry ms (when it does not
#: fit); for CONC a = held; for BUDGET a = nano-USD spent in the day, b = in the month (after the
#: reservation when admitted), c = the window it does not fit (0, 1 day, 2 month).
State = tuple[int, int, int, int]


class Decision:
    """One store's answer for one request. `states` has an entry for every RPM and TPM check and,
    admitted, for every check (refused: at least up to the refusing one)."""

    __slots__ = ("day", "holder", "member", "month", "now_s", "refused", "states", "waived")

    def __init__(
        self,
        holder: Store,
        refused: int,
        states: list[State | None],
        day: int,
        month: int,
        now_s: int,
        waived: tuple[int, ...] = (),
        member: str = "",
    ) -> None:
        #: the store that decided (and holds the lease)
        self.holder = holder
        #: index of the first enforced check that refuses; -1: admitted (all taken)
        self.refused = refused
        self.states = states
        #: the UTC day and month numbers, and Unix seconds, of the decision (budget plans)
        self.day = day
        self.month = month
        self.now_s = now_s
        #: indices of shadow checks that would have refused (not taken)
        self.waived = waived
        #: the lease's entry in shared concurrency sets
        self.member = member


class StoreUnavailable(Exception):
    """The store cannot decide now (Redis down or slow, or it was within `retry_s`)."""

    def __init__(self, retry_s: float) -> None:
        super().__init__("limits store unavailable")
        self.retry_s = retry_s


class Store(Protocol):
    #: True: `decide_now` answers without awaiting (the stage skips the coroutine)
    is_sync: bool
    #: True: an RPM refusal holds until its retry time whatever happens meanwhile (a shared
    #: store), so the stage may answer repeats without asking
    cache_refusals: bool

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    async def close(self) -> None: ...

    def decide_now(self, plan: Plan, tokens: int, cost: int) -> Decision:
        """Synchronous stores: check every check of `plan` and, only when none refuses, take
        them all (1 request, `tokens` tokens, `cost` nano-USD, a concurrency slot)."""

    async def decide(self, plan: Plan, tokens: int, cost: int) -> Decision:
        """The same, for any store. Raises `StoreUnavailable`."""

    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None:
        """Give back what the lease did not use (< 0: charge it), release its slots."""

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]:
        """(limit, remaining, reset ms) of the lease's tightest token bucket once settled."""

    async def settled(self) -> None:
        """Wait until the settlements sent so far have run (or failed)."""


class FailOpenStore:
    """`on_error: fail_open`: the shared store's decisions, or the local store's while the shared
    one is unavailable. Each lease is settled where it was taken (`Lease.holder`)."""

    is_sync = False
    cache_refusals = True
    __slots__ = ("fail_open", "local", "shared")

    def __init__(self, shared: Store, local: Store) -> None:
        self.shared = shared
        self.local = local
        #: decisions made locally because the shared store failed (read by `/metrics`)
        self.fail_open = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.shared.start(loop)
        self.local.start(loop)

    async def close(self) -> None:
        await self.shared.close()
        await self.local.close()

    def decide_now(self, plan: Plan, tokens: int, cost: int) -> Decision:
        raise NotImplementedError("FailOpenStore decides asynchronously")

    async def decide(self, plan: Plan, tokens: int, cost: int) -> Decision:
        try:
            return await self.shared.decide(plan, tokens, cost)
        except StoreUnavailable:
            self.fail_open += 1
            return self.local.decide_now(plan, tokens, cost)

    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None:
        raise NotImplementedError("a lease is settled by its holder")

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]:
        raise NotImplementedError("a lease is settled by its holder")

    async def settled(self) -> None:
        await self.shared.settled()
