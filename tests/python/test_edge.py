"""Edge hygiene on real gateways: the security response headers on every kind of reply, and the
client address behind trusted proxies (X-Forwarded-For / Forwarded) as the access log records it."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, _env, free_port, gateway_config, run_gateway, stop, wait_http
from test_pipeline_contract import chat

from gateway.config import ConfigError, ForwardedHeader, ServerConfig, parse
from gateway.edge import ClientResolver, security_headers
from gateway.signing import Signer, verify

SECURITY = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        raw = None if body is None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, raw, hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def every_reply(port: int) -> dict[str, tuple[int, dict[str, str]]]:
    """One request of each kind of reply: JSON, SSE, errors (gateway, upstream), plain routes."""
    out = {}
    for name, method, path, body in (
        ("healthz", "GET", "/healthz", None),
        ("models", "GET", "/v1/models", None),
        ("readyz", "GET", "/readyz", None),
        ("not_found", "GET", "/nope", None),
        ("method", "GET", "/v1/chat/completions", None),
        ("usage_admin", "GET", "/v1/usage", None),
        ("json", "POST", "/v1/chat/completions", chat()),
        ("sse", "POST", "/v1/chat/completions", chat(stream=True)),
        ("upstream_error", "POST", "/v1/chat/completions", chat(mock={"status": 500})),
        ("bad_json", "POST", "/v1/chat/completions", "not an object"),
    ):
        status, headers, _ = call(port, method, path, body)
        out[name] = (status, headers)
    return out


def test_security_headers_on_every_reply(gateway: Gateway) -> None:
    replies = every_reply(gateway.port)
    assert replies["json"][0] == 200 and replies["sse"][0] == 200
    assert replies["sse"][1]["content-type"].startswith("text/event-stream")
    assert {s for s, _ in replies.values()} >= {200, 404, 405, 502}
    for name, (_, headers) in replies.items():
        for k, v in SECURITY.items():
            assert headers.get(k) == v, (name, k, headers)
        assert "strict-transport-security" not in headers, name  # not configured: no TLS known


def test_security_headers_off_and_hsts(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    with run_gateway(tmp_path, mock_upstream, security_headers="{enabled: false}") as gw:
        for name, (_, headers) in every_reply(gw.port).items():
            assert not set(SECURITY) & set(headers), name
    hsts = "{hsts_max_age_s: 31536000, hsts_include_subdomains: true}"
    with run_gateway(tmp_path, mock_upstream, security_headers=hsts) as gw:
        for name, (_, headers) in every_reply(gw.port).items():
            assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains", name
            assert headers["x-frame-options"] == "DENY", name


def access_config(upstream: MockUpstream, log_path: Path, **server: object) -> str:
    return gateway_config(upstream.port, **server) + (
        f'access_log: {{enabled: true, path: "{log_path}", flush_interval_ms: 50}}\n'
    )


def logged(log_path: Path, ids: set[str], timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        by_id = {r["request_id"]: r for r in map(json.loads, lines)}
        if ids <= set(by_id) or time.monotonic() > deadline:
            return by_id
        time.sleep(0.05)


def test_client_behind_trusted_proxies(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    sent = {
        "xff": {"x-forwarded-for": "203.0.113.7"},
        # a client-sent first hop, then the proxies' own: the rightmost untrusted one wins
        "chain": {"x-forwarded-for": "198.51.100.1, 203.0.113.9, 10.1.2.3"},
        "none": {},
        "garbage": {"x-forwarded-for": "not-an-ip, 10.0.0.8"},
        "forwarded_ignored": {"forwarded": "for=192.0.2.1"},
    }
    log_path = tmp_path / "trusted.log"
    text = access_config(mock_upstream, log_path, trusted_proxies='["127.0.0.1/32", "10.0.0.0/8"]')
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        for name, headers in sent.items():
            status, _, _ = call(
                gw.port, "POST", "/v1/chat/completions", chat(), {**headers, "x-request-id": f"{name}-{run}"}
            )
            assert status == 200
        # a refusal before the pipeline (415) is logged with the resolved client too
        status, _, _ = call(
            gw.port,
            "POST",
            "/v1/chat/completions",
            chat(),
            {
                "content-type": "text/plain",
                "x-forwarded-for": "203.0.113.50",
                "x-request-id": f"refused-{run}",
            },
        )
        assert status == 415
        ids = {f"{n}-{run}" for n in [*sent, "refused"]}
        seen = logged(log_path, ids)
    client = {n: seen[f"{n}-{run}"]["client"] for n in [*sent, "refused"]}
    assert client["xff"] == "203.0.113.7"
    assert client["chain"] == "203.0.113.9"
    assert client["none"] == "127.0.0.1"  # a trusted peer that forwarded nothing: itself
    assert client["garbage"] == "10.0.0.8"  # the walk stops at the last trusted hop
    assert client["forwarded_ignored"] == "127.0.0.1"  # not the configured header
    assert client["refused"] == "203.0.113.50"

    # the same headers from an untrusted peer are ignored: the socket peer is the client
    log_path = tmp_path / "untrusted.log"
    text = access_config(mock_upstream, log_path, trusted_proxies='["10.0.0.0/8"]')
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        rid = f"spoof-{run}"
        call(
            gw.port,
            "POST",
            "/v1/chat/completions",
            chat(),
            {"x-forwarded-for": "203.0.113.7", "x-request-id": rid},
        )
        seen = logged(log_path, {rid})
    assert seen[rid]["client"].startswith("127.0.0.1:")


class Headers:
    """granian's RSGIHeaders' shape: `get_all` for repeated headers."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k == name]


def test_resolver_parsing() -> None:
    xff = ClientResolver(ServerConfig(trusted_proxies=["127.0.0.0/8", "2001:db8::/32"]))
    assert xff("8.8.8.8:1234", Headers([("x-forwarded-for", "1.1.1.1")])) == "8.8.8.8:1234"
    assert xff("127.0.0.1:9", Headers([("x-forwarded-for", "1.1.1.1, 2.2.2.2")])) == "2.2.2.2"
    repeated = Headers([("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2:443, 127.0.0.5")])
    assert xff("127.0.0.1:9", repeated) == "2.2.2.2"
    assert xff("[2001:db8::1]:9", Headers([("x-forwarded-for", "[2001:4860::8888]:80")])) == "2001:4860::8888"
    assert xff("[::ffff:127.0.0.1]:9", Headers([("x-forwarded-for", "9.9.9.9")])) == "9.9.9.9"
    assert xff("127.0.0.1:9", Headers([("x-forwarded-for", "127.0.0.2, 127.0.0.3")])) == "127.0.0.2"
    fwd = ClientResolver(
        ServerConfig(trusted_proxies=["127.0.0.0/8"], forwarded_header=ForwardedHeader.FORWARDED)
    )
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"'
    assert fwd("127.0.0.1:9", Headers([("forwarded", value)])) == "2001:db8:cafe::17"
    assert fwd("127.0.0.1:9", Headers([("forwarded", "for=_hidden, for=127.0.0.9")])) == "127.0.0.9"
    assert fwd("127.0.0.1:9", Headers([("x-forwarded-for", "1.1.1.1")])) == "127.0.0.1"


def test_edge_config_validation() -> None:
    base = "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
    for server, where in (
        ("{trusted_proxies: [10.0.0.0/33]}", "trusted_proxies[0]"),
        ("{trusted_proxies: [10.0.0.1/8]}", "trusted_proxies[0]"),
        ("{security_headers: {hsts_max_age_s: -1}}", "hsts_max_age_s"),
        ("{forwarded_header: x-real-ip}", "forwarded_header"),
    ):
        with pytest.raises(ConfigError, match=re.escape(where)):
            parse(base + f"server: {server}\n")
    cfg = parse(
        base
        + "server: {trusted_proxies: ['10.0.0.0/8', '::1/128'], security_headers: {hsts_max_age_s: 60}}\n"
    )
    assert dict(security_headers(cfg.server))["strict-transport-security"] == "max-age=60"


# ---- request signing of upstream calls (gateway.signing), verified by the mock upstream --------
SIGNING_SECRET = "signing-secret-0123456789abcdef"


@contextlib.contextmanager
def signing_mock(secret: str = SIGNING_SECRET) -> Iterator[MockUpstream]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.dev.openai_mock", "--port", str(port), "--verify-signing", secret]
    proc = subprocess.Popen(cmd, env=_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        yield MockUpstream(port, proc)
    finally:
        stop(proc)


def signed_config(upstream: MockUpstream, secret: str | None) -> str:
    text = gateway_config(upstream.port)
    if secret is None:
        return text
    line = "    api_key: ${MOCK_UPSTREAM_KEY:-sk-upstream-secret}\n"
    signing = f"    signing: {{kind: hmac-sha256, key_id: gw-1, secret: '{secret}'}}\n"
    assert line in text
    return text.replace(line, line + signing)


def test_signed_upstream_calls(tmp_path: Path) -> None:
    with signing_mock() as mock:
        with run_gateway(tmp_path, mock, config_text=signed_config(mock, SIGNING_SECRET)) as gw:
            status, _, body = call(gw.port, "POST", "/v1/chat/completions", chat())
            assert status == 200, body
            status, _, raw = call(gw.port, "POST", "/v1/chat/completions", chat(stream=True))
            assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
            status, _, body = call(gw.port, "GET", "/readyz")  # the probe's GET /v1/models is signed too
            assert status == 200, body
            sent = [
                e for e in mock.events() if e["event"] == "request" and e["path"] == "/v1/chat/completions"
            ]
            sig = sent[-1]["headers"]["x-fastpath-signature"]
            assert re.fullmatch(r"t=\d+,kid=gw-1,sig=[0-9a-f]{64}", sig), sig
        mock.clear()
        for secret, why in ((None, "missing signature"), ("another-secret-0123456789", "bad signature")):
            with run_gateway(tmp_path, mock, config_text=signed_config(mock, secret)) as gw:
                status, _, body = call(gw.port, "POST", "/v1/chat/completions", chat())
                assert status >= 400, body
            rejected = [e for e in mock.events() if e["event"] == "signature_rejected"]
            assert rejected and rejected[-1]["reason"] == why
        # a stale signature (well signed, 10 minutes old), sent straight to the mock
        body = json.dumps(chat("mock-echo")).encode()
        line = Signer("gw-1", SIGNING_SECRET).line(
            "POST", "/v1/chat/completions", body, now=time.time() - 600
        )
        name, _, value = line.decode().strip().partition(": ")
        conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", name: value})
        resp = conn.getresponse()
        assert resp.status == 401 and b"stale signature" in resp.read()
        conn.close()


def test_signature_roundtrip() -> None:
    line = Signer("k1", "s" * 16, "x-sig").line("POST", "/v1/x", b"{}", now=1_700_000_000)
    name, _, value = line.decode().rstrip("\r\n").partition(": ")
    assert name == "x-sig" and value.startswith("t=1700000000,kid=k1,sig=")
    ok = {"secret": "s" * 16, "method": "POST", "path": "/v1/x", "body": b"{}", "now": 1_700_000_100}
    assert verify(value, **ok) is None
    assert verify(value, **{**ok, "body": b"{ }"}) == "bad signature"
    assert verify(value, **{**ok, "path": "/v1/y"}) == "bad signature"
    assert verify(value, **{**ok, "now": 1_700_000_400}) == "stale signature"
    assert verify("t=1,sig=", **ok) == "malformed signature"
    assert verify(None, **ok) == "missing signature"
