"""Validation as OpenAI does it (issue 14 item 1), over real sockets: each bad chat / legacy
completions request gets OpenAI's status, error type, `param` and `code`; valid edge values and
unknown fields reach the upstream untouched; `/v1/models` and `/v1/models/{id}` with auth off, on
and public."""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway

BAD = "invalid_request_error"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ALICE = "sk-test-alice-0123456789abcdef"
BOB = "sk-test-bob-0123456789abcdef"


def request(
    port: int, method: str, path: str, body: Any = None, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo", "messages": USER, **fields}
    return {k: v for k, v in body.items() if v is not ...}


def completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "echo", "prompt": "hi", **fields}
    return {k: v for k, v in body.items() if v is not ...}


def msgs(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return list(messages)


#: name -> (path, body, param, code); every one is a 400 invalid_request_error
CASES: dict[str, tuple[str, dict[str, Any], str, str | None]] = {
    # -- sampling parameters: types and ranges --
    "temperature-string": (CHAT, chat(temperature="hot"), "temperature", "invalid_type"),
    "temperature-above-2": (CHAT, chat(temperature=2.5), "temperature", "decimal_above_max_value"),
    "temperature-negative": (CHAT, chat(temperature=-0.1), "temperature", "decimal_below_min_value"),
    "temperature-bool": (CHAT, chat(temperature=True), "temperature", "invalid_type"),
    "temperature-list": (CHAT, chat(temperature=[0.5]), "temperature", "invalid_type"),
    "top-p-above-1": (CHAT, chat(top_p=2), "top_p", "decimal_above_max_value"),
    "top-p-negative": (CHAT, chat(top_p=-1), "top_p", "decimal_below_min_value"),
    "n-zero": (CHAT, chat(n=0), "n", "integer_below_min_value"),
    "n-above-128": (CHAT, chat(n=129), "n", "integer_above_max_value"),
    "n-decimal": (CHAT, chat(n=1.5), "n", "invalid_type"),
    "presence-penalty-above": (
        CHAT,
        chat(presence_penalty=2.5),
        "presence_penalty",
        "decimal_above_max_value",
    ),
    "frequency-penalty-below": (
        CHAT,
        chat(frequency_penalty=-3),
        "frequency_penalty",
        "decimal_below_min_value",
    ),
    "max-tokens-zero": (CHAT, chat(max_tokens=0), "max_tokens", "integer_below_min_value"),
    "max-tokens-string": (CHAT, chat(max_tokens="10"), "max_tokens", "invalid_type"),
    "max-completion-tokens-zero": (
        CHAT,
        chat(max_completion_tokens=0),
        "max_completion_tokens",
        "integer_below_min_value",
    ),
    "stop-five-strings": (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    "stop-number": (CHAT, chat(stop=5), "stop", "invalid_type"),
    "logprobs-int-on-chat": (CHAT, chat(logprobs=1), "logprobs", "invalid_type"),
    "top-logprobs-21": (
        CHAT,
        chat(logprobs=True, top_logprobs=21),
        "top_logprobs",
        "integer_above_max_value",
    ),
    "seed-string": (CHAT, chat(seed="42"), "seed", "invalid_type"),
    "logit-bias-list": (CHAT, chat(logit_bias=[1, 2]), "logit_bias", "invalid_type"),
    "logit-bias-above-100": (CHAT, chat(logit_bias={"50256": 101}), "logit_bias", "decimal_above_max_value"),
    "user-number": (CHAT, chat(user=123), "user", "invalid_type"),
    "stream-string": (CHAT, chat(stream="true"), "stream", "invalid_type"),
    "stream-options-not-object": (
        CHAT,
        chat(stream=True, stream_options="yes"),
        "stream_options",
        "invalid_type",
    ),
    "stream-options-without-stream": (
        CHAT,
        chat(stream_options={"include_usage": True}),
        "stream_options",
        None,
    ),
    # -- messages --
    "messages-missing": (CHAT, chat(messages=...), "messages", "missing_required_parameter"),
    "messages-empty": (CHAT, chat(messages=[]), "messages", "empty_array"),
    "messages-not-array": (CHAT, chat(messages="hi"), "messages", "invalid_type"),
    "message-not-object": (CHAT, chat(messages=["hi"]), "messages[0]", "invalid_type"),
    "role-unknown": (
        CHAT,
        chat(messages=msgs({"role": "bot", "content": "x"})),
        "messages[0].role",
        "invalid_value",
    ),
    "role-missing": (
        CHAT,
        chat(messages=msgs({"content": "x"})),
        "messages[0].role",
        "missing_required_parameter",
    ),
    "content-number": (
        CHAT,
        chat(messages=msgs({"role": "user", "content": 5})),
        "messages[0].content",
        "invalid_type",
    ),
    "user-content-missing": (
        CHAT,
        chat(messages=msgs({"role": "user"})),
        "messages[0].content",
        "missing_required_parameter",
    ),
    "part-type-unknown": (
        CHAT,
        chat(messages=msgs({"role": "user", "content": [{"type": "image", "url": "x"}]})),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    "part-text-missing": (
        CHAT,
        chat(messages=msgs({"role": "user", "content": [{"type": "text"}]})),
        "messages[0].content[0].text",
        "missing_required_parameter",
    ),
    "part-image-url-string": (
        CHAT,
        chat(messages=msgs({"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]})),
        "messages[0].content[0].image_url",
        "invalid_type",
    ),
    "system-image-part": (
        CHAT,
        chat(
            messages=msgs({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]})
        ),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    "assistant-refusal-part-missing-refusal": (
        CHAT,
        chat(
            messages=msgs(
                {"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "refusal"}]}
            )
        ),
        "messages[1].content[0].refusal",
        "missing_required_parameter",
    ),
    "tool-message-without-id": (
        CHAT,
        chat(messages=msgs({"role": "user", "content": "a"}, {"role": "tool", "content": "42"})),
        "messages[1].tool_call_id",
        None,
    ),
    "assistant-tool-call-no-id": (
        CHAT,
        chat(
            messages=msgs(
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            )
        ),
        "messages[1].tool_calls[0].id",
        "missing_required_parameter",
    ),
    "assistant-tool-call-wrong-type": (
        CHAT,
        chat(
            messages=msgs(
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "code", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            )
        ),
        "messages[1].tool_calls[0].type",
        "invalid_value",
    ),
    # -- tools, tool_choice, response_format --
    "tools-not-array": (CHAT, chat(tools={"type": "function"}), "tools", "invalid_type"),
    "tool-type-wrong": (
        CHAT,
        chat(tools=[{"type": "fn", "function": {"name": "f"}}]),
        "tools[0].type",
        "invalid_value",
    ),
    "tool-function-missing": (
        CHAT,
        chat(tools=[{"type": "function"}]),
        "tools[0].function",
        "missing_required_parameter",
    ),
    "tool-name-missing": (
        CHAT,
        chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools[0].function.name",
        "missing_required_parameter",
    ),
    "tool-name-pattern": (
        CHAT,
        chat(tools=[TOOL, {"type": "function", "function": {"name": "get weather"}}]),
        "tools[1].function.name",
        "invalid_value",
    ),
    "tool-name-too-long": (
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
        "tools[0].function.name",
        "string_above_max_length",
    ),
    "tool-parameters-not-object": (
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]),
        "tools[0].function.parameters",
        "invalid_type",
    ),
    "tool-choice-without-tools": (CHAT, chat(tool_choice="auto"), "tool_choice", None),
    "tool-choice-unknown-string": (
        CHAT,
        chat(tools=[TOOL], tool_choice="always"),
        "tool_choice",
        "invalid_value",
    ),
    "tool-choice-number": (CHAT, chat(tools=[TOOL], tool_choice=1), "tool_choice", "invalid_type"),
    "tool-choice-names-no-tool": (
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}}),
        "tool_choice.function.name",
        "invalid_value",
    ),
    "tool-choice-function-missing": (
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function"}),
        "tool_choice.function",
        "missing_required_parameter",
    ),
    "response-format-string": (CHAT, chat(response_format="json"), "response_format", "invalid_type"),
    "response-format-type-unknown": (
        CHAT,
        chat(response_format={"type": "xml"}),
        "response_format.type",
        "invalid_value",
    ),
    "json-schema-missing": (
        CHAT,
        chat(response_format={"type": "json_schema"}),
        "response_format.json_schema",
        "missing_required_parameter",
    ),
    "json-schema-name-missing": (
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
        "response_format.json_schema.name",
        "missing_required_parameter",
    ),
    "model-missing": (CHAT, chat(model=...), "model", "missing_required_parameter"),
    # -- legacy completions --
    "completion-prompt-missing": (
        COMPLETIONS,
        completion(prompt=...),
        "prompt",
        "missing_required_parameter",
    ),
    "completion-prompt-number": (COMPLETIONS, completion(prompt=5), "prompt", "invalid_type"),
    "completion-logprobs-6": (COMPLETIONS, completion(logprobs=6), "logprobs", "integer_above_max_value"),
    "completion-logprobs-bool": (COMPLETIONS, completion(logprobs=True), "logprobs", "invalid_type"),
    "completion-temperature-3": (
        COMPLETIONS,
        completion(temperature=3),
        "temperature",
        "decimal_above_max_value",
    ),
    "completion-max-tokens-negative": (
        COMPLETIONS,
        completion(max_tokens=-1),
        "max_tokens",
        "integer_below_min_value",
    ),
    "completion-n-zero": (COMPLETIONS, completion(n=0), "n", "integer_below_min_value"),
    "completion-stop-five": (
        COMPLETIONS,
        completion(stop=["1", "2", "3", "4", "5"]),
        "stop",
        "array_above_max_length",
    ),
    "completion-echo-string": (COMPLETIONS, completion(echo="yes"), "echo", "invalid_type"),
    "completion-best-of-21": (COMPLETIONS, completion(best_of=21), "best_of", "integer_above_max_value"),
    "completion-stream-options-without-stream": (
        COMPLETIONS,
        completion(stream_options={"include_usage": True}),
        "stream_options",
        None,
    ),
}


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    text = gateway_config(mock_upstream.port) + "aliases:\n  fast: echo\n"
    with run_gateway(tmp_path_factory.mktemp("validation"), mock_upstream, config_text=text) as g:
        yield g


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in CASES.items()])
def test_bad_request_is_refused_as_openai_does(
    gw: Gateway, case: tuple[str, dict[str, Any], str, str | None]
) -> None:
    path, body, param, code = case
    status, reply = request(gw.port, "POST", path, body)
    assert status == 400, reply
    err = reply["error"]
    assert (err["type"], err["param"], err["code"]) == (BAD, param, code), err
    assert err["message"] and len(err["message"]) < 400, err


def test_messages_are_openais_words(gw: Gateway) -> None:
    cases = {
        "Invalid type for 'temperature': expected a decimal, but got a string instead.": chat(
            temperature="x"
        ),
        "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.": chat(
            max_tokens=0
        ),
        "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
        "array instead.": chat(messages=[]),
        "Invalid value: 'bot'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and "
        "'developer'.": chat(messages=msgs({"role": "bot", "content": "x"})),
        "The 'stream_options' parameter is only allowed when 'stream' is enabled.": chat(
            stream_options={"include_usage": True}
        ),
    }
    for message, body in cases.items():
        assert request(gw.port, "POST", CHAT, body)[1]["error"]["message"] == message


@pytest.mark.parametrize(
    "path,body",
    [
        pytest.param(CHAT, chat(temperature=2, top_p=0, stop=["a", "b", "c", "d"]), id="chat-edges-high"),
        pytest.param(
            CHAT,
            chat(temperature=0, top_p=1, n=1, presence_penalty=-2, frequency_penalty=2),
            id="chat-edges-low",
        ),
        pytest.param(
            CHAT, chat(max_completion_tokens=1, logprobs=True, top_logprobs=20, seed=-1), id="chat-logprobs"
        ),
        pytest.param(
            CHAT, chat(stop="\n", logit_bias={"50256": -100}, user="u", stream=False), id="chat-misc"
        ),
        pytest.param(
            CHAT,
            chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
            id="chat-named-tool",
        ),
        pytest.param(
            CHAT,
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x-1"}}),
            id="json-schema",
        ),
        pytest.param(
            CHAT,
            chat(
                messages=msgs(
                    {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "u"}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                )
            ),
            id="chat-all-roles",
        ),
        pytest.param(
            COMPLETIONS, completion(max_tokens=1, echo=True, logprobs=5, best_of=1), id="completion-edges"
        ),
    ],
)
def test_valid_edge_values_pass(gw: Gateway, path: str, body: dict[str, Any]) -> None:
    status, reply = request(gw.port, "POST", path, body)
    assert status == 200, reply


def test_unknown_fields_reach_the_upstream_untouched(gw: Gateway) -> None:
    assert gw.upstream is not None
    marker = uuid.uuid4().hex
    extra = {"x_vendor": {"deep": [1, {"a": None}]}, "reasoning_effort": "low", "metadata": {"k": "v"}}
    status, reply = request(gw.port, "POST", CHAT, chat(user=marker, temperature=1.5, **extra))
    assert status == 200, reply
    bodies = [e.get("body") for e in gw.upstream.events() if e.get("event") == "request"]
    hits = [b for b in bodies if isinstance(b, dict) and b.get("user") == marker]
    assert len(hits) == 1
    body = hits[0]
    for k, v in extra.items():
        assert body[k] == v
    assert body["temperature"] == 1.5


def test_echoed_client_input_is_shortened(gw: Gateway) -> None:
    huge = "m" * 100_000
    status, reply = request(gw.port, "POST", CHAT, chat(model=huge))
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert len(reply["error"]["message"]) < 300 and "…" in reply["error"]["message"]
    status, reply = request(
        gw.port, "POST", CHAT, chat(messages=msgs({"role": "r" * 50_000, "content": "x"}))
    )
    assert status == 400 and len(reply["error"]["message"]) < 400
    status, reply = request(gw.port, "GET", "/v1/models/" + "x" * 5_000)
    assert status == 404 and len(reply["error"]["message"]) < 300
    status, reply = request(gw.port, "GET", "/nope/" + "y" * 5_000)
    assert status == 404 and len(reply["error"]["message"]) < 300


# ---- /v1/models ---------------------------------------------------------------------------------
def test_models_without_auth(gw: Gateway) -> None:
    status, reply = request(gw.port, "GET", "/v1/models")
    assert status == 200 and reply["object"] == "list"
    ids = {m["id"] for m in reply["data"]}
    assert {"echo", "mock-echo", "gpt-4o-mini", "fast"} <= ids
    status, card = request(gw.port, "GET", "/v1/models/fast")
    assert status == 200, card
    assert card["id"] == "fast" and card["object"] == "model"
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    status, reply = request(gw.port, "GET", "/v1/models/no-such-model")
    assert status == 404
    err = reply["error"]
    assert (err["type"], err["code"], err["param"]) == ("not_found_error", "model_not_found", "model")


AUTH_YAML = f"""
auth:
  enabled: true
  salt: salt-for-tests-0123456789
  keys:
    - id: alice
      key: {ALICE}
    - id: bob
      key: {BOB}
      models: [echo, fast]
aliases:
  fast: echo
"""


@pytest.fixture(scope="module")
def authed(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    text = gateway_config(mock_upstream.port) + AUTH_YAML
    with run_gateway(tmp_path_factory.mktemp("models-auth"), mock_upstream, config_text=text) as g:
        yield g


def test_models_need_a_key_when_auth_is_on(authed: Gateway) -> None:
    for path in ("/v1/models", "/v1/models/echo", "/models"):
        status, reply = request(authed.port, "GET", path)
        assert status == 401 and reply["error"]["type"] == "authentication_error", (path, reply)
        status, reply = request(authed.port, "GET", path, key="sk-wrong-0000000000000000")
        assert status == 401, (path, reply)
    status, reply = request(authed.port, "GET", "/v1/models", key=ALICE)
    assert status == 200
    assert {"echo", "mock-echo", "gpt-4o-mini", "fast"} <= {m["id"] for m in reply["data"]}


def test_a_keys_allow_list_filters_the_models(authed: Gateway) -> None:
    status, reply = request(authed.port, "GET", "/v1/models", key=BOB)
    assert status == 200
    assert {m["id"] for m in reply["data"]} == {"echo", "fast"}
    assert request(authed.port, "GET", "/v1/models/fast", key=BOB)[0] == 200
    status, reply = request(authed.port, "GET", "/v1/models/gpt-4o-mini", key=BOB)
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    assert request(authed.port, "GET", "/v1/models/gpt-4o-mini", key=ALICE)[0] == 200


def test_public_models_switch(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    text = gateway_config(mock_upstream.port) + AUTH_YAML.replace("  keys:", "  public_models: true\n  keys:")
    with run_gateway(tmp_path_factory.mktemp("models-public"), mock_upstream, config_text=text) as g:
        status, reply = request(g.port, "GET", "/v1/models")
        assert status == 200 and "gpt-4o-mini" in {m["id"] for m in reply["data"]}
        assert request(g.port, "GET", "/v1/models/echo")[0] == 200
        # inference still needs a key
        assert request(g.port, "POST", CHAT, chat())[0] == 401
