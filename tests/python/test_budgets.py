"""Budgets, per-team and per-model limits, live budget enforcement: the `local` backend in
process with an injected clock (exact numbers, day and month rollover), then over real sockets
with one gateway worker (so the local backend is exact)."""

from __future__ import annotations

import asyncio
import calendar
import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from budget_harness import IN, NANO, OUT, parse, principal, prompt_tokens, refused, request, used
from conftest import Gateway, MockUpstream, run_gateway
from test_auth import auth_config, chat, post
from test_streaming import data_events, sse_lines

from gateway import config as config_mod
from gateway.pipeline.limits import LimitsStage, month_number, usd, window_reset_s
from gateway.pipeline.limits.local_store import LocalStore

# ---- config --------------------------------------------------------------------------------------
PRICES = "prices:\n  echo: {input_per_mtok: 1000, output_per_mtok: 2000}\n"


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("prices: {nope: {input_per_mtok: 1, output_per_mtok: 1}}\n", r"\$\.prices\.nope: unknown model"),
        ("prices: {echo: {input_per_mtok: -1, output_per_mtok: 1}}\n", r"prices\.echo\.input_per_mtok"),
        ("prices: {echo: {input_per_mtok: 0.0001, output_per_mtok: 1}}\n", "at most 3 decimals"),
        ("prices: {echo: {input_per_mtok: 1}}\n", "output_per_mtok"),
        ("tiers: {t: {budget_usd_per_day: -1}}\n", r"tiers\.t\.budget_usd_per_day"),
        ("tiers: {t: {budget_usd_per_month: 10000000}}\n", r"tiers\.t\.budget_usd_per_month"),
        ("tiers: {t: {models: {nope: {rpm: 1}}}}\n", r"tiers\.t\.models: unknown model 'nope'"),
        ("tiers: {t: {models: {echo: {rpm: 0}}}}\n", r"tiers\.t\.models\.echo\.rpm: must be > 0"),
        ("tiers: {t: {models: {echo: {budget_usd_per_day: 1}}}}\n", "budget_usd_per_day"),
        ("teams: {t: {tpm: 0}}\n", r"teams\.t\.tpm: must be > 0"),
        ("teams: {t: {budget_usd_per_day: -0.5}}\n", r"teams\.t\.budget_usd_per_day"),
        ("teams: {t: {rpm: 1000000000}}\nlimits: {backend: redis}\n", r"teams\.t\.rpm: at most"),
        ("limits: {live_budget_enforcement: maybe}\n", "live_budget_enforcement"),
    ],
)
def test_limits_config_errors(extra: str, error: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=error):
        parse(extra)


def test_limits_config_values() -> None:
    cfg = parse(
        PRICES
        + "tiers:\n  t: {budget_usd_per_day: 1.5, models: {echo: {rpm: 2, tpm: 300}}}\n"
        + "teams:\n  research: {rpm: 3, budget_usd_per_month: 100}\n"
        + "limits: {live_budget_enforcement: true}\n"
    )
    assert cfg.prices["echo"].input_per_mtok == 1000
    assert config_mod.nano_usd_per_token(cfg.prices["echo"].output_per_mtok) == OUT
    assert config_mod.nano_usd_per_token(0.15) == 150
    assert config_mod.budget_nano_usd(cfg.tiers["t"].budget_usd_per_day) == 1_500_000_000
    assert cfg.tiers["t"].models["echo"].tpm == 300
    assert cfg.teams["research"].rpm == 3
    assert cfg.limits.live_budget_enforcement
    assert config_mod.limits_enabled(cfg)
    assert not config_mod.limits_enabled(parse(PRICES))
    assert config_mod.limits_enabled(parse("teams: {x: {budget_usd_per_day: 1}}\n"))
    assert config_mod.limits_enabled(parse("tiers: {t: {models: {echo: {max_concurrent: 1}}}}\n"))


@pytest.mark.parametrize(
    ("nano", "text"), [(0, "$0.00"), (10_500_000, "$0.0105"), (12 * NANO, "$12.00"), (1, "$0.000000001")]
)
def test_usd_format(nano: int, text: str) -> None:
    assert usd(nano) == text


def test_windows_are_utc_day_and_calendar_month() -> None:
    t = calendar.timegm((2026, 12, 31, 23, 0, 0, 0, 0, 0))
    assert window_reset_s(t, monthly=False) == 3_600
    assert window_reset_s(t, monthly=True) == 3_600  # 2027-01-01T00:00:00Z
    t = calendar.timegm((2028, 2, 15, 0, 0, 0, 0, 0, 0))
    assert window_reset_s(t, monthly=True) == 15 * 86_400  # leap February: 29 days
    assert month_number(t) == 2028 * 12 + 1
    assert month_number(t - 15 * 86_400 - 1) == 2028 * 12  # 2028-01-31T23:59:59Z


# ---- the local backend in process: exact numbers, injected clock --------------------------------
BUDGET_YAML = (
    PRICES
    + """
tiers:
  b: {budget_usd_per_day: 1, budget_usd_per_month: 1.5}
  zero: {budget_usd_per_day: 0}
"""
)
# 2026-11-30T12:00:00Z: the next day is the next month too
T0 = calendar.timegm((2026, 11, 30, 12, 0, 0, 0, 0, 0))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _local(stage: LimitsStage) -> LocalStore:
    assert isinstance(stage.store, LocalStore)
    return stage.store


def _spent(stage: LimitsStage, name: str, now: float) -> tuple[int, int]:
    return _local(stage).spent(name, int(now) // 86_400, month_number(now))


def test_budget_reserve_settle_refund_overshoot_and_rollover() -> None:
    cfg = parse(BUDGET_YAML)
    clock = Clock(T0 - 86_400 * 5)  # 2026-11-25
    stage = LimitsStage(cfg, clock=clock)
    alice = principal(cfg, "alice", "b")
    name = "{alice}:b"

    async def run() -> None:
        a = request(alice)
        p = prompt_tokens(a)
        reserve = p * IN + 100 * OUT
        await stage.on_request(a)  # reserve prompt + max_tokens at the model's price
        assert a.lease is not None and a.lease.reserved_cost == reserve
        assert _spent(stage, name, clock.now) == (reserve, reserve)
        b = request(alice)
        await stage.on_request(b)
        assert _spent(stage, name, clock.now) == (2 * reserve, 2 * reserve)
        used(a, 10)  # refund: 90 completion tokens not used
        stage.on_finish(a)
        cost_a = p * IN + 10 * OUT
        assert _spent(stage, name, clock.now) == (reserve + cost_a,) * 2
        stage.on_finish(a)  # a second settlement is a no-op
        assert _spent(stage, name, clock.now) == (reserve + cost_a,) * 2
        used(b, 150)  # overshoot: 50 completion tokens beyond the reservation are charged
        stage.on_finish(b)
        cost_b = p * IN + 150 * OUT
        spent = cost_a + cost_b
        assert _spent(stage, name, clock.now) == (spent, spent)
        # A reservation that does not fit the daily budget is refused and leaves nothing behind.
        big = request(alice, max_tokens=400)
        exc = await refused(stage, big)
        assert (exc.status, exc.code) == (429, "budget_exceeded")
        assert "API key's daily budget of $1.00" in exc.message
        assert usd(NANO - spent) in exc.message and usd(p * IN + 400 * OUT) in exc.message
        assert "It resets at 00:00 UTC (in 12h0m)" in exc.message  # 2026-11-25T12:00Z
        assert dict(exc.headers)["retry-after"] == str(12 * 3_600)
        assert _spent(stage, name, clock.now) == (spent, spent)
        stage.on_finish(big)
        c = request(alice, max_tokens=300)
        await stage.on_request(c)
        used(c, 300)
        stage.on_finish(c)
        spent += p * IN + 300 * OUT
        assert _spent(stage, name, clock.now) == (spent, spent)
        # The next UTC day: the daily budget starts over, the monthly one does not.
        clock.now += 86_400
        assert _spent(stage, name, clock.now) == (0, spent)
        d = request(alice, max_tokens=300)
        exc = await refused(stage, d)
        assert "monthly budget of $1.50" in exc.message
        assert "the start of the next UTC calendar month" in exc.message
        e = request(alice, max_tokens=200)
        await stage.on_request(e)
        day_e = p * IN + 200 * OUT
        assert _spent(stage, name, clock.now) == (day_e, spent + day_e)
        # A request that ends in the next month is settled in the window that admitted it.
        clock.now = T0 + 86_400
        used(e, 0)
        stage.on_finish(e)
        assert _spent(stage, name, clock.now) == (0, 0)
        assert _spent(stage, name, clock.now - 86_400 * 5)[1] == spent + p * IN

    asyncio.run(run())


def test_unpriced_models_cost_nothing_and_a_zero_budget_refuses_priced_ones() -> None:
    cfg = parse(BUDGET_YAML)
    stage = LimitsStage(cfg, clock=Clock(T0))
    zero = principal(cfg, "z", "zero")

    async def run() -> None:
        exc = await refused(stage, request(zero))
        assert exc.code == "budget_exceeded" and "daily budget of $0.00" in exc.message
        free = request(zero, model="free-model")
        await stage.on_request(free)
        assert free.lease is not None and free.lease.reserved_cost == 0
        used(free, 100)
        stage.on_finish(free)
        assert not _local(stage).tracks_budget("{z}:b")  # nothing was ever counted

    asyncio.run(run())


def test_concurrent_reservations_never_overspend_local() -> None:
    cfg = parse(BUDGET_YAML)
    stage = LimitsStage(cfg, clock=Clock(T0))
    alice = principal(cfg, "alice", "b")

    async def one() -> bool:
        ctx = request(alice)
        try:
            await stage.on_request(ctx)
        except Exception:
            return False
        await asyncio.sleep(0.01)
        used(ctx, 100)  # each uses all it reserved
        stage.on_finish(ctx)
        return True

    async def run() -> None:
        results = await asyncio.gather(*(one() for _ in range(50)))
        reserve = prompt_tokens(request(alice)) * IN + 100 * OUT
        assert sum(results) == NANO // reserve
        day, _ = _spent(stage, "{alice}:b", T0)
        assert day == sum(results) * reserve <= NANO

    asyncio.run(run())


TEAM_YAML = """
tiers:
  t: {rpm: 100, models: {echo: {rpm: 2, tpm: 500}}}
teams:
  research: {rpm: 3, max_concurrent: 2}
"""


def test_team_and_model_limits_in_process() -> None:
    cfg = parse(TEAM_YAML)
    stage = LimitsStage(cfg)
    a = principal(cfg, "a", "t", "research")
    b = principal(cfg, "b", "t", "research")
    loner = principal(cfg, "c", "t", "apps")

    async def run() -> None:
        plan = stage.plan(a, "echo")
        assert [c.local_key for c in plan.checks] == [
            "{team:research}:c",
            "{team:research}:k:a:r",
            "{team:research}:k:a:m:echo:r",
            "{team:research}:r",
            "{team:research}:k:a:m:echo:t",
        ]
        assert [c.local_key for c in stage.plan(loner, "echo").checks] == [
            "{c}:r",
            "{c}:m:echo:r",
            "{c}:m:echo:t",
        ]
        # the model limit: 2 per minute on echo for this key; other models are not counted there
        first = request(a, max_tokens=10)
        await stage.on_request(first)
        assert ("x-ratelimit-limit-requests", "2") in first.ratelimit_headers  # the tightest
        assert ("x-ratelimit-remaining-requests", "1") in first.ratelimit_headers
        stage.on_finish(first)
        await stage.on_request(x := request(a, max_tokens=10))
        stage.on_finish(x)
        exc = await refused(stage, request(a, max_tokens=10))
        assert "2 requests per minute for this API key on model echo" in exc.message
        exc = await refused(stage, request(loner, max_tokens=600))
        assert "API key on model echo's limit of 500 tokens per minute" in exc.message
        # the team limit: 3 per minute shared by a and b (a used 2; its refusal took nothing)
        await stage.on_request(y := request(b, model="gpt-4o-mini"))
        exc = await refused(stage, request(b, model="gpt-4o-mini"))
        assert "3 requests per minute for this team research" in exc.message
        # the team's concurrency: y is still in flight
        stage2 = LimitsStage(cfg)
        await stage2.on_request(r1 := request(a, model="gpt-4o-mini"))
        await stage2.on_request(request(b, model="gpt-4o-mini"))
        exc = await refused(stage2, request(a, model="gpt-4o-mini"))
        assert "concurrent requests for this team research (limit 2)" in exc.message
        stage2.on_finish(r1)
        await stage2.on_request(request(b, model="gpt-4o-mini"))
        stage.on_finish(y)
        # refused requests left no count: a's own bucket holds exactly its 2 admitted requests
        assert _local(stage).peek("{team:research}:k:a:r", 100)[1] == 98
        assert _local(stage).peek("{team:research}:r", 3)[1] == 0

    asyncio.run(run())


def test_live_allowance_is_reservation_plus_headroom() -> None:
    cfg = parse(BUDGET_YAML + "limits: {live_budget_enforcement: true}\n")
    stage = LimitsStage(cfg, clock=Clock(T0))
    alice = principal(cfg, "alice", "b")

    async def run() -> None:
        unary = request(alice)
        await stage.on_request(unary)
        assert unary.lease is not None and unary.lease.stream_token_limit is None
        s = request(alice, stream=True)
        await stage.on_request(s)
        lease = s.lease
        assert lease is not None
        p = prompt_tokens(s)
        left = NANO - 2 * (p * IN + 100 * OUT)  # the daily budget binds (1 USD < 1.5 USD)
        assert lease.stream_token_limit == 100 + left // OUT
        assert lease.budget_note == "API key's daily budget"

    asyncio.run(run())


# ---- over real sockets, one worker ---------------------------------------------------------------
KEY = "sk-test-budgets-0123456789abcdef"
MAX_TOKENS = 50
BUDGET_USD = 0.01  # 10,000,000 nano-USD; a request reserves 50 x 20,000 = 1,000,000: 10 fit
GW_YAML = f"""
auth:
  enabled: true
  keys:
    - {{id: spender, key: {KEY}-spender, tier: budget}}
    - {{id: live, key: {KEY}-live, tier: live}}
    - {{id: t1, key: {KEY}-t1, tier: plain, team: research}}
    - {{id: t2, key: {KEY}-t2, tier: plain, team: research}}
    - {{id: m, key: {KEY}-m, tier: model}}
tiers:
  budget: {{rpm: 1000, budget_usd_per_day: {BUDGET_USD}}}
  live: {{rpm: 1000, budget_usd_per_day: 0.01}}
  plain: {{rpm: 1000}}
  model: {{rpm: 1000, models: {{slow: {{rpm: 2}}}}}}
teams:
  research: {{rpm: 3}}
prices:
  echo: {{input_per_mtok: 0, output_per_mtok: 20}}
  mock-echo: {{input_per_mtok: 0, output_per_mtok: 20}}
limits:
  default_max_tokens: 50
  live_budget_enforcement: true
"""
OUT_GW = 20_000  # nano-USD per completion token at 20 USD per million


@pytest.fixture(scope="module")
def budget_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with run_gateway(
        tmp_path_factory.mktemp("budgets"),
        mock_upstream,
        config_text=auth_config(mock_upstream.port, GW_YAML),
    ) as g:
        yield g


def test_concurrent_requests_never_overspend_the_budget(budget_gateway: Gateway) -> None:
    key = f"{KEY}-spender"
    # every admitted request is in flight at once (the upstream waits), so none is settled yet
    body = chat(max_tokens=MAX_TOKENS, mock={"first_delay_ms": 500, "words": MAX_TOKENS})
    with ThreadPoolExecutor(25) as pool:
        results = list(pool.map(lambda _: post(budget_gateway.port, body, key), range(25)))
    ok = [r for r in results if r[0] == 200]
    refused_ = [r for r in results if r[0] != 200]
    assert len(ok) == int(BUDGET_USD * NANO) // (MAX_TOKENS * OUT_GW) == 10
    for status, headers, err in refused_:
        assert status == 429 and err["error"]["code"] == "budget_exceeded"
        assert err["error"]["type"] == "rate_limit_error"
        assert "daily budget of $0.01" in err["error"]["message"]
        assert 1 <= int(headers["retry-after"]) <= 86_400
    spent = sum(int(b["usage"]["completion_tokens"]) * OUT_GW for _, _, b in ok)
    assert spent <= BUDGET_USD * NANO
    # all used what they reserved: the budget is spent, and a free request is still refused
    status, _, err = post(budget_gateway.port, chat(max_tokens=1), key)
    assert status == 429 and "has $0.00 left" in err["error"]["message"]
    # a model without a price costs nothing: not limited by the budget
    assert post(budget_gateway.port, chat(model="slow", max_tokens=1), key)[0] == 200


def test_team_limit_is_shared_and_model_limit_is_per_key(budget_gateway: Gateway) -> None:
    port = budget_gateway.port
    statuses = [post(port, chat(max_tokens=5), f"{KEY}-{k}")[0] for k in ("t1", "t2", "t1", "t2")]
    assert statuses == [200, 200, 200, 429]
    status, headers, err = post(port, chat(max_tokens=5), f"{KEY}-t1")
    assert status == 429 and "team research" in err["error"]["message"]
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    statuses = [post(port, chat(model="slow", max_tokens=1), f"{KEY}-m")[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert post(port, chat(max_tokens=1), f"{KEY}-m")[0] == 200  # another model: own limits only


def _stream(port: int, key: str, body: dict[str, Any]) -> tuple[int, list[bytes]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"x-api-key": key})
        resp = conn.getresponse()
        return resp.status, data_events(list(sse_lines(resp)))
    finally:
        conn.close()


def test_live_enforcement_ends_the_stream_at_the_budget(budget_gateway: Gateway) -> None:
    port, key = budget_gateway.port, f"{KEY}-live"
    # No max_tokens: 50 (default_max_tokens) are reserved, the upstream writes 3,000 words.
    body = chat(stream=True, mock={"words": 3_000})
    status, events = _stream(port, key, body)
    assert status == 200
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    assert "daily budget" in error["message"]
    text = "".join(
        c["delta"].get("content") or "" for e in events[:-2] for c in json.loads(e).get("choices", [])
    )
    # The budget allows 10,000,000 / 20,000 = 500 completion tokens ("w0 w1 ..": 2 per word); the
    # stream ends after the upstream read that passes them (one read: a few words, more on a
    # busy machine).
    words = len(text.split())
    assert 245 <= words < 2_000, words
    counted = int(error["message"].split("after ")[1].split()[0])
    assert 500 < counted <= 2 * words + 2
    # what was produced was settled: the budget is (about) spent, the next request is refused
    status, _, err = post(port, chat(max_tokens=10), key)
    assert status == 429 and err["error"]["code"] == "budget_exceeded", err


def test_a_budget_alone_enables_the_limits_stage(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    yaml = f"""
auth:
  enabled: true
  keys: [{{id: z, key: {KEY}-z, tier: broke}}]
tiers:
  broke: {{budget_usd_per_day: 0}}
teams:
  t: {{rpm: 5}}
prices:
  echo: {{input_per_mtok: 1, output_per_mtok: 1}}
"""
    with run_gateway(tmp_path, mock_upstream, config_text=auth_config(mock_upstream.port, yaml)) as gw:
        status, _, err = post(gw.port, chat(max_tokens=1), f"{KEY}-z")
    assert status == 429 and err["error"]["code"] == "budget_exceeded"
