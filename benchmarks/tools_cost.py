"""What server-side tools cost the gateway, excluding the model (gateway/tools/).

1. One WebAssembly call of a trivial tool (tests/python/data/echo.wat: returns its arguments):
   a fresh store + instance, limits set, arguments in, result out; on the calling thread, and
   through `run` (the hop to the tool thread pool and back to the event loop).
2. One agent iteration's dispatch overhead: the loop (`tools/agent.py`'s `_Loop`) driven by a
   dispatcher whose model turns are canned replies (no network, no model), for a request whose
   model calls the echo tool once and then answers, minus the same request answered at once.
   That difference is the reply parsing, loop detection, the argument schema check, the tool
   call, the next turn's body and the metadata: what an iteration adds besides the model.

Wall and CPU (process) time per operation, medians of `--repeats` rounds, with /proc/loadavg.

    .venv/bin/python benchmarks/tools_cost.py [--n 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from gateway.config import parse
from gateway.context import Endpoint, RequestContext
from gateway.schemas import ChatRequestView
from gateway.tools import Registry
from gateway.tools.agent import AgentDispatch, _Loop, _On
from gateway.tools.wasm import WasmSandbox, WasmTool

ECHO = Path(__file__).resolve().parent.parent / "tests" / "python" / "data" / "echo.wat"
CONFIG = f"""
providers: [{{name: p, base_url: "http://127.0.0.1:9/v1"}}]
models: [{{name: m, provider: p}}]
tools:
  models: [m]
  registry:
    - {{kind: wasm, name: echo, module: {ECHO},
       parameters: {{type: object, properties: {{q: {{type: string}}}}, required: [q]}}}}
"""
_view = msgspec.json.Decoder(ChatRequestView).decode
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def _reply(message: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": USAGE,
        }
    ).encode()


CALL = _reply(
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "echo", "arguments": '{"q": "hello"}'}}
        ],
    }
)
ANSWER = _reply({"role": "assistant", "content": "Hello back."})
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "say hello"}], "tools": []}
).encode()


class CannedDispatch(AgentDispatch):
    """The model's turns from a list: no network, no model."""

    script: list[bytes] = []

    async def turn(self, ctx: RequestContext, end: float) -> tuple[bytes, Any]:
        from gateway.schemas import Usage

        turn = sum(1 for m in json.loads(ctx.upstream_body)["messages"] if m["role"] == "assistant")
        return self.script[turn], Usage(**USAGE)


#: what `upstream_body` reads of a route: one upstream model, the one the body names
ROUTE = SimpleNamespace(name="m", model_json=b'"m"', upstream_model="m")


def _ctx() -> RequestContext:
    ctx = RequestContext("bench", Endpoint.CHAT, BODY, time.perf_counter_ns(), {})
    ctx.upstream_body = BODY
    ctx.view = _view(BODY)
    ctx.route = ROUTE  # type: ignore[assignment]
    return ctx


def _timed(n: int, fn: Any) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def _timed_async(loop: asyncio.AbstractEventLoop, n: int, make: Any) -> tuple[float, float]:
    async def many() -> None:
        for _ in range(n):
            await make()

    w0, c0 = time.perf_counter(), time.process_time()
    loop.run_until_complete(many())
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="operations per round")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    cfg = parse(CONFIG)
    sandbox = WasmSandbox(2)
    tool = WasmTool(cfg.tools.registry[0], sandbox)  # type: ignore[arg-type]
    registry = Registry(cfg.tools, loop)
    dispatch = CannedDispatch(cfg, SimpleNamespace(loop=loop), _On(cfg), registry)  # type: ignore[arg-type]

    def loop_run(script: list[bytes]) -> Any:
        dispatch.script = script
        return _Loop(dispatch, _ctx()).run()

    load0 = Path("/proc/loadavg").read_text().split()[0]
    cells: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("wasm_call", "wasm_run", "one_turn", "two_turns")
    }
    for _ in range(args.repeats):
        cells["wasm_call"].append(_timed(args.n, lambda: tool.call(b'{"q": "hello"}')))
        cells["wasm_run"].append(_timed_async(loop, args.n, lambda: tool.run(loop, b'{"q": "hello"}')))
        cells["one_turn"].append(_timed_async(loop, args.n, lambda: loop_run([ANSWER])))
        cells["two_turns"].append(_timed_async(loop, args.n, lambda: loop_run([CALL, ANSWER])))

    def med(key: str, i: int) -> float:
        return statistics.median(c[i] for c in cells[key])

    load1 = Path("/proc/loadavg").read_text().split()[0]
    print(f"loadavg (1 min) before {load0}, after {load1}; n={args.n} x {args.repeats} rounds (medians)")
    print(f"{'what':<44} {'wall us':>9} {'cpu us':>9}")
    rows = [
        ("wasm echo call (store+instance+limits, thread)", "wasm_call"),
        ("wasm echo via run() (pool hop + loop)", "wasm_run"),
        ("agent: reply without tool calls", "one_turn"),
        ("agent: one tool turn + answer", "two_turns"),
    ]
    for label, key in rows:
        print(f"{label:<44} {med(key, 0):>9.1f} {med(key, 1):>9.1f}")
    print(
        f"{'=> one agent iteration, excluding the model':<44} "
        f"{med('two_turns', 0) - med('one_turn', 0):>9.1f} {med('two_turns', 1) - med('one_turn', 1):>9.1f}"
    )
    print(
        f"{'   of which the dispatch (minus the wasm run)':<44} "
        f"{med('two_turns', 0) - med('one_turn', 0) - med('wasm_run', 0):>9.1f} "
        f"{med('two_turns', 1) - med('one_turn', 1) - med('wasm_run', 1):>9.1f}"
    )
    sandbox.close()
    loop.run_until_complete(registry.close())


if __name__ == "__main__":
    main()
