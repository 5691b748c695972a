"""`gateway.redis_resp`, the pipelined Redis client of the limits stage, against real Redis: the
shared one at 127.0.0.1:6379 (started by .ci/run) and private redis-servers on free ports that
are stopped, restarted or protected by a password. Every test runs on both asyncio's loop and
uvloop (the gateway's), whose transports differ. Keys are per test and deleted."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from conftest import free_port

from gateway import redis_resp
from gateway.redis_resp import (
    AuthError,
    CallTimeoutError,
    ConnectError,
    ConnectionLostError,
    OutcomeUnknownError,
    Redis,
    RedisError,
    ReplyError,
    parse_url,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
ECHO_ARGS = "return {KEYS[1], ARGV[1], #ARGV}"

Main = Callable[[], Awaitable[None]]


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _wait_until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture(scope="module", autouse=True)
def shared_redis() -> None:
    if not _pings(6379):
        if os.environ.get("CI"):
            raise AssertionError("no Redis at 127.0.0.1:6379")
        pytest.skip("no Redis at 127.0.0.1:6379 (.ci/run starts one)")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Main], None]:
    def runner(main: Main) -> None:
        if request.param == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())

    return runner


@pytest.fixture
def prefix() -> str:
    return f"fp-test-resp:{uuid.uuid4().hex[:12]}:"


def _client(url: str = REDIS_URL, timeout_s: float = 5.0, **kw: Any) -> Redis:
    return Redis(url, timeout_s=timeout_s, connect_timeout_s=kw.pop("connect_timeout_s", 5.0), **kw)


async def _until_ok(call: Callable[[], Awaitable[Any]], timeout_s: float = 10.0) -> Any:
    """Retry `call` (across reconnect backoffs) until it succeeds."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except ConnectError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.02)


class _Server:
    """A private redis-server on a free port."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        _wait_until(lambda: _pings(self.port))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server() -> Iterator[_Server]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    s = _Server()
    s.start()
    yield s
    s.kill()


# ---- pipelining --------------------------------------------------------------------------------
def test_concurrent_calls_each_get_their_own_reply_on_one_connection(
    run: Callable[[Main], None], prefix: str
) -> None:
    async def main() -> None:
        c = _client()
        sha = c.register_script(ECHO_ARGS)
        try:
            await c.execute("SET", prefix + "text", "not a number")
            calls: list[Awaitable[Any]] = []
            want: list[Any] = []
            for i in range(3000):
                kind = i % 4
                if kind == 0:
                    calls.append(c.execute("ECHO", f"echo-{i}"))
                    want.append(f"echo-{i}".encode())
                elif kind == 1:
                    calls.append(c.evalsha(sha, [f"k{i}"], [i, "x"]))
                    want.append([f"k{i}".encode(), str(i).encode(), 2])
                elif kind == 2:  # an error reply goes to its caller only
                    calls.append(c.execute("INCR", prefix + "text"))
                    want.append(ReplyError)
                else:
                    calls.append(c.execute("INCRBY", prefix + f"n{i}", i))
                    want.append(i)
            got = await asyncio.gather(*calls, return_exceptions=True)
            assert len(got) == len(want)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                if w is ReplyError:
                    assert isinstance(g, ReplyError) and "not an integer" in str(g), i
                else:
                    assert g == w, i
            # one connection carried them all
            ids = await asyncio.gather(*(c.execute("CLIENT", "ID") for _ in range(50)))
            assert len(set(ids)) == 1
        finally:
            keys = [prefix + "text", *(prefix + f"n{i}" for i in range(3, 3000, 4))]
            await c.execute("DEL", *keys)
            await c.close()

    run(main)


def test_callers_that_give_up_leave_the_others_their_replies(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        c = _client()
        try:
            await c.execute("PING")
            calls = [c.execute("ECHO", f"m{i}") for i in range(500)]
            for fut in calls[::7]:  # cancelled before their replies come (a client went away)
                fut.cancel()
            for i, fut in enumerate(calls):
                if i % 7:
                    assert await fut == f"m{i}".encode()
                else:
                    assert fut.cancelled()
            assert await c.execute("ECHO", "after") == b"after"
        finally:
            await c.close()

    run(main)


def test_error_reply_is_a_reply_error_and_the_connection_goes_on(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        c = _client()
        try:
            with pytest.raises(ReplyError, match="wrong number of arguments") as exc:
                await c.execute("GET")
            assert isinstance(exc.value, RedisError)
            assert not isinstance(exc.value, OutcomeUnknownError | ConnectError)
            before = await c.execute("CLIENT", "ID")
            assert await c.execute("PING") == b"PONG"
            assert await c.execute("CLIENT", "ID") == before  # not reconnected
            with pytest.raises(ReplyError, match="boom"):
                await c.evalsha(c.register_script("return redis.error_reply('boom')"), [], [])
        finally:
            await c.close()

    run(main)


# ---- scripts -----------------------------------------------------------------------------------
def test_noscript_is_recovered_after_script_flush(run: Callable[[Main], None], prefix: str) -> None:
    async def main() -> None:
        c = _client()
        other = _client()
        sha = c.register_script(ECHO_ARGS)
        setter = c.register_script("redis.call('SET', KEYS[1], ARGV[1]) return 1")
        try:
            assert await c.evalsha(sha, ["a"], [1]) == [b"a", b"1", 1]
            await other.execute("SCRIPT", "FLUSH")
            assert await other.execute("SCRIPT", "EXISTS", sha) == [0]
            # several at once, all NOSCRIPT: each is retried with EVAL and answered in its place
            got = await asyncio.gather(*(c.evalsha(sha, [f"b{i}"], [i]) for i in range(20)))
            assert got == [[f"b{i}".encode(), str(i).encode(), 1] for i in range(20)]
            assert await other.execute("SCRIPT", "EXISTS", sha) == [1]  # EVAL loaded it again
            # a call nobody waits for recovers too
            await other.execute("SCRIPT", "FLUSH")
            c.evalsha_nowait(setter, [prefix + "k"], ["v"])
            await c.barrier()
            assert await other.execute("GET", prefix + "k") == b"v"
            assert c.dropped_errors == 0
            # a sha this client does not know: NOSCRIPT reaches the caller
            with pytest.raises(ReplyError, match="NOSCRIPT"):
                await c.evalsha("0" * 40, [], [])
        finally:
            await other.execute("DEL", prefix + "k")
            await c.close()
            await other.close()

    run(main)


def test_nowait_calls_run_in_order_before_later_calls(run: Callable[[Main], None], prefix: str) -> None:
    async def main() -> None:
        c = _client()
        append = c.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
        key = prefix + "list"
        try:
            for i in range(100):
                c.evalsha_nowait(append, [key], [i])
            # no barrier: the next call on the connection sees every one of them
            assert await c.execute("LRANGE", key, 0, -1) == [str(i).encode() for i in range(100)]
            # after SCRIPT FLUSH every call meets NOSCRIPT and is sent again with EVAL: each
            # runs exactly once (their order is no longer guaranteed)
            await c.execute("SCRIPT", "FLUSH")
            for i in range(100, 200):
                c.evalsha_nowait(append, [key], [i])
            await c.barrier()
            got = await c.execute("LRANGE", key, 0, -1)
            assert sorted(got) == sorted(str(i).encode() for i in range(200))
            c.evalsha_nowait(append, [prefix + "not-a-list-op"], [])  # wrong ARGV: error reply
            await c.execute("SET", prefix + "s", "x")
            c.evalsha_nowait(append, [prefix + "s"], ["y"])  # WRONGTYPE: dropped, counted
            await c.barrier()
            assert c.dropped_errors == 2
        finally:
            await c.execute("DEL", key, prefix + "s", prefix + "not-a-list-op")
            await c.close()

    run(main)


# ---- deadlines and lost connections ------------------------------------------------------------
def test_timeout_fails_the_call_and_the_next_call_reconnects(
    run: Callable[[Main], None], prefix: str
) -> None:
    async def main() -> None:
        c = _client(timeout_s=0.2)
        try:
            first = await c.execute("CLIENT", "ID")
            blocked = c.execute("BLPOP", prefix + "never", 30)  # Redis holds the reply 30 s
            behind = [c.execute("ECHO", str(i)) for i in range(3)]  # stuck behind it
            with pytest.raises(CallTimeoutError) as exc:
                await blocked
            assert isinstance(exc.value, TimeoutError) and isinstance(exc.value, OutcomeUnknownError)
            for call in behind:
                with pytest.raises(ConnectionLostError):
                    await call
            assert not c.connected
            again = await c.execute("CLIENT", "ID")
            assert again != first
            assert await c.execute("ECHO", "ok") == b"ok"
        finally:
            await c.close()

    run(main)


def test_connection_killed_fails_pending_calls_and_the_next_call_reconnects(
    run: Callable[[Main], None], prefix: str
) -> None:
    async def main() -> None:
        c = _client()
        admin = _client()
        try:
            victim = await c.execute("CLIENT", "ID")
            blocked = asyncio.ensure_future(c.execute("BLPOP", prefix + "never", 30))
            behind = asyncio.ensure_future(c.execute("ECHO", "behind"))
            await asyncio.sleep(0)  # sent
            for _ in range(1000):  # until Redis holds it blocked
                if b"cmd=blpop" in await admin.execute("CLIENT", "LIST", "ID", victim):
                    break
                await asyncio.sleep(0.01)
            assert await admin.execute("CLIENT", "KILL", "ID", victim) == 1
            for fut in (blocked, behind):
                with pytest.raises(ConnectionLostError) as exc:
                    await fut
                assert isinstance(exc.value, OutcomeUnknownError)
                assert "127.0.0.1:6379" in str(exc.value)
            assert await c.execute("ECHO", "back") == b"back"
            assert await c.execute("CLIENT", "ID") != victim
        finally:
            await c.close()
            await admin.close()

    run(main)


def test_redis_stopped_then_restarted(run: Callable[[Main], None], server: _Server) -> None:
    async def main() -> None:
        c = _client(server.url, timeout_s=2.0, backoff_min_s=0.01, backoff_max_s=0.05)
        sha = c.register_script(ECHO_ARGS)
        try:
            assert await c.evalsha(sha, ["a"], ["1"]) == [b"a", b"1", 1]
            blocked = asyncio.ensure_future(c.execute("BLPOP", "never", 30))
            await asyncio.sleep(0.05)
            server.kill()
            with pytest.raises(ConnectionLostError):
                await blocked
            with pytest.raises(ConnectError, match=r"cannot connect|not reconnecting") as exc:
                await c.execute("PING")
            assert not isinstance(exc.value, OutcomeUnknownError)  # never sent
            c.evalsha_nowait(sha, ["lost"], [])  # no connection: dropped quietly
            server.start()  # a fresh Redis: the script is unknown there
            assert await _until_ok(lambda: c.evalsha(sha, ["b"], ["2"])) == [b"b", b"2", 1]
        finally:
            await c.close()

    run(main)


def test_connection_refused_then_backoff(run: Callable[[Main], None]) -> None:
    async def main() -> None:
        c = _client(f"redis://127.0.0.1:{free_port()}/0", backoff_min_s=60, backoff_max_s=60)
        try:
            with pytest.raises(ConnectError, match="cannot connect") as exc:
                await c.execute("PING")
            assert isinstance(exc.value, ConnectionError)
            with pytest.raises(ConnectError, match="not reconnecting"):  # within the backoff
                await c.execute("PING")
        finally:
            await c.close()

    run(main)


def test_silent_server_connect_and_call_deadlines(run: Callable[[Main], None]) -> None:
    """A peer that accepts TCP connections and never answers (the backlog accepts them)."""

    async def main(port: int) -> None:
        with_auth = _client(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout_s=0.2)
        plain = _client(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        try:
            with pytest.raises(ConnectError, match=r"\(AUTH\): timed out"):  # the handshake
                await with_auth.execute("PING")
            with pytest.raises(CallTimeoutError):  # no handshake: connected, then no reply
                await plain.execute("PING")
        finally:
            await with_auth.close()
            await plain.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        run(lambda: main(port))


# ---- AUTH and SELECT -------------------------------------------------------------------------
def test_password_and_database(run: Callable[[Main], None]) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = _Server("--requirepass", "s3cret")
    server.start()
    base = f"127.0.0.1:{server.port}"

    async def main() -> None:
        wrong = _client(f"redis://:nope-wrong@{base}/0")
        missing = _client(f"redis://{base}/0")
        right = _client(f"redis://:s3cret@{base}/3")
        user = _client(f"redis://default:s3cret@{base}/0")
        try:
            with pytest.raises(AuthError, match="refused AUTH") as exc:
                await wrong.execute("PING")
            assert "WRONGPASS" in str(exc.value) or "invalid password" in str(exc.value)
            assert "nope-wrong" not in str(exc.value)
            assert isinstance(exc.value, ConnectError)
            with pytest.raises(ReplyError, match="NOAUTH"):
                await missing.execute("PING")
            await right.execute("SET", "k", "in-db-3")
            assert await right.execute("GET", "k") == b"in-db-3"
            assert await user.execute("GET", "k") is None  # db 0
            assert await user.execute("SELECT", 3) == b"OK"
            assert await user.execute("GET", "k") == b"in-db-3"
        finally:
            for c in (wrong, missing, right, user):
                await c.close()

    try:
        run(main)
    finally:
        server.kill()


# ---- closing -----------------------------------------------------------------------------------
def test_close_waits_for_pending_calls_then_refuses(run: Callable[[Main], None], prefix: str) -> None:
    async def main() -> None:
        c = _client()
        other = _client()
        setter = c.register_script("redis.call('SET', KEYS[1], ARGV[1]) return 1")
        try:
            c.evalsha_nowait(setter, [prefix + "a"], ["1"])  # not connected yet: waits for it
            await c.close()
            assert await other.execute("GET", prefix + "a") == b"1"
            with pytest.raises(ConnectError, match="closed"):
                await c.execute("PING")
        finally:
            await other.execute("DEL", prefix + "a")
            await other.close()

    run(main)


# ---- URLs --------------------------------------------------------------------------------------
def test_parse_url() -> None:
    ep = parse_url("redis://us%40er:p%3Ass@redis.example:6380/2")
    assert (ep.host, ep.port, ep.db, ep.username, ep.password, ep.ssl) == (
        "redis.example",
        6380,
        2,
        "us@er",
        "p:ss",
        None,
    )
    assert ep.where == "redis.example:6380"
    ep = parse_url("redis://:only-password@h")
    assert (ep.port, ep.db, ep.username, ep.password) == (6379, 0, None, "only-password")
    assert parse_url("redis://h/0?db=5").db == 5
    tls = parse_url("rediss://h:6390/1")
    assert tls.ssl is not None and tls.ssl.check_hostname and tls.ssl.verify_mode.name == "CERT_REQUIRED"
    loose = parse_url("rediss://h?ssl_cert_reqs=none")
    assert (
        loose.ssl is not None and not loose.ssl.check_hostname and loose.ssl.verify_mode.name == "CERT_NONE"
    )
    sock = parse_url("unix://:pw@/run/redis.sock?db=4")
    assert (sock.path, sock.db, sock.password, sock.where) == ("/run/redis.sock", 4, "pw", "/run/redis.sock")
    for bad in ("http://h", "redis://h/x", "rediss://h?ssl_cert_reqs=maybe", "unix://"):
        with pytest.raises(ValueError, match="Redis URL"):
            parse_url(bad)


def test_unix_socket(run: Callable[[Main], None], tmp_path: Any) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    path = tmp_path / "r.sock"
    server = _Server("--unixsocket", str(path))
    server.start()

    async def main() -> None:
        c = _client(f"unix://{path}")
        try:
            assert await c.execute("ECHO", "via unix") == b"via unix"
            assert c.where == str(path)
        finally:
            await c.close()

    try:
        run(main)
    finally:
        server.kill()


def test_module_errors_are_rooted_in_stdlib_bases() -> None:
    assert issubclass(redis_resp.ConnectError, ConnectionError)
    assert issubclass(redis_resp.ConnectionLostError, ConnectionError)
    assert issubclass(redis_resp.CallTimeoutError, TimeoutError)
    assert not issubclass(redis_resp.ReplyError, OSError)
