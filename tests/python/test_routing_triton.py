"""Routing across two real tritonservers: load shared, one killed under load (requests not yet
streaming are retried on the other, a stream already streaming ends with an error event), and
its return noticed by the Triton health check (server and model readiness), no restart."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import TritonServer, restartable_triton, run_gateway


def post(port: int, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def chat(model: str, stream: bool = False, content: str = "Tell me about rivers.") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "max_tokens": 8,
    }


def test_two_tritons_one_killed_under_load_and_back(triton: TritonServer, tmp_path: Path) -> None:
    grpc_port, second = restartable_triton(tmp_path / "second.log")
    config = (
        "server: {host: 127.0.0.1}\n"
        "providers:\n"
        f"  - {{name: t0, kind: triton, base_url: 'grpc://{triton.grpc_address}'}}\n"
        f"  - {{name: t1, kind: triton, base_url: 'grpc://127.0.0.1:{grpc_port}'}}\n"
        "models:\n"
        "  - name: pool\n"
        "    balance: round_robin\n"
        "    deployments:\n"
        "      - {provider: t0, upstream_model: testllm_core}\n"
        "      - {provider: t1, upstream_model: testllm_core}\n"
        "routing:\n"
        "  breaker: {consecutive_failures: 2}\n"
        "  health: {enabled: true, interval_ms: 300, jitter_ms: 30, timeout_ms: 500,"
        " unhealthy_threshold: 1, healthy_threshold: 1}\n"
    )
    first_two = second()
    first_two.__enter__()
    try:
        with run_gateway(tmp_path, None, config_text=config) as gw:
            deadline = time.monotonic() + 30
            seen: Counter[str] = Counter()
            while len(seen) < 2 and time.monotonic() < deadline:  # t1's channel may still connect
                status, headers, _ = post(gw.port, chat("pool"))
                if status == 200:
                    seen[headers["x-fastpath-route"].split("/")[0]] += 1
                time.sleep(0.05)
            assert set(seen) == {"t0", "t1"}, seen
            # a stream on t1 when it is killed: round robin alternates, so one of two lands there
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                slow = chat("pool", stream=True, content="[[testllm delay_ms=100]] keep going")
                slow["max_tokens"] = 40
                streams = [pool.submit(_stream_then_read, gw.port, slow) for _ in range(2)]
                time.sleep(1.0)
                first_two.kill()
                ends = [f.result() for f in streams]
            on_t1 = [e for route, e in ends if route.startswith("t1/")]
            assert on_t1 and all('"error"' in e and e.rstrip().endswith("data: [DONE]") for e in on_t1)
            # not yet streaming: every request answered (t0), retried when it tried t1 first
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: post(gw.port, chat("pool")), range(16)))
            assert [s for s, _, _ in results] == [200] * 16, [b[:200] for _, _, b in results]
            assert all(h["x-fastpath-route"].startswith("t0/") for _, h, _ in results)
            # t1 back on its port: the Triton health check returns it, no gateway restart
            with second():
                deadline = time.monotonic() + 60
                back = False
                while not back and time.monotonic() < deadline:
                    status, headers, _ = post(gw.port, chat("pool"))
                    back = status == 200 and headers["x-fastpath-route"].startswith("t1/")
                    time.sleep(0.1)
                assert back, "the restarted tritonserver never got traffic back"
    finally:
        first_two.__exit__(None, None, None)


def _stream_then_read(port: int, body: dict[str, Any]) -> tuple[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.getheader("x-fastpath-route") or "", resp.read().decode()
    finally:
        conn.close()
