"""The usage ledger (stage `account`, `gateway.ledger`), `GET /v1/usage` and `fastpath-gateway
usage`: real gateways on real sockets writing real SQLite files and a real PostgreSQL database
(one created per test session and dropped after it), traffic through the repo's mock upstream."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, gateway_config, pg_database, run_gateway

from gateway import config as config_mod
from gateway import ledger

ALICE = "sk-ledger-alice-0123456789abcdef"
BOB = "sk-ledger-bob-0123456789abcdef"
ADMIN = "adm-ledger-0123456789abcdef0123456789"
SALT = "salt-ledger-tests-0123456789"
# echo: 1 USD / Mtok in, 2 USD / Mtok out -> 1,000 / 2,000 nano-USD per token
PRICE_IN, PRICE_OUT = 1_000, 2_000


# ---- helpers ------------------------------------------------------------------------------------
def request(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
    timeout: float = 20,
) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def chat(model: str = "echo", text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def usage(port: int, query: str = "", key: str | None = ADMIN) -> tuple[int, Any]:
    status, raw = request(port, "GET", f"/v1/usage{query}", key=key)
    return status, json.loads(raw)


def wait_for(pred: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def ledger_yaml(store: str, **fields: object) -> str:
    lines = ["ledger:", "  enabled: true", *store.splitlines()]
    lines += [f"  {k}: {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def config_text(upstream_port: int, store: str, *, admin: bool = True, **ledger_fields: object) -> str:
    text = gateway_config(upstream_port)
    text += f"""
auth:
  enabled: true
  salt: {SALT}
  keys:
    - id: alice
      key: {ALICE}
      team: red
    - id: bob
      key: {BOB}
      team: blue
      tier: pro
tiers:
  default: {{}}
  pro: {{}}
prices:
  echo: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
"""
    if admin:
        text += "admin:\n  api_key: ${TEST_LEDGER_ADMIN_KEY}\n"
    return text + ledger_yaml(store, **ledger_fields)


class Store:
    """One ledger backend under test: its YAML lines and a way to read every row."""

    def __init__(self, kind: str, yaml: str, rows: Callable[[], list[dict[str, Any]]], cfg: str) -> None:
        self.kind = kind
        self.yaml = yaml
        self.rows = rows
        self.cfg = cfg


def sqlite_store(path: Path) -> Store:
    def rows() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        conn = sqlite3.connect(path)
        try:
            cur = conn.execute(f"SELECT {', '.join(ledger.COLUMNS)} FROM fastpath_usage ORDER BY ts")
            return [dict(zip(ledger.COLUMNS, r, strict=True)) for r in cur.fetchall()]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    return Store("sqlite", f"  kind: sqlite\n  path: {path}", rows, f"kind: sqlite\npath: {path}")


def pg_store(dsn: str) -> Store:
    import psycopg

    def rows() -> list[dict[str, Any]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                cur = conn.execute(f"SELECT {', '.join(ledger.COLUMNS)} FROM fastpath_usage ORDER BY ts")
            except psycopg.errors.UndefinedTable:
                return []
            return [dict(zip(ledger.COLUMNS, r, strict=True)) for r in cur.fetchall()]

    return Store("postgres", f"  kind: postgres\n  dsn: {dsn}", rows, f"kind: postgres\ndsn: {dsn}")


def pg_truncate(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn, contextlib.suppress(psycopg.errors.UndefinedTable):
        conn.execute("TRUNCATE fastpath_usage")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A fresh database for this session, dropped afterwards; skip when PostgreSQL is absent."""
    with pg_database("fastpath_ledger_test") as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "ledger" / "usage.db")
    dsn = request.getfixturevalue("pg_dsn")
    pg_truncate(dsn)
    return pg_store(dsn)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_LEDGER_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path / "data"))


def abort_after(port: int, body: dict[str, Any], seconds: float, key: str = ALICE) -> None:
    """Send a request and close the connection `seconds` later without reading the answer."""
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(raw), raw)
        )
        time.sleep(seconds)


def stream(port: int, body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    status, raw = request(port, "POST", "/v1/chat/completions", {**body, "stream": True}, key=key)
    assert status == 200, raw
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- end to end ---------------------------------------------------------------------------------
def test_rows_for_every_outcome_and_usage_summaries(
    mock_upstream: MockUpstream, tmp_path: Path, store: Store
) -> None:
    """Success, stream, upstream error, 4xx (auth, model, body) and a client abort each leave
    one row with the right status, error code, principal, tokens and cost; `GET /v1/usage`
    aggregates them by key, team, model and day exactly; admin auth; the CLI prints the same."""
    text = config_text(mock_upstream.port, store.yaml, flush_interval_ms=50)
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        sent: dict[str, int] = {}
        for i in range(3):
            status, raw = request(gw.port, "POST", "/v1/chat/completions", chat(text=f"a b c {i}"), ALICE)
            assert status == 200, raw
        ok = json.loads(raw)["usage"]
        chunks = stream(gw.port, chat(text="x y", stream_options={"include_usage": True}), BOB)
        streamed = chunks[-1]["usage"]
        stream(gw.port, chat(text="one two three"), BOB)
        status, _ = request(gw.port, "POST", "/v1/chat/completions", chat(mock={"status": 500}), BOB)
        assert status == 502
        status, _ = request(gw.port, "POST", "/v1/chat/completions", chat(), "sk-not-a-key-000000000")
        assert status == 401
        status, _ = request(gw.port, "POST", "/v1/chat/completions", chat(model="nope"), ALICE)
        assert status == 404
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"})
        assert conn.getresponse().status == 400
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", b"{}", {"content-type": "text/plain"})
        assert conn.getresponse().status == 415
        conn.close()
        abort_after(gw.port, chat(mock={"first_delay_ms": 20_000}), 0.4)
        # a stream the client leaves after its first event
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        body = chat(stream=True, mock={"words": 100, "chunk_delay_ms": 50})
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body).encode(), {"authorization": f"Bearer {BOB}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conn.close()
        status, _ = request(
            gw.port, "POST", "/v1/completions", {"model": "echo", "prompt": "p q", "max_tokens": 5}, ALICE
        )
        assert status == 200
        sent["total"] = 3 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1

        rows = wait_for(lambda: len(store.rows()) >= sent["total"] and store.rows(), 15)
        assert len(rows) == sent["total"], rows
        by_status: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            by_status.setdefault(r["status"], []).append(r)
        assert sorted(by_status) == [200, 400, 401, 404, 415, 499, 502]
        [legacy] = [r for r in by_status[200] if r["endpoint"] == "completions"]
        assert (legacy["key_id"], legacy["model"], legacy["status"]) == ("alice", "echo", 200)
        oks = [r for r in by_status[200] if r["endpoint"] == "chat"]
        assert len(oks) == 5
        alice_ok = [r for r in oks if r["key_id"] == "alice"]
        assert len(alice_ok) == 3
        for r in alice_ok:
            assert (r["team"], r["tier"], r["model"], r["upstream_model"]) == (
                "red",
                "default",
                "echo",
                "mock-echo",
            )
            assert (r["provider"], r["attempts"], r["cache"]) == ("mock", 1, None)
            assert not r["stream"] and r["error_code"] is None and r["endpoint"] == "chat"
            assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
            assert r["cost_nano_usd"] == r["prompt_tokens"] * PRICE_IN + r["completion_tokens"] * PRICE_OUT
            assert r["latency_ms"] > 0 and r["day"] == time.strftime("%Y-%m-%d", time.gmtime(r["ts"]))
        assert alice_ok[-1]["prompt_tokens"] == ok["prompt_tokens"]
        assert alice_ok[-1]["completion_tokens"] == ok["completion_tokens"]
        bob_streams = [r for r in oks if r["key_id"] == "bob"]
        assert len(bob_streams) == 2 and all(r["stream"] for r in bob_streams)
        assert {(r["team"], r["tier"]) for r in bob_streams} == {("blue", "pro")}
        first = min(bob_streams, key=lambda r: r["ts"])
        assert (first["prompt_tokens"], first["completion_tokens"]) == (
            streamed["prompt_tokens"],
            streamed["completion_tokens"],
        )
        assert [(r["key_id"], r["error_code"]) for r in by_status[502]] == [("bob", "upstream_error")]
        assert by_status[502][0]["attempts"] >= 1  # tried, then failed
        assert [(r["key_id"], r["error_code"]) for r in by_status[401]] == [(None, "unauthorized")]
        assert [(r["key_id"], r["model"], r["error_code"]) for r in by_status[404]] == [
            ("alice", None, "model_not_found")
        ]
        for r in by_status[400] + by_status[401] + by_status[404] + by_status[415]:  # no upstream attempt
            assert (r["provider"], r["upstream_model"], r["attempts"]) == (None, None, 0)
        assert [r["error_code"] for r in by_status[400]] == ["invalid_json"]
        assert [r["error_code"] for r in by_status[415]] == ["unsupported_media_type"]
        aborted, left = sorted(by_status[499], key=lambda r: r["stream"])
        assert (aborted["key_id"], aborted["model"], aborted["error_code"]) == (
            "alice",
            "echo",
            "client_disconnected",
        )
        assert 300 < aborted["latency_ms"] < 10_000
        assert (left["key_id"], left["stream"], left["error_code"]) == ("bob", True, "client_disconnected")
        assert left["prompt_tokens"] > 0 and left["completion_tokens"] < 100  # what arrived

        # ---- GET /v1/usage: admin only
        assert usage(gw.port, key=None)[0] == 401
        assert usage(gw.port, key="wrong-admin-key-0123456789abcdef0123")[0] == 401
        assert usage(gw.port, key=ALICE)[0] == 401  # an API key is not the admin key
        status, body = usage(gw.port, "?group_by=bogus")
        assert status == 400 and "group_by" in body["error"]["message"]
        assert usage(gw.port, "?since=2024-13-01")[0] == 400
        assert usage(gw.port, "?color=red")[0] == 400

        def expect(
            group_of: Callable[[dict[str, Any]], str | None], only: list[dict[str, Any]] | None = None
        ) -> list[dict[str, Any]]:
            groups: dict[str | None, list[dict[str, Any]]] = {}
            for r in rows if only is None else only:
                groups.setdefault(group_of(r), []).append(r)
            out = []
            for g in sorted(groups, key=lambda g: g or ""):
                rs = groups[g]
                lat = sorted(r["latency_ms"] for r in rs)
                n = len(lat)
                p50 = (lat[(n - 1) // 2] + lat[n // 2]) / 2
                out.append(
                    {
                        "group": g,
                        "requests": n,
                        "prompt_tokens": sum(r["prompt_tokens"] for r in rs),
                        "completion_tokens": sum(r["completion_tokens"] for r in rs),
                        "cost_usd": sum(r["cost_nano_usd"] for r in rs) / 1e9,
                        "errors": sum(r["status"] >= 400 for r in rs),
                        "p50_latency_ms": round(p50, 3),
                        "attempts": sum(r["attempts"] for r in rs),
                        "cache_hits": sum(r["cache"] in ("hit", "shared") for r in rs),
                        "cached_tokens": sum(r["cached_tokens"] for r in rs),
                    }
                )
            return out

        def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
            assert [{k: v for k, v in g.items() if k != "p50_latency_ms"} for g in got] == [
                {k: v for k, v in w.items() if k != "p50_latency_ms"} for w in want
            ]
            for g, w in zip(got, want, strict=True):
                assert g["p50_latency_ms"] == pytest.approx(w["p50_latency_ms"], abs=0.002)

        status, body = usage(gw.port)
        assert status == 200 and body["group_by"] == "key" and body["object"] == "usage.summary"
        same(body["data"], expect(lambda r: r["key_id"]))
        alice = next(g for g in body["data"] if g["group"] == "alice")
        alice_rows = [r for r in rows if r["key_id"] == "alice"]
        assert alice["requests"] == 6 and alice["errors"] == 2  # 404 + 499
        assert alice["prompt_tokens"] == sum(r["prompt_tokens"] for r in alice_rows)
        assert alice["cost_usd"] == pytest.approx(
            sum(
                r["prompt_tokens"] * 1e-6 + r["completion_tokens"] * 2e-6
                for r in alice_rows
                if r["status"] == 200
            )
            + sum(r["cost_nano_usd"] for r in alice_rows if r["status"] != 200) / 1e9
        )
        for group_by, column in (
            ("team", "team"),
            ("model", "model"),
            ("provider", "provider"),
            ("day", "day"),
        ):
            status, body = usage(gw.port, f"?group_by={group_by}")
            assert status == 200, body
            same(body["data"], expect(lambda r, c=column: r[c]))  # type: ignore[misc]
        today = time.strftime("%Y-%m-%d", time.gmtime())
        status, body = usage(gw.port, f"?group_by=model&team=blue&since={today}&until={today}")
        blue = [r for r in rows if r["team"] == "blue"]
        assert status == 200 and len(body["data"]) == 1
        same(body["data"], expect(lambda r: r["model"], blue))
        status, body = usage(gw.port, "?group_by=team&key=alice&model=echo")
        assert [(g["group"], g["requests"]) for g in body["data"]] == [("red", 5)]
        status, body = usage(gw.port, "?since=2000-01-01&until=2000-01-02")
        assert status == 200 and body["data"] == []

        # ---- the CLI reads the store directly: the same numbers
        cfg_file = tmp_path / "cli.yaml"
        cfg_file.write_text(text)
        cli = cli_usage(cfg_file, "--group-by", "team", "--json")
        same(json.loads(cli)["data"], expect(lambda r: r["team"]))
        table = cli_usage(cfg_file, "--group-by", "key").splitlines()
        assert table[0].split() == [
            "KEY", "REQUESTS", "PROMPT", "COMPLETION", "COST_USD", "ERRORS", "P50_MS", "ATTEMPTS", "CACHED",
        ]  # fmt: skip
        assert table[1].split()[:2] == ["-", "3"]  # anonymous: 401, 400, 415
        assert table[2].split()[:2] == ["alice", "6"]
        assert table[3].split()[:2] == ["bob", "4"]


def test_stream_ended_by_an_error_event_records_its_code(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """A stream that started (200) and then ended with an error event keeps that event's code."""
    store = sqlite_store(tmp_path / "ledger" / "usage.db")
    text = config_text(mock_upstream.port, store.yaml, flush_interval_ms=50)
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        body = {**chat(mock={"words": 20, "drop_after_chunks": 2}), "stream": True}
        status, raw = request(gw.port, "POST", "/v1/chat/completions", body, key=BOB)
        assert status == 200 and b"upstream_bad_response" in raw
        stream(gw.port, chat(), BOB)
        rows = wait_for(lambda: len(store.rows()) >= 2 and store.rows(), 15)
    failed, fine = sorted(rows, key=lambda r: r["error_code"] is None)
    assert (failed["status"], failed["stream"], failed["error_code"]) == (200, True, "upstream_bad_response")
    assert (fine["status"], fine["error_code"]) == (200, None)


def cli_usage(cfg: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_usage_route_404_when_ledger_off_and_403_without_admin_key(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    with run_gateway(tmp_path, mock_upstream) as gw:
        assert usage(gw.port)[0] == 404
    text = config_text(mock_upstream.port, sqlite_store(tmp_path / "u.db").yaml, admin=False)
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        status, body = usage(gw.port)
        assert status == 403 and body["error"]["type"] == "permission_error"


def test_sigterm_drains_every_row_with_requests_in_flight(
    mock_upstream: MockUpstream, tmp_path: Path, store: Store
) -> None:
    """No periodic flush (an hour) and huge batches: every row is written by the shutdown drain
    of both workers, also those of requests still in flight when SIGTERM arrived."""
    text = config_text(mock_upstream.port, store.yaml, flush_interval_ms=3_600_000, batch_max_rows=100_000)
    with run_gateway(tmp_path, mock_upstream, workers=2, config_text=text) as gw:
        statuses: list[int] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            body = chat(text=f"req {i}", mock={"first_delay_ms": 1_500 if i % 2 else 0})
            status, _ = request(gw.port, "POST", "/v1/chat/completions", body, ALICE if i % 3 else BOB)
            with lock:
                statuses.append(status)

        for i in range(10):  # done before SIGTERM
            one(i * 2)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 21, 2)]  # slow: in flight
        for t in threads:
            t.start()
        time.sleep(0.6)
        assert store.rows() == []  # nothing flushed yet
        gw.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert gw.proc.wait(20) == 0
    assert statuses == [200] * 20
    rows = store.rows()
    assert len(rows) == 20
    assert sorted(int(r["request_id"] != "") for r in rows) == [1] * 20
    assert {r["status"] for r in rows} == {200}
    assert sum(r["key_id"] == "alice" for r in rows) == sum(1 for i in range(20) if i % 3)


def test_queue_full_drops_are_counted_and_logged(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """A queue of 2 rows and no flush until shutdown: 2 rows written, 3 dropped and logged;
    the requests themselves are not affected."""
    path = tmp_path / "full.db"
    text = config_text(mock_upstream.port, sqlite_store(path).yaml, max_queue=2, flush_interval_ms=3_600_000)
    log_file = tmp_path / "gw.log"
    with (
        open(log_file, "wb") as out,
        run_gateway(tmp_path, mock_upstream, config_text=text, output=out) as gw,
    ):
        for i in range(5):
            assert request(gw.port, "POST", "/v1/chat/completions", chat(text=str(i)), ALICE)[0] == 200
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(20) == 0
    assert len(sqlite_store(path).rows()) == 2
    logs = log_file.read_text()
    assert "queue full" in logs and "3 usage rows were dropped" in logs


def test_postgres_batches_many_requests_into_few_transactions(
    mock_upstream: MockUpstream, tmp_path: Path, pg_dsn: str
) -> None:
    """40 requests, batches of 10, no timed flush: exactly 4 transactions (rows of one
    PostgreSQL transaction share their `xmin`)."""
    import psycopg

    pg_truncate(pg_dsn)
    text = config_text(
        mock_upstream.port, pg_store(pg_dsn).yaml, flush_interval_ms=3_600_000, batch_max_rows=10
    )
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        for i in range(40):
            assert request(gw.port, "POST", "/v1/chat/completions", chat(text=str(i)), ALICE)[0] == 200

        def xacts() -> list[int]:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                cur = conn.execute("SELECT count(*), count(DISTINCT xmin::text) FROM fastpath_usage")
                row = cur.fetchone()
                assert row is not None
                return [int(row[0]), int(row[1])]

        assert wait_for(lambda: xacts()[0] == 40) is True
        assert xacts() == [40, 4]


def test_sqlite_workers_share_one_file(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """Two workers, one WAL file, concurrent writers: every row lands."""
    path = tmp_path / "shared.db"
    text = config_text(mock_upstream.port, sqlite_store(path).yaml, flush_interval_ms=20, batch_max_rows=3)
    with run_gateway(tmp_path, mock_upstream, workers=2, config_text=text) as gw:
        threads = [
            threading.Thread(
                target=lambda i=i: [
                    request(gw.port, "POST", "/v1/chat/completions", chat(text=f"{i} {j}"), BOB)
                    for j in range(10)
                ]
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*), count(DISTINCT request_id) FROM fastpath_usage").fetchone() == (
            40,
            40,
        )
    finally:
        conn.close()


# ---- the writer, in process ---------------------------------------------------------------------
def make_row(i: int, key: str = "k") -> ledger.Row:
    return (f"r{i}", 1_700_000_000.0 + i, "2023-11-14", key, "t", "default", "chat", "echo", "mock-echo",
            False, 200, None, 3, 4, 11_000, 1.5, "mock", 1, None, None, 0, None)  # fmt: skip


class CountingSink:
    def __init__(self, inner: ledger.Sink, fail_times: int = 0) -> None:
        self.inner = inner
        self.calls: list[int] = []
        self.fail_times = fail_times

    def write(self, rows: Sequence[ledger.Row], *, only_new: bool = False) -> int:
        if self.fail_times:
            self.fail_times -= 1
            raise ledger.LedgerError("store down (test)")
        self.calls.append(len(rows))
        return self.inner.write(rows, only_new=only_new)

    def close(self) -> None:
        self.inner.close()


def run_writer(
    sink: ledger.Sink, body: Callable[[ledger.LedgerWriter], Any], **kw: Any
) -> ledger.LedgerWriter:
    loop = asyncio.new_event_loop()
    opts: dict[str, Any] = {"batch_max_rows": 100, "flush_interval_s": 3600.0, "max_queue": 10_000} | kw
    writer = ledger.LedgerWriter(sink, **opts)
    try:
        writer.start(loop)
        loop.run_until_complete(body(writer))
        writer.close(loop)
    finally:
        loop.close()
    return writer


def count_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM fastpath_usage").fetchone()[0])
    finally:
        conn.close()


def test_writer_batches_by_size(tmp_path: Path) -> None:
    sink = CountingSink(ledger.SqliteSink(tmp_path / "u.db", 5.0))

    async def body(w: ledger.LedgerWriter) -> None:
        for i in range(1_000):
            w.append(make_row(i))
        await asyncio.sleep(0.5)

    w = run_writer(sink, body, batch_max_rows=250)
    assert sink.calls == [250, 250, 250, 250]
    assert (w.written, w.batches, w.dropped) == (1_000, 4, 0)
    assert count_rows(tmp_path / "u.db") == 1_000


def test_writer_flushes_on_the_interval(tmp_path: Path) -> None:
    sink = CountingSink(ledger.SqliteSink(tmp_path / "u.db", 5.0))

    async def body(w: ledger.LedgerWriter) -> None:
        for i in range(7):
            w.append(make_row(i))
        await asyncio.sleep(0.3)
        assert sink.calls == [7]

    run_writer(sink, body, flush_interval_s=0.05)


def test_writer_queue_full_drops_and_counts_never_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = CountingSink(ledger.SqliteSink(tmp_path / "u.db", 5.0))

    async def body(w: ledger.LedgerWriter) -> None:
        t = time.perf_counter()
        for i in range(25):
            w.append(make_row(i))
        assert time.perf_counter() - t < 0.05
        assert (w.queued, w.dropped) == (10, 15)

    w = run_writer(sink, body, max_queue=10, batch_max_rows=1_000)
    assert (w.written, w.dropped) == (10, 15)
    assert count_rows(tmp_path / "u.db") == 10
    assert "queue full" in caplog.text


def test_writer_keeps_rows_while_the_store_is_down(tmp_path: Path) -> None:
    sink = CountingSink(ledger.SqliteSink(tmp_path / "u.db", 5.0), fail_times=2)

    async def body(w: ledger.LedgerWriter) -> None:
        for i in range(5):
            w.append(make_row(i))
        assert not await w.flush()
        assert not await w.flush()
        assert w.queued == 5 and w.failures == 2
        assert await w.flush()

    w = run_writer(sink, body)
    assert (w.written, w.dropped) == (5, 0)
    conn = sqlite3.connect(tmp_path / "u.db")
    try:
        assert [r[0] for r in conn.execute("SELECT request_id FROM fastpath_usage ORDER BY rowid")] == [
            f"r{i}" for i in range(5)
        ]
    finally:
        conn.close()


def test_writer_spills_to_a_file_when_the_store_is_down_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = CountingSink(ledger.SqliteSink(tmp_path / "u.db", 5.0), fail_times=1_000)

    async def body(w: ledger.LedgerWriter) -> None:
        for i in range(3):
            w.append(make_row(i))

    run_writer(sink, body)
    [spill] = ledger.spill_files()
    lines = [json.loads(x) for x in spill.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["r0", "r1", "r2"]
    assert set(lines[0]) == set(ledger.COLUMNS)
    assert "spilled" in caplog.text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )


def test_load_spills_puts_spilled_rows_into_the_store_exactly_once(tmp_path: Path, store: Store) -> None:
    """Rows a worker spilled (store down at shutdown) reach the store through `load-spills`, the
    file goes; a copy of the file loaded again (a load cut short after its commit) adds nothing."""
    down = CountingSink(ledger.SqliteSink(tmp_path / "down.db", 5.0), fail_times=1_000)

    async def body(w: ledger.LedgerWriter) -> None:
        for i in range(4):
            w.append(make_row(i, key="spilled"))

    run_writer(down, body)
    [spill] = ledger.spill_files()
    kept = spill.read_bytes()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(BASE + "ledger:\n  enabled: true\n" + textwrap.indent(store.cfg, "  ") + "\n")
    if store.kind == "sqlite":  # an existing row must not block the others
        ledger.SqliteSink(Path(store.yaml.split("path: ")[1]), 5.0).write([make_row(9, key="live")])
    out = run_cli("load-spills", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "4 rows loaded" in out.stdout and not spill.exists()
    rows = store.rows()
    spilled = [r for r in rows if r["key_id"] == "spilled"]
    assert [
        (r["request_id"], r["ts"], r["prompt_tokens"], r["cost_nano_usd"], bool(r["stream"])) for r in spilled
    ] == [(f"r{i}", 1_700_000_000.0 + i, 3, 11_000, False) for i in range(4)]

    spill.write_bytes(kept)  # the same rows again, plus one new
    with spill.open("a") as f:
        f.write(json.dumps(dict(zip(ledger.COLUMNS, make_row(7, key="spilled"), strict=True))) + "\n")
    out = run_cli("load-spills", "--config", str(cfg), str(spill))
    assert out.returncode == 0, out.stderr
    assert "1 rows loaded (4 already stored)" in out.stdout
    assert sorted(r["request_id"] for r in store.rows() if r["key_id"] == "spilled") == [
        "r0",
        "r1",
        "r2",
        "r3",
        "r7",
    ]

    out = run_cli("load-spills", "--config", str(cfg))
    assert out.returncode == 0 and "no spill files" in out.stdout


def test_load_spills_keeps_a_file_it_cannot_read(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(BASE + f"ledger: {{enabled: true, path: {db}}}\n")
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "usage-spill-1-1.jsonl"
    good_line = json.dumps(dict(zip(ledger.COLUMNS, make_row(1), strict=True)))
    bad.write_text(good_line + "\n" + '{"request_id": "x"}\n')
    out = run_cli("load-spills", "--config", str(cfg))
    assert out.returncode == 1 and f"{bad}:2: not a usage row" in out.stderr
    assert bad.exists()
    assert ledger.query_usage(config_mod.LedgerConfig(enabled=True, path=str(db)), ledger.UsageQuery()) == []
    off = tmp_path / "off.yaml"
    off.write_text(BASE)
    out = run_cli("load-spills", "--config", str(off))
    assert out.returncode == 2 and "ledger.enabled" in out.stderr


def test_serve_warns_about_waiting_spill_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gateway import cli

    cfg = config_mod.parse(BASE + "ledger: {enabled: true}")
    cli._warn_spills(cfg)
    assert "spill" not in caplog.text
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "usage-spill-1-1.jsonl").write_text("")
    cli._warn_spills(cfg)
    assert "1 usage spill file(s)" in caplog.text and "load-spills" in caplog.text


def test_query_usage_direct(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    sink = ledger.SqliteSink(path, 5.0)
    sink.write([make_row(1, "a"), make_row(2, "a"), make_row(3, "b")])
    sink.close()
    cfg = config_mod.LedgerConfig(enabled=True, path=str(path))
    rows = ledger.query_usage(cfg, ledger.parse_query([("group_by", "key")]))
    assert [(r.group, r.requests, r.prompt_tokens, r.completion_tokens, r.errors) for r in rows] == [
        ("a", 2, 6, 8, 0),
        ("b", 1, 3, 4, 0),
    ]
    assert rows[0].cost_usd == pytest.approx(22e-6) and rows[0].p50_latency_ms == 1.5
    assert ledger.query_usage(config_mod.LedgerConfig(enabled=True, path=str(tmp_path / "none.db")),
                              ledger.UsageQuery()) == []  # fmt: skip
    for bad in ([("since", "2024-1-1")], [("group_by", "x")], [("key", "a"), ("key", "b")], [("x", "1")]):
        with pytest.raises(ValueError):
            ledger.parse_query(bad)
    with pytest.raises(ValueError, match="after"):
        ledger.parse_query([("since", "2024-02-01"), ("until", "2024-01-01")])


# ---- the routing columns (provider, attempts, cache) and older stores ----------------------------
#: The table and spill rows as the gateway wrote them before the routing columns (issue 13).
OLD_COLUMNS = ledger.COLUMNS[:16]
OLD_SQLITE_TABLE = """CREATE TABLE fastpath_usage (
    request_id TEXT NOT NULL, ts REAL NOT NULL, day TEXT NOT NULL, key_id TEXT, team TEXT, tier TEXT,
    endpoint TEXT NOT NULL, model TEXT, upstream_model TEXT, stream INTEGER NOT NULL,
    status INTEGER NOT NULL, error_code TEXT, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_nano_usd INTEGER NOT NULL, latency_ms REAL NOT NULL)"""
OLD_PG_TABLE = """CREATE TABLE fastpath_usage (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL, day TEXT NOT NULL, key_id TEXT, team TEXT, tier TEXT,
    endpoint TEXT NOT NULL, model TEXT, upstream_model TEXT, stream BOOLEAN NOT NULL,
    status INTEGER NOT NULL, error_code TEXT, prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL, cost_nano_usd BIGINT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL)"""
OLD_INSERT = f"INSERT INTO fastpath_usage ({', '.join(OLD_COLUMNS)}) VALUES ({', '.join('?' * 16)})"


def test_sqlite_table_of_an_older_gateway_is_migrated_once(tmp_path: Path) -> None:
    """A table without the routing columns: readers see their defaults before any migration; the
    first writer adds them (old rows keep their values, get attempts 0); a second start finds
    nothing to do; an older gateway's insert (old columns only) still works afterwards."""
    path = tmp_path / "u.db"
    conn = sqlite3.connect(path)
    conn.execute(OLD_SQLITE_TABLE)
    conn.execute(OLD_INSERT, make_row(0, key="old")[:16])
    conn.commit()
    conn.close()
    cfg = config_mod.LedgerConfig(enabled=True, path=str(path))
    [before] = ledger.query_usage(cfg, ledger.parse_query([("group_by", "provider")]))
    assert (before.group, before.requests, before.attempts, before.cache_hits) == (None, 1, 0, 0)

    for _ in range(2):  # the second open: already migrated
        sink = ledger.SqliteSink(path, 5.0)
        sink.write([(*make_row(1, key="new")[:16], "mock", 2, "miss", None, 0, None)])
        sink.close()
    store = sqlite_store(path)
    rows = store.rows()
    assert [(r["request_id"], r["key_id"], r["provider"], r["attempts"], r["cache"]) for r in rows] == [
        ("r0", "old", None, 0, None),
        ("r1", "new", "mock", 2, "miss"),
        ("r1", "new", "mock", 2, "miss"),
    ]
    assert {k: v for k, v in rows[0].items() if k in OLD_COLUMNS} == dict(
        zip(OLD_COLUMNS, (*make_row(0, key="old")[:9], 0, *make_row(0)[10:16]), strict=True)
    )
    conn = sqlite3.connect(path)
    cols = [(c[1], c[2], c[3], c[4]) for c in conn.execute("PRAGMA table_info(fastpath_usage)")]
    assert cols[-6:-3] == [
        ("provider", "TEXT", 0, None),
        ("attempts", "INTEGER", 1, "0"),
        ("cache", "TEXT", 0, None),
    ]
    assert cols[-1] == ("plan", "TEXT", 0, None)
    conn.execute(OLD_INSERT, make_row(5, key="older-gateway")[:16])
    conn.commit()
    conn.close()
    got = ledger.query_usage(cfg, ledger.parse_query([("group_by", "provider")]))
    assert [(g.group, g.requests, g.attempts, g.cache_hits) for g in got] == [
        (None, 2, 0, 0),
        ("mock", 2, 4, 0),
    ]


def test_postgres_table_of_an_older_gateway_is_migrated_once(pg_dsn: str) -> None:
    """The same for PostgreSQL: readers fall back before the migration; the writers that start
    together add the columns once (under the schema lock); old rows are intact."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fastpath_usage")
        conn.execute(OLD_PG_TABLE)
        conn.execute(OLD_INSERT.replace("?", "%s"), make_row(0, key="old")[:16])
    cfg = config_mod.LedgerConfig(enabled=True, kind=config_mod.LedgerKind.POSTGRES, dsn=pg_dsn)
    [before] = ledger.query_usage(cfg, ledger.parse_query([("group_by", "provider")]))
    assert (before.group, before.requests, before.attempts) == (None, 1, 0)

    sinks = [ledger.PostgresSink(cfg) for _ in range(4)]
    errors: list[BaseException] = []

    def start(sink: ledger.PostgresSink, i: int) -> None:
        try:
            sink.write([(*make_row(i + 1, key="new")[:16], "mock", 1, "hit", None, 0, None)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s, i)) for i, s in enumerate(sinks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        sink.close()
    assert errors == []
    rows = pg_store(pg_dsn).rows()
    assert sorted((r["request_id"], r["key_id"], r["provider"], r["attempts"], r["cache"]) for r in rows) == [
        ("r0", "old", None, 0, None),
        *[(f"r{i}", "new", "mock", 1, "hit") for i in range(1, 5)],
    ]
    old = next(r for r in rows if r["request_id"] == "r0")
    assert tuple(old[c] for c in OLD_COLUMNS) == make_row(0, key="old")[:16]
    got = ledger.query_usage(cfg, ledger.parse_query([("group_by", "provider")]))
    assert [(g.group, g.requests, g.attempts, g.cache_hits) for g in got] == [
        (None, 1, 0, 0),
        ("mock", 4, 4, 4),
    ]
    pg_truncate(pg_dsn)


def test_spill_file_of_an_older_gateway_loads(tmp_path: Path) -> None:
    """Rows spilled before the routing columns existed load with their defaults."""
    db = tmp_path / "u.db"
    data = tmp_path / "data"
    data.mkdir()
    spill = data / "usage-spill-1-1.jsonl"
    lines = [json.dumps(dict(zip(OLD_COLUMNS, make_row(i, key="old")[:16], strict=True))) for i in range(2)]
    lines.append(json.dumps(dict(zip(ledger.COLUMNS, make_row(2, key="new"), strict=True))))
    spill.write_text("\n".join(lines) + "\n")
    cfg = config_mod.LedgerConfig(enabled=True, path=str(db))
    [done] = ledger.load_spills(cfg)
    assert (done.rows, done.inserted) == (3, 3) and not spill.exists()
    rows = sqlite_store(db).rows()
    assert [(r["request_id"], r["provider"], r["attempts"], r["cache"]) for r in rows] == [
        ("r0", None, 0, None),
        ("r1", None, 0, None),
        ("r2", "mock", 1, None),
    ]


def test_gateway_rows_say_who_answered_and_how(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """Through a real gateway: an answered request records its provider, upstream model and one
    attempt; a cache miss then hit record their verdict (the hit: no attempt, no provider); a
    request refused before routing records none; `?group_by=provider` sums them."""
    store = sqlite_store(tmp_path / "ledger" / "usage.db")
    text = config_text(mock_upstream.port, store.yaml, flush_interval_ms=50).replace(
        "models:\n",
        "models:\n  - name: cached\n    provider: mock\n    upstream_model: mock-echo\n"
        "    cache: {enabled: true}\n",
        1,
    )
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        assert request(gw.port, "POST", "/v1/chat/completions", chat(), ALICE)[0] == 200
        for _ in range(2):
            assert request(gw.port, "POST", "/v1/chat/completions", chat("cached"), ALICE)[0] == 200
        assert request(gw.port, "POST", "/v1/chat/completions", chat(), "sk-not-a-key-000000000")[0] == 401
        rows = wait_for(lambda: len(store.rows()) >= 4 and store.rows(), 15)
        status, body = usage(gw.port, "?group_by=provider")
    got = sorted(
        ((r["model"], r["provider"], r["upstream_model"], r["attempts"], r["cache"]) for r in rows), key=repr
    )
    assert got == sorted(
        [
            ("echo", "mock", "mock-echo", 1, None),
            ("cached", "mock", "mock-echo", 1, "miss"),
            ("cached", None, None, 0, "hit"),
            (None, None, None, 0, None),
        ],
        key=repr,
    ), rows
    assert status == 200
    assert [(g["group"], g["requests"], g["attempts"], g["cache_hits"]) for g in body["data"]] == [
        (None, 2, 0, 1),
        ("mock", 2, 2, 0),
    ]


# ---- config -------------------------------------------------------------------------------------
BASE = "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: m, provider: p}]\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("ledger: {kind: postgres}", "$.ledger.dsn: required"),
        ("ledger: {kind: sqlite, dsn: 'postgresql://x@y/z'}", "$.ledger.dsn: only for kind postgres"),
        ("ledger: {kind: postgres, dsn: 'mysql://u:pw@h/db'}", "postgresql:// URL"),
        ("ledger: {batch_max_rows: 0}", "$.ledger.batch_max_rows: must be > 0"),
        ("ledger: {max_queue: -1}", "$.ledger.max_queue"),
        ("ledger: {flush_interval: 5}", "unknown field"),
        ("admin: {api_key: short}", "$.admin.api_key: must be at least 32"),
        ("admin: {api_key_hash: 'sha256:" + "0" * 64 + "'}", "$.auth.salt: required"),
        ("admin: {api_key_hash: nope}", "$.admin.api_key_hash"),
    ],
)
def test_config_errors(extra: str, message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(BASE + extra)
    assert message in str(err.value)
    assert "pw" not in str(err.value)


def test_config_defaults_and_admin_key_kept_only_hashed() -> None:
    cfg = config_mod.parse(BASE)
    assert cfg.ledger.enabled is False and cfg.ledger.kind is config_mod.LedgerKind.SQLITE
    assert cfg.admin.api_key is None and cfg.admin.api_key_hash is None
    cfg = config_mod.parse(BASE + f"admin: {{api_key: {ADMIN}}}\nauth: {{salt: {SALT}}}\n")
    assert cfg.admin.api_key is None
    assert cfg.admin.api_key_hash == config_mod.hash_key(SALT, ADMIN)
    assert ADMIN not in repr(cfg)


def test_ledger_on_only_when_enabled_with_a_store() -> None:
    assert not ledger.ledger_on(config_mod.parse(BASE).ledger)
    assert not ledger.ledger_on(config_mod.parse(BASE + "ledger: {enabled: true, kind: none}").ledger)
    assert ledger.ledger_on(config_mod.parse(BASE + "ledger: {enabled: true}").ledger)


def test_cli_usage_refuses_a_config_without_ledger(tmp_path: Path) -> None:
    cfg = tmp_path / "off.yaml"
    cfg.write_text(BASE)
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "ledger.enabled" in out.stderr
    on = tmp_path / "on.yaml"
    on.write_text(BASE + f"ledger: {{enabled: true, path: {tmp_path / 'none.db'}}}\n")
    assert cli_usage(on, "--since", "2024-01-01").splitlines() == [
        "KEY  REQUESTS  PROMPT  COMPLETION  COST_USD  ERRORS  P50_MS  ATTEMPTS  CACHED"
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(on), "--since", "yesterday"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "since" in bad.stderr
