"""What the planner costs (issue 18 item 4): the `request_router` classifier's latency through a
real tritonserver on this CPU, and the CPU the `planner` stage adds to a request in the gateway.

    .venv/bin/python benchmarks/planner_cost.py [--requests 300]

1. the classifier alone: sequential gRPC `ModelInfer` calls (tritonclient), a short and a
   ~110-word prompt, p50 / p99;
2. a gateway (1 worker, mock upstream): the same requests to the virtual model `auto` and straight
   to `gpt-4o-mini`; the worker's CPU (utime + stime, /proc) per request and the `planner`
   server-timing (wall time, the classifier's wait included);
3. in process: the planner's own Python work (features, the body's model rewrite, the header).

The load average is printed next to each number: on a shared machine compare runs at similar load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, str(REPO / "python"))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from _common import free_port, loadavg, process  # noqa: E402
from gateway.pipeline.planner import Plan, _use_model, request_features  # noqa: E402
from gateway.schemas import ChatRequestView  # noqa: E402
from gateway.triton_local import LocalTriton  # noqa: E402

SHORT = "What's the capital of Germany?"
LONG = " ".join(
    ["Design a distributed message queue that guarantees at-least-once delivery across data centers;"]
    + ["discuss partitioning, replication, consumer rebalancing, ordering and failure handling."] * 9
)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def features(text: str) -> list[float]:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    return list(request_features(msgspec.json.decode(json.dumps(body), type=ChatRequestView))[1])


def classifier(address: str, n: int) -> None:
    client = grpcclient.InferenceServerClient(address)
    for name, text in (("short (5 words)", SHORT), (f"long ({len(LONG.split())} words)", LONG)):
        t = grpcclient.InferInput("text", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        f = grpcclient.InferInput("features", [1, 4], "FP32")
        f.set_data_from_numpy(np.array([features(text)], dtype=np.float32))
        for _ in range(10):
            client.infer("request_router", [t, f])
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer("request_router", [t, f])
            ms.append((time.perf_counter() - t0) * 1000)
        print(
            f"classifier {name}: p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms  (loadavg {loadavg()})"
        )
    client.close()


def cpu_s(pid: int) -> float:
    """utime + stime of `pid`'s children (the workers) in seconds."""
    total = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def gateway_cost(address: str, n: int) -> None:
    mport, gport = free_port(), free_port()
    mock_cmd = [sys.executable, "-m", "gateway.dev.openai_mock", "--host", "127.0.0.1", "--port", str(mport)]
    cfg = f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: "http://127.0.0.1:{mport}/v1"}}
  - {{name: triton, kind: triton, base_url: "grpc://{address}"}}
models:
  - {{name: gpt-4o-mini, provider: mock, upstream_model: mock-echo}}
  - {{name: gpt-4o, provider: mock, upstream_model: mock-echo}}
planner: {{provider: triton, timeout_ms: 5000, models: {{auto: {{simple: gpt-4o-mini, hard: gpt-4o}}}}}}
"""
    with tempfile.TemporaryDirectory() as tmp, process(mock_cmd, f"http://127.0.0.1:{mport}/health"):
        path = Path(tmp) / "gw.yaml"
        path.write_text(cfg)
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(gport)]
        with process(
            [*cmd, "--workers", "1", "--log-level", "error"], f"http://127.0.0.1:{gport}/healthz"
        ) as gw:
            conn = http.client.HTTPConnection("127.0.0.1", gport, timeout=30)

            def run(model: str) -> tuple[float, list[float]]:
                body = json.dumps(
                    {"model": model, "messages": [{"role": "user", "content": SHORT}], "max_tokens": 4}
                ).encode()
                planner_ms: list[float] = []
                for _ in range(20):  # warm-up
                    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                    conn.getresponse().read()
                c0 = cpu_s(gw.pid)
                for _ in range(n):
                    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                    r = conn.getresponse()
                    r.read()
                    for item in (r.getheader("server-timing") or "").split(","):
                        name, _, dur = item.strip().partition(";dur=")
                        if name == "planner":
                            planner_ms.append(float(dur))
                return (cpu_s(gw.pid) - c0) / n * 1e6, planner_ms

            for _ in range(2):  # twice each, interleaved: the machine is shared
                direct, _ = run("gpt-4o-mini")
                auto, planner_ms = run("auto")
                print(
                    f"gateway worker CPU per request: direct {direct:.0f} us, auto {auto:.0f} us, "
                    f"added {auto - direct:.0f} us; planner stage wall p50 {pct(planner_ms, 0.5):.1f} ms, "
                    f"p99 {pct(planner_ms, 0.99):.1f} ms  (loadavg {loadavg()})"
                )
            conn.close()


def in_process(n: int) -> None:
    body = json.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": SHORT}], "max_tokens": 4}
    ).encode()

    class Ctx:
        body = b""

    ctx = Ctx()
    t0 = time.process_time_ns()
    for _ in range(n):
        view = msgspec.json.decode(body, type=ChatRequestView)  # decode's work, subtracted below
        request_features(view)
        Plan("auto", "simple", 0.1, "gpt-4o-mini", "routed").describe()
        ctx.body = body
        _use_model(ctx, view, "gpt-4o-mini")  # type: ignore[arg-type]
    total = time.process_time_ns() - t0
    t0 = time.process_time_ns()
    for _ in range(n):
        msgspec.json.decode(body, type=ChatRequestView)
    base = time.process_time_ns() - t0
    us = (total - base) / n / 1000
    print(f"planner Python work in process: {us:.1f} us per request  (loadavg {loadavg()})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        triton = LocalTriton(
            REPO / "triton_models",
            models=["request_router"],
            log_path=Path(tmp) / "triton.log",
            env={"OPENBLAS_NUM_THREADS": "1"},
        )
        with triton:
            classifier(triton.grpc_address, args.requests)
            gateway_cost(triton.grpc_address, args.requests)
    in_process(20_000)
    print(f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
