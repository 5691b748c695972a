"""Parallel request stages (issue 18, item 3): what overlapping independent stages saves, and
what a group costs on the request path.

overlap: model `guarded` runs the real `retrieve` (its embedding model on a mock upstream that
waits --retrieve-ms before answering) and the real `guard` (a Triton model guard whose server
accepts connections and never answers: it fails open after `timeout_ms` = --guard-ms), with
`pipeline.parallel_stages` on and off; model `echo` runs two extension stages that sleep
--guard-ms and --retrieve-ms. Client-side latency per request (sequential) and the
`server-timing` entries.

cost: gateway CPU per request (utime + stime of its processes, /proc) at concurrency 1 over one
keep-alive connection: the default chain (no group forms: on and off run the same chain) and two
declared extension stages that return at once (on: a group, two tasks per request; off: inline).
The on/off gateways run side by side, cells interleaved. /proc/loadavg with every row.

    .venv/bin/python benchmarks/parallel_stages.py [--requests 40] [--cost-requests 3000] [--repeat 3]

Not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
sys.path[:0] = [str(REPO / "python"), str(REPO / "tests" / "python")]

from _common import env, free_port, loadavg, process  # noqa: E402
from gateway.dev.openai_mock import embed_text  # noqa: E402
from gateway.vector_index import upsert  # noqa: E402

BODY = '{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":8}}'


# the extension stages (tests/python/parallel_parts.py) and the package
ENV = env(REPO / "tests" / "python", REPO / "python")


@contextlib.contextmanager
def mock() -> Iterator[int]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.dev.openai_mock", "--host", "127.0.0.1", "--port", str(port)]
    with process(cmd, f"http://127.0.0.1:{port}/health", ENV):
        yield port


@contextlib.contextmanager
def gateway(tmp: Path, text: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    cfg = tmp / f"gw-{port}.yaml"
    cfg.write_text(text)
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)]
    cmd += ["--workers", "1", "--log-level", "error"]
    with process(cmd, f"http://127.0.0.1:{port}/healthz", ENV) as proc:
        yield port, proc


class HungTriton:
    """Accepts connections, never answers: a guard model that takes longer than its timeout."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def sleeper(name: str, ms: float, model: str) -> str:
    return (
        f'  - {{kind: request_stage, factory: "parallel_parts:sleeper", '
        f"options: {{name: {name}, ms: {ms}, model: {model}}}}}\n"
    )


def base(chat_port: int, extra_providers: str = "", extra_models: str = "") -> str:
    return f"""server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: 'http://127.0.0.1:{chat_port}/v1'}}
{extra_providers}models:
  - {{name: echo, provider: mock, upstream_model: mock-echo}}
{extra_models}"""


def overlap_config(chat: int, emb: int, triton: int, index: Path, on: bool, g_ms: int, r_ms: int) -> str:
    return (
        base(
            chat,
            f"""  - {{name: emb, base_url: 'http://127.0.0.1:{emb}/v1'}}
  - {{name: triton, kind: triton, base_url: 'grpc://127.0.0.1:{triton}'}}
""",
            """  - {name: guarded, provider: mock, upstream_model: mock-echo}
  - {name: embed, kind: embedding, provider: emb, upstream_model: mock-embed}
""",
        )
        + f"""pipeline: {{parallel_stages: {str(on).lower()}}}
guards:
  - {{name: tg, kind: triton, provider: triton, model: prompt_guard, timeout_ms: {g_ms},
      on_error: fail_open, models: [guarded]}}
retrieval:
  retrievers: {{docs: {{index: '{index}', embedding_model: embed, budget_ms: {r_ms * 3}}}}}
  models: {{guarded: docs}}
extensions:
"""
        + sleeper("guard_ext", g_ms, "echo")
        + sleeper("retrieve_ext", r_ms, "echo")
    )


class Client:
    """One keep-alive connection, sequential requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, model: str) -> tuple[float, str]:
        body = BODY.format(model=model).encode()
        t = time.perf_counter()
        try:
            self.conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # the server closed an idle connection
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            t = time.perf_counter()
            self.conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = self.conn.getresponse()
        r.read()
        ms = (time.perf_counter() - t) * 1000
        if r.status != 200:
            raise RuntimeError(f"{model}: {r.status}")
        return ms, r.getheader("server-timing") or ""


def timing(header: str, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name in names:
            out[name] = float(rest)
    return out


def overlap(args: argparse.Namespace, tmp: Path) -> None:
    g_ms, r_ms = args.guard_ms, args.retrieve_ms
    index = tmp / "docs.db"
    upsert(index, [("hello.md#0", "Hello", "hello there", embed_text(["hello", "there"], 64))])
    hung = HungTriton()
    print(f"## overlap: a {g_ms} ms guard and a {r_ms} ms retrieval, {args.requests} sequential requests\n")
    print("| stages | parallel_stages | median ms | p90 ms | server-timing (median ms) | loadavg |")
    print("|---|---|---:|---:|---|---|")
    with mock() as chat, mock() as emb:
        faults = json.dumps({"first_delay_ms": r_ms}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{emb}/_mock/faults", data=faults))
        for on in (True, False):
            with gateway(tmp, overlap_config(chat, emb, hung.port, index, on, g_ms, r_ms)) as (port, _):
                client = Client(port)
                for label, model, names in (
                    ("real guard + retrieve", "guarded", ("guard", "retrieve", "pre")),
                    ("extension stages", "echo", ("guard_ext", "retrieve_ext", "pre", "pre2")),
                ):
                    for _ in range(3):
                        client.post(model)  # warm: connections, the index
                    rows = [client.post(model) for _ in range(args.requests)]
                    lat = sorted(ms for ms, _ in rows)
                    parts: dict[str, list[float]] = {}
                    for _, header in rows:
                        for k, v in timing(header, names).items():
                            parts.setdefault(k, []).append(v)
                    st = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in parts.items())
                    p90 = lat[int(len(lat) * 0.9) - 1]
                    print(
                        f"| {label} | {on} | {statistics.median(lat):.1f} | {p90:.1f} | {st} | {loadavg()} |"
                    )
    hung.close()


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    for p in out:
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def cost(args: argparse.Namespace, tmp: Path) -> None:
    print(f"\n## cost: gateway CPU µs per request, concurrency 1, {args.cost_requests} requests a cell\n")
    print("| chain | parallel_stages | CPU µs/request (cells) | median | loadavg |")
    print("|---|---|---|---:|---|")
    with mock() as chat:
        chains = {
            "default (no group)": "",
            "2 no-wait extension stages": "extensions:\n" + sleeper("x", 0, "echo") + sleeper("y", 0, "echo"),
        }
        for label, extra in chains.items():
            texts = {
                on: base(chat) + f"pipeline: {{parallel_stages: {str(on).lower()}}}\n" + extra
                for on in (True, False)
            }
            with (
                gateway(tmp, texts[True]) as (p_on, proc_on),
                gateway(tmp, texts[False]) as (p_off, proc_off),
            ):
                cells: dict[bool, list[float]] = {True: [], False: []}
                gws = {
                    True: (Client(p_on), tree_pids(proc_on.pid)),
                    False: (Client(p_off), tree_pids(proc_off.pid)),
                }
                for client, _ in gws.values():
                    for _ in range(200):
                        client.post("echo")
                for _ in range(args.repeat):
                    for on in (True, False):
                        client, pids = gws[on]
                        c0 = cpu_s(pids)
                        for _ in range(args.cost_requests):
                            client.post("echo")
                        cells[on].append((cpu_s(pids) - c0) / args.cost_requests * 1e6)
                for on in (True, False):
                    vals = ", ".join(f"{v:.0f}" for v in cells[on])
                    print(f"| {label} | {on} | {vals} | {statistics.median(cells[on]):.0f} | {loadavg()} |")


def inproc(args: argparse.Namespace) -> None:
    """The group's own CPU cost, in process on uvloop: two declared stages that return at once,
    awaited one after the other vs run as a group (two tasks and a wait)."""

    import uvloop
    from parallel_parts import ConcurrentSleeper

    from gateway.context import Endpoint, RequestContext
    from gateway.pipeline.parallel import StageGroup

    n = args.calls
    print(f"\n## in process (uvloop): two no-wait stages, {n} requests a cell\n")
    print("| how | CPU µs/request (cells) | median | loadavg |")
    print("|---|---|---:|---|")
    loop = uvloop.new_event_loop()
    stages = [ConcurrentSleeper({"name": "x"}), ConcurrentSleeper({"name": "y"})]
    group = StageGroup("pre", tuple(stages), loop)

    async def inline(ctx: RequestContext) -> None:
        for s in stages:
            await s.on_request(ctx)

    async def run(one: object) -> float:
        t = time.process_time()
        for _ in range(n):
            ctx = RequestContext("r", Endpoint.CHAT, b"{}", 0, {})
            await one(ctx)  # type: ignore[operator]
        return (time.process_time() - t) / n * 1e6

    cells: dict[str, list[float]] = {"in order": [], "group": []}
    for _ in range(args.repeat):
        cells["in order"].append(loop.run_until_complete(run(inline)))
        cells["group"].append(loop.run_until_complete(run(group.on_request)))
    for how, vals in cells.items():
        shown = ", ".join(f"{v:.1f}" for v in vals)
        print(f"| {how} | {shown} | {statistics.median(vals):.1f} | {loadavg()} |")
    loop.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guard-ms", type=int, default=50)
    ap.add_argument("--retrieve-ms", type=int, default=100)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--cost-requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--calls", type=int, default=50_000, help="in-process requests a cell")
    ap.add_argument("--only", choices=("overlap", "cost", "inproc"))
    args = ap.parse_args()
    print(f"loadavg at start: {loadavg()}, {os.cpu_count()} CPUs\n")
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "overlap"):
            overlap(args, Path(d))
        if args.only in (None, "cost"):
            cost(args, Path(d))
        if args.only in (None, "inproc"):
            inproc(args)


if __name__ == "__main__":
    main()
