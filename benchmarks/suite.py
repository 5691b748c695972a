"""The comparative suite: every scenario and every baseline of PERFORMANCE.md in one run, one report.

    .venv/bin/python benchmarks/suite.py [--quick] [--out benchmarks/results/<date>-suite.md]

Starts, on this machine and in this run: an upstream nginx (static, never the bottleneck: a fixed
366-byte chat.completion; a static SSE stream of 256 chunks; one of 64 chunks), a second nginx doing
`proxy_pass` to it (keep-alive pool, buffering off), fastpath-gateway (1 worker) three times (auth off;
auth + local limits; auth + Redis limits) and the LiteLLM proxy (`benchmarks/litellm_baseline.py`, the
pinned version in `.venv-litellm`, `make bench-litellm`). Scenarios:

1. non-streamed small request: direct, nginx, LiteLLM, gateway (wrk, c=1 and c=16);
2. streamed 256-chunk response: the same four (wrk for RPS/CPU, c=1 and c=16; plus a c=1 SSE client
   that timestamps the first content event: TTFT); the 64-chunk stream for the CPU target (c=16);
3. auth + local limits on (gateway; JSON; c=1, c=16);
4. auth + Redis limits on (gateway; JSON; c=1, c=16; a private redis-server started for the run, or
   --redis-url; fresh key prefix, deleted; Redis CPU, reads and script calls per request);
5. Triton upstream (the CPU test LLM) direct vs through the gateway: `benchmarks/triton_stream.py` as a
   subprocess (its --json), the gateway's RSS sampled here from /proc while it runs.

Every wrk response is checked by a Lua `response()` hook (status 200 and the expected content; for
streams the last token and `[DONE]`); the SSE client checks the whole text of every stream. CPU per
request = utime+stime of the target's process tree (/proc) over the cell / requests completed; for
`direct` that is the upstream nginx, for `nginx proxy_pass` the proxy nginx. RSS = the target's
worker processes (VmRSS; all of a multi-worker server's workers summed). Between cells the suite
waits until the servers are idle (LiteLLM keeps working off the streams wrk abandons). A full run takes
about 8 minutes, --quick about 3. Not run in CI; needs wrk and nginx (`make bench-deps`), redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import litellm_baseline as lb  # noqa: E402
import proxy_overhead as po  # noqa: E402  (read-only: helpers and the request/response bodies)

JSON_CONTENT = "Hello! How can I help you today?"
GW, GW_LOCAL, GW_REDIS, LITELLM, NGINX = (
    "fastpath-gateway",
    "fastpath-gateway +auth+limits",
    "fastpath-gateway +auth+redis limits",
    "LiteLLM proxy",
    "nginx proxy_pass",
)
STREAM_REQ = po.STREAM_REQUEST.replace('"model":"bench"', '"model":"bench-stream"')
STREAM64_REQ = po.STREAM_REQUEST.replace('"model":"bench"', '"model":"bench-stream64"')


def expected_stream_text(chunks: int) -> str:
    return "".join(f"tok{i} " for i in range(chunks - 2))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def workers_of(pid: int) -> list[int]:
    """A server's worker processes: its descendants (minus multiprocessing's resource tracker),
    or the process itself when it has none."""
    kids = []
    for p in po.tree(pid)[1:]:
        try:
            if "resource_tracker" in Path(f"/proc/{p}/cmdline").read_text():
                continue
        except OSError:
            continue
        kids.append(p)
    return kids or [pid]


# ------------------------------------------------------------------------------------------- wrk

LUA_CHECK = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{auth}
wrk.body = [[{body}]]
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 {checks} then bad = bad + 1 end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  io.write("BAD " .. b .. "\\n")
end
"""


def lua_script(path: Path, body: str, key: str | None, needles: list[str]) -> Path:
    checks = "".join(f' or not string.find(body, "{n}", 1, true)' for n in needles)
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    path.write_text(LUA_CHECK.format(auth=auth, body=body, checks=checks))
    return path


@dataclass
class WrkResult:
    rps: float
    p50: float
    p90: float
    p99: float
    pmax: float
    errors: int
    bad: int
    total: int


def run_wrk(url: str, conc: int, duration: float, script: Path) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conc}",
            f"-d{duration:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = {p: po.to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    errs = 0
    if m2 := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errs += int(m2.group(1))
    if m2 := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errs += sum(int(x) for x in m2.groups())
    bad = int(re.search(r"BAD (\d+)", out).group(1)) if "BAD " in out else -1  # type: ignore[union-attr]
    return WrkResult(
        rps,
        pct.get("50", 0),
        pct.get("90", 0),
        pct.get("99", 0),
        po.to_ms(m.group(1)) if m else float("nan"),
        errs,
        bad,
        total,
    )


# ------------------------------------------------------------------------------ SSE client (TTFT)


def sse_client(port: int, body: str, key: str | None, n: int, chunks: int) -> dict[str, float]:
    """c=1, one keep-alive connection (TCP_NODELAY): per stream, TTFT (send -> first content token
    seen) and total (send -> end of body); every stream's whole text is checked."""
    want = expected_stream_text(chunks)
    first = b"tok0 "
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        + (f"Authorization: Bearer {key}\r\n" if key else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body.encode()
    sock: socket.socket | None = None
    ttft: list[float] = []
    total: list[float] = []
    bad = 0
    for _ in range(n):
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.sendall(head)
        buf = b""
        t_first = 0.0
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        hdr, _, raw = buf.partition(b"\r\n\r\n")
        lower = hdr.lower()
        chunked = b"transfer-encoding: chunked" in lower
        clen = re.search(rb"content-length:\s*(\d+)", lower)
        close = b"connection: close" in lower
        if first in raw:
            t_first = time.perf_counter()

        need = int(clen.group(1)) if clen and not chunked else None

        def complete(raw: bytes, chunked: bool = chunked, need: int | None = need) -> bool:
            return raw.endswith(b"0\r\n\r\n") if chunked else need is not None and len(raw) >= need

        while not complete(raw):
            data = sock.recv(65536)
            if not data:
                break
            raw += data
            if not t_first and first in raw[-len(data) - len(first) :]:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        if chunked:
            payload, rest = b"", raw
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                payload += rest[:size]
                rest = rest[size + 2 :]
        else:
            payload = raw
        text, done = [], False
        for line in payload.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            text += [
                (ch.get("delta") or {}).get("content") or "" for ch in json.loads(data).get("choices") or ()
            ]
        ok = b" 200 " in hdr.split(b"\r\n", 1)[0] and done and "".join(text) == want and t_first
        if not ok:
            bad += 1
        else:
            ttft.append((t_first - t0) * 1e3)
            total.append((t_end - t0) * 1e3)
        if close or not ok:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()

    def q(v: list[float], p: float) -> float:
        return statistics.quantiles(v, n=100, method="inclusive")[int(p) - 1] if len(v) > 1 else float("nan")

    return {
        "n": n,
        "bad": bad,
        "ttft_p50": q(ttft, 50),
        "ttft_p99": q(ttft, 99),
        "total_p50": q(total, 50),
        "total_p99": q(total, 99),
    }


# ---------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int
    key: str | None
    cpu_pids: list[int] = field(default_factory=list)  # whole tree, for CPU
    rss_pids: list[int] = field(default_factory=list)  # workers, for RSS
    idle_rss: float | None = None


@dataclass
class Row:
    scenario: str
    target: str
    conc: int
    wrk: WrkResult
    cpu_us: float | None
    rss: float | None
    load1: str
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.wrk.errors == 0 and self.wrk.bad == 0 and self.extra.get("sse_bad", 0) == 0


ALL_PIDS: list[int] = []


def settle(max_s: float = 10.0) -> None:
    """Wait until the servers under test are about idle (<= 10 % of a core over 0.5 s): a slow target
    still working off requests that wrk abandoned at the end of a cell must not eat into the next one."""
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        c0 = po.proc_cpu_s(ALL_PIDS)
        time.sleep(0.5)
        if po.proc_cpu_s(ALL_PIDS) - c0 <= 0.05:
            return


def cell(
    scenario: str, t: Target, conc: int, body: str, needles: list[str], args: argparse.Namespace, tmp: Path
) -> Row:
    script = lua_script(tmp / f"{secrets.token_hex(4)}.lua", body, t.key, needles)
    url = f"http://127.0.0.1:{t.port}/v1/chat/completions"
    # LiteLLM needs ~0.2 s of CPU per 256-chunk stream: at c=16 a short cell would see no stream end
    duration = (
        max(args.duration, 8 if args.quick else 12)
        if t.name == LITELLM and scenario.startswith("streamed")
        else args.duration
    )
    settle()
    if args.warmup:
        run_wrk(url, conc, args.warmup, script)
        settle()
    extra: dict[str, float] = {}
    r0 = args.redis_cmds() if scenario == "auth + Redis limits" else None
    rc0 = po.proc_cpu_s([args.redis_pid]) if r0 is not None else 0.0
    c0 = po.proc_cpu_s(t.cpu_pids)
    w = run_wrk(url, conc, duration, script)
    cpu = (po.proc_cpu_s(t.cpu_pids) - c0) / w.total * 1e6 if w.total else None
    if r0 is not None and w.total:
        r1 = args.redis_cmds()
        for k in ("reads", "scripts", "cmds"):
            extra[f"redis_{k}_per_req"] = (r1[k] - r0[k]) / w.total
        extra["redis_cpu_us"] = (po.proc_cpu_s([args.redis_pid]) - rc0) / w.total * 1e6
    row = Row(scenario, t.name, conc, w, cpu, po.rss_mb(t.rss_pids), loadavg().split()[0], extra)
    print(
        f"  {scenario:22} {t.name:28} c={conc:<3} rps={w.rps:>8.0f} p50={w.p50:.3f}ms p99={w.p99:.3f}ms "
        f"cpu={cpu or 0:.0f}us rss={row.rss:.0f}MB err={w.errors} bad={w.bad} load={row.load1}",
        flush=True,
    )
    return row


def nginx_confs(tmp: Path, ports: dict[str, int]) -> tuple[Path, Path]:
    (tmp / "s256").mkdir()
    (tmp / "s64").mkdir()
    (tmp / "s256" / "stream.sse").write_text(po.sse_body(256))
    (tmp / "s64" / "stream.sse").write_text(po.sse_body(64))
    body = po.BODY.replace("'", "\\'")
    common = f"""
worker_processes 1;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
"""

    def sse_server(port: int, root: Path) -> str:
        # POST to a static file is a 405 in nginx: answer it with the file.
        return (
            f"  server {{ listen 127.0.0.1:{port}; root {root}; types {{ text/event-stream sse; }}\n"
            "    location / { try_files /stream.sse =404; error_page 405 =200 /stream.sse; } }\n"
        )

    up = (
        common
        + f"  server {{ listen 127.0.0.1:{ports['up_json']};\n"
        + f"    location / {{ default_type application/json; return 200 '{body}'; }} }}\n"
        + sse_server(ports["up_s256"], tmp / "s256")
        + sse_server(ports["up_s64"], tmp / "s64")
        + "}\n"
    )
    px = common
    for kind in ("json", "s256", "s64"):
        px += (
            f"  upstream u_{kind} {{ server 127.0.0.1:{ports['up_' + kind]}; keepalive 64; }}\n"
            f"  server {{ listen 127.0.0.1:{ports['px_' + kind]}; location / {{ proxy_pass http://u_{kind};"
            ' proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } }\n'
        )
    px += "}\n"
    (tmp / "up").mkdir()
    (tmp / "px").mkdir()
    (tmp / "up.conf").write_text(f"pid {tmp}/up/nginx.pid;\nerror_log {tmp}/up/error.log warn;\n" + up)
    (tmp / "px.conf").write_text(f"pid {tmp}/px/nginx.pid;\nerror_log {tmp}/px/error.log warn;\n" + px)
    return tmp / "up.conf", tmp / "px.conf"


class RssSampler(threading.Thread):
    """Peak RSS of the gateway that a subprocess (triton_stream.py) starts, sampled from /proc."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.first, self.stop = root, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for p in po.tree(self.root):
                try:
                    cmd = Path(f"/proc/{p}/cmdline").read_text()
                except OSError:
                    continue
                if "gateway.cli" in cmd and "serve" in cmd:
                    rss = po.rss_mb(workers_of(p))
                    self.first = self.first or rss
                    self.peak = max(self.peak, rss)


def triton_scenario(args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / "triton.json"
    cmd = [str(REPO / ".venv/bin/python"), str(HERE / "triton_stream.py"), "--json", str(out), "--conc", "1"]
    cmd += ["--transport", "h2"]  # the gateway's default Triton transport (triton_stream.py's is grpcio)
    cmd += (
        ["--quick", "--delay-ms", "0"]
        if args.quick
        else ["--delay-ms", "0,10", "--rounds", "4", "--streams", "40", "--warmup", "2", "--repeat-c1", "1"]
    )
    if not (REPO / ".venv-triton/bin/python").exists():
        return {"skipped": "no .venv-triton (make triton-venv)", "cmd": cmd}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=600)
    sampler.stop.set()
    res: dict = {"cmd": cmd, "rc": proc.returncode, "wall_s": time.monotonic() - t0}
    res["rss_peak"], res["rss_first"] = sampler.peak, sampler.first
    if proc.returncode != 0 or not out.exists():
        res["error"] = (stderr or stdout)[-1500:]
        return res
    res.update(json.loads(out.read_text()))
    print(stderr, file=sys.stderr)
    return res


# ----------------------------------------------------------------------------------------- report


def fmt(v: float | None, nd: int = 0) -> str:
    return "—" if v is None or v != v else f"{v:.{nd}f}"


def versions(litellm_version: str | None) -> str:
    from gateway import BUILD_PROFILE, __version__

    def cmd_out(*c: str) -> str:
        try:
            r = subprocess.run(c, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    granian = cmd_out(str(REPO / ".venv/bin/python"), "-c", "import granian; print(granian.__version__)")
    return (
        f"fastpath-gateway {__version__} ({BUILD_PROFILE} build; granian {granian}, 1 worker); "
        f"{cmd_out(shutil.which('nginx') or '/usr/sbin/nginx', '-v')}; {cmd_out('wrk', '-v')}; "
        f"LiteLLM {litellm_version or 'not installed'} (litellm[proxy], `.venv-litellm`, "
        f"{lb.WORKERS} uvicorn workers); {cmd_out('redis-server', '--version')}"
    )


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return (
        f"{os.cpu_count()} vCPU ({model}), {int(mem) // 1024 // 1024} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; no CPU pinning (2 shared cores: "
        "pinning wrk, the upstream and the proxy apart is not possible without starving one)"
    )


def render(
    rows: list[Row],
    sse: dict[tuple[str, str], dict[str, float]],
    triton: dict,
    meta: dict[str, str],
    targets: dict[str, Target],
) -> str:
    L: list[str] = []
    a = L.append
    a(f"<!-- command: {meta['command']}  ({meta['elapsed']}) -->")
    a(f"# Comparative suite: fastpath-gateway vs direct, nginx proxy_pass, LiteLLM ({meta['date']})")
    a("")
    a(f"**Command.** `{meta['command']}` — {meta['elapsed']} wall.")
    a("")
    a(f"**Machine.** {machine()}.")
    a(
        f"/proc/loadavg at start: {meta['load_start']}; at end: {meta['load_end']} "
        "(per-cell load1 in the tables)."
    )
    a("")
    a(f"**Versions.** {meta['versions']}.")
    a("")
    a(
        f"**Method.** Closed loop, `wrk -t1` (Lua hook checks every response), {meta['warmup']} s warm-up + "
        f"{meta['duration']} s per cell, c=1 and c=16, one pass, all targets in the same run (each on its "
        "own port, all running throughout). Upstream: a separate nginx (1 worker) with a fixed 366-byte "
        "chat.completion, a static 256-chunk SSE stream (role chunk, 254 content chunks, finish chunk, usage "
        "chunk, `[DONE]`; 39 KB) and the same with 64 chunks. `nginx proxy_pass`: a second nginx (1 worker, "
        "keep-alive pool of 64, buffering off). fastpath-gateway: 1 granian worker; `+auth+limits`: API-key "
        "auth and local RPM/TPM/concurrency limits on; `+auth+redis limits`: the same tiers with "
        "`limits.backend: redis` (fail_closed; fresh key prefix; a private redis-server 7 started for "
        "the run, so its CPU and counters are this gateway's alone). LiteLLM: see "
        "`benchmarks/litellm_baseline.py` (2 uvicorn workers, no DB, logging off, master key, local cost "
        "map). CPU per request = utime+stime of the target's whole process tree over the cell / "
        "requests (for `direct` the upstream nginx, for `nginx proxy_pass` the proxy nginx; 10 ms ticks); "
        "RSS = the target's worker processes at the end of the cell (summed over LiteLLM's 2 workers). "
        "`ok` = no socket errors, no non-2xx, every response's content checked. LiteLLM's streamed cells "
        f"run {max(float(meta['duration']), 8 if meta.get('quick') else 12):g} s (at c=16 a 256-chunk "
        "stream takes it > 1 s), and the suite waits for every server to be "
        "idle before each cell."
    )
    a("")
    a("## Key ratios (fastpath-gateway / baseline, same run)")
    a("")
    a(key_ratios(rows, sse))
    a("")
    scen_order = list(dict.fromkeys(r.scenario for r in rows))
    for scen in scen_order:
        a(f"## {scen}")
        a("")
        redis = scen == "auth + Redis limits"
        a(
            "| target | c | RPS | p50 ms | p90 ms | p99 ms | max ms | added p50 ms | added p99 ms "
            "| CPU µs/req | RSS MB | errors | ok | load1 |"
            + (
                " Redis round trips/req | scripts/req | cmds/req (incl. in scripts) | Redis CPU µs/req |"
                if redis
                else ""
            )
        )
        a("|---" * (14 + (4 if redis else 0)) + "|")
        for r in (r for r in rows if r.scenario == scen):
            d = direct_row(rows, scen, r.conc)
            add50 = r.wrk.p50 - d.wrk.p50 if d and r.target != "direct" else None
            add99 = r.wrk.p99 - d.wrk.p99 if d and r.target != "direct" else None
            a(
                f"| {r.target} | {r.conc} | {r.wrk.rps:.0f} | {r.wrk.p50:.3f} | {r.wrk.p90:.3f} "
                f"| {r.wrk.p99:.3f} "
                f"| {r.wrk.pmax:.2f} | {fmt(add50, 3)} | {fmt(add99, 3)} | {fmt(r.cpu_us)} | {fmt(r.rss)} "
                f"| {r.wrk.errors} | {'yes' if r.correct else f'NO ({r.wrk.bad} bad)'} | {r.load1} |"
                + (
                    " "
                    + " | ".join(
                        fmt(r.extra.get(f"redis_{k}"), 1 if k == "cpu_us" else 2)
                        for k in ("reads_per_req", "scripts_per_req", "cmds_per_req", "cpu_us")
                    )
                    + " |"
                    if redis
                    else ""
                )
            )
        a("")
        if scen.startswith("streamed"):
            chunks = 256 if "256" in scen else 64
            s = {k[1]: v for k, v in sse.items() if k[0] == scen}
            if s:
                a(
                    f"SSE client, c=1, one keep-alive connection, {next(iter(s.values()))['n']:.0f} "
                    f"streams per target, every stream's text checked ({chunks - 2} content tokens + "
                    "`[DONE]`); TTFT = send → the first content token read:"
                )
                a("")
                a(
                    "| target | TTFT p50 ms | TTFT p99 ms | added TTFT p50 | added TTFT p99 | total p50 ms "
                    "| total p99 ms | bad streams |"
                )
                a("|---|---|---|---|---|---|---|---|")
                dd = s.get("direct")
                for name, v in s.items():
                    a(
                        f"| {name} | {v['ttft_p50']:.3f} | {v['ttft_p99']:.3f} "
                        f"| {fmt(v['ttft_p50'] - dd['ttft_p50'], 3) if dd and name != 'direct' else '—'} "
                        f"| {fmt(v['ttft_p99'] - dd['ttft_p99'], 3) if dd and name != 'direct' else '—'} "
                        f"| {v['total_p50']:.3f} | {v['total_p99']:.3f} | {v['bad']:.0f} |"
                    )
                a("")
        a(ratios(rows, scen))
        a("")
    a("## Triton upstream (CPU test LLM): tritonclient direct vs through the gateway")
    a("")
    a(triton_section(triton))
    a("")
    a("## Idle RSS (after start, before any load)")
    a("")
    a(
        ", ".join(f"{t.name}: {fmt(t.idle_rss)} MB" for t in targets.values() if t.idle_rss is not None)
        + f". fastpath-gateway requests served in this run: {meta['gw_requests']}; its RSS at the end "
        f"{meta['gw_rss_end']} MB."
    )
    a("")
    a("## PERFORMANCE.md targets: met / not met (this run)")
    a("")
    a("| measure | target | this run | verdict |")
    a("|---|---|---|---|")
    for line in targets_table(rows, sse, triton, targets, meta):
        a(line)
    a("")
    return "\n".join(L)


def key_ratios(rows: list[Row], sse: dict[tuple[str, str], dict[str, float]]) -> str:
    out = []
    for scen, gname in (
        ("non-streamed", GW),
        ("auth + local limits", GW_LOCAL),
        ("streamed 256 chunks", GW),
        ("streamed 64 chunks", GW),
    ):
        base = "non-streamed" if scen.startswith("auth") else scen
        for conc in (1, 16):
            g = find(rows, scen, gname, conc)
            if not g:
                continue
            parts = []
            for bname in ("direct", NGINX, LITELLM):
                b = find(rows, base, bname, conc)
                if not b or not b.wrk.rps:
                    continue
                cpu = f"CPU/req {g.cpu_us / b.cpu_us:.3g}x" if g.cpu_us and b.cpu_us else "CPU/req —"
                if bname == LITELLM and g.cpu_us and b.cpu_us:
                    cpu = (
                        f"CPU/req {g.cpu_us / b.cpu_us:.2g}x (LiteLLM spends {b.cpu_us / g.cpu_us:.0f}x more)"
                    )
                parts.append(
                    f"vs {bname}: RPS {g.wrk.rps / b.wrk.rps:.3g}x, {cpu}, "
                    f"p50 {g.wrk.p50 - b.wrk.p50:+.3f} ms"
                )
            out.append(
                f"- {scen}, c={conc}, {gname} ({g.wrk.rps:.0f} RPS, {fmt(g.cpu_us)} µs CPU/req, "
                f"{fmt(g.rss)} MB): " + "; ".join(parts)
            )
    s = {k[1]: v for k, v in sse.items() if k[0] == "streamed 256 chunks"}
    if GW in s:
        g = s[GW]
        out.append(
            "- streamed 256 chunks, c=1 TTFT p50 added by: "
            + ", ".join(
                f"{n} {v['ttft_p50'] - s['direct']['ttft_p50']:+.3f} ms"
                for n, v in s.items()
                if n != "direct" and "direct" in s
            )
            + (
                f"; LiteLLM / gateway TTFT p50 = {s[LITELLM]['ttft_p50'] / g['ttft_p50']:.0f}x"
                if LITELLM in s
                else ""
            )
        )
    return "\n".join(out)


def direct_row(rows: list[Row], scen: str, conc: int) -> Row | None:
    base = "non-streamed" if scen.startswith("auth") else scen
    return next((r for r in rows if r.scenario == base and r.target == "direct" and r.conc == conc), None)


def find(rows: list[Row], scen: str, target: str, conc: int) -> Row | None:
    return next((r for r in rows if r.scenario == scen and r.target == target and r.conc == conc), None)


def ratios(rows: list[Row], scen: str) -> str:
    out = []
    gw_name = {"auth + local limits": GW_LOCAL, "auth + Redis limits": GW_REDIS}.get(scen, GW)
    base_scen = "non-streamed" if scen.startswith("auth") else scen
    for conc in sorted({r.conc for r in rows if r.scenario == scen}):
        g = find(rows, scen, gw_name, conc)
        if not g:
            continue
        parts = []
        for bname in ("direct", NGINX, LITELLM, GW, GW_LOCAL):
            b = find(rows, base_scen, bname, conc) or find(rows, scen, bname, conc)
            if not b or b is g or not b.wrk.rps or (bname in (GW, GW_LOCAL) and not scen.startswith("auth")):
                continue
            if bname == GW_LOCAL and scen != "auth + Redis limits":
                continue
            cpu = f", CPU/req x{g.cpu_us / b.cpu_us:.3g}" if g.cpu_us and b.cpu_us else ""
            lat = f", p50 x{g.wrk.p50 / b.wrk.p50:.3g}" if b.wrk.p50 else ""
            parts.append(f"vs {bname}: RPS x{g.wrk.rps / b.wrk.rps:.3g}{lat}{cpu}")
        out.append(f"- c={conc}, {gw_name}: " + "; ".join(parts))
    return "Ratios (gateway / baseline, same run):\n" + "\n".join(out)


def triton_section(t: dict) -> str:
    if "skipped" in t:
        return f"Not run: {t['skipped']}."
    if "error" in t:
        return f"`{' '.join(t['cmd'][1:])}` failed (rc {t['rc']}):\n\n```\n{t['error']}\n```"
    lines = [
        f"`.venv/bin/python benchmarks/triton_stream.py {' '.join(t['cmd'][2:])}` "
        f"(subprocess, {t['wall_s']:.0f} s; 48-token streams — the test model's maximum; 1 gateway worker, "
        f"Triton transport `{t['cells'][0]['transport'] if t.get('cells') else '?'}`). Gateway RSS sampled "
        f"every 0.5 s from /proc: first {t['rss_first']:.0f} MB, peak {t['rss_peak']:.0f} MB. "
        "`ok` = every stream's text equal on both paths.",
        "",
        "| cell | streams/path | TTFT p50 direct → gw (added) | TTFT p99 (added) | ITL p50 (added) "
        "| ITL p99 (added) | total p50 (added) | gw CPU µs/stream | gw CPU µs/token | RSS peak MB | errors "
        "| ok | load after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in t["cells"]:
        d, g = c["direct"], c["gateway"]

        cpu = g["gateway_cpu_us_per_stream_net"]

        def dg(k: str, d: dict = d, g: dict = g) -> str:
            return f"{d[k]:.3f} → {g[k]:.3f} ({g[k] - d[k]:+.3f})"

        lines.append(
            f"| c={c['conc']}, {c['delay_ms']} ms/token, `{c['model']}` | {g['streams']:.0f} "
            f"| {dg('ttft_p50')} | {dg('ttft_p99')} | {dg('itl_p50')} | {dg('itl_p99')} | {dg('total_p50')} "
            f"| {cpu:.0f} | {cpu / c['tokens']:.0f} "
            f"| {t['rss_peak']:.0f} | 0 | {'yes' if c['text_equal'] else 'NO'} | {c['load_after']} |"
        )
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


def targets_table(
    rows: list[Row],
    sse: dict[tuple[str, str], dict[str, float]],
    triton: dict,
    targets: dict[str, Target],
    meta: dict[str, str],
) -> list[str]:
    out = []
    js = "non-streamed"
    loc16, loc1 = (
        find(rows, "auth + local limits", GW_LOCAL, 16),
        find(rows, "auth + local limits", GW_LOCAL, 1),
    )
    if loc16:
        ok = loc16.cpu_us is not None and loc16.cpu_us <= 150
        out.append(
            f"| gateway CPU per non-streamed request, auth + local limits on | ≤ 150 µs (moonshot ≤ 100) "
            f"| {fmt(loc16.cpu_us)} µs at c=16 ({fmt(loc1.cpu_us if loc1 else None)} µs at c=1); "
            f"nginx {fmt(getattr(find(rows, js, NGINX, 16), 'cpu_us', None))} µs, LiteLLM "
            f"{fmt(getattr(find(rows, js, LITELLM, 16), 'cpu_us', None))} µs | {verdict(ok)} |"
        )
    g1, d1, g16, d16 = (
        find(rows, js, GW, 1),
        find(rows, js, "direct", 1),
        find(rows, js, GW, 16),
        find(rows, js, "direct", 16),
    )
    n1, n16 = find(rows, js, NGINX, 1), find(rows, js, NGINX, 16)
    if g1 and d1:
        add = g1.wrk.p50 - d1.wrk.p50
        out.append(
            f"| added latency, non-streamed, c=1 p50 | ≤ 0.15 ms | {add:+.3f} ms (nginx "
            f"+{(n1.wrk.p50 - d1.wrk.p50) if n1 else float('nan'):.3f} ms) | {verdict(add <= 0.15)} |"
        )
    if g16 and d16:
        add = g16.wrk.p99 - d16.wrk.p99
        out.append(
            f"| added latency, non-streamed, c=16 p99 | ≤ 1 ms | {add:+.3f} ms (p99 {g16.wrk.p99:.3f} "
            f"vs direct {d16.wrk.p99:.3f}) | {verdict(add <= 1.0)} |"
        )
    if g16 and n16:
        r = g16.wrk.rps / n16.wrk.rps
        out.append(
            f"| throughput, non-streamed, c=16 | ≥ 0.3x nginx proxy_pass (moonshot ≥ 0.5x) "
            f"| {r:.2f}x ({g16.wrk.rps:.0f} vs {n16.wrk.rps:.0f} RPS) | {verdict(r >= 0.3)} |"
        )
    s = {k[1]: v for k, v in sse.items() if k[0].startswith("streamed 256")}
    if GW in s and "direct" in s:
        a50 = s[GW]["ttft_p50"] - s["direct"]["ttft_p50"]
        a99 = s[GW]["ttft_p99"] - s["direct"]["ttft_p99"]
        tri = ""
        cells = [c for c in triton.get("cells", []) if c["delay_ms"] == 0]
        if cells:
            c = cells[0]
            g, d = c["gateway"], c["direct"]
            tri = (
                f"; Triton c=1, 0 ms/token: p50 {g['ttft_p50'] - d['ttft_p50']:+.3f}, "
                f"p99 {g['ttft_p99'] - d['ttft_p99']:+.3f} ms"
            )
        out.append(
            f"| streaming TTFT added, c=1 | p50 ≤ 0.2 ms, p99 ≤ 0.5 ms "
            f"| nginx static 256-chunk: p50 +{a50:.3f}, p99 +{a99:.3f} ms{tri} "
            f"| {verdict(a50 <= 0.2 and a99 <= 0.5)} |"
        )
    s64 = find(rows, "streamed 64 chunks", GW, 16)
    if s64:
        ok = s64.cpu_us is not None and s64.cpu_us <= 400
        n64 = find(rows, "streamed 64 chunks", NGINX, 16)
        s256 = find(rows, "streamed 256 chunks", GW, 16)
        out.append(
            f"| CPU per streamed response of 64 chunks | ≤ 400 µs (moonshot ≤ 200) "
            f"| {fmt(s64.cpu_us)} µs at c=16 (nginx {fmt(n64.cpu_us if n64 else None)} µs; "
            f"256 chunks: {fmt(s256.cpu_us if s256 else None)} µs) "
            f"| {verdict(ok)} |"
        )
    for conc in (16, 1):
        rd, lo = (
            find(rows, "auth + Redis limits", GW_REDIS, conc),
            find(rows, "auth + local limits", GW_LOCAL, conc),
        )
        if rd and lo:
            r = rd.wrk.rps / lo.wrk.rps
            rt = rd.extra.get("redis_reads_per_req", float("nan"))
            sc = rd.extra.get("redis_scripts_per_req", float("nan"))
            out.append(
                f"| Redis limiter, c={conc} | RPS ≥ 0.8x local limiter; one round trip per decision "
                f"| {r:.2f}x ({rd.wrk.rps:.0f} vs {lo.wrk.rps:.0f} RPS); per request {rt:.2f} Redis reads "
                f"(~round trips), {sc:.2f} script calls "
                f"| RPS {verdict(r >= 0.8)}; one round trip per script call (decision, then settlement): "
                f"{verdict(abs(rt - sc) < 0.05 and sc <= 2.05)} |"
            )
    idle = [t.idle_rss for t in targets.values() if t.name.startswith("fastpath") and t.idle_rss]
    if idle:
        out.append(
            f"| memory: worker RSS idle | ≤ 80 MB | {', '.join(f'{x:.0f}' for x in idle)} MB "
            f"(no auth / +auth local / +auth redis) | {verdict(max(idle) <= 80)} |"
        )
    out.append(
        f"| memory: ≤ +5 % after a 1M-request soak | ≤ +5 % | not a soak: {meta['gw_requests']} requests, "
        f"RSS {meta['gw_rss_idle']} → {meta['gw_rss_end']} MB | not measured |"
    )
    out.append(
        "| Rust pieces (token counting, SSE parsing, bucket decision) | vs tiktoken, ≥ 1 GB/s, ≤ 200 ns "
        "| micro-benchmarks, not part of this suite | not measured |"
    )
    return out


# ------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short cells (~3 min in all)")
    ap.add_argument("--duration", type=float, help="seconds per cell (default 8, --quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 2, --quick 1)")
    ap.add_argument("--streams", type=int, help="SSE-client streams per target (default 200, --quick 60)")
    ap.add_argument(
        "--redis-url",
        help="an existing Redis for the Redis-limits scenario (default: a private redis-server started for "
        "the run, so that its CPU and command counts are the gateway's alone)",
    )
    ap.add_argument("--engine", choices=["granian", "uvloop"], help="the gateways' server engine")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.duration = args.duration or (3 if args.quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.streams = args.streams or (40 if args.quick else 200)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    out_path = args.out or HERE / "results" / f"{date}-suite.md"
    command = ".venv/bin/python benchmarks/suite.py" + "".join(
        f" {a}" for a in sys.argv[1:] if not a.startswith("--out") and not a.endswith(".md")
    )
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} not found: run `make bench-deps`")
    litellm_version = None if args.no_litellm else lb.available()
    if not args.no_litellm and not litellm_version:
        print("LiteLLM not installed (make bench-litellm): its rows are left out", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="fpsuite-"))
    tmp.chmod(0o755)
    redis_proc = None
    if not args.redis_url:
        if not shutil.which("redis-server"):
            sys.exit("redis-server not found (or pass --redis-url)")
        rport = po.free_port()
        redis_proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(rport), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(tmp)),
            ],
            stdout=subprocess.DEVNULL,
        )
        args.redis_url = f"redis://127.0.0.1:{rport}/0"
    end = time.monotonic() + 10
    while True:
        try:
            args.redis_pid = po.redis_pid(args.redis_url)
            break
        except OSError as e:
            if time.monotonic() > end:
                sys.exit(f"Redis at {args.redis_url}: {e} (the Redis-limits scenario needs it)")
            time.sleep(0.1)

    def redis_cmds() -> dict[str, int]:
        """Counters of the Redis: reads processed (~ client round trips), script calls (EVAL/EVALSHA/
        FCALL, top level) and all commands (counting those run inside scripts)."""
        info = po.redis_call(args.redis_url, "INFO", "all").decode()

        def num(pat: str) -> int:
            return sum(int(x) for x in re.findall(pat, info))

        return {
            "reads": num(r"total_reads_processed:(\d+)"),
            "scripts": num(r"cmdstat_(?:evalsha|eval|fcall|evalsha_ro|eval_ro):calls=(\d+)"),
            "cmds": num(r"total_commands_processed:(\d+)"),
        }

    args.redis_cmds = redis_cmds
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    ports = {k: po.free_port() for k in ("up_json", "up_s256", "up_s64", "px_json", "px_s256", "px_s64")}
    up_conf, px_conf = nginx_confs(tmp, ports)
    redis_prefix = f"fastpath:suite:{secrets.token_hex(6)}:"
    base_cfg = (
        "server: {host: 127.0.0.1}\nproviders:\n"
        + "".join(
            f"  - {{name: {k}, base_url: 'http://127.0.0.1:{ports['up_' + k]}/v1'}}\n"
            for k in ("json", "s256", "s64")
        )
        + "models:\n  - {name: bench, provider: json, upstream_model: mock-echo}\n"
        "  - {name: bench-stream, provider: s256, upstream_model: mock-echo}\n"
        "  - {name: bench-stream64, provider: s64, upstream_model: mock-echo}\n"
    )
    cfgs = {
        GW: base_cfg,
        GW_LOCAL: base_cfg + po.AUTH_CONFIG,
        GW_REDIS: base_cfg
        + po.AUTH_CONFIG
        + f"limits: {{backend: redis, redis: {{url: '{args.redis_url}', key_prefix: '{redis_prefix}', "
        "on_error: fail_closed}}\n",
    }
    load_start = loadavg()
    t_start = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[Row] = []
    sse: dict[tuple[str, str], dict[str, float]] = {}
    targets: dict[str, Target] = {}
    try:
        ngx_up = subprocess.Popen([nginx, "-p", str(tmp / "up"), "-c", str(up_conf)])
        ngx_px = subprocess.Popen([nginx, "-p", str(tmp / "px"), "-c", str(px_conf)])
        procs += [ngx_up, ngx_px]
        gw_ports = {}
        for name, text in cfgs.items():
            path = tmp / f"gw-{len(gw_ports)}.yaml"
            path.write_text(text)
            gw_ports[name] = po.free_port()
            procs.append(
                subprocess.Popen(
                    [
                        *(str(REPO / ".venv/bin/fastpath-gateway"), "serve", "--config", str(path)),
                        *("--port", str(gw_ports[name]), "--workers", "1", "--log-level", "error"),
                        *(("--engine", args.engine) if args.engine else ()),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        gw_procs = dict(zip(cfgs, procs[2:], strict=True))
        lt_proc = None
        if litellm_version:
            lt_port = po.free_port()
            lt_proc = lb.start(
                {
                    "bench": f"http://127.0.0.1:{ports['up_json']}/v1",
                    "bench-stream": f"http://127.0.0.1:{ports['up_s256']}/v1",
                },
                lt_port,
                tmp,
            )
            procs.append(lt_proc)
        for port in gw_ports.values():
            po.wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", po.REQUEST, po.API_KEY)
        for p in ("up_json", "px_json"):
            po.wait_http(f"http://127.0.0.1:{ports[p]}/v1/chat/completions", po.REQUEST, "")
        if lt_proc:
            lb.wait_ready(lt_port, lt_proc)
        time.sleep(1)

        def tgt(name: str, port: int, key: str | None, proc: subprocess.Popen[bytes]) -> Target:
            t = Target(name, port, key, po.tree(proc.pid), workers_of(proc.pid))
            t.idle_rss = po.rss_mb(t.rss_pids)
            targets[name] = t
            return t

        # per scenario, the port of each target (nginx instances serve every scenario on own ports)
        direct_t = tgt("direct", 0, None, ngx_up)
        nginx_t = tgt(NGINX, 0, None, ngx_px)
        gw_t = {n: tgt(n, gw_ports[n], po.API_KEY if n != GW else None, gw_procs[n]) for n in cfgs}
        lt_t = tgt(LITELLM, lt_port, lb.MASTER_KEY, lt_proc) if lt_proc else None
        ALL_PIDS.extend(p for t in targets.values() for p in t.cpu_pids)
        print(
            f"  idle RSS: {', '.join(f'{t.name} {t.idle_rss:.0f} MB' for t in targets.values())}", flush=True
        )

        def at(t: Target, port: int) -> Target:
            return Target(t.name, port, t.key, t.cpu_pids, t.rss_pids)

        json_needles = [JSON_CONTENT]
        scen_json = [at(direct_t, ports["up_json"]), at(nginx_t, ports["px_json"]), gw_t[GW]]
        if lt_t:
            scen_json.append(lt_t)
        rows += [
            cell("non-streamed", t, c, po.REQUEST, json_needles, args, tmp)
            for c in (1, 16)
            for t in scen_json
        ]
        rows += [
            cell(scen, gw_t[name], c, po.REQUEST, json_needles, args, tmp)
            for scen, name in (("auth + local limits", GW_LOCAL), ("auth + Redis limits", GW_REDIS))
            for c in (1, 16)
        ]
        # streams: 256 chunks (all four targets; LiteLLM's model `bench-stream`), then 64 (CPU target)
        for scen, chunks, key in (("streamed 256 chunks", 256, "s256"), ("streamed 64 chunks", 64, "s64")):
            body = STREAM_REQ if chunks == 256 else STREAM64_REQ
            needles = [f"tok{chunks - 3} ", "[DONE]"]
            ts = [at(direct_t, ports["up_" + key]), at(nginx_t, ports["px_" + key]), gw_t[GW]]
            if lt_t and chunks == 256:
                ts.append(lt_t)
            for t in ts:
                settle()
                sse[(scen, t.name)] = sse_client(t.port, body, t.key, args.streams, chunks)
                v = sse[(scen, t.name)]
                print(
                    f"  {scen:22} {t.name:28} SSE c=1 TTFT p50 {v['ttft_p50']:.3f} p99 {v['ttft_p99']:.3f} "
                    f"total p50 {v['total_p50']:.3f} bad {v['bad']:.0f}",
                    flush=True,
                )
            for conc in (1, 16) if chunks == 256 else (16,):
                for t in ts:
                    r = cell(scen, t, conc, body, needles, args, tmp)
                    r.extra["sse_bad"] = sse[(scen, t.name)]["bad"]
                    rows.append(r)
        gw_rss_end = po.rss_mb(gw_t[GW].rss_pids)
        gw_requests = sum(r.wrk.total for r in rows if r.target == GW)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        print(
            f"  Redis keys under the run's prefix: {po.redis_count_and_delete(args.redis_url, redis_prefix)}"
        )
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(10)
    triton = {"skipped": "--no-triton"} if args.no_triton else triton_scenario(args, tmp)
    elapsed = time.monotonic() - t_start
    meta = {
        "command": command,
        "date": date,
        "elapsed": f"{elapsed // 60:.0f} min {elapsed % 60:.0f} s",
        "load_start": load_start,
        "load_end": loadavg(),
        "versions": versions(litellm_version),
        "warmup": f"{args.warmup:g}",
        "duration": f"{args.duration:g}",
        "quick": "1" if args.quick else "",
        "gw_requests": f"{gw_requests:,}",
        "gw_rss_idle": fmt(gw_t[GW].idle_rss),
        "gw_rss_end": fmt(gw_rss_end),
    }
    report = render(rows, sse, triton, meta, targets)
    out_path.write_text(report)
    print(report)
    print(f"\nwritten: {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
