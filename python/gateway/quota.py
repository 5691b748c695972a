"""Value types of the limits: what a request is checked against (`Plan`, `Check`) and what an
admitted request holds until it is settled (`Lease`). Below the stages: the context carries a
lease, the limits stage and its stores make and settle them.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol


class CheckKind(IntEnum):
    """In the order a request's checks run (and the first refusal is reported)."""

    CONC = 0
    RPM = 1
    TPM = 2
    BUDGET = 3
    #: requests per UTC day: a window counter like a budget's, counting requests
    RPD = 4
    #: tokens per UTC day and per UTC month: a window counter like a budget's, counting tokens
    TOKQ = 5


CONC, RPM, TPM, BUDGET = CheckKind.CONC, CheckKind.RPM, CheckKind.TPM, CheckKind.BUDGET
RPD, TOKQ = CheckKind.RPD, CheckKind.TOKQ
#: the kinds counted in fixed UTC windows (day / month), held like budgets by the stores
WINDOWED = frozenset((BUDGET, RPD, TOKQ))


class Check:
    """One limit of a plan: what it counts, for whom, and its limit(s)."""

    __slots__ = ("enforce", "kind", "leased", "limit", "limit2", "local_key", "scope")

    def __init__(
        self,
        kind: CheckKind,
        scope: str,
        local_key: str,
        limit: int,
        limit2: int = 0,
        enforce: bool = True,
        leased: bool = False,
    ) -> None:
        self.kind = kind
        #: who it applies to, for messages: "API key", "API key on model m", "team t"
        self.scope = scope
        #: the bucket / gauge / counter name (the Redis key is the prefix + this)
        self.local_key = local_key
        #: RPM/TPM: per minute (also the burst); CONC: at most in flight; BUDGET: nano-USD per
        #: UTC day (0 = none), with `limit2` per UTC month (0 = none); RPD: requests per UTC
        #: day; TOKQ: tokens per UTC day (0 = none), with `limit2` per UTC month (0 = none)
        self.limit = limit
        self.limit2 = limit2
        #: False: shadow mode (counted and reported, never refuses; see `config.LimitSet`)
        self.enforce = enforce
        #: `mode: leased`: decided on this worker's slice of the limit (not for CONC)
        self.leased = leased


class Plan:
    """The checks for one (key, tier, team, model), built once per worker and cached."""

    __slots__ = (
        "cached_price",
        "checks",
        "has_budget",
        "has_conc",
        "has_tokq",
        "has_windows",
        "header_groups",
        "in_price",
        "needs_prompt",
        "out_price",
        "rpm_limits",
        "settle_checks",
        "settle_indices",
        "tpm_limits",
        "window_groups",
    )

    def __init__(
        self, checks: list[Check], in_price: int, out_price: int, cached_price: int | None = None
    ) -> None:
        self.checks = tuple(checks)
        self.in_price = in_price  # nano-USD per prompt token (what a reservation assumes)
        self.out_price = out_price  # nano-USD per completion token
        #: nano-USD per cached prompt token (settlement charges reported cache reads at it)
        self.cached_price = in_price if cached_price is None else cached_price
        self.has_conc = any(c.kind == CONC for c in checks)
        self.has_budget = any(c.kind == BUDGET for c in checks)
        self.has_tokq = any(c.kind == TOKQ for c in checks)
        #: any check counted in UTC windows (the store needs the day and month)
        self.has_windows = any(c.kind in WINDOWED for c in checks)
        self.needs_prompt = any(c.kind == TPM for c in checks) or self.has_budget or self.has_tokq
        #: what on_finish touches: token buckets, concurrency gauges, budgets, token quotas
        #: (a request counted in a minute or a day stays counted: RPM and RPD are not settled)
        self.settle_checks = tuple(c for c in checks if c.kind != RPM and c.kind != RPD)
        self.settle_indices = tuple(i for i, c in enumerate(checks) if c.kind != RPM and c.kind != RPD)
        self.rpm_limits = tuple(c.limit for c in checks if c.kind == RPM)
        self.tpm_limits = tuple(c.limit for c in checks if c.kind == TPM)
        #: which checks make the `x-ratelimit-*-requests` and `-tokens` headers
        self.header_groups = tuple(
            (tuple(i for i, c in enumerate(checks) if c.kind == kind), what)
            for kind, what in ((RPM, "requests"), (TPM, "tokens"))
            if any(c.kind == kind for c in checks)
        )
        #: which checks make the long-window headers (`x-ratelimit-*-requests-day`,
        #: `-tokens-day`, `-tokens-month`): (indices, header suffix, which limit: 0 day, 1 month)
        self.window_groups = tuple(
            (idx, what, which)
            for kind, what, which in (
                (RPD, "requests-day", 0),
                (TOKQ, "tokens-day", 0),
                (TOKQ, "tokens-month", 1),
            )
            if (
                idx := tuple(
                    i for i, c in enumerate(checks) if c.kind == kind and (c.limit2 if which else c.limit)
                )
            )
        )


class Holder(Protocol):
    """Where a lease is held (a limits store): what settles it."""

    def settle(self, lease: Lease, unused_tokens: int, unused_cost: int) -> None: ...

    def tokens_after(self, lease: Lease, unused_tokens: int) -> tuple[int, int, int]: ...


class Lease:
    """What one admitted request holds until it is settled."""

    __slots__ = (
        "budget_note",
        "day",
        "holder",
        "key",
        "member",
        "month",
        "plan",
        "prompt_tokens",
        "reserved_cost",
        "reserved_tokens",
        "stream_token_limit",
        "tokens_state",
        "waived",
    )

    def __init__(
        self, key: str, plan: Plan, prompt_tokens: int, reserved_tokens: int, reserved_cost: int
    ) -> None:
        self.key = key
        self.plan = plan
        self.prompt_tokens = prompt_tokens
        #: prompt + completion tokens reserved in every token bucket of the plan
        self.reserved_tokens = reserved_tokens
        #: nano-USD reserved in every budget of the plan
        self.reserved_cost = reserved_cost
        #: the budget windows the reservation was made in (UTC day and month numbers)
        self.day = 0
        self.month = 0
        #: live budget enforcement: completion tokens this stream may produce (None: no cut)
        self.stream_token_limit: int | None = None
        #: which budget binds the stream, for the error event
        self.budget_note = ""
        #: the store that holds it (settlement goes there)
        self.holder: Holder | None = None
        #: this request's entry in shared concurrency lease sets ('' if none)
        self.member = ""
        #: (limit, remaining, reset ms) of the tightest token bucket after the decision
        self.tokens_state: tuple[int, int, int] | None = None
        #: shadow checks that would have refused this request: not taken, so not settled
        self.waived: tuple[Check, ...] = ()
