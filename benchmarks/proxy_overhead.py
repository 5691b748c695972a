"""First measurement: what one hop through the gateway adds, against baselines in the same run.

Upstream: nginx answering a fixed 366-byte chat.completion instantly (never the bottleneck).
Targets: direct to that upstream, nginx `proxy_pass` (keep-alive pool: a well-made proxy hop,
our practical floor), and fastpath-gateway (1 worker). Load: wrk (native, closed loop).
Reports RPS, latency percentiles, gateway CPU per request (from /proc) and /proc/loadavg.
`--auth` adds a gateway with API-key auth + local limits, `--auth-redis` one with the same auth
and tiers but `limits.backend: redis` (Redis at --redis-url, a fresh key prefix per run, deleted
at the end; Redis's own CPU per request is read from /proc/<redis pid>/stat), all in the same run.

    .venv/bin/python benchmarks/proxy_overhead.py [--duration 10] [--warmup 3] [--repeat 2] \
        [--auth] [--auth-redis] [--redis-url redis://127.0.0.1:6379/0] [--baseline-tree DIR]

`--metrics-off`: every gateway target also runs with `metrics: {enabled: false}`, interleaved: the
cost of `/metrics` recording per request (CPU µs/request difference). `--scrape-ms N`: and once more
with a client scraping its `/metrics` every N ms during its cells (the p99 under scraping).

`--baseline-tree DIR`: every gateway target also runs from another checkout's `python/` (e.g. a
`git worktree` of the commit before a change, with this venv's built extension copied into its
`python/gateway/`), interleaved with this tree's in every repeat: a before/after in one run.

Not run in CI. Needs `wrk` and `nginx` (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"mock-echo",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},'
    '"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,'
    '"total_tokens":21},"system_fingerprint":"fp_bench"}'
)
REQUEST = '{"model":"bench","messages":[{"role":"user","content":"Hello, how are you?"}],"max_tokens":16}'
API_KEY = "sk-bench-0123456789abcdef"
# Limits high enough never to refuse: the cost of checking them is what is measured. The same
# tiers for the local and the Redis limiter (tpm within config.REDIS_MAX_RATE = 150M).
AUTH_CONFIG = (
    "auth: {enabled: true, salt: bench-salt-0123456789, "
    f"keys: [{{id: bench, key: {API_KEY}, tier: pro}}]}}\n"
    "tiers: {pro: {rpm: 100000000, tpm: 100000000, max_concurrent: 100000}}\n"
)
GW = "fastpath-gateway"
GW_LOCAL = "fastpath-gateway +auth+limits"
GW_REDIS = "fastpath-gateway +auth+redis limits"
# --auth-leased: rpm + tpm only (a concurrency limit stays exact: one Redis call per request),
# on the local limiter, exact Redis and leased Redis (issue 19)
RPM_TPM = "tiers: {pro: {rpm: 100000000, tpm: 100000000}}\n"
GW_LOCAL2 = "fastpath-gateway +auth+local rpm/tpm"
GW_EXACT2 = "fastpath-gateway +auth+redis exact rpm/tpm"
GW_LEASED = "fastpath-gateway +auth+redis leased rpm/tpm"
BASE = " @baseline"
METRICS_OFF = " @metrics-off"
SCRAPED = " @scraped"
STREAM_REQUEST = REQUEST.replace('{"model":"bench",', '{"model":"bench","stream":true,')


def sse_body(chunks: int = 64) -> str:
    """An upstream stream: role chunk, content chunks, finish chunk, usage chunk, [DONE]."""
    base = '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"mock-echo",'
    frames = [
        base + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
    ]
    frames += [
        base + f'"choices":[{{"index":0,"delta":{{"content":"tok{i} "}},"finish_reason":null}}]}}'
        for i in range(chunks - 2)
    ]
    frames.append(base + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    usage = f'{{"prompt_tokens":12,"completion_tokens":{chunks - 2},"total_tokens":{chunks + 10}}}'
    frames.append(base + f'"choices":[],"usage":{usage}}}')
    return "".join(f"data: {f}\n\n" for f in frames) + "data: [DONE]\n\n"


TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, body: str, key: str, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(
                url,
                data=body.encode(),
                headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
            )
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def nginx_conf(tmp: Path, upstream_port: int, proxy_port: int, stream: bool) -> Path:
    body = BODY.replace("'", "\\'")
    (tmp / "stream.sse").write_text(sse_body())
    # Streams: the static 64-chunk SSE file for POSTs too (nginx answers POST to a file with 405).
    upstream_location = (
        f"root {tmp}; types {{ text/event-stream sse; }} "
        "location / { try_files /stream.sse =404; error_page 405 =200 /stream.sse; }"
        if stream
        else f"location / {{ default_type application/json; return 200 '{body}'; }}"
    )
    conf = f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{upstream_port};
    {upstream_location}
  }}
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{proxy_port};
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


def redis_call(url: str, *args: str) -> bytes:
    """One RESP command to the Redis at `url` (redis://host:port/db); the raw reply."""
    u = urlsplit(url)
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=5) as s:
        s.sendall(payload)
        buf = b""
        while True:
            buf += s.recv(65536)
            head, _, rest = buf.partition(b"\r\n")
            if head[:1] != b"$" or len(rest) >= int(head[1:]) + 2:
                return buf


def redis_pid(url: str) -> int:
    info = redis_call(url, "INFO", "server").decode()
    return int(re.search(r"process_id:(\d+)", info).group(1))  # type: ignore[union-attr]


def redis_count_and_delete(url: str, prefix: str) -> int:
    """Keys under `prefix` (proof the Redis limiter ran), then deletes them."""
    db = (urlsplit(url).path or "/0").lstrip("/") or "0"
    reply = redis_call(
        url,
        "EVAL",
        "redis.call('SELECT', ARGV[2]) local n = 0 local c = '0' repeat "
        "local r = redis.call('SCAN', c, 'MATCH', ARGV[1] .. '*', 'COUNT', 1000) c = r[1] "
        "for _, k in ipairs(r[2]) do redis.call('DEL', k) n = n + 1 end until c == '0' return n",
        "0",
        prefix,
        db,
    )
    return int(reply[1:].split(b"\r\n", 1)[0]) if reply[:1] == b":" else -1


def proc_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for k in kids:
        out += tree(int(k))
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@dataclass
class Row:
    target: str
    conc: int
    rps: float
    p50: float
    p90: float
    p99: float
    errors: int
    cpu_us: float | None
    rss: float | None
    loadavg: str
    redis_us: float | None = None


def to_ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    if not m:
        return float("nan")
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def run_wrk(url: str, conc: int, duration: int, script: Path) -> tuple[float, dict[str, float], int, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = {p: to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    errs = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errs += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errs += sum(int(x) for x in m.groups())
    return rps, pct, errs, total


class Scraper:
    """GETs `url` every `interval_s` while `url` is set (the target being measured)."""

    def __init__(self, interval_s: float) -> None:
        import threading

        self.url = ""
        self.count = 0
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if interval_s > 0 else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            url = self.url
            if not url:
                continue
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    resp.read()
                self.count += 1
            except OSError as exc:
                print(f"  scrape failed: {exc}", flush=True)

    def stop(self) -> None:
        self._stop.set()


def _cells(rows: list[Row], name: str, conc: int) -> list[Row]:
    return [r for r in rows if r.target == name and r.conc == conc]


def _ratios(a: list[Row], b: list[Row]) -> str:
    return ", ".join(f"{x.rps / y.rps:.2f}" for x, y in zip(a, b, strict=False))


def _cpu_ratios(a: list[Row], b: list[Row]) -> str:
    return ", ".join(
        f"{x.cpu_us / y.cpu_us:.2f} (+{x.cpu_us - y.cpu_us:.0f} µs, load1 {x.loadavg})"
        for x, y in zip(a, b, strict=False)
        if x.cpu_us and y.cpu_us
    )


def _added(g: list[Row], d: list[Row]) -> str:
    return ", ".join(
        f"p50 +{x.p50 - y.p50:.3f} / p99 +{x.p99 - y.p99:.3f} ms (load1 {x.loadavg})"
        for x, y in zip(g, d, strict=False)
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--conc", default="1,16")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--stream", action="store_true", help="64-chunk SSE responses instead of JSON")
    ap.add_argument(
        "--auth",
        action="store_true",
        help="add a second gateway with auth + local limits (RPM, TPM, concurrency) on, same run",
    )
    ap.add_argument(
        "--auth-redis",
        action="store_true",
        help="add a gateway with the same auth + limits on limits.backend redis, same run",
    )
    ap.add_argument(
        "--auth-leased",
        action="store_true",
        help="add gateways with auth + rpm/tpm limits: local, Redis exact and Redis `mode: leased`",
    )
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--baseline-tree", type=Path, help="also run each gateway from DIR/python (before/after)")
    ap.add_argument("--metrics-off", action="store_true", help="also run each gateway with metrics off")
    ap.add_argument("--scrape-ms", type=int, default=0, help="also run each gateway scraped every N ms")
    ap.add_argument(
        "--engine",
        default="",
        help="server engine(s) of every gateway, comma-separated (granian,uvloop: each gateway once per "
        "engine, interleaved in the same run); default: the config's",
    )
    ap.add_argument(
        "--ttft",
        type=int,
        default=0,
        help="--stream: also N streams per target at c=1 for TTFT (suite's client)",
    )
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} not found: run `make bench-deps`")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = Path(tempfile.mkdtemp(prefix="fpbench-"))
    tmp.chmod(0o755)  # nginx workers run as another user and read stream.sse from here
    up, px, gw = free_port(), free_port(), free_port()
    lua = tmp / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{STREAM_REQUEST if args.stream else REQUEST}]]\n"
    )
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        "server: {host: 127.0.0.1}\n"
        f"providers: [{{name: up, base_url: 'http://127.0.0.1:{up}/v1'}}]\n"
        "models: [{name: bench, provider: up, upstream_model: mock-echo}]\n"
    )
    cfg_auth = tmp / "gateway-auth.yaml"
    cfg_auth.write_text(cfg.read_text() + AUTH_CONFIG)
    # A fresh key prefix per run (no buckets left from an earlier run); fail_closed so that a
    # Redis error shows as 503s in the error column instead of a silent fall back to local limits.
    redis_prefix = f"fastpath:bench:{secrets.token_hex(6)}:"
    cfg_redis = tmp / "gateway-auth-redis.yaml"
    cfg_redis.write_text(
        cfg_auth.read_text() + f"limits: {{backend: redis, redis: {{url: '{args.redis_url}', "
        f"key_prefix: '{redis_prefix}', on_error: fail_closed}}}}\n"
    )
    redis_limits = f"limits: {{backend: redis, redis: {{url: '{args.redis_url}', "
    redis_limits += f"key_prefix: '{redis_prefix}', on_error: fail_closed}}}}\n"
    uses_redis = args.auth_redis or args.auth_leased
    leased_tiers = RPM_TPM.replace("}}\n", ", mode: leased}}\n")
    variants = {
        GW_LOCAL2: RPM_TPM,
        GW_EXACT2: RPM_TPM + redis_limits,
        GW_LEASED: leased_tiers + redis_limits,
    }
    rpid = redis_pid(args.redis_url) if args.auth_redis or args.auth_leased else None
    lua_auth = tmp / "post-auth.lua"
    lua_auth.write_text(lua.read_text() + f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n')
    ngx = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(nginx_conf(tmp, up, px, args.stream))])
    gateways = {GW: (gw, cfg)}
    if args.auth:
        gateways[GW_LOCAL] = (free_port(), cfg_auth)
    if args.auth_redis:
        gateways[GW_REDIS] = (free_port(), cfg_redis)
    if args.auth_leased:
        base_auth = cfg.read_text() + AUTH_CONFIG.split("tiers:")[0]
        for k, (name, extra) in enumerate(variants.items()):
            path = tmp / f"gateway-auth-v{k}.yaml"
            path.write_text(base_auth + extra)
            gateways[name] = (free_port(), path)
    for name, (_, c) in list(gateways.items()):
        if args.metrics_off:
            off = c.with_name(c.stem + "-metrics-off.yaml")
            off.write_text(c.read_text() + "metrics: {enabled: false}\n")
            gateways[name + METRICS_OFF] = (free_port(), off)
        if args.scrape_ms:
            open_ = c.with_name(c.stem + "-scraped.yaml")
            open_.write_text(c.read_text() + "metrics: {require_admin: false}\n")
            gateways[name + SCRAPED] = (free_port(), open_)
    engine_of: dict[str, str] = {}
    engines = [e for e in args.engine.split(",") if e]
    if engines:
        for name, (_, c) in list(gateways.items()):
            del gateways[name]
            for engine in engines:
                label = f"{name} [{engine}]" if len(engines) > 1 else name
                gateways[label] = (free_port(), c)
                engine_of[label] = engine
    trees: dict[str, Path | None] = {name: None for name in gateways}
    if args.baseline_tree is not None:
        for name, (_, c) in list(gateways.items()):
            gateways[name + BASE] = (free_port(), c)
            trees[name + BASE] = args.baseline_tree.resolve() / "python"
            if name in engine_of:
                engine_of[name + BASE] = engine_of[name]
    load_start = Path("/proc/loadavg").read_text().strip()
    procs = {
        name: subprocess.Popen(
            [
                str(REPO / ".venv/bin/python"),
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                str(c),
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                "--log-level",
                "error",
                *(["--engine", engine_of[name]] if name in engine_of else []),
            ],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(trees[name])} if trees[name] else None,
        )
        for name, (port, c) in gateways.items()
    }
    rows: list[Row] = []
    ttfts: dict[str, list[dict[str, float]]] = {}
    scraper = Scraper(args.scrape_ms / 1000)
    try:
        targets: dict[str, tuple[str, Path]] = {
            "direct (nginx static)": (f"http://127.0.0.1:{up}/v1/chat/completions", lua),
            "nginx proxy_pass": (f"http://127.0.0.1:{px}/v1/chat/completions", lua),
        }
        for name, (port, _) in gateways.items():
            targets[name] = (
                f"http://127.0.0.1:{port}/v1/chat/completions",
                lua_auth if "auth" in name else lua,
            )
        for url, _ in targets.values():
            wait_http(url, STREAM_REQUEST if args.stream else REQUEST, API_KEY)
        pids = {name: [p for p in tree(pr.pid) if p != pr.pid] or [pr.pid] for name, pr in procs.items()}
        for conc in (int(c) for c in args.conc.split(",")):
            for rep in range(args.repeat):
                for name, (url, script) in targets.items():
                    if rep == 0:
                        run_wrk(url, conc, args.warmup, script)
                    gw_pids = pids.get(name, [])
                    scraper.url = url.replace("/v1/chat/completions", "/metrics") if SCRAPED in name else ""
                    cpu0 = proc_cpu_s(gw_pids)
                    r0 = proc_cpu_s([rpid]) if rpid else 0.0
                    rps, pct, errs, total = run_wrk(url, conc, args.duration, script)
                    scraper.url = ""
                    cpu = (proc_cpu_s(gw_pids) - cpu0) / total * 1e6 if gw_pids and total else None
                    r_us = (proc_cpu_s([rpid]) - r0) / total * 1e6 if rpid and total else None
                    rows.append(
                        Row(
                            name,
                            conc,
                            rps,
                            pct.get("50", 0),
                            pct.get("90", 0),
                            pct.get("99", 0),
                            errs,
                            cpu,
                            rss_mb(gw_pids) if gw_pids else None,
                            Path("/proc/loadavg").read_text().split(" ")[0],
                            r_us,
                        )
                    )
                    print(f"  {name:24} c={conc:<3} rps={rps:>9.0f} p50={pct.get('50', 0):.3f}ms", flush=True)
        if args.stream and args.ttft:
            from suite import sse_client  # the suite's SSE client: TTFT per stream, text checked

            for _ in range(args.repeat):
                for name, (url, _script) in targets.items():
                    port = int(url.split(":")[2].split("/")[0])
                    res = sse_client(port, STREAM_REQUEST, API_KEY if "auth" in name else None, args.ttft, 64)
                    ttfts.setdefault(name, []).append(res)
    finally:
        scraper.stop()
        for pr in [*procs.values(), ngx]:
            pr.terminate()
        for pr in [*procs.values(), ngx]:
            pr.wait(10)
        redis_keys = redis_count_and_delete(args.redis_url, redis_prefix) if uses_redis else 0
    load_end = Path("/proc/loadavg").read_text().strip()
    from gateway import BUILD_PROFILE, __version__

    kind = "streamed 64-chunk SSE" if args.stream else "non-streamed JSON"
    print(f"\n## proxy overhead ({kind}) — {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, fastpath-gateway {__version__} ({BUILD_PROFILE}), "
        f"gateway workers={args.workers}; wrk -t1, {args.warmup}s warm-up, {args.duration}s per cell"
    )
    print(f"/proc/loadavg at start: {load_start}; at end: {load_end}")
    if uses_redis:
        print(
            f"redis: {args.redis_url} (pid {rpid}), key prefix {redis_prefix!r}: "
            f"{redis_keys} keys left by the run (deleted)"
        )
    print()
    redis_col = " redis CPU µs/req |" if uses_redis else ""
    print(
        "| target | c | RPS | p50 ms | p90 ms | p99 ms | errors | gw CPU µs/req | gw RSS MB |"
        f"{redis_col} load1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if uses_redis else ""))
    for r in rows:
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "—"
        rss = f"{r.rss:.0f}" if r.rss is not None else "—"
        rcell = (f" {r.redis_us:.1f} |" if r.redis_us is not None else " — |") if uses_redis else ""
        print(
            f"| {r.target} | {r.conc} | {r.rps:.0f} | {r.p50:.3f} | {r.p90:.3f} | {r.p99:.3f} | {r.errors} "
            f"| {cpu} | {rss} |{rcell} {r.loadavg} |"
        )
    print()
    if ttfts:
        print("| target (c=1, one keep-alive connection) | TTFT p50 ms | TTFT p99 ms | bad streams |")
        print("|---|---|---|---|")
        for name, runs in ttfts.items():
            p50 = " / ".join(f"{r['ttft_p50']:.3f}" for r in runs)
            p99 = " / ".join(f"{r['ttft_p99']:.3f}" for r in runs)
            print(f"| {name} | {p50} | {p99} | {sum(int(r['bad']) for r in runs)} |")
        print()
    for conc in sorted({r.conc for r in rows}):
        d, n, g = (
            _cells(rows, name, conc)
            for name in ("direct (nginx static)", "nginx proxy_pass", "fastpath-gateway")
        )
        if d and n and g:
            print(
                f"c={conc}: gateway RPS / direct = {_ratios(g, d)}; gateway RPS / nginx proxy = "
                f"{_ratios(g, n)}; added p50 vs direct = "
                + ", ".join(f"{x.p50 - y.p50:.3f} ms" for x, y in zip(g, d, strict=False))
            )
        for name in (GW, GW_LOCAL, GW_REDIS):
            a = _cells(rows, name, conc)
            if a and d:
                print(f"c={conc}: {name} added latency vs direct: {_added(a, d)}")
        for name in (GW, GW_LOCAL, GW_REDIS):
            a, base = _cells(rows, name, conc), _cells(rows, name + BASE, conc)
            if a and base:
                print(
                    f"c={conc}: {name} this tree vs {args.baseline_tree}, interleaved: CPU/request ratio = "
                    f"{_cpu_ratios(a, base)}; RPS ratio = {_ratios(a, base)}"
                )
        for name in (GW, GW_LOCAL, GW_REDIS):
            a, off, scr = (_cells(rows, name + x, conc) for x in ("", METRICS_OFF, SCRAPED))
            if a and off:
                print(
                    f"c={conc}: {name} metrics on vs off, interleaved: CPU/request = "
                    + ", ".join(
                        f"{x.cpu_us - y.cpu_us:+.2f} µs"
                        for x, y in zip(a, off, strict=False)
                        if x.cpu_us and y.cpu_us
                    )
                    + "; p99 on/off = "
                    + ", ".join(f"{x.p99:.3f}/{y.p99:.3f} ms" for x, y in zip(a, off, strict=False))
                )
            if a and scr:
                print(
                    f"c={conc}: {name} scraped every {args.scrape_ms} ms ({scraper.count} scrapes in all) "
                    "vs not: p99 = "
                    + ", ".join(f"{x.p99:.3f}/{y.p99:.3f} ms" for x, y in zip(scr, a, strict=False))
                )
        for name in (GW_LOCAL, GW_REDIS):
            a = _cells(rows, name, conc)
            if a and g:
                print(
                    f"c={conc}: {name} vs {GW}, same run: CPU/request ratio = {_cpu_ratios(a, g)}; "
                    f"RPS ratio = {_ratios(a, g)}"
                )
        a, loc = _cells(rows, GW_REDIS, conc), _cells(rows, GW_LOCAL, conc)
        if a:
            print(
                f"c={conc}: redis-server CPU per request of {GW_REDIS} = "
                + ", ".join(f"{x.redis_us:.1f} µs" for x in a if x.redis_us is not None)
                + (
                    f"; gateway+redis CPU/request vs {GW} = "
                    + ", ".join(
                        f"{(x.cpu_us + (x.redis_us or 0)) / y.cpu_us:.2f}"
                        for x, y in zip(a, g, strict=False)
                        if x.cpu_us and y.cpu_us
                    )
                    if g
                    else ""
                )
                + (f"; RPS redis / local limits = {_ratios(a, loc)}" if loc else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
