"""Stage `limits`: requests per minute, tokens per minute and concurrent requests, per key.

Tokens are *reserved, then settled* (TensorZero's "estimate, then reconcile"): before the call
the key pays its prompt tokens (counted by the fastpath) + `max_tokens` (or
`limits.default_max_tokens`) x `n`; when the request ends, however it ends, `on_finish` gives back
what the response did not use (or charges what it used beyond). A refused request leaves no count
behind, and the in-flight gauge is returned on every exit path (the pipeline calls `on_finish`
in a `finally`; the lease makes a second call a no-op).

Backend `local`: `_fastpath.LocalLimiter` buckets in this worker process. Exact for one worker;
with N workers each enforces the full limit on its own share of the traffic (up to N x the
limit in total). Backend `redis` (`limits_redis.RedisLimitsStage`, same interface) holds them
exactly across workers and machines, and falls back to this stage when Redis fails open.
"""

from __future__ import annotations

from .. import _fastpath
from ..config import Config
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..schemas import ChatRequestView
from .auth import Principal
from .reframe import counted_prompt_tokens

#: A concurrency refusal has no refill time; clients may retry after this long.
_CONCURRENCY_RETRY_MS = 1_000
_TOKEN_STATE = frozenset(("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"))


class Lease:
    """What one admitted request holds until it is settled."""

    __slots__ = ("concurrent", "key", "prompt_tokens", "reserved_tokens", "tpm")

    def __init__(
        self, key: str, tpm: int | None, prompt_tokens: int, reserved_tokens: int, concurrent: bool
    ) -> None:
        self.key = key
        self.tpm = tpm
        self.prompt_tokens = prompt_tokens
        self.reserved_tokens = reserved_tokens
        self.concurrent = concurrent


def duration(ms: int) -> str:
    """OpenAI's reset header format: `20ms`, `1s`, `1.5s`, `6m0s`."""
    if ms < 1_000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _rate_limited(message: str, retry_after_ms: int) -> GatewayError:
    retry_s = max(1, -(-retry_after_ms // 1000))
    return GatewayError(
        Fault.RATE_LIMITED,
        message,
        headers=(("retry-after", str(retry_s)), ("retry-after-ms", str(retry_after_ms))),
    )


class LimitsStage:
    name = "limits"
    __slots__ = ("_default_max_tokens", "_inflight", "_limit_headers", "_requests", "_tokens")

    def __init__(self, cfg: Config) -> None:
        self._requests = _fastpath.LocalLimiter(cfg.limits.max_tracked_keys)
        self._tokens = _fastpath.LocalLimiter(cfg.limits.max_tracked_keys)
        #: key id -> requests in flight (entries at 0 are removed, so the dict stays small)
        self._inflight: dict[str, int] = {}
        self._default_max_tokens = cfg.limits.default_max_tokens
        #: tier name -> the constant `x-ratelimit-limit-*` headers, built once
        self._limit_headers: dict[str, tuple[tuple[str, str], ...]] = {}
        for name, tier in cfg.tiers.items():
            headers = []
            if tier.rpm is not None:
                headers.append(("x-ratelimit-limit-requests", str(tier.rpm)))
            if tier.tpm is not None:
                headers.append(("x-ratelimit-limit-tokens", str(tier.tpm)))
            self._limit_headers[name] = tuple(headers)

    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        assert principal is not None
        tier = principal.tier
        key = principal.key_id
        rpm, tpm, max_concurrent = tier.rpm, tier.tpm, tier.max_concurrent
        if max_concurrent is not None and self._inflight.get(key, 0) >= max_concurrent:
            ctx.ratelimit_headers = self._headers(principal, self._peek_requests(principal), None)
            raise _rate_limited(
                f"Too many concurrent requests for this API key (limit {max_concurrent}).",
                _CONCURRENCY_RETRY_MS,
            )
        requests = None
        if rpm is not None:
            requests = self._requests.acquire(key, 1, rpm, rpm)
            if not requests[0]:
                ctx.ratelimit_headers = self._headers(principal, requests, self._peek_tokens(principal))
                raise _rate_limited(
                    f"Rate limit reached: {rpm} requests per minute for this API key.", requests[3]
                )
        tokens = None
        prompt = reserved = 0
        if tpm is not None:
            prompt = counted_prompt_tokens(ctx)
            reserved = prompt + self._completion_reserve(ctx)
            tokens = self._tokens.acquire(key, reserved, tpm, tpm)
            if not tokens[0]:
                if requests is not None:  # refused: the request slot is not used
                    self._requests.refund(key, 1)
                    requests = (False, requests[1] + 1, requests[2], requests[3])
                ctx.ratelimit_headers = self._headers(principal, requests, tokens)
                raise _rate_limited(tokens_refused_message(reserved, tpm), tokens[3])
        if max_concurrent is not None:
            self._inflight[key] = self._inflight.get(key, 0) + 1
        ctx.lease = Lease(key, tpm, prompt, reserved, max_concurrent is not None)
        ctx.ratelimit_headers = self._headers(principal, requests, tokens)

    def on_finish(self, ctx: RequestContext) -> None:
        """Settle the lease once: return the concurrency slot and unused reserved tokens. The
        pipeline calls it when the request ends however it ends, and before a unary reply (so
        that reply's token headers already show the real use)."""
        lease = ctx.lease
        if lease is None:
            return
        ctx.lease = None
        key = lease.key
        if lease.concurrent:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)
        tpm = lease.tpm
        if tpm is None:
            return
        unused = lease.reserved_tokens - tokens_used(ctx, lease.prompt_tokens)
        if unused > 0:
            self._tokens.refund(key, unused)
        elif unused < 0:
            self._tokens.charge(key, -unused, tpm)
        if ctx.status == 0:  # a reply is still to come: let its headers show the real use
            tokens = self._tokens.acquire(key, 0, tpm, tpm)
            ctx.ratelimit_headers = (
                *(h for h in ctx.ratelimit_headers if h[0] not in _TOKEN_STATE),
                *self._token_headers(tokens),
            )

    # ---- helpers ------------------------------------------------------------------------------
    def _completion_reserve(self, ctx: RequestContext) -> int:
        view = ctx.view
        assert view is not None
        max_tokens = view.max_tokens
        if max_tokens is None and type(view) is ChatRequestView:
            max_tokens = view.max_completion_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens
        return max(max_tokens, 0) * (view.n or 1)

    def _peek_requests(self, principal: Principal) -> tuple[bool, int, int, int] | None:
        rpm = principal.tier.rpm
        return None if rpm is None else self._requests.acquire(principal.key_id, 0, rpm, rpm)

    def _peek_tokens(self, principal: Principal) -> tuple[bool, int, int, int] | None:
        tpm = principal.tier.tpm
        return None if tpm is None else self._tokens.acquire(principal.key_id, 0, tpm, tpm)

    def _headers(
        self,
        principal: Principal,
        requests: tuple[bool, int, int, int] | None,
        tokens: tuple[bool, int, int, int] | None,
    ) -> tuple[tuple[str, str], ...]:
        headers = self._limit_headers[principal.tier_name]
        if requests is not None:
            headers += (
                ("x-ratelimit-remaining-requests", str(requests[1])),
                ("x-ratelimit-reset-requests", duration(requests[2])),
            )
        if tokens is None and principal.tier.tpm is not None:
            tokens = self._peek_tokens(principal)
        if tokens is not None:
            headers += self._token_headers(tokens)
        return headers

    @staticmethod
    def _token_headers(tokens: tuple[bool, int, int, int]) -> tuple[tuple[str, str], ...]:
        return (
            ("x-ratelimit-remaining-tokens", str(tokens[1])),
            ("x-ratelimit-reset-tokens", duration(tokens[2])),
        )


def tokens_used(ctx: RequestContext, prompt_tokens: int) -> int:
    """What a request spent, for settlement: the reported usage; the prompt if the upstream
    answered but reported nothing; nothing if it never answered."""
    usage = ctx.usage
    if usage is not None:
        return usage.prompt_tokens + usage.completion_tokens
    if "upstream_head" in ctx.timings:
        return prompt_tokens
    return 0


def tokens_refused_message(reserved: int, tpm: int) -> str:
    """Why a token reservation was refused: over the per-minute limit on its own, or not now."""
    if reserved > tpm:
        return (
            f"This request needs {reserved} tokens (prompt + max_tokens), more than this "
            f"API key's limit of {tpm} tokens per minute; lower max_tokens."
        )
    return f"Rate limit reached: {tpm} tokens per minute for this API key."
