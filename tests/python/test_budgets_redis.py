"""Budgets, per-team and per-model limits with `limits.backend: redis`: the real stage in
process against the real Redis at 127.0.0.1:6379 (exact numbers; window rollover by rewriting
the window a budget hash holds; the script's calendar against Python's), and concurrent
reservations from two stages (two connections) that can never overspend. The HTTP bursts
across 2 gateway instances x 4 workers live in test_limits_redis.py."""

from __future__ import annotations

import asyncio
import calendar
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from budget_harness import (
    IN,
    NANO,
    OUT,
    finish,
    parse,
    principal,
    prompt_tokens,
    redis_counted,
    redis_window,
    refused,
    request,
    run_stages,
    used,
)
from conftest import free_port, redis_or_skip

from gateway.config import Config
from gateway.context import RequestContext
from gateway.pipeline.limits import LimitsStage, month_number, usd
from gateway.pipeline.limits.redis_store import LUA_LIB, LUA_MONTH_OF

redis = pytest.importorskip("redis")


@pytest.fixture
def r() -> Iterator[Any]:
    client = redis_or_skip()
    yield client
    client.close()


@pytest.fixture
def prefix(r: Any) -> Iterator[str]:
    p = f"fp-test-budget:{uuid.uuid4().hex[:12]}:"
    yield p
    keys = list(r.scan_iter(match=f"{p}*", count=1000))
    if keys:
        r.delete(*keys)


def _cfg(prefix: str, extra: str) -> Config:
    return parse(
        extra
        + "limits:\n  backend: redis\n  live_budget_enforcement: true\n"
        + f"  redis: {{key_prefix: '{prefix}', timeout_ms: 2000}}\n"
    )


BUDGET_YAML = """
prices:
  echo: {input_per_mtok: 1000, output_per_mtok: 2000}
tiers:
  b: {budget_usd_per_day: 1, budget_usd_per_month: 1.5}
  rb: {rpm: 10, budget_usd_per_day: 0.1}
"""


def test_month_of_matches_the_utc_calendar(r: Any) -> None:
    days = [*range(0, 120_000, 29), 19_722, 19_723, 20_513, 20_514, 21_184]  # around month ends
    script = (
        LUA_LIB
        + LUA_MONTH_OF
        + "local o = {} for i = 1, #ARGV do o[i] = month_of(tonumber(ARGV[i])) end return o"
    )
    got = r.eval(script, 0, *days)
    assert got == [month_number(d * 86_400) for d in days]
    assert month_number(calendar.timegm((2024, 2, 29, 0, 0, 0, 0, 0, 0))) == 2024 * 12 + 1


def test_budget_reserve_settle_refund_overshoot_and_rollover_redis(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix, BUDGET_YAML)
    alice = principal(cfg, "alice", "b")
    name = f"{prefix}{{alice}}:b"

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        a = request(alice)
        p = prompt_tokens(a)
        reserve = p * IN + 100 * OUT
        await stage.on_request(a)
        assert a.lease is not None and a.lease.reserved_cost == reserve
        assert redis_counted(r, name) == (reserve, reserve)
        assert 32 * 86_400_000 < r.pttl(name) <= 33 * 86_400_000
        b = request(alice)
        await stage.on_request(b)
        assert redis_counted(r, name) == (2 * reserve, 2 * reserve)
        used(a, 10)
        await finish(stage, a)
        cost_a = p * IN + 10 * OUT
        assert redis_counted(r, name) == (reserve + cost_a,) * 2
        await finish(stage, a)  # no-op
        used(b, 150)  # overshoot is charged
        await finish(stage, b)
        spent = cost_a + p * IN + 150 * OUT
        assert redis_counted(r, name) == (spent, spent)
        big = request(alice, max_tokens=400)
        exc = await refused(stage, big)
        assert (exc.status, exc.code) == (429, "budget_exceeded")
        assert "API key's daily budget of $1.00" in exc.message and "00:00 UTC" in exc.message
        assert usd(NANO - spent) in exc.message
        assert 1 <= int(dict(exc.headers)["retry-after"]) <= 86_400
        assert redis_counted(r, name) == (spent, spent)  # the refusal took nothing
        c = request(alice, max_tokens=300)
        await stage.on_request(c)
        used(c, 300)
        await finish(stage, c)
        spent += p * IN + 300 * OUT
        assert redis_counted(r, name) == (spent, spent)
        # A new UTC day (the hash holds yesterday): the daily budget starts over, not the monthly.
        day, month = redis_window(r)
        r.hset(name, "d", day - 1)
        assert redis_counted(r, name) == (0, spent)
        exc = await refused(stage, request(alice, max_tokens=300))
        assert "monthly budget of $1.50" in exc.message
        assert "the start of the next UTC calendar month" in exc.message
        e = request(alice, max_tokens=200)
        await stage.on_request(e)
        day_e = p * IN + 200 * OUT
        assert redis_counted(r, name) == (day_e, spent + day_e)
        # The month ends before e does: its settlement leaves the new month's window alone.
        r.hset(name, mapping={"m": month + 1, "ms": 7})
        used(e, 0)
        await finish(stage, e)
        assert r.hmget(name, "ds", "ms") == [str(p * IN).encode(), b"7"]

    run_stages(run)


def test_refused_requests_leave_no_count_redis(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix, BUDGET_YAML)
    k = principal(cfg, "k", "rb")

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        exc = await refused(stage, request(k, max_tokens=100))  # 0.2 USD > 0.1 USD
        assert exc.code == "budget_exceeded"
        assert r.exists(f"{prefix}{{k}}:r", f"{prefix}{{k}}:b") == 0
        ok = request(k, max_tokens=10)
        await stage.on_request(ok)
        assert ("x-ratelimit-remaining-requests", "9") in ok.ratelimit_headers
        free = request(k, model="free-model", max_tokens=100_000)  # no price: not limited
        await stage.on_request(free)
        assert free.lease is not None and free.lease.reserved_cost == 0
        await finish(stage, free)
        await finish(stage, ok)

    run_stages(run)


def test_concurrent_reservations_never_overspend_redis(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix, BUDGET_YAML)
    alice = principal(cfg, "alice", "b")

    async def run(stages: list[LimitsStage]) -> None:
        stages += [LimitsStage(cfg), LimitsStage(cfg)]  # two workers' pools

        async def one(i: int) -> RequestContext | None:
            ctx = request(alice)
            try:
                await stages[i % 2].on_request(ctx)
            except Exception:
                return None
            return ctx

        results = await asyncio.gather(*(one(i) for i in range(60)))
        admitted = [c for c in results if c is not None]
        reserve = prompt_tokens(request(alice)) * IN + 100 * OUT
        assert len(admitted) == NANO // reserve
        assert redis_counted(r, f"{prefix}{{alice}}:b")[0] == len(admitted) * reserve <= NANO
        for i, ctx in enumerate(admitted):
            used(ctx, 100)
            await finish(stages[i % 2], ctx)
        assert redis_counted(r, f"{prefix}{{alice}}:b")[0] == len(admitted) * reserve

    run_stages(run)


TEAM_YAML = """
prices:
  echo: {input_per_mtok: 1000, output_per_mtok: 2000}
tiers:
  t: {rpm: 100, budget_usd_per_day: 10, models: {echo: {rpm: 2, tpm: 500, max_concurrent: 1}}}
teams:
  research: {rpm: 3, max_concurrent: 2, budget_usd_per_day: 0.5}
"""


def test_team_and_model_limits_redis(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix, TEAM_YAML)
    a = principal(cfg, "a", "t", "research")
    b = principal(cfg, "b", "t", "research")
    base = f"{prefix}{{team:research}}:"

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        # the model's concurrency (1 per key on echo) and rate (2 per minute)
        first = request(a, max_tokens=10)
        await stage.on_request(first)
        assert r.zcard(f"{base}k:a:m:echo:c") == 1 and r.zcard(f"{base}c") == 1
        exc = await refused(stage, request(a, max_tokens=10))
        assert "concurrent requests for this API key on model echo (limit 1)" in exc.message
        used(first, 10)
        await finish(stage, first)
        assert r.zcard(f"{base}k:a:m:echo:c") == 0 and r.zcard(f"{base}c") == 0
        second = request(a, max_tokens=10)
        await stage.on_request(second)
        await finish(stage, second)
        exc = await refused(stage, request(a, max_tokens=10))
        assert "2 requests per minute for this API key on model echo" in exc.message
        # the team's budget (0.5 USD a day) binds before the key's (10 USD), shared by a and b
        exc = await refused(stage, request(b, model="echo", max_tokens=300))
        assert "team research's daily budget of $0.50" in exc.message
        # the team's rate: 3 per minute, a used 2
        third = request(b, model="gpt-4o-mini")
        await stage.on_request(third)
        exc = await refused(stage, request(b, model="gpt-4o-mini"))
        assert "3 requests per minute for this team research" in exc.message
        await finish(stage, third)
        # every key of the decision is in one hash slot: the team's tag
        assert all(k.startswith(base.encode()) for k in r.scan_iter(match=f"{prefix}*"))

    run_stages(run)


def test_live_allowance_from_the_script(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix, BUDGET_YAML)
    alice = principal(cfg, "alice", "b")

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        s = request(alice, stream=True)
        await stage.on_request(s)
        assert s.lease is not None
        p = prompt_tokens(s)
        left = NANO - (p * IN + 100 * OUT)
        assert s.lease.stream_token_limit == 100 + left // OUT
        assert s.lease.budget_note == "API key's daily budget"
        await finish(stage, s)

    run_stages(run)


def test_a_key_without_limits_costs_no_round_trip() -> None:
    # Redis is unreachable and fails closed: a request it were asked about would be refused.
    cfg = parse(
        BUDGET_YAML
        + "  none: {}\nlimits:\n  backend: redis\n"
        + f"  redis: {{url: 'redis://127.0.0.1:{free_port()}/0', on_error: fail_closed}}\n"
    )
    nobody = principal(cfg, "n", "none")

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        ctx = request(nobody)
        await stage.on_request(ctx)
        assert ctx.lease is None and ctx.ratelimit_headers == ()
        exc = await refused(stage, request(principal(cfg, "k", "b")))
        assert exc.code == "limiter_unavailable"

    run_stages(run)
