"""Stage `prompts` end to end: a real gateway -> the repo's mock upstream, which records the body
it got. Prompts chosen by model, team, key and request (header, `metadata.prompt`); the body the
upstream saw; the version in `x-fastpath-prompt` and the ledger row; a template that does not
compile is a config error naming its path, one missing a request variable a 400."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, run_gateway, run_mock

from gateway import config

ALICE = "sk-prompts-alice-0123456789abcdef"  # team red
BOB = "sk-prompts-bob-0123456789abcdef"  # team blue
CAROL = "sk-prompts-carol-0123456789abcdef"  # team red, her own prompt


def gateway_yaml(mock: MockUpstream, db: Path) -> str:
    return f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: 'http://127.0.0.1:{mock.port}/v1'}}
models:
  - {{name: echo, provider: mock, upstream_model: mock-echo}}
  - {{name: plain, provider: mock, upstream_model: mock-echo}}
auth:
  enabled: true
  keys:
    - {{id: alice, key: {ALICE}, team: red}}
    - {{id: bob, key: {BOB}, team: blue}}
    - {{id: carol, key: {CAROL}, team: red}}
prompts:
  support:
    default_version: v1
    models: [echo]
    versions:
      v1: {{system: "You are support for team {{{{ team }}}} ({{{{ key_id }}}}, {{{{ tier }}}})."}}
      v2: {{system: "Support v2.", template: "Q: {{{{ input }}}} (user {{{{ user }}}})"}}
  blue:
    teams: [blue]
    versions:
      v1: {{system: "Blue team assistant."}}
  carol:
    keys: [carol]
    versions:
      v3: {{template: "[carol] {{{{ input }}}}"}}
  customer:
    versions:
      v1: {{template: "Customer {{{{ metadata.customer }}}} asks: {{{{ input }}}}"}}
ledger: {{enabled: true, kind: sqlite, path: '{db}', flush_interval_ms: 50}}
"""


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    with run_mock() as m:
        yield m


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prompts-ledger") / "usage.db"


@pytest.fixture(scope="module")
def gw(mock: MockUpstream, db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw-prompts"), mock, config_text=gateway_yaml(mock, db)) as g:
        yield g


def chat(
    gw: Gateway, key: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    req = urllib.request.Request(
        f"{gw.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def upstream_messages(mock: MockUpstream) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and the whole body) of the last chat request the mock got."""
    body = [e for e in mock.events() if e["event"] == "request" and e["path"] == "/v1/chat/completions"][-1][
        "body"
    ]
    assert isinstance(body, dict)
    return body["messages"], body


HI = [{"role": "user", "content": "hi there"}]


# (key, model, request extras, headers) -> (prompt header, the upstream's messages)
TABLE: list[tuple[str, str, dict[str, Any], dict[str, str], str | None, list[dict[str, Any]]]] = [
    (  # by model; the principal's variables
        ALICE, "echo", {}, {}, "support@v1",
        [{"role": "system", "content": "You are support for team red (alice, default)."}, *HI],
    ),
    (  # by team (before the model's); the client's system message is replaced
        BOB, "echo", {"messages": [{"role": "system", "content": "be rude"}, *HI]}, {}, "blue@v1",
        [{"role": "system", "content": "Blue team assistant."}, *HI],
    ),
    (  # by key (before the team's): the template renders the last user message
        CAROL, "plain", {}, {}, "carol@v3",
        [{"role": "user", "content": "[carol] hi there"}],
    ),
    (  # by request header, a version named
        ALICE, "plain", {"user": "u-7"}, {"x-fastpath-prompt": "support@v2"}, "support@v2",
        [{"role": "system", "content": "Support v2."}, {"role": "user", "content": "Q: hi there (user u-7)"}],
    ),
    (  # by request field; the default version
        BOB, "plain", {"metadata": {"prompt": "customer", "customer": "ACME"}}, {}, "customer@v1",
        [{"role": "user", "content": "Customer ACME asks: hi there"}],
    ),
    (  # none: forwarded as sent
        ALICE, "plain", {}, {}, None, HI,
    ),
]  # fmt: skip


@pytest.mark.parametrize(("key", "model", "extra", "headers", "label", "expected"), TABLE)
def test_templates_render_the_expected_upstream_body(
    gw: Gateway,
    mock: MockUpstream,
    key: str,
    model: str,
    extra: dict[str, Any],
    headers: dict[str, str],
    label: str | None,
    expected: list[dict[str, Any]],
) -> None:
    status, got_headers, reply = chat(gw, key, {"model": model, "messages": HI, **extra}, headers)
    assert status == 200, reply
    assert got_headers.get("x-fastpath-prompt") == label
    messages, body = upstream_messages(mock)
    assert messages == expected
    # the selector is the gateway's: the upstream never sees it
    assert "prompt" not in (body.get("metadata") or {})


def test_the_injected_tokens_are_counted(gw: Gateway) -> None:
    _, _, plain = chat(gw, ALICE, {"model": "plain", "messages": HI})
    _, _, prompted = chat(gw, ALICE, {"model": "echo", "messages": HI})
    assert prompted["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_a_missing_variable_is_a_clear_400(gw: Gateway, mock: MockUpstream) -> None:
    mock.clear()
    status, _, reply = chat(gw, BOB, {"model": "plain", "messages": HI, "metadata": {"prompt": "customer"}})
    assert status == 400
    assert reply["error"]["code"] == "prompt_variable_missing"
    assert "customer@v1" in reply["error"]["message"] and "customer" in reply["error"]["message"]
    assert not [e for e in mock.events() if e["event"] == "request"]  # no upstream call


def test_an_unknown_prompt_is_a_400(gw: Gateway) -> None:
    status, _, reply = chat(
        gw, ALICE, {"model": "plain", "messages": HI}, {"x-fastpath-prompt": "support@v9"}
    )
    assert status == 400 and "support@v9" in reply["error"]["message"]


def test_the_version_is_in_the_ledger_row(gw: Gateway, db: Path) -> None:
    status, headers, _ = chat(
        gw, ALICE, {"model": "plain", "messages": HI, "user": "u"}, {"x-fastpath-prompt": "support@v2"}
    )
    assert status == 200
    rid = headers["x-request-id"]
    row = None
    for _ in range(100):
        try:
            with sqlite3.connect(db) as conn:
                q = "SELECT prompt FROM fastpath_usage WHERE request_id = ?"
                row = conn.execute(q, (rid,)).fetchone()
        except sqlite3.OperationalError:  # the writer has not made the table yet
            row = None
        if row is not None:
            break
        time.sleep(0.05)
    assert row == ("support@v2",)


def test_a_template_that_does_not_compile_is_a_config_error() -> None:
    text = """
providers: [{name: mock, base_url: 'http://127.0.0.1:9/v1'}]
models: [{name: echo, provider: mock}]
prompts:
  bad:
    versions:
      v1: {system: "Hello {{ name "}
"""
    with pytest.raises(
        config.ConfigError, match=r"\$\.prompts\.bad\.versions\.v1\.system: template syntax error"
    ):
        config.parse(text)
    with pytest.raises(config.ConfigError, match=r"\$\.prompts\.two\.default_version"):
        config.parse(text.replace("bad:", "two:").replace('"Hello {{ name "', "a}\n      v2: {system: b"))
