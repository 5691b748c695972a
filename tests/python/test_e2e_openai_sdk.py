"""End to end with the official `openai` SDK: client -> gateway -> OpenAI-wire upstream process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from conftest import Gateway, MockUpstream, free_port, run_gateway

from gateway import count_chat_tokens, count_tokens

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there, gateway"},
]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=20)


def last_request(upstream: MockUpstream) -> dict[str, Any]:
    reqs = [e for e in upstream.events() if e["event"] == "request" and e.get("body") is not None]
    assert reqs, "the upstream saw no request"
    return reqs[-1]


def test_chat_non_streamed(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    resp = raw.parse()
    assert raw.headers["x-request-id"]
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == "You said: hello there, gateway"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(
        resp.choices[0].message.content.split()
    )  # mock: 1 token per word
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI, mock_upstream: MockUpstream) -> None:
    full = client.chat.completions.create(model="echo", messages=MESSAGES).choices[0].message.content
    chunks = list(client.chat.completions.create(model="echo", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The client did not ask for usage: the usage chunk the gateway requested is stripped again.
    assert all(c.choices for c in chunks)
    forwarded = last_request(mock_upstream)["body"]
    assert forwarded["stream_options"] == {"include_usage": True}
    assert forwarded["model"] == "mock-echo"


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    unary = client.chat.completions.create(model="echo", messages=MESSAGES)
    assert unary.usage is not None
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert last.usage.completion_tokens == unary.usage.completion_tokens


def test_completions_non_streamed_and_streamed(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="echo", prompt="say this")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == " echo: say this"
    assert resp.usage is not None
    stream = list(client.completions.create(model="echo", prompt="say this", stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == resp.choices[0].text


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["echo", "mock-echo", "slow", "gpt-4o-mini"]


def test_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="echo", messages=MESSAGES, n=2)
    assert [c.index for c in resp.choices] == [0, 1]


def test_tools_and_tool_choice_pass_through(client: openai.OpenAI, mock_upstream: MockUpstream) -> None:
    tools: list[Any] = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    choice: Any = {"type": "function", "function": {"name": "lookup"}}
    resp = client.chat.completions.create(model="echo", messages=MESSAGES, tools=tools, tool_choice=choice)
    call = resp.choices[0].message.tool_calls
    assert call is not None and call[0].function.name == "lookup"  # type: ignore[union-attr]
    assert resp.choices[0].finish_reason == "tool_calls"
    forwarded = last_request(mock_upstream)["body"]
    assert forwarded["tools"] == tools and forwarded["tool_choice"] == choice


def test_response_format_pass_through(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="echo", messages=MESSAGES, response_format={"type": "json_object"}
    )
    content = resp.choices[0].message.content
    assert content is not None
    assert json.loads(content) == {"echo": "hello there, gateway"}


def test_unknown_fields_passed_through_and_model_rewritten(
    client: openai.OpenAI, mock_upstream: MockUpstream
) -> None:
    extra = {"vendor_field": {"nested": [1, 2, {"x": None}]}, "top_k": 7}
    client.chat.completions.create(model="echo", messages=MESSAGES, extra_body=extra, seed=3)
    body = last_request(mock_upstream)["body"]
    assert body["vendor_field"] == extra["vendor_field"] and body["top_k"] == 7 and body["seed"] == 3
    assert body["model"] == "mock-echo"
    assert body["messages"] == MESSAGES


def test_same_name_model_is_forwarded_byte_identical(gateway: Gateway, mock_upstream: MockUpstream) -> None:
    raw = b'{"model":"mock-echo","messages":[{"role":"user","content":"x"}],  "z":{"k":[1,2.50,"\\u00e9"]}}'
    req = urllib.request.Request(
        f"{gateway.url}/v1/chat/completions", data=raw, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert last_request(mock_upstream)["body"] == json.loads(raw)


def test_request_id_honoured_and_forwarded(client: openai.OpenAI, mock_upstream: MockUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, extra_headers={"x-request-id": "req-abc.123"}
    )
    assert raw.headers["x-request-id"] == "req-abc.123"
    assert last_request(mock_upstream)["headers"]["x-request-id"] == "req-abc.123"
    bad = client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, extra_headers={"x-request-id": "bad id with spaces"}
    )
    assert bad.headers["x-request-id"] != "bad id with spaces"


def test_usage_counted_when_upstream_omits_it(client: openai.OpenAI) -> None:
    extra = {"mock": {"no_usage": True}}
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body=extra)
    assert resp.usage is not None
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    content = resp.choices[0].message.content
    assert content is not None
    assert resp.usage.prompt_tokens == count_chat_tokens(body, "o200k_base")
    assert resp.usage.completion_tokens == count_tokens(content, "o200k_base")


def test_stream_usage_counted_when_upstream_omits_it(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mock": {"no_usage": True}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == count_tokens(text, "o200k_base")
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    assert usage.prompt_tokens == count_chat_tokens(body, "o200k_base")


def test_sdk_sees_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as exc2:
        client.chat.completions.create(model="echo", messages=MESSAGES, extra_body={"mock": {"status": 500}})
    assert exc2.value.status_code == 502


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_readiness(gateway: Gateway, tmp_path: Any, mock_upstream: MockUpstream) -> None:
    assert _get(f"{gateway.url}/healthz") == (200, {"status": "ok"})
    status, body = _get(f"{gateway.url}/readyz")
    assert status == 200 and body["status"] == "ready"
    # A gateway whose upstream is down is alive but not ready.
    dead = MockUpstream(free_port(), mock_upstream.proc)
    with run_gateway(tmp_path, dead) as down:
        assert _get(f"{down.url}/healthz")[0] == 200
        status, body = _get(f"{down.url}/readyz")
        assert status == 503 and body["status"] == "not_ready"
        assert body["upstreams"]["mock"]["ready"] is False
