"""Stage `retrieve` end to end: documents indexed by `fastpath-gateway index add` (embedded by the
mock's deterministic hashed-word vectors through a running gateway), then a gateway whose models
have retrievers: a question retrieves the right document, which the upstream sees in the prompt,
with citations in the header and (opt-in) the body; a retriever whose embedding model is slower
than its budget lets the request proceed without context (`x-fastpath-rag: timeout`); a missing
index is `error`, never a failed request. Headers are asserted, never wall-clock times."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, _env, run_gateway, run_mock
from test_streaming import wait_for
from test_tracing import Receiver, attrs

KEY = "sk-retrieval-0123456789abcdef"
DOCS = {
    "password.md": "# Resetting your password\n\nReset your password: open settings, then forgot password.",
    "billing.md": "# Billing and invoices\n\nInvoices are emailed monthly; update the card in billing.",
    "shipping.md": "# Shipping times\n\nOrders ship within two business days by courier.",
}


def base_yaml(fast: MockUpstream, slow: MockUpstream) -> str:
    return f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: fast, base_url: 'http://127.0.0.1:{fast.port}/v1'}}
  - {{name: slow, base_url: 'http://127.0.0.1:{slow.port}/v1'}}
models:
  - {{name: echo, provider: fast, upstream_model: mock-echo}}
  - {{name: echo-slow-rag, provider: fast, upstream_model: mock-echo}}
  - {{name: echo-no-index, provider: fast, upstream_model: mock-echo}}
  - {{name: embed, kind: embedding, provider: fast, upstream_model: text-embedding-3-small}}
  - {{name: embed-slow, kind: embedding, provider: slow, upstream_model: text-embedding-3-small}}
auth:
  enabled: true
  keys: [{{id: alice, key: {KEY}}}]
"""


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[MockUpstream, MockUpstream]]:
    with run_mock() as fast, run_mock() as slow:
        yield fast, slow


@pytest.fixture(scope="module")
def index(mocks: tuple[MockUpstream, MockUpstream], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the CLI through a gateway without retrievers (the same embedding model)."""
    tmp = tmp_path_factory.mktemp("rag-index")
    files = []
    for name, text in DOCS.items():
        (tmp / name).write_text(text)
        files.append(str(tmp / name))
    path = tmp / "docs.db"
    with run_gateway(tmp, None, config_text=base_yaml(*mocks)) as g:
        cmd = [sys.executable, "-m", "gateway.cli", "index", "add", "--index", str(path)]
        cmd += ["--embedding-model", "embed", "--url", g.url, "--api-key", KEY, *files]
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60, check=True)
        assert "3 chunks from 3 files upserted; 3 in" in out.stdout
        # again: upserted in place (same ids), not duplicated
        out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60, check=True)
        assert "; 3 in" in out.stdout
    return path


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def gw(
    mocks: tuple[MockUpstream, MockUpstream],
    index: Path,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    text = (
        base_yaml(*mocks)
        + f"""
tracing:
  {{enabled: true, otlp_endpoint: 'http://127.0.0.1:{receiver.port}/v1/traces', flush_interval_ms: 100}}
retrieval:
  retrievers:
    docs: {{index: '{index}', embedding_model: embed, top_k: 2, min_score: 0.05, citations_in_body: true}}
    slow: {{index: '{index}', embedding_model: embed-slow, budget_ms: 100}}
    missing: {{index: '{index}.nope', embedding_model: embed}}
  models: {{echo: docs, echo-slow-rag: slow, echo-no-index: missing}}
prompts:
  rag:
    models: [echo]
    versions:
      v1:
        system: "Answer from:{{% for d in context %}} [{{{{ d.id }}}}] {{{{ d.text }}}}{{% endfor %}}"
"""
    )
    with run_gateway(tmp_path_factory.mktemp("gw-rag"), None, config_text=text) as g:
        yield g


def chat(gw: Gateway, model: str, question: str) -> tuple[dict[str, str], dict[str, Any]]:
    req = urllib.request.Request(
        f"{gw.url}/v1/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": question}]}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())


def last_chat_body(mock: MockUpstream) -> dict[str, Any]:
    events = [e for e in mock.events() if e["event"] == "request" and e["path"] == "/v1/chat/completions"]
    body = events[-1]["body"]
    assert isinstance(body, dict)
    return body


def test_a_question_retrieves_the_right_document(
    gw: Gateway, mocks: tuple[MockUpstream, MockUpstream], receiver: Receiver
) -> None:
    headers, reply = chat(gw, "echo", "How do I reset my password?")
    assert headers["x-fastpath-rag"] == "hit"
    assert headers["x-fastpath-prompt"] == "rag@v1"
    cites = json.loads(headers["x-fastpath-citations"])
    assert cites[0]["id"].endswith("password.md#0") and cites[0]["title"] == "Resetting your password"
    assert all(c["score"] >= 0.05 for c in cites)
    assert reply["citations"] == cites  # opt-in: in the body too, the same documents
    system = last_chat_body(mocks[0])["messages"][0]
    assert system["role"] == "system"
    assert f"[{cites[0]['id']}] # Resetting your password" in system["content"]
    for c in cites:  # what is cited is what was injected
        assert f"[{c['id']}]" in system["content"]

    # the trace's server span says which template version and which documents went in
    span = server_span(receiver, headers["x-request-id"])
    assert span["fastpath.prompt"] == "rag@v1" and span["fastpath.rag.outcome"] == "hit"
    assert span["fastpath.rag.documents"].split(",") == [c["id"] for c in cites]

    headers, _ = chat(gw, "echo", "When will my invoices be emailed?")
    assert json.loads(headers["x-fastpath-citations"])[0]["id"].endswith("billing.md#0")


def server_span(receiver: Receiver, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for span in list(receiver.spans):
            a = attrs(span)
            if a.get("fastpath.request_id") == request_id and "http.response.status_code" in a:
                return a
        return None

    span = wait_for(find, timeout_s=10)
    assert span is not None, f"no server span for {request_id}"
    return span


def test_a_slow_embedding_model_hits_the_budget_and_the_request_proceeds(
    gw: Gateway, mocks: tuple[MockUpstream, MockUpstream], receiver: Receiver
) -> None:
    fast, slow = mocks
    req = urllib.request.Request(
        f"{slow.url}/_mock/faults", data=json.dumps({"first_delay_ms": 2000}).encode(), method="POST"
    )
    urllib.request.urlopen(req, timeout=5).close()
    try:
        headers, reply = chat(gw, "echo-slow-rag", "How do I reset my password?")
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{slow.url}/_mock/faults", method="DELETE"), timeout=5)
    assert headers["x-fastpath-rag"] == "timeout"
    assert "x-fastpath-citations" not in headers and "citations" not in reply
    span = server_span(receiver, headers["x-request-id"])
    assert span["fastpath.rag.outcome"] == "timeout" and "fastpath.rag.documents" not in span
    assert last_chat_body(fast)["messages"] == [{"role": "user", "content": "How do I reset my password?"}]


def test_a_missing_index_is_an_error_not_a_failed_request(gw: Gateway) -> None:
    headers, reply = chat(gw, "echo-no-index", "How do I reset my password?")
    assert headers["x-fastpath-rag"] == "error"
    assert reply["choices"][0]["message"]["content"]


def test_nothing_relevant_is_empty(gw: Gateway) -> None:
    headers, _ = chat(gw, "echo", "zebra quantum marmalade")
    assert headers["x-fastpath-rag"] == "empty"
