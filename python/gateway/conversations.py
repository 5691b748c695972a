"""The conversation store of the Responses API: stored responses, their input items, owners.

One table, `fastpath_responses` (id, created_at, owner key id, team, previous_response_id, this
turn's input items, the response object), in an embedded SQLite file by default
(`$FASTPATH_GATEWAY_DATA_DIR/responses.db`, WAL: every worker shares it) or in PostgreSQL (psycopg
3) when several gateway instances must share conversations. The history of a
`previous_response_id` is one recursive query (the chain to its root, oldest first).

Off the event loop: every statement runs on one thread per worker. Writes are group-committed (a
writer task takes what waits, one transaction, then wakes the requests), and a request awaits
its own row before its reply completes: a stored response is readable, from any worker or
instance, as soon as the client has the reply. Retention: each worker deletes responses older
than `retention_days` every `purge_interval_s` (idempotent; several workers may race). The file
or the schema is made on first use, so a gateway that serves no Responses request writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from .config_responses import ResponsesConfig, StoreKind
from .keystore import data_dir

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("gateway.conversations")

#: a chain longer than this is refused (a loop cannot happen: a row names an older one)
MAX_CHAIN = 1_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fastpath_responses ("
    " id TEXT PRIMARY KEY, created_at BIGINT NOT NULL, owner TEXT NOT NULL, team TEXT NOT NULL,"
    " previous_id TEXT, input TEXT NOT NULL, response TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS fastpath_responses_created ON fastpath_responses (created_at)",
)
_INSERT = (
    "INSERT INTO fastpath_responses (id, created_at, owner, team, previous_id, input, response)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_GET = "SELECT id, created_at, owner, team, previous_id, input, response FROM fastpath_responses WHERE id = ?"
_CHAIN = (
    "WITH RECURSIVE chain(id, created_at, owner, team, previous_id, input, response, depth) AS ("
    " SELECT id, created_at, owner, team, previous_id, input, response, 0 FROM fastpath_responses"
    " WHERE id = ?"
    " UNION ALL SELECT r.id, r.created_at, r.owner, r.team, r.previous_id, r.input, r.response,"
    " c.depth + 1 FROM fastpath_responses r JOIN chain c ON r.id = c.previous_id"
    f" WHERE c.depth < {MAX_CHAIN})"
    " SELECT id, created_at, owner, team, previous_id, input, response FROM chain ORDER BY depth DESC"
)
_DELETE = "DELETE FROM fastpath_responses WHERE id = ?"
_PURGE = "DELETE FROM fastpath_responses WHERE created_at < ?"


class StoreError(Exception):
    pass


class Stored(msgspec.Struct, frozen=True, gc=False):
    """One stored response. `input` and `response` are JSON text (items, the response object)."""

    id: str
    created_at: int
    owner: str
    team: str
    previous_id: str | None
    input: str
    response: str

    def visible_to(self, caller: tuple[str, str] | None) -> bool:
        """The creator's key, its team's other keys, or the admin (None) see it."""
        if caller is None:
            return True
        return caller[0] == self.owner or bool(self.team and caller[1] == self.team)


class Backend(Protocol):
    def put(self, rows: list[Stored]) -> None: ...
    def get(self, response_id: str) -> Stored | None: ...
    def chain(self, response_id: str) -> list[Stored]: ...
    def delete(self, response_id: str) -> bool: ...
    def purge(self, before: int) -> int: ...
    def close(self) -> None: ...


class SqliteBackend:
    __slots__ = ("_conn", "path", "timeout_s")

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            self._conn = conn
        return self._conn

    def put(self, rows: list[Stored]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, [_tuple(r) for r in rows])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get(self, response_id: str) -> Stored | None:
        row = self._db().execute(_GET, (response_id,)).fetchone()
        return None if row is None else Stored(*row)

    def chain(self, response_id: str) -> list[Stored]:
        return [Stored(*row) for row in self._db().execute(_CHAIN, (response_id,))]

    def delete(self, response_id: str) -> bool:
        return self._db().execute(_DELETE, (response_id,)).rowcount > 0

    def purge(self, before: int) -> int:
        if self._conn is None and not self.path.exists():  # nothing stored yet: no file made
            return 0
        return int(self._db().execute(_PURGE, (before,)).rowcount)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresBackend:
    """One autocommit connection (a batch is one transaction), reconnected after a failure."""

    __slots__ = ("_conn", "dsn", "timeout_s")

    def __init__(self, dsn: str, timeout_s: float) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None

    def _db(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        if self._conn is None or self._conn.closed:
            ms = int(self.timeout_s * 1000)
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=max(1, int(self.timeout_s)),
                options=f"-c statement_timeout={ms}",
            )
            with contextlib.suppress(psycopg.errors.UniqueViolation):  # two workers at once
                for stmt in _SCHEMA:
                    conn.execute(stmt)
            self._conn = conn
        return self._conn

    def _run(self, fn: Any) -> Any:
        import psycopg

        try:
            return fn(self._db())
        except psycopg.OperationalError:
            self.close()  # a lost connection: the next call reconnects
            raise

    def put(self, rows: list[Stored]) -> None:
        def run(db: psycopg.Connection[tuple[Any, ...]]) -> None:
            with db.transaction(), db.cursor() as cur:
                cur.executemany(_pg(_INSERT), [_tuple(r) for r in rows])

        self._run(run)

    def get(self, response_id: str) -> Stored | None:
        row = self._run(lambda db: db.execute(_pg(_GET), (response_id,)).fetchone())
        return None if row is None else Stored(*row)

    def chain(self, response_id: str) -> list[Stored]:
        rows = self._run(lambda db: db.execute(_pg(_CHAIN), (response_id,)).fetchall())
        return [Stored(*row) for row in rows]

    def delete(self, response_id: str) -> bool:
        return bool(self._run(lambda db: db.execute(_pg(_DELETE), (response_id,)).rowcount > 0))

    def purge(self, before: int) -> int:
        return int(self._run(lambda db: db.execute(_pg(_PURGE), (before,)).rowcount))

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _tuple(r: Stored) -> tuple[Any, ...]:
    return (r.id, r.created_at, r.owner, r.team, r.previous_id, r.input, r.response)


def open_backend(cfg: ResponsesConfig) -> Backend:
    s = cfg.store
    timeout_s = s.timeout_ms / 1000
    if s.kind is StoreKind.POSTGRES:
        return PostgresBackend(s.dsn, timeout_s)
    return SqliteBackend(Path(s.path) if s.path else data_dir() / "responses.db", timeout_s)


class ConversationStore:
    """A worker's access to the store: one thread for the statements, a group-commit writer
    task, the periodic purge. `start`/`close` follow the pipeline's parts."""

    name = "conversations"

    def __init__(self, cfg: ResponsesConfig, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.backend = backend or open_backend(cfg)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastpath-responses")
        self._pending: list[tuple[Stored, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, worker: Any) -> None:
        loop = self._loop = worker.loop
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._purger())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:  # what waits still goes in (the replies already waited for it)
            await self._flush()
        loop = self._loop or asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self.backend.close)
        self._pool.shutdown(wait=False)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = self._loop or asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(str(exc)) from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise StoreError(str(exc)) from exc
            raise

    # ---- writes -------------------------------------------------------------------------------
    async def put(self, row: Stored) -> None:
        """Resolves once the row is committed (with whatever else waited: one transaction)."""
        assert self._loop is not None and self._wake is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((row, fut))
        self._wake.set()
        await fut

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self._call(self.backend.put, [row for row, _ in batch])
        except Exception as exc:
            log.error("storing %d responses failed: %s", len(batch), exc)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreError(str(exc)))
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    # ---- reads, deletion, retention ---------------------------------------------------------------
    async def get(self, response_id: str) -> Stored | None:
        result: Stored | None = await self._call(self.backend.get, response_id)
        return result

    async def chain(self, response_id: str) -> list[Stored]:
        result: list[Stored] = await self._call(self.backend.chain, response_id)
        return result

    async def delete(self, response_id: str) -> bool:
        result: bool = await self._call(self.backend.delete, response_id)
        return result

    async def purge(self, now: float | None = None) -> int:
        before = int((now if now is not None else time.time()) - self.cfg.retention_days * 86_400)
        result: int = await self._call(self.backend.purge, before)
        return result

    async def _purger(self) -> None:
        interval = self.cfg.purge_interval_s
        await asyncio.sleep(random.uniform(1.0, max(1.0, interval)))  # workers apart
        while True:
            try:
                n = await self.purge()
                if n:
                    log.info("responses: %d past retention deleted", n)
            except StoreError as exc:
                log.warning("responses: purge failed: %s", exc)
            await asyncio.sleep(interval)
