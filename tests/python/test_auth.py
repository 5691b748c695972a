"""Stage `auth` over real sockets: API keys from the config (plaintext from the environment or
salted hashes), refused with the right status and OpenAI error type, and never logged."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway

from gateway import config as config_mod

ALICE = "sk-test-alice-0123456789abcdef"
BOB = "sk-test-bob-0123456789abcdef"
DISABLED = "sk-test-disabled-0123456789"
EXPIRED = "sk-test-expired-01234567890"
HASHED = "sk-test-hashed-0123456789ab"
SALT = "salt-for-tests-0123456789"


def auth_config(upstream_port: int, extra: str) -> str:
    """The standard test config plus an `auth` / `tiers` / `limits` section (YAML text)."""
    return gateway_config(upstream_port) + extra


def post(
    port: int,
    body: dict[str, Any],
    key: str | None = None,
    header: str = "authorization",
    path: str = "/v1/chat/completions",
    extra_headers: dict[str, str] | None = None,
    timeout: float = 20,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"content-type": "application/json"} | (extra_headers or {})
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw)
    finally:
        conn.close()


def chat(model: str = "echo", text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


AUTH_YAML = f"""
auth:
  enabled: true
  salt: {SALT}
  keys:
    - id: alice
      key: ${{TEST_ALICE_KEY}}
      team: research
      tier: pro
    - id: bob
      key: {BOB}
      team: apps
      models: [echo]
    - id: disabled
      key: {DISABLED}
      disabled: true
    - id: expired
      key: {EXPIRED}
      expires_at: 2001-01-01T00:00:00Z
    - id: hashed
      key_hash: {config_mod.hash_key(SALT, HASHED)}
tiers:
  default: {{}}
  pro: {{rpm: 1000, tpm: 1000000}}
"""


@pytest.fixture(scope="module")
def auth_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("authlog") / "gateway.log"


@pytest.fixture(scope="module")
def auth_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory, auth_log: Path
) -> Iterator[Gateway]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_ALICE_KEY", ALICE)
    try:
        with (
            auth_log.open("wb") as log,
            run_gateway(
                tmp_path_factory.mktemp("auth"),
                mock_upstream,
                config_text=auth_config(mock_upstream.port, AUTH_YAML),
                log_level="debug",
                output=log,
            ) as g,
        ):
            yield g
    finally:
        mp.undo()


def _assert_error(status: int, body: dict[str, Any], want_status: int, want_type: str) -> None:
    assert status == want_status, body
    assert body["error"]["type"] == want_type
    assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("key", "header"),
    [
        (None, "authorization"),
        ("sk-wrong-key-000000000000000", "authorization"),
        ("sk-wrong-key-000000000000000", "x-api-key"),
        (ALICE[:-1], "authorization"),  # a prefix of a real key
        (DISABLED, "authorization"),
        (EXPIRED, "authorization"),
        ("", "authorization"),
    ],
    ids=["missing", "wrong", "wrong-x-api-key", "truncated", "disabled", "expired", "empty"],
)
def test_refused_keys_get_401(auth_gateway: Gateway, key: str | None, header: str) -> None:
    status, headers, body = post(auth_gateway.port, chat(), key, header)
    _assert_error(status, body, 401, "authentication_error")
    assert headers["x-request-id"]
    assert not any(h.startswith("x-ratelimit-") for h in headers)


def test_disabled_and_expired_keys_say_why(auth_gateway: Gateway) -> None:
    assert "disabled" in post(auth_gateway.port, chat(), DISABLED)[2]["error"]["message"]
    assert "expired" in post(auth_gateway.port, chat(), EXPIRED)[2]["error"]["message"]


def test_other_authorization_schemes_are_refused(auth_gateway: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", auth_gateway.port, timeout=20)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat()).encode(),
            {"content-type": "application/json", "authorization": f"Basic {ALICE}"},
        )
        resp = conn.getresponse()
        _assert_error(resp.status, json.loads(resp.read()), 401, "authentication_error")
    finally:
        conn.close()


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_right_key_is_served_with_ratelimit_headers(auth_gateway: Gateway, header: str) -> None:
    status, headers, body = post(auth_gateway.port, chat(text="hi there"), ALICE, header)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "You said: hi there"
    assert headers["x-ratelimit-limit-requests"] == "1000"
    assert headers["x-ratelimit-limit-tokens"] == "1000000"
    assert int(headers["x-ratelimit-remaining-requests"]) < 1000
    # settled before the reply: the 4096-token default reservation is back, only real use is gone
    assert 1_000_000 - 100 <= int(headers["x-ratelimit-remaining-tokens"]) <= 1_000_000
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert headers["x-ratelimit-reset-tokens"].endswith("s")


def test_key_given_as_a_salted_hash_works(auth_gateway: Gateway) -> None:
    status, headers, body = post(auth_gateway.port, chat(), HASHED)
    assert status == 200, body
    # tier `default` has no limits: no rate-limit headers to report
    assert not any(h.startswith("x-ratelimit-") for h in headers)


def test_model_allow_list(auth_gateway: Gateway) -> None:
    status, _, body = post(auth_gateway.port, chat("slow"), BOB)
    _assert_error(status, body, 403, "permission_error")
    assert body["error"]["param"] == "model"
    assert post(auth_gateway.port, chat("echo"), BOB)[0] == 200
    assert post(auth_gateway.port, chat("slow", mock={"chunk_delay_ms": 0}), ALICE)[0] == 200


def test_completions_endpoint_needs_a_key_too(auth_gateway: Gateway) -> None:
    body = {"model": "echo", "prompt": "hello"}
    status, _, err = post(auth_gateway.port, body, path="/v1/completions")
    _assert_error(status, err, 401, "authentication_error")
    assert post(auth_gateway.port, body, ALICE, path="/v1/completions")[0] == 200


def test_unauthenticated_routes_stay_open(auth_gateway: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", auth_gateway.port, timeout=20)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
    finally:
        conn.close()


def test_secrets_never_reach_the_log(auth_gateway: Gateway, auth_log: Path) -> None:
    for key in (ALICE, BOB, DISABLED, EXPIRED, HASHED, "sk-wrong-key-000000000000000"):
        post(auth_gateway.port, chat(), key)
        post(auth_gateway.port, chat("slow"), key)
        post(auth_gateway.port, {"model": "echo"}, key)  # invalid body
    log = auth_log.read_text(errors="replace")
    assert "serving on" in log  # the log is captured: the checks below can fail
    for secret in (ALICE, BOB, DISABLED, EXPIRED, HASHED, SALT, "sk-wrong-key"):
        assert secret not in log


# ---- config -----------------------------------------------------------------------------------
def _parse(extra: str) -> config_mod.Config:
    return config_mod.parse(auth_config(9, extra))


def test_config_keeps_no_plaintext_key() -> None:
    cfg = _parse(f"auth:\n  enabled: true\n  keys:\n    - id: a\n      key: {ALICE}\n")
    assert ALICE not in repr(cfg)
    key = cfg.auth.keys[0]
    assert key.key is None
    assert key.key_hash == config_mod.hash_key(cfg.auth.salt, ALICE)
    assert len(cfg.auth.salt) >= 16  # a random per-process salt when none is configured


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("auth:\n  enabeld: true\n", "unknown field `enabeld` - at `$.auth`"),
        ("auth:\n  keys:\n    - id: a\n      key: sk-x\n      colour: red\n", "at `$.auth.keys[0]`"),
        ("auth:\n  keys:\n    - id: a\n", "$.auth.keys[0]: set exactly one of"),
        ("auth:\n  keys:\n    - id: a\n      key: short\n", "$.auth.keys[0].key: must be at least"),
        (f"auth:\n  keys:\n    - id: a\n      key_hash: {'sha256:' + '0' * 64}\n", "$.auth.salt: required"),
        (f"auth:\n  salt: {SALT}\n  keys:\n    - id: a\n      key_hash: md5:00\n", "$.auth.keys[0].key_hash"),
        (f"auth:\n  keys:\n    - id: a\n      key: {ALICE}\n      tier: gold\n", "unknown tier 'gold'"),
        (
            f"auth:\n  keys:\n    - id: a\n      key: {ALICE}\n    - id: a\n      key: {BOB}\n",
            "$.auth.keys[1].id: duplicate",
        ),
        (
            f"auth:\n  keys:\n    - id: a\n      key: {ALICE}\n    - id: b\n      key: {ALICE}\n",
            "$.auth.keys[1]: the same secret",
        ),
        (
            f"auth:\n  keys:\n    - id: a\n      key: {ALICE}\n      expires_at: 2030-01-01T00:00:00\n",
            "$.auth.keys[0].expires_at: needs a timezone",
        ),
        ("tiers:\n  free: {rpm: 0}\n", "$.tiers.free.rpm: must be > 0"),
        ("tiers:\n  free: {rps: 1}\n", "unknown field `rps` - at `$.tiers[...]`"),
        ("limits:\n  default_max_tokens: 0\n", "$.limits.default_max_tokens: must be > 0"),
    ],
)
def test_auth_config_errors_name_the_path(extra: str, message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as exc:
        _parse(extra)
    assert message in str(exc.value)
    for secret in (ALICE, BOB):
        assert secret not in str(exc.value)


def test_example_config_documents_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.delenv("FASTPATH_GATEWAY_KEY_SALT", raising=False)
    cfg = config_mod.load(Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml")
    assert not cfg.auth.enabled
    (key,) = cfg.auth.keys
    assert key.key_hash == config_mod.hash_key(cfg.auth.salt, "sk-example-key-do-not-use-0001")
    assert set(cfg.tiers) == {"default", "free", "pro"}
