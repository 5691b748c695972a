"""Accuracy of `fastpath-bench` against a paced upstream with a known schedule.

The upstream is `fastpath-bench paced-upstream` (native, one OS thread per connection, sleeps until
`--spin-us` before each absolute deadline then spins): response head at once, first content chunk
at FIRST ms after the request arrived (= TTFT), then one content chunk every CHUNK ms (= ITL). Its
own write lateness (actual write minus deadline, from `GET /stats`) is printed beside bench's error
so the two can be told apart. Each spin setting is run (default: 200 µs and 0 = sleep only).

    .venv/bin/python benchmarks/bench_accuracy.py [--first-ms 20] [--chunk-ms 5] [--duration 5]

Not run in CI. Needs the built binary (`make install`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def paced_upstream(first_ms: float, chunk_ms: float, chunks: int, spin_us: int) -> Iterator[str]:
    """`fastpath-bench paced-upstream` on a free port, ready; yields its base URL."""
    port = free_port()
    up = subprocess.Popen(
        [
            str(BINARY),
            "paced-upstream",
            "--port",
            str(port),
            "--first-token-ms",
            str(first_ms),
            "--interval-ms",
            str(chunk_ms),
            "--chunks",
            str(chunks),
            "--spin-us",
            str(spin_us),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        yield base
    finally:
        up.terminate()
        up.wait(10)


def run_level(args: argparse.Namespace, spin_us: int, conc: int, tmp: Path) -> tuple[dict, dict]:
    with paced_upstream(args.first_ms, args.chunk_ms, args.words, spin_us) as base:
        out = tmp / f"s{spin_us}c{conc}.json"
        cmd = [
            str(BINARY),
            "--url",
            f"{base}/v1/chat/completions",
            "--model",
            "paced",
            "--stream",
            "--concurrency",
            str(conc),
            "--duration",
            f"{args.duration}s",
            "--warmup",
            f"{args.warmup}s",
            "--input-tokens",
            "fixed:16",
            "--no-progress",
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as resp:
            stats = json.loads(resp.read())
        (run,) = json.loads(out.read_text())["runs"]
        return run, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-ms", type=float, default=20.0)
    ap.add_argument("--chunk-ms", type=float, default=5.0)
    ap.add_argument("--words", type=int, default=32, help="content chunks per stream")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--spin-us", default="200,0", help="upstream spin settings to run, e.g. 200,0")
    args = ap.parse_args()
    if not BINARY.exists():
        print(f"error: {BINARY} missing; run `make install`", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spin in [int(x) for x in args.spin_us.split(",")]:
            for conc in [int(c) for c in args.concurrency.split(",")]:
                load_before = Path("/proc/loadavg").read_text().split()[:3]
                run, stats = run_level(args, spin, conc, Path(tmp))
                rows.append((spin, conc, run, stats, load_before))
    print(f"# fastpath-bench accuracy ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(
        f"schedule: TTFT {args.first_ms} ms, ITL {args.chunk_ms} ms; {args.words} chunks/stream; "
        f"{args.duration} s per level after {args.warmup} s warm-up; upstream = fastpath-bench paced-upstream"
    )
    print()
    print(
        "| spin µs | c | requests | TTFT p50 (err) | TTFT p99 (err) | ITL p50 (err) | ITL p99 (err) "
        "| upstream write late p50 / p99 / max | loadavg before |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spin, conc, r, st, load in rows:
        tt, itl = r["ttft_ms"], r["itl_ms"]

        def cell(v: float | None, sched: float) -> str:
            return "-" if v is None else f"{v:.3f} ({v - sched:+.3f})"

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        print(
            f"| {spin} | {conc} | {r['requests']} | {cell(tt['p50'], args.first_ms)} "
            f"| {cell(tt['p99'], args.first_ms)} | {cell(itl['p50'], args.chunk_ms)} "
            f"| {cell(itl['p99'], args.chunk_ms)} "
            f"| {ms(st.get('p50_ms'))} / {ms(st.get('p99_ms'))} / {ms(st.get('max_ms'))} "
            f"| {' '.join(load)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
