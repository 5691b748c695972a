"""The config of server-side tools (`tools:`): the registry of tools the gateway runs itself
(HTTP endpoints / prompt targets and WebAssembly modules), where the agent loop is on (models,
keys), its loop limits, and the error target failing tools are reported to
(`gateway.tools`). Kept apart from `tool_validation:`, which only checks the client's tools."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .config import Config

_DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class HttpToolConfig(
    msgspec.Struct, tag="http", tag_field="kind", kw_only=True, forbid_unknown_fields=True, frozen=True
):
    """An HTTP endpoint called with the model's arguments (a JSON body; GET: the query). Also a
    **prompt target**: `summarize: false` answers the client with the endpoint's reply itself."""

    #: The function name the model sees (OpenAI's rule: 1-64 of [A-Za-z0-9_-]).
    name: str
    description: str = ""
    #: The arguments' JSON Schema (an object schema); the model's arguments are checked against it.
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: dict(_DEFAULT_PARAMETERS))
    url: str
    method: str = "POST"
    #: Extra request headers; secrets come from the environment (`${TOKEN}` interpolation).
    headers: dict[str, str] = {}
    timeout_ms: int = 5000
    #: The most response bytes read; a longer reply is a tool error.
    max_response_bytes: int = 1024 * 1024
    #: true: the result goes back to the model, which answers; false: the result is the answer.
    summarize: bool = True


class WasmToolConfig(
    msgspec.Struct, tag="wasm", tag_field="kind", kw_only=True, forbid_unknown_fields=True, frozen=True
):
    """A WebAssembly module run in wasmtime, one fresh instance per call (README: the ABI)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: dict(_DEFAULT_PARAMETERS))
    #: A `.wasm` binary or `.wat` text file (relative paths: to the working directory).
    module: str
    #: CPU: wasmtime fuel units (about one per instruction) a call may burn.
    fuel: int = 100_000_000
    #: The most linear memory a call may grow to.
    memory_mb: int = 16
    #: Wall time of one call (epoch interruption, 10 ms ticks).
    timeout_ms: int = 1000
    #: Host directories the module may open (WASI preopens, read-only, mounted at the same
    #: path); none by default. There is no network: WASI sockets are never offered.
    allow_dirs: list[str] = []


ToolConfig = HttpToolConfig | WasmToolConfig


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The gateway-run loop's limits."""

    #: Model turns that may call server tools; one more is an error (`tool_iterations_exceeded`).
    max_iterations: int = 10
    #: The whole loop (model turns and tools); past it: `tool_time_budget`.
    time_budget_ms: int = 60_000
    #: Also list the tool runs in the reply body (`fastpath_tools`), not only in the header.
    body_metadata: bool = False


class ErrorTargetConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where a failing tool is reported (a JSON POST, off the request path); no url: nowhere."""

    url: str | None = None
    headers: dict[str, str] = {}
    timeout_ms: int = 2000


class ToolsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    registry: list[ToolConfig] = []
    #: Public models whose chat requests run the agent loop with the registry's tools offered.
    models: list[str] = []
    #: Key ids (`auth.keys[].id`) whose chat requests run it, whatever the model.
    keys: list[str] = []
    agent: AgentConfig = AgentConfig()
    error_target: ErrorTargetConfig = ErrorTargetConfig()
    #: Threads that run WebAssembly calls (off the event loop); more calls wait for one.
    wasm_threads: int = 4


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_tools(cfg: Config, models: set[str]) -> None:
    """Every tool and the loop settings, with the path of what is wrong."""
    from . import _fastpath
    from .config import ConfigError

    t = cfg.tools
    seen: set[str] = set()
    for i, tool in enumerate(t.registry):
        where = f"$.tools.registry[{i}]"
        if not _NAME.fullmatch(tool.name):
            raise ConfigError(f"{where}.name: use 1-64 of [A-Za-z0-9_-] (OpenAI's function name rule)")
        if tool.name in seen:
            raise ConfigError(f"{where}.name: duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        if tool.parameters.get("type") != "object":
            raise ConfigError(f"{where}.parameters: must be a JSON Schema with type: object")
        spec = [{"type": "function", "function": {"name": tool.name, "parameters": tool.parameters}}]
        try:
            _fastpath.ToolSet(msgspec.json.encode(spec))
        except Exception as exc:
            raise ConfigError(f"{where}.parameters: invalid JSON Schema: {exc}") from None
        if isinstance(tool, HttpToolConfig):
            _validate_http(where, tool)
        else:
            _validate_wasm(where, tool)
    for m in t.models:
        if m not in models:
            raise ConfigError(f"$.tools.models: unknown model {m!r}")
    key_ids = {k.id for k in cfg.auth.keys}
    for k in t.keys:
        if key_ids and k not in key_ids:
            raise ConfigError(f"$.tools.keys: unknown key id {k!r}")
    if (t.models or t.keys) and not t.registry:
        raise ConfigError(
            "$.tools.registry: server tools are on for some models or keys but no tool is registered"
        )
    if not 1 <= t.agent.max_iterations <= 100:
        raise ConfigError(f"$.tools.agent.max_iterations: must be in [1, 100], got {t.agent.max_iterations}")
    if not 1 <= t.agent.time_budget_ms <= 3_600_000:
        raise ConfigError(
            f"$.tools.agent.time_budget_ms: must be in [1, 3600000], got {t.agent.time_budget_ms}"
        )
    e = t.error_target
    if e.url is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", e.url):
        raise ConfigError(f"$.tools.error_target.url: an http:// or https:// URL, got {e.url!r}")
    if not 1 <= e.timeout_ms <= 60_000:
        raise ConfigError(f"$.tools.error_target.timeout_ms: must be in [1, 60000], got {e.timeout_ms}")
    _validate_headers("$.tools.error_target", e.headers)
    if not 1 <= t.wasm_threads <= 64:
        raise ConfigError(f"$.tools.wasm_threads: must be in [1, 64], got {t.wasm_threads}")


def _validate_headers(where: str, headers: dict[str, str]) -> None:
    from .config import ConfigError

    for h, v in headers.items():
        if not re.fullmatch(r"[A-Za-z0-9-]+", h):
            raise ConfigError(f"{where}.headers: invalid header name {h!r}")
        if "\r" in v or "\n" in v:
            raise ConfigError(f"{where}.headers.{h}: a header value cannot hold a line break")


def _validate_http(where: str, tool: HttpToolConfig) -> None:
    from .config import ConfigError

    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", tool.url):
        raise ConfigError(f"{where}.url: an http:// or https:// URL, got {tool.url!r}")
    if tool.method not in ("GET", "POST", "PUT"):
        raise ConfigError(f"{where}.method: GET, POST or PUT, got {tool.method!r}")
    if not 1 <= tool.timeout_ms <= 600_000:
        raise ConfigError(f"{where}.timeout_ms: must be in [1, 600000], got {tool.timeout_ms}")
    if not 1 <= tool.max_response_bytes <= 64 * 1024 * 1024:
        raise ConfigError(
            f"{where}.max_response_bytes: must be in [1, 67108864], got {tool.max_response_bytes}"
        )
    _validate_headers(where, tool.headers)


def _validate_wasm(where: str, tool: WasmToolConfig) -> None:
    from .config import ConfigError

    path = Path(tool.module)
    if path.suffix not in (".wasm", ".wat"):
        raise ConfigError(f"{where}.module: a .wasm or .wat file, got {tool.module!r}")
    if not path.is_file():
        raise ConfigError(f"{where}.module: no such file {tool.module!r}")
    from .tools.wasm import load_module  # wasmtime only when a wasm tool is configured

    try:
        module = load_module(None, tool.module)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = lines[-1] if lines else type(exc).__name__  # wasmtime's last line says what is wrong
        raise ConfigError(f"{where}.module: {tool.module!r} cannot be compiled: {why}") from None
    missing = {"memory", "alloc", "call"} - {e.name for e in module.exports}
    if missing:
        raise ConfigError(
            f"{where}.module: {tool.module!r} does not export {', '.join(sorted(missing))} "
            "(the tool ABI: README, Server-side tools)"
        )
    if not 1_000 <= tool.fuel <= 10**12:
        raise ConfigError(f"{where}.fuel: must be in [1000, 10^12], got {tool.fuel}")
    if not 1 <= tool.memory_mb <= 4096:
        raise ConfigError(f"{where}.memory_mb: must be in [1, 4096], got {tool.memory_mb}")
    if not 10 <= tool.timeout_ms <= 600_000:
        raise ConfigError(f"{where}.timeout_ms: must be in [10, 600000], got {tool.timeout_ms}")
    for j, d in enumerate(tool.allow_dirs):
        if not os.path.isabs(d) or not os.path.isdir(d):
            raise ConfigError(
                f"{where}.allow_dirs[{j}]: an absolute path of an existing directory, got {d!r}"
            )
