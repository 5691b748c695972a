"""Output guard (`output_guards:`): PII and secrets in replies, through a real gateway and the mock
upstream (`mock.content` + `mock.split_at` stream a given text cut at given offsets)."""

from __future__ import annotations

import http.client as httplib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, gateway_config, run_gateway

from gateway import _fastpath
from gateway.config_output import PII_KINDS

SAMPLES = {
    "email": "jane.doe+news@example.co.uk",
    "phone": "+1 415 555 0132",
    "card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ssn": "123-45-6789",
    "api_key": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "private_key": (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeK\n"
        "-----END RSA PRIVATE KEY-----"
    ),
}
BENIGN = Path(__file__).parent / "data" / "benign_outputs.txt"


def _text(kind: str) -> str:
    return f"Sure: {SAMPLES[kind]} is it."


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_upstream: Any) -> Iterator[Gateway]:
    cfg = gateway_config(mock_upstream.port) + (
        "output_guards:\n"
        "  - {name: pii_redact, action: redact, models: [echo]}\n"
        "  - {name: pii_block, action: block, models: [mock-echo]}\n"
        "  - {name: pii_flag, action: flag, models: [gpt-4o-mini], holdback_chars: 64}\n"
    )
    with run_gateway(tmp_path_factory.mktemp("gw-out"), None, config_text=cfg) as g:
        yield g


class Reply:
    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status_code = status
        self.headers = headers
        self.text = text

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """A keep-alive HTTP/1.1 client for many small requests (the stdlib's)."""

    def __init__(self, port: int) -> None:
        self.conn = httplib.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, json: Any) -> Reply:
        self.conn.request(
            "POST", "/v1" + path, body=_dumps(json), headers={"content-type": "application/json"}
        )
        r = self.conn.getresponse()
        text = r.read().decode()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, text)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def http(gw: Gateway) -> Iterator[Client]:
    c = Client(gw.port)
    yield c
    c.conn.close()


def _body(model: str, mock: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "mock": mock}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _events(raw: str) -> tuple[list[Any], list[str]]:
    """(data payloads, JSON-decoded except `[DONE]`), comment lines); asserts valid SSE framing."""
    assert raw.endswith("\n\n")
    data: list[Any] = []
    comments: list[str] = []
    for block in raw.split("\n\n")[:-1]:
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            else:
                assert line.startswith("data: "), line
                payload = line[6:]
                data.append(payload if payload == "[DONE]" else json.loads(payload))
    return data, comments


def _stream(http: Client, model: str, mock: dict[str, Any]) -> tuple[str, list[Any], list[str]]:
    r = http.post("/chat/completions", json=_body(model, mock))
    assert r.status_code == 200, r.text
    data, comments = _events(r.text)
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for d in data
        if isinstance(d, dict)
        for c in d.get("choices", [])
    )
    return text, data, comments


@pytest.mark.parametrize("kind", PII_KINDS)
def test_redacted_when_split_at_every_offset(http: Client, kind: str) -> None:
    text = _text(kind)
    want = f"Sure: [REDACTED:{kind}] is it."
    for cut in range(1, len(text)):
        got, data, _ = _stream(http, "echo", {"content": text, "split_at": [cut]})
        assert got == want, f"{kind} split at {cut}: {got!r}"
        assert data[-1] == "[DONE]"
        usage = data[-2]["usage"]
        assert usage["completion_tokens"] == 2  # the upstream's: two pieces, redacted or not


@pytest.mark.parametrize("kind", PII_KINDS)
def test_blocked_when_split_at_every_offset(http: Client, kind: str) -> None:
    text = _text(kind)
    for cut in range(1, len(text)):
        got, data, _ = _stream(http, "mock-echo", {"content": text, "split_at": [cut]})
        assert data[-1] == "[DONE]", f"{kind} at {cut}"
        assert data[-2]["error"]["code"] == "pii_block", f"{kind} at {cut}: {data[-2]}"
        assert kind in data[-2]["error"]["message"]
        assert "Sure: ".startswith(got), f"{kind} at {cut}: sent {got!r}"  # nothing of the finding


def test_redaction_keeps_valid_sse_and_usage(http: Client) -> None:
    text = " ".join(_text(k) for k in PII_KINDS)
    got, data, _ = _stream(http, "echo", {"content": text})  # word by word
    for kind in PII_KINDS:
        assert f"[REDACTED:{kind}]" in got
        assert SAMPLES[kind] not in got
    plain = http.post("/chat/completions", json=_body("echo", {"content": text}, stream=False)).json()
    assert data[-2]["usage"] == plain["usage"]
    assert plain["choices"][0]["message"]["content"] == got
    assert [d["choices"][0]["finish_reason"] for d in data[:-2] if d["choices"]][-1] == "stop"


def test_unary_block_is_an_error_reply(http: Client) -> None:
    r = http.post("/chat/completions", json=_body("mock-echo", {"content": _text("card")}, stream=False))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "pii_block"
    assert r.headers["x-output-guard-error-code"] == "pii_block"


def test_flag_keeps_text_and_says_so(http: Client) -> None:
    r = http.post("/chat/completions", json=_body("gpt-4o-mini", {"content": _text("email")}, stream=False))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == _text("email")
    assert r.headers["x-fastpath-output-guard"] == "pii_flag=email:flag"
    got, _, comments = _stream(http, "gpt-4o-mini", {"content": _text("ssn"), "split_at": [12]})
    assert got == _text("ssn")
    assert "x-fastpath-output-guard pii_flag=ssn:flag" in comments


def test_tool_call_arguments_are_checked(http: Client) -> None:
    args = json.dumps({"to": SAMPLES["email"], "body": "hello"})
    tools = [{"type": "function", "function": {"name": "send_mail", "parameters": {"type": "object"}}}]
    body = _body("echo", {"content": args, "tool": "send_mail"}, stream=False) | {"tools": tools}
    r = http.post("/chat/completions", json=body)
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"])["to"] == "[REDACTED:email]"
    body = _body("echo", {"content": args, "tool": "send_mail", "split_at": [9, 20]}) | {"tools": tools}
    r = http.post("/chat/completions", json=body)
    data, _ = _events(r.text)
    pieces = [
        t["function"].get("arguments", "")
        for d in data
        if isinstance(d, dict)
        for c in d.get("choices", [])
        for t in (c.get("delta") or {}).get("tool_calls") or []
    ]
    assert json.loads("".join(pieces))["to"] == "[REDACTED:email]"
    assert data[-1] == "[DONE]"


def test_benign_corpus_has_no_false_positives(http: Client) -> None:
    lines = [ln for ln in BENIGN.read_text().splitlines() if ln.strip()]
    assert len(lines) >= 300
    policy = _fastpath.OutputPolicy([(k, "flag", 0) for k in PII_KINDS])
    flagged = [(ln, policy.scan(ln)[1]) for ln in lines]
    flagged = [f for f in flagged if f[1]]
    rate = len(flagged) / len(lines)
    print(f"output guard false positives: {len(flagged)}/{len(lines)} lines = {rate:.2%}")
    assert not flagged, flagged[:5]
    text = "\n".join(lines)
    got, _, _ = _stream(http, "echo", {"content": text})  # through the stream filter too
    assert got == text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("output_guards:\n  - {name: Bad-Name}\n", "$.output_guards[0].name"),
        ("output_guards:\n  - {name: a}\n  - {name: a}\n", "$.output_guards[1].name: duplicate"),
        ("output_guards:\n  - {name: a, kinds: [email, dna]}\n", "$.output_guards[0].kinds[1]: unknown kind"),
        ("output_guards:\n  - {name: a, action: hide}\n", "$.output_guards[0].action"),
        ("output_guards:\n  - {name: a, models: [nope]}\n", "$.output_guards[0].models: unknown model"),
        ("output_guards:\n  - {name: a, holdback_chars: 8}\n", "$.output_guards[0].holdback_chars"),
        ("tool_validation: {enabled: true, action: retry}\n", "$.tool_validation.action"),
        ("tiers:\n  default:\n    tools_allowed: ['bad name']\n", "$.tiers.default.tools_allowed"),
    ],
)
def test_config_errors_name_the_path(extra: str, message: str) -> None:
    from gateway import config as config_mod

    base = (
        "providers:\n  - {name: p, base_url: 'http://127.0.0.1:1/v1'}\nmodels:\n  - {name: m, provider: p}\n"
    )
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(base + extra, "<test>")
    assert message in str(info.value)
