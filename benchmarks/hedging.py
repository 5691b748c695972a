"""Hedging against a slow tail, measured with `fastpath-gateway bench`.

Two mock upstream processes serve the same model; each answers a fraction of requests
(`--slow-tail-rate`) only after `--slow-tail-ms` more (a GPU replica stuck behind a long
prefill, a GC pause). The gateway serves the pair twice: `plain` (p2c, no hedging) and `hedged`
(`hedge: {enabled: true}`: no first token after the deployment's TTFT p95 -> a second attempt
on the other replica). Closed-loop streams, runs interleaved and repeated; TTFT percentiles
from the client side, the extra upstream requests hedging cost (from the mocks' own counts),
and /proc/loadavg with every row.

    .venv/bin/python benchmarks/hedging.py [--duration 10] [--repeat 2] [--concurrency 4]

Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "python"))

from conftest import free_port, run_gateway, wait_http  # noqa: E402

BENCH = REPO / ".venv" / "bin" / "fastpath-gateway"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_mock(port: int, rate: float, tail_ms: float, seed: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gateway.dev.openai_mock", "--port", str(port), "--log-level", "WARNING"]
    cmd += ["--slow-tail-rate", str(rate), "--slow-tail-ms", str(tail_ms), "--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return proc


def upstream_requests(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_mock/stats", timeout=5) as r:
        return int(json.loads(r.read())["completions"])


def config(ports: list[int], quantile: float) -> str:
    providers = "".join(
        f"  - {{name: m{i}, base_url: 'http://127.0.0.1:{p}/v1'}}\n" for i, p in enumerate(ports)
    )
    deps = "".join(f"      - {{provider: m{i}, upstream_model: mock-echo}}\n" for i in range(len(ports)))
    return (
        f"server: {{host: 127.0.0.1}}\nproviders:\n{providers}models:\n"
        f"  - name: plain\n    deployments:\n{deps}"
        f"  - name: hedged\n"
        f"    hedge: {{enabled: true, quantile: {quantile}, min_samples: 50, after_ms: 50}}\n"
        f"    retry: {{budget_ratio: 0.2, budget_min_per_s: 5}}\n    deployments:\n{deps}"
    )


def bench(port: int, model: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [str(BENCH), "bench", "--url", f"http://127.0.0.1:{port}/v1/chat/completions", "--model", model]
    cmd += ["--stream", "--concurrency", str(args.concurrency), "--duration", f"{args.duration}s"]
    cmd += ["--warmup", "2s", "--input-tokens", "fixed:16", "--max-tokens", "16", "--no-progress"]
    cmd += ["--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run,) = json.loads(out.read_text())["runs"]
    return dict(run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--slow-tail-rate", type=float, default=0.03)
    ap.add_argument("--slow-tail-ms", type=float, default=300.0)
    ap.add_argument("--quantile", type=float, default=0.95)
    args = ap.parse_args()
    ports = [free_port(), free_port()]
    mocks = [start_mock(p, args.slow_tail_rate, args.slow_tail_ms, seed=i + 1) for i, p in enumerate(ports)]
    rows: list[str] = []
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            run_gateway(Path(tmp), None, config_text=config(ports, args.quantile), log_level="error") as gw,
        ):
            for rep in range(args.repeat):
                for model in ("plain", "hedged"):
                    before = sum(upstream_requests(p) for p in ports)
                    run = bench(gw.port, model, args, Path(tmp) / f"{model}{rep}.json")
                    sent = sum(upstream_requests(p) for p in ports) - before
                    t = run["ttft_ms"]
                    extra = sent / max(1, run["sent_total"]) - 1
                    rows.append(
                        f"| {rep + 1} | {model} | {run['requests']} | {t['p50']:.2f} | {t['p95']:.2f} "
                        f"| {t['p99']:.2f} | {t['max']:.2f} | {extra * 100:+.1f} % | {run['errors']} "
                        f"| {loadavg()} |"
                    )
                    print(rows[-1], flush=True)
    finally:
        for m in mocks:
            m.terminate()
            m.wait(10)
    print(f"\n# hedging vs a slow tail ({time.strftime('%Y-%m-%d %H:%M')})")
    print(
        f"{len(ports)} mock deployments, each: {args.slow_tail_rate * 100:.0f} % of requests +"
        f"{args.slow_tail_ms:.0f} ms before the first token; closed loop c={args.concurrency}, "
        f"{args.duration:.0f} s per run; hedge after the deployment's TTFT p{args.quantile * 100:.0f}\n"
    )
    print(
        "| run | model | requests | TTFT p50 ms | p95 | p99 | max | extra upstream requests | errors"
        " | loadavg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
