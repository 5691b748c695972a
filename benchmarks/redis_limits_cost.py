"""What one limits decision costs Redis, in Redis CPU (issue 19 items 1 and 2).

Drives the real stores (`RedisStore`, the leased store) in process against a private
redis-server started for the run (its CPU and command counts are this benchmark's alone): `c`
coroutines each decide then settle `n / c` requests of one key under a tier. Reports, per
decision and per request (decision + settlement, + leased grants and returns amortized):

- Redis CPU from /proc/<redis pid>/stat (utime + stime: Lua, commands *and* the socket I/O),
- the Lua time Redis accounts in `INFO commandstats` (evalsha/eval `usec`),
- script calls per request,
- decisions/s of the driver (decide + settle in this one process: `local` beside `leased` shows
  what the leased bookkeeping costs the worker).

Usage: .venv/bin/python benchmarks/redis_limits_cost.py [-n 20000] [-c 1,16]
       [--plan rpm|rpm_tpm|bench] [--mode exact,leased]
`bench` is the tier of benchmarks/proxy_overhead.py (rpm + tpm + max_concurrent); leased mode
keeps max_concurrent exact (one script call per request remains), so `--plan rpm_tpm` shows
leased on its own. Prints a markdown table with /proc/loadavg.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from _common import free_port, loadavg
from gateway import config as config_mod
from gateway.pipeline.limits import LimitsStage
from gateway.principal import Principal
from gateway.quota import Lease

TICK = os.sysconf("SC_CLK_TCK")
PLANS = {
    "rpm": "{rpm: 100000000}",
    "rpm_tpm": "{rpm: 100000000, tpm: 100000000}",
    "bench": "{rpm: 100000000, tpm: 100000000, max_concurrent: 100000}",
}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def config(port: int, plan: str, mode: str) -> config_mod.Config:
    tier = PLANS[plan]
    if mode == "leased":
        tier = tier[:-1] + ", mode: leased}"
    if mode == "local":  # the per-worker limiter: what the leased path's Python costs beside it
        return config_mod.parse(
            "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\n"
            f"models: [{{name: m, provider: p}}]\ntiers: {{pro: {tier}}}\n"
        )
    return config_mod.parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\n"
        "models: [{name: m, provider: p}]\n"
        f"tiers: {{pro: {tier}}}\n"
        f"limits: {{backend: redis, redis: {{url: 'redis://127.0.0.1:{port}/0', on_error: fail_closed, "
        "timeout_ms: 2000}}\n"
    )


async def commandstats(client: object) -> tuple[int, int]:
    """(script calls, their usec) so far."""
    info = (await client.execute("INFO", "commandstats")).decode()  # type: ignore[attr-defined]
    calls = usec = 0
    for m in re.finditer(r"cmdstat_(evalsha|eval|fcall):calls=(\d+),usec=(\d+)", info):
        calls += int(m.group(2))
        usec += int(m.group(3))
    return calls, usec


async def run(port: int, pid: int, plan_name: str, mode: str, conc: int, n: int) -> dict[str, float]:
    from gateway import redis_resp

    cfg = config(port, plan_name, mode)
    stage = LimitsStage(cfg)
    loop = asyncio.get_running_loop()
    stage.store.start(loop)
    principal = Principal("bench", b"", "", "pro", cfg.tiers["pro"], None, float("inf"), False)
    plan = stage.plan(principal, "m")
    tokens = 100 if plan.tpm_limits else 0
    admin = redis_resp.Redis(f"redis://127.0.0.1:{port}/0", timeout_s=5, connect_timeout_s=5)
    store = stage.store

    async def one() -> None:
        d = await store.decide(plan, tokens, 0)
        assert d.refused < 0
        lease = Lease("bench", plan, 50, tokens, 0)
        lease.holder, lease.member, lease.day, lease.month = d.holder, d.member, d.day, d.month
        d.holder.settle(lease, 30 if tokens else 0, 0)  # a response that used 70 of 100 tokens

    async def worker(k: int) -> None:
        for _ in range(k):
            await one()

    await asyncio.gather(*(worker(200 // conc + 1) for _ in range(conc)))  # warm-up
    await stage.settled()
    calls0, usec0 = await commandstats(admin)
    cpu0 = cpu_s(pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
    await stage.settled()
    await stage.close()  # leased: what is unused goes back (counted: part of the cost)
    wall = time.perf_counter() - t0
    cpu1 = cpu_s(pid)
    calls1, usec1 = await commandstats(admin)
    await admin.execute("FLUSHALL")
    await admin.close()
    total = n // conc * conc
    return {
        "rps": total / wall,
        "cpu_us": (cpu1 - cpu0) / total * 1e6,
        "lua_us": (usec1 - usec0) / total,
        "calls": (calls1 - calls0) / total,
        "lua_per_call": (usec1 - usec0) / max(1, calls1 - calls0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="requests per cell")
    ap.add_argument("-c", default="1,16", help="concurrency levels")
    ap.add_argument("--plan", default="rpm_tpm", choices=sorted(PLANS))
    ap.add_argument("--mode", default="exact,leased", help="any of local,exact,leased")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{version}; plan {args.plan} = tier {PLANS[args.plan]}; n={args.n}; loadavg {loadavg()}")
        print()
        print(
            "| mode | c | decisions/s | Redis CPU µs/req | Lua µs/req | script calls/req | Lua µs/call "
            "| load1 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for _ in range(args.rounds):
            for conc in (int(c) for c in args.c.split(",")):
                for mode in args.mode.split(","):
                    r = asyncio.run(run(port, proc.pid, args.plan, mode, conc, args.n))
                    print(
                        f"| {mode} | {conc} | {r['rps']:.0f} | {r['cpu_us']:.1f} | {r['lua_us']:.1f} "
                        f"| {r['calls']:.3f} | {r['lua_per_call']:.1f} | {loadavg().split()[0]} |",
                        flush=True,
                    )
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
