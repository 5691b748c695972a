"""Static configuration: one YAML file decoded strictly into msgspec Structs.

Unknown keys are errors (with their path), durations and sizes carry their unit in the name,
and `${VAR}` / `${VAR:-default}` pull secrets from the environment. The config is decoded once
per process and never mutated.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from datetime import datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from . import _fastpath, envvars
from .config_batches import BatchesConfig, validate_batches
from .config_jobs import JobsConfig, validate_jobs
from .config_output import OutputGuardConfig, ToolValidationConfig, validate_output
from .config_planner import PlannerConfig, validate_planner
from .config_prompts import PromptConfig, RetrievalConfig, validate_prompts
from .config_responses import ResponsesConfig, validate_responses
from .config_routing import (
    AffinityConfig,
    BalanceKind,
    CacheConfig,
    DeploymentConfig,
    FallbackConfig,
    HedgeConfig,
    QueueConfig,
    RetryConfig,
    RoutingConfig,
    validate_routing,
)
from .config_storage import CREDENTIALS_HINT, StorageConfig, validate_storage
from .config_tools import ToolsConfig, validate_tools


class ConfigError(ValueError):
    """A config that cannot be served; the message names the offending path."""


class ProviderKind(StrEnum):
    OPENAI = "openai"  # any OpenAI-compatible HTTP server (vLLM, SGLang, OpenAI, ...)
    TRITON = "triton"  # NVIDIA Triton over gRPC, TensorRT-LLM tensor contract
    ANTHROPIC = "anthropic"  # Anthropic's Messages API over HTTP


class GrpcTransportKind(StrEnum):
    """The gRPC client under a `triton` provider (gateway.upstreams.grpc_h2 / grpc_transport)."""

    GRPCIO = "grpcio"  # grpc.aio (gRPC's own threads hand each message to the loop)
    H2 = "h2"  # in-loop HTTP/2 on asyncio (the `h2` library), no threads


class ForwardedHeader(StrEnum):
    X_FORWARDED_FOR = "x-forwarded-for"
    FORWARDED = "forwarded"  # RFC 7239 `for=`


class SecurityHeadersConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Response headers that keep a browser from rendering or framing the API's replies
    (`gateway.edge.security_headers`); on every reply, errors and streams included."""

    enabled: bool = True
    content_security_policy: str = "default-src 'none'; frame-ancestors 'none'"
    #: `strict-transport-security: max-age=N`: only where clients reach the gateway over TLS (in
    #: granian or a proxy in front); 0: not sent.
    hsts_max_age_s: int = 0
    hsts_include_subdomains: bool = False


class ServerEngine(StrEnum):
    """What serves HTTP (gateway.server): the same app on either."""

    GRANIAN = "granian"  # granian's Rust HTTP/1.1 + HTTP/2 (TLS, WebSocket), RSGI across threads
    UVLOOP = "uvloop"  # HTTP/1.1 on each worker's own event loop (httptools), real back-pressure


class HttpMode(StrEnum):
    """`server.http` (granian): which HTTP versions the port speaks. With TLS, `auto` offers h2
    and http/1.1 by ALPN; without TLS, HTTP/2 is prior-knowledge h2c only."""

    AUTO = "auto"
    HTTP1 = "1"
    HTTP2 = "2"


class TlsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`server.tls`: terminate TLS in granian (engine `granian`). Files are PEM; checked at load
    (readable, the key matches the certificate). Replaced files are picked up by a reload:
    granian reads them when a worker starts, so a reload whose certificate changed replaces the
    workers one by one (gateway.reload)."""

    cert_file: str
    key_file: str
    #: the key's passphrase, normally `${ENV}`; none for an unencrypted key
    key_password: str | None = None


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: the HTTP server under the app (`fastpath-gateway serve --engine`, FASTPATH_GATEWAY_ENGINE)
    engine: ServerEngine = ServerEngine.UVLOOP
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0 = one per CPU core
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_json_depth: int = 64
    header_read_timeout_ms: int = 10_000
    body_read_timeout_ms: int = 30_000
    max_stream_duration_ms: int = 900_000
    stream_ping_interval_ms: int = 15_000
    shutdown_grace_ms: int = 30_000
    #: at shutdown (and when a reloaded generation retires) each pipeline part's `close()` gets
    #: this long (the ledger drains, settlements finish); past it the part is left behind,
    #: logged by name, so that a worker always exits
    close_timeout_ms: int = 30_000
    backlog: int = 2048
    #: Peers (CIDRs) whose forwarding header names the client; from anyone else the socket peer
    #: is the client (gateway.edge). Empty: the header is never read.
    trusted_proxies: list[str] = []
    #: The forwarding header the trusted proxies append to: one, so a client cannot add the other.
    forwarded_header: ForwardedHeader = ForwardedHeader.X_FORWARDED_FOR
    #: Every connection starts with a PROXY protocol header (v1 or v2) from one of
    #: `trusted_proxies` (an L4 balancer: HAProxy, nginx stream, AWS NLB); connections from
    #: other peers are closed. The uvloop engine only (granian has no hook for it).
    proxy_protocol: bool = False
    security_headers: SecurityHeadersConfig = SecurityHeadersConfig()
    #: TLS termination (granian); None: plain HTTP
    tls: TlsConfig | None = None
    #: auto | 1 | 2 (granian); a bare YAML `1` / `2` is read as the string
    http: HttpMode = HttpMode.AUTO


class _Provider(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="kind"):
    """What every provider kind has. `kind` picks the Struct (a tagged union: a field of another
    kind is an unknown field); a provider without `kind` is `openai`."""

    name: str
    #: openai: http(s)://host[:port]/v1; triton: grpc://host:port or grpcs://host:port (TLS)
    base_url: str
    api_key: str | None = None
    #: HTTP headers (openai) or gRPC metadata (triton) sent with every request
    headers: dict[str, str] = {}
    connect_timeout_ms: int = 3_000
    first_byte_timeout_ms: int = 120_000
    idle_timeout_ms: int = 60_000
    total_timeout_ms: int = 900_000
    max_response_bytes: int = 64 * 1024 * 1024


class SigningKind(StrEnum):
    HMAC_SHA256 = "hmac-sha256"


class SigningConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Sign every request to this provider (gateway.signing): for an upstream that checks who
    calls it. `secret` is normally `${ENV}`."""

    kind: SigningKind = SigningKind.HMAC_SHA256
    key_id: str
    secret: str
    header: str = "x-fastpath-signature"


class OpenAIProvider(_Provider, frozen=True, tag="openai"):
    """Any OpenAI-compatible HTTP server (vLLM, SGLang, OpenAI, ...)."""

    kind: ClassVar[ProviderKind] = ProviderKind.OPENAI
    max_idle_connections: int = 256
    signing: SigningConfig | None = None


class TritonProvider(_Provider, frozen=True, tag="triton"):
    """NVIDIA Triton over gRPC, TensorRT-LLM tensor contract."""

    kind: ClassVar[ProviderKind] = ProviderKind.TRITON
    #: grpcs: PEM file with the CA roots to trust (empty: the system roots)
    tls_ca_file: str = ""
    #: which gRPC client carries the calls
    transport: GrpcTransportKind = GrpcTransportKind.H2


class AnthropicProvider(_Provider, frozen=True, tag="anthropic"):
    """Anthropic's Messages API (https://api.anthropic.com/v1): `api_key` goes as `x-api-key`;
    chat requests are translated to Messages and its events back (upstreams/anthropic_http.py)."""

    kind: ClassVar[ProviderKind] = ProviderKind.ANTHROPIC
    max_idle_connections: int = 256
    #: the `anthropic-version` header
    anthropic_version: str = "2023-06-01"
    #: Messages requires `max_tokens`: sent when a chat request sets none
    default_max_tokens: int = 4_096


ProviderConfig = OpenAIProvider | TritonProvider | AnthropicProvider


class TritonModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a chat request becomes TensorRT-LLM tensors (see gateway.upstreams.triton_request)."""

    #: Jinja template over `messages` (and `add_generation_prompt`) -> `text_input`; empty:
    #: the built-in ChatML layout. `chat_template_file` reads it from a file instead.
    chat_template: str = ""
    chat_template_file: str = ""
    #: Stop words sent with every request (e.g. the template's end-of-turn marker); like the
    #: client's `stop`, they are cut from the output.
    stop: list[str] = []
    #: TensorRT-LLM requires `max_tokens`: used when the request sets none.
    default_max_tokens: int = 1024
    #: The model has guided decoding configured: `response_format` json_object / json_schema
    #: becomes `guided_decoding_guide_type` / `guided_decoding_guide`; otherwise such a request
    #: is refused with 400.
    guided_decoding: bool = False
    #: How tool calls are read from the generated text (`tools` requests): `hermes`
    #: (`<tool_call>{"name", "arguments"}</tool_call>`, Hermes / Qwen templates), `llama3_json`
    #: (`{"name", "parameters"}`, Llama 3.x), or `none` (the model cannot call tools: `tools` is
    #: refused with 400).
    tool_parser: Literal["hermes", "llama3_json", "none"] = "hermes"
    #: The model's `dynamic_batching.priority_levels` (give it `default_priority_level` equal to
    #: it, the lowest): a tier `priority` p > 0 is sent as Triton's request priority
    #: `max(1, priority_levels - p)`, p steps above the default. 0: no priority is sent.
    priority_levels: int = 0


class ModelKind(StrEnum):
    """What a public model serves: a chat request to an embedding model (or the reverse) is a
    400 naming the endpoint to use, never an upstream error."""

    CHAT = "chat"  # /v1/chat/completions and /v1/completions
    EMBEDDING = "embedding"  # /v1/embeddings


class EmbeddingModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How `/v1/embeddings` becomes one Triton `ModelInfer` (triton_models/minilm_embed's
    contract): the texts as one BYTES [n] tensor, an FP32 [n, dim] output, optionally an INT32
    [n] token count per text (reported as usage; else the route's tokenizer counts)."""

    input: str = "text"
    output: str = "embedding"
    #: empty: the model reports no token counts
    tokens_output: str = "num_tokens"


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    #: chat (default) or embedding
    kind: ModelKind = ModelKind.CHAT
    #: one deployment (the shorthand); or list them in `deployments`
    provider: str | None = None
    upstream_model: str | None = None  # defaults to `name`
    owned_by: str = "fastpath-gateway"
    encoding: str | None = None  # tokenizer for counted usage; default: by model name
    #: Only for models of a `triton` provider (defaults apply when absent).
    triton: TritonModelConfig | None = None
    #: Only for `kind: embedding` models of a `triton` provider (defaults apply when absent).
    embedding: EmbeddingModelConfig | None = None
    #: several upstreams serving this model (see gateway.config_routing)
    deployments: list[DeploymentConfig] = []
    balance: BalanceKind = BalanceKind.P2C
    affinity: AffinityConfig = AffinityConfig()
    retry: RetryConfig = RetryConfig()
    fallbacks: list[FallbackConfig] = []
    hedge: HedgeConfig = HedgeConfig()
    cache: CacheConfig = CacheConfig()
    queue: QueueConfig = QueueConfig()


class LimitMode(StrEnum):
    """How a limit set's RPM / TPM / budgets are shared (`limits.backend: redis`)."""

    EXACT = "exact"  # one Redis decision per request: exactly the limit across the fleet
    #: each worker takes slices of the limit from Redis and decides locally (docs/limits.md:
    #: at most one slice per worker beyond the limit; concurrency limits stay exact)
    LEASED = "leased"


class LimitSet(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The limits of one scope; None = unlimited. Each per-minute limit is also the burst."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    #: false = shadow mode for this set's limits (not its `models:`): counted and reported in
    #: the `x-ratelimit-*` headers like enforced ones, but a request one of them would refuse
    #: goes on (an INFO log line says which limit and the 429 code it would have had). What it
    #: would have refused is not counted in it (as a refused request would not be), so it shows
    #: what the limit would admit; a shadow budget never ends a stream.
    enforce: bool = True
    #: `leased` (backend redis): this set's rpm / tpm / budgets are decided locally on slices
    #: taken from Redis; `exact` (default): one Redis decision per request
    mode: LimitMode = LimitMode.EXACT
    #: Long-window quotas in fixed UTC windows (like the budgets; they do not refill): requests
    #: per UTC day, tokens (prompt + completion, reserved then settled like tpm) per UTC day and
    #: per UTC calendar month. Always decided exactly, also in a `leased` set.
    requests_per_day: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


class ModelLimitsConfig(LimitSet, forbid_unknown_fields=True, frozen=True):
    """Limits per key and public model (`tiers.<t>.models.<model>`), on top of the tier's own."""


class BudgetLimitSet(LimitSet, forbid_unknown_fields=True, frozen=True):
    """A limit set with money budgets per UTC day / UTC calendar month (prices from `prices:`);
    None = unlimited."""

    budget_usd_per_day: float | None = None
    budget_usd_per_month: float | None = None


class TierConfig(BudgetLimitSet, forbid_unknown_fields=True, frozen=True):
    """Per-key limits of a tier."""

    #: Extra limits per key and public model, e.g. `{gpt-4o: {rpm: 10, tpm: 1000}}`.
    models: dict[str, ModelLimitsConfig] = {}
    #: Higher first: the order of the fair queue (`models[].queue`) and the request priority
    #: passed to engines that take one (Triton).
    priority: int = 0
    #: Tool names a request of this tier may offer (and a reply may call); None = any.
    tools_allowed: list[str] | None = None


class TeamLimitsConfig(BudgetLimitSet, forbid_unknown_fields=True, frozen=True):
    """Limits shared by all keys of one team (`teams.<team>`), on top of each key's tier."""

    #: Tool names this team's requests may offer (and replies may call); None = any.
    tools_allowed: list[str] | None = None


class PriceConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """USD per million tokens of one public model (at most 3 decimals: nano-USD per token)."""

    input_per_mtok: float
    output_per_mtok: float
    #: prompt tokens the upstream served from its prompt cache (OpenAI's cached_tokens,
    #: Anthropic's cache reads); None: charged at `input_per_mtok`
    cached_input_per_mtok: float | None = None


class KeyConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A bootstrap API key. Exactly one of `key` (the secret, normally `${ENV}`; replaced by its
    hash while the config is parsed, so no Config object ever holds it) or `key_hash`."""

    id: str  # a name for logs and limits; never the secret
    key: str | None = None
    key_hash: str | None = None  # "sha256:" + hex(sha256(salt + key))
    team: str = "default"
    tier: str = "default"
    models: list[str] = []  # allowed public models; empty = all
    expires_at: datetime | None = None  # with a timezone: 2030-01-01T00:00:00Z
    disabled: bool = False
    #: Tool names this key's requests may offer (and replies may call); None = any (the key's,
    #: its tier's and its team's lists all apply).
    tools_allowed: list[str] | None = None


class StoreKind(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"  # `dsn` required
    NONE = "none"  # config keys only


class KeyStoreConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where keys made with `fastpath-gateway keys create` live (see `gateway.keystore`)."""

    kind: StoreKind = StoreKind.SQLITE
    #: SQLite file; empty = `$FASTPATH_GATEWAY_DATA_DIR/keys.db` (data dir default: `.fastpath`,
    #: relative to the working directory).
    path: str = ""
    #: PostgreSQL: `postgresql://user:${PGPASSWORD}@host:5432/db` (or libpq `key=value` form);
    #: never logged with its password.
    dsn: str = ""
    #: PostgreSQL: deadline of connecting and of each query (a worker keeps its keys meanwhile).
    timeout_ms: int = 5_000
    #: How often each worker checks the store for created or revoked keys.
    poll_interval_ms: int = 1_000


class JwtConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """JWT bearer tokens (see `gateway.pipeline.jwt_auth`): pinned algorithms, configured keys only."""

    issuer: str
    audience: str
    #: HS256, RS256 and/or ES256 (never `none`)
    algorithms: list[str]
    #: Required when (and only allowed when) HS256 is allowed; at least 32 characters.
    hs256_secret: str = ""
    #: JWKS JSON file with the RS256/ES256 public keys (each with a `kid`).
    jwks_file: str = ""
    #: Or the identity provider's JWKS URL (https; http only for 127.0.0.1/localhost), fetched
    #: in the background every `jwks_refresh_s` and on an unknown `kid` (at most every 30 s).
    jwks_url: str = ""
    jwks_refresh_s: int = 300
    #: Deadline of one JWKS fetch; a failed fetch keeps the last good key set.
    jwks_timeout_ms: int = 5_000
    team_claim: str = "team"
    tier_claim: str = "tier"
    #: Claim with the list of allowed models; empty = all models.
    models_claim: str = ""
    leeway_s: int = 30
    required_claims: list[str] = msgspec.field(default_factory=lambda: ["exp"])


_JWT_ALGS = ("HS256", "RS256", "ES256")


def _validate_jwks_url(url: str, where: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL") from None
    local = host in ("127.0.0.1", "localhost", "::1")
    if not host or parts.scheme not in ("https", "http") or (parts.scheme == "http" and not local):
        raise ConfigError(f"{where}: must be an https:// URL (http:// only for 127.0.0.1 or localhost)")
    if parts.username is not None or parts.fragment:
        raise ConfigError(f"{where}: must not have user info or a fragment")


def validate_jwt(j: JwtConfig, where: str = "$.auth.jwt") -> None:
    if not j.algorithms:
        raise ConfigError(f"{where}.algorithms: required (pin HS256, RS256 and/or ES256)")
    for i, alg in enumerate(j.algorithms):
        if alg not in _JWT_ALGS:
            raise ConfigError(f"{where}.algorithms[{i}]: {alg!r} not allowed (HS256, RS256, ES256)")
    if "HS256" in j.algorithms and len(j.hs256_secret) < 32:
        raise ConfigError(f"{where}.hs256_secret: required (at least 32 characters) when HS256 is allowed")
    if "HS256" not in j.algorithms and j.hs256_secret:
        raise ConfigError(f"{where}.hs256_secret: only allowed when HS256 is in algorithms")
    if "RS256" in j.algorithms or "ES256" in j.algorithms:
        if not j.jwks_file and not j.jwks_url:
            raise ConfigError(f"{where}.jwks_file: required (or jwks_url) when RS256 or ES256 is allowed")
        if j.jwks_file and j.jwks_url:
            raise ConfigError(f"{where}.jwks_url: set one of jwks_file and jwks_url, not both")
    elif j.jwks_file or j.jwks_url:
        raise ConfigError(f"{where}: jwks_file/jwks_url only when RS256 or ES256 is allowed")
    if j.jwks_url:
        _validate_jwks_url(j.jwks_url, f"{where}.jwks_url")
    _check_positive(f"{where}.jwks_refresh_s", j.jwks_refresh_s)
    _check_positive(f"{where}.jwks_timeout_ms", j.jwks_timeout_ms)
    if not j.issuer or not j.audience:
        raise ConfigError(f"{where}: issuer and audience are required")
    if j.leeway_s < 0:
        raise ConfigError(f"{where}.leeway_s: must be >= 0")


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = False
    #: Per-deployment salt of the key hashes (required when any key is given as `key_hash`).
    #: Empty: a random salt per process, which is enough when every key is given as `key`.
    salt: str = ""
    keys: list[KeyConfig] = []
    #: Absent: SQLite in the data dir when a salt is configured, else none (stored hashes need a
    #: stable salt). Never None once the config is parsed.
    store: KeyStoreConfig | None = None
    #: JWT bearer tokens as a second auth kind (absent: API keys only).
    jwt: JwtConfig | None = None
    #: `GET /v1/models` and `/v1/models/{id}` without a key (else they need one, and a key's
    #: model allow-list filters them).
    public_models: bool = False


class LimitsBackend(StrEnum):
    LOCAL = "local"
    REDIS = "redis"


class OnError(StrEnum):
    FAIL_OPEN = "fail_open"
    FAIL_CLOSED = "fail_closed"


class RedisLimitsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: redis://, rediss://, unix://, or redis+cluster://host:port[,host:port...] (a Redis Cluster
    #: from its seed nodes; rediss+cluster:// with TLS)
    url: str = "redis://127.0.0.1:6379/0"
    #: Deadline of every Redis call (a decision, a settlement, a lease renewal).
    timeout_ms: int = 50
    key_prefix: str = "fastpath:rl:"
    #: Redis down or slow: `fail_open` = this worker's local limits (logged); `fail_closed` = 503.
    on_error: OnError = OnError.FAIL_OPEN
    #: After a failed call, Redis is tried again this much later (meanwhile: `on_error`).
    retry_interval_ms: int = 1_000
    #: A concurrency slot is a lease that expires this long after its last renewal (renewed
    #: every third of it while the request runs), so a crashed worker cannot leak slots.
    lease_ttl_ms: int = 30_000
    max_connections: int = 64
    #: `mode: leased` limits: each worker tops its slices up (and measures its traffic) this often,
    #: off the request path; a slice unused for `slice_idle_ms` goes back to Redis.
    slice_renew_ms: int = 200
    slice_idle_ms: int = 2_000


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: Completion tokens reserved for a request that sets no max_tokens / max_completion_tokens.
    default_max_tokens: int = 4_096
    #: Buckets kept per worker (idle ones are dropped first).
    max_tracked_keys: int = 100_000
    #: `local`: buckets per worker process; `redis`: shared by every worker and instance.
    backend: LimitsBackend = LimitsBackend.LOCAL
    redis: RedisLimitsConfig = RedisLimitsConfig()
    #: Streams of keys with a budget: end the stream with a `budget_exceeded` error event when
    #: its running cost (completion tokens counted on the stream) passes the key's budget.
    live_budget_enforcement: bool = False


class GuardKind(StrEnum):
    RULES = "rules"  # in-process: known injection phrases + secret patterns (Rust, microseconds)
    TRITON = "triton"  # a classifier model on Triton (e.g. triton_models/prompt_guard)


class GuardCheck(StrEnum):
    PROMPT = "prompt"  # stage `guard`, before the upstream call
    REPLY = "reply"  # response stage `output_classifier`: windows of a stream, a unary reply whole
    BOTH = "both"


class GuardConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One guard: the prompt (stage `guard`, before the upstream call) and, for a triton guard
    with `check: reply | both`, the reply (response stage `output_classifier`)."""

    #: Names the guard in the error `code` and the `X-Prompt-Guard-Error-Code` header.
    name: str
    kind: GuardKind
    #: The guard errors or exceeds `timeout_ms`: `fail_open` lets the request through (logged),
    #: `fail_closed` refuses it with 503.
    on_error: OnError = OnError.FAIL_CLOSED
    #: `on_error` by risk, for the caller's key id, else team, else tier (e.g. fail closed for
    #: the `free` tier, open for a trusted internal team); needs `auth.enabled`.
    on_error_by_key: dict[str, OnError] = {}
    on_error_by_team: dict[str, OnError] = {}
    on_error_by_tier: dict[str, OnError] = {}
    timeout_ms: int = 250
    #: Public models this guard applies to; empty = all.
    models: list[str] = []
    # -- kind rules
    #: Include the built-in phrase and secret lists (gateway.guards.rules).
    builtin_rules: bool = True
    #: Extra rules: rule name -> phrases (matched case-insensitively, whitespace-insensitively).
    phrases: dict[str, list[str]] = {}
    #: Extra rules: rule name -> regex (Rust `regex` syntax) over the original text.
    patterns: dict[str, str] = {}
    # -- kind triton
    provider: str = ""  # a provider of kind triton
    model: str = "prompt_guard"
    #: Block when the model's `score` output is at least this.
    threshold: float = 0.5
    #: Only the last this many characters of the prompt text go to the model.
    max_chars: int = 4_000
    #: Prompts shorter than this (stripped) skip the model ("hi", "thanks": a classifier of
    #: embeddings is unreliable on a word or two, and so short a prompt carries no real attack);
    #: rules guards still see them. 0 = every prompt goes to the model.
    min_chars: int = 0
    #: Prompts scored in one request at most (concurrent checks are coalesced per worker).
    max_batch: int = 32
    #: What the model reads: the prompt, the reply, or both (one name, one policy).
    check: GuardCheck = GuardCheck.PROMPT
    #: Score the prompt sentence by sentence (one batched call; the highest score decides), for
    #: models of short texts such as toxicity_guard (replies are always scored so).
    sentences: bool = False
    #: Replies on streams: a window is scored every this many new characters of completion
    #: text (and once at the end), off the stream's path; each with `overlap_chars` of the
    #: text before it, so a phrase cut by a window's edge is seen whole.
    window_chars: int = 400
    overlap_chars: int = 100


class LedgerKind(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"  # `dsn` required
    NONE = "none"


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The usage ledger (`gateway.ledger`): one row per inference request, written off the hot
    path in batches by each worker; `GET /v1/usage` (admin) and `fastpath-gateway usage` read it."""

    #: Off by default: a gateway writes no files unless asked to.
    enabled: bool = False
    kind: LedgerKind = LedgerKind.SQLITE
    #: SQLite file; empty = `$FASTPATH_GATEWAY_DATA_DIR/usage.db` (WAL; workers share the file).
    path: str = ""
    #: PostgreSQL: `postgresql://user:${PGPASSWORD}@host:5432/db`; never logged with its password.
    dsn: str = ""
    #: Deadline of connecting and of each statement (SQLite: the busy timeout).
    timeout_ms: int = 5_000
    #: A worker writes at most this many rows per transaction, and flushes as soon as this many wait.
    batch_max_rows: int = 500
    #: ... or this long after the oldest waiting row arrived at the latest.
    flush_interval_ms: int = 1_000
    #: Rows waiting per worker at most; beyond it new rows are dropped (counted, logged), never
    #: blocking a request.
    max_queue: int = 100_000


class AccessLogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The access log (`gateway.pipeline.access_log`): one JSON line per inference request (who,
    which model, status, tokens, cost, timings, guard and limit decisions; never a secret or the
    prompt), written by a per-worker thread off the request path."""

    #: Off by default, like the ledger: a gateway adds no per-request output unless asked to.
    enabled: bool = False
    #: A file (size-rotated; every worker appends to it, rotation under a lock); empty = stdout.
    path: str = ""
    #: The file is rotated before it would grow past this (`path.1` .. `path.<backups>`).
    max_bytes: int = 100 * 1024 * 1024
    #: Rotated files kept; 0 = the file is truncated when full.
    backups: int = 5
    #: Share of successful requests (2xx, no error) logged; errors are always logged.
    sample_success: float = 1.0
    #: Lines waiting per worker at most; beyond it new lines are dropped (counted, logged).
    max_queue: int = 100_000
    #: How often the writer thread writes what waits.
    flush_interval_ms: int = 200


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The admin credential of the admin routes (`GET /v1/usage`). Exactly one of `api_key` (the
    secret, normally `${ENV}`; replaced by its hash while the config is parsed) or
    `api_key_hash` (`sha256:` + hex(sha256(auth.salt + key)); needs `auth.salt`). Neither: the
    admin routes answer 403."""

    api_key: str | None = None
    api_key_hash: str | None = None


#: seconds: request, stage and upstream latency (1 ms .. 2 min)
DEFAULT_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
DEFAULT_LATENCY_BUCKETS += [30.0, 60.0, 120.0]
#: seconds: time to first token and time per output token / inter-token gaps
DEFAULT_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75]
DEFAULT_TOKEN_BUCKETS += [1.0, 2.5, 5.0, 10.0]


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`/metrics` (Prometheus text, OpenMetrics on `Accept`), one scrape for all workers (see
    `gateway.metrics`). Served on the main port behind the admin key (`Authorization: Bearer
    <admin.api_key>`; no admin key configured: 403 unless `require_admin: false`), or, with
    `listen: "host:port"`, on a separate listener without a credential (bind it privately)."""

    enabled: bool = True
    #: "" = the main port's `/metrics`; "host:port" = a separate listener (and no main-port route)
    listen: str = ""
    require_admin: bool = True
    #: where the workers' shards live; "" = $TMPDIR/fastpath-metrics-<granian master pid>
    dir: str = ""
    latency_buckets: list[float] = msgspec.field(default_factory=lambda: list(DEFAULT_LATENCY_BUCKETS))
    token_latency_buckets: list[float] = msgspec.field(default_factory=lambda: list(DEFAULT_TOKEN_BUCKETS))
    #: a `key` label (the key id, never the secret) on the per-team token and cost counters
    per_key_labels: bool = False
    #: distinct key ids / teams that get their own label value; later ones are `__other__`
    max_keys: int = 100
    max_teams: int = 1_000
    #: label sets per worker (all metrics together); past it new label sets are `__other__`
    max_series: int = 10_000
    #: how often a worker copies its slots into its shared file and publishes its gauges (queues,
    #: pools, limiter fail-open counts): a scrape sees a worker's requests at most this late
    publish_interval_ms: int = 250


def _default_tiers() -> dict[str, TierConfig]:
    return {"default": TierConfig()}


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """OpenTelemetry traces: W3C `traceparent` in and out, spans exported over OTLP/HTTP."""

    enabled: bool = False
    #: OTLP/HTTP traces endpoint (protobuf), e.g. an OpenTelemetry Collector's
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    #: requests without a sampled parent: the share traced (a client's `traceparent` decides
    #: for its requests: parent-based)
    sample_ratio: float = 1.0
    service_name: str = "fastpath-gateway"
    #: spans waiting for export at most (more are dropped and counted)
    max_queue: int = 10_000
    batch_max_spans: int = 512
    flush_interval_ms: int = 1_000
    timeout_ms: int = 5_000
    #: extra HTTP headers for the OTLP endpoint (an auth token, `${ENV}` welcome)
    headers: dict[str, str] = {}


class PipelineConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How the request stages run (`gateway.pipeline.parallel`)."""

    #: Consecutive stages that do not depend on each other's output (retrieval and a model
    #: guard, extensions that declare `reads` / `writes`) run concurrently; false: one by one,
    #: and the guard after `limits` as before.
    parallel_stages: bool = True


class ExtensionKind(StrEnum):
    """Where an extension plugs into the pipeline (docs/architecture.md)."""

    REQUEST_STAGE = "request_stage"  # after the built-in request stages; `on_finish` settles
    RESPONSE_STAGE = "response_stage"  # `on_stream` (a hook per streamed read) / `on_body`
    OBSERVER = "observer"  # `on_done`, once per request after its reply


class ExtensionConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Your own stage or observer: `factory` ("package.module:callable") is called once per
    worker with `options` and returns the part."""

    kind: ExtensionKind
    factory: str
    options: dict[str, Any] = {}


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    providers: list[ProviderConfig]
    models: list[ModelConfig]
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    tiers: dict[str, TierConfig] = msgspec.field(default_factory=_default_tiers)
    limits: LimitsConfig = LimitsConfig()
    guards: list[GuardConfig] = []
    #: PII / secret checks of replies (response stage `output_guard`), in order.
    output_guards: list[OutputGuardConfig] = []
    #: Tool calls in replies checked against the request's `tools` (off unless enabled).
    tool_validation: ToolValidationConfig = ToolValidationConfig()
    #: Team name -> limits shared by all keys of that team (teams not listed: none).
    teams: dict[str, TeamLimitsConfig] = {}
    #: Public model -> price (budgets); models not listed cost nothing.
    prices: dict[str, PriceConfig] = {}
    #: The usage ledger (off unless `ledger.enabled`).
    ledger: LedgerConfig = LedgerConfig()
    #: The admin credential (admin routes: `GET /v1/usage`).
    admin: AdminConfig = AdminConfig()
    #: `/metrics` (Prometheus / OpenMetrics): all workers in one scrape.
    metrics: MetricsConfig = MetricsConfig()
    #: The access log (off unless `access_log.enabled`).
    access_log: AccessLogConfig = AccessLogConfig()
    #: Python stages and observers of your own, in order (see `ExtensionConfig`).
    extensions: list[ExtensionConfig] = []
    #: OpenTelemetry tracing (off unless `tracing.enabled`).
    tracing: TracingConfig = TracingConfig()
    #: How the request stages run (concurrent groups of independent stages).
    pipeline: PipelineConfig = PipelineConfig()
    #: Other public names for models (alias -> model name).
    aliases: dict[str, str] = {}
    #: Circuit breaking and active health checks of every deployment.
    routing: RoutingConfig = RoutingConfig()
    #: Async requests and the Redis job queue (off unless `jobs.enabled`).
    jobs: JobsConfig = JobsConfig()
    #: The OpenAI Batch API on the job queue (off unless `batches.enabled`).
    batches: BatchesConfig = BatchesConfig()
    #: The Responses API and its conversation store (SQLite file by default, made on first use).
    responses: ResponsesConfig = ResponsesConfig()
    #: Object storage (batch files, job results, archives): a local directory by default, or S3.
    storage: StorageConfig = StorageConfig()
    #: Server-side prompt templates by name (`config_prompts.py`; stage `prompts`).
    prompts: dict[str, PromptConfig] = {}
    #: Retrievers (RAG) per model, with a time budget (stage `retrieve`).
    retrieval: RetrievalConfig = RetrievalConfig()
    #: Cost/quality model selection by a request classifier (`config_planner.py`; stage `planner`).
    planner: PlannerConfig = PlannerConfig()
    #: Server-side tools and the gateway-run agent loop (`config_tools.py`; `gateway.tools`).
    tools: ToolsConfig = ToolsConfig()


_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_MIN_KEY_CHARS = 16
_MIN_SALT_CHARS = 16


def hash_key(salt: str, key: str) -> str:
    """The stored form of an API key: `sha256:` + hex(sha256(salt + key)).

    Why a fast hash and not scrypt: API keys are long random secrets, not passwords, so a
    slow KDF adds no security and would cost milliseconds per request. The salt (per
    deployment) keeps one deployment's hashes useless against another's. The same value
    is easy to compute outside the gateway: `printf %s "$SALT$KEY" | sha256sum`."""
    return "sha256:" + hashlib.sha256((salt + key).encode()).hexdigest()


def _hash_keys(cfg: Config) -> Config:
    """Replace every plaintext `key` by its `key_hash` (the secret is not kept)."""
    auth = cfg.auth
    if auth.store is None:  # the default store needs a configured (stable) salt
        kind = StoreKind.SQLITE if auth.salt else StoreKind.NONE
        auth = msgspec.structs.replace(auth, store=KeyStoreConfig(kind=kind))
        cfg = msgspec.structs.replace(cfg, auth=auth)
    plain = [k for k in auth.keys if k.key is not None]
    if not plain:
        return cfg
    salt = auth.salt or os.urandom(16).hex()
    keys = [
        k if k.key is None else msgspec.structs.replace(k, key=None, key_hash=hash_key(salt, k.key))
        for k in auth.keys
    ]
    return msgspec.structs.replace(cfg, auth=msgspec.structs.replace(auth, salt=salt, keys=keys))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one,
    so a repeated `api_key:` or `server:` would override without a word)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            mark = key_node.start_mark
            raise ConfigError(f"line {mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _interpolate(node: Any, path: str) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
                return m.group(2)
            return value

        return _ENV_REF.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _check_positive(path: str, value: int, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_all(where: str, obj: object, fields: tuple[str, ...]) -> None:
    for field in fields:
        _check_positive(f"{where}.{field}", getattr(obj, field))


def _validate(cfg: Config) -> None:
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"$.server.port: must be 0..65535, got {s.port}")
    _check_positive("$.server.workers", s.workers, allow_zero=True)
    _check_positive("$.server.shutdown_grace_ms", s.shutdown_grace_ms, allow_zero=True)
    _check_positive("$.server.close_timeout_ms", s.close_timeout_ms)
    _check_all(
        "$.server",
        s,
        (
            "max_body_bytes",
            "max_header_bytes",
            "max_headers",
            "max_json_depth",
            "header_read_timeout_ms",
            "body_read_timeout_ms",
            "max_stream_duration_ms",
            "stream_ping_interval_ms",
            "backlog",
        ),
    )
    _validate_edge(s)
    _validate_tls(s)
    if not cfg.providers:
        raise ConfigError("$.providers: at least one provider is required")
    names: set[str] = set()
    for i, p in enumerate(cfg.providers):
        where = f"$.providers[{i}]"
        if p.name in names:
            raise ConfigError(f"{where}.name: duplicate provider name {p.name!r}")
        names.add(p.name)
        url = urlsplit(p.base_url)
        schemes = ("grpc", "grpcs") if p.kind is ProviderKind.TRITON else ("http", "https")
        if url.scheme not in schemes or not url.hostname:
            raise ConfigError(
                f"{where}.base_url: must be a {' or '.join(s + '://' for s in schemes)} URL with a host"
                f" for kind {p.kind.value}, got {p.base_url!r}"
            )
        if p.kind is ProviderKind.TRITON and (url.path.strip("/") or url.port is None):
            raise ConfigError(f"{where}.base_url: a Triton address is grpc://host:port (no path)")
        if isinstance(p, TritonProvider) and p.tls_ca_file and url.scheme != "grpcs":
            raise ConfigError(f"{where}.tls_ca_file: only for grpcs:// providers")
        try:
            url.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
        except ValueError:
            raise ConfigError(f"{where}.base_url: invalid port in {p.base_url!r}") from None
        if url.query or url.fragment:
            raise ConfigError(f"{where}.base_url: must not have a query or fragment")
        _check_all(
            where,
            p,
            (
                "connect_timeout_ms",
                "first_byte_timeout_ms",
                "idle_timeout_ms",
                "total_timeout_ms",
                "max_response_bytes",
            ),
        )
        if isinstance(p, AnthropicProvider):
            _check_positive(f"{where}.default_max_tokens", p.default_max_tokens)
            _check_positive(f"{where}.max_idle_connections", p.max_idle_connections, allow_zero=True)
        if isinstance(p, OpenAIProvider):
            _check_positive(f"{where}.max_idle_connections", p.max_idle_connections, allow_zero=True)
            if p.signing is not None:
                _validate_signing(f"{where}.signing", p.signing)
        for h in p.headers:
            if not re.fullmatch(r"[A-Za-z0-9-]+", h):
                raise ConfigError(f"{where}.headers: invalid header name {h!r}")
    if not cfg.models:
        raise ConfigError("$.models: at least one model is required")
    seen: set[str] = set()
    kinds = {p.name: p.kind for p in cfg.providers}
    for i, m in enumerate(cfg.models):
        where = f"$.models[{i}]"
        if m.name in seen:
            raise ConfigError(f"{where}.name: duplicate model name {m.name!r}")
        seen.add(m.name)
        if m.encoding is not None and m.encoding not in ("o200k_base", "cl100k_base"):
            raise ConfigError(f"{where}.encoding: must be o200k_base or cl100k_base, got {m.encoding!r}")
        _validate_deployments(where, m, kinds)
    validate_routing(cfg, seen)
    _validate_model_kinds(cfg)
    _validate_guards(cfg, seen)
    validate_output(cfg, seen)
    _validate_extensions(cfg)
    _validate_tracing(cfg.tracing)
    _validate_auth(cfg)
    _validate_ledger(cfg.ledger)
    _validate_admin(cfg)
    _validate_metrics(cfg.metrics)
    _validate_access_log(cfg.access_log)
    validate_jobs(cfg)
    validate_batches(cfg)
    validate_responses(cfg)
    validate_storage(cfg)
    validate_prompts(cfg)
    validate_planner(cfg)
    validate_tools(cfg, seen)


def _validate_signing(where: str, g: SigningConfig) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", g.key_id):
        raise ConfigError(f"{where}.key_id: 1-64 of A-Z a-z 0-9 . _ : -, got {g.key_id!r}")
    if len(g.secret) < 16:
        raise ConfigError(f"{where}.secret: at least 16 characters")
    if not re.fullmatch(r"[A-Za-z0-9-]+", g.header):
        raise ConfigError(f"{where}.header: invalid header name {g.header!r}")


def _validate_tls(s: ServerConfig) -> None:
    """The certificate and key load (readable, PEM, matching, the passphrase right): a bad file
    is a config error at `check-config` / reload time, not a worker that fails to start."""
    t = s.tls
    if t is None:
        return
    if s.engine is not ServerEngine.GRANIAN:
        raise ConfigError(f"$.server.tls: TLS is served by engine granian, not {s.engine.value}")
    for field in ("cert_file", "key_file"):
        path = getattr(t, field)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"$.server.tls.{field}: cannot read {path!r}: {exc.strerror}") from None
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(t.cert_file, t.key_file, t.key_password)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"$.server.tls: the certificate and key do not load together ({exc}); PEM files, the key"
            " matching the certificate, `key_password` for an encrypted key"
        ) from None


def _validate_edge(s: ServerConfig) -> None:
    if s.proxy_protocol and not s.trusted_proxies:
        raise ConfigError("$.server.proxy_protocol: needs `trusted_proxies` (whose headers to believe)")
    if s.proxy_protocol and s.engine is not ServerEngine.UVLOOP:
        raise ConfigError("$.server.proxy_protocol: only with `engine: uvloop` (granian cannot read it)")
    for i, cidr in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"$.server.trusted_proxies[{i}]: not a CIDR ({exc})") from None
    h = s.security_headers
    _check_positive("$.server.security_headers.hsts_max_age_s", h.hsts_max_age_s, allow_zero=True)
    if any(c in h.content_security_policy for c in "\r\n"):
        raise ConfigError("$.server.security_headers.content_security_policy: one line")


_MIN_ADMIN_KEY_CHARS = 32


def _validate_deployments(where: str, m: ModelConfig, kinds: dict[str, ProviderKind]) -> None:
    if (m.provider is None) == (not m.deployments):
        raise ConfigError(f"{where}: set exactly one of `provider` (one deployment) or `deployments`")
    known = ", ".join(sorted(kinds))
    if m.provider is not None and m.provider not in kinds:
        raise ConfigError(f"{where}.provider: unknown provider {m.provider!r} (known: {known})")
    for j, d in enumerate(m.deployments):
        if d.provider not in kinds:
            raise ConfigError(
                f"{where}.deployments[{j}].provider: unknown provider {d.provider!r} (known: {known})"
            )
    providers = [m.provider] if m.provider is not None else [d.provider for d in m.deployments]
    if m.triton is not None:
        if all(kinds[p] is not ProviderKind.TRITON for p in providers):
            raise ConfigError(f"{where}.triton: only for models with a triton provider")
        if m.kind is ModelKind.EMBEDDING:
            raise ConfigError(f"{where}.triton: the chat mapping is not for kind embedding (use `embedding`)")
        _validate_triton_model(f"{where}.triton", m.triton)
    if m.embedding is not None:
        if m.kind is not ModelKind.EMBEDDING:
            raise ConfigError(f"{where}.embedding: only for models of kind embedding")
        if all(kinds[p] is not ProviderKind.TRITON for p in providers):
            raise ConfigError(f"{where}.embedding: only for models with a triton provider")
        for name in ("input", "output"):
            if not getattr(m.embedding, name):
                raise ConfigError(f"{where}.embedding.{name}: must name a tensor")


def _validate_model_kinds(cfg: Config) -> None:
    """A fallback serves the same endpoint: a chat model cannot fall back to an embedding one."""
    kinds = {m.name: m.kind for m in cfg.models}
    for i, m in enumerate(cfg.models):
        for j, fb in enumerate(m.fallbacks):
            for k, target in enumerate(fb.models):
                if target in kinds and kinds[target] is not m.kind:
                    raise ConfigError(
                        f"$.models[{i}].fallbacks[{j}].models[{k}]: {target!r} is a {kinds[target].value}"
                        f" model, {m.name!r} a {m.kind.value} model"
                    )


def model_deployments(m: ModelConfig) -> list[DeploymentConfig]:
    """The model's deployments, the `provider:` shorthand expanded."""
    if m.deployments:
        return m.deployments
    assert m.provider is not None
    return [DeploymentConfig(provider=m.provider)]


_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _validate_tracing(t: TracingConfig) -> None:
    where = "$.tracing"
    url = urlsplit(t.otlp_endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"{where}.otlp_endpoint: must be an http(s):// URL with a host, got {t.otlp_endpoint!r}"
        )
    if not 0.0 <= t.sample_ratio <= 1.0:
        raise ConfigError(f"{where}.sample_ratio: must be between 0 and 1, got {t.sample_ratio}")
    _check_all(where, t, ("max_queue", "batch_max_spans", "flush_interval_ms", "timeout_ms"))


def _validate_extensions(cfg: Config) -> None:
    for i, ext in enumerate(cfg.extensions):
        if not _FACTORY.fullmatch(ext.factory):
            raise ConfigError(
                f"$.extensions[{i}].factory: expected 'package.module:callable', got {ext.factory!r}"
            )


def _validate_ledger(ledger: LedgerConfig) -> None:
    where = "$.ledger"
    _check_all(where, ledger, ("timeout_ms", "batch_max_rows", "flush_interval_ms", "max_queue"))
    postgres = ledger.kind is LedgerKind.POSTGRES
    if postgres and not ledger.dsn:
        raise ConfigError(f"{where}.dsn: required when kind is postgres (postgresql://user@host/db)")
    if postgres and ledger.path:
        raise ConfigError(f"{where}.path: only for kind sqlite (postgres uses `dsn`)")
    if not postgres and ledger.dsn:
        raise ConfigError(f"{where}.dsn: only for kind postgres")
    scheme, sep, _ = ledger.dsn.partition("://")
    if postgres and sep and scheme not in ("postgresql", "postgres"):
        # never echo the DSN: it may hold a password
        raise ConfigError(f"{where}.dsn: must be a postgresql:// URL or a libpq key=value string")


def _validate_access_log(a: AccessLogConfig) -> None:
    where = "$.access_log"
    _check_all(where, a, ("max_bytes", "max_queue", "flush_interval_ms"))
    _check_positive(f"{where}.backups", a.backups, allow_zero=True)
    if not 0.0 <= a.sample_success <= 1.0:
        raise ConfigError(f"{where}.sample_success: must be in [0, 1], got {a.sample_success}")


def _validate_metrics(m: MetricsConfig) -> None:
    where = "$.metrics"
    _check_all(where, m, ("max_keys", "max_teams", "max_series", "publish_interval_ms"))
    if m.max_series > 1_000_000:
        raise ConfigError(f"{where}.max_series: at most 1000000, got {m.max_series}")
    for name in ("latency_buckets", "token_latency_buckets"):
        b = getattr(m, name)
        if not b or len(b) > 64:
            raise ConfigError(f"{where}.{name}: 1..64 bucket bounds, got {len(b)}")
        if any(not 0 < x < float("inf") for x in b) or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ConfigError(f"{where}.{name}: finite positive bounds in increasing order")
    if m.listen:
        host, sep, port = m.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"{where}.listen: expected 'host:port' (e.g. 127.0.0.1:9464), got {m.listen!r}")


def _validate_admin(cfg: Config) -> None:
    admin = cfg.admin
    if admin.api_key is not None and admin.api_key_hash is not None:
        raise ConfigError("$.admin: set at most one of `api_key` and `api_key_hash`")
    if admin.api_key is not None:
        if len(admin.api_key) < _MIN_ADMIN_KEY_CHARS:  # the message never echoes the secret
            raise ConfigError(f"$.admin.api_key: must be at least {_MIN_ADMIN_KEY_CHARS} characters")
        if any(k.key == admin.api_key for k in cfg.auth.keys):
            raise ConfigError("$.admin.api_key: must differ from every API key")
    if admin.api_key_hash is not None:
        if not _KEY_HASH.fullmatch(admin.api_key_hash):
            raise ConfigError("$.admin.api_key_hash: must be 'sha256:' followed by 64 lowercase hex digits")
        if not cfg.auth.salt:
            raise ConfigError("$.auth.salt: required when the admin key is given as `api_key_hash`")
        if any(k.key_hash == admin.api_key_hash for k in cfg.auth.keys):
            raise ConfigError("$.admin.api_key_hash: must differ from every API key")


def _validate_triton_model(where: str, t: TritonModelConfig) -> None:
    _check_positive(f"{where}.default_max_tokens", t.default_max_tokens)
    _check_positive(f"{where}.priority_levels", t.priority_levels, allow_zero=True)
    if t.chat_template and t.chat_template_file:
        raise ConfigError(f"{where}: set at most one of chat_template and chat_template_file")
    if any(not s for s in t.stop):
        raise ConfigError(f"{where}.stop: stop words must not be empty")


def _validate_on_error_by(cfg: Config, g: GuardConfig, where: str) -> None:
    by = (("key", g.on_error_by_key), ("team", g.on_error_by_team), ("tier", g.on_error_by_tier))
    if any(m for _, m in by) and not cfg.auth.enabled:
        raise ConfigError(f"{where}: on_error_by_* needs auth.enabled (callers have no key, team or tier)")
    for what, mapping in by:
        for name in mapping:
            if not name:
                raise ConfigError(f"{where}.on_error_by_{what}: empty {what} name")
    for tier in g.on_error_by_tier:
        if tier not in cfg.tiers:
            known = ", ".join(sorted(cfg.tiers))
            raise ConfigError(f"{where}.on_error_by_tier: unknown tier {tier!r} (known: {known})")


def _validate_guards(cfg: Config, models: set[str]) -> None:
    triton = {p.name for p in cfg.providers if p.kind is ProviderKind.TRITON}
    seen: set[str] = set()
    for i, g in enumerate(cfg.guards):
        where = f"$.guards[{i}]"
        if not re.fullmatch(r"[a-z0-9_]{1,64}", g.name):
            raise ConfigError(f"{where}.name: use 1-64 of [a-z0-9_] (it becomes an error code)")
        if g.name in seen:
            raise ConfigError(f"{where}.name: duplicate guard name {g.name!r}")
        seen.add(g.name)
        _check_positive(f"{where}.timeout_ms", g.timeout_ms)
        for m in g.models:
            if m not in models:
                raise ConfigError(f"{where}.models: unknown model {m!r}")
        if g.kind is GuardKind.TRITON:
            if g.provider not in triton:
                known = ", ".join(sorted(triton)) or "none configured"
                raise ConfigError(f"{where}.provider: must name a triton provider (known: {known})")
            if not 0.0 < g.threshold <= 1.0:
                raise ConfigError(f"{where}.threshold: must be in (0, 1], got {g.threshold}")
            _check_all(where, g, ("max_chars", "max_batch"))
            _check_positive(f"{where}.min_chars", g.min_chars, allow_zero=True)
            if not 32 <= g.window_chars <= g.max_chars:
                raise ConfigError(f"{where}.window_chars: must be in [32, max_chars], not {g.window_chars}")
            if not 0 <= g.overlap_chars < g.window_chars:
                raise ConfigError(f"{where}.overlap_chars: must be in [0, window_chars), {g.overlap_chars}")
            _validate_on_error_by(cfg, g, where)
        else:
            if g.provider:
                raise ConfigError(f"{where}.provider: only for kind triton")
            if g.check is not GuardCheck.PROMPT:
                raise ConfigError(f"{where}.check: rules guards read prompts (replies: output_guards)")
            if g.on_error_by_key or g.on_error_by_team or g.on_error_by_tier:
                raise ConfigError(f"{where}: a rules guard cannot fail; on_error_by_* is for kind triton")
            if not g.builtin_rules and not g.phrases and not g.patterns:
                raise ConfigError(f"{where}: a rules guard needs builtin_rules, phrases or patterns")
            for rule, pattern in g.patterns.items():
                try:
                    _fastpath.PromptRules([], [(rule, pattern)])  # the engine that will run it
                except _fastpath.FastpathError as exc:
                    raise ConfigError(f"{where}.patterns.{rule}: {exc}") from None
            for rule, phrases in g.phrases.items():
                if not phrases or any(not p.strip() for p in phrases):
                    raise ConfigError(f"{where}.phrases.{rule}: needs non-empty phrases")


#: Budgets are kept as integer nano-USD (exact in Lua doubles below 2**53): at most this many USD.
MAX_BUDGET_USD = 9_000_000
_LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "requests_per_day", "tokens_per_day", "tokens_per_month")
#: Quota counters are integers in Lua doubles (exact below 2**53): at most this many per window.
MAX_QUOTA = 10**15
_BUDGET_FIELDS = ("budget_usd_per_day", "budget_usd_per_month")


def nano_usd_per_token(usd_per_mtok: float) -> int:
    """USD per million tokens -> integer nano-USD per token (1 USD/Mtok = 1,000 nano-USD/token)."""
    return round(usd_per_mtok * 1_000)


def budget_nano_usd(usd: float | None) -> int | None:
    return None if usd is None else round(usd * 1_000_000_000)


def limits_enabled(cfg: Config) -> bool:
    """Whether any limit applies (the pipeline's condition for the `limits` stage)."""
    fields = (*_LIMIT_FIELDS, *_BUDGET_FIELDS)
    return any(getattr(x, f, None) is not None for _, x in limit_sets(cfg) for f in fields)


def limit_sets(cfg: Config) -> list[tuple[str, LimitSet]]:
    """Every limit set of the config with its path: tiers, their models, teams."""
    sets: list[tuple[str, LimitSet]] = [(f"$.tiers.{n}", t) for n, t in cfg.tiers.items()]
    sets += [(f"$.teams.{n}", t) for n, t in cfg.teams.items()]
    sets += [(f"$.tiers.{n}.models.{m}", x) for n, t in cfg.tiers.items() for m, x in t.models.items()]
    return sets


def _validate_limit_set(where: str, obj: LimitSet) -> None:
    fields = _LIMIT_FIELDS + (_BUDGET_FIELDS if isinstance(obj, BudgetLimitSet) else ())
    for field in _LIMIT_FIELDS:
        value = getattr(obj, field)
        if value is not None:
            _check_positive(f"{where}.{field}", value)
            if value > MAX_QUOTA:
                raise ConfigError(f"{where}.{field}: at most {MAX_QUOTA}, got {value}")
    for field in _BUDGET_FIELDS:
        usd = getattr(obj, field, None)
        if usd is not None and not 0 <= usd <= MAX_BUDGET_USD:
            raise ConfigError(f"{where}.{field}: must be 0..{MAX_BUDGET_USD} USD, got {usd}")
    if not obj.enforce and all(getattr(obj, f) is None for f in fields):
        raise ConfigError(f"{where}.enforce: false (shadow mode) needs a limit in the same set")


def _validate_limits(cfg: Config) -> None:
    models = {m.name for m in cfg.models}
    for name, tier in cfg.tiers.items():
        for model in tier.models:
            if model not in models:
                raise ConfigError(f"$.tiers.{name}.models: unknown model {model!r}")
    for where, limits in limit_sets(cfg):
        _validate_limit_set(where, limits)
        if limits.mode is LimitMode.LEASED and cfg.limits.backend is not LimitsBackend.REDIS:
            raise ConfigError(f"{where}.mode: leased needs limits.backend redis (slices of a shared limit)")
    for model, price in cfg.prices.items():
        where = f"$.prices.{model}"
        if model not in models:
            raise ConfigError(f"{where}: unknown model {model!r}")
        for field in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            usd = getattr(price, field)
            if usd is None:
                continue
            if not 0 <= usd <= 1_000_000:
                raise ConfigError(f"{where}.{field}: must be 0..1000000 USD per million tokens, got {usd}")
            if abs(usd * 1_000 - nano_usd_per_token(usd)) > 1e-6:
                raise ConfigError(f"{where}.{field}: at most 3 decimals (nano-USD per token), got {usd}")


def _validate_store(store: KeyStoreConfig) -> None:
    postgres = store.kind is StoreKind.POSTGRES
    if postgres and not store.dsn:
        raise ConfigError("$.auth.store.dsn: required when kind is postgres (postgresql://user@host/db)")
    if postgres and store.path:
        raise ConfigError("$.auth.store.path: only for kind sqlite (postgres uses `dsn`)")
    if not postgres and store.dsn:
        raise ConfigError("$.auth.store.dsn: only for kind postgres")
    scheme, sep, _ = store.dsn.partition("://")
    if postgres and sep and scheme not in ("postgresql", "postgres"):
        # the message never echoes the DSN (it may hold a password)
        raise ConfigError("$.auth.store.dsn: must be a postgresql:// URL or a libpq key=value string")
    _check_positive("$.auth.store.timeout_ms", store.timeout_ms)


def _validate_auth(cfg: Config) -> None:
    _validate_limits(cfg)
    _check_all("$.limits", cfg.limits, ("default_max_tokens", "max_tracked_keys"))
    if cfg.limits.backend is LimitsBackend.REDIS:
        _validate_redis_limits(cfg)
    auth = cfg.auth
    if auth.jwt is not None:
        validate_jwt(auth.jwt)
        for claim in ("team_claim", "tier_claim"):
            if not getattr(auth.jwt, claim):
                raise ConfigError(f"$.auth.jwt.{claim}: must not be empty")
    if auth.salt and len(auth.salt) < _MIN_SALT_CHARS:
        raise ConfigError(f"$.auth.salt: must be at least {_MIN_SALT_CHARS} characters")
    store = auth.store
    if store is not None and store.kind is not StoreKind.NONE:
        if not auth.salt:
            raise ConfigError("$.auth.salt: required by auth.store (stored key hashes need a stable salt)")
        _check_positive("$.auth.store.poll_interval_ms", store.poll_interval_ms)
        _validate_store(store)
    ids: set[str] = set()
    secrets: set[str] = set()
    for i, k in enumerate(auth.keys):
        where = f"$.auth.keys[{i}]"
        if not k.id:
            raise ConfigError(f"{where}.id: must be a non-empty string")
        if k.id in ids:
            raise ConfigError(f"{where}.id: duplicate key id {k.id!r}")
        ids.add(k.id)
        if (k.key is None) == (k.key_hash is None):
            raise ConfigError(f"{where}: set exactly one of `key` and `key_hash`")
        if k.key is not None and len(k.key) < _MIN_KEY_CHARS:
            # The message never echoes the secret.
            raise ConfigError(f"{where}.key: must be at least {_MIN_KEY_CHARS} characters")
        if k.key_hash is not None:
            if not _KEY_HASH.fullmatch(k.key_hash):
                raise ConfigError(f"{where}.key_hash: must be 'sha256:' followed by 64 lowercase hex digits")
            if not auth.salt:
                raise ConfigError("$.auth.salt: required when a key is given as `key_hash`")
        secret = k.key if k.key is not None else k.key_hash
        assert secret is not None
        if secret in secrets:
            raise ConfigError(f"{where}: the same secret is configured twice")
        secrets.add(secret)
        if k.tier not in cfg.tiers:
            raise ConfigError(
                f"{where}.tier: unknown tier {k.tier!r} (known: {', '.join(sorted(cfg.tiers))})"
            )
        if k.expires_at is not None and k.expires_at.tzinfo is None:
            raise ConfigError(f"{where}.expires_at: needs a timezone, e.g. 2030-01-01T00:00:00Z")


#: The Redis limiter keeps a bucket's debt in units of 1/60,000,000 token (microseconds per
#: minute), as integers in Lua doubles: exact up to 2**53, i.e. limits up to this many per minute.
REDIS_MAX_RATE = 150_000_000


def _validate_redis_limits(cfg: Config) -> None:
    r = cfg.limits.redis
    scheme = urlsplit(r.url).scheme
    if scheme in ("redis+cluster", "rediss+cluster"):
        from .redis_cluster import parse_cluster_url

        try:
            parse_cluster_url(r.url)
        except ValueError as exc:  # its messages never echo the URL (it may carry a password)
            raise ConfigError(f"$.limits.redis.url: {exc}") from None
        if "{" in r.key_prefix or "}" in r.key_prefix:
            # the keys' `{key id}` hash tag spreads keys over the cluster: a tag in the prefix
            # would put every key in one slot, a lone brace would cut the tags
            raise ConfigError("$.limits.redis.key_prefix: no '{' or '}' with a Redis Cluster URL")
    elif scheme not in ("redis", "rediss", "unix"):
        # never echo the URL: it may carry a password
        raise ConfigError(
            "$.limits.redis.url: must be a redis://, rediss://, unix:// or redis+cluster://host:port"
            "[,host:port...] URL"
        )
    fields = ("timeout_ms", "retry_interval_ms", "lease_ttl_ms", "max_connections", "slice_renew_ms")
    _check_all("$.limits.redis", r, (*fields, "slice_idle_ms"))
    for where, limits in limit_sets(cfg):
        for field in ("rpm", "tpm"):
            value = getattr(limits, field)
            if value is not None and value > REDIS_MAX_RATE:
                raise ConfigError(f"{where}.{field}: at most {REDIS_MAX_RATE} with limits.backend redis")


def parse(text: str, source: str = "<config>") -> Config:
    """Decode, interpolate and validate config text. Raises ConfigError with a field path."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    raw = _interpolate(raw, "$")
    server = raw.get("server")
    if isinstance(server, dict) and isinstance(server.get("http"), int) and server["http"] in (1, 2):
        server["http"] = str(server["http"])  # `http: 2` reads as an int in YAML
    providers = raw.get("providers")
    if isinstance(providers, list):
        for p in providers:
            if isinstance(p, dict):
                p.setdefault("kind", ProviderKind.OPENAI.value)
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if "unknown field" in msg and "- at `$.providers[" in msg:
            msg += (
                " (each provider `kind` has its own fields: `transport` and `tls_ca_file` are for kind"
                " triton, `max_idle_connections` and `signing` for kind openai, the default)"
            )
        if "unknown field" in msg and msg.endswith("- at `$.storage.s3`"):
            msg += CREDENTIALS_HINT
        # msgspec names no path for the top level ("Object contains unknown field `x`").
        raise ConfigError(msg if " - at `" in msg else f"{msg} - at `$`") from None
    _validate(cfg)
    return _hash_admin_key(_hash_keys(cfg))


def _hash_admin_key(cfg: Config) -> Config:
    """Keep only the admin key's hash, with the final `auth.salt` (which may be empty: the admin
    key is long and random, and its hash never leaves the process)."""
    if cfg.admin.api_key is None:
        return cfg
    admin = AdminConfig(api_key_hash=hash_key(cfg.auth.salt, cfg.admin.api_key))
    return msgspec.structs.replace(cfg, admin=admin)


def default_text() -> str:
    return resources.files("gateway").joinpath("default.yaml").read_text(encoding="utf-8")


def load(path: str | Path | None) -> Config:
    """Load `path`, or the embedded default config when path is None."""
    if path is None:
        return parse(default_text(), "<embedded default>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: the config is not valid UTF-8 (byte {exc.start})") from None
    return parse(text, str(p))


def load_for_worker() -> Config:
    """Workers re-read the config the CLI validated (path passed through the environment)."""
    return load(os.environ.get(envvars.CONFIG) or None)
