"""OpenAI parity on Triton routes: the `openai` SDK -> the gateway -> a real tritonserver.

Tools, n > 1, logprobs, response_format and seed, each compared with the same model asked
directly with tritonclient (never hard-coded model text): the gateway must turn what the
TensorRT-LLM contract returns into what OpenAI documents. The test LLM's directives
(triton_models/README.md) make it call tools and answer in JSON deterministically.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import Gateway, TritonServer, run_gateway

from gateway.config import TritonModelConfig
from gateway.upstreams.triton_request import chatml, chatml_tools
from gateway.upstreams.triton_tools import ParsedCall, make_parser

TOOLS_ON = "triton: {guided_decoding: true}"
MODELS = {
    "llm-bls": ("tensorrt_llm_bls", TOOLS_ON),  # n: num_return_sequences (it has sequence_index)
    "llm-ensemble": ("ensemble", TOOLS_ON),  # n: fan-out (no sequence_index output)
    "llm-llama": ("testllm_core", "triton: {tool_parser: llama3_json}"),
    "llm-notools": ("testllm_core", "triton: {tool_parser: none}"),
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = 'Weather in Paris? [[testllm tool_call name=get_weather args={"city":"Paris"}]]'
USER: list[Any] = [{"role": "user", "content": "Tell me about rivers and boats."}]


@pytest.fixture(scope="module")
def gw(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    lines = [
        "server: {host: 127.0.0.1}",
        "providers:",
        f"  - {{name: triton, kind: triton, base_url: 'grpc://{triton.grpc_address}',"
        " first_byte_timeout_ms: 10000, idle_timeout_ms: 10000}",
        "models:",
        *(f"  - {{name: {k}, provider: triton, upstream_model: {m}, {t}}}" for k, (m, t) in MODELS.items()),
    ]
    with run_gateway(tmp_path_factory.mktemp("gw-parity"), None, config_text="\n".join(lines) + "\n") as g:
        yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=30)


def direct(triton: TritonServer, model: str, text: str, **extra: Any) -> dict[int, dict[str, Any]]:
    """Stream `text` through `model` with tritonclient; -> {sequence index: {text, lps, n_out}}.
    `extra`: more inputs by name (seed=, num_return_sequences=, return_log_probs=, guide...)."""
    dtypes = {bool: ("BOOL", bool), int: ("INT32", np.int32), str: ("BYTES", object)}
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    inputs = []
    values = {
        "text_input": text,
        "max_tokens": 1000,
        "stream": True,
        "exclude_input_in_output": True,
        "return_num_output_tokens": True,
        **extra,
    }
    for name, value in values.items():
        dtype, np_type = ("UINT64", np.uint64) if name == "random_seed" else dtypes[type(value)]
        arr = np.array([[value.encode() if isinstance(value, str) else value]], dtype=np_type)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "num_output_tokens")]
    if extra.get("return_log_probs"):
        outputs.append(grpcclient.InferRequestedOutput("output_log_probs"))
    if extra.get("num_return_sequences", 1) > 1:
        outputs.append(grpcclient.InferRequestedOutput("sequence_index"))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    seqs: dict[int, dict[str, Any]] = {}
    try:
        client.async_stream_infer(
            model, inputs, outputs=outputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
        )
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            out = result.as_numpy("text_output")
            if out is not None:
                idx = result.as_numpy("sequence_index")
                seq = seqs.setdefault(0 if idx is None else int(idx.flatten()[0]), {"text": "", "lps": []})
                seq["text"] += b"".join(out.flatten()).decode()
                seq["n_out"] = int(result.as_numpy("num_output_tokens").flatten()[0])
                lps = result.as_numpy("output_log_probs")
                if lps is not None:
                    seq["lps"] += [float(x) for x in lps.flatten()]
            if result.get_response().parameters["triton_final_response"].bool_param:
                return seqs
    finally:
        client.stop_stream()
        client.close()


def parsed(text: str, kind: str = "hermes") -> tuple[str, list[ParsedCall]]:
    parser = make_parser(kind)
    content, calls = parser.push(text)
    more, more_calls = parser.finish()
    return content + more, calls + more_calls


def reassemble(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """Streamed tool-call deltas, by index -> {id, name, arguments}."""
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
    return calls


# ---- tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize("public", ["llm-bls", "llm-ensemble"])
def test_tool_calls_unary_stream_and_a_follow_up_turn(
    client: openai.OpenAI, triton: TritonServer, public: str
) -> None:
    messages: list[Any] = [{"role": "user", "content": ASK}]
    prompt = chatml_tools(messages, [WEATHER], "auto", "hermes")
    expected = parsed(direct(triton, MODELS[public][0], prompt)[0]["text"])[1]
    assert [c.name for c in expected] == ["get_weather"]  # the model did call it

    resp = client.chat.completions.create(model=public, messages=messages, tools=[WEATHER])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (e.name, json.loads(e.arguments)) for e in expected
    ]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"

    chunks = list(
        client.chat.completions.create(model=public, messages=messages, tools=[WEATHER], stream=True)
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call" not in content and "tool_call>" not in content and not content.strip()
    streamed = reassemble(chunks)
    assert [(s["name"], s["arguments"]) for s in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert list(streamed) == [0] and streamed[0]["id"].startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]

    # the follow-up turn: the call and its result go into the prompt; the model answers in text
    follow: list[Any] = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'},
    ]
    rendered = chatml_tools(
        [
            {"role": "user", "content": ASK},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": '{"temperature": 21}'},
        ],
        [WEATHER],
        "auto",
        "hermes",
    )
    answer = direct(triton, MODELS[public][0], rendered)[0]["text"]
    resp = client.chat.completions.create(model=public, messages=follow, tools=[WEATHER])
    assert resp.choices[0].message.content == answer and resp.choices[0].finish_reason == "stop"
    assert not resp.choices[0].message.tool_calls


def test_llama3_json_tool_calls(client: openai.OpenAI, triton: TritonServer) -> None:
    ask = 'Weather? [[testllm tool_call name=get_weather style=llama3 args={"city":"Oslo"}]]'
    messages: list[Any] = [{"role": "user", "content": ask}]
    expected = parsed(
        direct(triton, "testllm_core", chatml_tools(messages, [WEATHER], "auto", "llama3_json"))[0]["text"],
        "llama3_json",
    )[1]
    for stream in (False, True):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="llm-llama", messages=messages, tools=[WEATHER], stream=True
                )
            )
            got = [(s["name"], s["arguments"]) for s in reassemble(chunks).values()]
        else:
            resp = client.chat.completions.create(model="llm-llama", messages=messages, tools=[WEATHER])
            assert resp.choices[0].finish_reason == "tool_calls"
            got = [(c.function.name, c.function.arguments) for c in resp.choices[0].message.tool_calls or []]
        assert got == [(e.name, e.arguments) for e in expected] and got[0][0] == "get_weather"


# ---- n > 1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("public", ["llm-bls", "llm-ensemble"])
def test_n_choices_unary_and_stream(client: openai.OpenAI, triton: TritonServer, public: str) -> None:
    model = MODELS[public][0]
    prompt = chatml([("user", USER[0]["content"])])
    if public == "llm-bls":  # num_return_sequences: the engine's sequences
        seqs = direct(triton, model, prompt, num_return_sequences=2)
        expected = [seqs[0], seqs[1]]
    else:  # fan-out with a seed: choice i samples with seed + i
        expected = [direct(triton, model, prompt, random_seed=5 + i)[0] for i in range(2)]
    assert expected[0]["text"] != expected[1]["text"]
    extra = {} if public == "llm-bls" else {"seed": 5}

    resp = client.chat.completions.create(model=public, messages=USER, n=2, **extra)  # type: ignore[arg-type]
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == [e["text"] for e in expected]
    assert [c.finish_reason for c in resp.choices] == ["stop", "stop"]
    assert resp.usage is not None and resp.usage.completion_tokens == sum(e["n_out"] for e in expected)

    chunks = list(
        client.chat.completions.create(
            model=public,
            messages=USER,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            **extra,  # type: ignore[arg-type]
        )
    )
    texts = ["", ""]
    finishes: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == [e["text"] for e in expected] and finishes == {0: "stop", 1: "stop"}
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == resp.usage.completion_tokens


def test_completions_n(client: openai.OpenAI, triton: TritonServer) -> None:
    seqs = direct(triton, "tensorrt_llm_bls", "Once upon a time", num_return_sequences=2)
    resp = client.completions.create(model="llm-bls", prompt="Once upon a time", n=2, max_tokens=1000)
    assert [c.text for c in resp.choices] == [seqs[0]["text"], seqs[1]["text"]]


# ---- logprobs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs(client: openai.OpenAI, triton: TritonServer, stream: bool) -> None:
    prompt = chatml([("user", USER[0]["content"])])
    seq = direct(triton, "tensorrt_llm_bls", prompt, return_log_probs=True)[0]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="llm-bls", messages=USER, logprobs=True, top_logprobs=0, stream=True
            )
        )
        entries = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        resp = client.chat.completions.create(model="llm-bls", messages=USER, logprobs=True)
        assert resp.choices[0].logprobs is not None
        entries = resp.choices[0].logprobs.content or []
        text = resp.choices[0].message.content or ""
    assert text == seq["text"]
    assert "".join(e.token for e in entries) == text
    assert [e.logprob for e in entries] == pytest.approx(seq["lps"], abs=1e-6)
    assert all(e.bytes == list(e.token.encode()) and e.top_logprobs == [] for e in entries)


# ---- response_format, seed ----------------------------------------------------------------------
def test_json_object_and_json_schema(client: openai.OpenAI, triton: TritonServer) -> None:
    prompt = chatml([("user", USER[0]["content"])])
    expected = direct(
        triton, "tensorrt_llm_bls", prompt, guided_decoding_guide_type="json", guided_decoding_guide=""
    )[0]["text"]
    resp = client.chat.completions.create(
        model="llm-bls", messages=USER, response_format={"type": "json_object"}
    )
    assert resp.choices[0].message.content == expected and isinstance(json.loads(expected), dict)

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["city", "days", "ok"],
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}
    expected = direct(
        triton,
        "tensorrt_llm_bls",
        prompt,
        guided_decoding_guide_type="json_schema",
        guided_decoding_guide=json.dumps(schema, separators=(",", ":")),
    )[0]["text"]
    chunks = list(
        client.chat.completions.create(model="llm-bls", messages=USER, response_format=fmt, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    value = json.loads(text)
    assert set(value) == {"city", "days", "ok"} and isinstance(value["days"], int)


def test_seed_is_random_seed(client: openai.OpenAI, triton: TritonServer) -> None:
    prompt = chatml([("user", USER[0]["content"])])
    expected = direct(triton, "tensorrt_llm_bls", prompt, random_seed=1234)[0]["text"]
    resp = client.chat.completions.create(model="llm-bls", messages=USER, seed=1234)
    assert resp.choices[0].message.content == expected
    assert expected != direct(triton, "tensorrt_llm_bls", prompt)[0]["text"]


# ---- what the engine cannot do ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("public", "extra", "param"),
    [
        ("llm-bls", {"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
        ("llm-notools", {"tools": [WEATHER]}, "tools"),
        ("llm-llama", {"response_format": {"type": "json_object"}}, "response_format"),  # not configured
    ],
)
def test_what_the_engine_cannot_do_is_a_400_naming_it(
    client: openai.OpenAI, public: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=public, messages=USER, extra_body=extra)
    err = info.value.body
    assert isinstance(err, dict)
    assert (
        err["param"] == param
        and err["code"] == "unsupported_parameter"
        and err["type"] == "invalid_request_error"
    )


def test_default_config_parses_hermes() -> None:
    assert TritonModelConfig().tool_parser == "hermes"
