"""The uvloop engine (gateway.server) on real sockets: framing the app never sees (pipelining,
smuggling, limits, timeouts, 100-continue, HEAD, HTTP/1.0), its processes (graceful stop, a
worker replaced), and back-pressure from a slow reader to the upstream. The HTTP/1.1 suites
(test_bad_input, test_streaming, ...) also run on this engine (FASTPATH_TEST_ENGINE=uvloop)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, free_port, gateway_config, run_gateway, wait_http
from test_bad_input import _Reader, assert_error, build, chat, connect, read_response, wait_readable
from test_streaming import stream_request, wait_for

BAD = "invalid_request_error"
HEAD_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(
        tmp_path_factory.mktemp("uvl"),
        mock_upstream,
        engine="uvloop",
        header_read_timeout_ms=HEAD_TIMEOUT_MS,
        max_headers=20,
        max_header_bytes=4096,
    ) as g:
        yield g


def closed_after(sock: socket.socket) -> bool:
    return _Reader(sock).rest() == b""


class _Replay:
    """Bytes already read, served to `read_response` as a socket would."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out


def get(path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


# ---- pipelining, keep-alive, HEAD, HTTP/1.0 ---------------------------------------------------
def test_pipelined_requests_are_answered_in_order(gw: Gateway) -> None:
    rid = [f"pipe-{i}" for i in range(3)]
    data = (
        get("/healthz", f"X-Request-Id: {rid[0]}\r\n")
        + build(body=chat(), headers=(("X-Request-Id", rid[1]),)).replace(b"Connection: close\r\n", b"")
        + get("/v1/models", f"X-Request-Id: {rid[2]}\r\nConnection: close\r\n")
    )
    with connect(gw.port) as sock:
        sock.sendall(data)
        wire = _Reader(sock).rest()  # the last asked to close: everything, then EOF
    pieces = [b"HTTP/1.1 " + p for p in wire.split(b"HTTP/1.1 ")[1:]]  # JSON bodies: no such text
    got = [read_response(_Replay(p)) for p in pieces]  # type: ignore[arg-type]
    assert [r.headers["x-request-id"] for r in got] == rid
    assert [r.status for r in got] == [200, 200, 200]
    assert got[1].json()["object"] == "chat.completion"
    assert got[2].headers.get("connection") == "close"


def test_keep_alive_serves_many_requests_on_one_connection(gw: Gateway) -> None:
    with connect(gw.port) as sock:
        for _ in range(20):
            sock.sendall(get("/healthz"))
            assert read_response(sock).status == 200


def test_head_has_length_but_no_body_and_keeps_the_connection(gw: Gateway) -> None:
    with connect(gw.port) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + get("/healthz"))
        raw = b""
        while raw.count(b"HTTP/1.1 200") < 2 or not raw.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            assert chunk, raw
            raw += chunk
    first, second = raw.split(b"HTTP/1.1 200")[1:]
    assert b"content-length: 15" in first and not first.endswith(b"}")
    assert second.endswith(b'{"status":"ok"}')


def test_http10_request_is_answered_and_closed(gw: Gateway) -> None:
    with connect(gw.port) as sock:
        sock.sendall(get("/healthz", version="1.0"))
        resp = read_response(sock)
        assert resp.status == 200 and resp.json() == {"status": "ok"}
        assert closed_after(sock)


def test_http10_stream_is_close_delimited(gw: Gateway) -> None:
    body = stream_request(words=3)
    head = (
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    with connect(gw.port) as sock:
        sock.sendall(head % len(body) + body)
        resp = read_response(sock)
    assert resp.status == 200 and "transfer-encoding" not in resp.headers
    assert resp.body.rstrip().endswith(b"data: [DONE]")


def test_expect_continue_gets_100_then_the_answer(gw: Gateway) -> None:
    body = chat()
    head = build(body=None, headers=(("Expect", "100-continue"), ("Content-Length", str(len(body)))))
    with connect(gw.port) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        resp = read_response(sock)
    assert resp.status == 200 and resp.json()["object"] == "chat.completion"


# ---- smuggling and framing: strict llhttp -------------------------------------------------------
SMUGGLING = {
    "cl-and-te": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "bad-chunk-size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "te-not-chunked": b"Transfer-Encoding: gzip\r\n\r\n{}",
    "te-chunked-not-last": b"Transfer-Encoding: chunked, gzip\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "obs-fold": b"X-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\n{}",
    "space-before-colon": b"Content-Length : 2\r\n\r\n{}",
}


@pytest.mark.parametrize("tail", [pytest.param(v, id=k) for k, v in SMUGGLING.items()])
def test_ambiguous_framing_is_refused_and_closes(gw: Gateway, tail: bytes) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(gw.port) as sock:
        # a second request rides behind: it must never be answered
        sock.sendall(head + tail + get("/healthz"))
        resp = read_response(sock)
        assert_error(resp, 400, BAD, "invalid_request")
        assert resp.headers.get("connection") == "close"
        assert closed_after(sock)


# ---- limits and timeouts ------------------------------------------------------------------------
def test_header_limits_are_431_json_and_close(gw: Gateway) -> None:
    for extra in ("".join(f"X-H{i}: v\r\n" for i in range(25)), "X-Big: " + "a" * 5000 + "\r\n"):
        with connect(gw.port) as sock:
            sock.sendall(get("/healthz", extra))
            resp = read_response(sock)
            assert_error(resp, 431, BAD, "headers_too_large")
            assert closed_after(sock)


def test_a_head_that_never_ends_is_cut_at_the_size_cap(gw: Gateway) -> None:
    """Trickled header lines under the count limit but without end: 431 once the head passes
    the cap (64 KiB here), not memory growing until the head timeout."""
    with connect(gw.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ")
        sent = 0
        try:
            while sent < 1_000_000 and not wait_readable(sock, 0.001):
                sock.sendall(b"a" * 8192)
                sent += 8192
        except OSError:
            pass
        resp = read_response(sock)
    assert_error(resp, 431, BAD, "headers_too_large")
    assert sent < 200_000


def test_slow_head_gets_408_and_idle_connection_closes(gw: Gateway) -> None:
    t0 = time.monotonic()
    with connect(gw.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        resp = read_response(sock)
        assert_error(resp, 408, BAD, "request_timeout")
        assert closed_after(sock)
    assert time.monotonic() - t0 < HEAD_TIMEOUT_MS / 1000 + 1.5
    with connect(gw.port) as sock:  # idle keep-alive: closed silently after the same time
        sock.sendall(get("/healthz"))
        assert read_response(sock).status == 200
        t1 = time.monotonic()
        assert closed_after(sock)
        assert time.monotonic() - t1 < HEAD_TIMEOUT_MS / 1000 + 1.5


def test_body_over_limit_is_413_while_the_client_still_sends(gw: Gateway) -> None:
    """The engine keeps nothing past the limit; the client reads the 413 (a lingering close, not
    a reset) even though it was still sending."""
    head = build(body=None, headers=(("Content-Length", str(50_000_000)),))
    with connect(gw.port) as sock:
        sock.sendall(head + b"x" * 100_000)
        resp = read_response(sock)
    assert_error(resp, 413, BAD, "body_too_large")


# ---- processes ----------------------------------------------------------------------------------
def _workers(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_dead_worker_is_replaced(mock_upstream: MockUpstream, tmp_path: Any) -> None:
    with run_gateway(tmp_path, mock_upstream, workers=2, engine="uvloop") as g:
        first = _workers(g.proc.pid)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(w := _workers(g.proc.pid)) == 2 and first[0] not in w)
        for _ in range(10):
            wait_http(f"{g.url}/healthz")
        assert g.proc.poll() is None


def test_sigterm_closes_idle_connections_and_exits_at_once(
    mock_upstream: MockUpstream, tmp_path: Any
) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(gateway_config(mock_upstream.port, shutdown_grace_ms=30000, engine="uvloop"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port),
         "--workers", "2", "--log-level", "warning", "--engine", "uvloop"],
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        with connect(port) as sock:
            sock.sendall(get("/healthz"))
            assert read_response(sock).status == 200
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert closed_after(sock)  # the idle keep-alive connection is closed, not kept 30 s
            assert proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- back-pressure ------------------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _upstream_chunks(upstream: MockUpstream) -> int | None:
    with urllib.request.urlopen(f"{upstream.url}/_mock/stats", timeout=5) as r:
        streams = json.loads(r.read()).get("active_streams") or []
    return int(streams[0]["chunks_written"]) if streams else None


def test_a_client_reading_1_kib_per_s_pauses_the_upstream_and_bounds_memory(
    mock_upstream: MockUpstream, tmp_path: Any
) -> None:
    """Acceptance (issue 17): a fast stream (400k chunks, ~60 MB) to a client reading 1 KiB/s.
    The upstream's send progress stops (it is paused by TCP, because the relay stopped reading
    it, because `send_bytes` awaits the client socket's drain) and the worker's RSS stays flat."""
    total = 400_000
    with run_gateway(tmp_path, mock_upstream, engine="uvloop") as g:
        (worker,) = _workers(g.proc.pid)
        rss0 = _rss_kib(worker)
        body = stream_request(words=total)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", g.port))
        sock.sendall(build(body=body).replace(b"Connection: close\r\n", b""))
        try:
            samples = []
            for _ in range(6):  # 6 s at 1 KiB/s
                sock.recv(1024)
                time.sleep(1.0)
                samples.append((_upstream_chunks(mock_upstream), _rss_kib(worker)))
            chunks = [c for c, _ in samples]
            assert all(c is not None and c < total // 4 for c in chunks), chunks
            assert chunks[-1] == chunks[-2] == chunks[-3], f"the upstream kept sending: {chunks}"
            growth_mib = (max(r for _, r in samples) - rss0) / 1024
            assert growth_mib < 16, f"worker RSS grew {growth_mib:.1f} MiB for one paused stream"
            print(f"upstream chunks per second {chunks}; worker RSS {rss0} -> {[r for _, r in samples]} KiB")
        finally:
            sock.close()
