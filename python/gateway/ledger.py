"""The usage ledger: one row per inference request, written off the hot path.

Each worker process has one `LedgerWriter`: the request path only appends a tuple to a bounded
in-memory queue (`append`, no I/O, never blocks). A background task hands batches of up to
`ledger.batch_max_rows` rows to one writer thread (`run_in_executor`), which inserts them with a
single parameterized `executemany` in one transaction, every `ledger.flush_interval_ms` or as
soon as a full batch waits. When the worker stops (SIGTERM: granian lets in-flight requests
finish, then calls `__rsgi_del__`), `close()` writes everything still queued.

Failure policy: a batch that cannot be written goes back to the front of the
queue and is tried again on the next flush; when the queue holds `ledger.max_queue` rows, new
rows are dropped, counted (`dropped`) and logged (at most once per 10 s per worker), never
blocking a request. If the store is still unreachable when the worker stops, the rows left are
spilled as JSON lines to `$FASTPATH_GATEWAY_DATA_DIR/usage-spill-<pid>-<time>.jsonl` (logged),
so they are never dropped silently; `fastpath-gateway load-spills` puts them into the store later
(idempotent: a row already there, same request id and arrival time, is not inserted twice).

Stores: SQLite (stdlib; WAL, a busy timeout: every worker writes the same file) and PostgreSQL
(psycopg 3). The same table `fastpath_usage` in both. Every statement is a constant: values are
always parameters, and a summary's grouping column is chosen from a fixed table of statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from . import keystore
from .config import LedgerConfig, LedgerKind
from .keystore import data_dir

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("gateway.ledger")

#: The columns of a row, in this order (`Row`).
COLUMNS = (
    "request_id",
    "ts",  # Unix time (s) the request arrived
    "day",  # its UTC day, YYYY-MM-DD
    "key_id",  # NULL: anonymous (auth off, or refused before auth)
    "team",
    "tier",
    "endpoint",  # chat | completions | embeddings
    "model",  # the public model; NULL if the request named none that was valid
    "upstream_model",
    "stream",
    "status",  # the HTTP status the client got; 499: the client went away first
    "error_code",  # the OpenAI error `code` when the request failed (NULL: none)
    "prompt_tokens",
    "completion_tokens",
    "cost_nano_usd",  # USD x 1e9 (integers add up exactly); from `prices:`, 0 if unpriced
    "latency_ms",  # arrival -> last byte sent (or failure)
    # added with routing (issue 13); last, so that a migrated table and a new one agree
    "provider",  # the answering deployment's provider; NULL: no upstream attempt (refused, cache hit)
    "attempts",  # upstream attempts made (retries, fallbacks and hedges included)
    "cache",  # the response cache's verdict: hit | miss | shared; NULL: not cached
    # added with the prompt manager (issue 18)
    "prompt",  # the server-side prompt applied, name@version; NULL: none
    # added with cached-token metering (issue 18)
    "cached_tokens",  # prompt tokens the upstream served from its prompt cache (part of prompt_tokens)
    # added with the planner (issue 18)
    "plan",  # stage `planner`'s decision (class, model, score, decision, requested model); NULL: none
)
Row = tuple[
    str, float, str, str | None, str | None, str | None, str, str | None, str | None, bool, int, str | None,
    int, int, int, float, str | None, int, str | None, str | None, int, str | None,
]  # fmt: skip
#: Columns added after the first schema, their SQL types (SQLite, PostgreSQL) and the value a row
#: written before them gets (migrated tables, old spill files).
_ADDED: tuple[tuple[str, str, str, Any], ...] = (
    ("provider", "TEXT", "TEXT", None),
    ("attempts", "INTEGER NOT NULL DEFAULT 0", "INTEGER NOT NULL DEFAULT 0", 0),
    ("cache", "TEXT", "TEXT", None),
    ("prompt", "TEXT", "TEXT", None),
    ("cached_tokens", "INTEGER NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0", 0),
    ("plan", "TEXT", "TEXT", None),
)

_COLS = ", ".join(COLUMNS)
_SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fastpath_usage (
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        day TEXT NOT NULL,
        key_id TEXT,
        team TEXT,
        tier TEXT,
        endpoint TEXT NOT NULL,
        model TEXT,
        upstream_model TEXT,
        stream INTEGER NOT NULL,
        status INTEGER NOT NULL,
        error_code TEXT,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_nano_usd INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        provider TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        cache TEXT,
        prompt TEXT,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        plan TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS fastpath_usage_day ON fastpath_usage (day)",
)
_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fastpath_usage (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        day TEXT NOT NULL,
        key_id TEXT,
        team TEXT,
        tier TEXT,
        endpoint TEXT NOT NULL,
        model TEXT,
        upstream_model TEXT,
        stream BOOLEAN NOT NULL,
        status INTEGER NOT NULL,
        error_code TEXT,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cost_nano_usd BIGINT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        provider TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        cache TEXT,
        prompt TEXT,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        plan TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS fastpath_usage_day ON fastpath_usage (day)",
)
_SQLITE_INSERT = f"INSERT INTO fastpath_usage ({_COLS}) VALUES ({', '.join('?' * len(COLUMNS))})"
_PG_INSERT = f"INSERT INTO fastpath_usage ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
# Spill loading: the same row (request id + arrival time) is never inserted twice.
_SQLITE_INSERT_NEW = (
    f"INSERT INTO fastpath_usage ({_COLS}) SELECT {', '.join('?' * len(COLUMNS))} "
    "WHERE NOT EXISTS (SELECT 1 FROM fastpath_usage WHERE request_id = ? AND ts = ?)"
)
_PG_INSERT_NEW = (
    f"INSERT INTO fastpath_usage ({_COLS}) SELECT {', '.join(['%s'] * len(COLUMNS))} "
    "WHERE NOT EXISTS (SELECT 1 FROM fastpath_usage WHERE request_id = %s AND ts = %s)"
)
# Migration: the added columns a table lacks (names from `_ADDED`, never from input).
_SQLITE_ADD = {name: f"ALTER TABLE fastpath_usage ADD COLUMN {name} {sql}" for name, sql, _, _ in _ADDED}
_PG_COLUMNS = (
    "SELECT attname FROM pg_attribute WHERE attrelid = 'fastpath_usage'::regclass AND attnum > 0 "
    "AND NOT attisdropped"
)
_PG_ADD = "ALTER TABLE fastpath_usage " + ", ".join(
    f"ADD COLUMN IF NOT EXISTS {name} {sql}" for name, _, sql, _ in _ADDED
)
#: pg_advisory_xact_lock key: one session at a time creates the table.
_PG_SCHEMA_LOCK = 0x6670_7573_6167  # "fpusag"

GROUPS = ("key", "team", "model", "provider", "day")
_GROUP_COLUMN = {"key": "key_id", "team": "team", "model": "model", "provider": "provider", "day": "day"}
# One constant statement per grouping (the column names come from the table above, never from a
# request); filters are parameters: since, until, then (key, key), (team, team), (model, model).
_SUMMARY = """
WITH f AS (
    SELECT COALESCE({col}, '') AS grp, prompt_tokens, completion_tokens, cost_nano_usd, status, latency_ms,
           {added}
    FROM fastpath_usage
    WHERE day >= ? AND day <= ?
      AND (CAST(? AS TEXT) IS NULL OR key_id = ?)
      AND (CAST(? AS TEXT) IS NULL OR team = ?)
      AND (CAST(? AS TEXT) IS NULL OR model = ?)
), ranked AS (
    SELECT grp, latency_ms,
           ROW_NUMBER() OVER (PARTITION BY grp ORDER BY latency_ms) AS rn,
           COUNT(*) OVER (PARTITION BY grp) AS n
    FROM f
), median AS (
    SELECT grp, AVG(latency_ms) AS p50 FROM ranked WHERE rn IN ((n + 1) / 2, (n + 2) / 2) GROUP BY grp
), totals AS (
    SELECT grp, COUNT(*) AS requests,
           CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens,
           CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens,
           CAST(SUM(cost_nano_usd) AS BIGINT) AS cost_nano_usd,
           SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
           CAST(SUM(attempts) AS BIGINT) AS attempts,
           SUM(CASE WHEN cache IN ('hit', 'shared') THEN 1 ELSE 0 END) AS cache_hits,
           CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens
    FROM f GROUP BY grp
)
SELECT t.grp, t.requests, t.prompt_tokens, t.completion_tokens, t.cost_nano_usd, t.errors, m.p50,
       t.attempts, t.cache_hits, t.cached_tokens
FROM totals t LEFT JOIN median m ON m.grp = t.grp
ORDER BY t.grp
"""
_SQLITE_SUMMARY = {
    g: _SUMMARY.format(col=c, added="attempts, cache, cached_tokens") for g, c in _GROUP_COLUMN.items()
}
_PG_SUMMARY = {g: s.replace("?", "%s") for g, s in _SQLITE_SUMMARY.items()}
# A table no gateway of this version has written yet (readers never migrate: they open it
# read-only): the added columns read as their defaults.
_LEGACY_GROUP_COLUMN = {**_GROUP_COLUMN, "provider": "CAST(NULL AS TEXT)"}
_SQLITE_SUMMARY_LEGACY = {
    g: _SUMMARY.format(col=c, added="0 AS attempts, CAST(NULL AS TEXT) AS cache, 0 AS cached_tokens")
    for g, c in _LEGACY_GROUP_COLUMN.items()
}
_PG_SUMMARY_LEGACY = {g: s.replace("?", "%s") for g, s in _SQLITE_SUMMARY_LEGACY.items()}
# A table of the routing version (before `cached_tokens`): its attempts and cache still count.
_SQLITE_SUMMARY_ROUTING = {
    g: _SUMMARY.format(col=c, added="attempts, cache, 0 AS cached_tokens") for g, c in _GROUP_COLUMN.items()
}
_PG_SUMMARY_ROUTING = {g: s.replace("?", "%s") for g, s in _SQLITE_SUMMARY_ROUTING.items()}
_MIN_DAY = "0000-01-01"
_MAX_DAY = "9999-12-31"


class LedgerError(Exception):
    """The ledger store cannot be read or written. Messages never contain a password."""


# ---- summaries ----------------------------------------------------------------------------------
class UsageQuery(msgspec.Struct, frozen=True):
    group_by: str = "key"
    since: str | None = None  # YYYY-MM-DD, inclusive (UTC days)
    until: str | None = None  # YYYY-MM-DD, inclusive
    key: str | None = None
    team: str | None = None
    model: str | None = None


class UsageRow(msgspec.Struct, frozen=True):
    #: the key id / team / model / day; None: anonymous requests (or ones without a model)
    group: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    #: requests answered with a status >= 400 (499: the client went away)
    errors: int
    #: median latency (ms) of the group's requests
    p50_latency_ms: float | None
    #: upstream attempts (retries, fallbacks, hedges): above `requests` - `cache_hits` when the
    #: upstreams needed more than one try
    attempts: int = 0
    #: requests answered by the response cache (`hit`, or `shared` with a concurrent request)
    cache_hits: int = 0
    #: prompt tokens served from the upstreams' prompt caches (part of `prompt_tokens`, priced
    #: at `cached_input_per_mtok`)
    cached_tokens: int = 0


_FILTER_MAX_CHARS = 256


def parse_query(params: Iterable[tuple[str, str]]) -> UsageQuery:
    """A summary query from (name, value) pairs (the HTTP query string or the CLI); ValueError
    with a message naming the parameter."""
    fields: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in params:
        if name not in ("group_by", "since", "until", "key", "team", "model"):
            raise ValueError(f"unknown parameter {name!r} (group_by, since, until, key, team, model)")
        if name in seen:
            raise ValueError(f"{name}: given more than once")
        seen.add(name)
        if len(value) > _FILTER_MAX_CHARS:
            raise ValueError(f"{name}: at most {_FILTER_MAX_CHARS} characters")
        if value or name == "group_by":  # an empty filter (`?key=`) is no filter
            fields[name] = value
    group = fields.get("group_by", "key")
    if group not in GROUPS:
        raise ValueError(f"group_by: must be one of {', '.join(GROUPS)}")
    for name in ("since", "until"):
        if name in fields:
            fields[name] = _day(name, fields[name])
    if "since" in fields and "until" in fields and fields["since"] > fields["until"]:
        raise ValueError("since: must not be after until")
    return UsageQuery(
        group,
        fields.get("since"),
        fields.get("until"),
        fields.get("key"),
        fields.get("team"),
        fields.get("model"),
    )


def _day(name: str, text: str) -> str:
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"{name}: must be a date YYYY-MM-DD (UTC), got {text[:40]!r}") from None


def _summary_params(q: UsageQuery) -> tuple[str | None, ...]:
    return (q.since or _MIN_DAY, q.until or _MAX_DAY, q.key, q.key, q.team, q.team, q.model, q.model)


def _summary_rows(rows: Iterable[Sequence[Any]]) -> list[UsageRow]:
    return [
        UsageRow(
            grp or None,
            int(requests),
            int(prompt or 0),
            int(completion or 0),
            int(cost or 0) / 1e9,
            int(errors or 0),
            None if p50 is None else round(float(p50), 3),
            int(attempts or 0),
            int(cache_hits or 0),
            int(cached or 0),
        )
        for grp, requests, prompt, completion, cost, errors, p50, attempts, cache_hits, cached in rows
    ]


def query_usage(cfg: LedgerConfig, q: UsageQuery) -> list[UsageRow]:
    """The summary, read from the store directly (blocking: call it in a thread from async
    code). A store that does not exist yet is an empty ledger."""
    if cfg.kind is LedgerKind.POSTGRES:
        return _pg_query(cfg, q)
    if cfg.kind is LedgerKind.NONE:
        return []
    path = sqlite_path(cfg)
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=cfg.timeout_ms / 1000)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: {exc}") from None
    try:
        for statements in (_SQLITE_SUMMARY, _SQLITE_SUMMARY_ROUTING, _SQLITE_SUMMARY_LEGACY):
            try:
                rows = conn.execute(statements[q.group_by], _summary_params(q)).fetchall()
                break
            except sqlite3.OperationalError as exc:
                if "no such column" not in str(exc) or statements is _SQLITE_SUMMARY_LEGACY:
                    raise
        return _summary_rows(rows)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise LedgerError(f"{path}: {exc}") from None
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: {exc}") from None
    finally:
        conn.close()


def _pg_query(cfg: LedgerConfig, q: UsageQuery) -> list[UsageRow]:
    import psycopg

    target, password = describe_dsn(cfg.dsn)
    try:
        with _pg_connect(cfg, autocommit=True) as conn:
            conn.read_only = True
            try:
                rows = conn.execute(_PG_SUMMARY[q.group_by], _summary_params(q)).fetchall()
            except psycopg.errors.UndefinedColumn:  # autocommit: the session is still usable
                try:
                    rows = conn.execute(_PG_SUMMARY_ROUTING[q.group_by], _summary_params(q)).fetchall()
                except psycopg.errors.UndefinedColumn:
                    rows = conn.execute(_PG_SUMMARY_LEGACY[q.group_by], _summary_params(q)).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    except psycopg.Error as exc:
        raise LedgerError(_pg_message(target, password, exc)) from None
    return _summary_rows(rows)


# ---- stores -------------------------------------------------------------------------------------
def ledger_on(cfg: LedgerConfig) -> bool:
    return cfg.enabled and cfg.kind is not LedgerKind.NONE


def sqlite_path(cfg: LedgerConfig) -> Path:
    return Path(cfg.path) if cfg.path else data_dir() / "usage.db"


def describe_dsn(dsn: str) -> tuple[str, str]:
    """(`postgresql://user@host:port/db` for messages, the DSN's password): the key store's
    reading of a DSN, with the ledger's field name in the error."""
    try:
        return keystore.describe_dsn(dsn)
    except keystore.KeyStoreError:
        raise LedgerError("`ledger.dsn`: not a valid PostgreSQL connection string") from None


def _pg_message(target: str, password: str, exc: Exception) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if password:
        message = message.replace(password, "***")
    return f"{target}: {message}"


def _pg_connect(cfg: LedgerConfig, *, autocommit: bool) -> psycopg.Connection[tuple[Any, ...]]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(cfg.dsn)
    timeout_ms = cfg.timeout_ms
    extra: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(timeout_ms / 1000)),
        "tcp_user_timeout": timeout_ms,
        "application_name": "fastpath-gateway-ledger",
        # every statement and lock wait has the same deadline
        "options": f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
    }
    extra = {k: v for k, v in extra.items() if k not in given}
    return psycopg.connect(cfg.dsn, autocommit=autocommit, prepare_threshold=None, **extra)


class Sink(Protocol):
    """Where batches go; called from one writer thread at a time."""

    def write(self, rows: Sequence[Row], *, only_new: bool = False) -> int:
        """Insert the rows in one transaction (all or none); how many were inserted. `only_new`:
        skip rows already stored (same request id and arrival time). Raises LedgerError."""

    def close(self) -> None: ...


def _sqlite_migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a table made by an older gateway lacks (inside the schema transaction, so
    workers starting together add each once). Old rows get the defaults; an older gateway still
    writing the table names only its columns, so it keeps working during a rolling upgrade."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(fastpath_usage)")}
    for name, statement in _SQLITE_ADD.items():
        if name not in have:
            conn.execute(statement)
            log.info("ledger: added column %s to fastpath_usage", name)


def _pg_migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    """`_sqlite_migrate` for PostgreSQL, under the schema advisory lock. ALTER TABLE takes an
    ACCESS EXCLUSIVE lock even when every column exists, so it runs only when one is missing:
    a worker's (re)connect never stalls the writers and readers of a migrated table."""
    have = {r[0] for r in conn.execute(_PG_COLUMNS).fetchall()}
    if any(name not in have for name, *_ in _ADDED):
        conn.execute(_PG_ADD)
        log.info("ledger: added the missing columns to fastpath_usage")


class SqliteSink:
    """One connection per worker (opened by the writer thread on first use), WAL journal so
    that readers never block writers, and a busy timeout so that the workers writing the same
    file take turns instead of failing."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None

    def _locked_retry(self, conn: sqlite3.Connection, sql: str) -> None:
        """`sql`, retried while the file is locked. SQLite skips the busy handler in some lock
        upgrades (two workers switching a fresh file to WAL at once, both at shutdown), so
        `timeout` alone does not cover them."""
        deadline = time.monotonic() + self._timeout_s
        delay = 0.01
        while True:
            try:
                conn.execute(sql)
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self._timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._locked_retry(conn, "PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._locked_retry(conn, "BEGIN IMMEDIATE")
            try:
                for statement in _SQLITE_SCHEMA:
                    conn.execute(statement)
                _sqlite_migrate(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def write(self, rows: Sequence[Row], *, only_new: bool = False) -> int:
        try:
            conn = self._connect()
            self._locked_retry(conn, "BEGIN IMMEDIATE")
            try:
                if only_new:
                    cur = conn.executemany(_SQLITE_INSERT_NEW, [(*r, r[0], r[1]) for r in rows])
                else:
                    cur = conn.executemany(_SQLITE_INSERT, rows)
                conn.execute("COMMIT")
                return cur.rowcount
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: {exc}") from None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresSink:
    """One connection per worker (opened by the writer thread, reopened after an error); the
    table is created on first use under an advisory lock. `executemany` sends a batch in one
    round trip (psycopg's pipeline mode)."""

    def __init__(self, cfg: LedgerConfig) -> None:
        self._cfg = cfg
        self.target, self._password = describe_dsn(cfg.dsn)
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def __repr__(self) -> str:  # never the DSN
        return f"PostgresSink({self.target!r})"

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop()
        conn = _pg_connect(self._cfg, autocommit=False)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                for statement in _PG_SCHEMA:
                    conn.execute(statement)
                _pg_migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def write(self, rows: Sequence[Row], *, only_new: bool = False) -> int:
        import psycopg

        inserted = 0
        try:
            conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                if only_new:
                    # one row at a time: a row repeated inside the batch must see the first copy
                    for r in rows:
                        cur.execute(_PG_INSERT_NEW, (*r, r[0], r[1]))
                        inserted += cur.rowcount
                    return inserted
                cur.executemany(_PG_INSERT, rows)
                return len(rows)
        except psycopg.Error as exc:
            self._drop()
            raise LedgerError(_pg_message(self.target, self._password, exc)) from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        self._drop()


def open_sink(cfg: LedgerConfig) -> Sink:
    if cfg.kind is LedgerKind.POSTGRES:
        return PostgresSink(cfg)
    return SqliteSink(sqlite_path(cfg), cfg.timeout_ms / 1000)


# ---- the per-worker writer ----------------------------------------------------------------------
_LOG_EVERY_S = 10.0
_MAX_BACKOFF_S = 30.0


class LedgerWriter:
    """A bounded queue of rows and the task that writes it in batches (see the module doc)."""

    def __init__(self, sink: Sink, *, batch_max_rows: int, flush_interval_s: float, max_queue: int) -> None:
        self.sink = sink
        self.batch_max_rows = batch_max_rows
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self._rows: deque[Row] = deque()
        #: rows refused because the queue was full
        self.dropped = 0
        #: rows written, transactions (batches) committed, failed batch writes
        self.written = 0
        self.batches = 0
        self.failures = 0
        self._last_drop_log = -math.inf
        self._last_error_log = -math.inf
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._backoff_s = 0.0
        self._inflight: tuple[list[Row], Future[int]] | None = None

    @property
    def queued(self) -> int:
        return len(self._rows)

    # ---- the request path ---------------------------------------------------------------------
    def append(self, row: Row) -> None:
        """Queue a row; never blocks. A full queue drops the row (counted, logged)."""
        rows = self._rows
        if len(rows) >= self.max_queue or self._closed:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= _LOG_EVERY_S:
                self._last_drop_log = now
                log.error(
                    "ledger: queue full (%d rows) or closed: dropped a usage row (%d dropped in this "
                    "worker so far); is the store reachable?",
                    len(rows),
                    self.dropped,
                )
            return
        rows.append(row)
        if len(rows) >= self.batch_max_rows and self._wake is not None:
            self._wake.set()

    # ---- background -----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            full_only = True  # woken because a full batch waits: write full batches only
            try:
                await asyncio.wait_for(wake.wait(), self.flush_interval_s + self._backoff_s)
            except TimeoutError:
                full_only = False  # the interval is over: write everything
            wake.clear()
            try:
                await self.flush(full_only=full_only)
            except Exception:  # a bug, not a store error (those are handled in flush)
                log.exception("ledger: flushing failed")

    async def flush(self, *, full_only: bool = False) -> bool:
        """Write what is queued now in batches (`full_only`: only full batches, so that a busy
        worker writes `batch_max_rows` per transaction); False if a batch failed (it stays
        queued)."""
        lock = self._lock
        assert lock is not None
        loop = asyncio.get_running_loop()
        least = self.batch_max_rows if full_only else 1
        async with lock:
            while len(self._rows) >= least:
                batch = self._take()
                done = self._executor.submit(self.sink.write, batch)
                # shielded: a cancelled flush (the worker stopping) never cancels a write;
                # close() settles the batch in flight
                self._inflight = (batch, done)
                try:
                    await asyncio.shield(asyncio.wrap_future(done, loop=loop))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._inflight = None
                    self._failed(batch, exc)
                    return False
                self._inflight = None
                self._done(batch)
        return True

    def _take(self) -> list[Row]:
        rows = self._rows
        n = min(len(rows), self.batch_max_rows)
        return [rows.popleft() for _ in range(n)]

    def _done(self, batch: list[Row]) -> None:
        self.written += len(batch)
        self.batches += 1
        self._backoff_s = 0.0

    def _failed(self, batch: list[Row], exc: BaseException) -> None:
        self.failures += 1
        # back to the front, in order; the newest rows beyond max_queue are dropped (counted)
        room = max(0, self.max_queue - len(self._rows))
        self._rows.extendleft(reversed(batch[:room]))
        lost = len(batch) - room
        if lost > 0:
            self.dropped += lost
        self._backoff_s = min(_MAX_BACKOFF_S, max(self.flush_interval_s, 2 * self._backoff_s))
        now = time.monotonic()
        if now - self._last_error_log >= _LOG_EVERY_S:
            self._last_error_log = now
            log.error(
                "ledger: writing %d usage rows failed (%s); %d rows queued, retrying",
                len(batch),
                exc if isinstance(exc, LedgerError) else type(exc).__name__ + ": " + str(exc),
                len(self._rows),
            )

    # ---- shutdown -----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """`close` from inside the loop: a batch the thread is writing now finishes first."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.close()

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Stop the task and write every queued row (blocking; the worker is stopping). Rows the
        store refuses now are spilled to a local JSON-lines file."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            if loop is not None and not loop.is_running() and not loop.is_closed():
                # let a batch the thread is writing now finish first
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            batch, done = inflight
            try:
                done.result()
            except Exception:
                self._rows.extendleft(reversed(batch))  # tried again below
            else:
                self._done(batch)
        try:
            while self._rows:
                batch = self._take()
                try:
                    self._executor.submit(self.sink.write, batch).result()
                except Exception as exc:
                    self._rows.extendleft(reversed(batch))
                    log.error("ledger: writing usage rows at shutdown failed: %s", exc)
                    self._spill()
                    break
                self._done(batch)
        finally:
            self._executor.submit(self.sink.close).result()
            self._executor.shutdown(wait=True)
        if self.dropped:
            log.error("ledger: %d usage rows were dropped by this worker (queue full)", self.dropped)

    def _spill(self) -> None:
        rows, self._rows = list(self._rows), deque()
        path = data_dir() / f"usage-spill-{os.getpid()}-{int(time.time())}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(dict(zip(COLUMNS, row, strict=True))) + "\n")
        except OSError as exc:
            self.dropped += len(rows)
            log.error("ledger: %d usage rows lost: cannot spill them to %s: %s", len(rows), path, exc)
            return
        log.error("ledger: %d usage rows spilled to %s (load them into the ledger later)", len(rows), path)


# ---- one row per request ------------------------------------------------------------------------
class DayClock:
    """Unix time -> UTC day string, cached for the current day (one strftime per day)."""

    __slots__ = ("_day", "_end", "_start")

    def __init__(self) -> None:
        self._start = 0.0
        self._end = 0.0
        self._day = ""

    def day(self, ts: float) -> str:
        if self._start <= ts < self._end:
            return self._day
        start = ts - ts % 86_400
        day = time.strftime("%Y-%m-%d", time.gmtime(start))
        self._start, self._end, self._day = start, start + 86_400, day
        return day


def spill_files() -> list[Path]:
    """Spill files waiting in the data dir (for operators and tests)."""
    d = data_dir()
    return sorted(d.glob("usage-spill-*.jsonl")) if d.is_dir() else []


class SpillLoad(msgspec.Struct, frozen=True):
    path: str
    rows: int
    inserted: int  # rows - inserted: already in the store (an earlier, interrupted load)


#: What a spilled row without the added columns (written by an older gateway) gets for them.
_SPILL_DEFAULTS = {name: default for name, _, _, default in _ADDED}


def _spill_rows(path: Path) -> list[Row]:
    """The rows of a spill file: one JSON object per line, keyed by column; the columns added
    since (`_ADDED`) are optional, so files an older gateway left behind still load."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = {**_SPILL_DEFAULTS, **json.loads(line)}
                row = tuple(obj[c] for c in COLUMNS)
            except (ValueError, KeyError, TypeError) as exc:
                raise LedgerError(f"{path}:{n}: not a usage row ({type(exc).__name__}: {exc})") from None
            rows.append(row)
    return rows


def load_spills(cfg: LedgerConfig, paths: Iterable[Path] | None = None) -> list[SpillLoad]:
    """Insert spilled rows into the store, one transaction per file, then delete the file. Rows
    already stored are skipped, so a load cut short (or run twice) never counts a request twice.
    Stops at the first file that cannot be read or written (it stays; raises LedgerError)."""
    sink = open_sink(cfg)
    done: list[SpillLoad] = []
    try:
        for path in spill_files() if paths is None else paths:
            try:
                rows = _spill_rows(path)
            except OSError as exc:
                raise LedgerError(f"{path}: {exc.strerror or exc}") from None
            inserted = sink.write(rows, only_new=True) if rows else 0
            path.unlink()
            done.append(SpillLoad(str(path), len(rows), inserted))
    finally:
        sink.close()
    return done
