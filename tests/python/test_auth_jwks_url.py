"""JWT keys from a JWKS URL (`auth.jwt.jwks_url`): a real HTTP server (http.server in a thread)
serves the key set. Fetched off the request path, refreshed on an unknown `kid` (rate limited)
and periodically, a failed fetch keeps the last good keys, and nothing is ever fetched from a
URL in the token."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from test_auth import chat, post

from gateway import config as config_mod
from gateway.pipeline.jwt_auth import JWKS_MAX_BYTES, JwtConfig, JwtRejected, JwtVerifier

ISS, AUD = "https://issuer.test", "fastpath"


class JwksServer:
    """Serves `doc` (JSON) at /jwks.json; `status`, `delay_s` and `body` override the reply;
    `hits` counts requests."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.status = 200
        self.delay_s = 0.0
        self.body: bytes | None = None
        self.location = ""
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                time.sleep(server.delay_s)
                body = server.body if server.body is not None else json.dumps(server.doc).encode()
                self.send_response(server.status)
                if server.location:
                    self.send_header("location", server.location)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                # the gateway hangs up on a too large or too slow reply: expected here
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(5)


@pytest.fixture
def server() -> Iterator[JwksServer]:
    s = JwksServer()
    try:
        yield s
    finally:
        s.stop()


class Signer:
    """A private key with its `kid` and public JWK."""

    def __init__(self, kid: str, alg: str = "RS256") -> None:
        self.kid, self.alg = kid, alg
        if alg == "RS256":
            self.key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=kid, alg=alg, use="sig")
        self.jwk: dict[str, Any] = jwk

    def token(self, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"sub": "u1", "iss": ISS, "aud": AUD, "exp": now + 600, "team": "t"}
        body.update(tier="free", models=["echo"], jti=uuid.uuid4().hex)  # a new token each time
        body.update(claims)
        return jwt.encode(body, self.key, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {
        "r1": Signer("r1"),
        "r2": Signer("r2"),
        "e1": Signer("e1", "ES256"),
        "evil": Signer("evil"),
    }


def verifier(url: str, **over: Any) -> JwtVerifier:
    fields: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "algorithms": ["RS256", "ES256"],
        "jwks_url": url,
    }
    fields.update(jwks_timeout_ms=1000)
    fields.update(over)
    return JwtVerifier(JwtConfig(**fields))


async def rejected(v: JwtVerifier, token: str) -> str:
    try:
        await v.verify_async(token)
    except JwtRejected as exc:
        return str(exc)
    raise AssertionError("the token was accepted")


# ---- the cache ------------------------------------------------------------------------------------
def test_first_fetch_rotation_on_unknown_kid_and_its_rate_limit(
    server: JwksServer, signers: dict[str, Signer]
) -> None:
    server.doc = {"keys": [signers["r1"].jwk, signers["e1"].jwk]}

    async def main() -> None:
        v = verifier(server.url)
        v.start(asyncio.get_running_loop())  # fetches in the background
        try:
            # the first tokens wait for the first fetch instead of failing
            assert (await v.verify_async(signers["r1"].token()))["sub"] == "u1"
            assert (await v.verify_async(signers["e1"].token()))["sub"] == "u1"
            assert server.hits == 1
            # the provider rotates: a token with the new kid triggers one refresh
            server.doc = {"keys": [signers["r2"].jwk]}
            assert (await v.verify_async(signers["r2"].token()))["sub"] == "u1"
            assert server.hits == 2
            assert await rejected(v, signers["r1"].token()) == "Unknown token key."  # r1 retired
            # more unknown kids within the interval: refused without another fetch
            assert await rejected(v, signers["evil"].token()) == "Unknown token key."
            assert server.hits == 2
            # a kid that is too long, or not a string: never a fetch
            too_long = Signer("x" * 300)
            assert await rejected(v, too_long.token()) == "Unknown token key."
            assert server.hits == 2
        finally:
            await asyncio.gather(*v.close(), return_exceptions=True)

    asyncio.run(main())


def test_unknown_kid_refresh_joins_one_fetch(server: JwksServer, signers: dict[str, Signer]) -> None:
    server.doc = {"keys": [signers["r1"].jwk]}
    server.delay_s = 0.3

    async def main() -> None:
        v = verifier(server.url)
        assert v.jwks is not None and v.jwks.load_now()
        server.doc = {"keys": [signers["r1"].jwk, signers["r2"].jwk]}
        results = await asyncio.gather(*(v.verify_async(signers["r2"].token()) for _ in range(20)))
        assert all(r["sub"] == "u1" for r in results)
        assert server.hits == 2  # twenty requests, one fetch

    asyncio.run(main())


def test_periodic_refresh(server: JwksServer, signers: dict[str, Signer]) -> None:
    server.doc = {"keys": [signers["r1"].jwk]}

    async def main() -> None:
        v = verifier(server.url, jwks_refresh_s=1)
        v.start(asyncio.get_running_loop())
        try:
            await v.verify_async(signers["r1"].token())
            server.doc = {"keys": [signers["r1"].jwk, signers["r2"].jwk]}
            assert v.jwks is not None
            deadline = time.monotonic() + 10
            while ("RS256", "r2") not in v.jwks.keys:  # no token asked for it: the timer did
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert server.hits >= 2
        finally:
            await asyncio.gather(*v.close(), return_exceptions=True)

    asyncio.run(main())


@pytest.mark.parametrize("failure", ["down", "500", "redirect", "garbage", "no_keys", "too_large", "slow"])
def test_a_failed_fetch_keeps_the_last_good_keys(
    server: JwksServer, signers: dict[str, Signer], failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.doc = {"keys": [signers["r1"].jwk]}
    other = JwksServer()  # where a redirect would lead: never asked
    other.doc = {"keys": [signers["evil"].jwk]}

    async def main() -> None:
        v = verifier(server.url)
        jwks = v.jwks
        assert jwks is not None and jwks.load_now()
        if failure == "down":
            server.stop()
        elif failure == "500":
            server.status = 500
        elif failure == "redirect":
            server.status, server.location = 302, other.url
        elif failure == "garbage":
            server.body = b"<html>not json</html>"
        elif failure == "no_keys":
            server.doc = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}
        elif failure == "too_large":
            server.doc = {"keys": [signers["r2"].jwk], "pad": "x" * JWKS_MAX_BYTES}
        elif failure == "slow":
            server.delay_s = 2.5  # the fetch deadline is 1 s
        started = time.monotonic()
        assert not await jwks.refresh()
        assert time.monotonic() - started < 2.5
        assert set(jwks.keys) == {("RS256", "r1")}
        assert (await v.verify_async(signers["r1"].token()))["sub"] == "u1"
        assert await rejected(v, signers["evil"].token()) == "Unknown token key."  # one more failed fetch
        assert other.hits == 0

    try:
        asyncio.run(main())
    finally:
        other.stop()
    assert "fetching the JWKS from" in caplog.text and "keeping the 1 key(s)" in caplog.text


def test_keys_are_never_taken_from_the_token(server: JwksServer, signers: dict[str, Signer]) -> None:
    attacker = JwksServer()
    attacker.doc = {"keys": [signers["evil"].jwk]}
    server.doc = {"keys": [signers["r1"].jwk]}

    async def main() -> None:
        v = verifier(server.url)
        assert v.jwks is not None and v.jwks.load_now()
        evil, r1 = signers["evil"], signers["r1"]
        for header in ("jku", "x5u"):
            # an unknown kid with a URL to the attacker's key set
            msg = await rejected(v, evil.token({header: attacker.url}))
            assert "must not name keys" in msg
            # even the right key is refused when the header names another key source
            assert "must not name keys" in await rejected(v, r1.token({header: attacker.url}))
        assert "must not name keys" in await rejected(v, evil.token({"jwk": evil.jwk}))
        # kid tricks: an HS256 token "for" the RS256 kid, a kid that looks like a path
        hs = jwt.encode(
            {"sub": "u1", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 60}, "k" * 40, "HS256"
        )
        assert await rejected(v, hs) == "Token algorithm not allowed."
        assert await rejected(v, Signer("../../../dev/null").token()) == "Unknown token key."
        assert await rejected(v, r1.token(exp=None)) == "Invalid token."  # exp is always required
        assert attacker.hits == 0
        assert server.hits == 2  # the load, then one unknown-kid refresh (rate limited after)

    try:
        asyncio.run(main())
    finally:
        attacker.stop()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"jwks_url": "http://idp.example.com/jwks.json"}, r"jwks_url: must be an https:// URL"),
        ({"jwks_url": "ftp://127.0.0.1/jwks.json"}, r"jwks_url: must be an https:// URL"),
        ({"jwks_url": "https://u:p@idp.example.com/jwks"}, r"jwks_url: must not have user info"),
        ({"jwks_file": "/tmp/jwks.json"}, r"jwks_url: set one of jwks_file and jwks_url"),
        ({"jwks_url": ""}, r"jwks_file: required \(or jwks_url\)"),
        ({"jwks_refresh_s": 0}, r"jwks_refresh_s: must be > 0"),
        ({"jwks_timeout_ms": 0}, r"jwks_timeout_ms: must be > 0"),
        ({"algorithms": ["HS256"], "hs256_secret": "s" * 32}, r"jwks_file/jwks_url only when RS256"),
    ],
)
def test_config_errors(over: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "issuer": ISS,
        "audience": AUD,
        "algorithms": ["RS256"],
        "jwks_url": "https://idp.example.com/.well-known/jwks.json",
    }
    fields.update(over)
    with pytest.raises(config_mod.ConfigError, match=message):
        JwtVerifier(JwtConfig(**fields))
    for ok in ("https://idp.example.com/jwks", "http://127.0.0.1:8080/jwks", "http://localhost/jwks"):
        JwtVerifier(JwtConfig(issuer=ISS, audience=AUD, algorithms=["RS256"], jwks_url=ok))


# ---- the gateway over real sockets ------------------------------------------------------------
@pytest.fixture
def jwks_gateway(
    mock_upstream: MockUpstream, server: JwksServer, signers: dict[str, Signer], tmp_path: Path
) -> Iterator[tuple[Gateway, Path]]:
    server.doc = {"keys": [signers["r1"].jwk]}
    extra = f"""
auth:
  enabled: true
  jwt:
    issuer: {ISS}
    audience: {AUD}
    algorithms: [RS256, ES256]
    jwks_url: {server.url}
    jwks_timeout_ms: 1000
    models_claim: models
tiers:
  default: {{}}
  free: {{rpm: 100000}}
"""
    log_path = tmp_path / "gateway.log"
    with (
        log_path.open("wb") as log,
        run_gateway(
            tmp_path,
            mock_upstream,
            config_text=gateway_config(mock_upstream.port) + extra,
            log_level="debug",
            output=log,
        ) as g,
    ):
        yield g, log_path


def test_gateway_jwks_url_rotation_and_outage(
    jwks_gateway: tuple[Gateway, Path], server: JwksServer, signers: dict[str, Signer]
) -> None:
    gw, log_path = jwks_gateway
    r1, r2, evil = signers["r1"], signers["r2"], signers["evil"]
    assert post(gw.port, chat(), r1.token())[0] == 200
    server.doc = {"keys": [r1.jwk, r2.jwk]}  # the provider adds a key
    status, _, body = post(gw.port, chat(), r2.token())
    assert status == 200, body
    # a URL in the token is never fetched
    attacker = JwksServer()
    try:
        attacker.doc = {"keys": [evil.jwk]}
        status, _, body = post(gw.port, chat(), evil.token({"jku": attacker.url}))
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert attacker.hits == 0
    finally:
        attacker.stop()
    server.stop()  # the identity provider goes away: the keys fetched before still work
    for signer in (r1, r2):
        started = time.monotonic()
        assert post(gw.port, chat(), signer.token())[0] == 200
        assert time.monotonic() - started < 2
    assert post(gw.port, chat(), evil.token())[0] == 401
    assert post(gw.port, chat(), r1.token(models=["slow"]))[0] == 403
    text = log_path.read_text(errors="replace")
    assert "JWT key(s) in force from http://127.0.0.1" in text
