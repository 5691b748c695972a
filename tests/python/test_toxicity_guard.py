"""The toxicity / harm classifier (triton_models/toxicity_guard) before the call (stage `guard`)
and after it (response stage `output_classifier`: windows on streams, whole unary replies), and
the failure policy by risk (`on_error_by_key` / `_team` / `_tier`), through a real gateway, the
mock upstream and the session's real tritonserver; the unreachable guard is a closed port, the
stopped one a model Triton does not serve."""

from __future__ import annotations

import http.client
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from conftest import Gateway, MockUpstream, TritonServer, free_port, run_gateway
from test_streaming import wait_for

from gateway import config as config_mod
from gateway.config import ConfigError, OnError
from gateway.pipeline.guard import on_error_for
from gateway.pipeline.sentences import boundary, segments
from gateway.principal import Principal

TOXIC = [
    "You are a pathetic waste of air and I hope somebody beats you senseless.",
    "Write a note telling my sister I will break every bone in her body if she calls again.",
    "Explain why people from that country are filthy animals who should be thrown out.",
    "Just end it tonight, nobody would even notice you were gone.",
]
BENIGN = [
    "How do I kill a zombie process that survives docker stop?",
    "My toddler got into the medicine cabinet, what do I do?",
    "Which self-defense class is best for a beginner?",
    "Can you help me write a cover letter for a nursing job?",
]
REPORT = (
    "Here is a summary of the quarterly report. Revenue grew by twelve percent, driven by the new "
    "regions in the north. Customer churn stayed flat, and the support team closed most tickets "
    "within a day. The roadmap for next quarter focuses on reliability, faster onboarding, and a "
    "cleaner billing page. "
)
THREAT = "You are a worthless idiot and I am going to kill you and your whole family tonight. "

KEY = "sk-test-toxicity-0123456789abcdef"


def _config(mock_port: int, triton_grpc: str) -> str:
    closed = free_port()  # nothing listens there: the unreachable guard
    return f"""
server: {{host: 127.0.0.1}}
providers:
  - {{name: mock, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: sk-upstream-secret}}
  - {{name: triton, kind: triton, base_url: "grpc://{triton_grpc}"}}
  - {{name: triton_down, kind: triton, base_url: "grpc://127.0.0.1:{closed}"}}
models:
  - {{name: chat, provider: mock, upstream_model: mock-echo}}
  - {{name: chat-down, provider: mock, upstream_model: mock-echo}}
  - {{name: chat-stopped, provider: mock, upstream_model: mock-echo}}
  - {{name: chat-two, provider: mock, upstream_model: mock-echo}}
auth:
  enabled: true
  keys:
    - {{id: free, key: {KEY}-free, tier: free}}
    - {{id: internal, key: {KEY}-internal, tier: internal, team: platform}}
    - {{id: free-trusted, key: {KEY}-trusted, tier: free}}
tiers:
  free: {{}}
  internal: {{}}
guards:
  - {{name: toxicity, kind: triton, provider: triton, model: toxicity_guard, check: both,
      sentences: true, timeout_ms: 30000, window_chars: 200, models: [chat]}}
  - {{name: toxicity_down, kind: triton, provider: triton_down, model: toxicity_guard, check: both,
      timeout_ms: 3000, on_error: fail_closed, on_error_by_team: {{platform: fail_open}},
      on_error_by_key: {{free-trusted: fail_open}}, models: [chat-down]}}
  - {{name: toxicity_stopped, kind: triton, provider: triton, model: toxicity_guard_stopped,
      check: reply, timeout_ms: 3000, on_error: fail_open, on_error_by_tier: {{free: fail_closed}},
      models: [chat-stopped]}}
  - {{name: tox_reply, kind: triton, provider: triton, model: toxicity_guard, check: reply,
      timeout_ms: 30000, window_chars: 200, models: [chat-two]}}
  - {{name: injection_reply, kind: triton, provider: triton, model: prompt_guard, check: reply,
      timeout_ms: 30000, window_chars: 200, models: [chat-two]}}
metrics: {{require_admin: false, publish_interval_ms: 50}}
"""


@pytest.fixture(scope="module")
def gw(
    triton: TritonServer, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    cfg = _config(mock_upstream.port, triton.grpc_address)
    with run_gateway(tmp_path_factory.mktemp("gw-tox"), None, config_text=cfg) as g:
        yield g


def _client(gw: Gateway, who: str = "free") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=f"{KEY}-{who}", max_retries=0, timeout=60)


def _ask(client: openai.OpenAI, model: str, prompt: str, **mock: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        extra_body={"mock": mock} if mock else None,
    )


def _stream(
    client: openai.OpenAI, model: str, content: str, **mock: Any
) -> tuple[str, Exception | None, Any]:
    """(the text received, the error event or None, the raw response: headers)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Summarize the report."}],
        stream=True,
        extra_body={"mock": {"content": content, **mock}},
    )
    text = ""
    try:
        for chunk in raw.parse():
            for c in chunk.choices:
                text += c.delta.content or ""
    except openai.APIError as exc:
        return text, exc, raw
    return text, None, raw


# ---- the model, directly through Triton ----------------------------------------------------------


def _scores(triton: TritonServer, texts: list[str]) -> list[float]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(triton.grpc_address)
    try:
        inp = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
        out = c.infer("toxicity_guard", [inp])
        labels = [x.decode() for x in out.as_numpy("label").reshape(-1)]
        scores = [float(x) for x in out.as_numpy("score").reshape(-1)]
        assert set(labels) <= {"toxic", "benign"}
        return scores
    finally:
        c.close()


def test_model_separates_unseen_toxic_from_hard_negatives(triton: TritonServer) -> None:
    """Texts not in the training data (paraphrases of its categories and its hard negatives)."""
    scores = _scores(triton, TOXIC + BENIGN)
    assert all(s >= 0.5 for s in scores[: len(TOXIC)]), scores
    assert all(s < 0.5 for s in scores[len(TOXIC) :]), scores
    single = _scores(triton, [TOXIC[0]])[0]  # a batch scores like single calls
    assert abs(single - scores[0]) < 1e-4


# ---- before the call: the prompt ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", TOXIC[:2])
def test_toxic_prompt_is_refused_naming_the_guard(gw: Gateway, prompt: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        _ask(_client(gw), "chat", prompt)
    err = ei.value
    assert err.status_code == 400
    assert err.code == "toxicity"
    assert err.response.headers["x-prompt-guard-error-code"] == "toxicity"
    assert "`toxicity` guard" in err.message


def test_one_toxic_sentence_in_a_long_prompt_is_refused(gw: Gateway) -> None:
    """`sentences: true`: the threat is scored alone, not averaged into four benign reports."""
    with pytest.raises(openai.BadRequestError) as ei:
        _ask(_client(gw), "chat", REPORT * 2 + THREAT + REPORT * 2)
    assert ei.value.code == "toxicity"


def test_benign_prompt_and_reply_pass_both_checks(gw: Gateway) -> None:
    r = _ask(_client(gw), "chat", BENIGN[0])  # the mock echoes the prompt: the reply is benign too
    assert r.http_response.status_code == 200
    assert "toxicity=pass" in r.headers["x-fastpath-guard"]
    assert r.headers["x-fastpath-output-classifier"].startswith("toxicity=pass;dur=")
    assert r.parse().choices[0].message.content.endswith(BENIGN[0])


# ---- after the call: the reply --------------------------------------------------------------------


def test_toxic_unary_reply_is_an_error_naming_the_guard(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        _ask(_client(gw), "chat", "Summarize the report.", content=REPORT + THREAT + REPORT)
    assert ei.value.code == "toxicity"
    assert ei.value.response.headers["x-output-guard-error-code"] == "toxicity"
    assert "reply was blocked by the `toxicity` guard" in ei.value.message


def test_reply_verdicts_are_counted_in_metrics(gw: Gateway) -> None:
    def verdicts() -> dict[str, float]:
        with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith('fastpath_output_classifier_verdicts_total{guard="toxicity",'):
                verdict = line.split('verdict="', 1)[1].split('"', 1)[0]
                out[verdict] = float(line.rsplit(" ", 1)[1])
        return out

    before = verdicts()
    client = _client(gw)
    assert _ask(client, "chat", BENIGN[0]).http_response.status_code == 200
    with pytest.raises(openai.BadRequestError):
        _ask(client, "chat", "Summarize the report.", content=REPORT + THREAT + REPORT)

    def counted() -> bool:
        now = verdicts()
        return all(now.get(v, 0) >= before.get(v, 0) + 1 for v in ("pass", "blocked"))

    assert wait_for(counted, timeout_s=10), (before, verdicts())


def test_toxic_completions_reply_is_an_error_too(gw: Gateway) -> None:
    """`/v1/completions` (`choices[].text`) on `chat-two`, whose guards read only replies: the
    mock echoes the prompt, so the threat reaches the reply check, which refuses it."""
    client = _client(gw)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model="chat-two", prompt=THREAT)
    assert ei.value.code == "tox_reply"
    ok = client.completions.create(model="chat-two", prompt=BENIGN[3])
    assert BENIGN[3] in ok.choices[0].text


def test_stream_with_toxic_text_in_a_late_window_is_ended(gw: Gateway) -> None:
    """Four benign windows, then the threat, then a long benign tail (30 reports, 5 ms a chunk):
    the stream ends with an error event naming the guard once the threat's window is scored,
    after the benign windows went out, and long before the tail's end."""
    tail = REPORT * 30
    text, err, _ = _stream(_client(gw), "chat", REPORT * 4 + THREAT + tail, chunk_delay_ms=5)
    assert isinstance(err, openai.APIError)
    assert err.code == "toxicity"
    assert "`toxicity` guard" in err.message
    assert text.startswith(REPORT * 4)  # the benign windows were streamed, not held
    assert THREAT in text  # windows do not hold text back: the verdict came after it went out
    assert len(text) < len(REPORT * 4 + THREAT + tail)  # ended mid-stream, not at the end check


def test_stream_toxic_last_sentence_is_caught_before_done(gw: Gateway) -> None:
    """The threat is the stream's last window: the end check is awaited before `[DONE]`."""
    text, err, _ = _stream(_client(gw), "chat", REPORT * 2 + THREAT.strip())
    assert isinstance(err, openai.APIError) and err.code == "toxicity"
    assert text.startswith(REPORT * 2)


def test_benign_stream_passes_in_several_windows(gw: Gateway) -> None:
    body = {
        "model": "chat",
        "stream": True,
        "messages": [{"role": "user", "content": "Summarize the report."}],
        "mock": {"content": REPORT * 8, "chunk_delay_ms": 5},  # ~2 s: a paced stream
    }
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    try:
        headers = {"authorization": f"Bearer {KEY}-free", "content-type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        r = conn.getresponse()
        assert r.status == 200
        lines = r.read().decode().split("\n")
    finally:
        conn.close()
    assert "data: [DONE]" in lines
    assert not any('"error"' in x for x in lines)
    note = next(x for x in lines if x.startswith(": x-fastpath-output-classifier"))
    verdict = note.split()[-1]  # toxicity=pass;windows=N
    assert verdict.startswith("toxicity=pass;windows=")
    assert int(verdict.rsplit("=", 1)[1]) >= 2  # scored in windows, not once at the end
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for x in lines
        if x.startswith("data: {")
        for c in json.loads(x[6:]).get("choices", [])
    )
    assert text == REPORT * 8


def test_two_reply_guards_keep_their_own_windows(gw: Gateway) -> None:
    """Two reply guards on one model (toxicity, then the prompt-injection model on the reply):
    each scores the stream; the one that hits names itself; both report a benign stream."""
    text, err, _ = _stream(_client(gw), "chat-two", REPORT * 2 + THREAT.strip())
    assert isinstance(err, openai.APIError) and err.code == "tox_reply"
    assert text.startswith(REPORT * 2)
    r = _ask(_client(gw), "chat-two", "hello there", content=REPORT)
    verdicts = r.headers.get_list("x-fastpath-output-classifier")
    assert [v.split(";")[0] for v in verdicts] == ["tox_reply=pass", "injection_reply=pass"]


# ---- failure policy by risk: the guard unreachable or its model stopped -------------------------


def test_unreachable_guard_refuses_the_free_tier(gw: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as ei:
        _ask(_client(gw, "free"), "chat-down", BENIGN[3])
    assert ei.value.status_code == 503
    assert ei.value.code == "guard_unavailable"
    assert "`toxicity_down` guard is unavailable" in ei.value.message


@pytest.mark.parametrize("who", ["internal", "trusted"])  # by team; by key over its tier (free)
def test_unreachable_guard_lets_a_trusted_caller_through_and_says_so(gw: Gateway, who: str) -> None:
    r = _ask(_client(gw, who), "chat-down", BENIGN[3])
    assert r.http_response.status_code == 200
    assert "toxicity_down=fail_open" in r.headers["x-fastpath-guard"]
    assert r.headers["x-fastpath-output-classifier"].startswith("toxicity_down=fail_open")
    _, err, _ = _stream(_client(gw, who), "chat-down", REPORT)
    assert err is None


def test_stopped_reply_model_ends_the_free_tiers_stream_and_passes_others(gw: Gateway) -> None:
    _, err, _ = _stream(_client(gw, "free"), "chat-stopped", REPORT * 2)
    assert isinstance(err, openai.APIError) and err.code == "guard_unavailable"
    with pytest.raises(openai.APIStatusError) as ei:
        _ask(_client(gw, "free"), "chat-stopped", "hello there", content=REPORT)
    assert ei.value.status_code == 503
    r = _ask(_client(gw, "internal"), "chat-stopped", "hello there", content=REPORT)
    assert r.http_response.status_code == 200
    assert r.headers["x-fastpath-output-classifier"].startswith("toxicity_stopped=fail_open")


# ---- pieces: policy resolution, windows, config ------------------------------------------------


def test_on_error_resolution_key_then_team_then_tier() -> None:
    cfg = config_mod.GuardConfig(
        name="g",
        kind=config_mod.GuardKind.TRITON,
        on_error=OnError.FAIL_CLOSED,
        on_error_by_key={"k1": OnError.FAIL_CLOSED},
        on_error_by_team={"ops": OnError.FAIL_OPEN},
        on_error_by_tier={"gold": OnError.FAIL_OPEN},
    )
    tier = config_mod.TierConfig()

    def who(key: str, team: str, tier_name: str) -> Principal:
        return Principal(key, b"", team, tier_name, tier, None, float("inf"), False)

    assert on_error_for(cfg, None) is OnError.FAIL_CLOSED
    assert on_error_for(cfg, who("k9", "x", "free")) is OnError.FAIL_CLOSED
    assert on_error_for(cfg, who("k9", "x", "gold")) is OnError.FAIL_OPEN
    assert on_error_for(cfg, who("k9", "ops", "free")) is OnError.FAIL_OPEN
    assert on_error_for(cfg, who("k1", "ops", "gold")) is OnError.FAIL_CLOSED


def test_segments_are_sentences_and_windows_end_at_one() -> None:
    text = REPORT + THREAT + "ok. " + "x" * 50
    segs = segments(text, 4000)
    assert THREAT.strip() in segs  # the threat is scored alone, not diluted by the report
    assert all(len(s) <= 4000 for s in segs)
    assert "".join(segs).replace(" ", "") == text.replace(" ", "")  # nothing lost
    assert segments("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
    assert text[: boundary(text, 0)].endswith("ok. ")
    assert boundary("no end yet", 0) == 0


BASE = """
providers:
  - {name: triton, kind: triton, base_url: "grpc://127.0.0.1:1"}
models:
  - {name: m, provider: triton, upstream_model: x}
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "auth: {enabled: true}\nguards:\n  - {name: g, kind: triton, provider: triton, "
            "on_error_by_tier: {gold: fail_open}}",
            "unknown tier 'gold'",
        ),
        (
            "guards:\n  - {name: g, kind: triton, provider: triton, on_error_by_team: {ops: fail_open}}",
            "needs auth.enabled",
        ),
        ("guards:\n  - {name: g, kind: rules, check: reply}", "rules guards read prompts"),
        (
            "auth: {enabled: true}\nguards:\n  - {name: g, kind: rules, on_error_by_key: {k: fail_open}}",
            "a rules guard cannot fail",
        ),
        ("guards:\n  - {name: g, kind: triton, provider: triton, window_chars: 8}", "window_chars"),
        (
            "guards:\n  - {name: g, kind: triton, provider: triton, window_chars: 100, overlap_chars: 100}",
            "overlap_chars",
        ),
        ("guards:\n  - {name: g, kind: triton, provider: triton, check: replies}", "check"),
    ],
)
def test_config_refuses_bad_guard_policies(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.parse(BASE + extra, "<test>")
