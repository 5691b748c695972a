"""`fastpath-gateway top`: the quantile arithmetic, and one frame of a real gateway under load."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import MockUpstream, _env, free_port, gateway_config, run_gateway

from gateway.top import frame, parse, quantile


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.99, buckets) == pytest.approx(0.198)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == pytest.approx(0.1)  # in +Inf: the last bound


def test_a_frame_from_two_scrapes() -> None:
    before = parse(
        'fastpath_requests_total{model="m",status="200",error=""} 10\n'
        'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="0.1"} 0\n'
        'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="+Inf"} 0\n'
    )
    after = parse(
        "# HELP x y\n"
        'fastpath_requests_total{model="m",status="200",error=""} 30\n'
        'fastpath_requests_total{model="m",status="502",error="upstream_error"} 5\n'
        'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="0.1"} 20\n'
        'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_request_model="m",le="+Inf"} 20\n'
        'fastpath_limiter_decisions_total{decision="rate_limited"} 4\n'
        "fastpath_requests_in_flight 3\n"
    )
    text = frame(before, after, 2.0, "u")
    row = next(line for line in text.splitlines() if line.startswith("m "))
    assert row.split() == ["m", "12.5", "2.5", "20.0", "50.0", "99.0"]
    assert "in flight 3" in text and "limiter refusals 2.0/s" in text


def test_top_shows_a_live_gateway(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    text = gateway_config(mock_upstream.port) + f"metrics: {{listen: '{listen}', publish_interval_ms: 100}}\n"
    with run_gateway(tmp_path, mock_upstream, workers=2, config_text=text) as gw:
        stop = threading.Event()

        def load() -> None:
            body = json.dumps(
                {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            )
            while not stop.is_set():
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
                conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                conn.getresponse().read()
                conn.close()

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            cmd = [sys.executable, "-m", "gateway.cli", "top", f"http://{listen}/metrics", "--once"]
            out = subprocess.run(
                [*cmd, "--interval", "1.5"], capture_output=True, text=True, env=_env(), timeout=60
            )
        finally:
            stop.set()
            thread.join(10)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("echo "))
    fields = row.split()
    assert float(fields[1]) > 0 and fields[4] != "-", out.stdout  # req/s and a TTFT p50


def test_top_on_an_unreachable_url_is_a_clean_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "top", url, "--once"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 1 and "cannot read" in out.stderr and "Traceback" not in out.stderr
