"""A lean asyncio Redis client for the request path: one persistent connection, pipelined.

Why not redis-py: its asyncio client spends ~65-75 µs of Python per call (a pool checkout and
release, its command and parser layers, retry machinery, one connection per call in flight);
here a call is `hiredis.pack_command`, one future and one deque entry, and the replies of many
calls are parsed by one `hiredis.Reader` feed.

- Pipelined: a call writes its command and queues its future; replies come back in order and
  resolve the futures in order. Commands sent during one event-loop iteration go out in one
  write (one syscall for a burst of concurrent calls), and so does a command nobody waits for
  (`evalsha_nowait`). A write (and its reply's read) costs more than the Python of a call:
  fewer of them is what makes calls cheap. A call made with nothing in flight is written at
  once (waiting for the end of the iteration would cost an extra loop turn).
- Deadlines: every call has `timeout_s`. One loop timer watches the oldest pending call (all
  calls share the timeout, so the oldest one is the first due); when it is overdue, every call
  behind it is stuck behind its reply too, so the connection is dropped: the overdue call fails
  with `CallTimeoutError`, the others with `ConnectionLostError`.
- A call whose command was sent but whose reply never came fails with an `OutcomeUnknownError`
  (it may or may not have run); one that was never sent fails with `ConnectError`; an error
  reply is a `ReplyError`. All are `RedisError`s.
- Scripts: every script registered with `register_script` is loaded (SCRIPT LOAD) on each new
  connection before anything else is sent, so EVALSHA finds it after a Redis restart. A
  NOSCRIPT all the same (`SCRIPT FLUSH` while connected) is recovered transparently: the call
  is sent again with EVAL, once; only then can a call sent after it run before it (the
  ordering below holds except across a `SCRIPT FLUSH`).
- Connecting is lazy and single-flight (the first call connects; concurrent calls wait for the
  same attempt), bounded by `connect_timeout_s` (TCP/TLS, AUTH, SELECT). After a dropped
  connection the next call reconnects at once; after a failed attempt, calls fail fast with
  `ConnectError` for a backoff that doubles from `backoff_min_s` to `backoff_max_s`.

URLs (the forms `limits.redis.url` accepts): `redis://[[user]:password@]host[:port][/db]`,
`rediss://...` (TLS; query `ssl_cert_reqs=none|optional|required`, `ssl_ca_certs=PATH`,
`ssl_check_hostname=true|false`), `unix://[[user]:password@]/path/to.sock`; `?db=N` anywhere.
`redis+cluster://host:port[,host:port...]` (and `rediss+cluster://`): a Redis Cluster, through
`redis_cluster.RedisCluster` (same calls, routed by slot); `make_client` picks by the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

if TYPE_CHECKING:
    from .redis_cluster import RedisCluster

__all__ = [
    "AuthError",
    "CallTimeoutError",
    "Client",
    "ConnectError",
    "ConnectionLostError",
    "OutcomeUnknownError",
    "Redis",
    "RedisError",
    "ReplyError",
    "make_client",
    "parse_url",
]

log = logging.getLogger("gateway.redis")

Arg = bytes | str | int | float


class RedisError(Exception):
    """Every failure of this client."""


class ReplyError(RedisError):
    """Redis answered the command with an error reply (e.g. `ERR ...`, `WRONGTYPE ...`)."""


class ConnectError(RedisError, ConnectionError):
    """No connection (refused, timed out, TLS, or backing off after a failed attempt): the
    command was not sent."""


class AuthError(ConnectError):
    """Redis refused the connection's AUTH or SELECT (wrong password, unknown user, bad db)."""


class OutcomeUnknownError(RedisError):
    """The command was sent but its reply never came: it may or may not have run."""


class ConnectionLostError(OutcomeUnknownError, ConnectionError):
    """The connection dropped (or was dropped) before the reply came."""


class CallTimeoutError(OutcomeUnknownError, TimeoutError):
    """No reply within the call's deadline (the connection is then dropped)."""


class Endpoint(NamedTuple):
    host: str
    port: int
    #: a unix socket path ('' for TCP)
    path: str
    db: int
    username: str | None
    password: str | None
    ssl: ssl.SSLContext | None

    @property
    def where(self) -> str:
        """For messages: never the credentials."""
        return self.path or f"{self.host}:{self.port}"


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_TRUE = ("1", "true", "yes", "on")


def parse_url(url: str) -> Endpoint:
    """`redis://`, `rediss://` or `unix://` URL -> where and how to connect. Raises ValueError."""
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    username = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password is not None else None
    db_text = query.pop("db", "")
    if not db_text and u.scheme != "unix" and u.path not in ("", "/"):
        db_text = u.path.lstrip("/")
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError("Redis URL: the database must be a number") from None
    ctx: ssl.SSLContext | None = None
    if u.scheme == "rediss":
        ctx = ssl.create_default_context(cafile=query.pop("ssl_ca_certs", None))
        reqs = _CERT_REQS.get(query.pop("ssl_cert_reqs", "required").lower())
        if reqs is None:
            raise ValueError("Redis URL: ssl_cert_reqs must be none, optional or required")
        check = query.pop("ssl_check_hostname", "true").lower() in _TRUE
        ctx.check_hostname = check and reqs != ssl.CERT_NONE
        ctx.verify_mode = reqs
    elif u.scheme not in ("redis", "unix"):
        raise ValueError("Redis URL: must be a redis://, rediss:// or unix:// URL")
    if query:
        log.warning("Redis URL: ignoring the unsupported parameters %s", ", ".join(sorted(query)))
    if u.scheme == "unix":
        if not u.path:
            raise ValueError("Redis URL: unix:// needs a socket path")
        return Endpoint("", 0, u.path, db, username, password, None)
    return Endpoint(u.hostname or "127.0.0.1", u.port or 6379, "", db, username, password, ctx)


#: RESP-encode a command (in C). hiredis's stub types it as taking a 1-tuple.
_pack: Callable[[tuple[Arg, ...]], bytes] = hiredis.pack_command  # type: ignore[assignment]
_MORE = object()  # hiredis.Reader: no complete reply buffered yet
#: a timer due within this much of a deadline counts it as passed (uvloop's timers have 1 ms
#: resolution and may fire that much early)
_TIMER_SLACK_S = 0.001


class _Conn(asyncio.Protocol):
    """One connection: writes commands, resolves their futures in reply order.

    A pending entry is [future or None (nobody waits: the reply is dropped), deadline (loop
    time), the EVALSHA command to retry with EVAL on NOSCRIPT or None]."""

    __slots__ = (
        "_client",
        "_failed",
        "_flush_handle",
        "_idle",
        "_out",
        "_reader",
        "_timer",
        "_transport",
        "_waiters",
        "loop",
    )

    def __init__(self, client: Redis, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self.loop = loop
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ReplyError, notEnoughData=_MORE)
        self._waiters: deque[list[Any]] = deque()
        self._out: list[bytes] = []
        #: the write at the end of this loop iteration of what `_out` holds
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        #: set when the last pending reply has come (`Redis.close` waits for it)
        self._idle: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        waiters = self._waiters
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _MORE:
                entry = waiters.popleft()  # IndexError: a reply nobody asked for
                fut = entry[0]
                if type(reply) is ReplyError:
                    if entry[2] is not None and str(reply).startswith("NOSCRIPT"):
                        self._retry_with_eval(fut, entry[2], reply)
                        continue
                    if fut is None:
                        self._client.dropped_errors += 1
                    elif not fut.done():
                        fut.set_exception(reply)
                elif fut is not None and not fut.done():
                    fut.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(ConnectionLostError(f"Redis at {self._client.where}: protocol error ({exc!r})"))
            return
        if not waiters and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc!r}" if exc is not None else ""
        self.fail(ConnectionLostError(f"connection to Redis at {self._client.where} lost{reason}"))

    # ---- sending ------------------------------------------------------------------------------
    def send(self, payload: bytes, fut: asyncio.Future[Any] | None, script: tuple[Arg, ...] | None) -> None:
        deadline = self.loop.time() + self._client.timeout_s
        waiters = self._waiters
        out = self._out
        if len(waiters) == len(out) and self._transport is not None:
            # nothing sent is waiting for its reply: write now, with what is buffered (at low
            # concurrency a write at the end of the iteration would cost an extra loop
            # iteration, an epoll_wait, per call)
            if out:
                out.append(payload)
                self._flush()
            else:
                self._transport.write(payload)
        else:
            # calls in flight: one write for every command sent in this loop iteration
            out.append(payload)
            if self._flush_handle is None:
                self._flush_handle = self.loop.call_soon(self._flush)
        waiters.append([fut, deadline, script])
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def send_later(self, payload: bytes, script: tuple[Arg, ...] | None) -> None:
        """A command nobody waits for: it goes out at the end of this loop iteration, in one
        write with every other command sent in it (a write, and its reply's read, are most of
        a call's cost). Not later: what it changes must be visible to other clients by the
        time the reply that follows it reaches its client."""
        self._out.append(payload)
        self._waiters.append([None, self.loop.time() + self._client.timeout_s, script])
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self.loop.call_at(self._waiters[-1][1], self._check_deadline)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        out = self._out
        if not out or self._transport is None or self._failed:
            return
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _retry_with_eval(
        self, fut: asyncio.Future[Any] | None, cmd: tuple[Arg, ...], reply: ReplyError
    ) -> None:
        sha = cmd[1]
        source = self._client.scripts.get(sha) if isinstance(sha, str) else None
        if source is None:  # not a registered script: the caller gets the NOSCRIPT error
            if fut is not None and not fut.done():
                fut.set_exception(reply)
            return
        self.send(_pack(("EVAL", source, *cmd[2:])), fut, None)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._failed or not self._waiters:
            return
        deadline = self._waiters[0][1]
        if self.loop.time() + _TIMER_SLACK_S < deadline:
            self._timer = self.loop.call_at(deadline, self._check_deadline)
            return
        where = self._client.where
        head = self._waiters.popleft()
        fut = head[0]
        if fut is not None and not fut.done():
            fut.set_exception(CallTimeoutError(f"no reply from Redis at {where} within the deadline"))
        self.fail(ConnectionLostError(f"connection to Redis at {where} dropped: an earlier call timed out"))

    # ---- closing ------------------------------------------------------------------------------
    def fail(self, exc: ConnectionLostError) -> None:
        """Drop the connection; every pending call fails with (a copy of) `exc`."""
        if self._failed:
            return
        self._failed = True
        self._client.forget(self)
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        if self._transport is not None:
            self._transport.abort()
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[0]
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionLostError(*exc.args))
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for every pending reply, then close."""
        if self._waiters and not self._failed:
            self._idle = self.loop.create_future()
            with contextlib.suppress(TimeoutError):  # what is still pending fails below
                await asyncio.wait_for(asyncio.shield(self._idle), timeout_s)
        # everything sent has been answered (or has had its time): nothing is left to flush
        self.fail(ConnectionLostError(f"Redis client for {self._client.where} closed"))


class Redis:
    """A pipelined Redis client for one event loop (one per worker process)."""

    __slots__ = (
        "_backlog",
        "_backoff_max_s",
        "_backoff_min_s",
        "_backoff_s",
        "_closed",
        "_conn",
        "_connect_timeout_s",
        "_connecting",
        "_endpoint",
        "_last_error",
        "_retry_at",
        "dropped_errors",
        "scripts",
        "timeout_s",
        "where",
    )

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 1.0,
    ) -> None:
        self._endpoint = parse_url(url)
        self.where = self._endpoint.where
        #: the deadline of every call
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._backoff_min_s = min(backoff_min_s, backoff_max_s)
        self._backoff_max_s = backoff_max_s
        self._backoff_s = self._backoff_min_s
        self._retry_at = 0.0
        self._last_error = ""
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False
        #: sha1 -> source of the registered scripts (for NOSCRIPT recovery)
        self.scripts: dict[str, str] = {}
        #: error replies to `*_nowait` calls (nobody waits for them)
        self.dropped_errors = 0
        #: commands waiting for the connection being made: (payload, future, script)
        self._backlog: list[tuple[bytes, asyncio.Future[Any] | None, tuple[Arg, ...] | None]] = []

    # ---- calls --------------------------------------------------------------------------------
    def register_script(self, source: str) -> str:
        """Remember a Lua script; returns its sha1 for `evalsha`."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        if sha not in self.scripts:
            self.scripts[sha] = source
            if self._conn is not None:
                self._conn.send(_pack(("SCRIPT", "LOAD", source)), None, None)
        return sha

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """One command, e.g. `await client.execute("GET", "k")`; replies as hiredis gives them
        (bytes, int, list, None)."""
        return self._call(args, None)

    def call(self, cmd: tuple[Arg, ...], script: bool = False) -> asyncio.Future[Any]:
        """A command as a tuple (`script`: an EVALSHA, re-sent with EVAL on NOSCRIPT)."""
        return self._call(cmd, cmd if script else None)

    def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """EVALSHA; a script registered with `register_script` survives NOSCRIPT (EVAL once)."""
        cmd = ("EVALSHA", sha, len(keys), *keys, *args)
        return self._call(cmd, cmd)

    def evalsha_nowait(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> None:
        """`evalsha` that nobody waits for: sent in order with the other calls (a later call on
        this client runs after it) at the end of this loop iteration, its reply dropped;
        failures are not reported (error replies count in `dropped_errors`)."""
        cmd = ("EVALSHA", sha, len(keys), *keys, *args)
        conn = self._conn
        if conn is not None:
            conn.send_later(_pack(cmd), cmd)
        else:
            self._enqueue(_pack(cmd), None, cmd)

    async def barrier(self) -> None:
        """Wait until every command sent so far (`*_nowait` ones too) has been answered: replies
        come in order, so a PING's comes after theirs."""
        await self.execute("PING")

    def _call(self, cmd: tuple[Arg, ...], script: tuple[Arg, ...] | None) -> asyncio.Future[Any]:
        conn = self._conn
        if conn is not None:
            fut = conn.loop.create_future()
            conn.send(_pack(cmd), fut, script)
        else:
            fut = asyncio.get_running_loop().create_future()
            self._enqueue(_pack(cmd), fut, script)
        return fut

    # ---- the connection -----------------------------------------------------------------------
    def _enqueue(
        self, payload: bytes, fut: asyncio.Future[Any] | None, script: tuple[Arg, ...] | None
    ) -> None:
        """Not connected: the command waits, in call order, for the connection being made
        (one attempt for every caller), or fails at once with `ConnectError`."""
        error = None
        if self._closed:
            error = ConnectError(f"Redis client for {self.where} is closed")
        elif self._connecting is None:
            loop = asyncio.get_running_loop()
            wait_s = self._retry_at - loop.time()
            if wait_s > 0:
                error = ConnectError(
                    f"Redis at {self.where}: not reconnecting for {wait_s:.3f} s after: {self._last_error}"
                )
            else:
                self._connecting = loop.create_task(self._connect(loop))
        if error is None:
            self._backlog.append((payload, fut, script))
        elif fut is not None:
            fut.set_exception(error)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        ep = self._endpoint
        conn: _Conn | None = None
        step = "connect"
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if ep.path:
                    _, conn = await loop.create_unix_connection(lambda: _Conn(self, loop), ep.path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, loop),
                        ep.host,
                        ep.port,
                        ssl=ep.ssl,
                        server_hostname=ep.host if ep.ssl is not None else None,
                    )
                steps: list[tuple[str, tuple[Arg, ...]]] = []
                if ep.password is not None or ep.username:
                    auth: tuple[Arg, ...] = (ep.password or "",)
                    steps.append(("AUTH", ("AUTH", ep.username, *auth) if ep.username else ("AUTH", *auth)))
                if ep.db:
                    steps.append(("SELECT", ("SELECT", ep.db)))
                futs = []
                for name, cmd in steps:  # pipelined: one round trip
                    fut = loop.create_future()
                    conn.send(_pack(cmd), fut, None)
                    futs.append((name, fut))
                for name, fut in futs:
                    step = name
                    await fut
        except ReplyError as exc:
            self._failed_attempt(loop, conn, AuthError(f"Redis at {self.where} refused {step}: {exc}"))
            return
        except (OSError, TimeoutError, OutcomeUnknownError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            self._failed_attempt(
                loop, conn, ConnectError(f"cannot connect to Redis at {self.where} ({step}): {what}")
            )
            return
        except asyncio.CancelledError:  # `close` gave up on it
            self._failed_attempt(loop, conn, ConnectError(f"Redis client for {self.where} closed"))
            raise
        finally:
            self._connecting = None
        self._backoff_s = self._backoff_min_s
        self._retry_at = 0.0
        self._conn = conn
        for source in self.scripts.values():  # loaded before any EVALSHA (reply dropped)
            conn.send(_pack(("SCRIPT", "LOAD", source)), None, None)
        backlog = self._backlog
        self._backlog = []
        for payload, waiter, script in backlog:
            if waiter is None or not waiter.done():  # (a caller may have given up)
                conn.send(payload, waiter, script)

    def _failed_attempt(self, loop: asyncio.AbstractEventLoop, conn: _Conn | None, err: ConnectError) -> None:
        if conn is not None:
            conn.fail(ConnectionLostError(str(err)))
        self._last_error = str(err)
        self._retry_at = loop.time() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._backoff_max_s)
        backlog = self._backlog
        self._backlog = []
        for _, fut, _ in backlog:
            if fut is not None and not fut.done():
                fut.set_exception(type(err)(*err.args))

    def forget(self, conn: _Conn) -> None:
        """`conn` is dropped: the next call connects anew."""
        if self._conn is conn:
            self._conn = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Wait for the calls pending (a connection being made, at most its connect timeout;
        then their replies, at most `drain_timeout_s`, default the call timeout), then close.
        Later calls fail with `ConnectError`."""
        connecting = self._connecting
        if connecting is not None:
            await connecting
        self._closed = True
        conn = self._conn
        self._conn = None
        if conn is not None:
            await conn.drain(self.timeout_s if drain_timeout_s is None else drain_timeout_s)


#: what `make_client` returns: both have the same calls
Client: TypeAlias = "Redis | RedisCluster"


def make_client(
    url: str,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    backoff_min_s: float = 0.05,
    backoff_max_s: float = 1.0,
) -> Client:
    """A `Redis` for a single instance, a `RedisCluster` for a `redis+cluster://` URL."""
    kind: type[Redis] | type[RedisCluster] = Redis
    if urlsplit(url).scheme.endswith("+cluster"):
        from .redis_cluster import RedisCluster

        kind = RedisCluster
    return kind(
        url,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        backoff_min_s=backoff_min_s,
        backoff_max_s=backoff_max_s,
    )
