"""Stage `auth`: an API key (`Authorization: Bearer sk-...` or `x-api-key`) -> the principal.

Keys are known only by their salted hash (`config.hash_key`): the stage hashes what the client
sent and looks the digest up in a dict built once per worker, then compares the digests in
constant time. Timing can only tell an attacker about a salted hash, never about a key. No
message or log line ever contains what the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from ..config import Config, TierConfig
from ..context import RequestContext
from ..errors import Fault, GatewayError


class Principal:
    """Who is calling: one per configured key, built once per worker and shared by requests."""

    __slots__ = ("digest", "disabled", "expires_at", "key_id", "models", "team", "tier", "tier_name")

    def __init__(
        self,
        key_id: str,
        digest: bytes,
        team: str,
        tier_name: str,
        tier: TierConfig,
        models: frozenset[str] | None,
        expires_at: float,
        disabled: bool,
    ) -> None:
        self.key_id = key_id
        self.digest = digest
        self.team = team
        self.tier_name = tier_name
        self.tier = tier
        #: allowed public models; None = all
        self.models = models
        #: Unix time the key stops working (inf: never)
        self.expires_at = expires_at
        self.disabled = disabled

    def __repr__(self) -> str:  # never the digest
        return f"Principal(key_id={self.key_id!r}, team={self.team!r}, tier={self.tier_name!r})"


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(Fault.UNAUTHORIZED, message)


_MISSING = _unauthorized("Missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.")
_BAD_SCHEME = _unauthorized("Unsupported Authorization scheme; send `Authorization: Bearer <key>`.")
_INVALID = _unauthorized("Invalid API key.")
_DISABLED = _unauthorized("This API key is disabled.")
_EXPIRED = _unauthorized("This API key has expired.")


def build_principals(cfg: Config) -> dict[bytes, Principal]:
    """Digest -> principal for every configured key (hashes come from `config.parse`)."""
    table: dict[bytes, Principal] = {}
    for k in cfg.auth.keys:
        assert k.key_hash is not None  # config.parse replaced every plaintext key
        digest = bytes.fromhex(k.key_hash.removeprefix("sha256:"))
        table[digest] = Principal(
            k.id,
            digest,
            k.team,
            k.tier,
            cfg.tiers[k.tier],
            frozenset(k.models) if k.models else None,
            k.expires_at.timestamp() if k.expires_at is not None else math.inf,
            k.disabled,
        )
    return table


class AuthStage:
    name = "auth"
    __slots__ = ("_principals", "_salt")

    def __init__(self, cfg: Config) -> None:
        self._salt = cfg.auth.salt.encode()
        self._principals = build_principals(cfg)

    async def on_request(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        value: str | None = headers.get("authorization")
        if value is not None:
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer":
                raise _BAD_SCHEME
            token = token.strip()
        else:
            api_key: str | None = headers.get("x-api-key")
            if api_key is None:
                raise _MISSING
            token = api_key
        digest = hashlib.sha256(self._salt + token.encode("utf-8", "surrogateescape")).digest()
        principal = self._principals.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise _INVALID
        if principal.disabled:
            raise _DISABLED
        if principal.expires_at <= time.time():
            raise _EXPIRED
        view = ctx.view
        assert view is not None
        if principal.models is not None and view.model not in principal.models:
            raise GatewayError(
                Fault.FORBIDDEN,
                f"This API key may not use the model `{view.model}`.",
                param="model",
            )
        ctx.principal = principal
