"""Stage `auth`: an API key (`Authorization: Bearer sk-...` or `x-api-key`) -> the principal.

Keys are known only by their salted hash (`config.hash_key`): the stage hashes what the client
sent and looks the digest up in a dict built once per worker, then compares the digests in
constant time. Timing can only tell an attacker about a salted hash, never about a key. No
message or log line ever contains what the client sent.

Keys come from the config (bootstrap) and from the key store (`gateway.keystore`). Each worker
polls the store's version every `auth.store.poll_interval_ms` in a thread (never on the event
loop) and, when it changed, swaps in a new digest table: created and revoked keys take effect
within about a second, without a restart. Config keys win over stored ones with the same id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Iterable
from typing import Any

from ..config import Config, TierConfig
from ..context import RequestContext
from ..errors import Fault, GatewayError, quote
from ..keystore import KeyStore, KeyStoreError, StoredKey
from ..principal import Principal
from ..worker import Worker
from .jwt_auth import JwtRejected, JwtVerifier, looks_like_jwt

log = logging.getLogger("gateway.auth")
_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(Fault.UNAUTHORIZED, message)


_MISSING = _unauthorized("Missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.")
_BAD_SCHEME = _unauthorized("Unsupported Authorization scheme; send `Authorization: Bearer <key>`.")
_INVALID = _unauthorized("Invalid API key.")
_DISABLED = _unauthorized("This API key is disabled.")
_EXPIRED = _unauthorized("This API key has expired.")


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise _BAD_SCHEME
    return token.strip()


def build_principals(cfg: Config) -> dict[bytes, Principal]:
    """Digest -> principal for every configured key (hashes come from `config.parse`)."""
    table: dict[bytes, Principal] = {}
    for k in cfg.auth.keys:
        assert k.key_hash is not None  # config.parse replaced every plaintext key
        expires = k.expires_at.timestamp() if k.expires_at is not None else None
        p = _principal(k.id, k.key_hash, k.team, k.tier, cfg.tiers[k.tier], k.models, expires, k.disabled)
        table[p.digest] = p
    return table


def _principal(
    key_id: str,
    key_hash: str,
    team: str,
    tier_name: str,
    tier: TierConfig,
    models: Iterable[str] | None,
    expires_at: float | None,
    disabled: bool,
) -> Principal:
    """One principal from a config or stored key (`key_hash` is `sha256:<hex>`)."""
    digest = bytes.fromhex(key_hash.removeprefix("sha256:"))
    return Principal(
        key_id,
        digest,
        team,
        tier_name,
        tier,
        frozenset(models) if models else None,
        math.inf if expires_at is None else expires_at,
        disabled,
    )


class AuthStage:
    name = "auth"
    __slots__ = (
        "_bootstrap",
        "_bootstrap_ids",
        "_error",
        "_jwt",
        "_poll_s",
        "_principals",
        "_salt",
        "_store",
        "_task",
        "_tiers",
        "_version",
    )

    def __init__(self, cfg: Config, store: KeyStore | None = None) -> None:
        self._salt = cfg.auth.salt.encode()
        self._bootstrap = build_principals(cfg)
        self._bootstrap_ids = frozenset(p.key_id for p in self._bootstrap.values())
        #: replaced whole (never mutated) when the store changes
        self._principals = self._bootstrap
        self._tiers = cfg.tiers
        self._store = store
        store_cfg = cfg.auth.store
        self._poll_s = store_cfg.poll_interval_ms / 1000 if store_cfg is not None else 1.0
        self._version: int | None = None
        self._error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._jwt = JwtVerifier(cfg.auth.jwt) if cfg.auth.jwt is not None else None

    # ---- the key store ------------------------------------------------------------------------
    def start(self, worker: Worker) -> None:
        """Load the stored keys (before the worker serves) and start polling for changes; start
        fetching the JWKS (`auth.jwt.jwks_url`)."""
        loop = worker.loop
        if self._jwt is not None:
            self._jwt.start(loop)
        if self._store is None:
            return
        self.refresh()
        self._task = loop.create_task(self._poll())

    async def close(self) -> None:
        task, self._task = self._task, None
        tasks = self._jwt.close() if self._jwt is not None else []
        if task is not None:
            task.cancel()
            tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._store is not None:
            self._store.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("auth: reloading the key store failed")

    def refresh(self) -> bool:
        """Reload the stored keys if the store changed; True if the key table was replaced.
        Blocking (small queries): runs in a thread once the worker serves. On an error the
        previous keys stay in force."""
        store = self._store
        if store is None:
            return False
        try:
            version = store.version()
            if version == self._version:
                return False
            keys: list[StoredKey] = []
            if version is not None:
                version, keys = store.load_all()
        except KeyStoreError as exc:
            message = str(exc)
            if message != self._error:  # once per distinct problem, not every poll
                log.error("auth: cannot read the key store (keeping the keys loaded before): %s", message)
                self._error = message
            return False
        if self._error is not None:
            log.info("auth: the key store is readable again")
            self._error = None
        self._principals = self._merge(keys)  # one reference swap: requests see old or new
        self._version = version
        log.info("auth: %d stored key(s) in force (key store version %s)", len(keys), version)
        return True

    def _merge(self, keys: Iterable[StoredKey]) -> dict[bytes, Principal]:
        table: dict[bytes, Principal] = {}
        for k in keys:
            tier = self._tiers.get(k.tier)
            why = None
            if tier is None:
                why = f"unknown tier {k.tier!r}"
            elif k.id in self._bootstrap_ids:
                why = "a config key has the same id"
            elif not _KEY_HASH.fullmatch(k.key_hash):
                why = "malformed hash"
            if why is not None or tier is None:
                log.warning("auth: stored key %r ignored: %s", k.id, why)
                continue
            p = _principal(k.id, k.key_hash, k.team, k.tier, tier, k.models, k.expires_at, k.disabled)
            table[p.digest] = p
        table.update(self._bootstrap)
        return table

    def principal_by_id(self, key_id: str) -> Principal | None:
        """The key with this id as it stands now (jobs run later than they were submitted: a
        key deleted or changed since counts); None when no such key exists."""
        return next((p for p in self._principals.values() if p.key_id == key_id), None)

    # ---- per request --------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        value: str | None = headers.get("authorization")
        if value is not None:
            token = _bearer(value)
            if self._jwt is not None and looks_like_jwt(token):
                self._admit(ctx, await self._jwt_principal(self._jwt, token))
                return
        else:
            api_key: str | None = headers.get("x-api-key")
            if api_key is None:
                raise _MISSING
            token = api_key
        self._admit(ctx, self._key_principal(token))

    async def authenticate(self, headers: Any) -> Principal:
        """The caller of a request outside the pipeline (`GET /v1/models`): the same keys, JWTs
        and refusals as `on_request`, without a model to check."""
        value: str | None = headers.get("authorization")
        if value is not None:
            token = _bearer(value)
            if self._jwt is not None and looks_like_jwt(token):
                return await self._jwt_principal(self._jwt, token)
        else:
            api_key: str | None = headers.get("x-api-key")
            if api_key is None:
                raise _MISSING
            token = api_key
        return self._key_principal(token)

    def _key_principal(self, token: str) -> Principal:
        digest = hashlib.sha256(self._salt + token.encode("utf-8", "surrogateescape")).digest()
        principal = self._principals.get(digest)
        if principal is None or not hmac.compare_digest(principal.digest, digest):
            raise _INVALID
        if principal.disabled:
            raise _DISABLED
        if principal.expires_at <= time.time():
            raise _EXPIRED
        return principal

    async def _jwt_principal(self, verifier: JwtVerifier, token: str) -> Principal:
        """A verified token's claims -> a principal. An unknown tier is refused (403), never
        silently mapped to a default tier."""
        try:
            claims = await verifier.verify_async(token)
        except JwtRejected as exc:
            raise _unauthorized(f"Invalid token: {exc}") from None
        cfg = verifier.config
        team = claims.get(cfg.team_claim)
        tier_name = claims.get(cfg.tier_claim)
        if not isinstance(team, str) or not isinstance(tier_name, str):
            need = f"`{cfg.team_claim}` and `{cfg.tier_claim}`"
            raise _unauthorized(f"Invalid token: claims {need} are required.")
        tier = self._tiers.get(tier_name)
        if tier is None:
            raise GatewayError(Fault.FORBIDDEN, f"The token's tier {tier_name!r} is not configured.")
        models: list[str] | None = None
        if cfg.models_claim:
            raw = claims.get(cfg.models_claim)
            if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
                raise _unauthorized(f"Invalid token: claim `{cfg.models_claim}` must be a list of models.")
            models = raw
        exp = claims.get("exp")
        expires = float(exp) if isinstance(exp, (int, float)) else math.inf
        return Principal(
            claims["sub"],
            b"",
            team,
            tier_name,
            tier,
            frozenset(models) if models is not None else None,
            expires,
            False,
        )

    @staticmethod
    def _admit(ctx: RequestContext, principal: Principal) -> None:
        view = ctx.view
        assert view is not None
        if principal.models is not None and view.model not in principal.models:
            raise GatewayError(
                Fault.FORBIDDEN,
                f"This API key may not use the model `{quote(view.model)}`.",
                param="model",
            )
        ctx.principal = principal
