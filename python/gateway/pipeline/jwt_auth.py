"""JWT bearer tokens (not wired yet): verify a token against pinned algorithms and keys.

Keys come only from the configuration: an HS256 secret and/or a JWKS file (RS256/ES256). The
token's header `jku`, `x5u`, `jwk` and `x5c` are never used; `kid` only selects among configured
keys. Each algorithm is pinned to its key type, so an HS256 token signed with an RSA public key's
PEM fails. Verified tokens are cached per worker (bounded, until `exp`); failures never are.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

import jwt

from ..config import ConfigError, JwtConfig, validate_jwt

_KTY_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
JwtConfigError = ConfigError


class JwtRejected(Exception):
    """The token is not acceptable; the message is safe to show (never contains the token)."""


class JwtVerifier:
    __slots__ = ("_cache", "_cfg", "_hs_key", "_keys", "_max")

    def __init__(self, cfg: JwtConfig, *, cache_size: int = 4096, where: str = "$.auth.jwt") -> None:
        validate(cfg, where)
        self._cfg = cfg
        self._hs_key = cfg.hs256_secret.encode() if "HS256" in cfg.algorithms else None
        #: (alg, kid) -> public key
        self._keys: dict[tuple[str, str], Any] = {}
        if cfg.jwks_file:
            self._load_jwks(cfg.jwks_file, where)
        self._cache: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._max = cache_size

    def _load_jwks(self, path: str, where: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            jwks = jwt.PyJWKSet.from_dict(doc)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise JwtConfigError(f"{where}.jwks_file: cannot load: {type(exc).__name__}") from None
        for k in jwks.keys:
            alg = k.algorithm_name
            kty = _KTY_FOR_ALG.get(alg)
            if kty is not None and alg in self._cfg.algorithms and k.key_type == kty and k.key_id:
                self._keys[(alg, k.key_id)] = k.key

    @property
    def config(self) -> JwtConfig:
        return self._cfg

    def verify(self, token: str) -> dict[str, Any]:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            claims, exp = hit
            if exp > now:
                self._cache.move_to_end(token)
                return claims
            del self._cache[token]
        claims = self._verify(token)
        exp = float(claims.get("exp", now + 60))
        self._cache[token] = (claims, min(exp, now + 300))
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return claims

    def _verify(self, token: str) -> dict[str, Any]:
        cfg = self._cfg
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtRejected("Malformed token.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise JwtRejected("Token algorithm not allowed.")
        if alg == "HS256":
            key: Any = self._hs_key
        else:
            kid = header.get("kid")
            key = self._keys.get((alg, kid)) if isinstance(kid, str) else None
        if key is None:
            raise JwtRejected("Unknown token key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={"require": list(cfg.required_claims), "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise JwtRejected("Token expired.") from None
        except jwt.ImmatureSignatureError:
            raise JwtRejected("Token not yet valid.") from None
        except jwt.PyJWTError:
            raise JwtRejected("Invalid token.") from None
        if not isinstance(claims.get("sub"), str):
            raise JwtRejected("Token has no subject.")
        return claims


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def validate(cfg: JwtConfig, where: str = "$.auth.jwt") -> None:
    validate_jwt(cfg, where)
