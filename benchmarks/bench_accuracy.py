"""Accuracy of `fastpath-bench` against a paced upstream with a known schedule.

The mock upstream (`gateway.dev.openai_mock`, uvloop) is told per request to wait
`first_delay_ms` before the first SSE event (the role chunk), then `chunk_delay_ms` before each
further event (content words, finish, usage, [DONE]). So the schedule is:
first event at FIRST ms, first content token (TTFT) at FIRST + CHUNK ms, inter-token gap CHUNK ms.
The mock is Python: its own timer lateness (asyncio sleeps wake late, more so under load) is part
of the "ground truth" and shows up as a positive error for any client.

    .venv/bin/python benchmarks/bench_accuracy.py [--first-ms 20] [--chunk-ms 5] [--duration 5]

Not run in CI. Needs the built binary (`make install`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "target" / "release" / "fastpath-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-ms", type=float, default=20.0)
    ap.add_argument("--chunk-ms", type=float, default=5.0)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,64")
    args = ap.parse_args()
    if not BINARY.exists():
        print(f"error: {BINARY} missing; run `make install`", file=sys.stderr)
        return 2
    port = free_port()
    mock = subprocess.Popen(
        [sys.executable, "-m", "gateway.dev.openai_mock", "--port", str(port), "--log-level", "WARNING"],
        cwd=REPO,
    )
    extra = {"mock": {"first_delay_ms": args.first_ms, "chunk_delay_ms": args.chunk_ms, "words": args.words}}
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        with tempfile.TemporaryDirectory() as tmp:
            for conc in [int(c) for c in args.concurrency.split(",")]:
                out = Path(tmp) / f"c{conc}.json"
                cmd = [
                    str(BINARY),
                    "--url",
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    "--model",
                    "mock-echo",
                    "--stream",
                    "--concurrency",
                    str(conc),
                    "--duration",
                    f"{args.duration}s",
                    "--warmup",
                    f"{args.warmup}s",
                    "--input-tokens",
                    "fixed:16",
                    "--extra-body",
                    json.dumps(extra),
                    "--no-progress",
                    "--json",
                    str(out),
                ]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                (run,) = json.loads(out.read_text())["runs"]
                rows.append((conc, run))
    finally:
        mock.terminate()
        mock.wait(10)
    ttft_sched = args.first_ms + args.chunk_ms
    print(f"# fastpath-bench accuracy ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(
        f"schedule: first event {args.first_ms} ms, TTFT (first content) {ttft_sched} ms, "
        f"ITL {args.chunk_ms} ms; {args.words} words/stream; {args.duration} s per level after "
        f"{args.warmup} s warm-up; mock = Python asyncio + uvloop"
    )
    print()
    print(
        "| c | requests | first event p50 (err) | TTFT p50 (err) | TTFT p99 | ITL p50 (err) | ITL p99 "
        "| client CPU µs/req |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for conc, r in rows:
        fe, tt, itl = r["first_event_ms"], r["ttft_ms"], r["itl_ms"]
        cpu = r.get("client_cpu_us_per_request")
        print(
            f"| {conc} | {r['requests']} | {fe['p50']:.3f} ({fe['p50'] - args.first_ms:+.3f}) "
            f"| {tt['p50']:.3f} ({tt['p50'] - ttft_sched:+.3f}) | {tt['p99']:.3f} "
            f"| {itl['p50']:.3f} ({itl['p50'] - args.chunk_ms:+.3f}) | {itl['p99']:.3f} "
            f"| {cpu:.1f} |"
            if cpu is not None
            else f"| {conc} | {r['requests']} | {fe['p50']:.3f} | {tt['p50']:.3f} | {tt['p99']:.3f} "
            f"| {itl['p50']:.3f} | {itl['p99']:.3f} | - |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
