"""Shadow limits (`enforce: false`), both backends: counted and reported, never refusing; what
they would refuse is not taken (so they show what the limit would admit) and is logged."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from budget_harness import parse, principal, refused, request, used
from conftest import REDIS_URL, MockUpstream, redis_or_skip, run_gateway
from test_auth import auth_config, chat, post

from gateway.config import Config
from gateway.pipeline.limits import LimitsStage
from gateway.pipeline.limits.local_store import LocalStore

LIMITS_YAML = """
prices:
  echo: {input_per_mtok: 1000, output_per_mtok: 2000}
tiers:
  s: {rpm: 2, enforce: false, models: {echo: {rpm: 4}}}
  c: {max_concurrent: 1, enforce: false}
  b: {budget_usd_per_day: 0.02, rpm: 100, enforce: false}
"""


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """`local`, or `redis` with a key prefix of its own (skipped without a Redis, outside CI)."""
    if request.param == "local":
        yield "limits: {live_budget_enforcement: true}\n"
        return
    client = redis_or_skip()
    prefix = f"fp-test-shadow:{uuid.uuid4().hex[:12]}:"
    yield (
        "limits:\n  backend: redis\n  live_budget_enforcement: true\n"
        f"  redis: {{url: '{REDIS_URL}', key_prefix: '{prefix}', timeout_ms: 2000}}\n"
    )
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _run(cfg: Config, body: Any) -> None:
    async def main() -> None:
        stage = LimitsStage(cfg)
        try:
            await body(stage)
        finally:
            await stage.close()

    asyncio.run(main())


def test_shadow_rpm_is_reported_and_logged_never_refused(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = parse(LIMITS_YAML + backend)
    who = principal(cfg, "k", "s")

    async def body(stage: LimitsStage) -> None:
        for i in range(4):  # 2 fit the shadow limit, 2 more are waived
            ctx = request(who, max_tokens=10)
            await stage.on_request(ctx)
            headers = dict(ctx.ratelimit_headers)
            assert headers["x-ratelimit-limit-requests"] == "2"  # the tightest, shadow or not
            assert headers["x-ratelimit-remaining-requests"] == str(max(0, 1 - i))
            assert ctx.lease is not None and len(ctx.lease.waived) == (i >= 2)
            used(ctx, 1)
            stage.on_finish(ctx)
        # the enforced model limit (4 a minute) on the same key still refuses
        exc = await refused(stage, request(who, max_tokens=10))
        assert exc.status == 429 and "4 requests per minute for this API key on model echo" in exc.message

    with caplog.at_level(logging.INFO, logger="gateway.limits"):
        _run(cfg, body)
    waived = [r.getMessage() for r in caplog.records if "shadow limit waived" in r.getMessage()]
    assert len(waived) == 2
    assert "429 rate_limited" in waived[0] and "2 requests per minute for this API key" in waived[0]


def test_shadow_concurrency_and_budget_take_nothing_they_waive(backend: str) -> None:
    cfg = parse(LIMITS_YAML + backend)
    conc, budget = principal(cfg, "c", "c"), principal(cfg, "b", "b")

    async def body(stage: LimitsStage) -> None:
        first, second = request(conc), request(conc)
        await stage.on_request(first)
        await stage.on_request(second)  # over the shadow limit of 1: admitted, not counted
        assert first.lease is not None and not first.lease.waived
        assert second.lease is not None and len(second.lease.waived) == 1
        stage.on_finish(second)
        stage.on_finish(first)
        await stage.settled()
        third = request(conc)
        await stage.on_request(third)  # the gauge is back at 0: nothing leaked, nothing to waive
        assert third.lease is not None and not third.lease.waived
        stage.on_finish(third)
        # a shadow budget: the reservation does not fit, the request goes on, the budget is not
        # charged, and (live enforcement on) the stream is not cut by it
        stream = request(budget, max_tokens=100, stream=True)
        await stage.on_request(stream)
        lease = stream.lease
        assert lease is not None and len(lease.waived) == 1 and lease.stream_token_limit is None
        used(stream, 100)
        stage.on_finish(stream)
        await stage.settled()
        small = request(budget, max_tokens=1)
        await stage.on_request(small)
        assert small.lease is not None and not small.lease.waived  # the 0.02 USD were not charged
        if isinstance(stage.store, LocalStore):
            assert (
                stage.store.spent("{b}:b", small.lease.day, small.lease.month)[0] == small.lease.reserved_cost
            )
        stage.on_finish(small)

    _run(cfg, body)


KEY = "sk-test-shadow-0123456789abcdef"


def test_shadow_rpm_over_http(backend: str, mock_upstream: MockUpstream, tmp_path: Path) -> None:
    yaml = f"""
auth:
  enabled: true
  keys: [{{id: s, key: {KEY}, tier: s}}]
tiers:
  s: {{rpm: 2, enforce: false, models: {{echo: {{rpm: 4}}}}}}
{backend}"""
    with run_gateway(tmp_path, mock_upstream, config_text=auth_config(mock_upstream.port, yaml)) as gw:
        results = [post(gw.port, chat(max_tokens=5), KEY) for _ in range(5)]
    assert [r[0] for r in results] == [200, 200, 200, 200, 429]
    assert [r[1]["x-ratelimit-remaining-requests"] for r in results[:4]] == ["1", "0", "0", "0"]
    assert "4 requests per minute for this API key on model echo" in results[4][2]["error"]["message"]
