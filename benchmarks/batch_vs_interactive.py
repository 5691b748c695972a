"""Interactive TTFT with and without a Batch API batch running on the same gateway.

One gateway (jobs + batches on the local Redis, the mock upstream), `fastpath-gateway bench`
sending open-loop streamed chat requests. First a 1,000-request batch runs alone (its
duration sets the measured window, so in the `with batch` runs the batch is running for the
whole window); then, interleaved and repeated, the bench alone and the bench while a fresh
1,000-request batch runs (submitted and followed through the official `openai` SDK). Each
batch's output and error files are checked (10 lines ask for an unknown model: 990 outputs,
10 errors). TTFT percentiles from the client side, /proc/loadavg with every row.

    .venv/bin/python benchmarks/batch_vs_interactive.py [--rate 40] [--repeat 2] [--lines 1000]

Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

import openai  # noqa: E402
from conftest import REDIS_URL, gateway_config, run_gateway, run_mock  # noqa: E402

BENCH = REPO / ".venv" / "bin" / "fastpath-gateway"
BAD = 10


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def config(upstream_port: int, tmp: Path, args: argparse.Namespace) -> str:
    prefix = "bench-batches-" + uuid.uuid4().hex[:8]
    return gateway_config(upstream_port) + (
        f"jobs: {{enabled: true, redis_url: '{REDIS_URL}', prefix: {prefix}}}\n"
        f"storage: {{dir: {tmp / 'objects'}}}\nbatches:\n  enabled: true\n"
        f"  workers: {{lines: {args.batch_lines}, yield_at: {args.yield_at}}}\n"
    )


def batch_input(n: int, delay_ms: float) -> bytes:
    """`delay_ms`: the mock's time to first token for each line (a model's prefill)."""
    rows = []
    for i in range(n):
        model = "no-such-model" if i % (n // BAD) == 0 else "echo"
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"batch line {i}"}],
            "max_tokens": 16,
            "mock": {"first_delay_ms": delay_ms},
        }
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def run_batch(c: openai.OpenAI, file_id: str, n: int) -> float:
    """Seconds from create to completed; the output and error files checked."""
    t0 = time.monotonic()
    b = c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.2)
        b = c.batches.retrieve(b.id)
    took = time.monotonic() - t0
    assert b.status == "completed", b
    counts = b.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (n, n - BAD, BAD), counts
    out = [json.loads(x) for x in c.files.content(b.output_file_id or "").content.splitlines()]
    err = [json.loads(x) for x in c.files.content(b.error_file_id or "").content.splitlines()]
    assert len(out) == n - BAD and all(r["response"]["status_code"] == 200 for r in out)
    assert len(err) == BAD and all(r["response"]["status_code"] == 404 for r in err)
    return took


def bench(port: int, args: argparse.Namespace, seconds: float, out: Path) -> dict[str, Any]:
    cmd = [str(BENCH), "bench", "--url", f"http://127.0.0.1:{port}/v1/chat/completions", "--model", "echo"]
    cmd += ["--stream", "--rate", str(args.rate), "--duration", f"{seconds:.1f}s", "--warmup", "1s"]
    cmd += ["--input-tokens", "fixed:64", "--max-tokens", "16", "--no-progress", "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run,) = json.loads(out.read_text())["runs"]
    return dict(run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=40.0, help="interactive requests per second")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--line-delay-ms", type=float, default=40.0, help="each batch line's upstream TTFT")
    ap.add_argument("--batch-lines", type=int, default=4, help="batches.workers.lines")
    ap.add_argument("--yield-at", type=int, default=1, help="batches.workers.yield_at")
    args = ap.parse_args()
    rows: list[str] = []
    p99: dict[str, list[float]] = {"alone": [], "with batch": []}
    with tempfile.TemporaryDirectory() as tmp_s, run_mock() as mock:
        tmp = Path(tmp_s)
        with run_gateway(tmp, mock, config_text=config(mock.port, tmp, args), log_level="error") as gw:
            c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
            f = c.files.create(
                file=("input.jsonl", batch_input(args.lines, args.line_delay_ms)), purpose="batch"
            )
            alone = run_batch(c, f.id, args.lines)
            window = max(5.0, alone - 1.0)  # bench warm-up 1 s + window: inside the batch's run
            print(f"batch alone: {alone:.1f} s ({loadavg()}); measured window {window:.1f} s", flush=True)
            for rep in range(args.repeat):
                for mode in ("alone", "with batch"):
                    took: list[float] = []
                    t: threading.Thread | None = None
                    if mode == "with batch":
                        t = threading.Thread(
                            target=lambda out=took: out.append(run_batch(c, f.id, args.lines))
                        )
                        t.start()
                    run = bench(gw.port, args, window, tmp / f"{rep}-{mode}.json")
                    if t is not None:
                        t.join()
                    ttft = run["ttft_ms"]
                    p99[mode].append(ttft["p99"])
                    batch = f"{took[0]:.1f} s" if took else "-"
                    rows.append(
                        f"| {rep + 1} | {mode} | {run['requests']} | {ttft['p50']:.2f} | {ttft['p90']:.2f} "
                        f"| {ttft['p99']:.2f} | {run['errors']} | {batch} | {loadavg()} |"
                    )
                    print(rows[-1], flush=True)
    print(f"\n# interactive TTFT vs a {args.lines}-request batch ({time.strftime('%Y-%m-%d %H:%M')})")
    print(
        f"open loop {args.rate:g} req/s streamed (64 prompt tokens, 16 out), {window:.1f} s windows; "
        f"batch lines {args.line_delay_ms:g} ms upstream TTFT; batch lane: lines {args.batch_lines}, "
        f"yield_at {args.yield_at}; batch alone {alone:.1f} s\n"
    )
    print("| run | mode | requests | TTFT p50 ms | p90 | p99 | errors | batch took | loadavg |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    alone_p99, with_p99 = statistics.median(p99["alone"]), statistics.median(p99["with batch"])
    print(
        f"\nmedian TTFT p99: alone {alone_p99:.2f} ms, with batch {with_p99:.2f} ms, "
        f"ratio {with_p99 / alone_p99:.3f} (target <= 1.10)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
