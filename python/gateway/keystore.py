"""The key store: API keys created at run time (`fastpath-gateway keys create`), beside the
config's bootstrap keys.

A store keeps each key's salted hash (`config.hash_key`, with the config's `auth.salt`), never
the secret. Every write bumps a `version` in the same transaction, so a running gateway finds
out that something changed with one tiny query (`version()`) and only then reloads the keys
(`load_all()`). The CLI writes; gateway workers only read (SQLite: a read-only connection;
PostgreSQL: a read-only session).

The store also keeps the audit log (`audit_log`): who created or revoked which key, and who read
the admin routes. A key's create or revoke writes its audit row in the same transaction as the
change, so neither exists without the other. Audit rows never hold a secret, a key hash, the
admin key or a DSN password. Writing the audit does not bump `version` (gateways do not reload
keys for it).

`KeyStore` is the interface; `SqliteKeyStore` (stdlib sqlite3, one file in the data dir) is the
default, `PostgresKeyStore` (psycopg 3, `auth.store.kind: postgres`) the one for many gateway
instances. Both keep the same rows. SQL is parameterized everywhere: no statement is ever built
from a value.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec

from . import envvars
from .config import Config, KeyStoreConfig, StoreKind

if TYPE_CHECKING:
    import psycopg


class KeyStoreError(Exception):
    """A store that cannot be read or written. Messages never contain secrets or hashes."""


class KeyExistsError(KeyStoreError):
    """A key with this id is already stored (revoked keys keep their id)."""


class StoredKey(msgspec.Struct, frozen=True):
    id: str
    key_hash: str  # "sha256:" + hex(sha256(salt + key))
    team: str
    tier: str
    models: tuple[str, ...] = ()  # allowed public models; empty = all
    expires_at: float | None = None  # Unix time
    disabled: bool = False
    created_at: float = 0.0
    revoked_at: float | None = None

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.disabled:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= (time.time() if now is None else now):
            return "expired"
        return "active"

    def __repr__(self) -> str:  # never the hash
        return f"StoredKey(id={self.id!r}, team={self.team!r}, tier={self.tier!r}, status={self.status()!r})"


class Actor(msgspec.Struct, frozen=True):
    """Who makes a change (the audit row's `actor`) and from where (`source`)."""

    name: str
    source: str = ""


def cli_actor() -> Actor:
    """`cli:<os user>` on this host: the actor of changes made by the CLI."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (e.g. a container)
        user = f"uid{os.getuid()}"
    return Actor(f"cli:{user}", socket.gethostname())


class AuditEvent(msgspec.Struct, frozen=True):
    """One audit row. `detail` is a JSON object of plain facts (e.g. a created key's tier):
    callers never put a secret, a key hash, the admin key or a password in any field."""

    action: str  # key.create, key.revoke, admin.usage.read, ... (see AUDIT_ACTIONS)
    actor: str  # cli:<os user> | admin-api
    target: str = ""  # a key id, or an admin route and its query
    source: str = ""  # the CLI's hostname, or the HTTP client's address
    detail: dict[str, Any] = {}
    ts: float = 0.0  # Unix time; 0: now
    id: int | None = None  # assigned by the store


#: The actions written: key changes, admin reads, and every hot reload attempt (`config.reload`,
#: gateway.reload: by the master for a signal, by the worker for `POST /admin/reload`).
AUDIT_ACTIONS = ("key.create", "key.revoke", "admin.usage.read", "config.reload")
#: Longest `target` / `detail` text stored (an admin query is client input).
AUDIT_TEXT_MAX = 1024


class KeyStore(Protocol):
    def version(self) -> int | None:
        """A number that changes with every write; None: the store does not exist (yet)."""

    def load_all(self) -> tuple[int, list[StoredKey]]:
        """The version and every key that is not revoked, read consistently."""

    def create(self, key: StoredKey, by: Actor | None = None) -> None:
        """Store a new key and its `key.create` audit row (by `by`, default `cli_actor()`) in
        one transaction; KeyExistsError if its id is taken (and no audit row)."""

    def revoke(self, key_id: str, at: float, by: Actor | None = None) -> bool:
        """Revoke a key and write its `key.revoke` audit row in one transaction; False if there
        is no such key or it was already revoked: nothing changed, nothing is written."""

    def audit(self, event: AuditEvent) -> None:
        """Append one audit row (writable stores only)."""

    def list_audit(self, since: float | None, limit: int, action: str | None = None) -> list[AuditEvent]:
        """The latest `limit` audit rows at or after `since` (Unix time; None: all), only
        `action` if given, oldest first. Readers may call it; a store without the table: []."""

    def list_keys(self) -> list[StoredKey]:
        """Every key, revoked ones included, oldest first."""

    def close(self) -> None: ...


def data_dir() -> Path:
    return Path(os.environ.get(envvars.DATA_DIR) or ".fastpath")


def store_path(store: KeyStoreConfig) -> Path:
    return Path(store.path) if store.path else data_dir() / "keys.db"


def _check_meta(rows: dict[Any, Any], where: str, salt_check: str) -> None:
    """A store's `meta` rows: a schema this code reads, and made with this config's salt."""
    if rows.get("schema") != _SCHEMA_VERSION:
        raise KeyStoreError(f"{where}: unknown key store schema {rows.get('schema')!r}")
    if rows.get("salt_check") != salt_check:
        raise KeyStoreError(
            f"{where}: this key store was made with a different `auth.salt`; "
            "its keys cannot be verified with this config"
        )


def salt_check(salt: str) -> str:
    """A fingerprint of the salt, kept in the store so that a store is never read with the wrong
    salt (every key would silently stop working). It reveals no more about the salt than a
    stored key hash does."""
    return hashlib.sha256(b"fastpath-gateway key store salt\0" + salt.encode()).hexdigest()[:32]


def open_store(cfg: Config, *, readonly: bool) -> KeyStore | None:
    """The configured store; None when `auth.store.kind` is none (or no salt is configured)."""
    store = cfg.auth.store
    if store is None or store.kind is StoreKind.NONE:
        return None
    if store.kind is StoreKind.POSTGRES:
        timeout_s = store.timeout_ms / 1000
        return PostgresKeyStore(store.dsn, cfg.auth.salt, readonly=readonly, timeout_s=timeout_s)
    return SqliteKeyStore(store_path(store), cfg.auth.salt, readonly=readonly)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        team TEXT NOT NULL,
        tier TEXT NOT NULL,
        models TEXT NOT NULL DEFAULT '[]',
        expires_at REAL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        revoked_at REAL
    )""",
    # Added after the first release: a writer creates it in an existing store on open.
    """CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts)",
)
# Whole statements, never built from values: every value is a `?` parameter.
_SELECT_ACTIVE = (
    "SELECT id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at"
    " FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id"
)
_SELECT_ALL = (
    "SELECT id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at"
    " FROM api_keys ORDER BY created_at, id"
)
_INSERT = (
    "INSERT INTO api_keys (id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_AUDIT_INSERT = "INSERT INTO audit_log (ts, actor, action, target, source, detail) VALUES (?, ?, ?, ?, ?, ?)"
# The latest rows first (LIMIT), turned around by the caller; `action` NULL: every action.
_AUDIT_SELECT = (
    "SELECT id, ts, actor, action, target, source, detail FROM audit_log"
    " WHERE ts >= ? AND (? IS NULL OR action = ?) ORDER BY id DESC LIMIT ?"
)
#: Tables added later (audit_log) do not change it: old gateways still read the keys, and a
#: writer creates a missing table on open (CREATE ... IF NOT EXISTS, in its schema transaction).
_SCHEMA_VERSION = "1"
_RowType = tuple[str, str, str, str, str, float | None, int, float, float | None]


def _audit_values(event: AuditEvent) -> tuple[float, str, str, str, str, str]:
    detail = json.dumps(event.detail, separators=(",", ":"), sort_keys=True, default=str)
    if len(detail) > AUDIT_TEXT_MAX:
        detail = json.dumps({"truncated": True})
    return (
        event.ts or time.time(),
        event.actor,
        event.action,
        event.target[:AUDIT_TEXT_MAX],
        event.source[:AUDIT_TEXT_MAX],
        detail,
    )


def _create_event(key: StoredKey, by: Actor | None) -> AuditEvent:
    by = by or cli_actor()
    detail: dict[str, Any] = {"team": key.team, "tier": key.tier, "models": list(key.models)}
    if key.expires_at is not None:
        detail["expires_at"] = key.expires_at
    if key.disabled:
        detail["disabled"] = True
    return AuditEvent("key.create", by.name, key.id, by.source, detail, key.created_at or time.time())


def _revoke_event(key_id: str, at: float, by: Actor | None) -> AuditEvent:
    by = by or cli_actor()
    return AuditEvent("key.revoke", by.name, key_id, by.source, {}, at)


def _row_to_event(row: tuple[Any, ...]) -> AuditEvent:
    try:
        detail = json.loads(row[6])
    except ValueError:
        detail = None
    if not isinstance(detail, dict):
        detail = {"malformed": True}
    return AuditEvent(row[3], row[2], row[4], row[5], detail, float(row[1]), int(row[0]))


def _row_to_key(row: _RowType) -> StoredKey:
    models = json.loads(row[4])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise KeyStoreError(f"key {row[0]!r}: malformed models column")
    return StoredKey(row[0], row[1], row[2], row[3], tuple(models), row[5], bool(row[6]), row[7], row[8])


class _Store:
    """What both stores share: the salt check, read-only mode, one lock serializing calls."""

    def __init__(self, salt: str, *, readonly: bool, timeout_s: float) -> None:
        if not salt:
            raise KeyStoreError("the key store needs `auth.salt` (stored key hashes need a stable salt)")
        self._salt_check = salt_check(salt)
        self._readonly = readonly
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    def _disconnect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _require_writer(self) -> None:
        if self._readonly:
            raise KeyStoreError("this key store was opened read-only")


class SqliteKeyStore(_Store):
    """One SQLite file. Readers (gateway workers) open it read-only and never create it: a
    missing file is an empty store, and a file replaced on disk is reopened. The writer (CLI)
    creates the file (mode 0600, its directory 0700) and the schema. Thread-safe: calls are
    serialized, so a worker may poll it from a thread."""

    def __init__(self, path: Path, salt: str, *, readonly: bool, timeout_s: float = 5.0) -> None:
        super().__init__(salt, readonly=readonly, timeout_s=timeout_s)
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None

    # ---- connection ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection | None:
        if self._readonly:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._disconnect()
                return None
            ident = (st.st_dev, st.st_ino)
            if self._conn is not None and ident == self._ident:
                return self._conn
            self._disconnect()
            uri = self.path.absolute().as_uri() + "?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=self._timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn, self._ident = conn, ident
            return conn
        if self._conn is None:
            self._conn = self._create()
        return self._conn

    def _create(self) -> sqlite3.Connection:
        path = self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created here (not by sqlite) to be private from the first byte; sqlite gives its
        # journal the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # check_same_thread=False: calls are serialized by the lock, and may come from any
        # thread (a gateway worker writes admin audit rows from its executor's threads)
        conn = sqlite3.connect(
            str(path), timeout=self._timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                    [("schema", _SCHEMA_VERSION), ("version", "0"), ("salt_check", self._salt_check)],
                )
                self._check(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        rows = dict(
            conn.execute("SELECT name, value FROM meta WHERE name IN (?, ?)", ("schema", "salt_check"))
        )
        _check_meta(rows, str(self.path), self._salt_check)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn, self._ident = None, None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise KeyStoreError(f"{self.path}: {exc}") from None

    # ---- KeyStore -----------------------------------------------------------------------------
    def version(self) -> int | None:
        with self._locked():
            conn = self._connect()
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT value FROM meta WHERE name = ?", ("version",)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # being created right now
                    return None
                raise
            return None if row is None else int(row[0])

    def load_all(self) -> tuple[int, list[StoredKey]]:
        with self._locked():
            conn = self._connect()
            if conn is None:
                return 0, []
            with _transaction(conn, "BEGIN"):
                self._check(conn)
                row = conn.execute("SELECT value FROM meta WHERE name = ?", ("version",)).fetchone()
                rows = conn.execute(_SELECT_ACTIVE).fetchall()
            return int(row[0]), [_row_to_key(r) for r in rows]

    def list_keys(self) -> list[StoredKey]:
        with self._locked():
            conn = self._connect()
            if conn is None:
                return []
            with _transaction(conn, "BEGIN"):
                self._check(conn)
                rows = conn.execute(_SELECT_ALL).fetchall()
            return [_row_to_key(r) for r in rows]

    def create(self, key: StoredKey, by: Actor | None = None) -> None:
        self._require_writer()
        event = _create_event(key, by)
        with self._locked():
            conn = self._connect()
            assert conn is not None
            try:
                with _transaction(conn, "BEGIN IMMEDIATE"):
                    conn.execute(
                        _INSERT,
                        (
                            key.id,
                            key.key_hash,
                            key.team,
                            key.tier,
                            json.dumps(list(key.models)),
                            key.expires_at,
                            int(key.disabled),
                            key.created_at,
                            key.revoked_at,
                        ),
                    )
                    conn.execute(_AUDIT_INSERT, _audit_values(event))
                    _bump(conn)
            except sqlite3.IntegrityError:
                if conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key.id,)).fetchone():
                    raise KeyExistsError(f"a key with id {key.id!r} already exists") from None
                raise KeyStoreError("a key with the same hash already exists") from None

    def revoke(self, key_id: str, at: float, by: Actor | None = None) -> bool:
        self._require_writer()
        event = _revoke_event(key_id, at, by)
        with self._locked():
            conn = self._connect()
            assert conn is not None
            with _transaction(conn, "BEGIN IMMEDIATE"):
                cur = conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, key_id)
                )
                if cur.rowcount != 1:
                    return False
                conn.execute(_AUDIT_INSERT, _audit_values(event))
                _bump(conn)
            return True

    def audit(self, event: AuditEvent) -> None:
        self._require_writer()
        with self._locked():
            conn = self._connect()
            assert conn is not None
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.execute(_AUDIT_INSERT, _audit_values(event))

    def list_audit(self, since: float | None, limit: int, action: str | None = None) -> list[AuditEvent]:
        with self._locked():
            conn = self._connect()
            if conn is None:
                return []
            try:
                with _transaction(conn, "BEGIN"):
                    self._check(conn)
                    rows = conn.execute(
                        _AUDIT_SELECT, (since if since is not None else -math.inf, action, action, limit)
                    ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # a store made before the audit log, not yet upgraded
                    return []
                raise
            return [_row_to_event(r) for r in reversed(rows)]


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = ?", ("version",))


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    """An explicit transaction (the connection is in autocommit mode): committed when the block
    ends (also by `return`), rolled back on an exception."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    conn.execute("COMMIT")


def expiry(key: StoredKey) -> float:
    return math.inf if key.expires_at is None else key.expires_at


# ---- PostgreSQL ---------------------------------------------------------------------------------
# The same rows as the SQLite store, in two tables with a prefix (the database may hold other
# tables). Whole statements, never built from values: every value is a `%s` parameter.
_PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fastpath_key_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS fastpath_api_keys (
        id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        team TEXT NOT NULL,
        tier TEXT NOT NULL,
        models TEXT NOT NULL DEFAULT '[]',
        expires_at DOUBLE PRECISION,
        disabled BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
    # Added after the first release: a writer creates it in an existing store on open.
    """CREATE TABLE IF NOT EXISTS fastpath_audit_log (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS fastpath_audit_log_ts ON fastpath_audit_log (ts)",
)
#: `pg_advisory_xact_lock` key: one process at a time creates the tables (CREATE TABLE IF NOT
#: EXISTS alone can fail when two sessions run it at once).
_PG_SCHEMA_LOCK = 0x6670_6B65_7973  # "fpkeys"
_PG_META_INIT = (
    "INSERT INTO fastpath_key_meta (name, value) VALUES (%s, %s), (%s, %s), (%s, %s)"
    " ON CONFLICT (name) DO NOTHING"
)
_PG_META_GET = "SELECT name, value FROM fastpath_key_meta WHERE name IN (%s, %s)"
_PG_VERSION = "SELECT value FROM fastpath_key_meta WHERE name = %s"
_PG_BUMP = "UPDATE fastpath_key_meta SET value = (value::bigint + 1)::text WHERE name = %s"
_PG_SELECT_ACTIVE = (
    "SELECT id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at"
    " FROM fastpath_api_keys WHERE revoked_at IS NULL ORDER BY created_at, id"
)
_PG_SELECT_ALL = (
    "SELECT id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at"
    " FROM fastpath_api_keys ORDER BY created_at, id"
)
_PG_INSERT = (
    "INSERT INTO fastpath_api_keys"
    " (id, key_hash, team, tier, models, expires_at, disabled, created_at, revoked_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_PG_EXISTS = "SELECT 1 FROM fastpath_api_keys WHERE id = %s"
_PG_REVOKE = "UPDATE fastpath_api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL"
_PG_AUDIT_INSERT = (
    "INSERT INTO fastpath_audit_log (ts, actor, action, target, source, detail)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
_PG_AUDIT_SELECT = (
    "SELECT id, ts, actor, action, target, source, detail FROM fastpath_audit_log"
    " WHERE ts >= %s AND (%s::text IS NULL OR action = %s) ORDER BY id DESC LIMIT %s"
)
_PG_SESSION = (
    "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false),"
    " set_config('idle_in_transaction_session_timeout', %s, false)"
)
_PG_READ_ONLY = "SELECT set_config('default_transaction_read_only', 'on', false)"

_T = TypeVar("_T")


def describe_dsn(dsn: str) -> tuple[str, str]:
    """(what to show for this DSN in messages and logs, its password). The text never contains
    the password; a DSN that does not parse is not echoed at all (it may hold one)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        raise KeyStoreError("`auth.store.dsn`: not a valid PostgreSQL connection string") from None
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or 5432)
    user = str(params.get("user") or "")
    db = str(params.get("dbname") or user)
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}", str(params.get("password") or "")


class PostgresKeyStore(_Store):
    """PostgreSQL (psycopg 3), for many gateway instances sharing one set of keys. Readers
    (gateway workers) use a read-only session and never create anything: missing tables are an
    empty store. The writer (CLI) creates the tables if they are missing (under an advisory
    lock, so processes starting at once do not collide) and needs CREATE on the database; the
    readers need only SELECT. Every connect and query has a deadline (`timeout_s`); a broken
    connection is dropped and reopened by the next call. Thread-safe: calls are serialized.

    Messages name the server as `postgresql://user@host:port/db`: never the DSN's password."""

    def __init__(self, dsn: str, salt: str, *, readonly: bool, timeout_s: float = 5.0) -> None:
        super().__init__(salt, readonly=readonly, timeout_s=timeout_s)
        if not dsn:
            raise KeyStoreError("the postgres key store needs `auth.store.dsn`")
        self.target, self._password = describe_dsn(dsn)
        self._dsn = dsn
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def __repr__(self) -> str:  # never the DSN
        return f"PostgresKeyStore({self.target!r}, readonly={self._readonly})"

    # ---- connection ---------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self._dsn)
        timeout_ms = max(1, round(self._timeout_s * 1000))
        # Defaults the DSN may override: deadlines for connecting (libpq: whole seconds, at
        # least 2), for unacknowledged writes to a dead peer (tcp_user_timeout) and, through
        # keepalives, for waiting on a peer that went away; queries: statement_timeout below.
        idle_s = max(1, math.ceil(self._timeout_s))
        extra: dict[str, Any] = {
            "connect_timeout": max(2, idle_s),
            "tcp_user_timeout": timeout_ms,
            "keepalives": 1,
            "keepalives_idle": idle_s,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "application_name": "fastpath-gateway",
        }
        extra = {k: v for k, v in extra.items() if k not in given}
        # prepare_threshold=None: no server-side prepared statements (PgBouncer-safe).
        conn = psycopg.connect(self._dsn, autocommit=True, prepare_threshold=None, **extra)
        try:
            ms = str(timeout_ms)
            conn.execute(_PG_SESSION, (ms, ms, ms))
            if self._readonly:
                conn.execute(_PG_READ_ONLY)
                conn.read_only = True
                # load_all: the version and the keys from one snapshot
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            else:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                    for statement in _PG_SCHEMA:
                        conn.execute(statement)
                    conn.execute(
                        _PG_META_INIT,
                        ("schema", _SCHEMA_VERSION, "version", "0", "salt_check", self._salt_check),
                    )
                    self._check(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _check(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        rows = dict(conn.execute(_PG_META_GET, ("schema", "salt_check")).fetchall())
        _check_meta(rows, self.target, self._salt_check)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _call(self, fn: Callable[[psycopg.Connection[tuple[Any, ...]]], _T], missing: _T) -> _T:
        """`fn(connection)` under the lock; for a reader, `missing` if the tables do not exist
        (yet). A psycopg error becomes a KeyStoreError (without the password); a connection that
        broke is dropped."""
        import psycopg

        with self._lock:
            try:
                return fn(self._connect())
            except psycopg.Error as exc:
                if self._readonly and isinstance(exc, psycopg.errors.UndefinedTable):
                    return missing
                conn = self._conn
                if isinstance(exc, psycopg.OperationalError) or (conn is not None and conn.broken):
                    self._disconnect()
                message = " ".join(str(exc).split()) or type(exc).__name__
                if self._password:
                    message = message.replace(self._password, "***")
                raise KeyStoreError(f"{self.target}: {message}") from None

    # ---- KeyStore -----------------------------------------------------------------------------
    def version(self) -> int | None:
        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> int | None:
            row = conn.execute(_PG_VERSION, ("version",)).fetchone()
            return None if row is None else int(row[0])

        return self._call(run, None)

    def load_all(self) -> tuple[int, list[StoredKey]]:
        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[int, list[StoredKey]]:
            with conn.transaction():
                self._check(conn)
                row = conn.execute(_PG_VERSION, ("version",)).fetchone()
                rows = conn.execute(_PG_SELECT_ACTIVE).fetchall()
            assert row is not None
            return int(row[0]), [_row_to_key(_pg_row(r)) for r in rows]

        empty: list[StoredKey] = []
        return self._call(run, (0, empty))

    def list_keys(self) -> list[StoredKey]:
        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> list[StoredKey]:
            with conn.transaction():
                self._check(conn)
                rows = conn.execute(_PG_SELECT_ALL).fetchall()
            return [_row_to_key(_pg_row(r)) for r in rows]

        return self._call(run, [])

    def create(self, key: StoredKey, by: Actor | None = None) -> None:
        self._require_writer()
        import psycopg

        event = _create_event(key, by)

        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            values = (
                key.id,
                key.key_hash,
                key.team,
                key.tier,
                json.dumps(list(key.models)),
                key.expires_at,
                key.disabled,
                key.created_at,
                key.revoked_at,
            )
            try:
                with conn.transaction():
                    conn.execute(_PG_INSERT, values)
                    conn.execute(_PG_AUDIT_INSERT, _audit_values(event))
                    conn.execute(_PG_BUMP, ("version",))
            except psycopg.errors.UniqueViolation:
                if conn.execute(_PG_EXISTS, (key.id,)).fetchone():
                    raise KeyExistsError(f"a key with id {key.id!r} already exists") from None
                raise KeyStoreError("a key with the same hash already exists") from None

        self._call(run, None)

    def revoke(self, key_id: str, at: float, by: Actor | None = None) -> bool:
        self._require_writer()
        event = _revoke_event(key_id, at, by)

        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
            with conn.transaction():
                cur = conn.execute(_PG_REVOKE, (at, key_id))
                if cur.rowcount != 1:
                    return False
                conn.execute(_PG_AUDIT_INSERT, _audit_values(event))
                conn.execute(_PG_BUMP, ("version",))
            return True

        return self._call(run, False)

    def audit(self, event: AuditEvent) -> None:
        self._require_writer()

        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            conn.execute(_PG_AUDIT_INSERT, _audit_values(event))  # autocommit: its own transaction

        self._call(run, None)

    def list_audit(self, since: float | None, limit: int, action: str | None = None) -> list[AuditEvent]:
        def run(conn: psycopg.Connection[tuple[Any, ...]]) -> list[AuditEvent]:
            with conn.transaction():
                self._check(conn)
                start = since if since is not None else -math.inf
                rows = conn.execute(_PG_AUDIT_SELECT, (start, action, action, limit)).fetchall()
            return [_row_to_event(r) for r in reversed(rows)]

        return self._call(run, [])


def _pg_row(row: tuple[Any, ...]) -> _RowType:
    return (row[0], row[1], row[2], row[3], row[4], row[5], int(row[6]), row[7], row[8])
