"""The gateway-run agent loop (`tools:`, gateway/tools/agent.py) end to end: the official `openai`
SDK -> a real gateway -> the mock upstream, whose `mock.script` plays the model's turns (tool
calls, then a reply that quotes the last tool result); HTTP tools, a prompt target and the error
target are a real HTTP API this test starts; WebAssembly tools are the .wat modules in data/."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway, run_mock

DATA = Path(__file__).parent / "data"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
MESSAGES: list[Any] = [{"role": "user", "content": "weather in Paris please"}]
#: `tools.keys`: this key's requests run the loop whatever the model
AGENT_KEY = "sk-test-agent-key-0123456789"
PLAIN_KEY = "sk-test-plain-key-0123456789"


class ToolApi:
    """The third-party services: a weather API (a prompt target and a tool), a failing endpoint
    and the error target, on a real socket; what each was sent is kept."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.reports: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"null")
                if self.path == "/errors":
                    api.reports.append(body)
                    self._send(204, b"")
                    return
                api.calls.append((self.path, body))
                if self.path == "/weather":
                    self._send(
                        200, json.dumps({"city": body["city"], "temp_c": 21}, separators=(",", ":")).encode()
                    )
                else:
                    self._send(500, b'{"error":"the service is down"}')

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _config(upstream: int, api: int) -> str:
    url = f"http://127.0.0.1:{api}"
    p = json.dumps(WEATHER)
    wasm = {
        "echo": "module: {d}/echo.wat",
        "spin": "module: {d}/spin.wat, fuel: 1000000000000, timeout_ms: 1500",
        "burn": "module: {d}/spin.wat, fuel: 1000000",
        "bomb": "module: {d}/bomb.wat, memory_mb: 8",
        "read_file": "module: {d}/readfile.wat",
        "connect": "module: {d}/connect.wat",
    }
    lines = [
        "  - name: agent",
        "    provider: mock",
        "    upstream_model: mock-echo",
        "auth:",
        "  enabled: true",
        "  keys:",
        f"    - {{id: agent-key, key: {AGENT_KEY}}}",
        f"    - {{id: plain-key, key: {PLAIN_KEY}}}",
        "tools:",
        "  models: [agent]",
        "  keys: [agent-key]",
        "  agent: {max_iterations: 3, time_budget_ms: 3000, body_metadata: true}",
        f"  error_target: {{url: {url}/errors}}",
        "  registry:",
        f"    - {{kind: http, name: get_weather, url: {url}/weather, summarize: false, parameters: {p}}}",
        f"    - {{kind: http, name: lookup_weather, url: {url}/weather, parameters: {p}}}",
        f"    - {{kind: http, name: broken, url: {url}/down}}",
        *(f"    - {{kind: wasm, name: {n}, {spec.format(d=DATA)}}}" for n, spec in wasm.items()),
    ]
    return gateway_config(upstream) + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def api() -> Iterator[ToolApi]:
    a = ToolApi()
    yield a
    a.server.shutdown()
    a.server.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with run_mock() as m:
        yield m


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream: MockUpstream, api: ToolApi) -> Iterator[Gateway]:
    cfg = _config(upstream.port, api.port)
    with run_gateway(tmp_path_factory.mktemp("gw-agent"), None, config_text=cfg) as g:
        yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    # default retries: a loop error must not be retried (x-should-retry: false)
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=PLAIN_KEY, timeout=30)


def _ask(client: openai.OpenAI, script: list[dict[str, str]], model: str = "agent") -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, extra_body={"mock": {"script": script}}
    )


def _completions(upstream: MockUpstream) -> int:
    with urllib.request.urlopen(f"{upstream.url}/_mock/stats", timeout=5) as r:
        return int(json.loads(r.read())["completions"])


def test_prompt_target_answers_end_to_end(client: openai.OpenAI, api: ToolApi) -> None:
    """The model picks the target and extracts the city; the gateway calls the real API and its
    reply is the answer (`summarize: false`)."""
    raw = _ask(client, [{"tool": "get_weather", "content": '{"city": "Paris"}'}])
    reply = raw.parse()
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris", "temp_c": 21}
    assert reply.choices[0].finish_reason == "stop"
    assert ("/weather", {"city": "Paris"}) in api.calls
    (run,) = raw.headers["x-fastpath-tools"].split(", ")
    assert run.startswith("get_weather;dur=") and run.endswith(";status=ok")
    assert "x-function-error-code" not in raw.headers
    body = json.loads(raw.text)
    assert [r["name"] for r in body["fastpath_tools"]] == ["get_weather"]


def test_summarized_tool_and_summed_usage(client: openai.OpenAI, upstream: MockUpstream) -> None:
    """An HTTP tool's result goes back to the model, which answers; the usage is both turns'."""
    single = client.chat.completions.create(model="echo", messages=MESSAGES).usage
    assert single is not None
    before = _completions(upstream)
    raw = _ask(
        client, [{"tool": "lookup_weather", "content": '{"city": "Oslo"}'}, {"content": "Sunny: {last_tool}"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == 'Sunny: {"city":"Oslo","temp_c":21}'
    assert _completions(upstream) - before == 2
    # turn 2's prompt: turn 1's, the assistant's call (3) and the one-word tool result (1 + 3)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 2 * single.prompt_tokens + 7
    assert reply.usage.completion_tokens == 2 + 2  # the call's two-word arguments, then "Sunny: {...}"


def test_same_call_again_is_a_loop(client: openai.OpenAI, upstream: MockUpstream) -> None:
    before = _completions(upstream)
    with pytest.raises(openai.APIStatusError) as exc:
        _ask(client, [{"tool": "echo", "content": '{"x": 1}'}])
    err = exc.value
    assert err.status_code == 508
    assert err.body["code"] == "tool_loop_detected"  # type: ignore[index]
    assert "echo" in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert err.response.headers["x-fastpath-tools"].count("echo;") == 1
    assert _completions(upstream) - before == 2  # two turns, and the SDK did not retry


def test_iterations_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        _ask(client, [{"tool": "echo", "content": '{"x": {turn}}'}])  # new arguments every turn
    assert exc.value.status_code == 508
    assert exc.value.body["code"] == "tool_iterations_exceeded"  # type: ignore[index]
    assert exc.value.response.headers["x-fastpath-tools"].count("echo;") == 3


def test_time_budget(client: openai.OpenAI) -> None:
    """Each `spin` call runs to its 1.5 s epoch deadline; the second ends past the 3 s budget."""
    with pytest.raises(openai.APIStatusError) as exc:
        _ask(client, [{"tool": "spin", "content": '{"n": {turn}}'}])
    assert exc.value.status_code == 504
    assert exc.value.body["code"] == "tool_time_budget"  # type: ignore[index]
    assert "wasm_timeout" in exc.value.response.headers["x-function-error-code"]


def test_failing_tool_reported_to_error_target(client: openai.OpenAI, api: ToolApi) -> None:
    raw = _ask(client, [{"tool": "broken", "content": "{}"}, {"content": "Sorry: {last_tool}"}])
    assert raw.headers["x-function-error-code"] == "http_status"
    assert "HTTP 500" in raw.parse().choices[0].message.content
    deadline = time.monotonic() + 10
    while not any(r["tool"] == "broken" for r in api.reports):
        assert time.monotonic() < deadline, f"no report reached the error target: {api.reports}"
        time.sleep(0.05)
    report = next(r for r in api.reports if r["tool"] == "broken")
    assert report["code"] == "http_status"
    assert report["model"] == "agent"
    assert report["arguments"] == "{}"
    assert report["request_id"] == raw.headers["x-request-id"]


SANDBOX = [
    ("burn", "wasm_fuel_exhausted", "ran out of fuel"),
    ("spin", "wasm_timeout", "time limit"),
    ("bomb", "wasm_memory_limit", "memory limit"),
    ("read_file", "tool_error", "path_open errno 08"),  # no preopened directory: EBADF
    ("connect", "wasm_capability_denied", "sock_open"),
]


@pytest.mark.parametrize(("tool", "code", "says"), SANDBOX, ids=[s[0] for s in SANDBOX])
def test_sandbox_stops_tool(client: openai.OpenAI, tool: str, code: str, says: str) -> None:
    """Each is stopped with a clear error that the model gets; the request itself succeeds."""
    raw = _ask(client, [{"tool": tool, "content": "{}"}, {"content": "Tool said: {last_tool}"}])
    assert raw.headers["x-function-error-code"] == code
    text = raw.parse().choices[0].message.content
    assert code in text and says in text


def test_gateway_serves_while_a_tool_spins(client: openai.OpenAI, gw: Gateway) -> None:
    """While a WebAssembly call spins to its 1.5 s deadline, plain requests and other tool calls
    complete (the call runs on a thread, off the event loop). Prints the latencies seen."""
    result: dict[str, Any] = {}

    def spin() -> None:
        result["raw"] = _ask(client, [{"tool": "spin", "content": "{}"}, {"content": "{last_tool}"}])

    def plain() -> float:
        t0 = time.perf_counter()
        assert client.chat.completions.create(model="echo", messages=MESSAGES).choices[0].message.content
        return (time.perf_counter() - t0) * 1000

    idle = sorted(plain() for _ in range(5))  # the same requests with nothing spinning
    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.2)  # the spin call is under way
    lat: list[float] = []  # plain requests while it spins
    tool_lat: list[float] = []  # requests whose model calls the wasm echo tool, meanwhile
    while len(lat) + len(tool_lat) < 10 and t.is_alive():
        i = len(lat) + len(tool_lat)
        t0 = time.perf_counter()
        if i % 2:
            r = _ask(client, [{"tool": "echo", "content": f'{{"i": {i}}}'}, {"content": "{last_tool}"}])
            assert json.loads(r.parse().choices[0].message.content) == {"echo": {"i": i}}
            tool_lat.append((time.perf_counter() - t0) * 1000)
        else:
            lat.append(plain())
    t.join(10)
    # each finished while the spin was under way (its 1.5 s deadline had not come)
    assert lat and tool_lat, "the spinning call ended before a plain and a tool request did"
    assert result["raw"].headers["x-function-error-code"] == "wasm_timeout"
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(
        f"\nwhile a wasm tool spun: plain requests {_ms(lat)}, with a wasm echo tool {_ms(tool_lat)}; "
        f"before it, plain {_ms(idle)}; loadavg {load}"
    )


def _ms(lat: list[float]) -> str:
    s = sorted(lat)
    return f"n={len(s)} median {s[len(s) // 2]:.1f} ms max {s[-1]:.1f} ms"


def test_stream_gets_the_answer_after_the_loop(client: openai.OpenAI, upstream: MockUpstream) -> None:
    """A stream: the turns are read whole (the upstream is asked unary), then the answer goes out
    as SSE; the usage chunk is every turn's."""
    script = [{"tool": "echo", "content": '{"s": 1}'}, {"content": "Streamed: {last_tool}"}]
    before = len(upstream.events())
    with client.chat.completions.with_streaming_response.create(
        model="agent",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"script": script}},
    ) as raw:
        assert raw.headers["x-fastpath-tools"].startswith("echo;")
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == 'Streamed: {"echo":{"s": 1}}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 2 + 3  # both turns (words)
    sent = [e for e in upstream.events()[before:] if e["event"] == "request" and e.get("body")]
    assert len(sent) == 2 and all(e["body"].get("stream") is False for e in sent)
    assert all("stream_options" not in e["body"] for e in sent)


def test_stream_loop_error_is_a_json_reply(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(
            model="agent",
            messages=MESSAGES,
            stream=True,
            extra_body={"mock": {"script": [{"tool": "echo", "content": "{}"}]}},
        )
    assert exc.value.status_code == 508
    assert exc.value.body["code"] == "tool_loop_detected"  # type: ignore[index]


def test_other_models_untouched(client: openai.OpenAI, upstream: MockUpstream) -> None:
    """A model without server tools: no tools offered, no loop (the model's call goes out)."""
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, extra_body={"mock": {"tool": "echo", "content": "{}"}}
    )
    assert raw.parse().choices[0].message.tool_calls[0].function.name == "echo"
    assert "x-fastpath-tools" not in raw.headers
    sent = [e for e in upstream.events() if e["event"] == "request" and e.get("body")][-1]["body"]
    assert "tools" not in sent


def test_key_with_server_tools(gw: Gateway) -> None:
    """`tools.keys`: the same model (`echo`, not in `tools.models`) runs the loop for that key."""
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=AGENT_KEY, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="echo",
        messages=MESSAGES,
        extra_body={
            "mock": {"script": [{"tool": "echo", "content": '{"k": 1}'}, {"content": "{last_tool}"}]}
        },
    )
    assert json.loads(raw.parse().choices[0].message.content) == {"echo": {"k": 1}}
    assert raw.headers["x-fastpath-tools"].startswith("echo;")


def test_anthropic_client(gw: Gateway) -> None:
    """A client of another API (Anthropic Messages, a dialect): the loop runs on the chat body the
    dialect made, and the answer comes back as a Messages reply."""
    import anthropic

    c = anthropic.Anthropic(base_url=gw.url, api_key=PLAIN_KEY, max_retries=0, timeout=20)
    script = [{"tool": "echo", "content": '{"a": 1}'}, {"content": "Claude-side: {last_tool}"}]
    raw = c.messages.with_raw_response.create(
        model="agent", max_tokens=50, messages=MESSAGES, extra_body={"mock": {"script": script}}
    )
    msg = raw.parse()
    assert msg.content[0].type == "text" and msg.content[0].text == 'Claude-side: {"echo":{"a": 1}}'
    assert msg.stop_reason == "end_turn"
    assert raw.headers["x-fastpath-tools"].startswith("echo;")
