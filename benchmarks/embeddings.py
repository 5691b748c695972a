"""Gateway overhead per `POST /v1/embeddings` request: direct vs through the gateway, sequential
requests on one keep-alive connection (latency, not throughput), medians and p90 in µs.

- `wire`: the repo's OpenAI-wire mock (`text-embedding-3-small`, 1536-d) direct vs through a
  one-worker gateway (no auth, no guards: the pipeline's fixed cost), for float and base64
  replies and for 1 and 16 inputs;
- `triton` (with `--triton`): `minilm_embed` on a real tritonserver, direct over gRPC
  (tritonclient) vs through the gateway (the unary ModelInfer path); the model's own time
  (~tens of ms on CPU) dominates, so only the median difference means anything there.

Rounds alternate direct and gateway so load drifts hit both; the load average is printed, since
on a 2-core box other work moves these numbers by more than the overhead itself.

    .venv/bin/python benchmarks/embeddings.py [--requests 2000] [--rounds 3] [--triton]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))

from conftest import REPO, TritonServer, run_gateway, run_mock


def timed(call: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


def poster(port: int, path: str, body: bytes) -> Callable[[], None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": "application/json"}

    def call() -> None:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {data[:200]!r}")

    return call


def compare(name: str, direct: Callable[[], None], gateway: Callable[[], None], n: int, rounds: int) -> None:
    d_all: list[float] = []
    g_all: list[float] = []
    for _ in range(rounds):
        timed(direct, max(n // 20, 5))  # warm-up
        d_all += timed(direct, n)
        timed(gateway, max(n // 20, 5))
        g_all += timed(gateway, n)
    d_med, g_med = statistics.median(d_all), statistics.median(g_all)
    d_p90 = statistics.quantiles(d_all, n=10)[-1]
    g_p90 = statistics.quantiles(g_all, n=10)[-1]
    print(
        f"{name:34s} direct {d_med:9.1f} µs (p90 {d_p90:9.1f})  gateway {g_med:9.1f} µs (p90 {g_p90:9.1f})"
        f"  overhead {g_med - d_med:8.1f} µs   load {os.getloadavg()[0]:.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--triton", action="store_true", help="also minilm_embed on a real tritonserver")
    args = ap.parse_args()
    print(f"loadavg at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus {os.cpu_count()}")
    one = ["The quick brown fox jumps over the lazy dog."]
    many = [f"sentence number {i} about rivers, boats and the sea" for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp, run_mock() as mock:
        providers = [f"  - {{name: mock, base_url: 'http://127.0.0.1:{mock.port}/v1'}}"]
        models = ["  - {name: e, kind: embedding, provider: mock, upstream_model: text-embedding-3-small}"]
        triton = None
        if args.triton:
            triton = TritonServer(REPO / "triton_models", models=["minilm_embed"])
            triton.events_path = Path(tmp) / "events"
            triton.start()
            triton.wait_ready()
            providers.append(f"  - {{name: tri, kind: triton, base_url: 'grpc://{triton.grpc_address}'}}")
            models.append("  - {name: m, kind: embedding, provider: tri, upstream_model: minilm_embed}")
        text = (
            "server: {host: 127.0.0.1}\nproviders:\n"
            + "\n".join(providers)
            + "\nmodels:\n"
            + "\n".join(models)
        )
        try:
            with run_gateway(Path(tmp), None, config_text=text + "\n", workers=1) as gw:
                for inputs, label in ((one, "1 input"), (many, "16 inputs")):
                    for fmt in ("float", "base64"):
                        direct = json.dumps(
                            {"model": "text-embedding-3-small", "input": inputs, "encoding_format": fmt}
                        ).encode()
                        via = json.dumps({"model": "e", "input": inputs, "encoding_format": fmt}).encode()
                        compare(
                            f"wire 1536-d {label}, {fmt}",
                            poster(mock.port, "/v1/embeddings", direct),
                            poster(gw.port, "/v1/embeddings", via),
                            args.requests,
                            args.rounds,
                        )
                if triton is not None:
                    import numpy as np
                    import tritonclient.grpc as grpcclient

                    client = grpcclient.InferenceServerClient(triton.grpc_address)

                    def triton_direct() -> None:
                        inp = grpcclient.InferInput("text", [1], "BYTES")
                        inp.set_data_from_numpy(np.array([one[0].encode()], dtype=object))
                        client.infer("minilm_embed", [inp])

                    for fmt in ("float", "base64"):
                        via = json.dumps({"model": "m", "input": one, "encoding_format": fmt}).encode()
                        compare(
                            f"triton minilm 384-d 1 input, {fmt}",
                            triton_direct,
                            poster(gw.port, "/v1/embeddings", via),
                            max(args.requests // 10, 20),
                            args.rounds,
                        )
        finally:
            if triton is not None:
                triton.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
