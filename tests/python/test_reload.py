"""Hot reload (gateway.reload) on a real gateway with 2 workers and two real mock upstreams:
SIGHUP via `fastpath-gateway reload`, `POST /admin/reload`, an invalid file refused with the old
config kept, every attempt audited, and no failed request across 10 reloads under load."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MockUpstream, run_gateway, run_mock

from gateway.keystore import SqliteKeyStore

SALT = "reload-test-salt-0123456789"
ADMIN = "reload-admin-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello there"}]


def config_for(upstream: MockUpstream, tmp: Path, *, extra: str = "", port: int | None = None) -> str:
    """Model `m` served by `upstream`; a SQLite key store (the audit log) and an admin key."""
    server = "server:\n  host: 127.0.0.1\n" + (f"  port: {port}\n" if port is not None else "")
    return (
        server
        + "providers:\n"
        + f"  - {{name: up, base_url: 'http://127.0.0.1:{upstream.port}/v1', first_byte_timeout_ms: 5000}}\n"
        + "models:\n  - {name: m, provider: up, upstream_model: mock-echo}\n"
        + f"auth:\n  salt: {SALT}\n  store: {{kind: sqlite, path: '{tmp / 'keys.db'}'}}\n"
        + f"admin:\n  api_key: {ADMIN}\n"
        + extra
    )


def chat(port: int, stream: bool = False) -> int:
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": stream}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        return int(r.status)


def mock_stats(m: MockUpstream) -> dict[str, int]:
    with urllib.request.urlopen(f"{m.url}/_mock/stats", timeout=5) as r:
        return dict(json.loads(r.read()))


def completions(m: MockUpstream) -> int:
    """Chat completions the mock answered."""
    return int(mock_stats(m)["completions"])


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def reload_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "reload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def goes_to(port: int, target: MockUpstream, other: MockUpstream, n: int = 8) -> bool:
    """The next `n` requests (both workers: new connections) all reach `target`."""
    t0, o0 = completions(target), completions(other)
    for _ in range(n):
        assert chat(port) == 200
    return completions(target) - t0 == n and completions(other) == o0


ENGINES = pytest.mark.parametrize("engine", ["granian", "uvloop"])


@ENGINES
def test_reload_switches_upstream_refuses_invalid_and_audits(tmp_path: Path, engine: str) -> None:
    log_path = tmp_path / "gateway.log"
    with run_mock() as a, run_mock() as b, log_path.open("wb") as log:
        with run_gateway(
            tmp_path, None, workers=2, engine=engine, config_text=config_for(a, tmp_path), output=log
        ) as gw:
            path = tmp_path / f"gateway-{gw.port}.yaml"
            assert goes_to(gw.port, a, b)

            # SIGHUP through the CLI (pid file by port): new requests go to the new upstream
            path.write_text(config_for(b, tmp_path, port=gw.port + 1))
            done = reload_cli("--port", str(gw.port))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "config reloaded" in done.stdout and "server.port" in done.stdout  # needs a restart
            eventually(lambda: goes_to(gw.port, b, a))
            assert goes_to(gw.port, b, a, n=16)  # every worker swapped

            # an invalid file: refused with the path and the error; the old config keeps serving
            path.write_text(config_for(a, tmp_path) + "bogus_section: 1\n")
            refused = reload_cli("--port", str(gw.port))
            assert (
                refused.returncode == 1 and "refused" in refused.stdout and "bogus_section" in refused.stdout
            )
            time.sleep(0.5)
            assert goes_to(gw.port, b, a, n=16)

            # the admin route: a wrong key is refused (not audited), a bad file is a 422
            url = f"http://127.0.0.1:{gw.port}/admin/reload"
            assert admin_post(url, "wrong-admin-key-0123456789abcdef")[0] == 401
            status, answer = admin_post(url, ADMIN)
            assert status == 422 and "bogus_section" in answer["error"]
            path.write_text(config_for(a, tmp_path))
            status, answer = admin_post(url, ADMIN)
            assert status == 200 and answer["status"] == "reloaded", answer
            eventually(lambda: goes_to(gw.port, a, b))
            # the master's pid file; SIGHUP straight to it works the same
            pid_file = Path(".fastpath") / f"gateway-{gw.port}.pid"
            assert int(pid_file.read_text()) == gw.proc.pid
        assert not pid_file.exists()  # removed at shutdown
    logged = log_path.read_text(errors="replace")
    assert f"config reload refused: {path}: " in logged and "bogus_section" in logged
    assert "needs a restart" in logged
    store = SqliteKeyStore(tmp_path / "keys.db", SALT, readonly=True)
    try:
        rows = store.list_audit(None, 20, "config.reload")
    finally:
        store.close()
    got = [(e.actor, e.detail["result"]) for e in rows]
    assert got == [("signal", "ok"), ("signal", "refused"), ("admin-api", "refused"), ("admin-api", "ok")]
    assert rows[0].detail["needs_restart"] == ["server.port"]
    assert "bogus_section" in rows[1].detail["error"] and rows[1].target == str(path)
    assert rows[3].source.startswith("127.0.0.1")
    assert ADMIN not in json.dumps([e.detail for e in rows]) and ADMIN not in logged


def admin_post(url: str, key: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=b"", method="POST", headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@ENGINES
def test_no_failed_request_across_10_reloads_under_load(tmp_path: Path, engine: str) -> None:
    """Keep-alive clients (unary and streams) run while the config flips between two upstreams
    10 times: every request answers 200 and every connection stays up."""
    log_path = tmp_path / "gateway.log"
    with run_mock() as a, run_mock() as b, log_path.open("wb") as log:
        configs = [config_for(a, tmp_path), config_for(b, tmp_path)]
        with run_gateway(
            tmp_path, None, workers=2, engine=engine, config_text=configs[0], log_level="info", output=log
        ) as gw:
            path = tmp_path / f"gateway-{gw.port}.yaml"
            stop = threading.Event()
            ok, failed, reconnects = [0], [], [0]
            lock = threading.Lock()

            def client(stream: bool) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
                conn.connect()
                sock = conn.sock
                body = json.dumps({"model": "m", "messages": MESSAGES, "stream": stream})
                while not stop.is_set():
                    try:
                        conn.request(
                            "POST", "/v1/chat/completions", body, {"content-type": "application/json"}
                        )
                        r = conn.getresponse()
                        data = r.read()
                        good = r.status == 200 and (not stream or data.rstrip().endswith(b"data: [DONE]"))
                    except (OSError, http.client.HTTPException) as exc:
                        good, data = False, repr(exc).encode()
                    with lock:
                        if good:
                            ok[0] += 1
                        else:
                            failed.append(data[:200])
                    if conn.sock is not sock:  # http.client reconnected: a connection was dropped
                        reconnects[0] += 1
                        sock = conn.sock
                conn.close()

            threads = [threading.Thread(target=client, args=(i % 2 == 1,)) for i in range(4)]
            for t in threads:
                t.start()
            try:
                for i in range(10):
                    time.sleep(0.6)
                    path.write_text(configs[(i + 1) % 2])
                    os.kill(gw.proc.pid, signal.SIGHUP)
                time.sleep(1.0)
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            served_a, served_b = completions(a), completions(b)
            # the replaced generations closed once drained: their upstream connections are gone
            time.sleep(1.5)
            # (less the stats request's own connection)
            open_conns = [mock_stats(m)["open_connections"] - 1 for m in (a, b)]
    logged = log_path.read_text(errors="replace")
    assert logged.count("config reloaded from") == 20, logged[-3000:]  # 10 per worker
    assert "generation 10" in logged
    assert failed == [], failed[:5]
    assert open_conns[0] <= 8 and open_conns[1] == 0, open_conns  # the last config is a's
    assert reconnects[0] == 0
    assert ok[0] > 100
    assert served_a > 0 and served_b > 0  # both configs served requests
