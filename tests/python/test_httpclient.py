"""The pooled HTTP/1.1 upstream client against a raw asyncio server on a real socket, which
sends crafted bytes (split at chosen offsets) so framing edge cases are exercised exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.upstreams.httpclient import (
    HttpPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

REQ = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def serve(script: Script, body: Callable[[HttpPool], Awaitable[None]], connect_timeout: float = 2) -> int:
    """Run `script` per accepted connection and `body` as the client; returns connections seen."""
    conns = 0

    async def main() -> None:
        nonlocal conns

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal conns
            conns += 1
            try:
                await script(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = HttpPool(
            asyncio.get_running_loop(),
            "127.0.0.1",
            port,
            tls=False,
            max_idle=4,
            connect_timeout_s=connect_timeout,
        )
        try:
            await asyncio.wait_for(body(pool), 10)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return conns


def deadline(s: float = 5) -> float:
    return asyncio.get_running_loop().time() + s


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    b"7\r\ndata: 1\r\n"
    b"a;ext=1\r\n\ndata: 22\n\r\n"
    b"3\r\n\n\n\n\r\n"
    b"0\r\nX-Trailer: y\r\n\r\n"
)
CHUNKED_BODY = b"data: 1\ndata: 22\n\n\n\n"


@pytest.mark.parametrize("split", range(0, len(CHUNKED), 3))
def test_chunked_body_split_anywhere(split: int) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(CHUNKED[:split])
        await w.drain()
        await asyncio.sleep(0.005)
        w.write(CHUNKED[split:])
        await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        conn = await pool.request(REQ, head_deadline=deadline())
        assert conn.status == 200 and conn.headers[b"content-type"] == b"text/event-stream"
        got = await conn.read_all(1 << 20, deadline())
        assert got == CHUNKED_BODY
        conn.release()

    serve(script, body)


def test_keep_alive_reuses_one_connection() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(3):
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
            await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        for i in range(3):
            conn = await pool.request(REQ, head_deadline=deadline())
            assert await conn.read_all(100, deadline()) == str(i).encode()
            conn.release()

    assert serve(script, body) == 1


def test_stale_pooled_connection_is_retried_on_a_new_one() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        # Reads the next request and closes without answering: a keep-alive race.
        await r.readuntil(b"\r\n\r\n")

    async def body(pool: HttpPool) -> None:
        for _ in range(2):
            conn = await pool.request(REQ, head_deadline=deadline())
            assert await conn.read_all(100, deadline()) == b"ok"
            conn.release()

    assert serve(script, body) == 2


def test_connection_close_response_is_not_reused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof")
        await w.drain()

    async def body(pool: HttpPool) -> None:
        for _ in range(2):
            conn = await pool.request(REQ, head_deadline=deadline())
            assert await conn.read_all(100, deadline()) == b"until-eof"
            conn.release()

    assert serve(script, body) == 2


def test_first_byte_timeout() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()

    async def body(pool: HttpPool) -> None:
        with pytest.raises(UpstreamTimeout) as exc:
            await pool.request(REQ, head_deadline=deadline(0.2))
        assert exc.value.phase == "first byte"

    serve(script, body)


def test_idle_timeout_mid_body_then_close() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        conn = await pool.request(REQ, head_deadline=deadline())
        assert await conn.read(deadline()) == b"12345"
        with pytest.raises(UpstreamTimeout):
            await conn.read(deadline(0.2))
        conn.release()  # incomplete body: must close, not pool
        assert not pool._idle

    serve(script, body)


def test_truncated_body_is_a_protocol_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n123")
        await w.drain()

    async def body(pool: HttpPool) -> None:
        conn = await pool.request(REQ, head_deadline=deadline())
        with pytest.raises(UpstreamProtocolError):
            await conn.read_all(100, deadline())

    serve(script, body)


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-header", "bad-te", "bad-length"],
)
def test_malformed_heads_are_protocol_errors(answer: bytes) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer)
        await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        with pytest.raises(UpstreamProtocolError):
            await pool.request(REQ, head_deadline=deadline())

    serve(script, body)


def test_interim_100_continue_is_skipped() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz")
        await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        conn = await pool.request(REQ, head_deadline=deadline())
        assert conn.status == 201 and await conn.read_all(10, deadline()) == b"z"

    serve(script, body)


def test_response_size_limit() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        await w.drain()
        await r.read()

    async def body(pool: HttpPool) -> None:
        conn = await pool.request(REQ, head_deadline=deadline())
        with pytest.raises(UpstreamProtocolError):
            await conn.read_all(1000, deadline())

    serve(script, body)


def test_connect_refused() -> None:
    async def main() -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = HttpPool(
            asyncio.get_running_loop(), "127.0.0.1", port, tls=False, max_idle=1, connect_timeout_s=2
        )
        with pytest.raises(UpstreamConnectError):
            await pool.request(REQ, head_deadline=None)

    asyncio.run(main())
