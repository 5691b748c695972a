"""Multi-instance rig (issue 19 item 4): N gateway instances x W workers behind a local L4 balancer
(nginx `stream`, round robin per connection) on one Redis or a Redis Cluster; per limits mode, in
one run: fleet RPS, gateway and Redis CPU per request, and limit accuracy.

Why a fleet: the Redis limiter's cost is paid by the one Redis (or cluster) every instance shares;
one instance on one Redis hides that Redis caps the fleet, and that local limits multiply a key's
limit by the number of worker processes.

- Upstream: nginx answering a fixed chat.completion instantly (as proxy_overhead.py).
- Redis: a private `redis-server` on a free port (`--redis single`), or a 3-primary cluster
  (`--redis cluster`, tests/python/redis_cluster.py); `--redis single,cluster` runs both.
- Modes: `local` (per-worker buckets), `redis` (exact: one Lua decision per request), `leased`
  (slices of the limit per worker) when this tree's config knows `mode: leased`.
- Throughput: wrk through the balancer with a key whose limits never refuse (rpm, tpm and
  max_concurrent set: the full decision and settlement run). Redis CPU per request: the deltas
  of `INFO cpu` used_cpu_sys + used_cpu_user, summed over the Redis processes, over the requests.
- Accuracy: wrk drives a key with `rpm: --acc-rpm` (also its burst) far over its limit for
  `--acc-duration` s; admitted (2xx) against what the limit allows in that time:
  rpm + rpm * t / 60 (the burst, then the refill). Exact mode: exactly that; local: about
  N x W times that.

    .venv/bin/python benchmarks/fleet.py [--instances 2] [--workers 2] [--redis single,cluster] \
        [--modes local,redis,leased] [--duration 10] [--warmup 2] [--conc 16] \
        [--acc-rpm 600] [--acc-duration 5] [--out benchmarks/results/DATE-fleet.md]

Not run in CI. Needs wrk, nginx with the stream module, redis-server and redis-cli
(`make bench-deps`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _common import redis_cli, start_redis
from proxy_overhead import BODY, REQUEST, free_port, proc_cpu_s, run_wrk, tree, wait_http

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from redis_cluster import LocalCluster  # noqa: E402 (the tests' cluster harness)

BENCH_KEY = "sk-bench-fleet-0123456789abcdef"
ACC_KEY = "sk-bench-fleet-accuracy-0123456789"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def leased_supported() -> bool:
    """Whether this tree's config has `mode: leased` (issue 19 item 1)."""
    from gateway.config import ConfigError, parse

    text = (
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        "tiers: {t: {rpm: 1000, mode: leased}}\nlimits: {backend: redis}\n"
    )
    try:
        parse(text)
    except ConfigError:
        return False
    return True


# ---- Redis --------------------------------------------------------------------------------------


class SingleRedis:
    """A private redis-server (no persistence) on a free port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.proc = start_redis(self.port, tmp)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def used_cpu_s(self) -> float:
        return info_cpu_s(self.port)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def info_cpu_s(port: int) -> float:
    info = redis_cli(port, "INFO", "cpu")
    return sum(float(v) for v in re.findall(r"^used_cpu_(?:sys|user):([\d.]+)", info, re.M))


@contextlib.contextmanager
def redis_topology(kind: str, tmp: Path) -> Iterator[SingleRedis | LocalCluster]:
    if kind == "single":
        r = SingleRedis(tmp)
        try:
            yield r
        finally:
            r.stop()
    else:
        with LocalCluster(tmp / "cluster", primaries=3, replicas=0, node_timeout_ms=5000) as c:
            yield c


# ---- the fleet ----------------------------------------------------------------------------------


def gateway_config(upstream: int, mode: str, redis_url: str, prefix: str, acc_rpm: int) -> str:
    tier_mode = ", mode: leased" if mode == "leased" else ""
    text = (
        "server: {host: 127.0.0.1}\n"
        f"providers: [{{name: up, base_url: 'http://127.0.0.1:{upstream}/v1'}}]\n"
        "models: [{name: bench, provider: up, upstream_model: mock-echo}]\n"
        "auth: {enabled: true, salt: bench-salt-0123456789, keys: ["
        f"{{id: bench, key: {BENCH_KEY}, tier: big}}, {{id: acc, key: {ACC_KEY}, tier: acc}}]}}\n"
        # the same never-refusing tier as proxy_overhead.py's (the table)
        f"tiers: {{big: {{rpm: 100000000, tpm: 100000000, max_concurrent: 100000{tier_mode}}}, "
        f"acc: {{rpm: {acc_rpm}{tier_mode}}}}}\n"
    )
    if mode != "local":
        # fail_closed: a Redis failure shows as 503s in the error column, not a silent fallback;
        # a 1 s deadline: on 2 shared cores at load ~10 the default 50 ms is missed, and one miss
        # refuses every request for retry_interval_ms
        text += (
            f"limits: {{backend: redis, redis: {{url: '{redis_url}', key_prefix: '{prefix}', "
            "on_error: fail_closed, timeout_ms: 1000, retry_interval_ms: 200}}\n"
        )
    return text


def balancer_conf(tmp: Path, listen: int, gateways: list[int]) -> Path:
    servers = " ".join(f"server 127.0.0.1:{p};" for p in gateways)
    conf = f"""
load_module {STREAM_MODULE};
worker_processes 1;
daemon off;
pid {tmp}/lb.pid;
error_log {tmp}/lb-error.log warn;
events {{ worker_connections 4096; }}
stream {{
  upstream fleet {{ {servers} }}
  server {{ listen 127.0.0.1:{listen}; proxy_pass fleet; }}
}}
"""
    path = tmp / f"lb-{listen}.conf"
    path.write_text(conf)
    return path


def upstream_conf(tmp: Path, port: int) -> Path:
    body = BODY.replace("'", "\\'")
    conf = f"""
worker_processes 1;
daemon off;
pid {tmp}/up.pid;
error_log {tmp}/up-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
"""
    path = tmp / "upstream.conf"
    path.write_text(conf)
    return path


@contextlib.contextmanager
def fleet(tmp: Path, config: str, instances: int, workers: int) -> Iterator[tuple[int, list[int]]]:
    """The gateways and their balancer: (balancer port, gateway pids)."""
    cfg = tmp / f"gateway-{secrets.token_hex(3)}.yaml"
    cfg.write_text(config)
    ports = [free_port() for _ in range(instances)]
    procs = [
        subprocess.Popen(
            [
                *(str(REPO / ".venv/bin/python"), "-m", "gateway.cli", "serve", "--config", str(cfg)),
                *("--port", str(p), "--workers", str(workers), "--log-level", "error"),
            ],
            stdout=subprocess.DEVNULL,
        )
        for p in ports
    ]
    lb_port = free_port()
    lb = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(balancer_conf(tmp, lb_port, ports))])
    try:
        for p in ports:
            wait_http(f"http://127.0.0.1:{p}/v1/chat/completions", REQUEST, BENCH_KEY, timeout_s=60)
        wait_http(f"http://127.0.0.1:{lb_port}/v1/chat/completions", REQUEST, BENCH_KEY)
        yield lb_port, [p.pid for p in procs]
    finally:
        lb.terminate()
        for p in procs:
            p.terminate()
        for p in [lb, *procs]:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@dataclass
class Row:
    redis: str
    mode: str
    rps: float
    p50: float
    p99: float
    errors: int
    gw_cpu_us: float
    redis_cpu_us: float | None
    admitted: int
    allowed: float
    acc_total: int
    loadavg: str


def lua(path: Path, key: str) -> Path:
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\nwrk.body = [[{REQUEST}]]\n'
    )
    return path


def wrk_timed(url: str, conc: int, duration: float, script: Path) -> tuple[int, int, float]:
    """(requests, non-2xx, seconds) of one wrk run (its own elapsed time)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    assert m is not None, out
    secs = float(m.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return int(m.group(1)), int(bad.group(1)) if bad else 0, secs


def measure(
    args: argparse.Namespace,
    tmp: Path,
    upstream: int,
    kind: str,
    redis: SingleRedis | LocalCluster,
    mode: str,
) -> Row:
    prefix = f"fastpath:fleet:{secrets.token_hex(4)}:"
    config = gateway_config(upstream, mode, redis.url, prefix, args.acc_rpm)
    with fleet(tmp, config, args.instances, args.workers) as (lb, pids):
        url = f"http://127.0.0.1:{lb}/v1/chat/completions"
        bench = lua(tmp / "bench.lua", BENCH_KEY)
        run_wrk(url, args.conc, args.warmup, bench)
        procs = [q for p in pids for q in tree(p)]
        cpu0, rcpu0 = proc_cpu_s(procs), redis.used_cpu_s()
        rps, pct, errors, total = run_wrk(url, args.conc, args.duration, bench)
        cpu1, rcpu1 = proc_cpu_s(procs), redis.used_cpu_s()
        load = loadavg()
        # accuracy: a fresh key (first request now) driven far over its limit
        acc_total, refused, secs = wrk_timed(url, args.conc, args.acc_duration, lua(tmp / "acc.lua", ACC_KEY))
    return Row(
        redis=kind if mode != "local" else "—",
        mode=mode,
        rps=rps,
        p50=pct.get("50", float("nan")),
        p99=pct.get("99", float("nan")),
        errors=errors,
        gw_cpu_us=(cpu1 - cpu0) / total * 1e6,
        redis_cpu_us=(rcpu1 - rcpu0) / total * 1e6 if mode != "local" else None,
        admitted=acc_total - refused,
        allowed=args.acc_rpm + args.acc_rpm * secs / 60,
        acc_total=acc_total,
        loadavg=load,
    )


def render(args: argparse.Namespace, rows: list[Row], load_start: str, load_end: str, cmd: str) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    lines = [
        f"# Fleet: {args.instances} instances x {args.workers} workers behind nginx stream "
        f"({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.platform()}; {nginx_v}; Redis {redis_v}; "
        "Python gateway from this tree (release build of the Rust core as installed in .venv).",
        f"Method: wrk -t1 -c{args.conc} through the balancer, {args.warmup} s warm-up then {args.duration} s "
        f"per row; accuracy: a fresh key with rpm {args.acc_rpm} (= its burst) driven for "
        f"{args.acc_duration} s at c={args.conc}, allowed = rpm + rpm * t / 60. Redis CPU: INFO cpu deltas "
        "summed over the Redis processes. Everything (load generator, balancer, upstream, gateways, "
        "Redis) shares the machine's cores.",
        f"loadavg at start: {load_start}; at end: {load_end}",
        "",
        "| Redis | limits mode | fleet RPS | p50 ms | p99 ms | non-2xx | gateway CPU µs/req "
        "| Redis CPU µs/req | accuracy: admitted / allowed | loadavg after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        redis_cpu = f"{r.redis_cpu_us:.1f}" if r.redis_cpu_us is not None else "—"
        lines.append(
            f"| {r.redis} | {r.mode} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.errors} "
            f"| {r.gw_cpu_us:.0f} | {redis_cpu} | {r.admitted} / {r.allowed:.0f} "
            f"({r.admitted / r.allowed:.2f}x; {r.acc_total} sent) | {r.loadavg.split()[0]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--redis", default="single", help="single, cluster or single,cluster")
    ap.add_argument("--modes", default="local,redis,leased")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--acc-rpm", type=int, default=600)
    ap.add_argument("--acc-duration", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    for tool in ("wrk", "nginx", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (make bench-deps)")
    if not Path(STREAM_MODULE).exists():
        sys.exit(f"{STREAM_MODULE} missing: apt-get install libnginx-mod-stream (make bench-deps)")
    modes = [m for m in args.modes.split(",") if m]
    if "leased" in modes and not leased_supported():
        print("mode leased: not in this tree's config; skipped", file=sys.stderr)
        modes.remove("leased")
    kinds = [k for k in args.redis.split(",") if k]
    cmd = "benchmarks/fleet.py " + " ".join(sys.argv[1:])
    load_start = loadavg()
    print(f"loadavg {load_start}", file=sys.stderr)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fleet-") as t:
        tmp = Path(t)
        up = free_port()
        ngx = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(upstream_conf(tmp, up))])
        try:
            # local limits need no Redis: measured once, in the first topology
            for i, kind in enumerate(kinds):
                with redis_topology(kind, tmp / kind) as redis:
                    for mode in modes:
                        if mode == "local" and i > 0:
                            continue
                        row = measure(args, tmp, up, kind, redis, mode)
                        print(row, file=sys.stderr)
                        rows.append(row)
        finally:
            ngx.terminate()
            ngx.wait()
    text = render(args, rows, load_start, loadavg(), cmd)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
