"""Stage `limits`: the Rust bucket store with a fake clock, then RPM / TPM / concurrency over
real sockets (one gateway worker, so the local backend is exact)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, assert_rss_bounded, run_gateway
from test_auth import auth_config, chat, post
from test_streaming import data_events, sse_lines, wait_for

from gateway import _fastpath
from gateway.pipeline.limits import duration

S = 1_000_000_000
MS = 1_000_000


# ---- the bucket store, with a fake clock ---------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "rate", "burst"),
    [
        # 60/min, burst 3: one token per second
        (
            [
                (0, 1, (True, 2, 1_000, 0)),
                (0, 2, (True, 0, 3_000, 0)),
                (0, 1, (False, 0, 3_000, 1_000)),
                (250 * MS, 1, (False, 0, 2_750, 750)),
                (S, 1, (True, 0, 3_000, 0)),
                (S, 0, (True, 0, 3_000, 0)),
                (10 * S, 5, (False, 3, 0, 0)),  # more than the burst never fits (retry = reset)
                (10 * S, 3, (True, 0, 3_000, 0)),
            ],
            60,
            3,
        ),
        # 7/min (not a divisor of a minute): exact, times round up
        ([(0, 3, (True, 4, 25_715, 0)), (0, 5, (False, 4, 25_715, 8_572))], 7, 7),
        # 1,000,000 tokens/min: a 4,096-token reservation
        ([(0, 4_096, (True, 995_904, 246, 0)), (0, 995_905, (False, 995_904, 246, 1))], 1_000_000, 1_000_000),
    ],
    ids=["60rpm-burst3", "7rpm", "1Mtpm"],
)
def test_local_limiter_table(
    steps: list[tuple[int, int, tuple[bool, int, int, int]]], rate: int, burst: int
) -> None:
    lim = _fastpath.LocalLimiter()
    for i, (now, cost, want) in enumerate(steps):
        assert lim.acquire("k", cost, rate, burst, now) == want, f"step {i}"


def test_local_limiter_refund_charge_and_errors() -> None:
    lim = _fastpath.LocalLimiter()
    assert lim.acquire("k", 500, 600, 600, 0) == (True, 100, 50_000, 0)
    lim.refund("k", 380)  # reserved 500, used 120
    assert lim.acquire("k", 0, 600, 600, 0) == (True, 480, 12_000, 0)
    lim.charge("k", 200, 600, 0)  # used beyond the reservation
    assert lim.acquire("k", 0, 600, 600, 0) == (True, 280, 32_000, 0)
    with pytest.raises(_fastpath.FastpathError):
        lim.acquire("k", 1, 0, 1, 0)
    with pytest.raises(OverflowError):
        lim.acquire("k", -1, 1, 1, 0)


def test_local_limiter_store_stays_bounded() -> None:
    lim = _fastpath.LocalLimiter(max_keys=64)

    def run(n: int) -> None:
        for i in range(n):
            lim.acquire(f"key-{i}", 1, 60, 10, 0)
            assert len(lim) <= 64

    assert_rss_bounded(run, calls=20_000)
    assert lim.evicted_busy > 0
    assert lim.sweep(3600 * S) == 0  # an hour later every bucket is full again: all dropped


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0ms"), (20, "20ms"), (1_000, "1s"), (1_500, "1.5s"), (60_000, "1m0s"), (61_001, "1m1.001s")],
)
def test_reset_header_format(ms: int, text: str) -> None:
    assert duration(ms) == text


# ---- over real sockets ---------------------------------------------------------------------------
KEY = "sk-test-limits-0123456789abcdef"
RPM = 10
TPM = 10_000

LIMITS_YAML = f"""
auth:
  enabled: true
  keys:
    - id: rpm
      key: {KEY}-rpm
      tier: rpm
    - id: tpm
      key: {KEY}-tpm
      tier: tpm
    - id: one
      key: {KEY}-one
      tier: one-at-a-time
tiers:
  rpm: {{rpm: {RPM}}}
  tpm: {{rpm: 1000, tpm: {TPM}}}
  one-at-a-time: {{max_concurrent: 1, tpm: {TPM}}}
"""


@pytest.fixture(scope="module")
def limits_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with run_gateway(
        tmp_path_factory.mktemp("limits"),
        mock_upstream,
        config_text=auth_config(mock_upstream.port, LIMITS_YAML),
    ) as g:
        yield g


def test_rpm_admits_exactly_n_of_a_concurrent_burst(limits_gateway: Gateway) -> None:
    with ThreadPoolExecutor(3 * RPM) as pool:
        results = list(pool.map(lambda _: post(limits_gateway.port, chat(), f"{KEY}-rpm"), range(3 * RPM)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * RPM + [429] * (2 * RPM)
    for status, headers, body in results:
        assert headers["x-ratelimit-limit-requests"] == str(RPM)
        if status == 429:
            assert body["error"]["type"] == "rate_limit_error"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(headers["retry-after"]) <= 60 // RPM
            assert 0 < int(headers["retry-after-ms"]) <= 60_000 // RPM


def _remaining_tokens(headers: dict[str, str]) -> int:
    return int(headers["x-ratelimit-remaining-tokens"])


def _used(body: dict[str, Any]) -> int:
    usage = body["usage"]
    return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


def test_tokens_are_reserved_then_settled_with_real_usage(limits_gateway: Gateway) -> None:
    key = f"{KEY}-tpm"
    reserve = 4_000
    # Unary: settled before the reply, so its own headers show real use, not the reservation.
    status, headers, body = post(limits_gateway.port, chat(max_tokens=reserve), key)
    assert status == 200, body
    used1 = _used(body)
    assert TPM - used1 <= _remaining_tokens(headers) <= TPM
    # A stream's headers leave before the answer: they show the reservation ...
    conn = http.client.HTTPConnection("127.0.0.1", limits_gateway.port, timeout=20)
    try:
        stream = chat(max_tokens=reserve, stream=True, stream_options={"include_usage": True})
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(stream).encode(), {"authorization": f"Bearer {key}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert _remaining_tokens({k.lower(): v for k, v in resp.getheaders()}) <= TPM - reserve
        events = data_events(list(sse_lines(resp)))
        used2 = _used(json.loads(events[-2]))
    finally:
        conn.close()
    # ... and the stream is settled when it ends: only real use stays taken.
    status, headers, body = post(limits_gateway.port, chat(max_tokens=reserve), key)
    assert status == 200
    remaining = _remaining_tokens(headers)
    assert TPM - used1 - used2 - _used(body) <= remaining <= TPM
    assert remaining > TPM - reserve  # no reservation is left behind


def test_request_larger_than_the_token_limit_is_refused_and_not_counted(limits_gateway: Gateway) -> None:
    key = f"{KEY}-tpm"
    before = int(post(limits_gateway.port, chat(max_tokens=1), key)[1]["x-ratelimit-remaining-requests"])
    status, headers, body = post(limits_gateway.port, chat(max_tokens=TPM), key)
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert "lower max_tokens" in body["error"]["message"]
    assert headers["retry-after"]
    # the refused request gave its request slot back
    assert int(headers["x-ratelimit-remaining-requests"]) >= before


def _open_stream(
    port: int, key: str, **mock: Any
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    body = chat(stream=True, max_tokens=4_000, mock=mock)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"x-api-key": key})
    return conn, conn.getresponse()


def test_concurrency_slot_returns_after_success_error_and_refusal(limits_gateway: Gateway) -> None:
    key = f"{KEY}-one"
    conn, resp = _open_stream(limits_gateway.port, key, words=5, chunk_delay_ms=100)
    try:
        assert resp.status == 200
        status, headers, body = post(limits_gateway.port, chat(), key)  # while the stream runs
        assert status == 429, body
        assert "concurrent" in body["error"]["message"]
        assert headers["retry-after"] == "1"
        assert data_events(list(sse_lines(resp)))[-1] == b"[DONE]"
    finally:
        conn.close()
    # success released the slot (after a 429 that took none)
    assert wait_for(lambda: post(limits_gateway.port, chat(), key)[0] == 200)
    # an upstream error releases it too, and its reply still carries the rate-limit headers
    status, headers, _ = post(limits_gateway.port, chat(mock={"status": 500}), key)
    assert status == 502
    assert headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert post(limits_gateway.port, chat(), key)[0] == 200


def test_client_abort_mid_stream_is_settled(limits_gateway: Gateway) -> None:
    key = f"{KEY}-one"
    conn, resp = _open_stream(limits_gateway.port, key, words=2_000, chunk_delay_ms=20)
    assert resp.status == 200
    assert _remaining_tokens({k.lower(): v for k, v in resp.getheaders()}) <= TPM - 4_000
    assert next(sse_lines(resp)).startswith(b"data: {")
    sock = conn.sock
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    # Admitted again under max_concurrent=1 once the abort is settled: the gauge is back at 0.
    def admitted() -> tuple[int, dict[str, str], dict[str, Any]] | None:
        r = post(limits_gateway.port, chat(max_tokens=10), key)
        return r if r[0] == 200 else None

    _, headers, _ = wait_for(admitted)
    # The 4,000-token reservation was settled with the few tokens actually streamed.
    assert _remaining_tokens(headers) > TPM - 1_000


def test_limits_stage_is_absent_when_auth_is_off(gateway: Gateway) -> None:
    status, headers, _ = post(gateway.port, chat())
    assert status == 200
    assert not any(h.startswith("x-ratelimit-") for h in headers)


def test_limited_gateway_logs_no_key(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    log_path = tmp_path / "out.log"
    with (
        log_path.open("wb") as log,
        run_gateway(
            tmp_path,
            mock_upstream,
            config_text=auth_config(mock_upstream.port, LIMITS_YAML),
            log_level="debug",
            output=log,
        ) as gw,
    ):
        conn, resp = _open_stream(gw.port, f"{KEY}-one", words=50, chunk_delay_ms=20)
        next(sse_lines(resp))
        conn.close()  # an abort is logged
        wait_for(lambda: post(gw.port, chat(), f"{KEY}-one")[0] == 200)
        for _ in range(RPM + 2):
            post(gw.port, chat(), f"{KEY}-rpm")
    text = log_path.read_text(errors="replace")
    assert "serving on" in text  # the log is captured
    assert KEY not in text
