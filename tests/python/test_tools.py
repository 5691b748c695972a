"""Server-side tools (`gateway.tools`): the WebAssembly sandbox on its own (the .wat modules in
data/, compiled by wasmtime at load), an HTTP tool against a real socket, the registry's
argument check, and the `tools:` config's validation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse
from gateway.config_tools import HttpToolConfig, ToolsConfig, WasmToolConfig
from gateway.tools import Registry, ToolFailure
from gateway.tools.http import HttpTool
from gateway.tools.wasm import WasmSandbox, WasmTool

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[WasmSandbox]:
    sb = WasmSandbox(4)
    yield sb
    sb.close()


def _tool(sandbox: WasmSandbox, module: str, **limits: Any) -> WasmTool:
    return WasmTool(WasmToolConfig(name="t", module=str(DATA / module), **limits), sandbox)


def _fails(tool: WasmTool, args: bytes = b"{}") -> ToolFailure:
    with pytest.raises(ToolFailure) as exc:
        asyncio.run(_run(tool, args))
    return exc.value


async def _run(tool: WasmTool, args: bytes) -> bytes:
    return await tool.run(asyncio.get_running_loop(), args)


def test_echo_follows_the_abi(sandbox: WasmSandbox) -> None:
    out = asyncio.run(_run(_tool(sandbox, "echo.wat"), b'{"a": [1, 2]}'))
    assert json.loads(out) == {"echo": {"a": [1, 2]}}


def test_infinite_loop_runs_out_of_fuel(sandbox: WasmSandbox) -> None:
    err = _fails(_tool(sandbox, "spin.wat", fuel=1_000_000))
    assert err.code == "wasm_fuel_exhausted"
    assert "1000000" in err.message


def test_infinite_loop_stopped_by_epoch_deadline(sandbox: WasmSandbox) -> None:
    """Fuel enough for hours: the wall-time limit (epoch interruption) stops it."""
    t0 = time.monotonic()
    err = _fails(_tool(sandbox, "spin.wat", fuel=10**12, timeout_ms=100))
    assert err.code == "wasm_timeout"
    assert time.monotonic() - t0 < 30  # stopped at all (no hang); not a timing assertion


def test_memory_bomb_hits_the_limit(sandbox: WasmSandbox) -> None:
    err = _fails(_tool(sandbox, "bomb.wat", memory_mb=4))
    assert err.code == "wasm_memory_limit"
    assert "of 4 MiB" in err.message


def test_file_read_needs_a_granted_directory(sandbox: WasmSandbox, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("granted text")
    err = _fails(_tool(sandbox, "readfile.wat"))
    assert err.code == "tool_error"
    assert "path_open errno 08" in err.message  # EBADF: no preopened directory at all
    out = asyncio.run(_run(_tool(sandbox, "readfile.wat", allow_dirs=[str(tmp_path)]), b"{}"))
    assert json.loads(out) == {"content": "granted text"}


def test_network_is_never_linked(sandbox: WasmSandbox) -> None:
    err = _fails(_tool(sandbox, "connect.wat"))
    assert err.code == "wasm_capability_denied"
    assert "sock_open" in err.message


def test_a_module_without_the_abi(sandbox: WasmSandbox) -> None:
    err = _fails(_tool(sandbox, "bare.wat"))
    assert err.code == "wasm_abi"


def test_loop_keeps_running_during_a_spin(sandbox: WasmSandbox) -> None:
    """The call runs on a thread: the event loop meanwhile runs other calls to completion."""

    async def main() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        spin = asyncio.ensure_future(
            _tool(sandbox, "spin.wat", fuel=10**12, timeout_ms=1000).run(loop, b"{}")
        )
        await asyncio.sleep(0.05)
        echo = _tool(sandbox, "echo.wat")
        done = 0
        for i in range(20):
            assert json.loads(await echo.run(loop, b'{"i": %d}' % i)) == {"echo": {"i": i}}
            done += 1
        pending = not spin.done()
        with pytest.raises(ToolFailure):
            await spin
        return done, pending

    done, pending = asyncio.run(main())
    assert done == 20
    assert pending, "the spinning call ended before the other calls: nothing was shown"


class _Api(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        n = int(self.headers["content-length"])
        body = self.rfile.read(n)
        status = 200 if self.path == "/ok" else 503
        out = json.dumps({"got": json.loads(body), "auth": self.headers.get("authorization")}).encode()
        self.send_response(status)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:
        out = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_http_tool(api: int, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> tuple[bytes, bytes, ToolFailure, ToolFailure]:
        loop = asyncio.get_running_loop()
        base = f"http://127.0.0.1:{api}"
        ok = HttpTool(HttpToolConfig(name="t", url=f"{base}/ok", headers={"authorization": "Bearer k"}), loop)
        bad = HttpTool(HttpToolConfig(name="t", url=f"{base}/down"), loop)
        get = HttpTool(HttpToolConfig(name="t", url=f"{base}/find?v=1", method="GET"), loop)
        out = await ok.run(loop, b'{"q": 1}')
        got = await get.run(loop, b'{"city": "S\xc3\xa3o Paulo", "days": [1, 2], "exact": true}')
        with pytest.raises(ToolFailure) as exc:
            await bad.run(loop, b"{}")
        with pytest.raises(ToolFailure) as nested:
            await get.run(loop, b'{"where": {"lat": 1}}')
        for t in (ok, bad, get):
            t.close()
        return out, got, exc.value, nested.value

    out, got, err, nested = asyncio.run(main())
    assert json.loads(out) == {"got": {"q": 1}, "auth": "Bearer k"}
    assert json.loads(got) == {"path": "/find?v=1&city=S%C3%A3o+Paulo&days=1&days=2&exact=true"}
    assert err.code == "http_status" and "HTTP 503" in err.message
    assert nested.code == "tool_arguments_invalid"


def test_http_tool_unreachable() -> None:
    async def main() -> ToolFailure:
        loop = asyncio.get_running_loop()
        tool = HttpTool(HttpToolConfig(name="t", url="http://127.0.0.1:9/x", timeout_ms=2000), loop)
        with pytest.raises(ToolFailure) as exc:
            await tool.run(loop, b"{}")
        return exc.value

    assert asyncio.run(main()).code in ("http_connect", "http_timeout")


def test_registry_checks_arguments_against_the_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cfg = ToolsConfig(
        registry=[WasmToolConfig(name="echo", module=str(DATA / "echo.wat"), parameters=schema)]
    )

    async def main() -> tuple[list[Any], list[Any]]:
        reg = Registry(cfg, asyncio.get_running_loop())
        end = asyncio.get_running_loop().time() + 10
        try:
            return [await reg.call("echo", a, end) for a in ('{"n": 2}', '{"n": "two"}', "{")], reg.specs
        finally:
            await reg.close()

    ((good, run0), (bad, run1), (broken, _)), specs = asyncio.run(main())
    assert specs == [{"type": "function", "function": {"name": "echo", "parameters": schema}}]
    assert json.loads(good) == {"echo": {"n": 2}} and run0.error is None and run0.name == "echo"
    assert isinstance(bad, ToolFailure) and bad.code == "tool_arguments_invalid" and run1.error == bad.code
    assert isinstance(broken, ToolFailure) and broken.code == "tool_arguments_invalid"


BASE = """
providers: [{name: p, base_url: "http://127.0.0.1:9/v1"}]
models: [{name: m, provider: p}]
"""


def _error(tools: str) -> str:
    with pytest.raises(ConfigError) as info:
        text = tools.replace("MOD", ECHO).replace("BROKEN", str(DATA / "broken.wat"))
        parse(BASE + text.replace("BARE", str(DATA / "bare.wat")))
    return str(info.value)


ECHO = str(DATA / "echo.wat")
BAD_CONFIGS = [
    ("tools: {registry: [{kind: wasm, name: 'a b', module: MOD}]}", "$.tools.registry[0].name"),
    (
        "tools: {registry: [{kind: wasm, name: a, module: MOD}, {kind: wasm, name: a, module: MOD}]}",
        "duplicate tool name",
    ),
    ("tools: {registry: [{kind: wasm, name: a, module: /nope.wasm}]}", "no such file"),
    ("tools: {registry: [{kind: wasm, name: a, module: BROKEN}]}", "cannot be compiled"),
    ("tools: {registry: [{kind: wasm, name: a, module: BARE}]}", "does not export alloc, call"),
    ("tools: {registry: [{kind: wasm, name: a, module: MOD, memory_mb: 0}]}", "memory_mb"),
    ("tools: {registry: [{kind: wasm, name: a, module: MOD, allow_dirs: [rel]}]}", "allow_dirs[0]"),
    (
        "tools: {registry: [{kind: wasm, name: a, module: MOD, parameters: {type: string}}]}",
        "type: object",
    ),
    (
        "tools: {registry: [{kind: wasm, name: a, module: MOD, parameters: {type: object, properties: 3}}]}",
        "invalid JSON Schema",
    ),
    ("tools: {registry: [{kind: http, name: a, url: 'ftp://x'}]}", "$.tools.registry[0].url"),
    ("tools: {registry: [{kind: http, name: a, url: 'http://x', method: DELETE}]}", "method"),
    ("tools: {registry: [{kind: shell, name: a}]}", "kind"),
    ("tools: {models: [m]}", "no tool is registered"),
    ("tools: {models: [other], registry: [{kind: http, name: a, url: 'http://x'}]}", "unknown model 'other'"),
    ("tools: {agent: {max_iterations: 0}}", "max_iterations"),
    ("tools: {error_target: {url: 'x'}}", "error_target.url"),
]


@pytest.mark.parametrize(("text", "says"), BAD_CONFIGS)
def test_config_errors(text: str, says: str) -> None:
    assert says in _error(text)


def test_config_good() -> None:
    cfg = parse(
        (
            BASE + "tools: {models: [m], agent: {max_iterations: 4}, registry: "
            "[{kind: wasm, name: a, module: MOD}, "
            "{kind: http, name: b, url: 'http://127.0.0.1:1/x', summarize: false}]}"
        ).replace("MOD", ECHO)
    )
    wasm, http = cfg.tools.registry
    assert isinstance(wasm, WasmToolConfig) and wasm.fuel == 100_000_000 and wasm.allow_dirs == []
    assert isinstance(http, HttpToolConfig) and not http.summarize and http.method == "POST"
    assert cfg.tools.agent.max_iterations == 4 and cfg.tools.agent.time_budget_ms == 60_000
