"""Shared fixtures: real processes on real sockets (the OpenAI-wire mock upstream, the gateway).

Integration tests start the server in its own process and wait for readiness (as granian's
own test suite does); nothing here is mocked in-process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ServerConfig
from gateway.triton_local import LocalTriton

REPO = Path(__file__).resolve().parents[2]

#: The HTTP server engine every gateway these tests start runs on (FASTPATH_TEST_ENGINE=granian |
#: uvloop; default: the config's default). `make test` runs the HTTP/1.1 suites on both.
ENGINE = os.environ.get("FASTPATH_TEST_ENGINE") or ServerConfig().engine.value


def assert_rss_bounded(run: Callable[[int], None], calls: int = 20_000, limit: int = 4 * 1024 * 1024) -> None:
    """Native hygiene (orjson's test_memory.py): after a warm-up, `calls` more calls must not
    grow RSS by more than `limit` bytes."""

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    run(2_000)  # warm-up: allocator arenas, lazily built tables
    gc.collect()
    before = rss_bytes()
    run(calls)
    gc.collect()
    growth = rss_bytes() - before
    assert growth < limit, f"RSS grew {growth} bytes over {calls} calls"


REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_or_skip(url: str = REDIS_URL) -> Any:
    """A redis-py client on the shared Redis, or skip (fail under CI: .ci/run starts one)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {url} (.ci/run starts one)")
    return client


def bare_worker(loop: Any) -> Any:
    """A `Worker` on `loop` with a one-provider config and no routes (adapters built by hand)."""
    from gateway.config import parse
    from gateway.worker import Worker

    cfg = parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
    )
    return Worker(cfg, loop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """For a fixture: a fresh PostgreSQL database (`<prefix>_<random>`), dropped afterwards; skip
    when psycopg or PostgreSQL is absent."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_DSN}: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def restartable_triton(log_path: Path, model: str = "testllm_core") -> tuple[int, Callable[[], LocalTriton]]:
    """A private tritonserver serving `model` on ports fixed up front, so a test can kill it and
    start it again at the same address: (its gRPC port, a factory for one run)."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()

    def server() -> LocalTriton:
        return LocalTriton(
            REPO / "triton_models",
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            models=[model],
            log_path=log_path,
        )

    return grpc_port, server


def run_local_cmd(port: int, upstream_port: int, triton_ports: tuple[int, int, int]) -> list[str]:
    """`fastpath-gateway run-local` on the given ports (Triton's: gRPC, HTTP, metrics)."""
    grpc, http, metrics = triton_ports
    return [
        sys.executable,
        "-m",
        "gateway.cli",
        "run-local",
        *("--port", str(port), "--upstream-port", str(upstream_port)),
        *("--triton-grpc-port", str(grpc), "--triton-http-port", str(http)),
        *("--triton-metrics-port", str(metrics)),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["FASTPATH_GATEWAY_ENGINE"] = ENGINE  # a config's own `server.engine` is overridden too
    # test parts loaded by gateways through `extensions:` (tests/python/contract_parts.py)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = here + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else here
    return env


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class MockUpstream:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def events(self) -> list[dict[str, object]]:
        import json

        with urllib.request.urlopen(f"{self.url}/_mock/events", timeout=5) as r:
            return list(json.loads(r.read())["events"])

    def clear(self) -> None:
        req = urllib.request.Request(f"{self.url}/_mock/events", method="DELETE")
        with urllib.request.urlopen(req, timeout=5):
            pass


@contextlib.contextmanager
def run_mock(port: int | None = None) -> Iterator[MockUpstream]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.dev.openai_mock", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        yield MockUpstream(port, proc)
    finally:
        stop(proc)


def gateway_config(upstream_port: int, **server: object) -> str:
    lines = ["server:", "  host: 127.0.0.1"]
    lines += [f"  {k}: {v}" for k, v in server.items()]
    lines += [
        "providers:",
        "  - name: mock",
        f"    base_url: http://127.0.0.1:{upstream_port}/v1",
        "    api_key: ${MOCK_UPSTREAM_KEY:-sk-upstream-secret}",
        "    first_byte_timeout_ms: 5000",
        "    idle_timeout_ms: 5000",
        "models:",
        "  - name: echo",
        "    provider: mock",
        "    upstream_model: mock-echo",
        "  - name: mock-echo",
        "    provider: mock",
        "  - name: slow",
        "    provider: mock",
        "    upstream_model: mock-slow",
        "  - name: gpt-4o-mini",
        "    provider: mock",
        "    upstream_model: mock-echo",
    ]
    return "\n".join(lines) + "\n"


class Gateway:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], upstream: MockUpstream | None) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.upstream = upstream


@contextlib.contextmanager
def run_gateway(
    tmp: Path,
    upstream: MockUpstream | None,
    workers: int = 1,
    config_text: str | None = None,
    log_level: str = "warning",
    output: Any = None,
    engine: str | None = None,
    ready: Callable[[int], bool] | None = None,
    **server: object,
) -> Iterator[Gateway]:
    """`output`: where the gateway's stdout and stderr (its logs) go; default: inherited.
    `engine`: this gateway's server engine (default: ENGINE). `ready(port)`: is it serving yet
    (default: GET /healthz answers), for gateways a plain request cannot reach."""
    port = free_port()
    cfg = tmp / f"gateway-{port}.yaml"
    if config_text is None:
        assert upstream is not None, "the default config routes to the mock upstream"
        config_text = gateway_config(upstream.port, **server)
    cfg.write_text(config_text)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            log_level,
        ],
        env=_env() | ({"FASTPATH_GATEWAY_ENGINE": engine} if engine else {}),
        stdout=output,
        stderr=output,
    )
    try:
        if ready is None:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        else:
            deadline = time.monotonic() + 20
            while not ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gateway on {port} not ready (exit status {proc.poll()})")
                time.sleep(0.05)
        yield Gateway(port, proc, upstream)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    with run_mock() as m:
        yield m


@pytest.fixture(scope="session")
def gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw"), mock_upstream) as g:
        yield g


# ---- Triton (issue 4): a real tritonserver on triton_models/ ----------------------------------


class TritonServer(LocalTriton):
    """`LocalTriton` plus the test models' event log (FASTPATH_TESTLLM_EVENTS)."""

    events_path: Path

    def events(self, request_id: str, **match: object) -> list[dict[str, Any]]:
        return read_events(self.events_path, request_id, **match)


def read_events(path: Path, request_id: str, **match: object) -> list[dict[str, Any]]:
    """The events of one request id whose fields equal `match` (e.g. model=..., event=...)."""
    import json

    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("id") == request_id and all(r.get(k) == v for k, v in match.items())]


def wait_event(
    path: Path, request_id: str, event: str, timeout_s: float = 5.0, **match: object
) -> dict[str, Any]:
    """Poll the event log until `event` appears for `request_id` (the models write it
    asynchronously, after the client may have seen the end); fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = read_events(path, request_id, event=event, **match)
        if found:
            return found[0]
        if time.monotonic() > deadline:
            seen = read_events(path, request_id)
            raise AssertionError(f"no {event!r} event for {request_id!r} within {timeout_s} s; seen: {seen}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver on the whole `triton_models/` repository, free ports, its own event log."""
    tmp = tmp_path_factory.mktemp("triton")
    events = tmp / "testllm-events.jsonl"
    server = TritonServer(
        REPO / "triton_models",
        log_path=tmp / "tritonserver.log",
        env={"FASTPATH_TESTLLM_EVENTS": str(events)},
    )
    server.events_path = events
    with server:
        yield server


# ---- TLS: a private CA (openssl) ------------------------------------------------------------------
def private_ca(tmp: Path, name: str = "server") -> tuple[Path, Path, Path]:
    """(CA cert, server cert for localhost + 127.0.0.1 signed by that CA, server key), made with
    openssl in `tmp`; `name` prefixes the server files (a second certificate from the same CA)."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca = tmp / "ca.key", tmp / "ca.pem"
    key, csr, cert = (tmp / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
    if not ca.exists():
        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
            "-days", "2", "-subj", "/CN=fastpath test CA")  # fmt: skip
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    ext = tmp / f"{name}-san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


# ---- object storage: a real S3-compatible server (moto in server mode) ----------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """One moto S3 server per session (tests/python/s3_server.py), its dummy credentials in the
    environment while it runs; tests take a fresh key prefix each (`s3_server.config()`)."""
    pytest.importorskip("moto", reason="moto[server] (the dev extra) is not installed")
    from s3_server import CREDENTIALS, run_s3_server

    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        with run_s3_server() as server:
            yield server
