"""Process lifecycle: SIGTERM drains in-flight streams; a client that leaves during a unary
call cancels the upstream request."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

from conftest import Gateway, MockUpstream, run_gateway
from test_streaming import data_events, open_stream, sse_lines, stream_request, wait_for


def test_sigterm_lets_in_flight_stream_finish(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    with (
        run_gateway(tmp_path, mock_upstream) as gw,
        open_stream(gw.port, stream_request(words=20, chunk_delay_ms=50)) as resp,
    ):
        lines = sse_lines(resp)
        first = next(lines)
        assert first.startswith(b"data: {")
        gw.proc.send_signal(signal.SIGTERM)
        events = data_events([first, *lines])
        assert events[-1] == b"[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text == " ".join(f"w{i}" for i in range(20))
        assert gw.proc.wait(15) == 0


def test_client_leaving_a_unary_call_cancels_the_upstream(
    gateway: Gateway, mock_upstream: MockUpstream
) -> None:
    mock_upstream.clear()
    body = json.dumps(
        {"model": "echo", "messages": [{"role": "user", "content": "x"}], "mock": {"first_delay_ms": 30_000}}
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

        def upstream_has_it() -> bool:
            return any(e["event"] == "request" for e in mock_upstream.events())

        wait_for(upstream_has_it)

    def aborted() -> list[dict[str, Any]]:
        return [e for e in mock_upstream.events() if e["event"] == "request_aborted"]

    assert wait_for(aborted, timeout_s=10)
