"""Server-side tools (`tools:`, `config_tools.py`): the tools the gateway runs itself, and the
agent loop that runs them between model turns (`agent.py`).

    base.py    ToolFailure: a tool that did not produce a result, with its error code
    http.py    HTTP tools and prompt targets (the pooled HTTP/1.1 client)
    wasm.py    WebAssembly tools in wasmtime (fuel, memory, epoch deadline; no network)
    report.py  error targets: failing tools POSTed to a configured endpoint, off the request path
    agent.py   the request stage that offers the tools and the dispatcher that loops
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

import msgspec

from .. import _fastpath
from .base import ToolFailure

if TYPE_CHECKING:
    from ..config_tools import ToolsConfig
    from .report import ErrorReporter
    from .wasm import WasmSandbox

__all__ = ["Registry", "ToolFailure", "ToolRun"]


class Tool(Protocol):
    timeout_s: float

    async def run(self, loop: asyncio.AbstractEventLoop, args: bytes) -> bytes:
        """The JSON (or text) result; raises `ToolFailure`."""
        ...


class ToolRun(msgspec.Struct, frozen=True):
    """One server-side tool call the gateway made (the reply's metadata)."""

    name: str
    ms: float
    #: None: it produced a result; else its error code
    error: str | None = None


class Registry:
    """Per worker: every registered tool, their OpenAI `tools` entries (offered to the model) and
    their argument schemas (compiled once, checked before a call)."""

    __slots__ = ("_loop", "_sandbox", "reporter", "schemas", "specs", "summarize", "tools")

    def __init__(self, cfg: ToolsConfig, loop: asyncio.AbstractEventLoop) -> None:
        from ..config_tools import HttpToolConfig
        from .http import HttpTool

        self._loop = loop
        self.tools: dict[str, Tool] = {}
        #: tools whose result goes back to the model (false: prompt targets that answer)
        self.summarize: dict[str, bool] = {}
        self._sandbox: WasmSandbox | None = None
        specs: list[dict[str, object]] = []
        for t in cfg.registry:
            if isinstance(t, HttpToolConfig):
                self.tools[t.name] = HttpTool(t, loop)
                self.summarize[t.name] = t.summarize
            else:
                from .wasm import WasmSandbox, WasmTool

                if self._sandbox is None:
                    self._sandbox = WasmSandbox(cfg.wasm_threads)
                self.tools[t.name] = WasmTool(t, self._sandbox)
                self.summarize[t.name] = True
            fn: dict[str, object] = {"name": t.name, "parameters": t.parameters}
            if t.description:
                fn["description"] = t.description
            specs.append({"type": "function", "function": fn})
        #: the `tools` entries the model is offered
        self.specs: list[dict[str, object]] = specs
        self.schemas = _fastpath.ToolSet(msgspec.json.encode(specs))
        self.reporter: ErrorReporter | None = None
        if cfg.error_target.url is not None:
            from .report import ErrorReporter

            self.reporter = ErrorReporter(cfg.error_target, loop)

    async def call(self, name: str, arguments: str, deadline: float) -> tuple[bytes | ToolFailure, ToolRun]:
        """Run one call by the model: arguments checked against the tool's schema, then the
        tool, within its own timeout and the loop's deadline, whichever is first."""
        t0 = time.perf_counter()
        try:
            out: bytes | ToolFailure = await self._call(name, arguments, deadline)
        except ToolFailure as exc:
            out = exc
        ms = round((time.perf_counter() - t0) * 1000, 3)
        return out, ToolRun(name, ms, out.code if isinstance(out, ToolFailure) else None)

    async def _call(self, name: str, arguments: str, deadline: float) -> bytes:
        tool = self.tools[name]
        why = self.schemas.check(name, arguments)
        if why is not None:
            raise ToolFailure("tool_arguments_invalid", why)
        left = deadline - self._loop.time()
        if left <= 0:
            raise ToolFailure("tool_time_budget", "the agent loop's time budget ran out before the call")
        # the tool's own limit fires first (an epoch deadline, an HTTP timeout); this one is the
        # backstop, and the loop's budget
        limit = min(left, tool.timeout_s + 1.0)
        try:
            async with asyncio.timeout(limit):
                return await tool.run(self._loop, arguments.encode())
        except TimeoutError:
            raise ToolFailure("tool_timeout", f"the tool did not finish within {limit:g} s") from None

    async def close(self) -> None:
        for tool in self.tools.values():
            close = getattr(tool, "close", None)
            if close is not None:
                close()
        if self._sandbox is not None:
            self._sandbox.close()
        if self.reporter is not None:
            await self.reporter.close()
