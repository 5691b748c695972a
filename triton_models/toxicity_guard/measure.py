"""Measure the toxicity guard: the classifier's latency per call through Triton (CPU), and what
the reply check adds to streams through a real gateway (TTFT, the end check before `[DONE]`,
the whole stream, CPU of the gateway and of the model's stub), next to /proc/loadavg.

    .venv/bin/python triton_models/toxicity_guard/measure.py [--streams 30]

Starts its own tritonserver (toxicity_guard only), the mock upstream and a gateway with two
models: `plain` (no guard) and `guarded` (`check: reply`, windows of 400 characters). The mock
streams ~1,500 characters (six sentences a window) at 2 ms a chunk.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))

from conftest import run_gateway, run_mock  # noqa: E402

from gateway.triton_local import LocalTriton  # noqa: E402

SENTENCE = "Revenue grew by twelve percent, driven by the new regions in the north. "
TEXT = SENTENCE * 21  # ~1,500 characters


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100  # utime + stime, clock ticks of 10 ms


def stub_pids(model: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"triton_python_backend_stub" in cmd and model.encode() in cmd:
                out.append(int(p.name))
    return out


def direct(grpc_address: str, n: int) -> None:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_address)
    cases = {
        "one sentence (72 chars)": [SENTENCE.strip()],
        "one window (6 sentences, batch [6,1])": [SENTENCE] * 6,
    }
    for name, texts in cases.items():
        inp = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
        c.infer("toxicity_guard", [inp])  # warm
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            c.infer("toxicity_guard", [inp])
            lat.append((time.perf_counter() - t0) * 1e3)
        print(f"| {name} | {n} | {pct(lat, 50):.1f} | {pct(lat, 99):.1f} | {loadavg()} |")
    c.close()


def stream(port: int, model: str) -> tuple[float, float, float, str]:
    """(TTFT ms, last content -> [DONE] ms, total ms, the classifier's comment)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "report"}]}
    body["mock"] = {"content": TEXT, "chunk_delay_ms": 2}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    ttft = last = done = 0.0
    note = ""
    buf = b""
    while True:
        line = r.fp.readline()
        if not line:
            break
        now = (time.perf_counter() - t0) * 1e3
        buf += line
        if line.startswith(b"data: {") and b'"content"' in line:
            ttft = ttft or now
            last = now
        elif line.startswith(b": x-fastpath-output-classifier"):
            note = line.decode().split()[-1]
        elif line.startswith(b"data: [DONE]"):
            done = now
            break
    conn.close()
    return ttft, done - last, done, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=30)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tox-measure-"))
    with LocalTriton(REPO / "triton_models", models=["toxicity_guard"], log_path=tmp / "triton.log") as tri:
        print("Classifier through Triton (gRPC, tritonclient, sequential calls)\n")
        print("| request | calls | p50 ms | p99 ms | loadavg |\n|---|---|---|---|---|")
        direct(tri.grpc_address, args.calls)
        with run_mock() as mock:
            cfg = f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: "http://127.0.0.1:{mock.port}/v1", api_key: sk-x}}
  - {{name: triton, kind: triton, base_url: "grpc://{tri.grpc_address}"}}
models:
  - {{name: plain, provider: mock, upstream_model: mock-echo}}
  - {{name: guarded, provider: mock, upstream_model: mock-echo}}
guards:
  - {{name: toxicity, kind: triton, provider: triton, model: toxicity_guard, check: reply,
      timeout_ms: 5000, window_chars: 400, models: [guarded]}}
"""
            with run_gateway(tmp, None, config_text=cfg) as gw:
                import subprocess

                workers = subprocess.run(
                    ["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True, check=False
                ).stdout.split()
                gw_pids = [gw.proc.pid, *map(int, workers)]
                stubs = stub_pids("toxicity_guard")
                n = args.streams
                print(f"\nStreams of {len(TEXT)} characters at 2 ms a chunk, {n} each, interleaved\n")
                res: dict[str, list[tuple[float, float, float, str]]] = {"plain": [], "guarded": []}
                cpu: dict[str, list[float]] = {"plain": [0.0, 0.0], "guarded": [0.0, 0.0]}
                for m in res:
                    stream(gw.port, m)  # warm
                for _ in range(args.streams):
                    for m in res:
                        g0, s0 = sum(map(cpu_s, gw_pids)), sum(map(cpu_s, stubs))
                        res[m].append(stream(gw.port, m))
                        cpu[m][0] += sum(map(cpu_s, gw_pids)) - g0
                        cpu[m][1] += sum(map(cpu_s, stubs)) - s0
                hdr = "| model | TTFT p50 / p99 ms | last text -> [DONE] p50 / p99 ms | stream p50 ms |"
                print(hdr + " gateway CPU ms / stream | model CPU ms / stream | windows | loadavg |")
                print("|---|---|---|---|---|---|---|---|")
                for m, rows in res.items():
                    t = [r[0] for r in rows]
                    e = [r[1] for r in rows]
                    total = [r[2] for r in rows]
                    wins = statistics.median(int(r[3].rsplit("=", 1)[1]) for r in rows) if rows[0][3] else 0
                    print(
                        f"| {m} | {pct(t, 50):.1f} / {pct(t, 99):.1f} | {pct(e, 50):.1f} / {pct(e, 99):.1f} "
                        f"| {pct(total, 50):.0f} | {cpu[m][0] * 1e3 / args.streams:.1f} "
                        f"| {cpu[m][1] * 1e3 / args.streams:.1f} | {wins} | {loadavg()} |"
                    )


if __name__ == "__main__":
    main()
