"""What a streamed Responses API response costs the gateway over a WebSocket (WebSocket mode,
pipeline/ws.py on the uvloop engine's framing) against the same response over SSE
(`POST /v1/responses`, `stream: true`, one keep-alive connection): a real gateway (1 worker)
in front of the mock upstream, responses one after another, the gateway's CPU (its processes'
utime + stime from /proc) per response and per streamed event, WS and SSE rounds interleaved.
Prints the load average next to the numbers (a shared machine: repeat, compare the medians).

    .venv/bin/python benchmarks/ws_cost.py [--responses 200] [--words 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

TICK = os.sysconf("SC_CLK_TCK")
KEY = "sk-ws-cost-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid` and its children (the gateway's master and worker)."""
    user = system = 0
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, kids)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


def wait_port(port: int) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not ready")


def body(words: int) -> dict[str, object]:
    return {"model": "echo", "input": " ".join(f"w{i}" for i in range(words)), "store": False}


def sse_round(port: int, n: int, words: int) -> int:
    """`n` streamed responses on one keep-alive connection; the events received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps({**body(words), "stream": True})
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    events = 0
    for _ in range(n):
        conn.request("POST", "/v1/responses", data, headers)
        r = conn.getresponse()
        events += r.read().count(b"\ndata: ")
    conn.close()
    return events


def ws_round(port: int, n: int, words: int) -> int:
    events = 0
    msg = json.dumps({"type": "response.create", **body(words)})
    with connect(
        f"ws://127.0.0.1:{port}/v1/responses", additional_headers={"Authorization": f"Bearer {KEY}"}
    ) as ws:
        for _ in range(n):
            ws.send(msg)
            while True:
                ev = ws.recv(timeout=30)
                events += 1
                if '"type":"response.completed"' in ev[:40]:
                    break
    return events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=200)
    ap.add_argument("--words", type=int, default=64, help="words echoed: text deltas per response")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    mock_port, gw_port = free_port(), free_port()
    env = {**os.environ, "MOCK_UPSTREAM_KEY": "sk-upstream-secret"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "gw.yaml"
        cfg.write_text(
            f"""server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: sk-upstream-secret}}
models:
  - {{name: echo, provider: mock, upstream_model: mock-echo}}
auth:
  enabled: true
  salt: ws-cost-salt-000000
  keys: [{{id: bench, key: {KEY}}}]
responses:
  store: {{path: {tmp}/r.db}}
metrics: {{enabled: false}}
"""
        )
        mock_cmd = ["gateway.dev.openai_mock", "--host", "127.0.0.1", "--port", str(mock_port)]
        mock = subprocess.Popen(
            [sys.executable, "-m", *mock_cmd],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        gw_cmd = ["gateway.cli", "serve", "--config", str(cfg), "--port", str(gw_port), "--workers", "1"]
        gw = subprocess.Popen(
            [sys.executable, "-m", *gw_cmd, "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_port(mock_port)
            wait_port(gw_port)
            sse_round(gw_port, 20, a.words)  # warm both paths
            ws_round(gw_port, 20, a.words)
            rows: dict[str, list[tuple[float, float]]] = {"sse": [], "ws": []}
            for _ in range(a.repeat):
                for name, fn in (("sse", sse_round), ("ws", ws_round)):
                    u0, s0 = cpu_s(gw.pid)
                    events = fn(gw_port, a.responses, a.words)
                    u1, s1 = cpu_s(gw.pid)
                    spent = u1 - u0 + s1 - s0
                    rows[name].append((spent / a.responses * 1e3, spent / events * 1e6))
                    user, system = (u1 - u0) / a.responses * 1e3, (s1 - s0) / a.responses * 1e3
                    print(
                        f"{name}: {rows[name][-1][0]:.3f} ms/response (user {user:.3f}, system {system:.3f}),"
                        f" {rows[name][-1][1]:.1f} µs/event"
                    )
        finally:
            for p in (gw, mock):
                p.terminate()
                p.wait(10)
    sse = statistics.median(r[0] for r in rows["sse"])
    wsm = statistics.median(r[0] for r in rows["ws"])
    print(
        f"\nmedian gateway CPU per response ({a.words} words, {a.responses} x {a.repeat}): "
        f"SSE {sse:.3f} ms, WebSocket {wsm:.3f} ms, WS - SSE {wsm - sse:+.3f} ms"
    )
    print("loadavg:", Path("/proc/loadavg").read_text().strip())


if __name__ == "__main__":
    main()
