"""The Responses API end to end: the official `openai` SDK's `client.responses` -> the gateway ->
the mock upstream (and a real tritonserver), on the SQLite store (default) and PostgreSQL (two
gateway instances sharing it); `previous_response_id` chains against the same conversation
sent in full, function tools, ownership, OpenAI's errors, and the stream translator's output
against the unary reply."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Gateway, MockUpstream, TritonServer, gateway_config, pg_database, run_gateway

from gateway.responses_stream import ChatToResponses
from gateway.responses_wire import decode_request, response_from_chat

ALICE = "sk-responses-alice-0123456789"
CAROL = "sk-responses-carol-0123456789"  # alice's team
BOB = "sk-responses-bob-0123456789ab"
ADMIN = "adm-responses-0123456789abcdef0123456789"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a phrase up.",
        "parameters": {"type": "object", "properties": {"echo": {"type": "string"}}},
    }
]


def config(upstream: MockUpstream, store: str) -> str:
    return gateway_config(upstream.port) + "\n".join(
        [
            "auth:",
            "  enabled: true",
            "  salt: responses-test-salt-0000",
            "  keys:",
            f"    - {{id: alice, key: {ALICE}, team: red}}",
            f"    - {{id: carol, key: {CAROL}, team: red}}",
            f"    - {{id: bob, key: {BOB}, team: blue}}",
            "admin:",
            f"  api_key: {ADMIN}",
            "responses:",
            "  store:",
            *store.splitlines(),
            "",
        ]
    )


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("responses")
    with run_gateway(tmp, mock_upstream, config_text=config(mock_upstream, f"    path: {tmp / 'r.db'}")) as g:
        yield g


#: every SDK client the tests make, closed at the module's end: one dropped unclosed leaves its
#: pooled sockets to the garbage collector (a ResourceWarning, failing whichever test it lands in)
_clients: list[openai.OpenAI] = []


@pytest.fixture(scope="module", autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for c in _clients:
        c.close()
    _clients.clear()


def client(g: Gateway, key: str = ALICE) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=20)
    _clients.append(c)
    return c


def chat_bodies(upstream: MockUpstream) -> list[dict[str, Any]]:
    out = []
    for e in upstream.events():
        if e["event"] == "request" and e.get("path") == "/v1/chat/completions" and e.get("body"):
            body = e["body"]
            assert isinstance(body, dict)
            out.append(body)
    return out


def raw(g: Gateway, method: str, path: str, body: Any = None, key: str = ALICE) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=20)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


# ---- unary and stream, retrieve, delete ---------------------------------------------------------------


def test_create_retrieve_delete(gw: Gateway, mock_upstream: MockUpstream) -> None:
    c = client(gw)
    r = c.responses.create(
        model="echo", input="hello there, gateway", instructions="Be brief.", metadata={"a": "b"}
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "You said: hello there, gateway"  # the mock echoes the last user message
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.metadata == {"a": "b"}
    sent = chat_bodies(mock_upstream)[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there, gateway"},
    ]
    got = c.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    items = c.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"]
    # the team's other key sees it; another team's key and no one else does (404, not 403)
    assert client(gw, CAROL).responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError):
        client(gw, BOB).responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client(gw, BOB).responses.delete(r.id)
    status, body = raw(gw, "GET", f"/v1/responses/{r.id}", key=ADMIN)
    assert status == 200 and body["id"] == r.id
    status, body = raw(gw, "DELETE", f"/v1/responses/{r.id}")
    assert status == 200 and body == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.retrieve(r.id)
    assert info.value.body["code"] == "response_not_found"  # type: ignore[index]


def test_stream_equals_unary(gw: Gateway) -> None:
    c = client(gw)
    text = "one two three four five six seven eight"
    unary = c.responses.create(model="echo", input=text)
    with c.responses.stream(model="echo", input=text) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") > 1  # the mock streams word by word
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == unary.output_text == f"You said: {text}"
    assert final.usage is not None and unary.usage is not None
    assert final.usage.output_tokens == unary.usage.output_tokens
    # stored before response.completed reached the client: readable at once
    assert c.responses.retrieve(final.id).output_text == f"You said: {text}"
    # store: false is not stored
    r = c.responses.create(model="echo", input="not kept", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_five_turns_by_previous_response_id_equal_the_full_conversation(
    gw: Gateway, mock_upstream: MockUpstream
) -> None:
    c = client(gw)
    turns = [f"turn {i}: tell me about the number {i}" for i in range(5)]
    prev: str | None = None
    chained: list[dict[str, Any]] = []
    full_items: list[Any] = []
    full: list[dict[str, Any]] = []
    for i, text in enumerate(turns):
        stream = i % 2 == 1  # both ways: a stored stream continues like a stored unary reply
        kwargs: dict[str, Any] = {"model": "echo", "input": text, "instructions": "Be brief."}
        if prev is not None:
            kwargs["previous_response_id"] = prev
        if stream:
            with c.responses.stream(**kwargs) as s:
                r = s.get_final_response()
        else:
            r = c.responses.create(**kwargs)
        chained.append(chat_bodies(mock_upstream)[-1])
        prev = r.id
        full_items.append({"role": "user", "content": text})
        c.responses.create(model="echo", input=full_items, instructions="Be brief.", store=False)
        full.append(chat_bodies(mock_upstream)[-1])
        full_items += [o.model_dump(exclude_none=True) for o in r.output]
    for a, b in zip(chained, full, strict=True):
        a.pop("stream", None), a.pop("stream_options", None)
        assert a == b
    assert len(full[-1]["messages"]) == 1 + 2 * 5 - 1


def test_function_call_out_and_output_back(gw: Gateway, mock_upstream: MockUpstream) -> None:
    c = client(gw)
    long = "one two three four five six seven"
    r = c.responses.create(
        model="echo", input=long, tools=TOOLS, tool_choice={"type": "function", "name": "lookup"}
    )
    sent = chat_bodies(mock_upstream)[-1]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a phrase up.",
                "parameters": TOOLS[0]["parameters"],
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    [call] = r.output
    assert call.type == "function_call" and call.name == "lookup"
    assert json.loads(call.arguments) == {"echo": long}
    with c.responses.stream(model="echo", input=long, tools=TOOLS, tool_choice="required") as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds.count("response.function_call_arguments.delta") > 1
    assert "response.function_call_arguments.done" in kinds
    [scall] = final.output
    assert scall.type == "function_call" and scall.arguments == call.arguments
    back = c.responses.create(
        model="echo",
        previous_response_id=r.id,
        tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "found it"}],
    )
    msgs = chat_bodies(mock_upstream)[-1]["messages"]
    assert msgs[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": "lookup", "arguments": call.arguments},
            }
        ],
    }
    assert msgs[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "found it"}
    assert back.status == "completed"


def test_errors(gw: Gateway) -> None:
    c = client(gw)
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.create(model="echo", input="hi", previous_response_id="resp_unknown")
    assert info.value.status_code == 404
    err = info.value.body
    assert err["param"] == "previous_response_id" and err["code"] == "previous_response_not_found"  # type: ignore[index]
    assert err["type"] and "resp_unknown" in err["message"]  # type: ignore[index]
    mine = c.responses.create(model="echo", input="mine")
    with pytest.raises(openai.NotFoundError):  # another team's response is not there for bob
        client(gw, BOB).responses.create(model="echo", input="hi", previous_response_id=mine.id)
    for body, param in [
        ({"input": "x"}, "model"),
        ({"model": "echo"}, "input"),
        ({"model": "echo", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "echo", "input": "x", "top_p": "1"}, "top_p"),
        ({"model": "echo", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "echo", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "echo", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "echo", "input": "x", "bogus": 1}, "bogus"),
    ]:
        status, out = raw(gw, "POST", "/v1/responses", body)
        assert status == 400, (body, out)
        assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    status, out = raw(
        gw, "POST", "/v1/responses", {"model": "echo", "input": "x"}, key="sk-wrong-0123456789abcd"
    )
    assert status == 401
    status, out = raw(gw, "PUT", f"/v1/responses/{mine.id}")
    assert status == 405


def test_json_schema_format(gw: Gateway, mock_upstream: MockUpstream) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    client(gw).responses.create(
        model="echo", input="x", text={"format": {"type": "json_schema", "name": "thing", "schema": schema}}
    )
    sent = chat_bodies(mock_upstream)[-1]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema},
    }


# ---- the stream translator, alone ---------------------------------------------------------------------


def test_translator_split_anywhere_equals_unary() -> None:
    req, _ = decode_request(b'{"model":"m","input":"x"}')
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}]}}
            ]
        },
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}}
            ]
        },
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    frames = b"".join(b"data: " + json.dumps(ch).encode() + b"\n\n" for ch in chunks) + b"data: [DONE]\n\n"
    tr = ChatToResponses(req, 0)
    out = tr.start()
    for i in range(0, len(frames), 7):
        out += tr.feed(frames[i : i + 7])
    assert tr.response is not None
    unary = response_from_chat(
        req,
        json.dumps(
            {
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "message": {
                            "role": "assistant",
                            "content": "Hello",
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "f", "arguments": '{"a":1}'},
                                }
                            ],
                        },
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            }
        ).encode(),
    )
    assert tr.response == unary
    events = [json.loads(b.split(b"\ndata: ", 1)[1]) for b in out.split(b"\n\n") if b]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"


# ---- PostgreSQL: two instances share the store ------------------------------------------------------


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with pg_database("fastpath_responses_test") as dsn:
        yield dsn


def test_two_instances_share_postgres(mock_upstream: MockUpstream, tmp_path: Path, pg_dsn: str) -> None:
    cfg = config(mock_upstream, f"    kind: postgres\n    dsn: {pg_dsn}")
    with (
        run_gateway(tmp_path, mock_upstream, config_text=cfg) as one,
        run_gateway(tmp_path, mock_upstream, config_text=cfg, workers=2) as two,
    ):
        a, b = client(one), client(two)
        first = a.responses.create(model="echo", input="first on one")
        assert b.responses.retrieve(first.id).output_text == "You said: first on one"
        with b.responses.stream(model="echo", input="second on two", previous_response_id=first.id) as s:
            second = s.get_final_response()
        msgs = chat_bodies(mock_upstream)[-1]["messages"]
        assert [m["content"] for m in msgs] == ["first on one", "You said: first on one", "second on two"]
        assert a.responses.retrieve(second.id).previous_response_id == first.id
        b.responses.delete(first.id)
        for c in (a, b):
            with pytest.raises(openai.NotFoundError):
                c.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):  # its chain is broken now
            a.responses.create(model="echo", input="x", previous_response_id=second.id)


# ---- a real Triton route ----------------------------------------------------------------------------


def test_triton_route(triton: TritonServer, tmp_path: Path) -> None:
    from test_triton_e2e import triton_config

    text = triton_config(triton.grpc_address) + f"responses:\n  store:\n    path: {tmp_path / 'r.db'}\n"
    with (
        run_gateway(tmp_path, None, config_text=text) as g,
        openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=30) as c,
    ):
        r = c.responses.create(model="llm-bls", input="Tell me about rivers.", max_output_tokens=12)
        assert r.output_text and r.status in ("completed", "incomplete")
        events = list(
            c.responses.create(
                model="llm-bls",
                input="And boats?",
                previous_response_id=r.id,
                max_output_tokens=12,
                stream=True,
            )
        )
        # a length stop ends as OpenAI's does: `response.incomplete` (the SDK's stream helper
        # only accepts `response.completed`, hence the raw events here)
        last = events[-1]
        assert last.type in ("response.completed", "response.incomplete")
        final = last.response  # type: ignore[union-attr]
        assert final.output_text and final.previous_response_id == r.id
        assert c.responses.retrieve(final.id).output_text == final.output_text
