"""The PostgreSQL key store against a real PostgreSQL (127.0.0.1:5432 unless
FASTPATH_TEST_PG_DSN names another server's maintenance database): one database per test
session (`fastpath_test_<random>`, dropped at the end), hash-only rows, a version bumped by every
write, concurrent writers, read-only workers, the `keys` CLI, and a running gateway that picks up
created and revoked keys within seconds and keeps serving while the database is unreachable
(a real TCP relay in front of PostgreSQL is stopped and started again)."""

from __future__ import annotations

import json
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import MockUpstream, free_port, gateway_config, run_gateway
from psycopg import sql
from test_keystore import SALT, SECRET, create_key, eventually, keys_cli, status_of, stored

from gateway import config as config_mod
from gateway import keystore
from gateway.keystore import KeyExistsError, KeyStoreError, PostgresKeyStore

ADMIN_DSN = os.environ.get("FASTPATH_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
#: postgres trusts 127.0.0.1 here: libpq never sends this password, so it must appear nowhere
PASSWORD = "pw-must-never-be-logged-0123"


def _with_db(dsn: str, dbname: str = "", *, password: str = "", port: int | None = None) -> str:
    """`dsn` with another database, a password and/or another port on 127.0.0.1."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    if dbname:
        params["dbname"] = dbname
    if password:
        params["password"] = password
    if port is not None:
        params["host"], params["port"] = "127.0.0.1", port
    return psycopg.conninfo.make_conninfo(**params)


@pytest.fixture(scope="session")
def pg_db() -> Iterator[str]:
    """A fresh database for this test session; its DSN."""
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_DSN}: {exc}")
    name = f"fastpath_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _with_db(ADMIN_DSN, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg(pg_db: str) -> str:
    """The session database with no key store tables: every test starts from nothing."""
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fastpath_api_keys, fastpath_key_meta, fastpath_audit_log")
    return pg_db


def rows_as_text(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        keys = conn.execute("SELECT t::text FROM fastpath_api_keys t").fetchall()
        meta = conn.execute("SELECT t::text FROM fastpath_key_meta t").fetchall()
    return "\n".join(r[0] for r in keys + meta)


# ---- the store ----------------------------------------------------------------------------------
def test_pg_create_list_revoke(pg: str) -> None:
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    reader = PostgresKeyStore(pg, SALT, readonly=True)
    try:
        assert reader.version() is None  # no tables yet: an empty store, not an error
        assert reader.load_all() == (0, [])
        assert reader.list_keys() == []
        assert reader.version() is None  # readers never create the tables
        writer.create(stored("a", models=("echo", "slow"), expires_at=4102444800.0))
        v1 = reader.version()
        assert v1 == 1
        writer.create(stored("b", "sk-fp-another-secret-0123456789", disabled=True))
        assert reader.version() == 2
        version, keys = reader.load_all()
        assert version == 2
        assert [k.id for k in keys] == ["a", "b"]
        assert keys[0].models == ("echo", "slow")
        assert keys[0].expires_at == 4102444800.0
        assert keys[0].status() == "active" and keys[1].status() == "disabled"
        assert keys[0].key_hash == config_mod.hash_key(SALT, SECRET)
        with pytest.raises(KeyExistsError):
            writer.create(stored("a", "sk-fp-a-third-secret-0123456789"))
        with pytest.raises(KeyStoreError, match="same hash"):
            writer.create(stored("c", SECRET))
        assert reader.version() == 2  # refused writes change nothing
        assert writer.revoke("a", time.time())
        assert not writer.revoke("a", time.time())  # already revoked
        assert not writer.revoke("nope", time.time())
        assert reader.version() == 3
        assert [k.id for k in reader.load_all()[1]] == ["b"]  # revoked keys are not loaded
        assert {k.id: k.status() for k in reader.list_keys()} == {"a": "revoked", "b": "disabled"}
        with pytest.raises(KeyStoreError, match="read-only"):
            reader.create(stored("d", "sk-fp-yet-another-secret-012345"))
        with pytest.raises(KeyStoreError, match="read-only"):
            reader.revoke("b", time.time())
        # a second writer (another CLI run) finds the tables and the counter as they are
        again = PostgresKeyStore(pg, SALT, readonly=False)
        again.create(stored("e", "sk-fp-fourth-secret-0123456789"))
        again.close()
        assert reader.version() == 4
    finally:
        writer.close()
        reader.close()


def test_pg_reader_session_cannot_write(pg: str) -> None:
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    assert writer.version() == 0  # the writer's first call creates the tables
    writer.close()
    reader = PostgresKeyStore(pg, SALT, readonly=True)
    try:
        assert reader.version() == 0
        with pytest.raises(KeyStoreError, match="read-only transaction"):
            reader._call(lambda c: c.execute("DELETE FROM fastpath_api_keys"), None)
        assert reader.version() == 0  # the session survives the refused statement
    finally:
        reader.close()


def test_pg_a_writer_never_ignores_missing_tables(pg: str) -> None:
    writer = PostgresKeyStore(pg, SALT, readonly=False)
    try:
        writer.create(stored("a"))
        with psycopg.connect(pg, autocommit=True) as conn:  # someone drops the tables meanwhile
            conn.execute("DROP TABLE fastpath_api_keys, fastpath_key_meta")
        with pytest.raises(KeyStoreError, match="does not exist"):
            writer.create(stored("b", "sk-fp-another-secret-0123456789"))
        with pytest.raises(KeyStoreError, match="does not exist"):
            writer.revoke("a", time.time())
    finally:
        writer.close()


def test_pg_only_the_hash_is_stored(pg: str) -> None:
    store = PostgresKeyStore(pg, SALT, readonly=False)
    store.create(stored("a"))
    store.close()
    text = rows_as_text(pg)
    assert SECRET not in text and SALT not in text
    assert config_mod.hash_key(SALT, SECRET) in text
    assert keystore.salt_check(SALT) in text


def test_pg_a_store_is_never_read_with_another_salt(pg: str) -> None:
    store = PostgresKeyStore(pg, SALT, readonly=False)
    store.create(stored("a"))
    store.close()
    for readonly in (True, False):
        other = PostgresKeyStore(pg, "another-salt-0123456789", readonly=readonly)
        with pytest.raises(KeyStoreError, match=r"different `auth\.salt`"):
            other.load_all()
        other.close()
    with pytest.raises(KeyStoreError, match=r"auth\.salt"):
        PostgresKeyStore(pg, "", readonly=True)
    with pytest.raises(KeyStoreError, match=r"auth\.store\.dsn"):
        PostgresKeyStore("", SALT, readonly=True)


def test_pg_concurrent_writers(pg: str) -> None:
    """Writers that start at once (each creating the tables if missing) and create keys at
    once: no error, every key stored, the version bumped once per key."""
    writers, per_writer = 6, 10
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        store = PostgresKeyStore(pg, SALT, readonly=False)
        try:
            barrier.wait()
            for i in range(per_writer):
                store.create(stored(f"w{w}-{i}", f"sk-fp-concurrent-{w}-{i}-0123456789"))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    reader = PostgresKeyStore(pg, SALT, readonly=True)
    try:
        version, keys = reader.load_all()
        assert version == writers * per_writer
        assert len({k.id for k in keys}) == writers * per_writer
    finally:
        reader.close()


def test_pg_unreachable_is_a_quick_error_without_the_password(pg: str) -> None:
    # nothing listens on the port: refused at once
    dsn = _with_db(pg, "x", password=PASSWORD, port=free_port())
    store = PostgresKeyStore(dsn, SALT, readonly=True, timeout_s=2)
    with pytest.raises(KeyStoreError) as exc:
        store.version()
    assert PASSWORD not in str(exc.value) and "127.0.0.1" in str(exc.value)
    assert PASSWORD not in repr(store)
    store.close()
    # a port that accepts TCP but never answers: the connect deadline ends the wait
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dsn = _with_db(pg, "x", password=PASSWORD, port=silent.getsockname()[1])
        store = PostgresKeyStore(dsn, SALT, readonly=True, timeout_s=2)
        started = time.monotonic()
        with pytest.raises(KeyStoreError) as exc:
            store.version()
        assert time.monotonic() - started < 6
        assert PASSWORD not in str(exc.value)
        store.close()


def test_pg_config(monkeypatch: pytest.MonkeyPatch, pg: str) -> None:
    base = gateway_config(9) + f"auth:\n  salt: {SALT}\n"
    monkeypatch.setenv("TEST_PG_DSN", pg)
    cfg = config_mod.parse(base + "  store: {kind: postgres, dsn: '${TEST_PG_DSN}', timeout_ms: 3000}\n")
    assert cfg.auth.store is not None and cfg.auth.store.kind is config_mod.StoreKind.POSTGRES
    store = keystore.open_store(cfg, readonly=True)
    assert isinstance(store, PostgresKeyStore) and store.version() is None
    store.close()
    secret_dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1/db"
    cases = [
        ("{kind: postgres}", r"\$\.auth\.store\.dsn: required when kind is postgres"),
        (f"{{kind: postgres, dsn: '{secret_dsn}', path: /tmp/k.db}}", r"\$\.auth\.store\.path: only"),
        (f"{{kind: sqlite, dsn: '{secret_dsn}'}}", r"\$\.auth\.store\.dsn: only for kind postgres"),
        (f"{{kind: postgres, dsn: 'mysql://root:{PASSWORD}@h/db'}}", r"\$\.auth\.store\.dsn: must be"),
        (f"{{kind: postgres, dsn: '{secret_dsn}', timeout_ms: 0}}", r"timeout_ms: must be > 0"),
        ("{kind: postgres, dsn: '${TEST_PG_MISSING}'}", r"TEST_PG_MISSING is not set"),
    ]
    for store_yaml, message in cases:
        with pytest.raises(config_mod.ConfigError, match=message) as exc:
            config_mod.parse(base + f"  store: {store_yaml}\n")
        assert PASSWORD not in str(exc.value)
    no_salt = gateway_config(9) + f"auth:\n  store: {{kind: postgres, dsn: '{pg}'}}\n"
    with pytest.raises(config_mod.ConfigError, match=r"\$\.auth\.salt: required by auth\.store"):
        config_mod.parse(no_salt)
    # a DSN that does not parse: refused when opened, and not echoed
    bad = config_mod.parse(base + f"  store: {{kind: postgres, dsn: 'host=h password={PASSWORD} ='}}\n")
    with pytest.raises(KeyStoreError, match="not a valid PostgreSQL connection string") as err:
        keystore.open_store(bad, readonly=True)
    assert PASSWORD not in str(err.value)


# ---- a TCP relay in front of PostgreSQL, to take the database away and bring it back ----------
class Relay:
    """127.0.0.1:`port` -> the PostgreSQL server, stopped and started at will. Stopping it closes
    the listener and every relayed connection (clients see the server go away)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._threads.clear()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while not self._stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    server = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._socks += [client, server]
                self._spawn(self._pump, client, server)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.1)
            for s in ready:
                try:
                    data = s.recv(65536)
                    if data:
                        peer[s].sendall(data)
                except OSError:
                    data = b""
                if not data:
                    return


@pytest.fixture
def relay(pg: str) -> Iterator[Relay]:
    params = psycopg.conninfo.conninfo_to_dict(pg)
    r = Relay((str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)))
    r.start()
    try:
        yield r
    finally:
        r.stop()


def test_pg_auth_stage_keeps_its_keys_while_the_database_is_away(
    pg: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from gateway.pipeline.auth import AuthStage

    dsn = _with_db(pg, password=PASSWORD, port=relay.port)
    cfg = config_mod.parse(
        gateway_config(9)
        + f"""
auth:
  enabled: true
  salt: {SALT}
  keys: [{{id: boot, key: sk-test-bootstrap-0123456789}}]
  store: {{kind: postgres, dsn: '{dsn}', timeout_ms: 2000}}
tiers: {{default: {{}}, pro: {{rpm: 10}}}}
"""
    )
    writer = PostgresKeyStore(pg, SALT, readonly=False)  # directly, not through the relay
    stage = AuthStage(cfg, keystore.open_store(cfg, readonly=True))

    def ids() -> set[str]:
        return {p.key_id for p in stage._principals.values()}

    caplog.set_level(logging.INFO, logger="gateway.auth")
    try:
        writer.create(stored("ok"))
        assert stage.refresh() and ids() == {"boot", "ok"}
        relay.stop()  # the database goes away (its connection is cut)
        started = time.monotonic()
        assert not stage.refresh() and ids() == {"boot", "ok"}
        assert not stage.refresh() and ids() == {"boot", "ok"}
        assert time.monotonic() - started < 5
        writer.revoke("ok", time.time())
        relay.start()  # back: the next poll reconnects and sees the revocation
        assert stage.refresh() and ids() == {"boot"}
    finally:
        writer.close()
        asyncio.run(stage.close())
    logged = caplog.text
    assert "cannot read the key store" in logged and "readable again" in logged
    assert PASSWORD not in logged


# ---- the CLI and a running gateway ------------------------------------------------------------
def pg_cli_config(tmp: Path, dsn: str, upstream_port: int = 9, *, poll_ms: int = 1000) -> Path:
    cfg = tmp / "gateway-pg.yaml"
    cfg.write_text(
        gateway_config(upstream_port)
        + f"""
auth:
  enabled: true
  salt: {SALT}
  keys:
    - id: boot
      key: sk-test-bootstrap-0123456789
  store:
    kind: postgres
    dsn: "{dsn}"
    timeout_ms: 2000
    poll_interval_ms: {poll_ms}
tiers:
  default: {{}}
  pro: {{rpm: 100000}}
"""
    )
    return cfg


def test_pg_cli_create_list_revoke(pg: str, tmp_path: Path) -> None:
    cfg = pg_cli_config(tmp_path, _with_db(pg, password=PASSWORD))
    secret = create_key(cfg, "--team", "research", "--tier", "pro", "--models", "echo", "--id", "alice")
    listed = keys_cli(cfg, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(k["id"], k["status"], k["models"]) for k in json.loads(listed.stdout)] == [
        ("alice", "active", ["echo"])
    ]
    assert secret not in rows_as_text(pg)
    dup = keys_cli(cfg, "create", "--team", "t", "--tier", "pro", "--id", "alice")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert keys_cli(cfg, "revoke", "alice").returncode == 0
    assert "revoked" in keys_cli(cfg, "list").stdout
    missing = keys_cli(cfg, "revoke", "nobody")
    assert missing.returncode == 1 and "no stored key" in missing.stderr
    # the database away: a clear error, quickly, without the password
    down = pg_cli_config(tmp_path, _with_db(pg, "x", password=PASSWORD, port=free_port()))
    out = keys_cli(down, "create", "--team", "t", "--tier", "pro")
    assert out.returncode == 1 and "connection" in out.stderr and "sk-fp-" not in out.stdout
    for text in (out.stdout, out.stderr, listed.stdout, listed.stderr):
        assert PASSWORD not in text


def test_pg_running_gateway_picks_up_keys_and_survives_the_database_going_away(
    mock_upstream: MockUpstream, pg: str, relay: Relay, tmp_path: Path
) -> None:
    dsn = _with_db(pg, password=PASSWORD, port=relay.port)
    cfg = pg_cli_config(tmp_path, dsn, mock_upstream.port, poll_ms=200)
    log_path = tmp_path / "gateway.log"
    boot = "sk-test-bootstrap-0123456789"
    relay.stop()  # the database is away when the gateway starts
    with (
        log_path.open("wb") as log,
        run_gateway(
            tmp_path, mock_upstream, config_text=cfg.read_text(), log_level="debug", output=log
        ) as gw,
    ):
        assert status_of(gw.port, boot) == 200  # config keys work meanwhile
        relay.start()
        first = create_key(cfg, "--team", "research", "--tier", "pro", "--id", "first")
        eventually(lambda: status_of(gw.port, first) == 200)
        second = create_key(cfg, "--team", "apps", "--tier", "default", "--models", "slow")
        eventually(lambda: status_of(gw.port, second) == 403)  # known, but not for this model

        relay.stop()  # the database goes away while the gateway serves: the keys it has stay
        time.sleep(1.0)  # several polls fail
        for _ in range(5):
            started = time.monotonic()
            assert status_of(gw.port, first) == 200
            assert status_of(gw.port, boot) == 200
            assert time.monotonic() - started < 2  # never waits for the database
        assert status_of(gw.port, "sk-fp-not-a-key-0123456789abcdef") == 401

        relay.start()
        assert keys_cli(cfg, "revoke", "first").returncode == 0
        eventually(lambda: status_of(gw.port, first) == 401)
        assert status_of(gw.port, second) == 403
        assert status_of(gw.port, boot) == 200
    log_text = log_path.read_text(errors="replace")
    assert "cannot read the key store" in log_text and "stored key(s) in force" in log_text
    for secret in (first, second, SALT, boot, PASSWORD):
        assert secret not in log_text
    assert "sha256:" not in log_text
