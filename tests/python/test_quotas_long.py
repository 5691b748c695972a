"""Long-window quotas (`requests_per_day`, `tokens_per_day`, `tokens_per_month`): the real limits
stage in process, local (an injected clock: exact numbers and the UTC midnight rollover without
waiting) and against the real Redis at 127.0.0.1:6379 (the rollover by rewriting the window a
quota hash holds, as the budget tests do; two stages = two workers sharing it exactly)."""

from __future__ import annotations

import asyncio
import calendar
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from budget_harness import (
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
from conftest import redis_or_skip

from gateway.config import Config, ConfigError
from gateway.pipeline.limits import LimitsStage, duration, month_number
from gateway.pipeline.limits.local_store import LocalStore

QUOTA_YAML = """
tiers:
  q: {requests_per_day: 3}
  t: {tokens_per_day: 1000, tokens_per_month: 1500}
  m: {models: {echo: {requests_per_day: 2}}}
teams:
  research: {tokens_per_day: 600}
"""
# 2026-11-30T12:00:00Z: the next day is the next month too
T0 = calendar.timegm((2026, 11, 30, 12, 0, 0, 0, 0, 0))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _counted(stage: LimitsStage, name: str, now: float) -> tuple[int, int]:
    store = stage.store
    assert isinstance(store, LocalStore)
    return store.spent(name, int(now) // 86_400, month_number(now))


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("tiers: {x: {requests_per_day: 0}}", "$.tiers.x.requests_per_day: must be > 0"),
        ("tiers: {x: {tokens_per_month: -1}}", "$.tiers.x.tokens_per_month: must be > 0"),
        ("tiers: {x: {tokens_per_day: 10000000000000000}}", "$.tiers.x.tokens_per_day: at most"),
        ("teams: {x: {tokens_per_day: 0}}", "$.teams.x.tokens_per_day: must be > 0"),
    ],
)
def test_quota_config_errors(extra: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("$", r"\$").replace(".", r"\.")):
        parse(extra + "\n")


def test_duration_of_a_day() -> None:
    assert duration(86_400_000) == "24h0m0s"
    assert duration(3_600_500) == "1h0m0.5s"
    assert duration(59_000) == "59s"


def test_requests_per_day_local_refuses_at_the_limit_and_rolls_over_at_midnight() -> None:
    cfg = parse(QUOTA_YAML)
    clock = Clock(T0)
    stage = LimitsStage(cfg, clock=clock)
    alice = principal(cfg, "alice", "q")

    async def run() -> None:
        for i in range(3):
            ctx = request(alice)
            await stage.on_request(ctx)
            h = dict(ctx.ratelimit_headers)
            assert h["x-ratelimit-limit-requests-day"] == "3"
            assert h["x-ratelimit-remaining-requests-day"] == str(2 - i)
            assert h["x-ratelimit-reset-requests-day"] == "12h0m0s"
            stage.on_finish(ctx)  # a request stays counted
        exc = await refused(stage, request(alice))
        assert (exc.status, exc.code) == (429, "requests_per_day_exceeded")
        assert "API key's quota of 3 requests per UTC day is used up" in exc.message
        assert "00:00 UTC (in 12h0m)" in exc.message
        assert dict(exc.headers)["retry-after"] == str(12 * 3600)
        assert _counted(stage, "{alice}:qr", clock.now) == (3, 3)
        clock.now = T0 + 12 * 3600 - 1  # one second before UTC midnight: still refused
        exc = await refused(stage, request(alice))
        assert dict(exc.headers)["retry-after"] == "1"
        clock.now = T0 + 12 * 3600  # the next UTC day
        ctx = request(alice)
        await stage.on_request(ctx)
        assert dict(ctx.ratelimit_headers)["x-ratelimit-remaining-requests-day"] == "2"

    asyncio.run(run())


def test_tokens_per_day_and_month_local_reserve_settle_and_roll_over() -> None:
    cfg = parse(QUOTA_YAML)
    clock = Clock(T0)
    stage = LimitsStage(cfg, clock=clock)
    bob = principal(cfg, "bob", "t")
    name = "{bob}:qt"

    async def run() -> None:
        a = request(bob, max_tokens=300)
        p = prompt_tokens(a)
        await stage.on_request(a)  # reserves prompt + max_tokens
        assert _counted(stage, name, clock.now) == (p + 300, p + 300)
        h = dict(a.ratelimit_headers)
        assert h["x-ratelimit-remaining-tokens-day"] == str(1000 - p - 300)
        assert h["x-ratelimit-limit-tokens-month"] == "1500"
        assert h["x-ratelimit-remaining-tokens-month"] == str(1500 - p - 300)
        assert h["x-ratelimit-reset-tokens-month"] == "12h0m0s"  # 2026-12-01T00:00Z
        used(a, 50)  # settled to the actual use
        stage.on_finish(a)
        spent = p + 50
        assert _counted(stage, name, clock.now) == (spent, spent)
        b = request(bob, max_tokens=700)
        used_b = 900 - spent - p  # an overshoot is charged
        await stage.on_request(b)
        used(b, used_b)
        stage.on_finish(b)
        assert _counted(stage, name, clock.now) == (900, 900)
        exc = await refused(stage, request(bob, max_tokens=200))
        assert (exc.status, exc.code) == (429, "tokens_per_day_exceeded")
        assert "quota of 1000 tokens per UTC day has 100 left" in exc.message
        assert dict(exc.headers)["retry-after"] == str(12 * 3600)
        exc = await refused(stage, request(bob, max_tokens=2000))
        assert "more than this API key's quota of 1000 tokens per UTC day" in exc.message
        # The next UTC day is the next month too: both start over.
        clock.now = T0 + 86_400
        c = request(bob, max_tokens=900)
        await stage.on_request(c)
        used(c, 900 - p)
        stage.on_finish(c)
        # Two days later, same month: the day starts over, the month does not.
        clock.now = T0 + 3 * 86_400
        d = request(bob, max_tokens=700)
        exc = await refused(stage, d)
        assert exc.code == "tokens_per_month_exceeded"
        assert "quota of 1500 tokens per UTC month has 600 left" in exc.message
        assert "the start of the next UTC calendar month" in exc.message
        assert int(dict(exc.headers)["retry-after"]) == 28 * 86_400 + 12 * 3600  # to 2027-01-01

    asyncio.run(run())


def test_team_and_model_quotas_local() -> None:
    cfg = parse(QUOTA_YAML)
    stage = LimitsStage(cfg, clock=Clock(T0))
    a = principal(cfg, "a", "m", team="research")
    b = principal(cfg, "b", "m", team="research")

    async def run() -> None:
        for who in (a, a):
            ctx = request(who, model="echo", max_tokens=10)
            await stage.on_request(ctx)
            stage.on_finish(ctx)
        exc = await refused(stage, request(a, model="echo", max_tokens=10))
        assert exc.code == "requests_per_day_exceeded"
        assert "API key on model echo's quota of 2 requests" in exc.message
        ctx = request(a, model="free-model", max_tokens=10)  # another model: not that quota
        await stage.on_request(ctx)
        stage.on_finish(ctx)
        # the team's 600 tokens a day are shared by a and b
        exc = await refused(stage, request(b, model="free-model", max_tokens=600))
        assert exc.code == "tokens_per_day_exceeded" and "team research's quota" in exc.message

    asyncio.run(run())


# ---- Redis: shared exactly, the window rollover -------------------------------------------------
@pytest.fixture
def r() -> Iterator[Any]:
    client = redis_or_skip()
    yield client
    client.close()


@pytest.fixture
def prefix(r: Any) -> Iterator[str]:
    p = f"fp-test-quota:{uuid.uuid4().hex[:12]}:"
    yield p
    keys = list(r.scan_iter(match=f"{p}*", count=1000))
    if keys:
        r.delete(*keys)


def _cfg(prefix: str) -> Config:
    leased = (
        "  lq: {rpm: 100000, tpm: 10000000, requests_per_day: 2, tokens_per_month: 100000, mode: leased}\n"
    )
    return parse(
        QUOTA_YAML.replace("teams:", leased + "teams:")
        + f"limits:\n  backend: redis\n  redis: {{key_prefix: '{prefix}', timeout_ms: 2000}}\n"
    )


def test_requests_per_day_redis_is_exact_across_workers_and_rolls_over(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix)
    alice = principal(cfg, "alice", "q")
    name = f"{prefix}{{alice}}:qr"

    async def run(stages: list[LimitsStage]) -> None:
        one, two = LimitsStage(cfg), LimitsStage(cfg)
        stages += [one, two]
        ctxs = [request(alice) for _ in range(8)]
        results = await asyncio.gather(
            *((one if i % 2 else two).on_request(c) for i, c in enumerate(ctxs)), return_exceptions=True
        )
        admitted = [c for c, res in zip(ctxs, results, strict=True) if res is None]
        errors = [res for res in results if res is not None]
        assert len(admitted) == 3 and len(errors) == 5
        for exc in errors:
            assert getattr(exc, "code", None) == "requests_per_day_exceeded"
            retry = int(dict(exc.headers)["retry-after"])
            sec, _ = r.time()
            assert abs(retry - (86_400 - int(sec) % 86_400)) <= 2
        assert dict(admitted[0].ratelimit_headers)["x-ratelimit-limit-requests-day"] == "3"
        assert redis_counted(r, name) == (3, 3)
        assert 32 * 86_400_000 < r.pttl(name) <= 33 * 86_400_000
        for c in admitted:
            await finish(one, c)
        assert redis_counted(r, name) == (3, 3)  # requests are not given back
        # A new UTC day (the hash holds yesterday): the quota starts over.
        day, _ = redis_window(r)
        r.hset(name, "d", day - 1)
        ctx = request(alice)
        await two.on_request(ctx)
        assert dict(ctx.ratelimit_headers)["x-ratelimit-remaining-requests-day"] == "2"
        assert redis_counted(r, name)[0] == 1

    run_stages(run)


def test_tokens_quota_redis_reserve_settle_and_refuse(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix)
    bob = principal(cfg, "bob", "t")
    name = f"{prefix}{{bob}}:qt"

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        a = request(bob, max_tokens=300)
        p = prompt_tokens(a)
        await stage.on_request(a)
        assert redis_counted(r, name) == (p + 300, p + 300)
        assert dict(a.ratelimit_headers)["x-ratelimit-remaining-tokens-month"] == str(1500 - p - 300)
        used(a, 50)
        await finish(stage, a)
        assert redis_counted(r, name) == (p + 50, p + 50)
        b = request(bob, max_tokens=100)
        await stage.on_request(b)
        used(b, 900 - 2 * p - 50)  # an overshoot is charged
        await finish(stage, b)
        assert redis_counted(r, name) == (900, 900)
        exc = await refused(stage, request(bob, max_tokens=200))
        assert (exc.status, exc.code) == (429, "tokens_per_day_exceeded")
        assert "has 100 left" in exc.message
        # the next UTC day: the day starts over, the month holds 900 of 1500
        day, _ = redis_window(r)
        r.hset(name, "d", day - 1)
        exc = await refused(stage, request(bob, max_tokens=700))
        assert exc.code == "tokens_per_month_exceeded" and "has 600 left" in exc.message
        c = request(bob, max_tokens=100)
        await stage.on_request(c)
        assert redis_counted(r, name) == (p + 100, 900 + p + 100)

    run_stages(run)


def test_quotas_stay_exact_in_a_leased_set(r: Any, prefix: str) -> None:
    cfg = _cfg(prefix)
    carol = principal(cfg, "carol", "lq")

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        for _ in range(2):
            ctx = request(carol, max_tokens=10)
            await stage.on_request(ctx)
            assert "x-ratelimit-remaining-requests" in dict(ctx.ratelimit_headers)
            used(ctx, 5)
            await finish(stage, ctx)
        exc = await refused(stage, request(carol, max_tokens=10))
        assert exc.code == "requests_per_day_exceeded"
        p = prompt_tokens(request(carol))
        assert redis_counted(r, f"{prefix}{{carol}}:qr") == (2, 2)
        assert redis_counted(r, f"{prefix}{{carol}}:qt") == (2 * (p + 5),) * 2

    run_stages(run)
