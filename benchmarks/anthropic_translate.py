"""What translating a stream for an Anthropic Messages client costs, per streamed chunk, in
process: the OpenAI frames the relay sends (one chunk per send, as one upstream read of one
token brings) through the dialect's translator, for a text stream and a tool call's arguments,
in the Python reference (`anthropic_stream.ChatToMessages`) and the Rust one the gateway uses
(`_fastpath.MessagesStream`). Prints µs per chunk (best of --repeat) and the load average.

    .venv/bin/python benchmarks/anthropic_translate.py [--chunks 200] [--streams 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from gateway import _fastpath
from gateway.anthropic_stream import ChatToMessages

HEAD = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1700000000}


def frames(chunks: int, tool: bool) -> list[bytes]:
    """The relay's sends for one stream: role chunk, `chunks` deltas, finish, usage, [DONE]."""

    def frame(obj: dict[str, Any]) -> bytes:
        return b"data: %s\n\n" % json.dumps({**HEAD, "model": "mock-echo", **obj}).encode()

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    out = [frame(choice({"role": "assistant", "content": ""}))]
    if tool:
        fn = {"name": "lookup", "arguments": ""}
        out.append(
            frame(choice({"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": fn}]}))
        )
    for i in range(chunks):
        if tool:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": f'"w{i}", '}}]}
        else:
            delta = {"content": f" word{i}"}
        out.append(frame(choice(delta)))
    out.append(frame(choice({}, "tool_calls" if tool else "stop")))
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": chunks + 12}
    out.append(frame({"choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


Factory = Callable[[], Any]


def run(factory: Factory, sends: list[bytes], streams: int, repeat: int) -> float:
    """Best µs per chunk over `repeat` rounds of `streams` streams."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(streams):
            tr = factory()
            for data in sends:
                tr.feed(data)
        dt = time.perf_counter_ns() - t0
        best = min(best, dt / (streams * len(sends)) / 1000)
    return best


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    return ap.parse_args()


def table(impls: dict[str, Factory], args: argparse.Namespace, column: str) -> None:
    """The rows, text and tool-call streams through each implementation, between the load
    averages (shared with responses_translate.py)."""
    print(f"# loadavg before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| stream | {column} | µs per chunk |")
    print("|---|---|---|")
    for kind, tool in (("text", False), ("tool call", True)):
        sends = frames(args.chunks, tool)
        for name, factory in impls.items():
            us = run(factory, sends, args.streams, args.repeat)
            print(f"| {kind} | {name} | {us:.3f} |")
    print(f"# loadavg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    args = parse_args()
    impls: dict[str, Factory] = {"python": lambda: ChatToMessages("msg_1", "echo", 12, None)}
    if hasattr(_fastpath, "MessagesStream"):
        impls["rust"] = lambda: _fastpath.MessagesStream("msg_1", "echo", 12, [])
    print(f"# anthropic stream translation, {platform.python_implementation()} {platform.python_version()}")
    build = _fastpath.BUILD_PROFILE
    print(f"# {args.chunks} chunks/stream, {args.streams} streams, best of {args.repeat}; build {build}")
    table(impls, args, "implementation")


if __name__ == "__main__":
    main()
