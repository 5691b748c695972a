"""Stage `limits`: requests per minute, tokens per minute, concurrent requests and money budgets,
per key (by tier), per key and model (`tiers.<t>.models`) and per team (`teams:`).

Tokens and money are *reserved, then settled* (TensorZero's "estimate, then reconcile"): before
the call the request reserves its prompt tokens (counted by the fastpath) + `max_tokens` (or
`limits.default_max_tokens`) x `n`, and the matching cost at the model's price (`prices:`, in
integer nano-USD: no float drift); when the request ends, however it ends, `on_finish` gives
back what the response did not use (or charges what it used beyond). The checks of one request
are all-or-nothing: a refused request leaves no count behind (buckets taken before the refusing
check are given back in the same synchronous step), and the in-flight gauges are returned on
every exit path (the pipeline calls `on_finish` in a `finally`; the lease makes a second call a
no-op). Budgets are fixed windows: the UTC day and the UTC calendar month; a request counts in
the window in which it was admitted (its settlement adjusts that window, or nothing once the
window has ended). Models without a price cost nothing (budgets do not limit them).

Backend `local`: `_fastpath.LocalLimiter` buckets and budget counters in this worker process;
exact for one worker, and a decision is atomic (no await between check and take). With N
workers each enforces the full limits on its own share of the traffic (up to N x in total), and
budgets restart with the process. Backend `redis` (`limits_redis.RedisLimitsStage`, same
interface, same `Plan`) holds them exactly across workers and machines, and falls back to this
stage when Redis fails open.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from .. import _fastpath
from ..config import Config, budget_nano_usd, nano_usd_per_token
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..principal import Principal
from ..quota import Check, CheckKind, Lease, Plan
from ..schemas import ChatRequestView
from ..usage import cost_used, counted_prompt_tokens, tokens_used

#: A concurrency refusal has no refill time; clients may retry after this long.
_CONCURRENCY_RETRY_MS = 1_000
_TOKEN_STATE = frozenset(("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"))

CONC, RPM, TPM, BUDGET = CheckKind.CONC, CheckKind.RPM, CheckKind.TPM, CheckKind.BUDGET
#: The kind codes of the Redis scripts.
KIND_CODE = ("c", "r", "r", "b")
_DAY_S = 86_400
_PLAN_CACHE_MAX = 10_000


def _limit_checks(checks: list[list[Check]], scope: str, base: str, limits: object) -> None:
    """Append `limits`' checks (a tier, a model's limits or a team's) for one scope."""
    for kind, field in ((CONC, "max_concurrent"), (RPM, "rpm"), (TPM, "tpm")):
        value = getattr(limits, field)
        if value is not None:
            checks[kind].append(Check(kind, scope, base + "crt"[kind], value))
    day = budget_nano_usd(getattr(limits, "budget_usd_per_day", None))
    month = budget_nano_usd(getattr(limits, "budget_usd_per_month", None))
    if day is not None or month is not None:
        # A budget of 0 USD refuses every priced request: keep it apart from "none" (0).
        checks[BUDGET].append(Check(BUDGET, scope, base + "b", _budget(day), _budget(month)))


def _budget(nano: int | None) -> int:
    """Budget limits as the scripts take them: 0 = none, so a budget of 0 USD becomes -1."""
    if nano is None:
        return 0
    return nano if nano > 0 else -1


def duration(ms: int) -> str:
    """OpenAI's reset header format: `20ms`, `1s`, `1.5s`, `6m0s`."""
    if ms < 1_000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def usd(nano: int) -> str:
    """Nano-USD for messages: `$0.0105`, `$12.00`."""
    text = f"{nano / 1e9:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _rate_limited(message: str, retry_after_ms: int, code: str | None = None) -> GatewayError:
    retry_s = max(1, -(-retry_after_ms // 1000))
    return GatewayError(
        Fault.RATE_LIMITED,
        message,
        headers=(("retry-after", str(retry_s)), ("retry-after-ms", str(retry_after_ms))),
        code=code,
    )


def month_number(now_s: float) -> int:
    """UTC calendar month as a number: year * 12 + month - 1."""
    t = time.gmtime(now_s)
    return t.tm_year * 12 + t.tm_mon - 1


def window_reset_s(now_s: int, monthly: bool) -> int:
    """Seconds until the UTC day (or calendar month) of `now_s` ends."""
    if not monthly:
        return _DAY_S - now_s % _DAY_S
    t = time.gmtime(now_s)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now_s


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


class LimitsStage:
    name = "limits"
    __slots__ = (
        "_buckets",
        "_budgets",
        "_clock",
        "_default_max_tokens",
        "_inflight",
        "_live",
        "_max_budgets",
        "_plans",
        "_prices",
        "_teams",
    )

    def __init__(self, cfg: Config, clock: Callable[[], float] = time.time) -> None:
        self._buckets = _fastpath.LocalLimiter(cfg.limits.max_tracked_keys)
        #: gauge name -> requests in flight (entries at 0 are removed, so the dict stays small)
        self._inflight: dict[str, int] = {}
        #: budget name -> [UTC day, nano-USD spent that day, UTC month, nano-USD spent that month]
        self._budgets: dict[str, list[int]] = {}
        self._max_budgets = cfg.limits.max_tracked_keys
        self._default_max_tokens = cfg.limits.default_max_tokens
        self._live = cfg.limits.live_budget_enforcement
        #: wall clock (Unix seconds) for the budget windows; a parameter for tests
        self._clock = clock
        self._prices = {
            m: (nano_usd_per_token(p.input_per_mtok), nano_usd_per_token(p.output_per_mtok))
            for m, p in cfg.prices.items()
        }
        self._teams = cfg.teams
        self._plans: dict[tuple[str, str, str, str], Plan] = {}

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
        checks: list[list[Check]] = [[], [], [], []]
        _limit_checks(checks, "API key", key_base, tier)
        model_limits = tier.models.get(model)
        if model_limits is not None:
            _limit_checks(checks, f"API key on model {model}", f"{key_base}m:{model}:", model_limits)
        if team_limits is not None:
            _limit_checks(checks, f"team {team}", f"{{team:{team}}}:", team_limits)
        in_price, out_price = self._prices.get(model, (0, 0))
        return Plan([c for kind in checks for c in kind], in_price, out_price)

    def reservation(self, ctx: RequestContext, plan: Plan) -> tuple[int, int, int]:
        """(prompt tokens, tokens to reserve, nano-USD to reserve) of this request."""
        if not plan.needs_prompt:
            return 0, 0, 0
        prompt = counted_prompt_tokens(ctx)
        completion = self._completion_reserve(ctx)
        return prompt, prompt + completion, prompt * plan.in_price + completion * plan.out_price

    def stream_allowance(
        self, ctx: RequestContext, lease: Lease, spent: list[tuple[Check, int, int]]
    ) -> None:
        """Live budget enforcement: the completion tokens a stream may produce: what it reserved
        plus what its tightest budget has left after the reservation. `spent`: each budget
        check with its day and month spending right after the reservation (nano-USD)."""
        plan = lease.plan
        if not self._live or not ctx.stream or plan.out_price <= 0:
            return
        headroom: int | None = None
        for c, day, month in spent:
            for limit, used, what in ((c.limit, day, "daily"), (c.limit2, month, "monthly")):
                if limit and (headroom is None or limit - used < headroom):
                    headroom, lease.budget_note = limit - used, f"{c.scope}'s {what} budget"
        if headroom is None:
            return
        allowed = lease.reserved_cost + max(0, headroom) - lease.prompt_tokens * plan.in_price
        lease.stream_token_limit = max(0, allowed // plan.out_price)

    # ---- the request side ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None and ctx.route is not None
        plan = self.plan(principal, ctx.route.name)
        if not plan.checks:  # no limit applies to this key and model
            return
        prompt, tokens, cost = self.reservation(ctx, plan)
        self.admit(ctx, principal.key_id, plan, prompt, tokens, cost)

    def admit(self, ctx: RequestContext, key: str, plan: Plan, prompt: int, tokens: int, cost: int) -> None:
        """All checks, then all takes, in one synchronous step (atomic within this worker)."""
        buckets = self._buckets
        checks = plan.checks
        results: list[tuple[bool, int, int, int] | None] = [None] * len(checks)
        taken: list[tuple[str, int]] = []
        day = month = now_s = 0
        if plan.has_budget:
            now = self._clock()
            now_s = int(now)
            day = now_s // _DAY_S
            month = month_number(now)
        refused: Check | None = None
        refusal: GatewayError | None = None
        for i, c in enumerate(checks):
            kind = c.kind
            if kind == CONC:
                if self._inflight.get(c.local_key, 0) >= c.limit:
                    refused = c
                    break
            elif kind == BUDGET:
                spent_day, spent_month = self._spent(c.local_key, day, month)
                over = cost > 0 and (
                    (c.limit and spent_day + cost > c.limit) or (c.limit2 and spent_month + cost > c.limit2)
                )
                if over:
                    refused = c
                    monthly = not (c.limit and spent_day + cost > c.limit)
                    limit, spent = (c.limit2, spent_month) if monthly else (c.limit, spent_day)
                    refusal = budget_refused(c.scope, monthly, limit, spent, cost, now_s)
                    break
            else:
                amount = 1 if kind == RPM else tokens
                decision = results[i] = buckets.acquire(c.local_key, amount, c.limit, c.limit)
                if not decision[0]:
                    refused = c
                    break
                if amount:
                    taken.append((c.local_key, amount))
        if refused is not None:
            for name, amount in taken:  # refused: nothing stays taken
                buckets.refund(name, amount)
            ctx.ratelimit_headers = self._headers(plan, results, taken)
            if refused.kind == CONC:
                raise _rate_limited(
                    f"Too many concurrent requests for this {refused.scope} (limit {refused.limit}).",
                    _CONCURRENCY_RETRY_MS,
                )
            if refusal is not None:
                raise refusal
            res = results[checks.index(refused)]
            assert res is not None
            if refused.kind == RPM:
                raise _rate_limited(
                    f"Rate limit reached: {refused.limit} requests per minute for this {refused.scope}.",
                    res[3],
                )
            raise _rate_limited(tokens_refused_message(tokens, refused.limit, refused.scope), res[3])
        budgets: list[tuple[Check, int, int]] = []
        for c in plan.settle_checks:
            if c.kind == CONC:
                self._inflight[c.local_key] = self._inflight.get(c.local_key, 0) + 1
            elif c.kind == BUDGET:
                state = self._take_budget(c.local_key, day, month, cost)
                budgets.append((c, state[1], state[3]))
        lease = ctx.lease = Lease(key, plan, prompt, tokens, cost)
        lease.day, lease.month = day, month
        if budgets:
            self.stream_allowance(ctx, lease, budgets)
        ctx.ratelimit_headers = self._headers(plan, results, ())

    def _spent(self, name: str, day: int, month: int) -> tuple[int, int]:
        state = self._budgets.get(name)
        if state is None:
            return 0, 0
        return (state[1] if state[0] == day else 0), (state[3] if state[2] == month else 0)

    def _take_budget(self, name: str, day: int, month: int, cost: int) -> list[int]:
        state = self._budgets.get(name)
        if state is None:
            if cost == 0:
                return [day, 0, month, 0]
            if len(self._budgets) >= self._max_budgets:
                self._sweep_budgets(month)
            state = self._budgets[name] = [day, 0, month, 0]
        if state[0] != day:
            state[0], state[1] = day, 0
        if state[2] != month:
            state[2], state[3] = month, 0
        state[1] += cost
        state[3] += cost
        return state

    def _sweep_budgets(self, month: int) -> None:
        """Drop budgets of past months; if that is not enough, arbitrary ones (they start over:
        fail-open, like a busy bucket evicted from the limiter)."""
        budgets = self._budgets
        for name in [n for n, s in budgets.items() if s[2] != month]:
            del budgets[name]
        excess = len(budgets) - (self._max_budgets - self._max_budgets // 8 - 1)
        for name in list(budgets)[: max(0, excess)]:
            del budgets[name]

    def on_finish(self, ctx: RequestContext) -> None:
        """Settle the lease once: return the concurrency slots, unused reserved tokens and money.
        The pipeline calls it when the request ends however it ends, and before a unary reply
        (so that reply's token headers already show the real use)."""
        lease = ctx.lease
        if lease is None:
            return
        ctx.lease = None
        plan = lease.plan
        unused = lease.reserved_tokens - tokens_used(ctx, lease.prompt_tokens)
        unused_cost = lease.reserved_cost - cost_used(ctx, lease)
        buckets = self._buckets
        for c in plan.settle_checks:
            name = c.local_key
            if c.kind == CONC:
                left = self._inflight.get(name, 0) - 1
                if left > 0:
                    self._inflight[name] = left
                else:
                    self._inflight.pop(name, None)
            elif c.kind == TPM:
                if unused > 0:
                    buckets.refund(name, unused)
                elif unused < 0:
                    buckets.charge(name, -unused, c.limit)
            elif unused_cost:
                state = self._budgets.get(name)
                if state is not None:
                    if state[0] == lease.day:
                        state[1] = max(0, state[1] - unused_cost)
                    if state[2] == lease.month:
                        state[3] = max(0, state[3] - unused_cost)
        if ctx.status == 0 and plan.tpm_limits:  # a reply is still to come: show the real use
            tokens = self._peek(plan, TPM)
            ctx.ratelimit_headers = (
                *(h for h in ctx.ratelimit_headers if h[0] not in _TOKEN_STATE),
                ("x-ratelimit-remaining-tokens", str(tokens[1])),
                ("x-ratelimit-reset-tokens", duration(tokens[2])),
            )

    # ---- helpers ------------------------------------------------------------------------------
    def _completion_reserve(self, ctx: RequestContext) -> int:
        view = ctx.view
        assert view is not None
        max_tokens = view.max_tokens
        if max_tokens is None and type(view) is ChatRequestView:
            max_tokens = view.max_completion_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens
        return max(max_tokens, 0) * (view.n or 1)

    def _peek(self, plan: Plan, kind: int) -> tuple[int, int, int]:
        """(limit, remaining, reset ms) of the tightest bucket of `kind`, read without taking."""
        best: tuple[int, int, int] | None = None
        for c in plan.checks:
            if c.kind == kind:
                res = self._buckets.acquire(c.local_key, 0, c.limit, c.limit)
                if best is None or res[1] < best[1]:
                    best = (c.limit, res[1], res[2])
        assert best is not None
        return best

    def _headers(
        self,
        plan: Plan,
        results: list[tuple[bool, int, int, int] | None],
        refunded: list[tuple[str, int]] | tuple[()],
    ) -> tuple[tuple[str, str], ...]:
        """`x-ratelimit-*` of the tightest requests bucket and the tightest tokens bucket."""
        headers: tuple[tuple[str, str], ...] = ()
        back = dict(refunded) if refunded else None
        checks = plan.checks
        for indices, what in plan.header_groups:
            best: tuple[int, int, int] | None = None
            for i in indices:
                c = checks[i]
                res = results[i]
                if res is None:
                    res = self._buckets.acquire(c.local_key, 0, c.limit, c.limit)
                remaining = res[1]
                if back is not None:
                    remaining = min(c.limit, remaining + back.get(c.local_key, 0))
                if best is None or remaining < best[1]:
                    best = (c.limit, remaining, res[2])
            if best is not None:
                headers += (
                    (f"x-ratelimit-limit-{what}", str(best[0])),
                    (f"x-ratelimit-remaining-{what}", str(best[1])),
                    (f"x-ratelimit-reset-{what}", duration(best[2])),
                )
        return headers


def tokens_refused_message(reserved: int, tpm: int, scope: str = "API key") -> str:
    """Why a token reservation was refused: over the per-minute limit on its own, or not now."""
    if reserved > tpm:
        return (
            f"This request needs {reserved} tokens (prompt + max_tokens), more than this "
            f"{scope}'s limit of {tpm} tokens per minute; lower max_tokens."
        )
    return f"Rate limit reached: {tpm} tokens per minute for this {scope}."
