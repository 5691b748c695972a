"""End-to-end tests of the OpenAI mock upstream (``gateway.dev.openai_mock``).

The mock runs as a real subprocess, exactly as ``make run`` and the e2e suites start it, and is
exercised with the official ``openai`` SDK (wire compatibility) and with raw sockets (byte-exact
framing, drops, aborts, back-pressure), because those are what the gateway will be tested against.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import openai
import pytest

REPO = Path(__file__).resolve().parents[3]
PY_SRC = REPO / "python"
MOCK_FILE = PY_SRC / "gateway" / "dev" / "openai_mock.py"
STARTUP_TIMEOUT_S = 30.0
POLL_TIMEOUT_S = 20.0

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Process management
# ------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PY_SRC), env.get("PYTHONPATH")) if p)
    return env


def _mock_cmd() -> list[str]:
    """``-m gateway.dev.openai_mock`` when the package imports; else the same file run by path.

    ``gateway/__init__`` imports the Rust extension, which may not be built in a bare checkout; the
    mock itself needs only the stdlib and orjson, so running it by path is the same program.
    """
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway.dev.openai_mock"], env=_env(), capture_output=True, timeout=60
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "gateway.dev.openai_mock"]
    return [sys.executable, str(MOCK_FILE)]


def _wait_for(pred: Callable[[], T | None], what: str, timeout: float = POLL_TIMEOUT_S) -> T:
    """Poll ``pred`` until it returns something truthy; the timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class MockProcess:
    proc: subprocess.Popen[bytes]
    ready_file: Path
    stdout_path: Path
    stderr_path: Path
    url: str
    loop: str = "uvloop"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_mock(workdir: Path, *extra_args: str) -> MockProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready"
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    with out.open("wb") as out_fh, err.open("wb") as err_fh:
        proc = subprocess.Popen(
            [*_mock_cmd(), "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready), *extra_args],
            env=_env(),
            stdout=out_fh,
            stderr=err_fh,
            cwd=REPO,
        )
    try:

        def ready_url() -> str | None:
            if proc.poll() is not None:
                pytest.fail(f"mock exited with {proc.returncode}: {err.read_text()}")
            return ready.read_text().strip() if ready.exists() else None

        url = _wait_for(ready_url, "the mock's ready file", STARTUP_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return MockProcess(proc, ready, out, err, url)


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def mock(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProcess]:
    """One mock per event-loop flavour: the CLI uses uvloop, in-process users may run plain asyncio."""
    extra = ("--no-uvloop",) if request.param == "asyncio" else ()
    proc = start_mock(tmp_path_factory.mktemp("openai_mock"), *extra)
    proc.loop = request.param
    try:
        yield proc
    finally:
        rc = proc.stop()
    assert rc == 0, proc.stderr()
    assert not proc.ready_file.exists(), "ready file must be removed on clean exit"
    assert "Traceback" not in proc.stderr(), proc.stderr()


@pytest.fixture
def client(mock: MockProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=mock.base_url, api_key="sk-test", max_retries=0, timeout=30) as c:
        yield c


# ------------------------------------------------------------------------------------------------
# Raw HTTP/1.1 client (strict, so framing mistakes fail loudly)
# ------------------------------------------------------------------------------------------------


class RawConn:
    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        payload = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "Host: mock", f"Content-Length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {sep!r}; buffered {self.buf[-200:]!r}")
        head, _, self.buf = self.buf.partition(sep)
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        return int(status), headers

    def json_response(self) -> tuple[int, dict[str, str], Any]:
        status, headers = self.head()
        assert "transfer-encoding" not in headers
        return status, headers, json.loads(self.read_exact(int(headers["content-length"])))

    def next_chunk(self) -> bytes:
        """One HTTP chunk's payload, checking the CRLFs exactly; b"" for the terminating chunk."""
        size_line = self.read_until(b"\r\n")
        assert size_line and all(c in b"0123456789abcdef" for c in size_line), size_line
        data = self.read_exact(int(size_line, 16) + 2)
        assert data.endswith(b"\r\n"), data[-10:]
        return data[:-2]


def sse_events(chunks: list[bytes]) -> list[Any]:
    """Decode chunks, asserting each is exactly one ``data: ...\\n\\n`` event; [DONE] becomes the string."""
    events: list[Any] = []
    for c in chunks:
        assert c.startswith(b"data: ") and c.endswith(b"\n\n"), c
        body = c[len(b"data: ") : -2]
        assert b"\n" not in body, c
        events.append("[DONE]" if body == b"[DONE]" else json.loads(body))
    return events


def read_stream(conn: RawConn) -> tuple[dict[str, str], list[bytes]]:
    status, headers = conn.head()
    assert status == 200
    chunks = []
    while (c := conn.next_chunk()) != b"":
        chunks.append(c)
    return headers, chunks


def get_json(mock: MockProcess, method: str, path: str) -> Any:
    with RawConn(mock.port) as conn:
        conn.request(method, path)
        status, _, body = conn.json_response()
        assert status == 200, body
        return body


def events_where(mock: MockProcess, **match: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = get_json(mock, "GET", "/_mock/events")["events"]
    return [e for e in events if all(e.get(k) == v for k, v in match.items())]


def chat_body(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-echo", "messages": [{"role": "user", "content": text}], **extra}


def unique_model(tag: str) -> str:
    """A model name per test, so events from the shared mock can be told apart."""
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------------------
# CLI / lifecycle
# ------------------------------------------------------------------------------------------------


def test_cli_announces_real_port_and_ready_file(mock: MockProcess) -> None:
    assert mock.port > 0
    assert mock.stdout_path.read_text().splitlines()[0] == f"openai-mock listening on {mock.url}"
    assert mock.ready_file.read_text() == mock.url + "\n"
    assert get_json(mock, "GET", "/_mock/stats")["loop"].split(".")[0] == mock.loop


def test_sigint_exits_cleanly_and_removes_ready_file(tmp_path: Path) -> None:
    proc = start_mock(tmp_path)
    assert get_json(proc, "GET", "/health") == {"status": "ok"}
    assert proc.stop(signal.SIGINT) == 0, proc.stderr()
    assert not proc.ready_file.exists()
    assert "Traceback" not in proc.stderr()


# ------------------------------------------------------------------------------------------------
# SDK-level behaviour
# ------------------------------------------------------------------------------------------------


def test_models_and_health(mock: MockProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "mock-echo" in ids and "mock-slow" in ids
    assert all(m.object == "model" and m.owned_by == "fastpath-mock" for m in models.data)
    assert get_json(mock, "GET", "/health") == {"status": "ok"}


def test_chat_non_stream(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="my-model",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
    )
    assert resp.id.startswith("chatcmpl-mock-")
    assert resp.object == "chat.completion"
    assert resp.model == "my-model"
    assert isinstance(resp.created, int)
    [choice] = resp.choices
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant"
    assert choice.message.content == "You said: hello there world"
    assert resp.usage is not None
    # prompt: 2 + 3 words, +3 per message; completion: 5 words
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (11, 5, 16)


def test_chat_truncation_list_content_and_n(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="mock-echo",
        messages=[
            {"role": "user", "content": "ignored earlier turn"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "alpha beta"}, {"type": "text", "text": "gamma"}],
            },
        ],
        max_tokens=4,
        n=3,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for c in resp.choices:
        assert c.message.content == "You said: alpha beta"
        assert c.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12  # 4 words x 3 choices
    assert resp.usage.prompt_tokens == (3 + 3) + (1 + 3) + (3 + 3)

    capped = client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": "a b c d"}], max_completion_tokens=6
    )
    assert capped.choices[0].message.content == "You said: a b c d"
    assert capped.choices[0].finish_reason == "stop"


def test_chat_stream_with_usage_matches_non_stream(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": "mock-echo",
        "messages": [{"role": "user", "content": "one two  three"}],
    }
    full = client.chat.completions.create(**kwargs)
    with client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-mock-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content == "You said: one two  three"
    word_chunks = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(word_chunks) == 5
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="mock-echo", prompt="say this")
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-mock-")
    assert resp.choices[0].text == " echo: say this"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 3)

    with client.completions.create(
        model="mock-echo", prompt="say this", stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " echo: say this"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5

    batch = client.completions.create(model="mock-echo", prompt=["a", "b c"], n=2, max_tokens=2)
    assert [(c.index, c.text, c.finish_reason) for c in batch.choices] == [
        (0, " echo: a", "stop"),
        (1, " echo: a", "stop"),
        (2, " echo: b", "length"),
        (3, " echo: b", "length"),
    ]


TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
]


def test_tool_call_non_stream(client: openai.OpenAI) -> None:
    choices: list[tuple[Any, str]] = [
        ("required", "lookup"),
        ({"type": "function", "function": {"name": "other"}}, "other"),
    ]
    for choice, name in choices:
        resp = client.chat.completions.create(
            model="mock-echo",
            messages=[{"role": "user", "content": "weather in Paris"}],
            tools=TOOLS,
            tool_choice=choice,
        )
        c = resp.choices[0]
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        assert c.message.tool_calls is not None
        [call] = c.message.tool_calls
        assert call.id == "call_mock_0" and call.type == "function"
        assert call.function.name == name
        assert json.loads(call.function.arguments) == {"echo": "weather in Paris"}

    auto = client.chat.completions.create(
        model="mock-echo", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="auto"
    )
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].message.content == "You said: hi"


def test_tool_call_stream(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": "weather in Paris"}],
        tools=TOOLS,
        tool_choice="required",
        stream=True,
    ) as stream:
        chunks = list(stream)
    first = chunks[0].choices[0].delta.tool_calls
    assert first is not None
    assert (first[0].id, first[0].type) == ("call_mock_0", "function")
    assert first[0].function is not None
    assert (first[0].function.name, first[0].function.arguments) == ("lookup", "")
    args = ""
    for c in chunks[1:]:
        for tc in c.choices[0].delta.tool_calls or []:
            assert tc.id is None and tc.index == 0
            assert tc.function is not None
            args += tc.function.arguments or ""
    assert json.loads(args) == {"echo": "weather in Paris"}
    assert len([c for c in chunks if c.choices[0].delta.tool_calls]) > 2
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_object_response_format(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="mock-echo",
        messages=[{"role": "user", "content": 'quote " me'}],
        response_format={"type": "json_object"},
    )
    content = resp.choices[0].message.content
    assert content is not None and json.loads(content) == {"echo": 'quote " me'}


def test_error_statuses_via_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="mock-echo", messages=None)  # type: ignore[call-overload]
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "messages"

    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**chat_body(), extra_body={"mock": {"status": 429}})
    assert "mock error" in limited.value.message

    with pytest.raises(openai.InternalServerError) as server:
        client.chat.completions.create(**chat_body(), stream=True, extra_body={"mock": {"status": 503}})
    assert server.value.status_code == 503


def test_no_usage_knob(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(**chat_body(), extra_body={"mock": {"no_usage": True}})
    assert resp.usage is None
    assert resp.choices[0].message.content == "You said: hello there world"


def test_words_knob_and_first_delay(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        **chat_body(), max_tokens=1000, extra_body={"mock": {"words": 7, "first_delay_ms": 20}}
    )
    assert resp.choices[0].message.content == "w0 w1 w2 w3 w4 w5 w6"
    assert resp.usage is not None and resp.usage.completion_tokens == 7


def test_async_client_concurrency(mock: MockProcess) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=mock.base_url, api_key="sk-test", max_retries=0) as ac:

            async def one(i: int) -> str:
                stream = await ac.chat.completions.create(**chat_body(f"req {i}"), stream=True)
                parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
                return "".join(parts)

            return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(run()) == [f"You said: req {i}" for i in range(20)]


# ------------------------------------------------------------------------------------------------
# Raw-socket behaviour
# ------------------------------------------------------------------------------------------------


def test_chunked_stream_framing_is_exact(mock: MockProcess) -> None:
    body = chat_body("a b", stream=True, stream_options={"include_usage": True})
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", body)
        headers, chunks = read_stream(conn)
        assert headers["content-type"] == "text/event-stream"
        assert headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers
        assert headers["connection"] == "keep-alive"
        events = sse_events(chunks)
        assert events[-1] == "[DONE]"
        data = events[:-1]
        # role, "You ", "said: ", "a ", "b", finish, usage
        assert len(data) == 7
        assert [e["choices"][0]["delta"] for e in data[:5]] == [
            {"role": "assistant", "content": ""},
            {"content": "You "},
            {"content": "said: "},
            {"content": "a "},
            {"content": "b"},
        ]
        assert data[5]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
        assert all("usage" in e and e["usage"] is None for e in data[:6])
        assert data[6]["choices"] == []
        assert data[6]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        assert conn.buf == b""  # nothing after the terminating chunk

        # keep-alive: the same connection serves the next request
        conn.request("POST", "/v1/chat/completions", chat_body("again"))
        status, headers, resp = conn.json_response()
        assert status == 200 and headers["content-type"] == "application/json"
        assert resp["choices"][0]["message"]["content"] == "You said: again"


def test_stream_without_include_usage_and_no_usage_knob(mock: MockProcess) -> None:
    for body in (
        chat_body(stream=True),
        chat_body(stream=True, stream_options={"include_usage": True}, mock={"no_usage": True}),
    ):
        with RawConn(mock.port) as conn:
            conn.request("POST", "/v1/chat/completions", body)
            _, chunks = read_stream(conn)
        data = sse_events(chunks)[:-1]
        assert all("usage" not in e for e in data)
        assert all(e["choices"] for e in data)


def test_chunked_request_body_and_connection_close(mock: MockProcess) -> None:
    payload = json.dumps(chat_body("chunked body")).encode()
    parts = [payload[:10], payload[10:25], payload[25:]]
    framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: y\r\n\r\n"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    with RawConn(mock.port) as conn:
        conn.send(head)
        for i in range(0, len(framed), 7):  # dribble the body in to exercise incremental parsing
            conn.send(framed[i : i + 7])
        status, headers, resp = conn.json_response()
        assert status == 200 and headers["connection"] == "close"
        assert resp["choices"][0]["message"]["content"] == "You said: chunked body"
        assert conn.read_to_eof() == b""  # the server closed the connection as asked


def test_protocol_errors(mock: MockProcess) -> None:
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", b"{not json")
        status, _, body = conn.json_response()
        assert status == 400
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"

        conn.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        status, _, body = conn.json_response()
        assert status == 400 and "model" in body["error"]["message"]

        conn.request("POST", "/v1/completions", {"model": "m"})
        status, _, body = conn.json_response()
        assert status == 400 and body["error"]["param"] == "prompt"

        conn.request("POST", "/v1/chat/completions", chat_body(mock={"words": "many"}))
        status, _, body = conn.json_response()
        assert status == 400 and body["error"]["param"] == "mock.words"

        conn.request("GET", "/v1/nope")
        status, _, body = conn.json_response()
        assert status == 404 and body["error"]["message"] == "Invalid URL (GET /v1/nope)"

    with RawConn(mock.port) as conn:
        conn.send(b"garbage\r\n\r\n")
        status, _, body = conn.json_response()
        assert status == 400
        assert conn.read_to_eof() == b""


def test_drop_after_chunks(mock: MockProcess) -> None:
    model = unique_model("drop")
    body = {**chat_body("a b c d e f", stream=True), "model": model, "mock": {"drop_after_chunks": 3}}
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", body)
        status, _ = conn.head()
        assert status == 200
        chunks = [conn.next_chunk() for _ in range(3)]
        rest = conn.read_to_eof()
    assert rest == b"", "no [DONE] and no chunked terminator after the drop"
    assert [e["choices"][0]["delta"] for e in sse_events(chunks)][1:] == [
        {"content": "You "},
        {"content": "said: "},
    ]
    [end] = _wait_for(lambda: events_where(mock, event="stream_end", model=model), "stream_end")
    assert end["dropped"] is True and end["chunks_written"] == 3
    assert not events_where(mock, event="stream_aborted", model=model)


def test_client_abort_is_recorded(mock: MockProcess) -> None:
    model = unique_model("abort")
    body = {**chat_body(stream=True), "model": model, "mock": {"words": 500, "chunk_delay_ms": 10}}
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", body)
        conn.head()
        first = sse_events([conn.next_chunk(), conn.next_chunk()])
    stream_id = first[0]["id"]
    [aborted] = _wait_for(
        lambda: events_where(mock, event="stream_aborted", stream=stream_id), "stream_aborted"
    )
    assert aborted["model"] == model and aborted["path"] == "/v1/chat/completions"
    assert 2 <= aborted["chunks_written"] < 500
    assert not events_where(mock, event="stream_end", stream=stream_id)
    [start] = events_where(mock, event="stream_start", stream=stream_id)
    assert start["conn"] == aborted["conn"] and start["t"] <= aborted["t"]
    closes = events_where(mock, event="conn_close", conn=aborted["conn"])
    assert len(closes) == 1
    assert get_json(mock, "GET", "/_mock/stats")["aborted_streams"] >= 1
    _wait_for(lambda: stream_id in mock.stderr(), "stream_aborted log line on stderr")
    assert "stream_aborted" in mock.stderr()


def test_slow_model_shortcut_is_abortable(mock: MockProcess) -> None:
    with RawConn(mock.port) as conn:
        body = {**chat_body(stream=True), "model": "mock-slow", "mock": {"words": 200}}
        conn.request("POST", "/v1/chat/completions", body)
        conn.head()
        stream_id = sse_events([conn.next_chunk()])[0]["id"]
        active = get_json(mock, "GET", "/_mock/stats")["active_streams"]
        assert stream_id in [s["stream"] for s in active]  # 200 words at 50 ms each: still running
    _wait_for(lambda: events_where(mock, event="stream_aborted", stream=stream_id), "stream_aborted")


def test_back_pressure_pauses_the_stream(mock: MockProcess) -> None:
    model = unique_model("bp")
    total = 200_000 + 3  # role + words + finish + [DONE]
    with RawConn(mock.port, rcvbuf=4096) as conn:
        conn.request(
            "POST",
            "/v1/chat/completions",
            {**chat_body(stream=True), "model": model, "mock": {"words": 200_000}},
        )

        def paused() -> dict[str, Any] | None:
            active = get_json(mock, "GET", "/_mock/stats")["active_streams"]
            return next((s for s in active if s["model"] == model and s["write_paused"]), None)

        stream = _wait_for(paused, "the stream to block on a full write buffer")
        assert stream["chunks_written"] < total
    [aborted] = _wait_for(lambda: events_where(mock, event="stream_aborted", model=model), "stream_aborted")
    assert aborted["chunks_written"] < total


def test_hang_knob_never_answers(mock: MockProcess) -> None:
    model = unique_model("hang")
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", {**chat_body(), "model": model, "mock": {"hang": True}})
        _wait_for(lambda: events_where(mock, event="request", model=model), "the request event")
        conn.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.sock.recv(1)
    _wait_for(lambda: events_where(mock, event="request_aborted", model=model), "request_aborted")


def test_raw_knob_is_written_verbatim(mock: MockProcess) -> None:
    raw = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated"
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", chat_body(mock={"raw": raw}))
        assert conn.read_to_eof() == raw.encode()


def test_events_endpoint_records_and_clears(mock: MockProcess) -> None:
    model = unique_model("ev")
    with RawConn(mock.port) as conn:
        conn.request("POST", "/v1/chat/completions", {**chat_body(), "model": model}, headers={"X-Test": "1"})
        conn.json_response()
        conn.request("GET", "/_mock/events")
        _, _, body = conn.json_response()
        [req] = [e for e in body["events"] if e["event"] == "request" and e["model"] == model]
        assert req["path"] == "/v1/chat/completions" and req["headers"]["x-test"] == "1"
        assert req["body"]["messages"][0]["content"] == "hello there world"
        opened = [e for e in body["events"] if e["event"] == "conn_open" and e["conn"] == req["conn"]]
        assert len(opened) == 1 and isinstance(opened[0]["t"], float)

        conn.request("DELETE", "/_mock/events")
        conn.json_response()
        conn.request("GET", "/_mock/events")
        _, _, body = conn.json_response()
        assert body == {"events": []}  # /_mock/* requests themselves are not recorded

        conn.request("GET", "/_mock/stats")
        _, _, stats = conn.json_response()
    assert stats["open_connections"] >= 1 and stats["total_connections"] >= stats["open_connections"]
    assert stats["requests"] >= 1


# ------------------------------------------------------------------------------------------------
# In-process API
# ------------------------------------------------------------------------------------------------


def _load_mock_module() -> ModuleType:
    try:
        return importlib.import_module("gateway.dev.openai_mock")
    except ImportError:  # gateway/__init__ needs the built Rust extension; the mock does not
        spec = importlib.util.spec_from_file_location("_openai_mock_by_path", MOCK_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def test_in_process_serve() -> None:
    mod = _load_mock_module()

    async def run() -> tuple[str, dict[str, Any]]:
        async with await mod.serve("127.0.0.1", 0) as server:
            async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as ac:
                resp = await ac.chat.completions.create(**chat_body("in process"))
            stats: dict[str, Any] = server.state.stats()
        return resp.choices[0].message.content or "", stats

    content, stats = asyncio.run(run())
    assert content == "You said: in process"
    assert stats["requests"] == 1 and stats["total_connections"] == 1


# ------------------------------------------------------------------------------------------------
# Process-wide faults (one of several upstreams broken under load)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProcess]:
    proc = start_mock(tmp_path_factory.mktemp("openai_mock_faults"))
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()


@pytest.fixture
def faulty(faulty_proc: MockProcess) -> MockProcess:
    """A mock of its own (faults are process-wide), faults cleared and counters reset."""
    get_json(faulty_proc, "DELETE", "/_mock/faults")
    get_json(faulty_proc, "DELETE", "/_mock/stats")
    return faulty_proc


def set_faults(mock: MockProcess, faults: dict[str, Any]) -> tuple[int, Any]:
    with RawConn(mock.port) as conn:
        conn.request("POST", "/_mock/faults", faults)
        status, _, body = conn.json_response()
    return status, body


def chat_status(conn: RawConn, **extra: Any) -> tuple[int, dict[str, str]]:
    conn.request("POST", "/v1/chat/completions", chat_body(**extra))
    status, headers, _ = conn.json_response()
    return status, headers


DEFAULT_FAULTS = {
    "status": None,
    "status_rate": 1.0,
    "first_delay_ms": 0.0,
    "slow_tail_rate": 0.0,
    "slow_tail_ms": 0.0,
    "hang_rate": 0.0,
    "retry_after": None,
    "seed": None,
}


def test_faults_set_read_clear_and_are_counted(faulty: MockProcess) -> None:
    assert {**get_json(faulty, "GET", "/_mock/faults"), "seed": None} == DEFAULT_FAULTS
    status, body = set_faults(faulty, {"status": 503, "retry_after": "2"})
    assert status == 200 and {**body, "seed": None} == {**DEFAULT_FAULTS, "status": 503, "retry_after": "2"}
    assert get_json(faulty, "GET", "/_mock/faults") == body
    with RawConn(faulty.port) as conn:
        status, headers = chat_status(conn)
        assert status == 503 and headers["retry-after"] == "2"
        status, headers = chat_status(conn, stream=True)  # refused before the stream starts
        assert status == 503
        assert chat_status(conn, mock={"status": 200})[0] == 200  # the request's own knob wins
        assert chat_status(conn, mock={"status": 429})[0] == 429
        conn.request("GET", "/v1/models")  # not a completion: never faulted, not counted as one
        assert conn.json_response()[0] == 200
    stats = get_json(faulty, "GET", "/_mock/stats")
    assert stats["requests"] == 5 and stats["completions"] == 4
    assert stats["completions_by_status"] == {"200": 1, "429": 1, "503": 2}
    assert stats["faulted"] == {"status": 2, "hang": 0, "slow_tail": 0}

    assert {**get_json(faulty, "DELETE", "/_mock/faults"), "seed": None} == DEFAULT_FAULTS
    with RawConn(faulty.port) as conn:
        status, headers = chat_status(conn)
    assert status == 200 and "retry-after" not in headers
    get_json(faulty, "DELETE", "/_mock/stats")
    assert get_json(faulty, "GET", "/_mock/stats")["completions"] == 0


def statuses(mock: MockProcess, n: int) -> list[int]:
    with RawConn(mock.port) as conn:
        return [chat_status(conn)[0] for _ in range(n)]


def test_fault_rate_is_reproducible_with_a_seed(faulty: MockProcess) -> None:
    faults = {"status": 500, "status_rate": 0.3, "seed": 7}
    assert set_faults(faulty, faults)[0] == 200
    first = statuses(faulty, 200)
    assert set_faults(faulty, faults)[0] == 200  # re-seeded: the same sequence again
    assert statuses(faulty, 200) == first
    assert set(first) == {200, 500} and 0.2 < first.count(500) / 200 < 0.4
    stats = get_json(faulty, "GET", "/_mock/stats")
    assert stats["completions"] == 400 and stats["faulted"]["status"] == 2 * first.count(500)


def test_slow_tail_delays_a_fraction(faulty: MockProcess) -> None:
    assert set_faults(faulty, {"slow_tail_rate": 0.5, "slow_tail_ms": 40, "seed": 1})[0] == 200
    took = []
    with RawConn(faulty.port) as conn:
        for _ in range(20):
            t0 = time.monotonic()
            assert chat_status(conn)[0] == 200
            took.append(time.monotonic() - t0)
    slow = get_json(faulty, "GET", "/_mock/stats")["faulted"]["slow_tail"]
    assert 3 <= slow <= 17
    assert sum(t >= 0.04 for t in took) >= slow  # at least that many waited the tail
    # the request's own first_delay_ms replaces the process delay and its tail
    assert set_faults(faulty, {"slow_tail_rate": 1.0, "slow_tail_ms": 60_000})[0] == 200
    with RawConn(faulty.port) as conn:
        assert chat_status(conn, mock={"first_delay_ms": 0})[0] == 200


def test_hang_rate_accepts_and_never_answers(faulty: MockProcess) -> None:
    assert set_faults(faulty, {"hang_rate": 1.0})[0] == 200
    with RawConn(faulty.port) as conn:
        conn.request("POST", "/v1/chat/completions", chat_body())
        _wait_for(lambda: get_json(faulty, "GET", "/_mock/stats")["faulted"]["hang"] == 1, "the hang")
        conn.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.sock.recv(1)
    _wait_for(lambda: get_json(faulty, "GET", "/_mock/stats")["aborted_requests"] == 1, "the abort")


def test_bad_faults_are_refused(faulty: MockProcess) -> None:
    for bad in ({"status_rate": 2}, {"status": 99}, {"slow_tail_ms": -1}, {"nope": 1}, {"retry_after": 5}):
        status, body = set_faults(faulty, bad)
        assert status == 400, (bad, body)
    assert {**get_json(faulty, "GET", "/_mock/faults"), "seed": None} == DEFAULT_FAULTS


def test_fault_cli_flags(tmp_path: Path) -> None:
    proc = start_mock(
        tmp_path,
        "--fault-status",
        "502",
        "--fault-status-rate",
        "1",
        "--slow-tail-rate",
        "0",
        "--slow-tail-ms",
        "5",
        "--seed",
        "3",
    )
    try:
        faults = get_json(proc, "GET", "/_mock/faults")
        assert faults == {**DEFAULT_FAULTS, "status": 502, "slow_tail_ms": 5.0, "seed": 3}
        assert statuses(proc, 2) == [502, 502]
    finally:
        assert proc.stop() == 0, proc.stderr()
    bad = subprocess.run(
        [*_mock_cmd(), "--port", "0", "--fault-status-rate", "1.5"],
        env=_env(),
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 2 and b"--fault-status-rate" in bad.stderr
