"""Stage `planner` (cost/quality model selection) with the real `request_router` model on the
session tritonserver, two mock upstream models and the official SDK. The prompts here are NOT in
the router's training set (checked below)."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import REPO, Gateway, MockUpstream, TritonServer, free_port, run_gateway
from test_auth import post as auth_post

from gateway import _fastpath
from gateway.config import ConfigError, parse
from gateway.pipeline.planner import request_features
from gateway.schemas import ChatRequestView

ROUTER_DIR = REPO / "triton_models" / "request_router"

SIMPLE = [
    "What's the capital of Germany?",
    "Thanks, have a great day!",
    "Translate 'good evening' into Italian.",
    "How many minutes are in two hours?",
]
HARD = [
    "Prove that there is no largest prime number and explain every step of the argument.",
    "Design a distributed message queue that guarantees at-least-once delivery across data centers; "
    "discuss partitioning, replication and consumer rebalancing.",
    "Write a Python implementation of a B-tree with insertion and deletion, and analyse the "
    "complexity of each operation.",
]


def _features_module() -> Any:
    spec = importlib.util.spec_from_file_location("router_features", ROUTER_DIR / "1" / "features.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompts_here_are_not_in_the_training_set() -> None:
    lines = (ROUTER_DIR / "data" / "requests.jsonl").read_text().splitlines()
    texts = {json.loads(line)["text"] for line in lines if line.strip()}
    assert not texts & set(SIMPLE + HARD)


# ---- the features the gateway computes are the ones the model was trained on ----------------------
@pytest.mark.parametrize(
    "text", ["", "hi", "abcd", "abcde", "héllo wörld", "日本語のテキスト", "emoji 🎉 ok", "x" * 4001]
)
def test_token_estimate_matches_the_trainers(text: str) -> None:
    assert _features_module().estimate_tokens(text) == _fastpath.estimate_tokens(text)


def test_request_features_match_the_trainers() -> None:
    feats = _features_module()
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "fix this:\n```py\nx=1\n```"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": [{"type": "text", "text": "and explain"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    import msgspec

    text, got = request_features(msgspec.json.decode(json.dumps(body), type=ChatRequestView))
    assert text == "be brief\nfix this:\n```py\nx=1\n```\ndone\nand explain"
    assert list(got) == feats.raw_features(text, tools=True, turns=3)
    assert got[1:] == (1.0, 1.0, 3.0)


# ---- the model on Triton --------------------------------------------------------------------------
def _score(client: grpcclient.InferenceServerClient, texts: list[str]) -> list[float]:
    feats = _features_module()
    t = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in texts], dtype=np.object_))
    f = grpcclient.InferInput("features", [len(texts), 4], "FP32")
    f.set_data_from_numpy(np.array([feats.raw_features(s) for s in texts], dtype=np.float32))
    out = client.infer("request_router", [t, f], outputs=[grpcclient.InferRequestedOutput("score")])
    return [float(v) for v in out.as_numpy("score").reshape(-1)]


def test_router_model_separates_unseen_requests_and_rejects_bad_shapes(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        scores = _score(client, SIMPLE + HARD)
        assert all(s < 0.5 for s in scores[: len(SIMPLE)]), scores
        assert all(s >= 0.5 for s in scores[len(SIMPLE) :]), scores
        single = _score(client, [HARD[0]])  # a batch equals single calls
        assert abs(single[0] - scores[len(SIMPLE)]) < 1e-4
        t = grpcclient.InferInput("text", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[b"hi"]], dtype=np.object_))
        f = grpcclient.InferInput("features", [1, 4], "FP32")
        f.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        with pytest.raises(grpcclient.InferenceServerException):
            client.infer("request_router", [t])  # `features` missing
        assert _score(client, ["hello"])[0] < 0.5  # still serving
    finally:
        client.close()


# ---- through the gateway --------------------------------------------------------------------------
def planner_config(mock: MockUpstream, grpc_address: str, ledger: Path | None = None, **planner: Any) -> str:
    plans = planner.pop(
        "models",
        {
            "auto": {"simple": "gpt-4o-mini", "hard": "gpt-4o"},
            "gpt-4o": {"simple": "gpt-4o-mini", "hard": "gpt-4o", "shadow": True},
            "auto-lean": {"simple": "gpt-4o-mini", "hard": "gpt-4o", "skip_retrieval_when_simple": True},
        },
    )
    text = f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: cheap, base_url: "http://127.0.0.1:{mock.port}/v1", api_key: sk-upstream-secret}}
  - {{name: strong, base_url: "http://127.0.0.1:{mock.port}/v1", api_key: sk-upstream-secret}}
  - {{name: triton, kind: triton, base_url: "grpc://{grpc_address}"}}
models:
  - {{name: gpt-4o-mini, provider: cheap, upstream_model: mock-echo}}
  - {{name: gpt-4o, provider: strong, upstream_model: mock-echo}}
  - {{name: embed, kind: embedding, provider: cheap, upstream_model: text-embedding-3-small}}
planner: {json.dumps({"provider": "triton", "timeout_ms": 20000, **planner, "models": plans})}
metrics: {{require_admin: false, publish_interval_ms: 50}}
"""
    if ledger is not None:
        text += f"ledger: {{enabled: true, path: {ledger}, flush_interval_ms: 50}}\n"
    return text


@pytest.fixture(scope="module")
def gw(
    triton: TritonServer, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Path]]:
    tmp = tmp_path_factory.mktemp("gw-planner")
    ledger = tmp / "usage.db"
    # a retriever on gpt-4o-mini whose index does not exist: it runs (`x-fastpath-rag: error`)
    # unless the plan skips it
    cfg = (
        planner_config(mock_upstream, triton.grpc_address, ledger)
        + f"""
retrieval:
  retrievers: {{docs: {{index: '{tmp / "absent.db"}', embedding_model: embed}}}}
  models: {{gpt-4o-mini: docs}}
"""
    )
    with run_gateway(tmp, None, config_text=cfg) as g:
        yield g, ledger


def post(
    port: int, body: dict[str, Any], rid: str = "", path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """test_auth's keyless POST, with an `x-request-id` and a CPU classifier's patience."""
    return auth_post(port, body, path=path, extra_headers={"x-request-id": rid} if rid else None, timeout=60)


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def plan_of(headers: dict[str, str]) -> dict[str, str]:
    """`x-fastpath-plan: class=hard; model=gpt-4o; ...` -> {field: value}."""
    return dict(p.strip().split("=", 1) for p in headers["x-fastpath-plan"].split(";"))


#: each public model has its own upstream (the same mock under two provider names)
PROVIDER = {"cheap": "gpt-4o-mini", "strong": "gpt-4o"}


def served_by(headers: dict[str, str]) -> str:
    """The public model whose upstream answered (`x-fastpath-route: <provider>/<upstream>; ...`)."""
    return PROVIDER[headers["x-fastpath-route"].split("/", 1)[0]]


@pytest.mark.parametrize(("text", "cls", "model"), [(t, "simple", "gpt-4o-mini") for t in SIMPLE[:2]] + [
    (t, "hard", "gpt-4o") for t in HARD
])  # fmt: skip
def test_auto_sends_simple_to_the_cheap_model_and_hard_to_the_strong(
    gw: tuple[Gateway, Path], text: str, cls: str, model: str
) -> None:
    status, headers, body = post(gw[0].port, chat("auto", text))
    assert status == 200, body
    plan = plan_of(headers)
    assert (plan["class"], plan["model"], plan["decision"], plan["for"]) == (cls, model, "routed", "auto")
    score = float(plan["score"])
    assert (score >= 0.5) is (cls == "hard")
    assert served_by(headers) == model
    assert "planner;dur=" in headers["server-timing"]


def test_shadow_mode_reports_the_choice_but_keeps_the_route(gw: tuple[Gateway, Path]) -> None:
    status, headers, _ = post(gw[0].port, chat("gpt-4o", SIMPLE[2]))
    assert status == 200
    plan = plan_of(headers)
    assert (plan["class"], plan["model"], plan["decision"]) == ("simple", "gpt-4o-mini", "shadow")
    assert served_by(headers) == "gpt-4o"  # would have been gpt-4o-mini: not changed
    _, headers, _ = post(gw[0].port, chat("gpt-4o", HARD[0]))
    assert plan_of(headers)["model"] == "gpt-4o" and served_by(headers) == "gpt-4o"


def test_completions_are_planned_and_embeddings_are_not(gw: tuple[Gateway, Path]) -> None:
    body = {"model": "auto", "prompt": HARD[0], "max_tokens": 4}
    status, headers, _ = post(gw[0].port, body, path="/v1/completions")
    assert status == 200 and plan_of(headers)["class"] == "hard" and served_by(headers) == "gpt-4o"
    status, headers, err = post(gw[0].port, {"model": "auto", "input": "x"}, path="/v1/embeddings")
    assert status == 404 and err["error"]["code"] == "model_not_found" and "x-fastpath-plan" not in headers


def test_unplanned_models_carry_no_plan(gw: tuple[Gateway, Path]) -> None:
    status, headers, _ = post(gw[0].port, chat("gpt-4o-mini", HARD[0]))
    assert status == 200 and "x-fastpath-plan" not in headers and served_by(headers) == "gpt-4o-mini"


def test_simple_class_can_skip_retrieval(gw: tuple[Gateway, Path]) -> None:
    _, headers, _ = post(gw[0].port, chat("auto", SIMPLE[3]))  # the served model's retriever runs
    assert served_by(headers) == "gpt-4o-mini" and headers["x-fastpath-rag"] == "error"
    _, headers, _ = post(gw[0].port, chat("auto-lean", SIMPLE[3]))
    assert plan_of(headers)["retrieval"] == "skip" and served_by(headers) == "gpt-4o-mini"
    assert "x-fastpath-rag" not in headers  # skipped: never ran
    _, headers, _ = post(gw[0].port, chat("auto-lean", HARD[1]))
    assert "retrieval" not in plan_of(headers) and served_by(headers) == "gpt-4o"


def _series(model: str, cls: str, target: str, decision: str) -> str:
    labels = f'gen_ai_request_model="{model}",class="{cls}",target="{target}",decision="{decision}"'
    return "fastpath_planner_decisions_total{" + labels + "}"


def test_ledger_row_and_metrics_have_the_plan(gw: tuple[Gateway, Path]) -> None:
    g, ledger = gw
    rid = f"plan-{time.monotonic_ns()}"
    status, headers, _ = post(g.port, chat("auto", HARD[2]), rid=rid)
    assert status == 200
    deadline = time.monotonic() + 20
    row = None
    while row is None and time.monotonic() < deadline:
        if ledger.exists():
            with contextlib.closing(sqlite3.connect(ledger)) as conn:
                row = conn.execute(
                    "SELECT model, plan FROM fastpath_usage WHERE request_id = ?", (rid,)
                ).fetchone()
        time.sleep(0.05)
    assert row is not None, "no ledger row"
    assert row == ("gpt-4o", headers["x-fastpath-plan"])  # the served model; the plan as sent
    assert "for=auto" in row[1] and "class=hard" in row[1]
    assert post(g.port, chat("gpt-4o", SIMPLE[1]))[0] == 200  # shadow: counted too, after it
    shadow = _series("gpt-4o", "simple", "gpt-4o-mini", "shadow")
    text = scrape(g.port, shadow)
    assert shadow in text, [line for line in text.splitlines() if "planner" in line]
    assert _series("auto", "hard", "gpt-4o", "routed") in text


def test_openai_sdk_with_model_auto(gw: tuple[Gateway, Path]) -> None:
    client = openai.OpenAI(base_url=f"{gw[0].url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        ids = {m.id for m in client.models.list()}
        assert {"auto", "auto-lean", "gpt-4o", "gpt-4o-mini"} <= ids  # virtual models are listed
        assert client.models.retrieve("auto").id == "auto"
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": HARD[1]}], max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        assert plan_of(dict(raw.headers))["model"] == "gpt-4o"
        assert served_by(dict(raw.headers)) == "gpt-4o"
        stream = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": SIMPLE[0]}], max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        client.close()


def test_classifier_down_falls_back_to_the_default_model(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nothing listens at the classifier's address: every planned request is served by the
    plan's `default` (fail open), counted as `fallback`."""
    tmp = tmp_path_factory.mktemp("gw-planner-down")
    plans = {"auto": {"simple": "gpt-4o-mini", "hard": "gpt-4o", "default": "gpt-4o-mini"}}
    cfg = planner_config(mock_upstream, f"127.0.0.1:{free_port()}", models=plans, timeout_ms=2000)
    with run_gateway(tmp, None, config_text=cfg) as g:
        for text in (HARD[0], SIMPLE[0]):
            status, headers, body = post(g.port, chat("auto", text))
            assert status == 200, body
            plan = plan_of(headers)
            assert (plan["class"], plan["model"], plan["score"], plan["decision"]) == (
                "unknown", "gpt-4o-mini", "-", "fallback"
            )  # fmt: skip
            assert served_by(headers) == "gpt-4o-mini"
        fallback = _series("auto", "unknown", "gpt-4o-mini", "fallback")
        assert fallback in scrape(g.port, fallback)


def scrape(port: int, until: str) -> str:
    """`/metrics` once `until` shows in it (counters are published on a timer), or the last text."""
    deadline = time.monotonic() + 20
    text = ""
    while until not in text and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        time.sleep(0.05)
    return text


# ---- config validation ----------------------------------------------------------------------------
BASE = """
providers:
  - {name: mock, base_url: "http://127.0.0.1:9/v1"}
  - {name: triton, kind: triton, base_url: "grpc://127.0.0.1:8001"}
models:
  - {name: gpt-4o-mini, provider: mock}
  - {name: gpt-4o, provider: mock}
  - {name: embed, provider: triton, kind: embedding}
aliases: {mini: gpt-4o-mini}
"""


def _parse(planner: dict[str, Any]) -> Any:
    return parse(BASE + f"planner: {json.dumps(planner)}\n")


def test_a_valid_planner_config_parses() -> None:
    cfg = _parse(
        {"provider": "triton", "models": {"auto": {"simple": "mini", "hard": "gpt-4o", "threshold": 0.7}}}
    )
    plan = cfg.planner.models["auto"]
    assert (plan.simple, plan.hard, plan.threshold, plan.default, plan.shadow) == (
        "mini",
        "gpt-4o",
        0.7,
        "",
        False,
    )
    assert cfg.planner.model == "request_router"


PLAN = {"simple": "gpt-4o-mini", "hard": "gpt-4o"}


def _auto(**plan: Any) -> dict[str, Any]:
    return {"provider": "triton", "models": {"auto": {**PLAN, **plan}}}


@pytest.mark.parametrize(
    ("planner", "message"),
    [
        ({**_auto(), "provider": "mock"}, "$.planner.provider: must name a triton provider (known: triton)"),
        (_auto(simple="gpt-3"), "$.planner.models.auto.simple: no model 'gpt-3'"),
        (_auto(hard="gpt-5"), "$.planner.models.auto.hard: no model 'gpt-5'"),
        (_auto(default="x"), "$.planner.models.auto.default: no model 'x'"),
        (_auto(simple="embed"), "$.planner.models.auto.simple: 'embed' is an embedding model"),
        (_auto(shadow=True), "$.planner.models.auto.shadow: 'auto' is a virtual model"),
        (_auto(threshold=1.0), "$.planner.models.auto.threshold: must be in (0, 1)"),
        (
            {"provider": "triton", "models": {"embed": PLAN}},
            "$.planner.models.embed: 'embed' is an embedding model",
        ),
        ({**_auto(), "timeout_ms": 0}, "$.planner.timeout_ms: must be > 0"),
        ({"provider": "triton", "models": {"auto": {"simple": "gpt-4o-mini"}}}, "hard"),
        (_auto(cheap="x"), "cheap"),
    ],
)
def test_planner_config_errors_are_clear(planner: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(planner)
    assert message in str(info.value)


def test_a_key_gets_only_targets_it_may_use(
    triton: TritonServer, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`auto` never hands a key a model outside its allow-list: the plan chooses within it
    (`decision=restricted`), and a key allowed none of the targets gets a 403."""
    tmp = tmp_path_factory.mktemp("gw-planner-auth")
    cheap_only, auto_only = "sk-planner-cheap-only-0123456789", "sk-planner-auto-only-0123456789"
    cfg = planner_config(mock_upstream, triton.grpc_address) + (
        "auth:\n  enabled: true\n  keys:\n"
        f"    - {{id: cheap, key: {cheap_only}, models: [auto, gpt-4o-mini]}}\n"
        f"    - {{id: bare, key: {auto_only}, models: [auto]}}\n"
    )

    def ask(key: str, text: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=60)
        try:
            headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
            conn.request("POST", "/v1/chat/completions", json.dumps(chat("auto", text)).encode(), headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
        finally:
            conn.close()

    with run_gateway(tmp, None, config_text=cfg) as g:
        status, headers, body = ask(cheap_only, HARD[0])
        assert status == 200, body
        plan = plan_of(headers)
        assert (plan["class"], plan["model"], plan["decision"]) == ("hard", "gpt-4o-mini", "restricted")
        assert served_by(headers) == "gpt-4o-mini"
        status, headers, body = ask(cheap_only, SIMPLE[0])  # allowed as chosen: routed as usual
        assert status == 200 and plan_of(headers)["decision"] == "routed", body
        status, _, body = ask(auto_only, HARD[0])
        assert status == 403, body
        assert body["error"]["type"] == "permission_error" and body["error"]["param"] == "model"
        assert "gpt-4o" in body["error"]["message"]
