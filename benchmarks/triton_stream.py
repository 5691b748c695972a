"""Streamed chat through the gateway's Triton upstream vs tritonclient straight to Triton, same run.

Upstream: a real `tritonserver` (LocalTriton, `.venv-triton`) serving the CPU test LLMs of
`triton_models/` (TensorRT-LLM text contract; deterministic words; a `[[testllm delay_ms=N]]`
directive in the prompt sets a per-token delay). Two paths, interleaved round by round:

- direct: `tritonclient.grpc.aio` `stream_infer` (one ModelStreamInfer call per request) with the
  exact tensors the gateway sends (ChatML `text_input`, `max_tokens`, `stream`,
  `exclude_input_in_output`, `return_num_*_tokens`; `enable_empty_final_response`);
- gateway: a minimal asyncio HTTP/1.1 keep-alive client (chunked + SSE) POSTing an OpenAI
  `chat.completions` stream to fastpath-gateway (1 worker), which relays to the same model.

Python clients on both sides, so client overhead is comparable. Per request: TTFT (send -> first
non-empty text), ITL (gaps between text events), total. Per cell: gateway and Triton CPU per request
(/proc utime+stime of the process trees), /proc/loadavg before and after. Both paths' text is
checked equal once per cell.

    .venv/bin/python benchmarks/triton_stream.py [--quick] [--json out.json]

Not run in CI. Needs `.venv-triton` (`make triton-venv`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "triton_models" / "testllm_core"))

import testllm  # noqa: E402  (the models' own generator: picks prompts of a known length)

from gateway.triton_local import LocalTriton  # noqa: E402
from proxy_overhead import free_port, proc_cpu_s, tree  # noqa: E402  (the /proc helpers, shared)

MODELS = ["tensorrt_llm_bls", "testllm_core", "ensemble"]
PUBLIC = {"llm": "tensorrt_llm_bls", "llm-ensemble": "ensemble"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def chatml(content: str) -> str:
    """What the gateway's built-in template makes of one user message."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pick_prompt(tokens: int, delay_ms: int) -> str:
    """A user message whose natural output is at least `tokens` words (the model stops at 12-48)."""
    for i in range(100_000):
        content = f"Benchmark prompt {i}: tell me a story. [[testllm delay_ms={delay_ms}]]"
        if len(testllm.plan(chatml(content), tokens).tokens) == tokens:
            return content
    raise SystemExit(f"no prompt yields {tokens} tokens (the test model stops at {testllm.MAX_TOKENS})")


@dataclass
class Sample:
    ttft_ms: float
    itl_ms: list[float]
    total_ms: float
    text: str


# ---------------------------------------------------------------------------- direct: tritonclient


def tensor(name: str, dtype: str, value: Any) -> grpcclient.InferInput:
    arr = np.array([[value]], dtype=object if dtype == "BYTES" else {"INT32": np.int32, "BOOL": bool}[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def direct_inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    return [
        tensor("text_input", "BYTES", prompt.encode()),
        tensor("max_tokens", "INT32", max_tokens),
        tensor("stream", "BOOL", True),
        tensor("exclude_input_in_output", "BOOL", True),
        # the gateway asks for the model's token counts (usage) when the model offers them
        tensor("return_num_input_tokens", "BOOL", True),
        tensor("return_num_output_tokens", "BOOL", True),
    ]


async def direct_one(client: grpcaio.InferenceServerClient, model: str, inputs: list[Any]) -> Sample:
    async def requests() -> Any:
        yield {
            "model_name": model,
            "inputs": inputs,
            "request_id": uuid.uuid4().hex,
            "enable_empty_final_response": True,
        }

    t0 = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(f"direct: {error}")
        out = result.as_numpy("text_output")
        if out is not None:
            text = b"".join(out.flatten()).decode()
            if text:
                times.append(time.perf_counter())
                parts.append(text)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    end = time.perf_counter()
    return Sample(
        (times[0] - t0) * 1e3,
        [(b - a) * 1e3 for a, b in itertools.pairwise(times)],
        (end - t0) * 1e3,
        "".join(parts),
    )


# ---------------------------------------------------------------------- gateway: raw HTTP/1.1 + SSE


class HttpConn:
    """One keep-alive HTTP/1.1 connection; POST, then read a chunked SSE body event by event."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        #: times the server had closed the idle keep-alive connection (reopened before timing)
        self.reconnects = 0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def stream(self, body: bytes) -> Sample:
        assert self.reader is not None and self.writer is not None
        await asyncio.sleep(0)  # let a pending FIN from the server be seen
        if self.reader.at_eof() or self.writer.is_closing():
            self.reconnects += 1
            self.close()
            await self.connect()
        assert self.reader is not None and self.writer is not None
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader = self.reader
        t0 = time.perf_counter()
        self.writer.write(head + body)
        headers = await reader.readuntil(b"\r\n\r\n")
        status = headers.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"gateway: HTTP {status.decode()}: {headers[:300]!r}")
        if b"chunked" not in headers.lower():
            raise RuntimeError(f"gateway: expected a chunked body: {headers!r}")
        times: list[float] = []
        parts: list[str] = []
        buf = b""
        done = False
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # end of the (empty) trailer section
                break
            data = await reader.readexactly(size + 2)
            now = time.perf_counter()
            buf += data[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue  # comments (pings), other fields
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    msg = json.loads(payload)
                    if "error" in msg:
                        raise RuntimeError(f"gateway: stream error {msg['error']}")
                    for choice in msg.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            times.append(now)
                            parts.append(content)
        end = time.perf_counter()
        if not done:
            raise RuntimeError("gateway: stream ended without [DONE]")
        return Sample(
            (times[0] - t0) * 1e3,
            [(b - a) * 1e3 for a, b in itertools.pairwise(times)],
            (end - t0) * 1e3,
            "".join(parts),
        )


def gateway_body(content: str, max_tokens: int, model: str = "llm") -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    ).encode()


# ------------------------------------------------------------------------------------------- cells


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class PathStats:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    triton_cpu_s: float = 0.0
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    wall_s: float = 0.0

    def add(self, s: Sample) -> None:
        self.ttft.append(s.ttft_ms)
        self.itl.extend(s.itl_ms)
        self.total.append(s.total_ms)

    def summary(self, idle: dict[str, float]) -> dict[str, float]:
        """`idle`: CPU seconds per second each process tree burns with no request in flight; the
        `*_net` figures subtract that rate over this path's wall time."""
        n = len(self.ttft) or 1
        out: dict[str, float] = {"streams": len(self.ttft), "itl_samples": len(self.itl)}
        for name, vals in (("ttft", self.ttft), ("itl", self.itl), ("total", self.total)):
            for q in (50, 90, 99):
                out[f"{name}_p{q}"] = pct(vals, q)
        out["triton_cpu_us_per_stream"] = self.triton_cpu_s / n * 1e6
        out["gateway_cpu_us_per_stream"] = self.gateway_cpu_s / n * 1e6
        out["client_cpu_us_per_stream"] = self.client_cpu_s / n * 1e6
        out["wall_s"] = self.wall_s
        for name, used in (("triton", self.triton_cpu_s), ("gateway", self.gateway_cpu_s)):
            out[f"{name}_cpu_us_per_stream_net"] = (used - idle[name] * self.wall_s) / n * 1e6
        return out


@dataclass
class Cell:
    conc: int
    tokens: int
    delay_ms: int
    model: str
    rep: int
    transport: str = "grpcio"
    load_before: str = ""
    load_after: str = ""
    direct: dict[str, float] = field(default_factory=dict)
    gateway: dict[str, float] = field(default_factory=dict)
    text_equal: bool = False
    reconnects: int = 0


async def run_cell(
    cell: Cell,
    rounds: int,
    per_worker: int,
    warmup: int,
    triton_addr: str,
    gw_port: int,
    gw_pids: list[int],
    triton_pids: list[int],
    idle: dict[str, float],
) -> Cell:
    content = pick_prompt(cell.tokens, cell.delay_ms)
    inputs = direct_inputs(chatml(content), cell.tokens)
    body = gateway_body(content, cell.tokens, cell.model)
    upstream_model = PUBLIC[cell.model]
    client = grpcaio.InferenceServerClient(triton_addr)
    conns = [HttpConn(gw_port) for _ in range(cell.conc)]
    for c in conns:
        await c.connect()
    try:
        # warm-up, and the correctness check: both paths say the same words
        ref = await direct_one(client, upstream_model, inputs)
        got = await conns[0].stream(body)
        if ref.text != got.text or len(ref.text.split()) != cell.tokens:
            raise SystemExit(f"text differs: direct {ref.text!r} vs gateway {got.text!r}")
        cell.text_equal = True
        for _ in range(warmup):
            await asyncio.gather(*(direct_one(client, upstream_model, inputs) for _ in range(cell.conc)))
            await asyncio.gather(*(c.stream(body) for c in conns))

        stats = {"direct": PathStats(), "gateway": PathStats()}

        async def direct_worker() -> list[Sample]:
            return [await direct_one(client, upstream_model, inputs) for _ in range(per_worker)]

        async def gateway_worker(conn: HttpConn) -> list[Sample]:
            return [await conn.stream(body) for _ in range(per_worker)]

        cell.load_before = loadavg()
        for r in range(rounds):
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for path in order:
                st = stats[path]
                g0, t0, c0 = proc_cpu_s(gw_pids), proc_cpu_s(triton_pids), time.process_time()
                w0 = time.perf_counter()
                if path == "direct":
                    results = await asyncio.gather(*(direct_worker() for _ in range(cell.conc)))
                else:
                    results = await asyncio.gather(*(gateway_worker(c) for c in conns))
                st.wall_s += time.perf_counter() - w0
                st.client_cpu_s += time.process_time() - c0
                st.triton_cpu_s += proc_cpu_s(triton_pids) - t0
                st.gateway_cpu_s += proc_cpu_s(gw_pids) - g0
                for samples in results:
                    for s in samples:
                        if s.text != ref.text:
                            raise SystemExit(f"{path}: text changed mid-run: {s.text!r}")
                        st.add(s)
        cell.load_after = loadavg()
        cell.reconnects = sum(c.reconnects for c in conns)
        cell.direct = stats["direct"].summary(idle)
        cell.gateway = stats["gateway"].summary(idle)
        return cell
    finally:
        for c in conns:
            c.close()
        await client.close()


# ------------------------------------------------------------------------------------------ report


def render(cell: Cell) -> str:
    d, g = cell.direct, cell.gateway
    lines = [
        f"### c={cell.conc}, {cell.tokens} tokens, delay {cell.delay_ms} ms/token, model `{cell.model}`"
        f" (run {cell.rep + 1}), gateway transport `{cell.transport}` — {int(d['streams'])} streams per path,"
        " texts equal: "
        f"{'yes' if cell.text_equal else 'NO'}; "
        f"gateway keep-alive reconnects {cell.reconnects}; "
        f"loadavg before {cell.load_before}, after {cell.load_after}",
        "",
        "| ms | direct p50 | p90 | p99 | gateway p50 | p90 | p99 | ratio p50 | ratio p99 "
        "| added p50 | added p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("ttft", "itl", "total"):
        dv = [d[f"{name}_p{q}"] for q in (50, 90, 99)]
        gv = [g[f"{name}_p{q}"] for q in (50, 90, 99)]
        lines.append(
            f"| {name.upper() if name != 'total' else 'total'} | "
            + " | ".join(f"{v:.3f}" for v in dv)
            + " | "
            + " | ".join(f"{v:.3f}" for v in gv)
            + f" | {gv[0] / dv[0]:.2f} | {gv[2] / dv[2]:.2f} | {gv[0] - dv[0]:+.3f} | {gv[2] - dv[2]:+.3f} |"
        )
    lines.append("")
    gn, tokens = g["gateway_cpu_us_per_stream_net"], cell.tokens
    lines.append(
        f"CPU per stream (/proc, 10 ms ticks; `net` = minus the idle rate over the path's wall time): "
        f"gateway {g['gateway_cpu_us_per_stream']:.0f} µs, net {gn:.0f} µs ({gn / tokens:.1f} µs/token); "
        f"Triton net {d['triton_cpu_us_per_stream_net']:.0f} µs direct vs "
        f"{g['triton_cpu_us_per_stream_net']:.0f} µs via gateway; "
        f"client (this process) {d['client_cpu_us_per_stream']:.0f} µs direct vs "
        f"{g['client_cpu_us_per_stream']:.0f} µs gateway"
    )
    return "\n".join(lines)


def measure_idle(trees: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """CPU seconds per second each process tree uses with nothing in flight (pollers, timers)."""
    before = {k: proc_cpu_s(v) for k, v in trees.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    return {k: (proc_cpu_s(v) - before[k]) / wall for k, v in trees.items()}


def wait_healthz(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited early ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("gateway not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,8")
    ap.add_argument("--tokens", default="48", help="comma list; the test model stops at 48 tokens at most")
    ap.add_argument("--delay-ms", default="0,10", help="comma list of per-token delays")
    ap.add_argument("--rounds", type=int, default=6, help="alternating direct/gateway rounds per cell")
    ap.add_argument("--streams", type=int, default=60, help="streams per path per cell (about)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up rounds per path per cell")
    ap.add_argument("--repeat-c1", type=int, default=2, help="run the concurrency-1 cells this many times")
    ap.add_argument("--ensemble", action="store_true", help="also the `ensemble` model (c=1 cells)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds to measure idle CPU rates")
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument(
        "--transport",
        default="grpcio",
        help="the Triton provider's gRPC client in the gateway: grpcio | h2, or a comma list"
        " (one gateway per transport, one after the other, against the same Triton)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.streams, args.warmup, args.repeat_c1, args.idle_s = 2, 10, 1, 1, 2.0
    concs = [int(x) for x in args.conc.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    delays = [int(x) for x in args.delay_ms.split(",")]
    for t in tokens:
        if t > testllm.MAX_TOKENS:
            sys.exit(f"--tokens {t}: the test model's natural length is at most {testllm.MAX_TOKENS}")

    transports = args.transport.split(",")
    for tr in transports:
        if tr not in ("grpcio", "h2"):
            sys.exit(f"--transport {tr}: expected grpcio or h2")
    plan: list[Cell] = []
    for rep in range(max(args.repeat_c1, 1)):
        for t in tokens:
            for delay in delays:
                for conc in concs:
                    if rep == 0 or conc == 1:
                        plan.append(Cell(conc, t, delay, "llm", rep))
                    if args.ensemble and conc == 1 and rep == 0:
                        plan.append(Cell(conc, t, delay, "llm-ensemble", rep))
    # the repeats run last, so they sample a different moment of the shared machine
    plan.sort(key=lambda c: c.rep)

    tmp = Path(tempfile.mkdtemp(prefix="fp-triton-stream-"))
    cells: list[Cell] = []
    load_start = loadavg()
    t_start = time.monotonic()
    idle: dict[str, float] = {}
    with LocalTriton(REPO / "triton_models", models=MODELS, log_path=tmp / "triton.log") as triton:
        for transport in transports:
            cfg = tmp / f"gateway-{transport}.yaml"
            cfg.write_text(
                "server: {host: 127.0.0.1}\n"
                "providers:\n"
                f"  - {{name: triton, kind: triton, base_url: 'grpc://{triton.grpc_address}',"
                f" transport: {transport}}}\n"
                "models:\n"
                + "".join(
                    f"  - {{name: {k}, provider: triton, upstream_model: {v}}}\n" for k, v in PUBLIC.items()
                )
            )
            port = free_port()
            gw = subprocess.Popen(
                [
                    str(REPO / ".venv/bin/python"),
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--config",
                    str(cfg),
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--log-level",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
            )
            try:
                wait_healthz(port, gw)
                gw_pids = tree(gw.pid)
                assert triton.pid is not None
                triton_pids = tree(triton.pid)  # tritonserver + its Python backend stubs
                idle = measure_idle({"gateway": gw_pids, "triton": triton_pids}, args.idle_s)
                print(
                    "  idle CPU (ms per s): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in idle.items()),
                    file=sys.stderr,
                )
                for base in plan:
                    cell = Cell(base.conc, base.tokens, base.delay_ms, base.model, base.rep, transport)
                    per_worker = max(1, math.ceil(args.streams / args.rounds / cell.conc))
                    asyncio.run(
                        run_cell(
                            cell,
                            args.rounds,
                            per_worker,
                            args.warmup,
                            triton.grpc_address,
                            port,
                            gw_pids,
                            triton_pids,
                            idle,
                        )
                    )
                    cells.append(cell)
                    d, g = cell.direct, cell.gateway
                    print(
                        f"  c={cell.conc} tok={cell.tokens} delay={cell.delay_ms} {cell.model} {transport} "
                        f"run{cell.rep + 1}: "
                        f"TTFT p50 {d['ttft_p50']:.3f} -> {g['ttft_p50']:.3f} ms, "
                        f"ITL p50 {d['itl_p50']:.3f} -> {g['itl_p50']:.3f} ms; load {cell.load_after}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                gw.terminate()
                gw.wait(10)
    from gateway import BUILD_PROFILE, __version__

    elapsed = time.monotonic() - t_start
    idle_note = ", ".join(f"{k} {v * 1e3:.1f} ms/s" for k, v in idle.items())
    print(
        "## Triton streaming: tritonclient direct vs through fastpath-gateway — "
        + time.strftime("%Y-%m-%d %H:%M")
    )
    print(
        f"machine: {os.cpu_count()} cores (shared), {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, fastpath-gateway {__version__} ({BUILD_PROFILE}), 1 worker; "
        f"{args.rounds} alternating rounds per cell, {args.warmup} warm-up rounds; "
        f"loadavg at start {load_start}, at end {loadavg()}; {elapsed:.0f} s; idle CPU {idle_note}\n"
    )
    for cell in cells:
        print(render(cell))
        print()
    print(
        "| cell | run | TTFT p50 d→g (added) | TTFT p99 d→g (added) | ITL p50 d→g (added) "
        "| ITL p99 d→g (added) "
        "| gw CPU µs/stream (net) | load after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in cells:
        d, g = c.direct, c.gateway

        def fmt(key: str, d: dict[str, float] = d, g: dict[str, float] = g) -> str:
            return f"{d[key]:.3f}→{g[key]:.3f} ({g[key] - d[key]:+.3f}, x{g[key] / d[key]:.2f})"

        print(
            f"| c={c.conc} {c.tokens} tok {c.delay_ms} ms {c.model} {c.transport} | {c.rep + 1} "
            f"| {fmt('ttft_p50')} "
            f"| {fmt('ttft_p99')} | {fmt('itl_p50')} | {fmt('itl_p99')} "
            f"| {g['gateway_cpu_us_per_stream_net']:.0f} | {c.load_after} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "load_start": load_start,
                    "idle_cpu_s_per_s": idle,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "cells": [asdict(c) for c in cells],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
