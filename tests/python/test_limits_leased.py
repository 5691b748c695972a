"""`mode: leased` limits (issue 19 item 1) on real gateway processes (2 workers) and the real
Redis: barrier bursts and a steady overload admit within the documented bound (docs/limits.md:
from a key with no slice held, never beyond the limit plus what its bucket refilled meanwhile,
and at most the slices other workers hold below it), exact mode beside it admits exactly, the
headers stay plausible, and a SIGKILLed worker's slice comes back when its bucket refills."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, redis_or_skip, run_gateway
from test_auth import auth_config, chat, post
from test_limits_redis import REDIS_URL, U, _burst, _cleanup, _client, _refilled
from test_streaming import wait_for

from gateway import config as config_mod

redis = pytest.importorskip("redis")

KEY = "sk-test-leased-limits-0123456789"
WORKERS = 2
RPM = 60
TPM = 6_000
BUDGET_NANO = 10_000_000  # 0.01 USD; max_tokens 50 at 20 USD / Mtok reserves 1,000,000
TIERS = {
    "lrpm": f"{{rpm: {RPM}, mode: leased}}",
    "lsteady": "{rpm: 120, mode: leased}",
    "ltpm": f"{{rpm: 100000, tpm: {TPM}, mode: leased}}",
    "lbudget": "{rpm: 100000, budget_usd_per_day: 0.01, mode: leased}",
    "xrpm": f"{{rpm: {RPM}}}",
    "lkill": "{rpm: 600, mode: leased}",
    "lbsteady": "{rpm: 100000, budget_usd_per_day: 0.002, mode: leased}",
}


def cap(limit: int) -> int:
    """The largest slice a worker holds (leased.py: limit / (2 x workers))."""
    return limit // (2 * WORKERS)


def tiers_yaml(key: str, tiers: dict[str, str], url: str, prefix: str, *redis: str) -> str:
    """A key per tier (`{key}-{tier}`), the tiers, echo's prices and Redis limits at `url`
    (`redis`: more lines of the `limits.redis` section)."""
    lines = ["auth:", "  enabled: true", "  keys:"]
    lines += [f"    - {{id: {t}, key: {key}-{t}, tier: {t}}}" for t in tiers]
    lines += ["tiers:", *(f"  {t}: {v}" for t, v in tiers.items())]
    lines += [
        "prices:",
        "  echo: {input_per_mtok: 0, output_per_mtok: 20}",
        "limits:",
        "  backend: redis",
        "  redis:",
        f"    url: '{url}'",
        f"    key_prefix: '{prefix}'",
        *(f"    {line}" for line in redis),
        "    timeout_ms: 2000",
        "    slice_idle_ms: 1000",
    ]
    return "\n" + "\n".join(lines) + "\n"


def _yaml(prefix: str) -> str:
    return tiers_yaml(KEY, TIERS, REDIS_URL, prefix)


@pytest.fixture(scope="module")
def env(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str, Any]]:
    r = redis_or_skip(REDIS_URL)
    prefix = f"fp-test:{uuid.uuid4().hex[:12]}:"
    tmp = tmp_path_factory.mktemp("leased")
    try:
        with run_gateway(
            tmp, mock_upstream, config_text=auth_config(mock_upstream.port, _yaml(prefix)), workers=2
        ) as gw:
            yield gw, prefix, r
    finally:
        _cleanup(r, prefix)
        r.close()


def test_config() -> None:
    base = "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: m, provider: p}]\n"
    cfg = config_mod.parse(base + "tiers: {t: {rpm: 10, mode: leased}}\nlimits: {backend: redis}\n")
    assert cfg.tiers["t"].mode is config_mod.LimitMode.LEASED
    assert config_mod.parse(base + "tiers: {t: {rpm: 10}}\n").tiers["t"].mode is config_mod.LimitMode.EXACT
    with pytest.raises(config_mod.ConfigError, match=r"tiers\.t\.mode: leased needs limits\.backend redis"):
        config_mod.parse(base + "tiers: {t: {rpm: 10, mode: leased}}\n")
    with pytest.raises(config_mod.ConfigError, match="mode"):
        config_mod.parse(base + "tiers: {t: {rpm: 10, mode: sloppy}}\nlimits: {backend: redis}\n")


def test_barrier_burst_rpm_within_the_bound_and_exact_beside_it(env: tuple[Gateway, str, Any]) -> None:
    gw, _, r = env
    statuses, elapsed = _burst(r, [gw.port, gw.port], f"{KEY}-lrpm", RPM, chat())
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    # a fresh key: nothing beyond the limit; below it, at most what the other worker holds
    assert RPM - WORKERS * cap(RPM) <= admitted <= RPM + _refilled(elapsed, RPM), (admitted, elapsed)
    statuses, elapsed = _burst(r, [gw.port, gw.port], f"{KEY}-xrpm", RPM, chat())
    assert RPM <= statuses.count(200) <= RPM + _refilled(elapsed, RPM)


def test_steady_overload_rpm(env: tuple[Gateway, str, Any]) -> None:
    gw, _, r = env
    limit, seconds = 120, 3.0
    counts = [0, 0]
    start_us = int(r.time()[0]) * 1_000_000 + int(r.time()[1])
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        while time.monotonic() < stop:
            if post(gw.port, chat(), f"{KEY}-lsteady")[0] == 200:
                counts[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sec, usec = r.time()
    elapsed = int(sec) * 1_000_000 + int(usec) - start_us
    admitted = sum(counts)
    assert admitted <= limit + _refilled(elapsed, limit), (admitted, elapsed)
    assert admitted >= limit - WORKERS * cap(limit), admitted


def test_barrier_burst_tpm(env: tuple[Gateway, str, Any]) -> None:
    gw, _, r = env
    max_tokens = 200
    # held a second upstream: all admitted requests are in flight at once, none settled
    body = chat(max_tokens=max_tokens, mock={"first_delay_ms": 1_000})
    statuses, elapsed = _burst(r, [gw.port, gw.port], f"{KEY}-ltpm", 25, body)
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    most = (TPM + _refilled(elapsed, TPM)) // max_tokens  # each reserves > max_tokens
    least = (TPM - WORKERS * cap(TPM)) // (max_tokens + 20)  # the prompt is < 20 tokens
    assert least <= admitted <= most, (admitted, elapsed)


def test_barrier_burst_budget_never_overspent(env: tuple[Gateway, str, Any]) -> None:
    gw, _, r = env
    body = chat(max_tokens=50, mock={"first_delay_ms": 1_000})
    statuses, _ = _burst(r, [gw.port, gw.port], f"{KEY}-lbudget", 8, body)
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    per_request = 50 * 20_000
    assert (BUDGET_NANO - WORKERS * cap(BUDGET_NANO)) // per_request <= admitted <= BUDGET_NANO // per_request
    status, headers, body2 = post(gw.port, chat(max_tokens=50), f"{KEY}-lbudget")
    if status == 429:
        assert body2["error"]["code"] == "budget_exceeded"
        assert int(headers["retry-after"]) >= 1


def test_steady_overload_budget_spends_exactly_what_was_used(env: tuple[Gateway, str, Any]) -> None:
    """Each request reserves 1,000,000 nano-USD of a 2,000,000 budget and uses far less: once the
    slices went back (idle), Redis holds exactly what the admitted responses cost."""
    gw, prefix, r = env
    costs: list[int] = []
    refused = [0]
    stop = time.monotonic() + 2.0

    def client() -> None:
        while time.monotonic() < stop:
            status, _, body = post(gw.port, chat(max_tokens=50), f"{KEY}-lbsteady")
            if status == 200:
                costs.append(body["usage"]["completion_tokens"] * 20_000)
            else:
                assert status == 429 and body["error"]["code"] == "budget_exceeded"
                refused[0] += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused[0] > 0 and costs
    assert sum(costs) <= 2_000_000
    name = f"{prefix}{{lbsteady}}:b"
    assert wait_for(lambda: int(r.hget(name, "ds") or 0) == sum(costs), timeout_s=6), (
        r.hget(name, "ds"),
        sum(costs),
    )


def test_headers_present_and_plausible(env: tuple[Gateway, str, Any]) -> None:
    gw, _, _ = env
    seen = []
    for _ in range(6):
        status, headers, _ = post(gw.port, chat(max_tokens=10), f"{KEY}-ltpm")
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "100000"
        assert headers["x-ratelimit-limit-tokens"] == str(TPM)
        remaining = int(headers["x-ratelimit-remaining-tokens"])
        assert 0 <= remaining <= TPM
        assert headers["x-ratelimit-reset-tokens"]
        seen.append(int(headers["x-ratelimit-remaining-requests"]))
    assert all(0 <= v <= 100_000 for v in seen)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_killed_worker_slice_comes_back(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    prefix = f"fp-test:{uuid.uuid4().hex[:12]}:"
    r = _client()
    bucket = f"{prefix}{{lkill}}:r"
    try:
        with run_gateway(
            tmp_path, mock_upstream, config_text=auth_config(mock_upstream.port, _yaml(prefix)), workers=2
        ) as gw:
            for _ in range(8):
                assert post(gw.port, chat(), f"{KEY}-lkill")[0] == 200
            raw = r.get(bucket)
            assert raw is not None
            taken = -(-int(raw.split(b":")[0]) // U)  # the bucket's debt, in requests
            assert taken > 8  # the admitted ones and the slices the workers hold
            assert taken <= 8 + WORKERS * cap(600)
            for pid in _children(gw.proc.pid):
                os.kill(pid, signal.SIGKILL)  # the slices die with the workers
            # ... and come back as the bucket refills: 600/min, `taken` within taken / 10 s
            assert wait_for(lambda: r.get(bucket) is None, timeout_s=taken / 10 + 3)
    finally:
        _cleanup(r, prefix)
        r.close()


def test_small_limits_concurrency_and_shadow_checks_stay_exact() -> None:
    from gateway.pipeline.limits.leased import MIN_UNITS_PER_WORKER, Parts
    from gateway.quota import BUDGET, CONC, RPM, TPM, Check, Plan

    small = MIN_UNITS_PER_WORKER * WORKERS - 1
    checks = [
        Check(CONC, "k", "c", 5),  # concurrency: never leased
        Check(RPM, "k", "r", small, leased=True),  # too small to slice
        Check(TPM, "k", "t", 100_000, leased=True),
        Check(BUDGET, "k", "b", 0, 10_000_000, leased=True),  # a monthly budget
        Check(RPM, "k", "s", 1_000, enforce=False),  # a shadow check (never marked leased)
    ]
    parts = Parts(Plan(checks, 0, 0), WORKERS)
    assert parts.leased == (2, 3)
    assert parts.exact == (0, 1, 4)
    assert parts.exact_plan is not None and len(parts.exact_plan.checks) == 3
    assert Parts(Plan(checks[2:4], 0, 0), 10**7).leased == ()  # a huge fleet: nothing to slice
