"""One SDK suite, two routes: the official `openai` and `anthropic` SDKs against `make run`'s
models (the embedded default config, `gateway/default.yaml`, verbatim), the same test cases on the
OpenAI-wire route (`local-echo`, `local-embed-mock`: the repo's mock upstream) and on the Triton
route (`local-llm`, `local-embed`: a real tritonserver on triton_models/). Auth is on as in
`make run`: a key made with `fastpath-gateway keys create` in the gateway's data dir.

The cases compare the gateway with itself (streamed vs unary, a chained conversation vs its
parts), never with hard-coded model text: each route's model answers in its own words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from conftest import Gateway, MockUpstream, TritonServer, _env, run_gateway
from test_triton_parity import ASK, WEATHER

#: route -> (chat model, embedding model)
ROUTES = {"openai-wire": ("local-echo", "local-embed-mock"), "triton": ("local-llm", "local-embed")}
# ASK: the Triton test LLM's directive (triton_models/README.md); the mock calls a forced tool anyway
QUESTION = "Tell me about rivers and boats."


@pytest.fixture(scope="module")
def make_run(
    triton: TritonServer, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    """The gateway on the embedded default config, its upstreams at the session's servers."""
    tmp = tmp_path_factory.mktemp("sdk-suite")
    env = {
        "FASTPATH_GATEWAY_DATA_DIR": str(tmp / "data"),
        "FASTPATH_GATEWAY_SALT": "sdk-suite-salt-0123456789",
        "FASTPATH_LOCAL_TRITON_GRPC": triton.grpc_address,
        "FASTPATH_LOCAL_MOCK_URL": f"http://127.0.0.1:{mock_upstream.port}/v1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        text = resources.files("gateway").joinpath("default.yaml").read_text()
        cfg = tmp / "default.yaml"
        cfg.write_text(text)
        made = subprocess.run(
            [
                *(sys.executable, "-m", "gateway.cli", "keys", "create", "--config", str(cfg)),
                *("--team", "sdk", "--tier", "default", "--id", "sdk-suite"),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        key = next(w for w in made.stdout.split() if w.startswith("sk-"))
        with run_gateway(tmp, None, config_text=text, workers=2) as gw:
            yield gw, key


@pytest.fixture(params=sorted(ROUTES))
def route(request: pytest.FixtureRequest) -> tuple[str, str]:
    return ROUTES[request.param]


@pytest.fixture
def oai(make_run: tuple[Gateway, str]) -> openai.OpenAI:
    gw, key = make_run
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def ant(make_run: tuple[Gateway, str]) -> anthropic.Anthropic:
    gw, key = make_run
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=60)


# ---- openai -----------------------------------------------------------------------------------


def test_models_list(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    ids = {m.id for m in oai.models.list()}
    assert set(route) <= ids


def test_chat_streamed_equals_unary(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    model = route[0]
    messages: Any = [{"role": "user", "content": QUESTION}]
    unary = oai.chat.completions.create(model=model, messages=messages, max_tokens=40)
    choice = unary.choices[0]
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert unary.usage is not None and unary.usage.prompt_tokens > 0 and unary.usage.completion_tokens > 0
    chunks = list(
        oai.chat.completions.create(
            model=model, messages=messages, max_tokens=40, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == unary.usage.completion_tokens


def test_completions_streamed_equals_unary(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    model = route[0]
    unary = oai.completions.create(model=model, prompt=QUESTION, max_tokens=30)
    assert unary.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=model, prompt=QUESTION, max_tokens=30, stream=True)
        if c.choices
    )
    assert streamed == unary.choices[0].text


def test_tool_call_and_follow_up_turn(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    model = route[0]
    messages: Any = [{"role": "user", "content": ASK}]
    forced: Any = {"type": "function", "function": {"name": "get_weather"}}
    unary = oai.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice=forced)
    choice = unary.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    # streamed: the same call as deltas with index and id
    calls: dict[int, dict[str, str]] = {}
    for c in oai.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice=forced, stream=True
    ):
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            got = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            got["id"] += tc.id or ""
            got["name"] += (tc.function.name or "") if tc.function else ""
            got["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == args
    # the tool's result goes back; the model answers in text
    follow: Any = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = oai.chat.completions.create(model=model, messages=follow, tools=[WEATHER])
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_responses_chain_and_stream(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    model = route[0]
    first = oai.responses.create(model=model, input="My name is Ada.", max_output_tokens=30)
    # `incomplete` (reason max_output_tokens) where the model had more to say
    assert first.status in ("completed", "incomplete") and first.output_text
    second = oai.responses.create(
        model=model, input=QUESTION, previous_response_id=first.id, max_output_tokens=30
    )
    assert second.output_text and second.previous_response_id == first.id
    again = oai.responses.retrieve(second.id)
    assert again.id == second.id and again.output_text == second.output_text
    # the chain is the conversation sent in full
    full = oai.responses.create(
        model=model,
        input=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": QUESTION},
        ],
        max_output_tokens=30,
    )
    assert full.output_text == second.output_text
    assert full.usage is not None and second.usage is not None
    assert full.usage.input_tokens == second.usage.input_tokens
    # streamed: the deltas make the same text, the last event is the finished response
    events = list(oai.responses.create(model=model, input=QUESTION, max_output_tokens=30, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    unary = oai.responses.create(model=model, input=QUESTION, max_output_tokens=30)
    last = events[-1]
    assert last.type == f"response.{unary.status}"  # completed, or incomplete at the limit
    assert last.type in ("response.completed", "response.incomplete")
    assert text == unary.output_text == last.response.output_text


def test_embeddings(oai: openai.OpenAI, route: tuple[str, str]) -> None:
    model = route[1]
    out = oai.embeddings.create(model=model, input=["a river", "a boat on a river"])
    assert [d.index for d in out.data] == [0, 1]
    dims = {len(d.embedding) for d in out.data}
    assert len(dims) == 1 and dims.pop() > 0
    assert out.usage.prompt_tokens > 0
    # the SDK's default asks for base64 and decodes it: the same vectors as floats
    floats = oai.embeddings.create(model=model, input=["a river"], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(out.data[0].embedding, rel=1e-6)


# ---- anthropic --------------------------------------------------------------------------------


def test_messages_streamed_equals_unary(ant: anthropic.Anthropic, route: tuple[str, str]) -> None:
    model = route[0]
    messages: Any = [{"role": "user", "content": QUESTION}]
    unary = ant.messages.create(model=model, max_tokens=40, messages=messages)
    (block,) = unary.content
    assert block.type == "text" and block.text
    assert unary.stop_reason in ("end_turn", "max_tokens")
    assert unary.usage.input_tokens > 0 and unary.usage.output_tokens > 0
    with ant.messages.stream(model=model, max_tokens=40, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == block.text
    assert final.stop_reason == unary.stop_reason and final.usage.output_tokens == unary.usage.output_tokens


def test_messages_tool_use(ant: anthropic.Anthropic, route: tuple[str, str]) -> None:
    model = route[0]
    tool: Any = {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
    }
    messages: Any = [{"role": "user", "content": ASK}]
    forced: Any = {"type": "tool", "name": "get_weather"}
    unary = ant.messages.create(
        model=model, max_tokens=100, messages=messages, tools=[tool], tool_choice=forced
    )
    assert unary.stop_reason == "tool_use"
    uses = [b for b in unary.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input, dict)
    with ant.messages.stream(
        model=model, max_tokens=100, messages=messages, tools=[tool], tool_choice=forced
    ) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and [b.input for b in streamed] == [uses[0].input]


def test_count_tokens(ant: anthropic.Anthropic, route: tuple[str, str]) -> None:
    model = route[0]
    short = ant.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
    long = ant.messages.count_tokens(model=model, messages=[{"role": "user", "content": QUESTION * 5}])
    assert 0 < short.input_tokens < long.input_tokens


def test_the_suite_uses_the_embedded_default(make_run: tuple[Gateway, str]) -> None:
    """Guard against drift: the suite's config is the packaged default, byte for byte."""
    gw, _ = make_run
    packaged = resources.files("gateway").joinpath("default.yaml").read_text()
    used = Path(gw.proc.args[gw.proc.args.index("--config") + 1]).read_text()  # type: ignore[union-attr]
    assert used == packaged
