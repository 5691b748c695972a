"""Anthropic Messages end to end: the official `anthropic` SDK -> the gateway -> an OpenAI-wire
upstream (the mock), a real tritonserver, and an Anthropic-wire upstream (`anthropic` provider
kind, the mock's `/v1/messages`); plus the stream translation against the unary one for the same
upstream answer, and a table of bad requests answered as Anthropic answers them."""

from __future__ import annotations

import http.client
import json
import random
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from conftest import Gateway, MockUpstream, TritonServer, gateway_config, run_gateway

from gateway import _fastpath, count_chat_tokens, count_tokens
from gateway.anthropic_stream import ChatToMessages
from gateway.anthropic_wire import message_from_chat

USER = [{"role": "user", "content": "hello there, gateway"}]
TOOLS: list[Any] = [
    {
        "name": "lookup",
        "description": "Look a phrase up.",
        "input_schema": {"type": "object", "properties": {"echo": {"type": "string"}}},
    }
]
KEY = "sk-test-anthropic-0123456789"
LIMITED = "sk-test-anthropic-limited-0123"


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=20)


def last_body(upstream: MockUpstream, path: str = "/v1/chat/completions") -> dict[str, Any]:
    reqs = [
        e for e in upstream.events() if e["event"] == "request" and e.get("path") == path and e.get("body")
    ]
    assert reqs, "the upstream saw no request"
    body = reqs[-1]["body"]
    assert isinstance(body, dict)
    return body


def raw_post(
    port: int, path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if name is not None and data is not None:
            assert data["type"] == name
            out.append((name, data))
    return out


def assert_equivalent(unary: Any, streamed: Any) -> None:
    """Same text, tool calls, stop reason, stop sequence and usage."""
    # (a tool call's id is the upstream's, and differs per upstream request on some)
    assert [b.model_dump(exclude={"parsed_output", "id"}) for b in streamed.content] == [
        b.model_dump(exclude={"id"}) for b in unary.content
    ]
    assert streamed.stop_reason == unary.stop_reason
    assert streamed.stop_sequence == unary.stop_sequence
    assert streamed.usage.input_tokens == unary.usage.input_tokens
    assert streamed.usage.output_tokens == unary.usage.output_tokens
    assert streamed.model == unary.model


# ---- the OpenAI-wire upstream ---------------------------------------------------------------------


def test_unary_message(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model="echo", max_tokens=100, messages=USER)
    msg = raw.parse()
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert msg.id.startswith("msg_")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "echo"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "You said: hello there, gateway"  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 5  # the mock: one token per word
    assert msg.usage.input_tokens > 0


def test_system_prompt_and_parameters_reach_the_upstream(
    client: anthropic.Anthropic, mock_upstream: MockUpstream
) -> None:
    client.messages.create(
        model="echo",
        max_tokens=77,
        system=[{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
        messages=USER,
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},  # (this SDK has no such arguments)
        stop_sequences=["END"],
        metadata={"user_id": "user-42"},
    )
    body = last_body(mock_upstream)
    assert body["messages"] == [
        {"role": "system", "content": "Be terse.\nBe kind."},
        {"role": "user", "content": "hello there, gateway"},
    ]
    assert body["model"] == "mock-echo"
    assert body["max_tokens"] == 77
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 5)
    assert body["stop"] == ["END"]
    assert body["user"] == "user-42"
    assert "stream" not in body


def test_streamed_equals_unary(client: anthropic.Anthropic, mock_upstream: MockUpstream) -> None:
    unary = client.messages.create(model="echo", max_tokens=100, system="Be terse.", messages=USER)
    with client.messages.stream(model="echo", max_tokens=100, system="Be terse.", messages=USER) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert_equivalent(unary, final)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    body = last_body(mock_upstream)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_wire_events(gateway: Gateway) -> None:
    body = {"model": "echo", "max_tokens": 100, "messages": USER, "stream": True}
    status, headers, raw = raw_post(gateway.port, "/v1/messages", json.dumps(body).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["request-id"]
    events = sse_events(raw)
    names = [n for n, _ in events]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == "You said: hello there, gateway"
    md = events[-2][1]
    assert md["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert md["usage"]["output_tokens"] == 5
    assert b"[DONE]" not in raw


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reasons(client: anthropic.Anthropic, stream: bool) -> None:
    def run(**kw: Any) -> Any:
        if not stream:
            return client.messages.create(model="echo", messages=USER, **kw)
        with client.messages.stream(model="echo", messages=USER, **kw) as s:
            return s.get_final_message()

    assert run(max_tokens=100).stop_reason == "end_turn"
    cut = run(max_tokens=2)
    assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 2)
    seq = run(max_tokens=100, stop_sequences=["there"])
    assert (seq.stop_reason, seq.stop_sequence) == ("stop_sequence", "there")
    assert seq.content[0].text == "You said: hello "
    tool = run(max_tokens=100, tools=TOOLS, tool_choice={"type": "any"})
    assert tool.stop_reason == "tool_use"


def test_tool_use_out_and_tool_result_back(client: anthropic.Anthropic, mock_upstream: MockUpstream) -> None:
    long = "one two three four five six seven eight nine ten"
    ask = [{"role": "user", "content": long}]
    unary = client.messages.create(
        model="echo",
        max_tokens=100,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "lookup"},
        messages=ask,
    )
    sent = last_body(mock_upstream)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": TOOLS[0]["input_schema"],
                "description": "Look a phrase up.",
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    [use] = unary.content
    assert use.type == "tool_use" and use.name == "lookup" and use.input == {"echo": long}
    with client.messages.stream(
        model="echo", max_tokens=100, tools=TOOLS, tool_choice={"type": "any"}, messages=ask
    ) as s:
        events = list(s)
        final = s.get_final_message()
    assert_equivalent(unary, final)
    # the arguments came split over many upstream chunks: as many input_json_delta events
    parts = [e.delta.partial_json for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    assert len(parts) >= 10 and json.loads("".join(parts)) == {"echo": long}
    # the result goes back as a `tool` message, the call as the assistant's tool_calls
    answer = client.messages.create(
        model="echo",
        max_tokens=100,
        tools=TOOLS,
        messages=[
            *ask,
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, use.model_dump()]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "found it"},
                    {"type": "text", "text": "and now?"},
                ],
            },
        ],
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].text == "You said: and now?"  # type: ignore[union-attr]
    msgs = last_body(mock_upstream)["messages"]
    assert msgs[1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": use.id,
                "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps(use.input, separators=(",", ":"))},
            }
        ],
    }
    assert msgs[2] == {"role": "tool", "tool_call_id": use.id, "content": "found it"}
    assert msgs[3] == {"role": "user", "content": "and now?"}


def test_count_tokens(client: anthropic.Anthropic, mock_upstream: MockUpstream) -> None:
    before = len([e for e in mock_upstream.events() if e["event"] == "request"])
    got = client.messages.count_tokens(model="echo", system="Be terse.", messages=USER)
    chat = {"messages": [{"role": "system", "content": "Be terse."}, *USER]}
    assert got.input_tokens == count_chat_tokens(json.dumps(chat).encode())
    with_tools = client.messages.count_tokens(model="echo", system="Be terse.", messages=USER, tools=TOOLS)
    assert with_tools.input_tokens > got.input_tokens
    assert len([e for e in mock_upstream.events() if e["event"] == "request"]) == before  # no upstream call
    # the same count as the stream's message_start
    with client.messages.stream(model="echo", max_tokens=5, system="Be terse.", messages=USER) as s:
        start = next(iter(s))
        assert start.type == "message_start"
        assert start.message.usage.input_tokens == got.input_tokens
        s.until_done()
    assert count_tokens("Be terse.") > 0


def test_image_block_becomes_an_image_part(client: anthropic.Anthropic, mock_upstream: MockUpstream) -> None:
    client.messages.create(
        model="echo",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "aGk="},
                    },
                    {"type": "text", "text": "what is it"},
                ],
            }
        ],
    )
    assert last_body(mock_upstream)["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
        {"type": "text", "text": "what is it"},
    ]


@pytest.mark.parametrize(
    ("status", "error_cls", "kind"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (503, anthropic.InternalServerError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
    ],
)
def test_upstream_errors(
    client: anthropic.Anthropic, status: int, error_cls: type[Exception], kind: str
) -> None:
    with pytest.raises(error_cls) as info:
        client.messages.create(
            model="echo", max_tokens=10, messages=USER, extra_body={"mock": {"status": status}}
        )
    err = info.value
    assert isinstance(err, anthropic.APIStatusError)
    assert err.body["type"] == "error" and err.body["error"]["type"] == kind  # type: ignore[index]
    assert err.request_id
    assert err.status_code == {429: 429, 503: 529, 500: 502}[status]


def test_error_mid_stream_is_an_error_event(gateway: Gateway) -> None:
    body = {
        "model": "echo",
        "max_tokens": 100,
        "messages": USER,
        "stream": True,
        "mock": {"drop_after_chunks": 3},
    }
    status, _, raw = raw_post(gateway.port, "/v1/messages", json.dumps(body).encode())
    assert status == 200
    events = sse_events(raw)
    assert events[0][0] == "message_start"
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error" and data["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]


def test_not_found_model(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=10, messages=USER)
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def _msg(**kw: Any) -> bytes:
    body: dict[str, Any] = {"model": "echo", "max_tokens": 10, "messages": USER}
    body.update(kw)
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()
BAD: list[tuple[str, bytes, int, str]] = [
    ("not json", b"{nope", 400, "invalid_request_error"),
    ("empty body", b"", 400, "invalid_request_error"),
    ("an array", b"[]", 400, "invalid_request_error"),
    ("no model", _msg(model=_DROP), 400, "invalid_request_error"),
    ("no max_tokens", _msg(max_tokens=_DROP), 400, "invalid_request_error"),
    ("max_tokens 0", _msg(max_tokens=0), 400, "invalid_request_error"),
    ("max_tokens a string", _msg(max_tokens="10"), 400, "invalid_request_error"),
    ("no messages", _msg(messages=_DROP), 400, "invalid_request_error"),
    ("empty messages", _msg(messages=[]), 400, "invalid_request_error"),
    (
        "system role in messages",
        _msg(messages=[{"role": "system", "content": "x"}]),
        400,
        "invalid_request_error",
    ),
    (
        "unknown block type",
        _msg(messages=[{"role": "user", "content": [{"type": "video"}]}]),
        400,
        "invalid_request_error",
    ),
    (
        "text block without text",
        _msg(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "invalid_request_error",
    ),
    ("temperature above 1", _msg(temperature=1.5), 400, "invalid_request_error"),
    ("top_p below 0", _msg(top_p=-0.1), 400, "invalid_request_error"),
    ("stream not a boolean", _msg(stream="yes"), 400, "invalid_request_error"),
    ("stop_sequences a string", _msg(stop_sequences="END"), 400, "invalid_request_error"),
    (
        "tool_use in a user message",
        _msg(
            messages=[
                {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
            ]
        ),
        400,
        "invalid_request_error",
    ),
    (
        "tool_result in an assistant message",
        _msg(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
        400,
        "invalid_request_error",
    ),
    ("tool without input_schema", _msg(tools=[{"name": "f"}]), 400, "invalid_request_error"),
    (
        "tool_choice tool without name",
        _msg(tools=TOOLS, tool_choice={"type": "tool"}),
        400,
        "invalid_request_error",
    ),
    ("tool_choice unknown type", _msg(tool_choice={"type": "sometimes"}), 400, "invalid_request_error"),
    ("unknown model", _msg(model="no-such-model"), 404, "not_found_error"),
]


@pytest.mark.parametrize(("case", "body", "status", "kind"), BAD, ids=[c[0] for c in BAD])
def test_bad_requests_table(gateway: Gateway, case: str, body: bytes, status: int, kind: str) -> None:
    got, headers, raw = raw_post(gateway.port, "/v1/messages", body)
    err = json.loads(raw)
    assert (got, err["type"], err["error"]["type"]) == (status, "error", kind), (case, err)
    assert err["error"]["message"]
    assert headers["request-id"] == err["request_id"]


def test_refused_before_the_pipeline_in_anthropic_shape(gateway: Gateway) -> None:
    status, headers, raw = raw_post(gateway.port, "/v1/messages", b"", method="GET")
    assert status == 405 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert headers["request-id"]
    status, _, raw = raw_post(gateway.port, "/v1/messages", _msg(), {"content-type": "text/plain"})
    assert status == 415 and json.loads(raw)["type"] == "error"
    status, _, raw = raw_post(gateway.port, "/v1/messages/count_tokens", b'{"model": "echo"}')
    assert status == 400 and json.loads(raw)["error"]["message"] == "messages: Field required"


# ---- auth and limits: x-api-key ----------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_gateway(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    extra = f"""
auth:
  enabled: true
  salt: salt-for-anthropic-tests-0123
  keys:
    - {{id: a, key: {KEY}}}
    - {{id: limited, key: {LIMITED}, tier: tiny}}
tiers:
  default: {{}}
  tiny: {{rpm: 1}}
"""
    with run_gateway(
        tmp_path_factory.mktemp("anthropic-auth"),
        mock_upstream,
        config_text=gateway_config(mock_upstream.port) + extra,
    ) as g:
        yield g


def test_x_api_key_auth(auth_gateway: Gateway) -> None:
    ok = anthropic.Anthropic(base_url=auth_gateway.url, api_key=KEY, max_retries=0, timeout=20)
    assert ok.messages.create(model="echo", max_tokens=10, messages=USER).stop_reason == "end_turn"
    bad = anthropic.Anthropic(base_url=auth_gateway.url, api_key="sk-wrong-key", max_retries=0, timeout=20)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="echo", max_tokens=10, messages=USER)
    assert info.value.status_code == 401
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model="echo", messages=USER)


def test_rate_limited_in_anthropic_shape(auth_gateway: Gateway) -> None:
    c = anthropic.Anthropic(base_url=auth_gateway.url, api_key=LIMITED, max_retries=0, timeout=20)
    c.messages.create(model="echo", max_tokens=10, messages=USER)
    with pytest.raises(anthropic.RateLimitError) as info:
        c.messages.create(model="echo", max_tokens=10, messages=USER)
    assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1


# ---- translation: streamed == unary for the same upstream answer ------------------------------


def _chunks(
    text: str | None, calls: list[tuple[str, str, str]], finish: str, pieces: int, rng: random.Random
) -> list[dict[str, Any]]:
    """An OpenAI stream of this answer with text and each call's arguments split in `pieces`."""

    def split(s: str) -> list[str]:
        cuts = sorted(rng.sample(range(1, len(s)), min(pieces, len(s) - 1))) if len(s) > 1 else []
        return [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)], strict=True)]

    out: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    out += [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in split(text or "")]
    for i, (cid, name, args) in enumerate(calls):
        head = {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        out.append({"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]})
        step = [{"index": i, "function": {"arguments": part}} for part in split(args)]
        out += [{"choices": [{"index": 0, "delta": {"tool_calls": [c]}}]} for c in step]
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    out.append({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
    return out


def _accumulate(raw: bytes) -> dict[str, Any]:
    """Anthropic's events -> the final message, by the protocol's rules (the SDK's own
    accumulation is used end to end above)."""
    msg: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, data in sse_events(raw):
        if name == "message_start":
            msg = data["message"]
        elif name == "content_block_start":
            assert data["index"] == len(msg["content"])
            msg["content"].append(data["content_block"])
        elif name == "content_block_delta":
            block, delta = msg["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            msg.update(data["delta"])
            msg["usage"].update(data["usage"])
    for i, text in partial.items():
        msg["content"][i]["input"] = json.loads(text)
    return msg


CASES = [
    ("plain text", "Hello there, how are you?", [], "stop"),
    ("cut short", "Hello there", [], "length"),
    (
        "one tool call",
        None,
        [("call_1", "lookup", '{"echo": "a b c", "n": [1, 2, {"x": "é"}]}')],
        "tool_calls",
    ),
    (
        "text then two calls",
        "Let me check.",
        [("call_1", "lookup", '{"q": "rivers"}'), ("call_2", "other", '{"q": "boats", "deep": {"k": true}}')],
        "tool_calls",
    ),
]


@pytest.mark.parametrize(("case", "text", "calls", "finish"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pieces", [1, 3, 40])
def test_stream_translation_equals_unary(
    case: str, text: str | None, calls: list[tuple[str, str, str]], finish: str, pieces: int
) -> None:
    rng = random.Random(f"{case}-{pieces}")
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": c, "type": "function", "function": {"name": n, "arguments": a}} for c, n, a in calls
        ]
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }
    unary = json.loads(message_from_chat(json.dumps(body).encode(), "msg_1", "m", None))
    frames = b"".join(
        b"data: %s\n\n" % json.dumps(c).encode() for c in _chunks(text, calls, finish, pieces, rng)
    )
    frames += b"data: [DONE]\n\n"
    rust, python = _fastpath.MessagesStream("msg_1", "m", 11, []), ChatToMessages("msg_1", "m", 11, None)
    # the relay's sends: frames grouped arbitrarily (one upstream read may carry several), here
    # also cut inside a frame
    out, ref, at = b"", b"", 0
    while at < len(frames):
        end = min(len(frames), at + rng.randint(1, 300))
        out += rust.feed(frames[at:end])
        ref += python.feed(frames[at:end])
        at = end
    assert sse_events(out) == sse_events(ref)  # the Rust translator and its Python reference
    streamed = _accumulate(out)
    assert streamed == unary
    assert [b["type"] for b in streamed["content"]] == (["text"] if text else []) + ["tool_use"] * len(calls)


# ---- a real Triton route ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from test_triton_e2e import triton_config

    with run_gateway(
        tmp_path_factory.mktemp("anthropic-triton"), None, config_text=triton_config(triton.grpc_address)
    ) as g:
        yield g


def test_triton_route(triton_gateway: Gateway) -> None:
    c = anthropic.Anthropic(base_url=triton_gateway.url, api_key="unused", max_retries=0, timeout=30)
    ask: Any = [{"role": "user", "content": "Tell me about rivers and boats."}]
    unary = c.messages.create(model="llm-bls", max_tokens=12, system="You answer briefly.", messages=ask)
    assert unary.content and unary.content[0].type == "text" and unary.content[0].text
    assert unary.stop_reason in ("end_turn", "max_tokens")
    assert unary.usage.output_tokens > 0
    with c.messages.stream(model="llm-bls", max_tokens=12, system="You answer briefly.", messages=ask) as s:
        final = s.get_final_message()
    assert final.content[0].text == unary.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == unary.stop_reason
    assert final.usage.output_tokens == unary.usage.output_tokens
    counted = c.messages.count_tokens(model="llm-bls", system="You answer briefly.", messages=ask)
    assert counted.input_tokens > 0
    # Triton routes take tools (the Hermes parser): the test LLM calls one on its directive
    directive = '[[testllm tool_call name=lookup args={"echo": "rivers"}]] Look it up.'
    called = c.messages.create(
        model="llm-bls", max_tokens=64, messages=[{"role": "user", "content": directive}], tools=TOOLS
    )
    assert called.stop_reason == "tool_use"
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "lookup" and use.input == {"echo": "rivers"}  # type: ignore[union-attr]


# ---- the `anthropic` provider kind: an Anthropic-wire upstream (the mock's /v1/messages) --------


@pytest.fixture(scope="module")
def anthropic_upstream_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    extra = f"""  - name: claude
    kind: anthropic
    base_url: http://127.0.0.1:{mock_upstream.port}/v1
    api_key: sk-ant-upstream-secret
    first_byte_timeout_ms: 5000
  - name: claude-echo
    provider: claude
    upstream_model: claude-mock
"""
    # providers then models: splice the provider and the model into their lists
    provider, model = extra.split("  - name: claude-echo\n")
    text = gateway_config(mock_upstream.port).replace(
        "models:\n", provider + "models:\n  - name: claude-echo\n" + model, 1
    )
    with run_gateway(tmp_path_factory.mktemp("anthropic-upstream"), mock_upstream, config_text=text) as g:
        yield g


def test_openai_client_on_an_anthropic_upstream(
    anthropic_upstream_gateway: Gateway, mock_upstream: MockUpstream
) -> None:
    import openai

    c = openai.OpenAI(
        base_url=f"{anthropic_upstream_gateway.url}/v1", api_key="unused", max_retries=0, timeout=20
    )
    msgs: Any = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello there"}]
    unary = c.chat.completions.create(model="claude-echo", messages=msgs, max_tokens=50)
    assert unary.choices[0].message.content == "You said: hello there"
    assert unary.choices[0].finish_reason == "stop"
    assert unary.usage is not None and unary.usage.completion_tokens == 4
    sent = [e for e in mock_upstream.events() if e["event"] == "request" and e.get("path") == "/v1/messages"][
        -1
    ]
    assert sent["headers"]["x-api-key"] == "sk-ant-upstream-secret"  # type: ignore[index]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"  # type: ignore[index]
    assert "authorization" not in sent["headers"]  # type: ignore[operator]
    body = sent["body"]
    assert body["system"] == "Be terse." and body["max_tokens"] == 50 and body["model"] == "claude-mock"  # type: ignore[index]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]  # type: ignore[index]
    chunks = list(
        c.chat.completions.create(
            model="claude-echo",
            messages=msgs,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "You said: hello there"
    )
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    call = c.chat.completions.create(model="claude-echo", messages=msgs, tools=tools, tool_choice="required")
    assert call.choices[0].finish_reason == "tool_calls"
    tc = call.choices[0].message.tool_calls
    assert tc is not None and tc[0].function.name == "lookup"  # type: ignore[union-attr]
    assert json.loads(tc[0].function.arguments) == {"echo": "hello there"}  # type: ignore[union-attr]
    streamed = list(
        c.chat.completions.create(
            model="claude-echo", messages=msgs, tools=tools, tool_choice="required", stream=True
        )
    )
    args = "".join(
        d.function.arguments or ""  # type: ignore[union-attr]
        for ch in streamed
        if ch.choices
        for d in ch.choices[0].delta.tool_calls or ()
    )
    assert json.loads(args) == {"echo": "hello there"}


def test_anthropic_client_on_an_anthropic_upstream(anthropic_upstream_gateway: Gateway) -> None:
    c = anthropic.Anthropic(
        base_url=anthropic_upstream_gateway.url, api_key="unused", max_retries=0, timeout=20
    )
    for kw in (
        {"max_tokens": 100},
        {"max_tokens": 2},
        {"max_tokens": 100, "stop_sequences": ["there"]},
        {"max_tokens": 100, "tools": TOOLS, "tool_choice": {"type": "any"}},
    ):
        unary = c.messages.create(model="claude-echo", messages=USER, **kw)  # type: ignore[arg-type]
        with c.messages.stream(model="claude-echo", messages=USER, **kw) as s:  # type: ignore[arg-type]
            final = s.get_final_message()
        assert_equivalent(unary, final)
    assert unary.stop_reason == "tool_use"
    seq = c.messages.create(model="claude-echo", messages=USER, max_tokens=100, stop_sequences=["there"])
    assert (seq.stop_reason, seq.stop_sequence) == ("stop_sequence", "there")
    with pytest.raises(anthropic.InternalServerError) as info:
        c.messages.create(
            model="claude-echo", messages=USER, max_tokens=10, extra_body={"mock": {"status": 529}}
        )
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
