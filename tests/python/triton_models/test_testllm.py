"""The CPU test LLMs in triton_models/ (tensorrt_llm_bls, testllm_core, ensemble) on a real
tritonserver: the TensorRT-LLM text contract, both end-of-stream shapes and what cancellation
does in each deployment shape.

Requests go over raw `grpc.aio` `ModelStreamInfer` with the generated KServe stubs, because the
tritonclient helpers refuse the `triton_*` request parameters (the empty-final opt-in).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import TritonServer, read_events, wait_event
from tritonclient.grpc import service_pb2, service_pb2_grpc

MODELS = ["tensorrt_llm_bls", "testllm_core", "ensemble"]
DTYPES = {bool: "BOOL", int: "INT32", float: "FP32"}


@dataclass
class Response:
    error: str = ""
    text: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    final: bool | None = None  # the `triton_final_response` parameter (None: absent)


def _add_input(request: service_pb2.ModelInferRequest, name: str, value: Any) -> None:
    tensor = request.inputs.add()
    tensor.name = name
    if isinstance(value, list | tuple | str):
        items = [value] if isinstance(value, str) else list(value)
        tensor.datatype = "BYTES"
        tensor.shape.extend([1, len(items)])
        raw = b"".join(len(b).to_bytes(4, "little") + b for b in (s.encode() for s in items))
    else:
        dtype = "UINT64" if name == "seed" else DTYPES[type(value)]
        np_dtype = {"BOOL": np.bool_, "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}[dtype]
        tensor.datatype = dtype
        tensor.shape.extend([1, 1])
        raw = np.array([[value]], dtype=np_dtype).tobytes()
    request.raw_input_contents.append(raw)


def build_request(
    model: str, request_id: str, prompt: str, max_tokens: int, *, empty_final: bool = False, **inputs: Any
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    _add_input(request, "text_input", prompt)
    _add_input(request, "max_tokens", max_tokens)
    for name, value in inputs.items():
        _add_input(request, name, value)
    if empty_final:
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def _decode(resp: service_pb2.ModelStreamInferResponse) -> Response:
    out = Response(error=resp.error_message)
    infer = resp.infer_response
    if "triton_final_response" in infer.parameters:
        out.final = infer.parameters["triton_final_response"].bool_param
    for tensor, raw in zip(infer.outputs, infer.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            items, i = [], 0
            while i < len(raw):
                n = int.from_bytes(raw[i : i + 4], "little")
                items.append(raw[i + 4 : i + 4 + n].decode())
                i += 4 + n
            out.outputs[tensor.name] = items
        else:
            out.outputs[tensor.name] = np.frombuffer(raw, dtype=np.int32).tolist()
    out.text = out.outputs.get("text_output", [])
    return out


async def _stream(
    address: str,
    request: service_pb2.ModelInferRequest,
    *,
    cancel_after: int | None = None,
    idle_s: float = 0,
) -> list[Response]:
    """Send one request on a ModelStreamInfer RPC and collect its responses until the final flag,
    an error or the RPC's end. `cancel_after`: cancel the call after that many responses.
    `idle_s` > 0: keep the request stream open and stop reading after `idle_s` without a response
    (for shapes that send no end signal)."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield request
        if idle_s > 0:
            await done.wait()

    responses: list[Response] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests())
        try:
            while True:
                try:
                    read = call.read()
                    msg = await (asyncio.wait_for(read, idle_s) if idle_s > 0 else read)
                except TimeoutError:
                    break
                if msg is grpc.aio.EOF:
                    break
                responses.append(_decode(msg))
                if cancel_after is not None and len(responses) >= cancel_after:
                    call.cancel()
                    break
                if responses[-1].final or responses[-1].error:
                    break
        finally:
            done.set()
            call.cancel()
    return responses


def run(address: str, request: service_pb2.ModelInferRequest, **kw: Any) -> list[Response]:
    return asyncio.run(_stream(address, request, **kw))


def rid() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def text_of(responses: list[Response]) -> str:
    return "".join("".join(r.text) for r in responses)


@pytest.mark.parametrize("model", MODELS)
def test_same_prompt_gives_same_text(triton: TritonServer, model: str) -> None:
    a = run(triton.grpc_address, build_request(model, rid(), "tell me a story", 64, empty_final=True))
    b = run(triton.grpc_address, build_request(model, rid(), "tell me a story", 64, empty_final=True))
    assert text_of(a) == text_of(b)
    assert text_of(a).startswith("tell me a story ")  # not streamed: prompt + full text
    words = text_of(a)[len("tell me a story") :].split(" ")[1:]
    assert 12 <= len(words) <= 48  # the natural length


def test_seed_changes_the_text(triton: TritonServer) -> None:
    texts = {
        text_of(run(triton.grpc_address, build_request("testllm_core", rid(), "same", 20, seed=seed)))
        for seed in (1, 2)
    }
    assert len(texts) == 2


@pytest.mark.parametrize("model", MODELS)
def test_stream_deltas_concatenate_to_the_full_text(triton: TritonServer, model: str) -> None:
    prompt = "streaming versus unary"
    full = run(
        triton.grpc_address,
        build_request(model, rid(), prompt, 64, exclude_input_in_output=True, empty_final=True),
    )
    streamed = run(
        triton.grpc_address, build_request(model, rid(), prompt, 64, stream=True, empty_final=True)
    )
    deltas = [r.text[0] for r in streamed if r.text]
    assert len(deltas) >= 12 and all(d.startswith(" ") and d.count(" ") == 1 for d in deltas)
    assert "".join(deltas) == text_of(full)


def test_max_tokens_caps_the_output(triton: TritonServer) -> None:
    out = run(triton.grpc_address, build_request("testllm_core", rid(), "cap me", 5, stream=True))
    assert len(out) == 5 and out[-1].final is True
    assert [r.final for r in out[:-1]] == [False] * 4


def test_stop_word_stops_and_stays_in_the_output(triton: TritonServer) -> None:
    prompt = "stop somewhere"
    words = text_of(run(triton.grpc_address, build_request("testllm_core", rid(), prompt, 64, stream=True)))
    stop = words.split(" ")[4]  # the 4th generated word (words start with a space)
    out = text_of(
        run(
            triton.grpc_address,
            build_request("testllm_core", rid(), prompt, 64, stream=True, stop_words=[stop]),
        )
    )
    assert out.endswith(" " + stop)
    assert words.startswith(out) and len(out.split()) <= 4


def test_bad_words_never_appear(triton: TritonServer) -> None:
    prompt = "avoid words"
    before = text_of(run(triton.grpc_address, build_request("testllm_core", rid(), prompt, 48, stream=True)))
    banned = sorted(set(before.split()))[:5]
    after = text_of(
        run(
            triton.grpc_address,
            build_request("testllm_core", rid(), prompt, 48, stream=True, bad_words=banned),
        )
    )
    assert after and not set(after.split()) & set(banned)


@pytest.mark.parametrize("model", MODELS)
def test_token_counts_only_when_requested(triton: TritonServer, model: str) -> None:
    prompt = "count these five words"
    plain = run(triton.grpc_address, build_request(model, rid(), prompt, 6, stream=True))
    assert all(set(r.outputs) == {"text_output"} for r in plain)
    counted = run(
        triton.grpc_address,
        build_request(
            model, rid(), prompt, 6, stream=True, return_num_input_tokens=True, return_num_output_tokens=True
        ),
    )
    data = [r for r in counted if r.text]
    assert [r.outputs["num_output_tokens"] for r in data] == [[n] for n in range(1, 7)]
    assert all(r.outputs["num_input_tokens"] == [4] for r in data)
    only_out = run(triton.grpc_address, build_request(model, rid(), prompt, 3, return_num_output_tokens=True))
    assert set(only_out[0].outputs) == {"text_output", "num_output_tokens"}
    assert only_out[0].outputs["num_output_tokens"] == [3]


def test_bls_sends_a_separate_empty_final_response(triton: TritonServer) -> None:
    """Shape (b): data responses never carry the final flag; with the opt-in, an empty response
    with `triton_final_response=true` ends the request."""
    out = run(
        triton.grpc_address, build_request("tensorrt_llm_bls", rid(), "b", 3, stream=True, empty_final=True)
    )
    assert [(len(r.text), r.final) for r in out] == [(1, False), (1, False), (1, False), (0, True)]


def test_bls_without_the_opt_in_sends_no_end_signal(triton: TritonServer) -> None:
    """Without `triton_enable_empty_final_response`, the server drops the empty final response:
    the client sees only the data responses (all final=false) and nothing more while its request
    stream stays open. The only end signal is the RPC ending, after the client half-closes."""
    request_id = rid()
    out = run(
        triton.grpc_address, build_request("tensorrt_llm_bls", request_id, "b", 3, stream=True), idle_s=0.5
    )
    assert [(len(r.text), r.final) for r in out] == [(1, False)] * 3
    wait_event(triton.events_path, request_id, "end", tokens=3)
    closed = run(triton.grpc_address, build_request("tensorrt_llm_bls", rid(), "b", 3, stream=True))
    assert [r.final for r in closed] == [False] * 3  # then EOF: the RPC ended


@pytest.mark.parametrize("model", ["testllm_core", "ensemble"])
def test_final_flag_rides_on_the_last_data_response(triton: TritonServer, model: str) -> None:
    """Shape (a), with or without the opt-in (there is no empty response to add)."""
    for empty_final in (False, True):
        out = run(
            triton.grpc_address,
            build_request(model, rid(), "a", 3, stream=True, empty_final=empty_final),
            idle_s=0.5,
        )
        assert [(len(r.text), r.final) for r in out] == [(1, False), (1, False), (1, True)]


def test_one_instance_serves_concurrent_streams(triton: TritonServer) -> None:
    """`async def execute`: one model instance interleaves streams instead of queueing them."""

    async def main() -> tuple[float, list[list[Response]]]:
        requests = [
            build_request("testllm_core", rid(), f"[[testllm delay_ms=50]] stream {i}", 6, stream=True)
            for i in range(4)
        ]
        start = time.monotonic()
        outs = await asyncio.gather(*(_stream(triton.grpc_address, r) for r in requests))
        return time.monotonic() - start, outs

    elapsed, outs = asyncio.run(main())
    assert [len(o) for o in outs] == [6] * 4
    assert elapsed < 0.9  # one after the other: 4 x 6 x 50 ms = 1.2 s


SLOW = "[[testllm delay_ms=30]] write slowly"


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "testllm_core"])
def test_cancel_stops_a_direct_model(triton: TritonServer, model: str) -> None:
    request_id = rid()
    out = run(triton.grpc_address, build_request(model, request_id, SLOW, 40, stream=True), cancel_after=2)
    assert len(out) == 2
    cancel = wait_event(triton.events_path, request_id, "cancel", model=model)
    assert 2 <= cancel["tokens"] <= 4
    assert not read_events(triton.events_path, request_id, event="end")


def test_cancel_does_not_stop_an_ensemble_step(triton: TritonServer) -> None:
    """Pinned Triton 2.51 behaviour: a `platform: ensemble` checks cancellation only between
    steps, so cancelling the gRPC call does not reach the running (decoupled) testllm_core step:
    it logs no cancel and generates to its end (on a GPU: the engine keeps the slot busy)."""
    request_id = rid()
    planned = len(
        text_of(run(triton.grpc_address, build_request("testllm_core", rid(), SLOW, 8))).split()
    ) - len(SLOW.split())
    out = run(
        triton.grpc_address, build_request("ensemble", request_id, SLOW, 8, stream=True), cancel_after=2
    )
    assert len(out) == 2
    end = wait_event(triton.events_path, request_id, "end", model="testllm_core")
    assert end["tokens"] == planned == 8
    assert not read_events(triton.events_path, request_id, event="cancel")


def test_ignore_cancel_runs_to_the_end(triton: TritonServer) -> None:
    """`ignore_cancel=1` mimics the stock TensorRT-LLM BLS, which never checks is_cancelled()."""
    request_id = rid()
    prompt = "[[testllm delay_ms=20 ignore_cancel=1]] keep going"
    out = run(
        triton.grpc_address,
        build_request("tensorrt_llm_bls", request_id, prompt, 8, stream=True),
        cancel_after=2,
    )
    assert len(out) == 2
    end = wait_event(triton.events_path, request_id, "end", model="tensorrt_llm_bls")
    assert end["tokens"] == 8
    assert not read_events(triton.events_path, request_id, event="cancel")


@pytest.mark.parametrize("model", MODELS)
def test_fail_after_reaches_the_client(triton: TritonServer, model: str) -> None:
    request_id = rid()
    prompt = "[[testllm fail_after=3]] break"
    out = run(
        triton.grpc_address, build_request(model, request_id, prompt, 20, stream=True, empty_final=True)
    )
    assert [len(r.text) for r in out[:3]] == [1, 1, 1]
    assert len(out) == 4 and "injected failure after 3 tokens" in out[3].error
    inner = "testllm_core" if model == "ensemble" else model
    assert wait_event(triton.events_path, request_id, "error", model=inner)["tokens"] == 3


@pytest.mark.parametrize("model", MODELS)
def test_invalid_max_tokens_is_an_error_not_a_hang(triton: TritonServer, model: str) -> None:
    out = run(triton.grpc_address, build_request(model, rid(), "zero", 0, stream=True, empty_final=True))
    assert len(out) == 1 and "max_tokens must be > 0" in out[0].error
