"""Config of routing and resilience (issue 13): deployments per public model, balancing,
retries, fallbacks, hedging, caching, fair queuing, circuit breaking and active health checks.

A model with `provider:` is one deployment (the shorthand); `deployments:` lists several.
Everything here has defaults that make a one-deployment model behave as before: one attempt
plus a retry of connect failures, no hedging, no cache, no queue.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .config import Config


class BalanceKind(StrEnum):
    ROUND_ROBIN = "round_robin"  # weighted round-robin (smooth, nginx's)
    P2C = "p2c"  # power of two choices on outstanding requests, weighted
    LATENCY = "latency"  # lowest EWMA of TTFT (streams) / latency x (1 + outstanding)
    AFFINITY = "affinity"  # consistent hashing with bounded load on a session key


class ErrorClass(StrEnum):
    """What an upstream failure was, for retry and fallback rules."""

    CONNECT = "connect"  # refused, reset or unreachable (503 upstream_unavailable)
    TIMEOUT = "timeout"  # no answer (head, first token or unary body) in time
    RATE_LIMITED = "rate_limited"  # the upstream's 429
    SERVER_ERROR = "server_error"  # 5xx, a broken or malformed answer
    CONTEXT_LENGTH = "context_length"  # the prompt does not fit the model's context
    CONTENT_POLICY = "content_policy"  # the upstream's content filter refused it
    REJECTED = "rejected"  # any other 4xx: the request itself is wrong (never retried)


class DeploymentConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    provider: str
    #: the model name the upstream knows; default: the public model's `upstream_model`, else its name
    upstream_model: str | None = None
    #: share of traffic within its priority group (round_robin, p2c, the affinity ring's vnodes)
    weight: int = 1
    #: lower first: a group is used only while every group before it has no usable deployment
    priority: int = 0
    #: free-form labels (region, cost, gpu): shown in `x-fastpath-route` and `/readyz`
    tags: dict[str, str] = {}
    #: requests in flight at once on this deployment, per gateway instance (split evenly over
    #: the workers); 0 = unbounded. Full deployments are skipped; all full: queue (see `queue`).
    max_concurrent: int = 0


class AffinityConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: where the session key comes from: `header:<name>`, `user` (the body's `user` field), or
    #: `prefix` (a hash of the first `prefix_messages` messages: the prompt-cache prefix)
    key: str = "header:x-session-id"
    prefix_messages: int = 2
    #: bounded load: a replica takes a session only while its outstanding requests are at most
    #: `load_factor` x the mean (+1); otherwise the session spills to the next on the ring
    #: (1.5: >= 99 % of a session's requests stay on its replica at 64 in flight, simulated)
    load_factor: float = 1.5
    #: after its replica comes back, a moved session returns to it (False: stays where it moved)
    sticky_return: bool = True


class RetryConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Retries happen only while nothing has reached the client."""

    #: attempts in all, the first included (1 = no retries)
    max_attempts: int = 2
    #: the error classes worth a retry (not `on`: YAML 1.1 reads a bare `on` key as true)
    errors: list[ErrorClass] = msgspec.field(
        default_factory=lambda: [
            ErrorClass.CONNECT,
            ErrorClass.TIMEOUT,
            ErrorClass.RATE_LIMITED,
            ErrorClass.SERVER_ERROR,
        ]
    )
    backoff_ms: int = 25  # base of the exponential backoff (full jitter)
    max_backoff_ms: int = 1_000
    #: an upstream `Retry-After` longer than this is not waited for: the next deployment is tried
    max_retry_after_ms: int = 2_000
    #: the retry budget: retries are at most this fraction of the route's requests (10 s window),
    #: plus `budget_min_per_s` (so a quiet route can still retry)
    budget_ratio: float = 0.2
    budget_min_per_s: float = 1.0


class FallbackConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """When the model's own deployments fail with one of `errors`, try these models in order."""

    errors: list[ErrorClass]
    models: list[str]


class HedgeConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Streams only: no first token after the deployment's TTFT quantile -> a second attempt
    elsewhere; the first to produce a token wins."""

    enabled: bool = False
    quantile: float = 0.95
    #: until a deployment has `min_samples` TTFTs, hedge after this fixed delay (0: do not hedge)
    after_ms: int = 0
    min_samples: int = 20
    max_hedges: int = 1


class CacheBackend(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Exact response cache, per tenant; opt-in per model (`enabled`) or per request
    (`x-fastpath-cache: on`). `cache-control: no-cache` skips the lookup, `no-store` the store."""

    enabled: bool = False
    ttl_s: int = 300
    backend: CacheBackend = CacheBackend.MEMORY
    max_entries: int = 10_000  # memory backend, per worker
    #: memory backend: all entries of the model together, per worker (least recent out first)
    max_bytes: int = 64 * 1024 * 1024
    max_entry_bytes: int = 1024 * 1024
    #: identical in-flight non-streamed requests of one tenant share one upstream call
    single_flight: bool = True


class QueueConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Fair queuing when every deployment is at `max_concurrent`: wait instead of a blind 503."""

    #: longest wait for capacity; 0 = no queue (refuse at once)
    max_wait_ms: int = 0
    max_queued: int = 1_024  # per worker
    #: team -> weight of its share when queued (teams not listed: 1)
    team_weights: dict[str, int] = {}


class BreakerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Outlier ejection per deployment (per worker), Envoy's model."""

    enabled: bool = True
    consecutive_failures: int = 5
    #: error ratio over a window of `window_s`, once `min_requests` were seen in it
    error_ratio: float = 0.5
    window_s: float = 10.0
    min_requests: int = 20
    #: ejection time: base x number of ejections so far, at most max
    base_ejection_ms: int = 5_000
    max_ejection_ms: int = 300_000
    #: at most this fraction of a model's deployments ejected at once (the rest take traffic)
    max_ejected_percent: int = 50


class HealthCheckConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Active health checks of every provider (openai: GET `path`; triton: server and model
    readiness over its gRPC channel). They feed the balancer and `/readyz`."""

    enabled: bool = False
    path: str = "/v1/models"
    interval_ms: int = 5_000
    jitter_ms: int = 500
    timeout_ms: int = 1_000
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Defaults for every model (`routing:` at the top level)."""

    breaker: BreakerConfig = BreakerConfig()
    health: HealthCheckConfig = HealthCheckConfig()


def _fail(path: str, what: str) -> None:
    from .config import ConfigError  # config imports this module: its error class lazily

    raise ConfigError(f"{path}: {what}")


def _positive(path: str, value: float, *, zero: bool = False) -> None:
    if value < 0 or (value == 0 and not zero):
        _fail(path, f"must be {'>= 0' if zero else '> 0'}, got {value}")


def _fraction(path: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(path, f"must be between 0 and 1, got {value}")


def validate_routing(cfg: Config, models: set[str]) -> None:
    """Everything about deployments but their providers (checked with the models)."""
    for alias, target in cfg.aliases.items():
        if alias in models:
            _fail(f"$.aliases.{alias}", "an alias must not be the name of a model")
        if target not in models:
            _fail(f"$.aliases.{alias}", f"unknown model {target!r}")
    for i, m in enumerate(cfg.models):
        where = f"$.models[{i}]"
        for j, d in enumerate(m.deployments):
            _positive(f"{where}.deployments[{j}].weight", d.weight)
            _positive(f"{where}.deployments[{j}].priority", d.priority, zero=True)
            _positive(f"{where}.deployments[{j}].max_concurrent", d.max_concurrent, zero=True)
        a = m.affinity
        if not (a.key in ("user", "prefix") or (a.key.startswith("header:") and len(a.key) > 7)):
            _fail(f"{where}.affinity.key", f"must be `header:<name>`, `user` or `prefix`, got {a.key!r}")
        _positive(f"{where}.affinity.prefix_messages", a.prefix_messages)
        if a.load_factor < 1.0:
            _fail(f"{where}.affinity.load_factor", f"must be >= 1, got {a.load_factor}")
        r = m.retry
        _positive(f"{where}.retry.max_attempts", r.max_attempts)
        for field in ("backoff_ms", "max_backoff_ms", "max_retry_after_ms"):
            _positive(f"{where}.retry.{field}", getattr(r, field), zero=True)
        _fraction(f"{where}.retry.budget_ratio", r.budget_ratio)
        _positive(f"{where}.retry.budget_min_per_s", r.budget_min_per_s, zero=True)
        if ErrorClass.REJECTED in r.errors:
            _fail(f"{where}.retry.errors", "`rejected` is never retried: the same request fails the same way")
        for j, fb in enumerate(m.fallbacks):
            if not fb.errors or not fb.models:
                _fail(f"{where}.fallbacks[{j}]", "needs `errors` and `models`")
            for target in fb.models:
                if target not in models or target == m.name:
                    _fail(f"{where}.fallbacks[{j}].models", f"{target!r} is not another model")
        h = m.hedge
        if not 0.5 <= h.quantile < 1.0:
            _fail(f"{where}.hedge.quantile", f"must be in [0.5, 1), got {h.quantile}")
        _positive(f"{where}.hedge.after_ms", h.after_ms, zero=True)
        _positive(f"{where}.hedge.min_samples", h.min_samples)
        _positive(f"{where}.hedge.max_hedges", h.max_hedges)
        c = m.cache
        for field in ("ttl_s", "max_entries", "max_bytes", "max_entry_bytes"):
            _positive(f"{where}.cache.{field}", getattr(c, field))
        q = m.queue
        _positive(f"{where}.queue.max_wait_ms", q.max_wait_ms, zero=True)
        _positive(f"{where}.queue.max_queued", q.max_queued)
        for team, weight in q.team_weights.items():
            _positive(f"{where}.queue.team_weights.{team}", weight)
    b = cfg.routing.breaker
    _positive("$.routing.breaker.consecutive_failures", b.consecutive_failures)
    _fraction("$.routing.breaker.error_ratio", b.error_ratio)
    _positive("$.routing.breaker.window_s", b.window_s)
    _positive("$.routing.breaker.min_requests", b.min_requests)
    _positive("$.routing.breaker.base_ejection_ms", b.base_ejection_ms)
    if b.max_ejection_ms < b.base_ejection_ms:
        _fail("$.routing.breaker.max_ejection_ms", "must be >= base_ejection_ms")
    if not 0 <= b.max_ejected_percent <= 100:
        _fail("$.routing.breaker.max_ejected_percent", f"must be 0..100, got {b.max_ejected_percent}")
    hc = cfg.routing.health
    if not hc.path.startswith("/"):
        _fail("$.routing.health.path", f"must start with /, got {hc.path!r}")
    for field in ("interval_ms", "timeout_ms", "unhealthy_threshold", "healthy_threshold"):
        _positive(f"$.routing.health.{field}", getattr(hc, field))
    _positive("$.routing.health.jitter_ms", hc.jitter_ms, zero=True)
