"""The memory of many limited keys (issue 19, "Millions of keys"): Redis bytes per limited key, per
limit kind, and what a gateway worker holds as distinct keys go by.

Why: a deployment with a million API keys must know what Redis needs for their limit state, that
a decision costs the same with a million keys present, and that a worker's memory does not grow
with every key it has seen.

- Redis: a private `redis-server` (no persistence) per limit kind on a free port, so `INFO memory`
  is that kind's alone and the shared Redis is untouched. Each is loaded with `--keys` distinct
  keys' state through the decision script, piped (`redis-cli --pipe`): one EVALSHA per key with
  the keys and arguments `RedisStore.decide` builds for the kind's tier and request (`PlanKeys`
  of a real `LimitsStage` plan; only the key id differs), the gateway's layout (`{key id}:r`,
  `:t`, `:b`). Active expiry is off during the load (a bucket key lives until its bucket is full
  again, <= 61 s: a slower load would lose its first keys; expired keys are the same size).
  Reported: `used_memory` delta / keys held, the keys' TTLs, `MEMORY USAGE` and encoding of a
  sample, Redis CPU per decision (`INFO commandstats` evalsha) in the first and last windows of
  the load; with `--wait-expiry`, the bucket keys going (dbsize, used_memory after their TTL);
  and what a decision's parts cost alone (`--floor` calls: an empty script, TIME, the bucket's
  GET + SET, the decision).
- The layout check: a real gateway (2 workers, the mock upstream) on another private Redis serves
  a few requests per kind over HTTP; its keys must have the names, types, encodings and sizes of
  the loaded ones.
- Worker memory: this process's RSS at checkpoints of the load (the plan caches, deferred
  refunds, refusal cache: bounded, so RSS stays flat), the leased store's slices (idle ones go
  back and are forgotten after `slice_idle_ms`): this process is the worker, the real stage and
  store deciding one request per distinct key (`--worker-keys`); and the auth key table, which
  holds every known key by design (traced bytes per key, a child process, `--table-keys` keys).

    .venv/bin/python benchmarks/limits_memory.py [--keys 1000000] [--kinds rpm,tpm,budget] \
        [--worker-keys 200000] [--table-keys 1000000] [--floor 20000] [--wait-expiry] \
        [--out benchmarks/results/DATE-limits-memory.md]

Not run in CI. Needs redis-server and redis-cli.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
sys.path.insert(0, str(REPO / "python"))

import uvloop  # noqa: E402
from budget_harness import parse, request, used  # noqa: E402 (the tests' in-process harness)

from _common import redis_cli, start_redis  # noqa: E402
from gateway.errors import GatewayError  # noqa: E402
from gateway.pipeline.limits import LimitsStage  # noqa: E402
from gateway.pipeline.limits.redis_store import ACQUIRE, PlanKeys  # noqa: E402
from gateway.principal import Principal  # noqa: E402
from proxy_overhead import free_port  # noqa: E402

PAGE = 4096
BATCH = 256  # decisions in flight at once (one pipelined connection)
PRICES = "prices:\n  echo: {input_per_mtok: 1, output_per_mtok: 2}\n"
#: per kind: the tier (its limit keeps a key's state alive for most of a minute after one
#: request: a bucket key lives until the bucket is full again) and the request's max_tokens
KINDS: dict[str, tuple[str, int]] = {
    "rpm": ("{rpm: 1}", 16),
    "tpm": ("{tpm: 60}", 40),
    "budget": ("{budget_usd_per_day: 1000, budget_usd_per_month: 10000}", 16),
}
SUFFIX = {"rpm": ":r", "tpm": ":t", "budget": ":b"}
LAYOUT = re.compile(r"^fp-mem:\{[a-z0-9]+\}:[rtb]$")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def rss_bytes(pid: str = "self") -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


# ---- Redis --------------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server (no persistence, no eviction) on a free port, killed on exit."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        # DEBUG SET-ACTIVE-EXPIRE (the load)
        self.proc = start_redis(self.port, tmp, "--appendonly", "no", "--enable-debug-command", "local")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args)

    def info(self, section: str) -> dict[str, str]:
        return dict(line.split(":", 1) for line in self.cli("INFO", section).splitlines() if ":" in line)

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def dbsize(self) -> int:
        return int(self.cli("DBSIZE"))

    def evalsha_stats(self) -> tuple[int, int]:
        """(calls, usec) of EVALSHA so far (the scripts' CPU, as Redis counts it)."""
        line = self.info("commandstats").get("cmdstat_evalsha", "calls=0,usec=0")
        stats = dict(kv.split("=") for kv in line.split(","))
        return int(stats["calls"]), int(stats["usec"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Checkpoint:
    decisions: int
    used_memory: int
    dbsize: int
    rss: int
    evalsha_calls: int
    evalsha_usec: int
    seconds: float


@dataclass
class KindResult:
    kind: str
    keys: int
    base_memory: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    ttl_ms: tuple[int, int] = (0, 0)  # min, max over the sample
    sample_usage: float = 0.0  # MEMORY USAGE, mean over the sample
    encoding: str = ""
    key_type: str = ""
    after_expiry: tuple[int, int] | None = None  # dbsize, used_memory
    refused: int = 0
    loadavg_start: str = ""
    loadavg_end: str = ""

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]

    def bytes_per_key(self) -> float:
        return (self.last.used_memory - self.base_memory) / max(1, self.last.dbsize)

    def usec_per_decision(self, first: bool) -> float:
        a, b = (self.checkpoints[0], self.checkpoints[1]) if first else self.checkpoints[-2:]
        calls = b.evalsha_calls - a.evalsha_calls
        return (b.evalsha_usec - a.evalsha_usec) / max(1, calls)


def config_text(kind: str, url: str, leased: bool = False) -> str:
    tier, _ = KINDS[kind]
    if leased:
        tier = tier[:-1] + ", mode: leased}"
    return (
        PRICES
        + f"tiers:\n  t: {tier}\n"
        + "limits:\n  backend: redis\n"
        + f"  redis: {{url: '{url}', key_prefix: 'fp-mem:', on_error: fail_closed, timeout_ms: 30000}}\n"
    )


def key_id(i: int) -> str:
    return f"k{i:x}"


def who(i: int, tier: Any) -> Principal:
    return Principal(key_id(i), b"", "default", "t", tier, None, math.inf, False)


def resp(*parts: str | bytes) -> bytes:
    """One command in RESP (what `redis-cli --pipe` sends)."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def decision_commands(kind: str, first: int, n: int, script: str = ACQUIRE) -> bytes:
    """The EVALSHA a worker sends for one request of each key `first .. first + n`: the keys
    (`PlanKeys`) and arguments exactly as `RedisStore.decide` builds them for this kind's tier and
    request (only the key id differs from key to key)."""
    cfg = parse(config_text(kind, "redis://127.0.0.1:1/0"))
    tier = cfg.tiers["t"]
    stage = LimitsStage(cfg)
    ctx = request(who(0, tier), max_tokens=KINDS[kind][1])
    plan = stage.plan(who(0, tier), "echo")
    _, tokens, cost = stage.reservation(ctx, plan)
    keys = PlanKeys(plan, cfg.limits.redis.key_prefix)
    costs = (0, 1, tokens, cost, 1, tokens)  # as RedisStore.decide: by kind
    args = ["", str(cfg.limits.redis.lease_ttl_ms)]
    for c, (code, limit, limit2, enforce) in zip(plan.checks, keys.check_args, strict=True):
        args += [code, str(limit), str(limit2), str(costs[c.kind]), str(enforce), "0"]
    sha = sha1_hex(script)
    template = [k.replace("{k0}", "{%s}") for k in keys.keys]
    return b"".join(
        resp("EVALSHA", sha, str(len(template)), *(k % key_id(i) for k in template), *args)
        for i in range(first, first + n)
    )


def sha1_hex(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


def measure_kind(kind: str, n: int, tmp: Path, checkpoints: int) -> tuple[KindResult, PrivateRedis]:
    """Load `n` keys' state of one kind into a private Redis through the decision script, piped
    (`redis-cli --pipe`) in `checkpoints` chunks, reading memory and script CPU between them."""
    r = PrivateRedis(tmp / kind)
    # A bucket key lives until its bucket is full again (<= 61 s): slower than that, the first
    # keys would be gone before the last are written. Expired keys are kept (not reclaimed,
    # same size) until the reading; `--wait-expiry` then shows them go.
    r.cli("DEBUG", "SET-ACTIVE-EXPIRE", "0")
    sha = r.cli("SCRIPT", "LOAD", ACQUIRE)
    assert sha == sha1_hex(ACQUIRE), sha
    res = KindResult(kind, n, r.used_memory(), loadavg_start=loadavg())
    t0 = time.monotonic()

    def checkpoint(done: int) -> None:
        calls, usec = r.evalsha_stats()
        res.checkpoints.append(
            Checkpoint(done, r.used_memory(), r.dbsize(), rss_bytes(), calls, usec, time.monotonic() - t0)
        )
        c = res.checkpoints[-1]
        print(f"  {kind}: {done:>8} keys, dbsize {c.dbsize}, {c.seconds:.1f} s", file=sys.stderr)

    checkpoint(0)
    # a small first chunk: the cost of a decision with (almost) no keys present
    sizes = [min(n, max(1, n // 100))]
    step = max(1, (n - sizes[0]) // checkpoints)
    while sum(sizes) < n:
        sizes.append(min(step, n - sum(sizes)))
    done = 0
    for size in sizes:
        data = decision_commands(kind, done, size)
        out = subprocess.run(
            ["redis-cli", "-p", str(r.port), "--pipe"], input=data, capture_output=True, check=False
        )
        text = out.stdout.decode(errors="replace")
        if out.returncode != 0 or "errors: 0" not in text:
            raise RuntimeError(f"{kind}: redis-cli --pipe: {text[-500:]} {out.stderr[-500:]!r}")
        done += size
        checkpoint(done)
    res.loadavg_end = loadavg()
    sample = [f"fp-mem:{{{key_id(i)}}}{SUFFIX[kind]}" for i in range(n - 1, max(-1, n - 51), -1)]
    ttls = [int(r.cli("PTTL", k)) for k in sample]
    live = [t for t in ttls if t > 0]
    res.ttl_ms = (min(live), max(live)) if live else (0, 0)
    usages = [int(u) for u in (r.cli("MEMORY", "USAGE", k) for k in sample) if u.isdigit()]
    res.sample_usage = sum(usages) / max(1, len(usages))
    res.encoding = r.cli("OBJECT", "ENCODING", sample[0])
    res.key_type = r.cli("TYPE", sample[0])
    return res, r


async def load(stage: LimitsStage, tier: Any, n: int, max_tokens: int, on_checkpoint: Any, every: int) -> int:
    """One request per distinct key through the real stage (decide, then settle as if the reply
    used all of `max_tokens`), `BATCH` at a time. Returns how many were refused."""
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        ctx = request(who(i, tier), max_tokens=max_tokens)
        try:
            await stage.on_request(ctx)
        except GatewayError:
            refused += 1
            return
        used(ctx, max_tokens)
        stage.on_finish(ctx)

    done = 0
    on_checkpoint(0)
    while done < n:
        step = min(BATCH, n - done)
        await asyncio.gather(*(one(done + j) for j in range(step)))
        done += step
        if done % every == 0 or done == n:
            await stage.settled()
            on_checkpoint(done)
    return refused


def worker_rss(n: int, tmp: Path, leased: bool) -> list[tuple[int, int, int]]:
    """This process as a worker (the real stage and store, exact or `mode: leased`, rpm + tpm +
    budget on every key) deciding one request per distinct key: (keys so far, slices held,
    RSS) at checkpoints, and (-1, ...) once idle slices went back (leased)."""
    r = PrivateRedis(tmp / ("leased" if leased else "exact"))
    text = config_text("rpm", r.url, leased).replace(
        "{rpm: 1", "{rpm: 6000, tpm: 600000, budget_usd_per_day: 100"
    )
    cfg = parse(text)
    tier = cfg.tiers["t"]
    points: list[tuple[int, int, int]] = []

    async def main() -> None:
        stage = LimitsStage(cfg)
        stage.start(_Worker(asyncio.get_running_loop()))  # type: ignore[arg-type]
        slices = getattr(stage.store, "_slices", {})
        try:
            every = max(BATCH, n // 10 // BATCH * BATCH)
            refused = await load(
                stage, tier, n, 16, lambda done: points.append((done, len(slices), rss_bytes())), every
            )
            if refused:  # not by the limits (they are far): Redis slower than timeout_ms
                print(f"  worker ({'leased' if leased else 'exact'}): {refused} not decided", file=sys.stderr)
            if leased:
                await asyncio.sleep(cfg.limits.redis.slice_idle_ms / 1000 + 1.0)
                gc.collect()
                points.append((-1, len(slices), rss_bytes()))
        finally:
            await stage.close()

    try:
        uvloop.run(main())
    finally:
        r.stop()
    return points


class _Worker:
    """What `LimitsStage.start` reads of a worker: its loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop


#: what a decision's parts cost alone: scripts run with the decision's keys and arguments
PARTS = {
    "empty script": "return 1",
    "TIME": "local tm = redis.call('TIME') return 1",
    "TIME + GET + SET PX": "local tm = redis.call('TIME') local v = redis.call('GET', KEYS[1]) "
    "redis.call('SET', KEYS[1], '60000000:1764900000000000', 'PX', 61000) return 1",
    "the decision (ACQUIRE)": ACQUIRE,
}
ROUNDS = 4


def script_parts(kind: str, n: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """Per part: (min, median) µs per EVALSHA over `ROUNDS` interleaved rounds of `n` calls with
    this kind's keys and arguments (fresh keys each round), in one private Redis: the floor of a
    script call and what the decision's own Lua adds (the box's noise: take the min)."""
    r = PrivateRedis(tmp / f"parts-{kind}")
    seen: dict[str, list[float]] = {name: [] for name in PARTS}
    try:
        first = 0
        for _ in range(ROUNDS):
            for name, script in PARTS.items():
                r.cli("SCRIPT", "LOAD", script)
                r.cli("CONFIG", "RESETSTAT")
                data = decision_commands(kind, first, n, script)
                first += n
                subprocess.run(
                    ["redis-cli", "-p", str(r.port), "--pipe"], input=data, capture_output=True, check=True
                )
                calls, usec = r.evalsha_stats()
                seen[name].append(usec / max(1, calls))
        return {name: (min(v), sorted(v)[len(v) // 2]) for name, v in seen.items()}
    finally:
        r.stop()


# ---- the layout through HTTP ----------------------------------------------------------------------


def http_sample(tmp: Path) -> list[tuple[str, str, str, int]]:
    """A real gateway (2 workers) on a private Redis, 5 keys per kind, 2 requests each: its
    Redis keys as (name, type, encoding, MEMORY USAGE)."""
    from conftest import gateway_config, run_gateway, run_mock

    r = PrivateRedis(tmp / "http")
    try:
        keys = [(f"h{kind[0]}{i}", kind) for kind in KINDS for i in range(5)]
        lines = ["auth:", "  enabled: true", "  keys:"]
        lines += [f"    - {{id: {k}, key: sk-mem-{k}-0123456789, tier: {kind}}}" for k, kind in keys]
        lines += ["tiers:", *(f"  {kind}: {tier}" for kind, (tier, _) in KINDS.items())]
        lines += [
            "prices:",
            "  echo: {input_per_mtok: 1, output_per_mtok: 2}",
            "limits:",
            "  backend: redis",
            f"  redis: {{url: '{r.url}', key_prefix: 'fp-mem:', timeout_ms: 5000}}",
        ]
        with run_mock() as mock:
            text = gateway_config(mock.port) + "\n" + "\n".join(lines) + "\n"
            with run_gateway(tmp, mock, workers=2, config_text=text) as gw:
                for k, kind in keys:
                    body = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
                    body["max_tokens"] = KINDS[kind][1]
                    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
                    conn.request(
                        "POST",
                        "/v1/chat/completions",
                        json.dumps(body).encode(),
                        {
                            "content-type": "application/json",
                            "authorization": f"Bearer sk-mem-{k}-0123456789",
                        },
                    )
                    resp = conn.getresponse()
                    resp.read()
                    conn.close()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP sample: {k} got {resp.status}")
                time.sleep(0.3)  # settlements are not waited for
        out = []
        for name in sorted(r.cli("--scan", "--pattern", "fp-mem:*").split()):
            usage = r.cli("MEMORY", "USAGE", name)
            out.append((name, r.cli("TYPE", name), r.cli("OBJECT", "ENCODING", name), int(usage or 0)))
        return out
    finally:
        r.stop()


# ---- worker memory: leased slices and the key table ------------------------------------------------


_TABLE = r"""
import gc, sys, tracemalloc
sys.path.insert(0, sys.argv[2])
from gateway.config import parse
from gateway.keystore import StoredKey
from gateway.pipeline.auth import AuthStage
n = int(sys.argv[1])
cfg = parse("providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: m, provider: p}]\n"
            "tiers: {t: {rpm: 100}}\nauth: {enabled: true}\n")
stage = AuthStage(cfg)
def fresh(text):  # a new str per row, as sqlite3 / psycopg rows give
    return bytes(text, "ascii").decode()
tracemalloc.start()
keys = [StoredKey(f"key-{i:08x}", "sha256:" + format(i, "064x"), fresh("default"), fresh("t"))
        for i in range(n)]
table = stage._merge(keys)
peak = tracemalloc.get_traced_memory()[1]
del keys
gc.collect()
print(len(table), tracemalloc.get_traced_memory()[0], peak)
"""


def key_table(n: int) -> tuple[int, int, int]:
    """(keys in the table, bytes per key it keeps, bytes per key at the peak of building it from
    the store's rows) of the auth stage's key table for `n` stored keys (`load_all` then
    `_merge`, as `AuthStage.refresh`), traced allocations, in a child process."""
    out = subprocess.run(
        [sys.executable, "-c", _TABLE, str(n), str(REPO / "python")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    size, kept, peak = (int(x) for x in out)
    return size, kept // max(1, size), peak // max(1, size)


# ---- report ---------------------------------------------------------------------------------------


def tables(results: list[KindResult]) -> list[str]:
    """Redis bytes per key and CPU per decision, per kind."""
    mib = 1 << 20
    lines = [
        "",
        "## Redis bytes per limited key (private redis-server per kind, `used_memory` delta / keys held)",
        "",
        "| kind | keys loaded | keys held (dbsize) | used_memory delta | bytes / key "
        "| MEMORY USAGE (sample) | type / encoding | TTL of the last keys | load s | loadavg (start → end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        last = res.last
        lines.append(
            f"| {res.kind} | {res.keys:,} | {last.dbsize:,} "
            f"| {(last.used_memory - res.base_memory) / mib:.1f} MiB "
            f"| {res.bytes_per_key():.0f} | {res.sample_usage:.0f} | {res.key_type} / {res.encoding} "
            f"| {res.ttl_ms[0] / 1000:.1f} to {res.ttl_ms[1] / 1000:.1f} s | {last.seconds:.0f} "
            f"| {res.loadavg_start.split(' ')[0]} → {res.loadavg_end.split(' ')[0]} |"
        )
    lines += [
        "",
        "## Redis CPU per decision (EVALSHA usec/call, `INFO commandstats`) as the keys accumulate",
        "",
        "| kind | first window (keys) | µs / decision | last window (keys) | µs / decision |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        c = res.checkpoints
        lines.append(
            f"| {res.kind} | 0 → {c[1].decisions:,} | {res.usec_per_decision(True):.1f} "
            f"| {c[-2].decisions:,} → {c[-1].decisions:,} | {res.usec_per_decision(False):.1f} |"
        )
    return lines


def render(
    args: argparse.Namespace,
    results: list[KindResult],
    sample: list[tuple[str, str, str, int]],
    exact: list[tuple[int, int, int]],
    leased: list[tuple[int, int, int]],
    table: tuple[int, int, int] | None,
    floors: dict[str, dict[str, tuple[float, float]]],
    cmd: str,
) -> str:
    mib = 1 << 20
    lines = [f"# Limits memory: {args.keys:,} distinct keys per limit kind", "", f"Command: `{cmd}`"]
    if results:
        lines += tables(results)
    if floors:
        names = list(PARTS)
        lines += [
            "",
            f"## What a decision's parts cost alone ({ROUNDS} interleaved rounds of {args.floor:,} calls, "
            "the decision's keys and arguments; EVALSHA µs/call, min / median)",
            "",
            "| kind | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for kind, parts in floors.items():
            cells = [f"{parts[n][0]:.1f} / {parts[n][1]:.1f}" for n in names]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if any(r.after_expiry for r in results):
        lines += ["", "## After the bucket TTLs (`--wait-expiry`: active expiry on again)", ""]
        lines += ["| kind | dbsize | used_memory delta |", "|---|---|---|"]
        for res in results:
            if res.after_expiry:
                db, mem = res.after_expiry
                lines.append(f"| {res.kind} | {db:,} | {(mem - res.base_memory) / mib:.1f} MiB |")
    for mode, points in (("exact", exact), ("leased", leased)):
        if not points:
            continue
        lines += [
            "",
            f"## Worker RSS, {mode} (rpm + tpm + budget on every key; this process is the worker: "
            "the real stage and store, one request per distinct key)",
            "",
            "| distinct keys so far | slices held | RSS |",
            "|---|---|---|",
        ]
        lines += [
            f"| {'after slice_idle_ms' if k < 0 else f'{k:,}'} | {sl:,} | {rss / mib:.1f} MiB |"
            for k, sl, rss in points
        ]
    if table:
        lines += [
            "",
            f"## The auth key table: {table[0]:,} stored keys: {table[1]} bytes per key kept per worker, "
            f"{table[2]} at the peak of a (re)load (the store's rows and the table at once)",
        ]
    if sample:
        lines += ["", "## Layout check: keys a real gateway (HTTP, 2 workers) wrote", ""]
        lines += ["| key | type | encoding | MEMORY USAGE |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {t} | {e} | {u} |" for n, t, e, u in sample]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--kinds", default="rpm,tpm,budget")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--worker-keys", type=int, default=200_000)
    ap.add_argument("--table-keys", type=int, default=1_000_000)
    ap.add_argument("--floor", type=int, default=20_000)
    ap.add_argument("--wait-expiry", action="store_true")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cmd = " ".join(["benchmarks/limits_memory.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        print(f"loadavg {loadavg()}", file=sys.stderr)
        results: list[tuple[KindResult, PrivateRedis]] = []
        sample: list[tuple[str, str, str, int]] = []
        exact: list[tuple[int, int, int]] = []
        leased: list[tuple[int, int, int]] = []
        table: tuple[int, int, int] | None = None
        floors: dict[str, dict[str, tuple[float, float]]] = {}

        def emit() -> str:
            """The report so far (written after each part: a long run loses nothing)."""
            text = render(args, [res for res, _ in results], sample, exact, leased, table, floors, cmd)
            text += f"\nloadavg now: {loadavg()}\n"
            if args.out:
                args.out.write_text(text)
            return text

        sample = [] if args.no_http else http_sample(tmp)
        for name, _, _, _ in sample:
            if not LAYOUT.match(name):
                raise RuntimeError(f"unexpected key layout: {name}")
        for kind in args.kinds.split(",") if args.keys else ():
            res, r = measure_kind(kind, args.keys, tmp, args.checkpoints)
            stack.callback(r.stop)
            results.append((res, r))
            print(f"{kind}: {res.bytes_per_key():.0f} B/key, {res.last.dbsize} live", file=sys.stderr)
            seen = {(t, e) for n, t, e, _ in sample if n.endswith(SUFFIX[kind])}
            if sample and seen != {(res.key_type, res.encoding)}:
                raise RuntimeError(f"{kind}: the gateway wrote {seen}, the load {res.key_type, res.encoding}")
            emit()
        for _, r in results:
            r.cli("DEBUG", "SET-ACTIVE-EXPIRE", "1")
        if args.wait_expiry:  # until the bucket keys are reclaimed (their TTL <= 61 s)
            end = time.monotonic() + 240
            while time.monotonic() < end:
                if all(r.dbsize() == 0 for res, r in results if res.kind != "budget"):
                    break
                time.sleep(2)
            for res, r in results:
                res.after_expiry = (r.dbsize(), r.used_memory())
            emit()
        for _, r in results:  # measured: free the machine's memory for the rest
            r.stop()
        if args.worker_keys:
            exact = worker_rss(args.worker_keys, tmp, False)
            emit()
            leased = worker_rss(args.worker_keys, tmp, True)
            emit()
        if args.table_keys:
            table = key_table(args.table_keys)
            emit()
        if args.floor:
            floors = {k: script_parts(k, args.floor, tmp) for k in args.kinds.split(",")}
        text = emit()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
