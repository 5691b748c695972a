"""What one exact limits decision costs Redis (issue 19 item 2: <= 15 µs per decision).

Runs the decision script (`redis_store.ACQUIRE`) of this tree beside the one of a baseline git
revision on a private redis-server started for the run, the scripts taking turns every `--block`
calls (the shared box's speed changes within seconds: only calls made in the same seconds
compare), each on its own keys, with the keys and arguments `RedisStore.decide` builds (`PlanKeys`
of a real `LimitsStage` plan). Reports Redis's own accounting per call (`INFO commandstats`,
evalsha usec / calls: Lua and the commands it runs, not the socket I/O) and redis-server CPU per
call (/proc/<pid>/stat: with the I/O of calls pipelined `--batch` at a time). An empty script
(`return 1`) with the same keys and arguments is the floor of any script, `commands only` (the
decision's Redis commands without its logic) the floor of this key layout. Each cell: `-n`
decisions over `--keys` keys (their buckets exist: the common case), every decision carrying a
deferred refund (what a request that used less than it reserved leaves for the next one:
`RedisStore._refunds`).

Plans: `rpm_tpm` (a key's requests and tokens per minute), `budget` (rpm + tpm + a daily and
monthly budget). Prints a markdown table with /proc/loadavg per round, then medians and bests.

Usage: .venv/bin/python benchmarks/exact_decision_cost.py [--baseline REV] [-n 20000]
       [--rounds 5] [--plan rpm_tpm,budget]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hiredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gateway import config as config_mod  # noqa: E402
from gateway.pipeline.limits import LimitsStage, redis_store  # noqa: E402
from gateway.principal import Principal  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
STORE = "python/gateway/pipeline/limits/redis_store.py"
TIERS = {
    "rpm_tpm": "{rpm: 100000000, tpm: 100000000}",
    "budget": "{rpm: 100000000, tpm: 100000000, budget_usd_per_day: 1000000, budget_usd_per_month: 5000000}",
}


#: The commands a decision of these plans runs, with none of its logic: the floor of this key
#: layout (TIME; per bucket GET, SET PX; per budget HMGET, HSET of its 2 sums).
COMMANDS_ONLY = """
local tm = redis.call('TIME')
for i = 1, #KEYS do
  if ARGV[6 * i - 3] == 'r' then
    redis.pcall('GET', KEYS[i])
    redis.call('SET', KEYS[i], '6000000000:1796443833123456', 'PX', 61000)
  else
    redis.call('HMGET', KEYS[i], 'd', 'ds', 'm', 'ms')
    redis.call('HSET', KEYS[i], 'ds', '1000', 'ms', '1000')
  end
end
return 1
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def scripts_at(rev: str) -> dict[str, str]:
    """The scripts (`ACQUIRE`, ...) of redis_store.py at git revision `rev`: its top-level
    string assignments evaluated on their own (no imports)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{STORE}"], capture_output=True, text=True, check=True
    ).stdout
    env: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                exec(compile(ast.Module([node], []), STORE, "exec"), {"str": str}, env)
            except Exception:  # not a script: skipped
                continue
    return {k: v for k, v in env.items() if isinstance(v, str)}


class Conn:
    """A blocking RESP connection that pipelines `batch` commands per write."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()

    def call(self, *args: object) -> object:
        return self.pipeline([hiredis.pack_command(args)])[0]

    def pipeline(self, cmds: list[bytes]) -> list[object]:
        self.sock.sendall(b"".join(cmds))
        out: list[object] = []
        while len(out) < len(cmds):
            reply = self.reader.gets()
            if reply is False:
                self.reader.feed(self.sock.recv(1 << 20))
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise reply
            out.append(reply)
        return out


def plan_calls(plan_name: str, keys: int, salt: str = "") -> list[tuple[tuple[str, ...], list[object]]]:
    """Per key: the KEYS and ARGV `RedisStore.decide` sends for one request of 100 tokens and a
    cost of 1000 nano-USD, carrying a deferred refund of 30 tokens."""
    cfg = config_mod.parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\n"
        "models: [{name: m, provider: p}]\n"
        f"tiers: {{pro: {TIERS[plan_name]}}}\n"
        "limits: {backend: redis, redis: {url: 'redis://127.0.0.1:1/0'}}\n"
    )
    stage = LimitsStage(cfg)
    out = []
    for k in range(keys):
        principal = Principal(f"{salt}k{k}", b"", "", "pro", cfg.tiers["pro"], None, float("inf"), False)
        plan = stage.plan(principal, "m")
        pk = redis_store.PlanKeys(plan, cfg.limits.redis.key_prefix)
        costs = (0, 1, 100, 1000, 1, 100)
        args: list[object] = ["", cfg.limits.redis.lease_ttl_ms]
        for c, (kind, limit, limit2, enforce) in zip(plan.checks, pk.check_args, strict=True):
            args += (kind, limit, limit2, costs[c.kind], enforce, 30 if c.kind == 2 else 0)
        out.append((pk.keys, args))
    return out


def commandstats(conn: Conn) -> tuple[int, int]:
    info = conn.call("INFO", "commandstats")
    assert isinstance(info, bytes)
    m = re.search(rb"cmdstat_evalsha:calls=(\d+),usec=(\d+)", info)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def interleaved(
    conn: Conn, pid: int, shas: dict[str, str], calls: dict[str, list], n: int, batch: int, block: int
) -> dict[str, tuple[float, float]]:
    """Per script: (Lua µs per call from commandstats, redis-server CPU µs per call), the scripts
    taking turns every `block` calls (each on its own keys) so that they share the box's load."""
    packed = {
        name: [hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)) for keys, args in calls[name]]
        for name, sha in shas.items()
    }
    usec = dict.fromkeys(shas, 0)
    cpu = dict.fromkeys(shas, 0.0)
    conn.call("CONFIG", "RESETSTAT")
    done = 0
    while done < n:
        k = min(block, n - done)
        for name, cmds in packed.items():
            calls0, usec0 = commandstats(conn)
            cpu0 = cpu_s(pid)
            for i in range(0, k, batch):
                conn.pipeline([cmds[(done + i + j) % len(cmds)] for j in range(min(batch, k - i))])
            cpu[name] += cpu_s(pid) - cpu0
            calls1, usec1 = commandstats(conn)
            assert calls1 - calls0 == k, (calls1 - calls0, k)
            usec[name] += usec1 - usec0
        done += k
    return {name: (usec[name] / n, cpu[name] / n * 1e6) for name in shas}


def check_same(conn: Conn, scripts: dict[str, str], calls: list) -> None:
    """The scripts answer the same values and leave the same state, on a clock of this check's
    own (TIME read from a hash instead: real time would differ between the runs)."""
    outcomes = []
    for name in ("before", "after"):
        conn.call("FLUSHALL")
        sha = conn.call("SCRIPT", "LOAD", fake_clock(scripts[name]))
        replies = []
        now = 1_796_443_833_000_000
        for step in range(20):
            now += (0, 7, 1_000, 700_000)[step % 4]
            conn.call("HSET", "bench:clock", "s", now // 1_000_000, "us", now % 1_000_000)
            keys, args = calls[step % 2]
            replies.append(conn.call("EVALSHA", sha, len(keys), *keys, *args))
        state = [(k, conn.call("DUMP", k)) for k in sorted(conn.call("KEYS", "*"))]  # type: ignore[arg-type]
        outcomes.append((replies, state))
    if outcomes[0][0] != outcomes[1][0]:
        raise SystemExit(f"the scripts answer differently: {outcomes}")
    if outcomes[0][1] != outcomes[1][1]:
        raise SystemExit(f"the scripts leave different keys or values: {outcomes}")


def fake_clock(src: str) -> str:
    """`src` reading TIME from the hash `bench:clock` (fields s, us): a clock the check sets."""
    return re.sub(r"(redis\.call|rcall)\('TIME'\)", "redis.call('HMGET', 'bench:clock', 's', 'us')", src)


def fuzz(port: int, scripts: dict[str, str], plans: int, seed: int = 7) -> int:
    """Random plans (buckets, lease sets, budgets and token quotas; enforced or shadow; refunds;
    tiny and huge limits; pre-2026-12 bucket hashes; budget windows of a past day or month), each
    decided a few times on a clock that jumps (µs to days): both scripts, each in its own
    database, must answer the same and leave the same keys, values and TTLs. -> decisions made."""
    rnd = random.Random(seed)
    conns = {"before": Conn(port), "after": Conn(port)}
    conns["after"].call("SELECT", 1)
    shas = {name: c.call("SCRIPT", "LOAD", fake_clock(scripts[name])) for name, c in conns.items()}
    now = 1_796_443_833_000_000
    decided = 0
    for trial in range(plans):
        checks = []
        for i in range(rnd.randint(1, 5)):
            kind = rnd.choice("rrcbq")
            limit = {"r": rnd.choice([5, 20, 1000, 100000]), "c": rnd.randint(1, 3)}.get(
                kind, rnd.choice([0, 1000, 5000])
            )
            limit2 = rnd.choice([0, -1, 3000, 20000]) if kind in "bq" else 0
            checks.append((f"{{k{trial}}}:{i}", kind, limit, limit2, rnd.choice([1, 1, 0])))
        for c in conns.values():
            c.call("FLUSHDB")
        for key, kind, *_ in checks:
            r = rnd.random()
            day = now // 86_400_000_000
            for c in conns.values():
                if kind == "r" and r < 0.1:
                    c.call("HSET", key, "x", "1")
                elif kind in "bq" and r < 0.5:
                    c.call("HSET", key, "d", day - 1, "ds", 700, "m", 99999 if r < 0.3 else 0, "ms", 900)
        for step in range(rnd.randint(3, 30)):
            args: list[object] = [f"m{step}", 30000]
            for _key, kind, limit, limit2, enforce in checks:
                cost = rnd.choice(
                    {"r": [0, 1, 1, 5, 50, 300], "c": [0], "b": [0, 100, 900], "q": [0, 1, 100]}[kind]
                )
                args += (
                    kind,
                    limit,
                    limit2,
                    cost,
                    enforce,
                    rnd.choice([0, 0, 10, 200]) if kind == "r" else 0,
                )
            now += rnd.choice([0, 1, 7, 1000, 123457, 3_000_000, 61_000_000, 86_400_000_000])
            keys = [ch[0] for ch in checks]
            seen, ttls = [], []
            for name, c in conns.items():
                c.call("HSET", "bench:clock", "s", now // 1_000_000, "us", now % 1_000_000)
                reply = c.call("EVALSHA", shas[name], len(keys), *keys, *args)
                seen.append((reply, [(k, c.call("DUMP", k)) for k in keys]))
                ttls.append([c.call("PTTL", k) for k in keys])
            decided += 1
            same_ttls = all((a < 0) == (b < 0) and abs(a - b) < 1000 for a, b in zip(*ttls, strict=True))
            if seen[0] != seen[1] or not same_ttls:
                raise SystemExit(f"the scripts differ: plan {checks}, ARGV {args}: {seen}, TTLs {ttls}")
    return decided


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="06ab089", help="git revision of the 'before' scripts")
    ap.add_argument("-n", type=int, default=20_000, help="decisions per cell")
    ap.add_argument("--keys", type=int, default=100, help="distinct keys per cell")
    ap.add_argument("--batch", type=int, default=50, help="calls per pipelined write")
    ap.add_argument(
        "--fuzz", type=int, default=300, help="random plans of the equivalence check first (0: none)"
    )
    ap.add_argument("--block", type=int, default=500, help="calls per script before the next takes its turn")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--plan", default="rpm_tpm,budget")
    ap.add_argument("--extra", action="append", default=[], help="NAME=FILE: another script to measure")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                conn = Conn(port)
                conn.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        scripts = {
            "empty": "return 1",
            "commands only": COMMANDS_ONLY,
            "before": scripts_at(args.baseline)["ACQUIRE"],
            "after": redis_store.ACQUIRE,
        }
        for extra in args.extra:
            name, _, path = extra.partition("=")
            scripts[name] = Path(path).read_text()
        shas = {}
        for name, src in scripts.items():
            shas[name] = conn.call("SCRIPT", "LOAD", src).decode()  # type: ignore[union-attr]
            assert shas[name] == hashlib.sha1(src.encode()).hexdigest()
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
        print(
            f"{version}; baseline {args.baseline}; n={args.n} per cell, {args.keys} keys, "
            f"batch {args.batch}, block {args.block}, {args.rounds} rounds; start loadavg {loadavg()}"
        )
        print()
        if args.fuzz:
            decided = fuzz(port, scripts, args.fuzz)
            print(
                f"Equivalence: {decided} decisions of {args.fuzz} random plans on a jumping clock, "
                "the same replies, keys, values and TTLs from both scripts."
            )
            print()
        print("| plan | round | script | Lua µs/call | redis-server CPU µs/call | loadavg (round start) |")
        print("|---|---|---|---|---|---|")
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for plan in args.plan.split(","):
            calls = plan_calls(plan, args.keys)
            check_same(conn, scripts, calls)
            by_name = {name: plan_calls(plan, args.keys, salt=f"{i}") for i, name in enumerate(scripts)}
            for rnd in range(args.rounds):
                conn.call("FLUSHALL")
                load = loadavg()
                cells = interleaved(conn, proc.pid, shas, by_name, args.n, args.batch, args.block)
                for name, (lua, cpu) in cells.items():
                    results.setdefault((plan, name), []).append((lua, cpu))
                    print(f"| {plan} | {rnd + 1} | {name} | {lua:.2f} | {cpu:.2f} | {load} |", flush=True)
        print()
        print("| plan | script | Lua µs/call median (best) | CPU µs/call median (best) |")
        print("|---|---|---|---|")
        for (plan, name), rs in results.items():
            lua = [r[0] for r in rs]
            cpu = [r[1] for r in rs]
            print(
                f"| {plan} | {name} | {statistics.median(lua):.2f} ({min(lua):.2f}) "
                f"| {statistics.median(cpu):.2f} ({min(cpu):.2f}) |"
            )
        print()
        print("| plan | after / before, per round (interleaved), median (range) |")
        print("|---|---|")
        for plan in args.plan.split(","):
            ratios = [
                a[0] / b[0] for a, b in zip(results[(plan, "after")], results[(plan, "before")], strict=True)
            ]
            print(f"| {plan} | {statistics.median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f}) |")
        print(f"\nend loadavg {loadavg()}")
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
