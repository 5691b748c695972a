"""JWT verifier (gateway.pipeline.jwt_auth) with a JWKS file, table-driven, and the gateway
accepting JWTs over real sockets. The JWKS URL: test_auth_jwks_url.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from test_auth import chat, post

from gateway.pipeline.jwt_auth import JwtConfig, JwtConfigError, JwtRejected, JwtVerifier, looks_like_jwt

HS = "h" * 40
ISS, AUD = "https://issuer.test", "fastpath"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk.update(kid="r1", alg="RS256", use="sig")
    ec_jwk.update(kid="e1", alg="ES256", use="sig")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"rsa": rsa_key, "ec": ec_key, "jwks": str(path), "rsa_pem": pem}


def _verifier(jwks: str) -> JwtVerifier:
    cfg = JwtConfig(
        issuer=ISS, audience=AUD, algorithms=["HS256", "RS256", "ES256"], hs256_secret=HS, jwks_file=jwks
    )
    return JwtVerifier(cfg)


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"sub": "u1", "iss": ISS, "aud": AUD, "exp": now + 600, "team": "t", "tier": "free"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _b64(d: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def _token(kind: str, keys: dict[str, Any]) -> str:
    now = int(time.time())
    if kind == "hs256":
        return jwt.encode(_claims(), HS, algorithm="HS256")
    if kind == "rs256":
        return jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
    if kind == "es256":
        return jwt.encode(_claims(), keys["ec"], algorithm="ES256", headers={"kid": "e1"})
    if kind == "none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    if kind == "hs_rs_confusion":
        import hmac
        from hashlib import sha256

        signing = f"{_b64({'alg': 'HS256', 'kid': 'r1'})}.{_b64(_claims())}"
        sig = hmac.new(keys["rsa_pem"], signing.encode(), sha256).digest()
        return f"{signing}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    if kind == "expired":
        return jwt.encode(_claims(exp=now - 3600), HS, algorithm="HS256")
    if kind == "nbf_future":
        return jwt.encode(_claims(nbf=now + 3600), HS, algorithm="HS256")
    if kind == "wrong_aud":
        return jwt.encode(_claims(aud="other"), HS, algorithm="HS256")
    if kind == "wrong_iss":
        return jwt.encode(_claims(iss="https://evil.test"), HS, algorithm="HS256")
    if kind == "missing_exp":
        return jwt.encode(_claims(exp=None), HS, algorithm="HS256")
    if kind == "unknown_kid":
        return jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "nope"})
    if kind == "tampered":
        h, _, s = jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "r1"}).split(".")
        return f"{h}.{_b64(_claims(tier='enterprise'))}.{s}"
    if kind == "jku_elsewhere":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        hdr = {"kid": "r1", "jku": "http://127.0.0.1:1/jwks.json"}
        return jwt.encode(_claims(), other, algorithm="RS256", headers=hdr)
    if kind in ("jku_right_key", "x5u_right_key"):
        # signed by the configured key, but naming another key source: refused all the same
        hdr = {"kid": "r1", kind[:3]: "https://127.0.0.1:1/keys"}
        return jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers=hdr)
    if kind == "jwk_embedded":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        hdr = {"kid": "r1", "jwk": json.loads(RSAAlgorithm.to_jwk(other.public_key()))}
        return jwt.encode(_claims(), other, algorithm="RS256", headers=hdr)
    if kind == "kid_path":
        return jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "../../../dev/null"})
    if kind == "es_kid_for_rs_key":  # the RS256 key's kid on an ES256 token: keys are pinned per alg
        return jwt.encode(_claims(), keys["ec"], algorithm="ES256", headers={"kid": "r1"})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "ok"),
    [
        ("hs256", True),
        ("rs256", True),
        ("es256", True),
        ("none", False),
        ("hs_rs_confusion", False),
        ("expired", False),
        ("nbf_future", False),
        ("wrong_aud", False),
        ("wrong_iss", False),
        ("missing_exp", False),
        ("unknown_kid", False),
        ("tampered", False),
        ("jku_elsewhere", False),
        ("jku_right_key", False),
        ("x5u_right_key", False),
        ("jwk_embedded", False),
        ("kid_path", False),
        ("es_kid_for_rs_key", False),
    ],
)
def test_verify_table(keys: dict[str, Any], kind: str, ok: bool) -> None:
    v = _verifier(keys["jwks"])
    token = _token(kind, keys)
    assert looks_like_jwt(token)
    if ok:
        assert v.verify(token)["sub"] == "u1"
        assert v.verify(token)["sub"] == "u1"  # cached
    else:
        with pytest.raises(JwtRejected) as exc:
            v.verify(token)
        assert token not in str(exc.value)
        with pytest.raises(JwtRejected):  # failures are not cached
            v.verify(token)


@pytest.mark.parametrize(
    ("over", "path"),
    [
        ({"algorithms": ["none"]}, "$.auth.jwt.algorithms[0]"),
        ({"algorithms": ["HS256"], "hs256_secret": ""}, "$.auth.jwt.hs256_secret"),
        ({"algorithms": []}, "$.auth.jwt.algorithms"),
        ({"algorithms": ["RS256"], "hs256_secret": ""}, "$.auth.jwt.jwks_file"),
        (
            {"algorithms": ["RS256"], "hs256_secret": "", "jwks_file": "a", "jwks_url": "https://i/j"},
            "jwks_url",
        ),
        ({"jwks_url": "https://idp.test/jwks"}, "$.auth.jwt: jwks_file/jwks_url only when RS256"),
    ],
)
def test_config_errors(over: dict[str, Any], path: str) -> None:
    base: dict[str, Any] = {"issuer": ISS, "audience": AUD, "algorithms": ["HS256"], "hs256_secret": HS}
    base.update(over)
    with pytest.raises(JwtConfigError, match=path.replace("$", r"\$").replace("[", r"\[")):
        JwtVerifier(JwtConfig(**base))


def test_exp_is_always_required(keys: dict[str, Any]) -> None:
    cfg = JwtConfig(issuer=ISS, audience=AUD, algorithms=["HS256"], hs256_secret=HS, required_claims=[])
    with pytest.raises(JwtRejected, match="Invalid token"):
        JwtVerifier(cfg).verify(_token("missing_exp", keys))


def test_jwks_unreadable(tmp_path: Path) -> None:
    cfg = JwtConfig(issuer=ISS, audience=AUD, algorithms=["RS256"], jwks_file=str(tmp_path / "missing.json"))
    with pytest.raises(JwtConfigError, match="jwks_file"):
        JwtVerifier(cfg)


# ---- the gateway over real sockets ----------------------------------------------------------


@pytest.fixture(scope="module")
def jwt_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jwtlog") / "gateway.log"


@pytest.fixture(scope="module")
def jwt_gateway(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any], jwt_log: Path
) -> Iterator[Gateway]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_JWT_SECRET", HS)
    extra = f"""
auth:
  enabled: true
  jwt:
    issuer: {ISS}
    audience: {AUD}
    algorithms: [HS256, RS256, ES256]
    hs256_secret: ${{TEST_JWT_SECRET}}
    jwks_file: {keys["jwks"]}
    models_claim: models
tiers:
  default: {{}}
  free: {{rpm: 1000}}
"""
    try:
        with (
            jwt_log.open("wb") as log,
            run_gateway(
                tmp_path_factory.mktemp("jwt"),
                mock_upstream,
                config_text=gateway_config(mock_upstream.port) + extra,
                log_level="debug",
                output=log,
            ) as g,
        ):
            yield g
    finally:
        mp.undo()


_GW_CASES = [
    ("hs256", 200),
    ("rs256", 200),
    ("es256", 200),
    ("none", 401),
    ("hs_rs_confusion", 401),
    ("expired", 401),
    ("nbf_future", 401),
    ("wrong_aud", 401),
    ("wrong_iss", 401),
    ("missing_exp", 401),
    ("unknown_kid", 401),
    ("tampered", 401),
    ("jku_elsewhere", 401),
    ("jku_right_key", 401),
    ("kid_path", 401),
]


def _gw_token(kind: str, keys: dict[str, Any]) -> str:
    if kind in ("hs256", "rs256", "es256"):
        alg = kind.upper()
        key = {"HS256": HS, "RS256": keys["rsa"], "ES256": keys["ec"]}[alg]
        hdr = {"HS256": {}, "RS256": {"kid": "r1"}, "ES256": {"kid": "e1"}}[alg]
        return jwt.encode(_claims(models=["echo"]), key, algorithm=alg, headers=hdr)
    return _token(kind, keys)


@pytest.mark.parametrize(("kind", "want"), _GW_CASES)
def test_gateway_jwt(jwt_gateway: Gateway, keys: dict[str, Any], kind: str, want: int) -> None:
    status, _, body = post(jwt_gateway.port, chat(), _gw_token(kind, keys))
    assert status == want, body
    if want == 401:
        assert body["error"]["type"] == "authentication_error"


def test_gateway_jwt_model_not_allowed(jwt_gateway: Gateway) -> None:
    token = jwt.encode(_claims(models=["other"]), HS, algorithm="HS256")
    status, _, body = post(jwt_gateway.port, chat(), token)
    assert status == 403, body


def test_gateway_jwt_unknown_tier(jwt_gateway: Gateway) -> None:
    token = jwt.encode(_claims(tier="platinum", models=["echo"]), HS, algorithm="HS256")
    status, _, body = post(jwt_gateway.port, chat(), token)
    assert status == 403, body
    assert "platinum" in body["error"]["message"]


def test_gateway_jwt_api_keys_still_checked(jwt_gateway: Gateway) -> None:
    assert post(jwt_gateway.port, chat(), "sk-not-a-key-000000000000")[0] == 401


def test_gateway_jwt_secrets_not_logged(jwt_gateway: Gateway, keys: dict[str, Any], jwt_log: Path) -> None:
    tokens = [_gw_token(k, keys) for k, _ in _GW_CASES]
    for t in tokens:
        post(jwt_gateway.port, chat(), t)
    text = jwt_log.read_bytes().decode(errors="replace")
    assert HS not in text
    for t in tokens:
        assert t not in text
        assert t.split(".")[2] not in text or not t.split(".")[2]
