"""Tool-call validation (`tool_validation:`) and tool permissions (`tools_allowed:`), through real
gateways (one per action) and the mock upstream (`mock.tool` + `mock.content` make the call)."""

from __future__ import annotations

import http.client as httplib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway, gateway_config, run_gateway

FULL = "sk-test-full-key-0123456789"
LIMITED = "sk-test-limited-key-0123456789"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "delete_all", "parameters": {"type": "object"}}},
]
GOOD = '{"city": "Paris", "days": 2}'


def _config(port: int, action: str) -> str:
    return gateway_config(port) + (
        f"tool_validation:\n  enabled: true\n  action: {action}\n"
        "auth:\n  enabled: true\n  keys:\n"
        f"    - {{id: full, key: {FULL}}}\n"
        f"    - {{id: limited, key: {LIMITED}, tools_allowed: [get_weather]}}\n"
    )


@pytest.fixture(scope="module", params=["error", "flag", "repair"])
def gw(
    request: Any, tmp_path_factory: pytest.TempPathFactory, mock_upstream: Any
) -> Iterator[tuple[str, Gateway]]:
    action = request.param
    cfg = _config(mock_upstream.port, action)
    with run_gateway(tmp_path_factory.mktemp(f"gw-tools-{action}"), None, config_text=cfg) as g:
        yield action, g


def _post(g: Gateway, body: dict[str, Any], key: str = FULL) -> tuple[int, dict[str, str], str]:
    conn = httplib.HTTPConnection("127.0.0.1", g.port, timeout=30)
    try:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def _body(
    tool: str, args: str, stream: bool = False, tools: list[Any] = TOOLS, **mock: Any
) -> dict[str, Any]:
    return {
        "model": "echo",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": tools,
        "stream": stream,
        "mock": {"tool": tool, "content": args, **mock},
    }


INVALID = [
    ("unknown_tool", "{}", "unknown tool"),
    ("get_weather", '{"city": "Par', "not valid JSON"),
    ("get_weather", '{"days": 0}', "do not match its schema"),
    ("get_weather", '{"city": "Paris", "extra": 1}', "do not match its schema"),
]


def test_valid_call_passes(gw: tuple[str, Gateway]) -> None:
    _, g = gw
    status, headers, text = _post(g, _body("get_weather", GOOD))
    assert status == 200, text
    call = json.loads(text)["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": GOOD}
    assert "x-fastpath-tool-check" not in headers
    status, _, text = _post(g, _body("get_weather", GOOD, stream=True, split_at=[5, 11]))
    assert status == 200 and "error" not in text and text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize(("tool", "args", "why"), INVALID)
def test_invalid_call_gets_the_action(gw: tuple[str, Gateway], tool: str, args: str, why: str) -> None:
    action, g = gw
    status, headers, text = _post(g, _body(tool, args))
    if action == "flag":
        assert status == 200
        assert why in headers["x-fastpath-tool-check"]
    else:  # error, and repair whose second reply (the same mock answer) still fails
        assert status == 502, text
        err = json.loads(text)["error"]
        assert err["code"] == "tool_call_invalid" and why in err["message"]
    # a stream: the calls went out as they came; the verdict comes at the end
    status, _, text = _post(g, _body(tool, args, stream=True, split_at=[3]))
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    if action == "flag":
        assert ": x-fastpath-tool-check " in text and why in text
    else:
        last = [ln for ln in text.split("\n") if ln.startswith("data: {")][-1]
        assert json.loads(last[6:])["error"]["code"] == "tool_call_invalid"


def test_repair_retries_once_with_the_error(gw: tuple[str, Gateway]) -> None:
    action, g = gw
    if action != "repair":
        pytest.skip("repair only")
    status, headers, text = _post(g, _body("get_weather", '{"days": 0}', content_after_tool=GOOD))
    assert status == 200, text
    reply = json.loads(text)
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == GOOD
    assert "tool_repair" in headers.get("server-timing", "")
    # both calls are charged: the second prompt carries the first call and the tool message
    assert reply["usage"]["prompt_tokens"] > 10


def test_permissions_on_request_and_response(gw: tuple[str, Gateway]) -> None:
    _, g = gw
    status, _, text = _post(g, _body("get_weather", GOOD), key=LIMITED)  # offers delete_all
    assert status == 403, text
    err = json.loads(text)["error"]
    assert err["param"] == "tools" and err["code"] == "tool_not_allowed"
    only_weather = TOOLS[:1]
    status, _, text = _post(g, _body("get_weather", GOOD, tools=only_weather), key=LIMITED)
    assert status == 200, text
    # the model calls a tool the key may not use (and the request did not offer)
    status, headers, text = _post(g, _body("delete_all", "{}", tools=only_weather), key=LIMITED)
    if gw[0] == "flag":
        assert "not allowed" in headers["x-fastpath-tool-check"]
    else:
        assert status == 502 and "not allowed" in json.loads(text)["error"]["message"]
