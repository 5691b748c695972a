"""The audit log in the key store: key creates and revokes (through the `keys` CLI, SQLite and a
real PostgreSQL) each with its audit row in the same transaction, `fastpath-gateway audit`,
the upgrade of a store made before the audit table, and `admin.usage.read` rows written by a
running gateway for `GET /v1/usage`. No secret appears in any row or output."""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, run_gateway
from test_keystore import SALT, SECRET, cli_config, create_key, eventually, keys_cli, stored
from test_keystore_postgres import PASSWORD, _with_db, pg, pg_cli_config, pg_db  # noqa: F401
from test_ledger import ADMIN, config_text, sqlite_store, usage
from test_ledger import SALT as LEDGER_SALT

from gateway import config as config_mod
from gateway.keystore import (
    Actor,
    AuditEvent,
    KeyExistsError,
    KeyStore,
    KeyStoreError,
    PostgresKeyStore,
    SqliteKeyStore,
)


def audit_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def audit_json(cfg: Path, *args: str) -> list[dict[str, Any]]:
    out = audit_cli(cfg, "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


# ---- the store ----------------------------------------------------------------------------------
def check_store(writer: KeyStore, reader: KeyStore) -> None:
    """Creates, revokes and refused writes on `writer`; the audit as `reader` sees it."""
    assert reader.list_audit(None, 10) == []  # nothing yet (no table / no file): empty, no error
    by = Actor("cli:tester", "host-1")
    writer.create(stored("a", models=("echo",), expires_at=4102444800.0), by)
    writer.create(stored("b", "sk-fp-another-secret-0123456789", team="apps", tier="default"), by)
    with pytest.raises(KeyExistsError):  # refused: no audit row either
        writer.create(stored("a", "sk-fp-a-third-secret-0123456789"), by)
    with pytest.raises(KeyStoreError, match="same hash"):
        writer.create(stored("c", SECRET), by)
    assert writer.revoke("a", 1_000_000_000.0, by)  # its time: the revoke's
    assert not writer.revoke("a", time.time(), by)  # already revoked: nothing written
    assert not writer.revoke("nope", time.time(), by)  # unknown: nothing written
    writer.audit(AuditEvent("admin.usage.read", "admin-api", "/v1/usage?group_by=team", "10.0.0.1:5"))
    rows = reader.list_audit(None, 100)
    assert [(e.action, e.target) for e in rows] == [
        ("key.create", "a"),
        ("key.create", "b"),
        ("key.revoke", "a"),
        ("admin.usage.read", "/v1/usage?group_by=team"),
    ]
    ids = [e.id for e in rows]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(ids)
    assert rows[0].detail == {
        "team": "research",
        "tier": "pro",
        "models": ["echo"],
        "expires_at": 4102444800.0,
    }
    assert rows[1].detail == {"team": "apps", "tier": "default", "models": []}
    assert {(e.actor, e.source) for e in rows[:3]} == {("cli:tester", "host-1")}
    assert rows[2].ts == 1_000_000_000.0 and rows[2].detail == {}
    assert (rows[3].actor, rows[3].source) == ("admin-api", "10.0.0.1:5")
    # filters: the latest N (oldest first), an action, a start time
    assert [e.target for e in reader.list_audit(None, 2)] == ["a", "/v1/usage?group_by=team"]
    assert [e.target for e in reader.list_audit(None, 10, "key.create")] == ["a", "b"]
    recent = reader.list_audit(time.time() - 600, 10)
    assert [e.action for e in recent] == ["key.create", "key.create", "admin.usage.read"]
    assert reader.list_audit(None, 10, "config.reload") == []
    with pytest.raises(KeyStoreError, match="read-only"):
        reader.audit(AuditEvent("x", "y"))
    text = repr(rows)
    for secret in (SECRET, config_mod.hash_key(SALT, SECRET), "sha256:", SALT):
        assert secret not in text


def test_sqlite_audit_rows(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    writer = SqliteKeyStore(path, SALT, readonly=False)
    reader = SqliteKeyStore(path, SALT, readonly=True)
    try:
        check_store(writer, reader)
    finally:
        writer.close()
        reader.close()


def test_pg_audit_rows(pg: str) -> None:  # noqa: F811
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    reader = PostgresKeyStore(pg, SALT, readonly=True)
    try:
        check_store(writer, reader)
    finally:
        writer.close()
        reader.close()


def test_sqlite_upgrade_of_a_store_made_before_the_audit_log(tmp_path: Path) -> None:
    """A store as the previous release wrote it (meta + api_keys only): readers see an empty
    audit; the next writable open adds the table, keeps the keys, and audits from then on."""
    cfg = cli_config(tmp_path)
    path = tmp_path / "store" / "keys.db"
    path.parent.mkdir(mode=0o700)
    conn = sqlite3.connect(path)
    conn.executescript(
        """CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE api_keys (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, team TEXT NOT NULL,
            tier TEXT NOT NULL, models TEXT NOT NULL DEFAULT '[]', expires_at REAL,
            disabled INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, revoked_at REAL);"""
    )
    from gateway.keystore import salt_check

    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema", "1"), ("version", "1"), ("salt_check", salt_check(SALT))],
    )
    conn.execute(
        "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("old", config_mod.hash_key(SALT, SECRET), "research", "pro", "[]", None, 0, 1.0, None),
    )
    conn.commit()
    conn.close()
    reader = SqliteKeyStore(path, SALT, readonly=True)
    try:
        assert reader.list_audit(None, 10) == []
        assert [k.id for k in reader.load_all()[1]] == ["old"]
        empty = audit_cli(cfg)  # the CLI reads read-only: no upgrade by a read
        assert empty.returncode == 0, empty.stderr
        assert empty.stdout.split() == ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "SOURCE", "DETAIL"]
        tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
        assert "audit_log" not in tables
        assert keys_cli(cfg, "revoke", "old").returncode == 0  # a writer: the table is added
        assert [(e["action"], e["target"]) for e in audit_json(cfg)] == [("key.revoke", "old")]
        assert [k.id for k in SqliteKeyStore(path, SALT, readonly=False).list_keys()] == ["old"]
        assert reader.version() == 2
    finally:
        reader.close()


def test_pg_upgrade_adds_the_table(pg: str) -> None:  # noqa: F811
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    writer.create(stored("a"))
    writer.close()
    import psycopg

    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("DROP TABLE fastpath_audit_log")  # as the previous release left it
    reader = PostgresKeyStore(pg, SALT, readonly=True)
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    try:
        assert reader.list_audit(None, 10) == [] and [k.id for k in reader.load_all()[1]] == ["a"]
        assert writer.revoke("a", time.time())
        assert [e.action for e in reader.list_audit(None, 10)] == ["key.revoke"]
    finally:
        writer.close()
        reader.close()


# ---- the CLI ------------------------------------------------------------------------------------
def check_cli(cfg: Path, secrets_: list[str]) -> None:
    """`keys create|revoke` then `audit`; a duplicate create leaves no row; no secret anywhere."""
    secret = create_key(
        cfg, "--team", "research", "--tier", "pro", "--models", "echo", "--id", "alice",
        "--expires", "2030-01-01T00:00:00Z",
    )  # fmt: skip
    other = create_key(cfg, "--team", "apps", "--tier", "default", "--id", "bob")
    dup = keys_cli(cfg, "create", "--team", "t", "--tier", "pro", "--id", "alice")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert keys_cli(cfg, "revoke", "alice").returncode == 0
    again = keys_cli(cfg, "revoke", "alice")
    assert again.returncode == 0 and "already revoked" in again.stdout
    assert keys_cli(cfg, "revoke", "nobody").returncode == 1
    rows = audit_json(cfg)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("key.create", "alice"),
        ("key.create", "bob"),
        ("key.revoke", "alice"),
    ]
    assert {(r["actor"], r["source"]) for r in rows} == {(cli_actor(), socket.gethostname())}
    assert rows[0]["detail"] == {
        "team": "research",
        "tier": "pro",
        "models": ["echo"],
        "expires_at": 1893456000.0,
    }
    assert rows[1]["detail"] == {"team": "apps", "tier": "default", "models": []}
    assert rows[0]["id"] < rows[1]["id"] < rows[2]["id"]
    assert rows[0]["time"].endswith("Z") and isinstance(rows[0]["ts"], float)
    table = audit_cli(cfg)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "SOURCE", "DETAIL"]
    assert [line.split()[3:5] for line in lines[1:]] == [
        ["key.create", "alice"],
        ["key.create", "bob"],
        ["key.revoke", "alice"],
    ]
    assert [r["target"] for r in audit_json(cfg, "--action", "key.revoke")] == ["alice"]
    assert [r["target"] for r in audit_json(cfg, "--limit", "1")] == ["alice"]
    assert audit_json(cfg, "--since", "2100-01-01") == []
    assert len(audit_json(cfg, "--since", str(rows[1]["ts"]))) == 2
    assert len(audit_json(cfg, "--since", "2000-01-01T00:00:00+00:00")) == 3
    bad = audit_cli(cfg, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr
    outputs = [table.stdout, table.stderr, json.dumps(rows), dup.stdout, dup.stderr, again.stdout]
    for text in outputs:
        for s in [secret, other, config_mod.hash_key(SALT, secret), "sha256:", SALT, *secrets_]:
            assert s not in text


def test_cli_audit_sqlite(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path)
    check_cli(cfg, [])
    raw = sqlite3.connect(tmp_path / "store" / "keys.db").execute("SELECT * FROM audit_log").fetchall()
    assert len(raw) == 3 and "sha256:" not in repr(raw) and "sk-fp-" not in repr(raw)


def test_cli_audit_postgres(pg: str, tmp_path: Path) -> None:  # noqa: F811
    cfg = pg_cli_config(tmp_path, _with_db(pg, password=PASSWORD))
    check_cli(cfg, [PASSWORD])
    import psycopg

    with psycopg.connect(pg) as conn:
        raw = conn.execute("SELECT t::text FROM fastpath_audit_log t").fetchall()
    assert len(raw) == 3
    for s in ("sha256:", "sk-fp-", PASSWORD, SALT):
        assert s not in repr(raw)


# ---- a running gateway: admin reads -------------------------------------------------------------
def test_gateway_records_admin_usage_reads(
    mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_LEDGER_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path / "data"))
    text = config_text(mock_upstream.port, sqlite_store(tmp_path / "usage.db").yaml)
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(text)
    keys = SqliteKeyStore(tmp_path / "data" / "keys.db", LEDGER_SALT, readonly=True)
    log_path = tmp_path / "gateway.log"
    try:
        with (
            log_path.open("wb") as log,
            run_gateway(tmp_path, mock_upstream, config_text=text, output=log) as gw,
        ):
            assert usage(gw.port, key="wrong-admin-key-0123456789abcdef0123")[0] == 401  # not stored
            assert usage(gw.port, key=None)[0] == 401
            assert usage(gw.port, "?group_by=team&since=2020-01-01")[0] == 200
            eventually(lambda: len(keys.list_audit(None, 10)) == 1)
            assert usage(gw.port, "?group_by=nope")[0] == 400  # an admin read all the same
            eventually(lambda: len(keys.list_audit(None, 10)) == 2)
            time.sleep(0.3)  # nothing more arrives (the refused attempts)
        rows = keys.list_audit(None, 10)
    finally:
        keys.close()
    assert [(e.actor, e.action, e.target) for e in rows] == [
        ("admin-api", "admin.usage.read", "/v1/usage?group_by=team&since=2020-01-01"),
        ("admin-api", "admin.usage.read", "/v1/usage?group_by=nope"),
    ]
    for e in rows:
        assert e.source.startswith("127.0.0.1") and e.detail == {"method": "GET"}
    # the CLI shows the same rows; nothing secret in the rows, the store, the output or the log
    listed = audit_json(cfg, "--action", "admin.usage.read")
    assert [r["target"] for r in listed] == [e.target for e in rows]
    logged = log_path.read_text(errors="replace")
    assert "admin route /v1/usage refused for 127.0.0.1" in logged
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.name.startswith("keys.db"))
    for s in (ADMIN, config_mod.hash_key(LEDGER_SALT, ADMIN)):
        assert s not in logged and s not in json.dumps(listed) and s.encode() not in raw
