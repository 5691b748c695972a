"""Per-chunk CPU of the Triton rich path (triton_rich.py: tools, n, logprobs) against the plain
path (triton_call.py: the Rust `TextStream` alone), in process, no server: each case pushes the
same parsed `ModelStreamInferResponse`s (4-character tokens, as the test LLM streams) through the
call's `_push`, the per-response work the relay pays. Cases:

- plain: `TritonCall` (Rust framing);
- rich text: `RichTritonCall` with a tool parser but no call in the text (hold-back checks only);
- rich tool call: the same with a Hermes `<tool_call>` block in the text (held, parsed, two
  tool-call delta frames);
- rich logprobs: `logprobs` on, no tools (one log-prob entry per chunk).

    .venv/bin/python benchmarks/triton_tools_cost.py [--chunks 200] [--repeat 5] [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from types import SimpleNamespace
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from gateway.schemas import ChatRequestView
from gateway.upstreams.triton_call import TritonCall
from gateway.upstreams.triton_request import TritonPlan
from gateway.upstreams.triton_rich import RichTritonCall

TOOL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WORDS = " the river runs past the old mill and boats drift slowly toward the sea"


class _Stream:
    def cancel(self) -> None:
        pass


def responses(text: str, logprobs: bool) -> list[Any]:
    out = []
    for i, at in enumerate(range(0, len(text), 4)):
        piece = text[at : at + 4].encode()
        r = pb.ModelStreamInferResponse()
        ir = r.infer_response
        ir.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        ir.raw_output_contents.append(struct.pack("<I", len(piece)) + piece)
        ir.outputs.add(name="num_output_tokens", datatype="INT32", shape=[1, 1])
        ir.raw_output_contents.append(struct.pack("<i", i + 1))
        if logprobs:
            ir.outputs.add(name="output_log_probs", datatype="FP32", shape=[1, 1, 1])
            ir.raw_output_contents.append(struct.pack("<f", -0.5))
        out.append(r)
    return out


def ctx() -> Any:
    view = ChatRequestView(model="m", messages=[])
    route = SimpleNamespace(name="m", encoding="o200k_base")
    return SimpleNamespace(route=route, request_id="r1", stream=True, view=view, client_wants_usage=False)


def make(case: str) -> Any:
    adapter = SimpleNamespace(loop=None, forget=lambda m: None)
    if case == "plain":
        return TritonCall(ctx(), adapter, _Stream(), [], 10_000, "m")  # type: ignore[arg-type]
    parser = None if case == "rich logprobs" else "hermes"
    plan = TritonPlan([None], [], 10_000, 1, False, case == "rich logprobs", parser)
    return RichTritonCall(ctx(), adapter, [_Stream()], plan, "m")  # type: ignore[arg-type, list-item]


def run(case: str, resps: list[Any], rounds: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        call = make(case)
        if case == "plain":
            for r in resps:
                call._push(r)
        else:
            for r in resps:
                call._push(0, r)
    return (time.perf_counter_ns() - t0) / (rounds * len(resps)) / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    text = (WORDS * (args.chunks * 4 // len(WORDS) + 1))[: args.chunks * 4]
    tool_text = text[: len(text) - len(TOOL) - 1] + " " + TOOL
    cases = {
        "plain": responses(text, False),
        "rich text": responses(text, False),
        "rich tool call": responses(tool_text, False),
        "rich logprobs": responses(text, True),
    }
    print(
        f"loadavg before: {os.getloadavg()[0]:.2f}; {args.chunks} chunks x {args.rounds} streams,"
        f" best of {args.repeat}"
    )
    for case, resps in cases.items():
        best = min(run(case, resps, args.rounds) for _ in range(args.repeat))
        print(f"{case:16s} {best:6.2f} us/chunk")
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
