"""The CPU one request pays for `/metrics` recording, in process: `MetricsObserver.on_done` (all
per-request samples) plus the in-flight gauge's two slot updates, over many calls, against an
empty observer call in the same loop. Complements `proxy_overhead.py --metrics-off` (end to end).

    .venv/bin/python benchmarks/metrics_cost.py [--calls 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway import config as config_mod
from gateway.config import TierConfig
from gateway.context import Endpoint, RequestContext
from gateway.metrics import MetricsObserver
from gateway.pipeline.stage import Outcome
from gateway.principal import Principal
from gateway.schemas import PromptTokensDetails, Usage
from gateway.timing import ReadGaps

CFG = """
providers: [{name: mock, base_url: 'http://127.0.0.1:1/v1'}]
models: [{name: echo, provider: mock}]
auth: {enabled: true, keys: [{id: k, key: sk-bench-0123456789abcdef}]}
prices: {echo: {input_per_mtok: 0.15, output_per_mtok: 0.6}}
"""


class _Adapter:
    name = "mock"


class _Route:
    name = "echo"
    upstream_model = "mock-echo"
    adapter = _Adapter()


def context(stream: bool) -> RequestContext:
    ctx = RequestContext("r", Endpoint.CHAT, b"", time.perf_counter_ns() - 3_000_000, None)
    ctx.route = _Route()  # type: ignore[assignment]
    ctx.principal = Principal("k", b"", "team-a", "default", TierConfig(), None, math.inf, False)
    ctx.usage = Usage(12, 64, 76, PromptTokensDetails(8))
    ctx.timings = {
        "decode": 9_000,
        "auth": 4_000,
        "route": 2_000,
        "limits": 6_000,
        "upstream_head": 900_000,
        "upstream": 2_000_000,
        "total": 2_900_000,
    }
    if stream:
        del ctx.timings["upstream"]
        ctx.timings["ttfb"] = 1_000_000
        ctx.first_ns = ctx.start_ns + 1_200_000
        gaps = ctx.gaps = ReadGaps(0.0)
        for i in range(1, 65):
            gaps.add(i * 0.0001)
    return ctx


class Empty:
    def on_done(self, ctx: Any, outcome: Any) -> None:
        return None


def per_call_us(obs: Any, ctx: RequestContext, calls: int, inflight: bool) -> float:
    ok = Outcome(200, None)
    on_done = obs.on_done
    v, slot = (obs.v, obs.inflight) if inflight else (None, 0)
    t0 = time.process_time()
    if v is not None:
        for _ in range(calls):
            v[slot] += 1.0
            v[slot] -= 1.0
            on_done(ctx, ok)
    else:
        for _ in range(calls):
            on_done(ctx, ok)
    return (time.process_time() - t0) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    obs = MetricsObserver(config_mod.parse(CFG), Path(tempfile.mkdtemp(prefix="fpmetrics-")))
    empty = Empty()
    load0 = Path("/proc/loadavg").read_text().strip()
    print(f"python {platform.python_version()}, {args.calls} calls per cell; loadavg {load0}")
    print("| case | empty observer µs/call | metrics µs/call (on_done + in-flight) | added µs |")
    print("|---|---|---|---|")
    for name, stream in (("unary", False), ("stream", True)):
        ctx = context(stream)
        per_call_us(obs, ctx, 1000, True)  # first sightings out of the way
        for _ in range(args.repeat):
            e = per_call_us(empty, ctx, args.calls, False)
            m = per_call_us(obs, ctx, args.calls, True)
            print(f"| {name} | {e:.3f} | {m:.3f} | {m - e:.3f} |")
    print(f"loadavg at end: {Path('/proc/loadavg').read_text().strip()}")
    obs.shard.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
