"""`fastpath-bench` next to `aiperf` (NVIDIA's benchmark client), same run, same upstreams.

Accuracy: `fastpath-bench paced-upstream` answers on a known schedule (first content chunk FIRST ms
after the request arrived, then one chunk every CHUNK ms). Both tools run at each concurrency
against the same upstream process; their TTFT / ITL percentiles are shown with the error against
the schedule, beside the upstream's own write lateness (its `/stats`, reset before each tool) so the
client's error can be told from the server's. aiperf's ITL is a per-request mean (its definition);
its per-gap ITL is recomputed from its records (`inter_chunk_latency`) to compare like with like.

Capacity: nginx serving a static 64-chunk SSE body (an instant upstream). Open-loop constant-rate
sweeps; a level counts as sustained when the tool completed >= 97 % of the requested rate without
errors and its send lag p99 (actual minus scheduled send) stayed <= 5 ms. fastpath-bench reports its
send lag; aiperf's is recomputed from its records (request i is due at first start + i / rate).
Client CPU per request: fastpath-bench's own thread CPU over the level; aiperf's whole process tree
(all its services and workers) sampled from /proc during the measured window.

    make bench-vs-aiperf             # installs aiperf (pinned, .venv-aiperf), nginx, then runs this
    .venv/bin/python benchmarks/bench_vs_aiperf.py [--quick] [--out report.md]

aiperf runs offline: `--tokenizer builtin` (tiktoken o200k_base) fed the vocabulary our extension
embeds (crates/fastpath/assets) through TIKTOKEN_CACHE_DIR. Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import paced_upstream, wait_http
from proxy_overhead import free_port, nginx_conf, proc_cpu_s, tree

REPO = Path(__file__).resolve().parents[1]
BINARY = REPO / "target" / "release" / "fastpath-bench"
AIPERF = REPO / ".venv-aiperf" / "bin" / "aiperf"
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
ISL = 16


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (the definition fastpath-bench's histogram approximates)."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, -(-len(s) * p // 100))
    return s[int(rank) - 1]


def tiktoken_cache(tmp: Path) -> Path:
    """tiktoken's cache layout (sha1 of the blob URL) filled with the vocabularies our extension
    embeds; tiktoken still checks them against its pinned sha256, so aiperf needs no network."""
    assets = REPO / "crates" / "fastpath" / "assets"
    cache = tmp / "tiktoken-cache"
    cache.mkdir()
    for name in ("o200k_base", "cl100k_base"):
        key = hashlib.sha1(BLOB_URL.format(name).encode()).hexdigest()
        shutil.copyfile(assets / f"{name}.tiktoken", cache / key)
    return cache


class CpuSampler:
    """Samples a process tree's CPU (utime + stime of live members) against wall-clock ns, so the
    CPU spent inside a window (e.g. aiperf's profiling phase, from its records) can be read off."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time_ns(), proc_cpu_s(tree(self.pid))))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t_ns: int) -> float:
        """CPU seconds at `t_ns`, interpolated between samples (the running max: members that
        exit take their CPU with them, which must not read as negative CPU)."""
        best, prev = 0.0, (0, 0.0)
        for t, cpu in self.samples:
            best = max(best, cpu)
            if t >= t_ns:
                if t == prev[0]:
                    return best
                return prev[1] + (best - prev[1]) * (t_ns - prev[0]) / (t - prev[0])
            prev = (t, best)
        return best


@dataclass
class Result:
    tool: str
    level: str
    requests: int = 0
    errors: int = 0
    throughput: float = 0.0
    ttft: dict[str, float | None] = field(default_factory=dict)
    itl: dict[str, float | None] = field(default_factory=dict)
    itl_gap: dict[str, float | None] = field(default_factory=dict)
    send_lag: dict[str, float | None] = field(default_factory=dict)
    cpu_us: float | None = None
    cpu_note: str = ""
    upstream_late: dict[str, float | None] = field(default_factory=dict)
    loadavg: str = ""


def run_bench(url: str, load: list[str], duration: float, warmup: float, out: Path) -> Result:
    cmd = [
        str(BINARY),
        "--url",
        f"{url}/v1/chat/completions",
        "--model",
        "paced",
        "--stream",
        *load,
        "--duration",
        f"{duration}s",
        "--warmup",
        f"{warmup}s",
        "--input-tokens",
        f"fixed:{ISL}",
        "--no-progress",
        "--json",
        str(out),
    ]
    res = Result("fastpath-bench", " ".join(load), loadavg=loadavg())
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (run,) = json.loads(out.read_text())["runs"]
    res.requests, res.errors = run["requests"], run["errors"]
    res.throughput = run["request_throughput"]
    res.ttft = {k: run["ttft_ms"].get(k) for k in ("p50", "p99", "max")}
    res.itl = res.itl_gap = {k: run["itl_ms"].get(k) for k in ("p50", "p99", "max")}
    res.send_lag = {k: run["send_lag_ms"].get(k) for k in ("p50", "p99", "max")}
    res.cpu_us = run.get("client_cpu_us_per_request")
    res.cpu_note = "own thread"
    return res


def run_aiperf(
    url: str, load: list[str], duration: float, warmup: float, out: Path, cache: Path, rate: float | None
) -> Result:
    cmd = [
        str(AIPERF),
        "profile",
        "--model",
        "paced",
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        "builtin",
        "--isl",
        str(ISL),
        "--isl-stddev",
        "0",
        "--ui-type",
        "none",
        "--export-level",
        "records",
        "--random-seed",
        "1",
        "--benchmark-duration",
        str(duration),
        "--benchmark-grace-period",
        "10",
        "--warmup-duration",
        str(warmup),
        "--artifact-dir",
        str(out),
        *load,
    ]
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    res = Result("aiperf 0.13.0", " ".join(load), loadavg=loadavg())
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = CpuSampler(proc.pid)
        rc = proc.wait()
        sampler.stop()
    if rc != 0:
        raise RuntimeError(f"aiperf exited {rc}; see {out.parent / f'{out.name}.log'}")
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    recs = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line]
    recs = [r for r in recs if r["metadata"].get("benchmark_phase") == "profiling"]
    ok = [r for r in recs if "time_to_first_token" in r["metrics"]]
    res.requests, res.errors = len(ok), len(recs) - len(ok)
    starts = sorted(r["metadata"]["request_start_ns"] for r in recs)
    end = max(r["metadata"]["request_end_ns"] for r in recs)
    res.throughput = len(ok) / ((end - starts[0]) / 1e9)
    res.ttft = {k: summary["time_to_first_token"].get(k) for k in ("p50", "p99", "max")}
    res.itl = {k: summary["inter_token_latency"].get(k) for k in ("p50", "p99", "max")}
    gaps = [g for r in ok for g in r["metrics"].get("inter_chunk_latency", {}).get("value", [])]
    res.itl_gap = {"p50": pct(gaps, 50), "p99": pct(gaps, 99), "max": max(gaps, default=None)}
    if rate:
        by_index = sorted(recs, key=lambda r: r["metadata"]["profiling_index"])
        t0 = by_index[0]["metadata"]["request_start_ns"]
        lags = [
            max(0.0, (r["metadata"]["request_start_ns"] - t0) / 1e6 - i * 1000 / rate)
            for i, r in enumerate(by_index)
        ]
        res.send_lag = {"p50": pct(lags, 50), "p99": pct(lags, 99), "max": max(lags)}
    cpu = sampler.at(end) - sampler.at(starts[0])
    res.cpu_us = cpu / max(1, len(recs)) * 1e6
    res.cpu_note = "process tree"
    return res


def upstream_stats(base: str, reset: bool = False) -> dict[str, float | None]:
    with urllib.request.urlopen(f"{base}/stats{'?reset=1' if reset else ''}", timeout=5) as resp:
        st = json.loads(resp.read())
    return {"p50": st.get("p50_ms"), "p99": st.get("p99_ms"), "max": st.get("max_ms")}


def spin_for(args: argparse.Namespace, conc: int) -> int:
    """The paced upstream spins before each deadline to be punctual (sleep alone wakes ~0.1-0.2 ms
    late on this VM); with many streams the spinning threads would starve the 2 vCPUs instead."""
    return int(args.spin_us) if args.spin_us != "auto" else (200 if conc <= 8 else 50)


def accuracy(args: argparse.Namespace, tmp: Path, cache: Path) -> list[Result]:
    rows = []
    for conc in args.concurrency:
        with paced_upstream(args.first_ms, args.chunk_ms, args.chunks, spin_for(args, conc)) as base:
            for tool in ("bench", "aiperf"):
                load = ["--concurrency", str(conc)]
                upstream_stats(base, reset=True)
                if tool == "bench":
                    r = run_bench(base, load, args.duration, args.warmup, tmp / f"acc-b{conc}.json")
                else:
                    r = run_aiperf(base, load, args.duration, args.warmup, tmp / f"acc-a{conc}", cache, None)
                r.upstream_late = upstream_stats(base)
                rows.append(r)
                print(
                    f"  accuracy c={conc} {r.tool}: TTFT p50 {r.ttft['p50']}, ITL p50 {r.itl_gap['p50']}",
                    flush=True,
                )
    return rows


def capacity(args: argparse.Namespace, tmp: Path, cache: Path) -> list[Result]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ngx_dir = tmp / "nginx"
    ngx_dir.mkdir()
    ngx_dir.chmod(0o755)  # nginx workers run as another user and read stream.sse from here
    port = free_port()
    ngx = subprocess.Popen(
        [nginx, "-p", str(ngx_dir), "-c", str(nginx_conf(ngx_dir, port, free_port(), True))]
    )
    base = f"http://127.0.0.1:{port}"
    rows: list[Result] = []
    try:
        wait_http(f"{base}/")
        plans: list[tuple[str, list[float], Callable[[float], Result]]] = [
            (
                "bench",
                args.bench_rates,
                lambda rate: run_bench(
                    base, ["--rate", f"{rate:g}"], args.cap_duration, args.warmup, tmp / f"cap-b{rate:g}.json"
                ),
            ),
            (
                "aiperf",
                args.aiperf_rates,
                lambda rate: run_aiperf(
                    base,
                    ["--request-rate", f"{rate:g}", "--arrival-pattern", "constant"],
                    args.cap_duration,
                    args.warmup,
                    tmp / f"cap-a{rate:g}",
                    cache,
                    rate,
                ),
            ),
        ]
        for name, rates, run in plans:
            for rate in rates:
                r = run(rate)
                r.level = f"rate {rate:g}/s"
                rows.append(r)
                print(
                    f"  capacity {name} {rate:g}/s: {r.throughput:.0f}/s done, "
                    f"lag p99 {r.send_lag.get('p99')}, "
                    f"cpu {r.cpu_us}",
                    flush=True,
                )
                if not sustained(r, rate):
                    break  # higher rates only fall further behind
    finally:
        ngx.terminate()
        ngx.wait(10)
    return rows


def sustained(r: Result, rate: float) -> bool:
    lag = r.send_lag.get("p99")
    return r.errors == 0 and r.throughput >= 0.97 * rate and lag is not None and lag <= 5.0


def fmt(v: float | None, sched: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if sched is None else f"{v:.3f} ({v - sched:+.3f})"


def report(args: argparse.Namespace, acc: list[Result], cap: list[Result], started: str, load0: str) -> str:
    lines = [
        f"# fastpath-bench vs aiperf ({started})",
        "",
        f"machine: {platform.node()}, {os.cpu_count()} cores ({platform.machine()}), "
        f"loadavg at start {load0}; "
        f"command: `{' '.join(sys.argv)}`",
        "",
        f"## Accuracy: paced upstream, TTFT {args.first_ms} ms then one chunk every {args.chunk_ms} ms "
        f"({args.chunks} chunks, upstream spin {args.spin_us} µs: "
        f"{', '.join(f'c={c}: {spin_for(args, c)}' for c in args.concurrency)}), "
        f"{args.duration} s per cell after {args.warmup} s "
        "warm-up",
        "",
        "Cells: measured ms (error vs the schedule). ITL (tool) = the tool's own ITL metric "
        "(aiperf: mean per "
        "request); ITL per gap = every chunk gap. Upstream late = the paced upstream's own write lateness "
        "(actual write minus deadline) during that cell.",
        "",
        "| tool | c | requests | TTFT p50 | TTFT p99 | ITL (tool) p50 | ITL (tool) p99 | ITL per gap p50 "
        "| ITL per gap p99 | upstream late p50 / p99 ms | loadavg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r.tool} | {r.level.split()[-1]} | {r.requests} | {fmt(r.ttft['p50'], args.first_ms)} "
        f"| {fmt(r.ttft['p99'], args.first_ms)} | {fmt(r.itl['p50'], args.chunk_ms)} "
        f"| {fmt(r.itl['p99'], args.chunk_ms)} | {fmt(r.itl_gap['p50'], args.chunk_ms)} "
        f"| {fmt(r.itl_gap['p99'], args.chunk_ms)} | {fmt(r.upstream_late.get('p50'))} / "
        f"{fmt(r.upstream_late.get('p99'))} | {r.loadavg} |"
        for r in acc
    )
    lines += [
        "",
        f"## Capacity: instant upstream (nginx, static 64-chunk SSE body), open loop, constant arrivals, "
        f"{args.cap_duration} s per level",
        "",
        "Sustained = >= 97 % of the requested rate completed, no errors, send lag p99 <= 5 ms. "
        "A sweep stops at "
        "the first level not sustained.",
        "",
        "| tool | requested | completed/s | errors | send lag p50 / p99 / max ms | TTFT p50 / p99 ms "
        "| client CPU µs/request | sustained | loadavg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best: dict[str, tuple[float, float | None]] = {}
    for r in cap:
        rate = float(r.level.split()[1].rstrip("/s"))
        ok = sustained(r, rate)
        if ok and rate > best.get(r.tool, (0.0, None))[0]:
            best[r.tool] = (rate, r.cpu_us)
        lag = r.send_lag
        lines.append(
            f"| {r.tool} | {rate:g}/s | {r.throughput:,.0f} | {r.errors} | {fmt(lag.get('p50'))} / "
            f"{fmt(lag.get('p99'))} / {fmt(lag.get('max'))} | {fmt(r.ttft['p50'])} / {fmt(r.ttft['p99'])} "
            f"| {r.cpu_us:,.0f} ({r.cpu_note}) | {'yes' if ok else 'no'} | {r.loadavg} |"
        )
    lines += ["", "Highest sustained rate (client CPU per request at that rate):", ""]
    for tool, (rate, cpu) in best.items():
        lines.append(f"- {tool}: {rate:g} streams/s ({fmt(cpu)} µs CPU/request)")
    tools = list(best)
    if len(tools) == 2 and best[tools[1]][0] > 0:
        (r0, c0), (r1, c1) = best[tools[0]], best[tools[1]]
        ratio_cpu = f"{c1 / c0:.0f}x less CPU per request" if c0 and c1 else ""
        lines.append(f"- {tools[0]} / {tools[1]}: {r0 / r1:.0f}x the sustained rate, {ratio_cpu}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-ms", type=float, default=20.0)
    ap.add_argument("--chunk-ms", type=float, default=5.0)
    ap.add_argument("--chunks", type=int, default=32, help="content chunks per paced stream")
    ap.add_argument(
        "--spin-us",
        default="auto",
        help="paced upstream: sleep until this many µs before each deadline, then spin; auto: 200 up to "
        "c=8, 50 above (bench_accuracy.py compares settings)",
    )
    ap.add_argument("--duration", type=float, default=10.0, help="accuracy: measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--cap-duration", type=float, default=5.0, help="capacity: measured seconds per level")
    ap.add_argument("--bench-rates", default="1000,2000,4000,8000,10000,12000,16000,24000")
    ap.add_argument("--aiperf-rates", default="50,100,200,400,800")
    ap.add_argument("--quick", action="store_true", help="shorter cells (3 s) for a smoke run")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.bench_rates = [float(r) for r in args.bench_rates.split(",")]
    args.aiperf_rates = [float(r) for r in args.aiperf_rates.split(",")]
    if args.quick:
        args.duration = args.cap_duration = 3.0
    for path, fix in ((BINARY, "make install"), (AIPERF, "make bench-aiperf")):
        if not path.exists():
            print(f"error: {path} missing; run `{fix}`", file=sys.stderr)
            return 2
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("error: nginx not found; run `make bench-deps`", file=sys.stderr)
        return 2
    started, load0 = time.strftime("%Y-%m-%d %H:%M"), loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vs-aiperf-") as t:
        tmp = Path(t)
        tmp.chmod(0o755)
        cache = tiktoken_cache(tmp)
        print("accuracy ...", flush=True)
        acc = accuracy(args, tmp, cache)
        print("capacity ...", flush=True)
        cap = capacity(args, tmp, cache)
    text = report(args, acc, cap, started, load0)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
