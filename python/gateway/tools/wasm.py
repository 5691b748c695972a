"""WebAssembly tools in wasmtime: one fresh instance per call, CPU, memory and wall-time limits,
no filesystem unless granted, never a network.

The ABI (README "Server-side tools"): the module exports `memory`, `alloc(len: i32) -> i32` (room
for the arguments) and `call(ptr: i32, len: i32) -> i64`; the host writes the JSON arguments at
`alloc`'s pointer, `call` returns `(result_ptr << 32) | result_len` of a JSON result in `memory`.
A result object with a top-level `"error"` is the tool's own failure. The only imports offered
are WASI preview 1 (`wasi_snapshot_preview1`): no preopened directory unless `allow_dirs` grants
one (then read-only), no sockets, no environment, no arguments; any other import fails to link.

Limits: fuel (about one unit per instruction) bounds CPU, the store's limits bound linear memory
(a failed `memory.grow` returns -1; a module that then traps is reported as at its memory
limit), and epoch interruption bounds wall time: a ticker thread increments the engine's epoch
every `TICK_S`, a call may run `timeout_ms / TICK_S` ticks. Calls run on a thread pool, never
on the event loop: wasmtime's calls release the GIL (ctypes), so the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import wasmtime

from .base import ToolFailure

if TYPE_CHECKING:
    from ..config_tools import WasmToolConfig

#: the epoch tick (wall-time granularity of the timeout)
TICK_S = 0.01
_PAGE = 65536
_MIB = 1024 * 1024
#: a trap with less than this memory left under the limit is reported as the memory limit
_NEAR = _MIB


class WasmSandbox:
    """Per worker: the engine (fuel and epoch interruption on), its epoch ticker and the threads
    calls run on."""

    __slots__ = ("_stop", "_ticker", "engine", "pool")

    def __init__(self, threads: int) -> None:
        c = wasmtime.Config()
        c.consume_fuel = True
        c.epoch_interruption = True
        self.engine = wasmtime.Engine(c)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="wasm-tool")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        # the epoch follows the clock, not the wake-ups: a starved thread catches up
        t0 = time.monotonic()
        done = 0
        while not self._stop.wait(TICK_S):
            due = int((time.monotonic() - t0) / TICK_S)
            while done < due:
                self.engine.increment_epoch()
                done += 1

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def load_module(engine: wasmtime.Engine | None, path: str) -> wasmtime.Module:
    """A `.wasm` binary or `.wat` text, compiled once. Engine None: to check a config, in a
    process that may fork afterwards (the master): compiled on this thread, since wasmtime's
    parallel compilation starts a thread pool that a forked worker inherits half of (its
    compilations then wait forever)."""
    if engine is None:
        serial = wasmtime.Config()
        serial.parallel_compilation = False
        engine = wasmtime.Engine(serial)
    data = Path(path).read_bytes()
    if path.endswith(".wat"):
        return wasmtime.Module(engine, bytes(wasmtime.wat2wasm(data.decode())))
    return wasmtime.Module(engine, data)


class WasmTool:
    """One registered WebAssembly tool: the compiled module and its limits."""

    __slots__ = ("_dirs", "_fuel", "_linker", "_memory", "_module", "_sandbox", "_ticks", "timeout_s")

    def __init__(self, cfg: WasmToolConfig, sandbox: WasmSandbox) -> None:
        self._sandbox = sandbox
        self._module = load_module(sandbox.engine, cfg.module)
        self._linker = wasmtime.Linker(sandbox.engine)
        self._linker.define_wasi()
        self._fuel = cfg.fuel
        self._memory = cfg.memory_mb * 1024 * 1024
        # the deadline is counted in ticks from the call's start: +1 for the tick in progress
        self._ticks = max(1, round(cfg.timeout_ms / 1000 / TICK_S)) + 1
        self.timeout_s = cfg.timeout_ms / 1000
        self._dirs = tuple(cfg.allow_dirs)

    async def run(self, loop: asyncio.AbstractEventLoop, args: bytes) -> bytes:
        """The call's JSON result; raises `ToolFailure`. On a thread: the loop keeps serving."""
        out = await loop.run_in_executor(self._sandbox.pool, self.call, args)
        if b'"error"' in out:  # the module's own failure: {"error": ...}
            try:
                doc = msgspec.json.decode(out)
            except msgspec.DecodeError:
                raise ToolFailure("wasm_abi", "the module's result is not JSON") from None
            if isinstance(doc, dict) and "error" in doc:
                raise ToolFailure("tool_error", f"the tool failed: {doc['error']}")
        return out

    def call(self, args: bytes) -> bytes:
        store = wasmtime.Store(self._sandbox.engine)
        store.set_fuel(self._fuel)
        store.set_epoch_deadline(self._ticks)
        store.set_limits(memory_size=self._memory)
        wasi = wasmtime.WasiConfig()
        for d in self._dirs:
            wasi.preopen_dir(d, d, fs_mutable=False)
        store.set_wasi(wasi)
        try:
            inst = self._linker.instantiate(store, self._module)
        except wasmtime.Trap as exc:
            raise self._trap(store, None, exc) from None
        except wasmtime.WasmtimeError as exc:
            raise _link_failure(exc) from None
        exports = inst.exports(store)
        memory, alloc, call = exports.get("memory"), exports.get("alloc"), exports.get("call")
        if not (
            isinstance(memory, wasmtime.Memory)
            and isinstance(alloc, wasmtime.Func)
            and isinstance(call, wasmtime.Func)
        ):
            raise ToolFailure("wasm_abi", "the module does not export memory, alloc and call")
        try:
            ptr = alloc(store, len(args))
            if not isinstance(ptr, int) or ptr < 0 or ptr + len(args) > memory.data_len(store):
                raise ToolFailure("wasm_abi", "alloc returned a pointer outside the module's memory")
            memory.write(store, args, ptr)
            packed = call(store, ptr, len(args))
        except wasmtime.Trap as exc:
            raise self._trap(store, memory, exc) from None
        except wasmtime.WasmtimeError as exc:  # a wrong signature of alloc / call
            raise ToolFailure("wasm_abi", f"the module broke the tool ABI: {exc}") from None
        if not isinstance(packed, int):
            raise ToolFailure("wasm_abi", "call must return an i64: (result_ptr << 32) | result_len")
        rptr, rlen = (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF
        if rptr + rlen > memory.data_len(store):
            raise ToolFailure("wasm_abi", "call returned a result outside the module's memory")
        return bytes(memory.read(store, rptr, rptr + rlen))

    def _trap(self, store: wasmtime.Store, memory: wasmtime.Memory | None, exc: wasmtime.Trap) -> ToolFailure:
        code = exc.trap_code
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return ToolFailure("wasm_fuel_exhausted", f"the tool ran out of fuel ({self._fuel} units of CPU)")
        if code == wasmtime.TrapCode.INTERRUPT:
            return ToolFailure("wasm_timeout", f"the tool ran past its time limit ({self.timeout_s:g} s)")
        size = 0
        if memory is not None:
            with contextlib.suppress(Exception):
                size = memory.size(store) * _PAGE
        if size + _NEAR > self._memory:  # a `memory.grow` past the limit failed, then the trap
            mib = self._memory / _MIB
            return ToolFailure(
                "wasm_memory_limit",
                f"the tool trapped at its memory limit ({size / _MIB:.1f} of {mib:g} MiB in use): "
                + _cause(exc),
            )
        return ToolFailure("wasm_trap", f"the tool trapped: {_cause(exc)}")


def _cause(exc: Exception) -> str:
    """wasmtime's last line says what happened (the first is "error while executing ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


_first = _cause


def _link_failure(exc: Exception) -> ToolFailure:
    text = str(exc)
    if "unknown import" in text or "has not been defined" in text:
        # e.g. a socket API: the sandbox offers WASI preview 1 without sockets, nothing else
        return ToolFailure(
            "wasm_capability_denied", f"the sandbox does not provide what the module imports: {_first(exc)}"
        )
    if "memory" in text and ("limit" in text or "exceed" in text):
        return ToolFailure("wasm_memory_limit", f"the module's memory does not fit its limit: {_first(exc)}")
    return ToolFailure("wasm_instantiate", f"the module could not be instantiated: {_first(exc)}")
