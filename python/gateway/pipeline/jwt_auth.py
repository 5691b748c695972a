"""JWT bearer tokens: verify a token against pinned algorithms and keys.

Keys come only from the configuration: an HS256 secret and/or the RS256/ES256 public keys of a
JWKS, read from a file (`jwks_file`, once) or fetched from the identity provider
(`jwks_url`, by `JwksCache`: off the request path, refreshed every `jwks_refresh_s` and on an
unknown `kid` at most once per 30 s, with a deadline and a size limit; a failed fetch keeps
the last good key set). Never from the token: a token whose header carries `jku`, `x5u`, `jwk`
or `x5c` is refused, and `kid` only selects among configured keys. Each algorithm is pinned to
its key type, so an HS256 token signed with an RSA public key's PEM fails, and `none` is never
allowed. Verified tokens are cached per worker (bounded, until `exp`, at most 5 minutes);
failures never are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from typing import Any

import jwt

from ..config import ConfigError, JwtConfig, validate_jwt

log = logging.getLogger("gateway.auth")
_KTY_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
#: header parameters that point at keys outside the configuration (RFC 7515 4.1.2-4.1.6)
_FOREIGN_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
_MAX_KID_CHARS = 256
#: the largest JWKS document fetched (a few dozen keys are a few kB)
JWKS_MAX_BYTES = 512 * 1024
#: the least time between two fetches caused by tokens with an unknown `kid`
UNKNOWN_KID_INTERVAL_S = 30.0
#: after a failed fetch with no key set yet, retry this often (else every `jwks_refresh_s`)
_RETRY_S = 30.0
JwtConfigError = ConfigError
KeyTable = dict[tuple[str, str], Any]


class JwtRejected(Exception):
    """The token is not acceptable; the message is safe to show (never contains the token)."""


class JwtUnknownKey(JwtRejected):
    """The token names a `kid` that no configured key has (yet)."""


def parse_jwks(doc: object, algorithms: list[str]) -> KeyTable:
    """(alg, kid) -> public key for each usable RS256/ES256 key of a JWKS document. Keys without
    a `kid`, of another type than their algorithm needs, or for algorithms not allowed are
    skipped; PyJWTError/ValueError if the document is not a JWKS."""
    if not isinstance(doc, dict):
        raise ValueError("a JWKS is a JSON object")
    keys: KeyTable = {}
    for k in jwt.PyJWKSet.from_dict(doc).keys:
        alg = k.algorithm_name
        kty = _KTY_FOR_ALG.get(alg)
        if kty is not None and alg in algorithms and k.key_type == kty and k.key_id:
            keys[(alg, k.key_id)] = k.key
    return keys


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS comes from the configured URL only: a redirect is a failed fetch."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _show_url(url: str) -> str:
    """The URL for logs: no user info, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class JwksCache:
    """The key set at `cfg.jwks_url`, fetched in a thread (stdlib urllib: no redirects, a
    deadline, at most JWKS_MAX_BYTES) and swapped in whole on the event loop. `keys` is the
    last good key set (empty until the first fetch succeeds)."""

    def __init__(self, cfg: JwtConfig, *, unknown_kid_interval_s: float = UNKNOWN_KID_INTERVAL_S) -> None:
        self.url = cfg.jwks_url
        self.shown_url = _show_url(cfg.jwks_url)
        self._algorithms = list(cfg.algorithms)
        self._refresh_s = float(cfg.jwks_refresh_s)
        self._timeout_s = cfg.jwks_timeout_ms / 1000
        self._unknown_kid_interval_s = unknown_kid_interval_s
        self.keys: KeyTable = {}
        #: monotonic time of the last successful fetch (None: never)
        self.fetched_at: float | None = None
        self._last_unknown_kid = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: str | None = None

    # ---- fetching -------------------------------------------------------------------------------
    def fetch(self) -> KeyTable:
        """Fetch and parse the key set (blocking: call it in a thread). Raises on any problem,
        including a document with no usable key."""
        deadline = time.monotonic() + self._timeout_s
        opener = urllib.request.build_opener(_NoRedirect)
        request = urllib.request.Request(
            self.url, headers={"accept": "application/json", "user-agent": "fastpath-gateway"}
        )
        try:
            resp = opener.open(request, timeout=self._timeout_s)
        except urllib.error.HTTPError as exc:  # a status other than 2xx, or a redirect
            exc.close()
            raise ValueError(f"HTTP status {exc.code}") from None
        with resp:
            if resp.status != 200:
                raise ValueError(f"HTTP status {resp.status}")
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > JWKS_MAX_BYTES:
                raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError("the fetch took too long")
                chunk = resp.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > JWKS_MAX_BYTES:
                    raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
                chunks.append(chunk)
        keys = parse_jwks(json.loads(b"".join(chunks)), self._algorithms)
        if not keys:
            raise ValueError("no usable key (each needs a `kid` and an allowed RS256/ES256 type)")
        return keys

    def _swap(self, keys: KeyTable) -> None:
        changed = keys.keys() != self.keys.keys()
        self.keys = keys  # one reference swap: requests see the old or the new set
        self.fetched_at = time.monotonic()
        if self._error is not None:
            log.info("auth: the JWKS at %s is reachable again", self.shown_url)
            self._error = None
        if changed:
            log.info("auth: %d JWT key(s) in force from %s", len(keys), self.shown_url)

    def _failed(self, exc: BaseException) -> None:
        reason = type(exc).__name__
        detail = str(exc) if isinstance(exc, (ValueError, TimeoutError)) else ""
        if isinstance(exc, urllib.error.URLError):
            detail = str(exc.reason)
        message = f"{reason}: {detail}" if detail else reason
        if message != self._error:  # once per distinct problem, not every retry
            log.warning(
                "auth: fetching the JWKS from %s failed (keeping the %d key(s) loaded before): %s",
                self.shown_url,
                len(self.keys),
                message[:300],
            )
            self._error = message

    def load_now(self) -> bool:
        """Fetch in the calling thread and swap in the result; False (keys kept) on failure."""
        try:
            keys = self.fetch()
        except Exception as exc:
            self._failed(exc)
            return False
        self._swap(keys)
        return True

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch already running; False (keys kept) on failure."""
        task = self._inflight
        if task is None or task.done():
            task = self._inflight = asyncio.get_running_loop().create_task(self._fetch_and_swap())
        return await asyncio.shield(task)

    async def _fetch_and_swap(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            keys = await asyncio.wait_for(loop.run_in_executor(None, self.fetch), self._timeout_s + 1)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return False
        self._swap(keys)
        return True

    async def refresh_for_unknown_kid(self) -> bool:
        """A token named a `kid` this set lacks: maybe the provider rotated its keys. Refresh,
        unless a fetch for that reason ran in the last `unknown_kid_interval_s` (a stream of
        tokens with made-up kids costs at most one fetch per interval)."""
        task = self._inflight
        if task is not None and not task.done():
            return await asyncio.shield(task)
        now = time.monotonic()
        if now - self._last_unknown_kid < self._unknown_kid_interval_s:
            return False
        self._last_unknown_kid = now
        return await self.refresh()

    # ---- the worker's background refresh ----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fetch now (in the background: the worker serves meanwhile; tokens that arrive first
        wait for this fetch) and then every `jwks_refresh_s`."""
        if self._task is None:
            # started here, so that a token arriving before `_run` runs joins this fetch
            first = self._inflight = loop.create_task(self._fetch_and_swap())
            self._task = loop.create_task(self._run(first))

    async def _run(self, first: asyncio.Task[bool]) -> None:
        ok = await asyncio.shield(first)
        while True:
            wait = self._refresh_s if ok or self.fetched_at is not None else min(self._refresh_s, _RETRY_S)
            await asyncio.sleep(wait)
            try:
                ok = await self.refresh()
            except Exception:  # never ends the loop
                log.exception("auth: refreshing the JWKS failed")
                ok = False

    def close(self) -> list[asyncio.Task[Any]]:
        """Cancel the background work; the tasks to wait for (if the loop is still usable)."""
        tasks = [t for t in (self._task, self._inflight) if t is not None and not t.done()]
        self._task = self._inflight = None
        for t in tasks:
            t.cancel()
        return tasks


class JwtVerifier:
    __slots__ = ("_cache", "_cfg", "_hs_key", "_jwks", "_keys", "_max")

    def __init__(
        self,
        cfg: JwtConfig,
        *,
        cache_size: int = 4096,
        where: str = "$.auth.jwt",
        unknown_kid_interval_s: float = UNKNOWN_KID_INTERVAL_S,
    ) -> None:
        validate(cfg, where)
        self._cfg = cfg
        self._hs_key = cfg.hs256_secret.encode() if "HS256" in cfg.algorithms else None
        #: (alg, kid) -> public key, from `jwks_file`
        self._keys: KeyTable = {}
        if cfg.jwks_file:
            self._load_jwks(cfg.jwks_file, where)
        self._jwks = JwksCache(cfg, unknown_kid_interval_s=unknown_kid_interval_s) if cfg.jwks_url else None
        self._cache: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._max = cache_size

    def _load_jwks(self, path: str, where: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            self._keys = parse_jwks(doc, self._cfg.algorithms)
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            raise JwtConfigError(f"{where}.jwks_file: cannot load: {type(exc).__name__}") from None

    @property
    def config(self) -> JwtConfig:
        return self._cfg

    @property
    def jwks(self) -> JwksCache | None:
        """The JWKS fetched from `jwks_url` (None with `jwks_file` or HS256 only)."""
        return self._jwks

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._jwks is not None:
            self._jwks.start(loop)

    def close(self) -> list[asyncio.Task[Any]]:
        return self._jwks.close() if self._jwks is not None else []

    async def verify_async(self, token: str) -> dict[str, Any]:
        """`verify`, and once more after a JWKS refresh if the token's `kid` is unknown (the
        provider may have rotated its keys; rate limited by `JwksCache`)."""
        try:
            return self.verify(token)
        except JwtUnknownKey:
            jwks = self._jwks
            if jwks is None or not await jwks.refresh_for_unknown_kid():
                raise
        return self.verify(token)

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
        if any(h in header for h in _FOREIGN_KEY_HEADERS):
            raise JwtRejected("Token header must not name keys (jku, x5u, jwk, x5c).")
        if alg == "HS256":
            key: Any = self._hs_key
            if key is None:
                raise JwtRejected("Unknown token key.")
        else:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_CHARS:
                raise JwtRejected("Unknown token key.")
            keys = self._jwks.keys if self._jwks is not None else self._keys
            key = keys.get((alg, kid))
            if key is None:
                raise JwtUnknownKey("Unknown token key.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                # `exp` is always required: a token without one would never expire
                options={"require": ["exp", *cfg.required_claims], "verify_signature": True},
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
