"""`fastpath-gateway bench` end to end: the native load generator against the real mock upstream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MockUpstream

from gateway.cli import find_bench_binary

pytestmark = pytest.mark.skipif(
    find_bench_binary() is None, reason="fastpath-bench is not built (make install builds it)"
)


def _run_bench(mock_upstream: MockUpstream, *args: str) -> subprocess.CompletedProcess[str]:
    """`fastpath-gateway bench` against the mock's chat endpoint (model mock-echo)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "bench",
            "--url",
            f"{mock_upstream.url}/v1/chat/completions",
            "--model",
            "mock-echo",
            "--no-progress",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ordered(p: dict[str, float | None]) -> None:
    p50, p99, top = p["p50"], p["p99"], p["max"]
    assert p50 is not None and p99 is not None and top is not None, p
    assert 0 <= p50 <= p99 <= top, p


def test_bench_streamed_against_mock_reports_ordered_percentiles(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    csv = tmp_path / "bench.csv"
    proc = _run_bench(
        mock_upstream,
        "--stream",
        "--concurrency",
        "4",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--input-tokens",
        "uniform:8:32",
        "--max-tokens",
        "16",
        "--slo",
        "ttft_ms=1000",
        "--slo",
        "itl_ms=1000",
        "--json",
        str(out),
        "--csv",
        str(csv),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ttft" in proc.stdout
    result = json.loads(out.read_text())
    assert result["tool"] == "fastpath-bench"
    (run,) = result["runs"]
    assert run["requests"] > 0
    assert run["errors"] == 0, run["error_kinds"]
    assert run["output_tokens"] > 0 and run["input_tokens"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "send_lag_ms"):
        _ordered(run[key])
    assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
    assert run["goodput"]["good_requests"] == run["requests"]
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("run,index,scheduled_ms")
    assert len(rows) - 1 == run["requests"]


def test_bench_compare_prints_ratios(tmp_path: Path) -> None:
    binary = find_bench_binary()
    assert binary is not None
    run = {
        "label": "x",
        "mode": "closed",
        "concurrency": 1,
        "rate": None,
        "stream": True,
        "window_s": 1.0,
        "requests": 10,
        "sent_total": 10,
        "errors": 0,
        "error_rate": 0.0,
        "request_throughput": 100.0,
        "input_tokens": 1,
        "output_tokens": 1,
        "output_token_throughput": 1.0,
        "input_tokens_are_words": True,
        **{
            k: {
                "count": 1,
                "mean": 1.0,
                "min": 1.0,
                "p50": 1.0,
                "p90": 1.0,
                "p95": 1.0,
                "p99": 1.0,
                "p999": 1.0,
                "max": 1.0,
            }
            for k in ("ttft_ms", "first_event_ms", "itl_ms", "tpot_ms", "e2e_ms", "send_lag_ms")
        },
        "goodput": None,
        "client_cpu_us_per_request": None,
        "error_kinds": {},
    }
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"tool": "fastpath-bench", "version": "0", "config": {}, "runs": [run]}))
    b.write_text(
        json.dumps(
            {
                "tool": "fastpath-bench",
                "version": "0",
                "config": {},
                "runs": [dict(run, request_throughput=200.0)],
            }
        )
    )
    proc = subprocess.run([binary, "compare", str(a), str(b)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("req/s") and line.endswith("2.000") for line in proc.stdout.splitlines())


def _bench_json(mock_upstream: MockUpstream, tmp_path: Path, *load: str) -> dict[str, object]:
    out = tmp_path / f"bench-{'-'.join(load)}.json"
    proc = _run_bench(
        mock_upstream,
        *load,
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--extra-body",
        '{"mock":{"first_delay_ms":500}}',
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert isinstance(run, dict)
    return run


def test_open_loop_keeps_its_schedule_when_the_server_stalls(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    """Every answer stalls 500 ms. Open loop at 50/s for 1 s still sends all 50 requests, and their
    latency, measured from the scheduled send time, includes the stall; a closed loop of 2 can
    only send a handful (the coordinated omission the open loop avoids)."""
    opened = _bench_json(mock_upstream, tmp_path, "--rate", "50")
    assert opened["requests"] == 50 and opened["errors"] == 0
    assert opened["e2e_ms"]["p50"] >= 500  # type: ignore[index]
    closed = _bench_json(mock_upstream, tmp_path, "--concurrency", "2")
    # each of the 2 slots completes at most one request per 500 ms stall within the 1 s window,
    # plus the ones in flight when it ends
    assert 0 < closed["requests"] <= 2 * (1 + 1000 // 500)  # type: ignore[operator]


def test_bench_against_paced_upstream(tmp_path: Path) -> None:
    """The native paced upstream: bench sees TTFT >= first_token_ms and ITL near the interval."""
    import socket
    import time
    import urllib.request

    binary = find_bench_binary()
    assert binary is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    up = subprocess.Popen(
        [
            binary,
            "paced-upstream",
            "--port",
            str(port),
            "--first-token-ms",
            "10",
            "--interval-ms",
            "2",
            "--chunks",
            "4",
            "--spin-us",
            "0",
        ],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.02)
        out = tmp_path / "paced.json"
        proc = subprocess.run(
            [
                binary,
                "--url",
                f"{base}/v1/chat/completions",
                "--model",
                "paced",
                "--stream",
                "--requests",
                "5",
                "--warmup",
                "0s",
                "--no-progress",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        (run,) = json.loads(out.read_text())["runs"]
        assert run["errors"] == 0, run
        assert run["output_tokens"] == 5 * 4, run
        assert run["ttft_ms"]["p50"] >= 10.0, run["ttft_ms"]
        assert run["itl_ms"]["p50"] > 0, run["itl_ms"]
        with urllib.request.urlopen(f"{base}/stats?reset=1", timeout=5) as resp:
            stats = json.loads(resp.read())
        assert stats["n"] == 5 * 4, stats
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as resp:
            assert json.loads(resp.read())["n"] == 0
    finally:
        up.terminate()
        up.wait(10)


def test_paced_upstream_help_and_usage_errors() -> None:
    """`paced-upstream --help` is help (stdout, exit 0), not an error; a bad flag is (exit 2)."""
    binary = find_bench_binary()
    assert binary is not None
    ok = subprocess.run([binary, "paced-upstream", "--help"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "--first-token-ms" in ok.stdout and "error" not in ok.stderr
    bad = subprocess.run([binary, "paced-upstream", "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--bogus" in bad.stderr
