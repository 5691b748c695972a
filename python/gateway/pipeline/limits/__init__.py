"""Stage `limits`: requests per minute, tokens per minute, concurrent requests, money budgets and
long-window quotas (requests per UTC day, tokens per UTC day / month), per key (by tier), per key
and model (`tiers.<t>.models`) and per team (`teams:`).

Tokens and money are *reserved, then settled* (TensorZero's "estimate, then reconcile"): before
the call the request reserves its prompt tokens (counted by the fastpath) + `max_tokens` (or
`limits.default_max_tokens`) x `n`, and the matching cost at the model's price (`prices:`, in
integer nano-USD: no float drift); when the request ends, however it ends, `on_finish` gives
back what the response did not use (or charges what it used beyond). The checks of one request
are all-or-nothing: a refused request leaves no count behind. Budgets are fixed windows, the UTC
day and the UTC calendar month; a request counts in the window that admitted it. Models without
a price cost nothing. Quotas count in the same windows as budgets (requests, or tokens reserved
and settled like TPM). A limit set with `enforce: false` is a shadow: counted, reported, logged
when it would refuse, never refusing.

The stage builds the plans, the replies (`x-ratelimit-*` headers, refusals, `retry-after`) and
the leases; a store (`store.Store`) counts: `local_store` in this worker, `redis_store` shared
by every worker and instance (under `fail_open`, `store.FailOpenStore` over both).
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable

from ...config import (
    BudgetLimitSet,
    Config,
    LimitMode,
    LimitsBackend,
    LimitSet,
    OnError,
    budget_nano_usd,
    limit_sets,
)
from ...context import RequestContext
from ...errors import Fault, GatewayError
from ...money import price_table
from ...principal import Principal
from ...quota import BUDGET, CONC, RPD, RPM, TOKQ, TPM, Check, Lease, Plan
from ...schemas import ChatRequestView, EmbeddingsRequestView
from ...usage import cost_used, counted_prompt_tokens, tokens_used
from ...worker import Worker
from .local_store import DAY_S, LocalStore, month_number
from .store import Decision, FailOpenStore, Store, StoreUnavailable

__all__ = ["LimitsStage", "duration", "month_number", "usd", "window_reset_s"]

log = logging.getLogger("gateway.limits")

#: A concurrency refusal has no refill time; clients may retry after this long.
CONCURRENCY_RETRY_MS = 1_000
_TOKEN_STATE = frozenset(("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"))
_PLAN_CACHE_MAX = 10_000


def duration(ms: int) -> str:
    """OpenAI's reset header format: `20ms`, `1s`, `1.5s`, `6m0s`, `3h0m0s` (a day's window)."""
    if ms < 1_000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def usd(nano: int) -> str:
    """Nano-USD for messages: `$0.0105`, `$12.00`."""
    text = f"{nano / 1e9:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def window_reset_s(now_s: int, monthly: bool) -> int:
    """Seconds until the UTC day (or calendar month) of `now_s` ends."""
    if not monthly:
        return DAY_S - now_s % DAY_S
    t = time.gmtime(now_s)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now_s


def retry_after(ms: int) -> str:
    """`retry-after` in whole seconds, at least 1."""
    return str(max(1, -(-ms // 1000)))


def _rate_limited(message: str, retry_after_ms: int, code: str | None = None) -> GatewayError:
    return GatewayError(
        Fault.RATE_LIMITED,
        message,
        headers=(("retry-after", retry_after(retry_after_ms)), ("retry-after-ms", str(retry_after_ms))),
        code=code,
    )


def budget_refused(scope: str, monthly: bool, limit: int, spent: int, cost: int, now_s: int) -> GatewayError:
    """429 `budget_exceeded`: which budget, what is left, and when it resets."""
    window = "monthly" if monthly else "daily"
    reset_s = window_reset_s(now_s, monthly)
    when = "the start of the next UTC calendar month" if monthly else "00:00 UTC"
    left = max(0, limit - spent)
    return _rate_limited(
        f"Budget exceeded: this {scope}'s {window} budget of {usd(max(limit, 0))} has {usd(left)} "
        f"left, and this request reserves up to {usd(cost)} (prompt + max_tokens at the model's "
        f"price). It resets at {when} (in {reset_s // 3600}h{reset_s % 3600 // 60}m); lower max_tokens "
        "or retry then.",
        reset_s * 1000,
        code="budget_exceeded",
    )


def quota_refused(c: Check, state: tuple[int, int, int, int], tokens: int, now_s: int) -> GatewayError:
    """429 of a long-window quota: which one (`code`: `requests_per_day_exceeded`,
    `tokens_per_day_exceeded`, `tokens_per_month_exceeded`), what is left, when it resets;
    `retry-after` is the time to the window's end (nothing frees up before it)."""
    monthly = state[3] == 2
    limit, used = (c.limit2, state[2]) if monthly else (c.limit, state[1])
    reset_s = window_reset_s(now_s, monthly)
    when = "the start of the next UTC calendar month" if monthly else "00:00 UTC"
    window = "month" if monthly else "day"
    resets = f"It resets at {when} (in {reset_s // 3600}h{reset_s % 3600 // 60}m)"
    if c.kind == RPD:
        message = (
            f"Quota exceeded: this {c.scope}'s quota of {limit} requests per UTC day is used up. {resets}."
        )
        code = "requests_per_day_exceeded"
    else:
        left = max(0, limit - used)
        if tokens > limit:
            message = (
                f"Quota exceeded: this request needs {tokens} tokens (prompt + max_tokens), more "
                f"than this {c.scope}'s quota of {limit} tokens per UTC {window}; lower max_tokens."
            )
        else:
            message = (
                f"Quota exceeded: this {c.scope}'s quota of {limit} tokens per UTC {window} has "
                f"{left} left, and this request reserves up to {tokens} (prompt + max_tokens). "
                f"{resets}; lower max_tokens or retry then."
            )
        code = f"tokens_per_{window}_exceeded"
    return _rate_limited(message, reset_s * 1000, code=code)


def tokens_refused_message(reserved: int, tpm: int, scope: str = "API key") -> str:
    """Why a token reservation was refused: over the per-minute limit on its own, or not now."""
    if reserved > tpm:
        return (
            f"This request needs {reserved} tokens (prompt + max_tokens), more than this "
            f"{scope}'s limit of {tpm} tokens per minute; lower max_tokens."
        )
    return f"Rate limit reached: {tpm} tokens per minute for this {scope}."


def refusal(c: Check, state: tuple[int, int, int, int], tokens: int, cost: int, now_s: int) -> GatewayError:
    """The 429 of check `c` refusing, from its state in the decision."""
    if c.kind == CONC:
        return _rate_limited(
            f"Too many concurrent requests for this {c.scope} (limit {c.limit}).", CONCURRENCY_RETRY_MS
        )
    if c.kind == RPM:
        return _rate_limited(
            f"Rate limit reached: {c.limit} requests per minute for this {c.scope}.", state[3]
        )
    if c.kind == TPM:
        return _rate_limited(tokens_refused_message(tokens, c.limit, c.scope), state[3])
    if c.kind == RPD or c.kind == TOKQ:
        return quota_refused(c, state, tokens, now_s)
    monthly = state[3] == 2
    limit, spent = (c.limit2, state[2]) if monthly else (c.limit, state[1])
    return budget_refused(c.scope, monthly, limit, spent, cost, now_s)


def _limit_checks(checks: list[list[Check]], scope: str, base: str, limits: LimitSet) -> None:
    """Append the checks of one limit set (a tier, a model's limits or a team's) for one scope."""
    enforce = limits.enforce
    # shadow checks and concurrency stay exact (a slice of "in flight" would be a lease anyway)
    leased = limits.mode is LimitMode.LEASED and enforce
    for kind, value in ((CONC, limits.max_concurrent), (RPM, limits.rpm), (TPM, limits.tpm)):
        if value is not None:
            checks[kind].append(
                Check(kind, scope, base + "crt"[kind], value, 0, enforce, leased and kind != CONC)
            )
    if isinstance(limits, BudgetLimitSet):
        day = budget_nano_usd(limits.budget_usd_per_day)
        month = budget_nano_usd(limits.budget_usd_per_month)
        if day is not None or month is not None:
            checks[BUDGET].append(
                Check(BUDGET, scope, base + "b", _budget(day), _budget(month), enforce, leased)
            )
    # long-window quotas stay exact in a leased set (a fixed window gains nothing from slices
    # that only move admissions earlier: one exact decision per request)
    if limits.requests_per_day is not None:
        checks[RPD].append(Check(RPD, scope, base + "qr", limits.requests_per_day, 0, enforce))
    if limits.tokens_per_day is not None or limits.tokens_per_month is not None:
        checks[TOKQ].append(
            Check(TOKQ, scope, base + "qt", limits.tokens_per_day or 0, limits.tokens_per_month or 0, enforce)
        )


def _budget(nano: int | None) -> int:
    """Budget limits as the stores take them: 0 = none, so a budget of 0 USD becomes -1."""
    if nano is None:
        return 0
    return nano if nano > 0 else -1


def make_store(cfg: Config, clock: Callable[[], float] = time.time) -> Store:
    """The store of `cfg.limits.backend` (Redis is imported only when used)."""
    if cfg.limits.backend is not LimitsBackend.REDIS:
        return LocalStore(cfg, clock)
    from .redis_store import RedisStore

    redis = RedisStore(cfg)
    shared: Store = redis
    if any(s.mode is LimitMode.LEASED for _, s in limit_sets(cfg)):
        from .leased import LeasedStore

        shared = LeasedStore(cfg, redis)
    if cfg.limits.redis.on_error is OnError.FAIL_OPEN:
        return FailOpenStore(shared, LocalStore(cfg, clock))
    return shared


class LimitsStage:
    name = "limits"
    __slots__ = (
        "_default_max_tokens",
        "_live",
        "_plans",
        "_prices",
        "_refused",
        "_sync",
        "_teams",
        "decisions",
        "store",
    )
    #: the (decision, limit) labels of `decisions`' counters (fastpath_limiter_decisions): a
    #: refusal is counted at `1 + CheckKind` of the check that refused
    DECISION_LABELS = (
        ("allowed", "none"),
        ("refused", "concurrency"),
        ("refused", "rpm"),
        ("refused", "tpm"),
        ("refused", "budget"),
        ("refused", "requests_per_day"),
        ("refused", "tokens_quota"),
        ("unavailable", "none"),
    )
    _UNAVAILABLE = len(DECISION_LABELS) - 1

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self.store = make_store(cfg, clock)
        self._sync = self.store.is_sync
        self._default_max_tokens = cfg.limits.default_max_tokens
        self._live = cfg.limits.live_budget_enforcement
        self._prices = price_table(cfg)
        self._teams = cfg.teams
        self._plans: dict[tuple[str, str, str, str], Plan] = {}
        #: this worker's decisions by `DECISION_LABELS`, read by the metrics observer off the
        #: request path (the stage owns its counters: the refusing limit is known only here)
        self.decisions = [0] * len(self.DECISION_LABELS)
        #: plan -> (monotonic time until which it is refused, message, headers): a request refused
        #: by a shared requests-per-minute bucket is refused until the bucket's retry time whatever
        #: any worker does meanwhile (admissions never make it sooner), so repeats are answered
        #: here, off the network. Exact; token, budget and concurrency refusals depend on each
        #: request's size or on releases, so they are not cached. None: a local store.
        self._refused: dict[Plan, tuple[float, str, tuple[tuple[str, str], ...]]] | None = (
            {} if self.store.cache_refusals else None
        )

    def start(self, worker: Worker) -> None:
        self.store.start(worker.loop)

    async def close(self) -> None:
        """Stop renewing leases, let the settlements in flight finish, disconnect."""
        await self.store.close()

    async def settled(self) -> None:
        """Wait until the settlements sent so far have run (tests)."""
        await self.store.settled()

    # ---- plans --------------------------------------------------------------------------------
    def plan(self, principal: Principal, model: str) -> Plan:
        """The checks for this key and model (cached: a dict lookup per request)."""
        cache_key = (principal.key_id, principal.team, principal.tier_name, model)
        plan = self._plans.get(cache_key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_MAX:
                self._plans.clear()
            plan = self._plans[cache_key] = self._build_plan(principal, model)
        return plan

    def _build_plan(self, principal: Principal, model: str) -> Plan:
        key_id, team, tier = principal.key_id, principal.team, principal.tier
        team_limits = self._teams.get(team)
        # Every name of a request shares one hash tag (one Redis Cluster slot per decision): the
        # key's id, or its team's name when the team has shared limits.
        key_base = f"{{{key_id}}}:" if team_limits is None else f"{{team:{team}}}:k:{key_id}:"
        checks: list[list[Check]] = [[] for _ in range(TOKQ + 1)]
        _limit_checks(checks, "API key", key_base, tier)
        model_limits = tier.models.get(model)
        if model_limits is not None:
            _limit_checks(checks, f"API key on model {model}", f"{key_base}m:{model}:", model_limits)
        if team_limits is not None:
            _limit_checks(checks, f"team {team}", f"{{team:{team}}}:", team_limits)
        in_price, out_price, cached_price = self._prices.get(model, (0, 0, 0))
        return Plan([c for kind in checks for c in kind], in_price, out_price, cached_price)

    def reservation(self, ctx: RequestContext, plan: Plan) -> tuple[int, int, int]:
        """(prompt tokens, tokens to reserve, nano-USD to reserve) of this request."""
        if not plan.needs_prompt:
            return 0, 0, 0
        prompt = counted_prompt_tokens(ctx)
        view = ctx.view
        assert view is not None
        if isinstance(view, EmbeddingsRequestView):  # no completion: the prompt is the whole cost
            return prompt, prompt, prompt * plan.in_price
        max_tokens = view.max_tokens
        if max_tokens is None and type(view) is ChatRequestView:
            max_tokens = view.max_completion_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens
        completion = max(max_tokens, 0) * (view.n or 1)
        return prompt, prompt + completion, prompt * plan.in_price + completion * plan.out_price

    # ---- the request side ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None and ctx.route is not None
        plan = self.plan(principal, ctx.route.name)
        if not plan.checks:  # no limit applies to this key and model: nothing to ask
            self.decisions[0] += 1
            return
        if self._sync:
            prompt, tokens, cost = self.reservation(ctx, plan)
            decision = self.store.decide_now(plan, tokens, cost)
        else:
            refused = self._refused
            if refused:
                self._recently_refused(ctx, refused, plan)
            prompt, tokens, cost = self.reservation(ctx, plan)
            try:
                decision = await self.store.decide(plan, tokens, cost)
            except StoreUnavailable as exc:
                self.decisions[self._UNAVAILABLE] += 1
                raise GatewayError(
                    Fault.LIMITER_UNAVAILABLE,
                    "The rate limiter is unavailable; retry shortly.",
                    headers=(("retry-after", retry_after(int(exc.retry_s * 1000))),),
                ) from None
        headers, tokens_state = self._headers(plan, decision)
        ctx.ratelimit_headers = headers
        checks = plan.checks
        if decision.refused >= 0:
            c = checks[decision.refused]
            state = decision.states[decision.refused]
            assert state is not None
            self.decisions[1 + c.kind] += 1
            error = refusal(c, state, tokens, cost, decision.now_s)
            if c.kind == RPM and self._refused is not None and decision.holder.cache_refusals:
                if len(self._refused) >= 10_000:
                    self._refused.clear()
                self._refused[plan] = (time.monotonic() + state[3] / 1000, error.message, headers)
            raise error
        self.decisions[0] += 1
        lease = ctx.lease = Lease(principal.key_id, plan, prompt, tokens, cost)
        lease.holder = decision.holder
        lease.day, lease.month, lease.member = decision.day, decision.month, decision.member
        lease.tokens_state = tokens_state
        if decision.waived:
            self._waive(ctx, decision, tokens, cost)
        if self._live and plan.has_budget and ctx.stream and plan.out_price > 0:
            self._stream_allowance(lease, decision)

    def _recently_refused(
        self,
        ctx: RequestContext,
        refused: dict[Plan, tuple[float, str, tuple[tuple[str, str], ...]]],
        plan: Plan,
    ) -> None:
        """Answer a repeat of a cached RPM refusal without asking the store."""
        hit = refused.get(plan)
        if hit is None:
            return
        wait_ms = int((hit[0] - time.monotonic()) * 1000)
        if wait_ms <= 0:
            del refused[plan]
            return
        ctx.ratelimit_headers = tuple(
            (k, duration(wait_ms) if k == "x-ratelimit-reset-requests" else v) for k, v in hit[2]
        )
        self.decisions[1 + RPM] += 1
        raise _rate_limited(hit[1], wait_ms)

    def _waive(self, ctx: RequestContext, decision: Decision, tokens: int, cost: int) -> None:
        """Shadow checks that would have refused: say so (INFO), and remember not to settle them."""
        lease = ctx.lease
        assert lease is not None
        checks = lease.plan.checks
        lease.waived = tuple(checks[i] for i in decision.waived)
        for i in decision.waived:
            state = decision.states[i]
            assert state is not None
            would = refusal(checks[i], state, tokens, cost, decision.now_s)
            log.info(
                "limits: shadow limit waived for request %s: %s %s (%s)",
                ctx.request_id,
                would.status,
                would.code,
                would.message,
            )

    def _stream_allowance(self, lease: Lease, decision: Decision) -> None:
        """Live budget enforcement: the completion tokens a stream may produce: what it reserved
        plus what its tightest (enforced) budget has left after the reservation."""
        plan = lease.plan
        headroom: int | None = None
        waived = lease.waived
        for c, state in zip(plan.checks, decision.states, strict=True):
            if c.kind != BUDGET or (waived and c in waived):
                continue
            assert state is not None
            for limit, used, what in ((c.limit, state[1], "daily"), (c.limit2, state[2], "monthly")):
                if limit and c.enforce and (headroom is None or limit - used < headroom):
                    headroom, lease.budget_note = limit - used, f"{c.scope}'s {what} budget"
        if headroom is None:
            return
        allowed = lease.reserved_cost + max(0, headroom) - lease.prompt_tokens * plan.in_price
        lease.stream_token_limit = max(0, allowed // plan.out_price)

    def _headers(
        self, plan: Plan, decision: Decision
    ) -> tuple[tuple[tuple[str, str], ...], tuple[int, int, int] | None]:
        """`x-ratelimit-*` of the tightest requests bucket and the tightest tokens bucket (and
        the latter's (limit, remaining, reset ms))."""
        headers: tuple[tuple[str, str], ...] = ()
        best: tuple[int, int, int] | None = None
        checks = plan.checks
        states = decision.states
        for indices, what in plan.header_groups:
            best = None
            for i in indices:
                state = states[i]
                assert state is not None
                if best is None or state[1] < best[1]:
                    best = (checks[i].limit, state[1], state[2])
            assert best is not None
            headers += (
                (f"x-ratelimit-limit-{what}", str(best[0])),
                (f"x-ratelimit-remaining-{what}", str(best[1])),
                (f"x-ratelimit-reset-{what}", duration(best[2])),
            )
        tokens_state = best if plan.tpm_limits else None
        if plan.window_groups:
            headers += self._window_headers(plan, decision)
        return headers, tokens_state

    @staticmethod
    def _window_headers(plan: Plan, decision: Decision) -> tuple[tuple[str, str], ...]:
        """`x-ratelimit-{limit,remaining,reset}-requests-day` / `-tokens-day` / `-tokens-month`
        of the tightest quota of each (checks a refusal did not reach are left out)."""
        headers: tuple[tuple[str, str], ...] = ()
        checks, states = plan.checks, decision.states
        for indices, what, which in plan.window_groups:
            best: tuple[int, int] | None = None
            for i in indices:
                state = states[i]
                if state is None:
                    continue
                limit = checks[i].limit2 if which else checks[i].limit
                left = max(0, limit - state[1 + which])
                if best is None or left < best[1]:
                    best = (limit, left)
            if best is not None:
                reset_ms = window_reset_s(decision.now_s, bool(which)) * 1000
                headers += (
                    (f"x-ratelimit-limit-{what}", str(best[0])),
                    (f"x-ratelimit-remaining-{what}", str(best[1])),
                    (f"x-ratelimit-reset-{what}", duration(reset_ms)),
                )
        return headers

    # ---- the finish side ----------------------------------------------------------------------
    def on_finish(self, ctx: RequestContext) -> None:
        """Settle the lease once: return the concurrency slots, unused reserved tokens and money.
        The pipeline calls it once per request however it ends, before a unary reply (so that
        reply's token headers already show the real use) or after a stream ended."""
        lease = ctx.lease
        if lease is None:
            return
        ctx.lease = None
        plan = lease.plan
        holder = lease.holder
        assert holder is not None
        unused = (
            lease.reserved_tokens - tokens_used(ctx, lease.prompt_tokens)
            if plan.tpm_limits or plan.has_tokq
            else 0
        )
        unused_cost = lease.reserved_cost - cost_used(ctx, lease) if plan.has_budget else 0
        holder.settle(lease, unused, unused_cost)
        if ctx.status == 0 and plan.tpm_limits:  # a reply is still to come: show the real use
            _, remaining, reset = holder.tokens_after(lease, unused)
            ctx.ratelimit_headers = (
                *(h for h in ctx.ratelimit_headers if h[0] not in _TOKEN_STATE),
                ("x-ratelimit-remaining-tokens", str(remaining)),
                ("x-ratelimit-reset-tokens", duration(reset)),
            )
