"""The typed per-request context passed through the pipeline stages (instead of a dict)."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline.dialect import Dialect
    from .pipeline.planner import Plan
    from .principal import Principal
    from .quota import Lease
    from .routing import Route
    from .routing.deployment import Deployment
    from .schemas import RequestView, Usage
    from .timing import ReadGaps
    from .tracing import TraceContext


class Endpoint(Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    #: Anthropic's Messages API: a dialect (`pipeline/messages.py`) turns it into a chat request
    MESSAGES = "/v1/messages"
    MESSAGES_COUNT_TOKENS = "/v1/messages/count_tokens"
    EMBEDDINGS = "/v1/embeddings"
    #: OpenAI's Responses API: a dialect (`pipeline/responses.py`) turns it into a chat request
    RESPONSES = "/v1/responses"


class RequestContext:
    """One request's state. Slotted: created per request, read by every stage."""

    __slots__ = (
        "attempt_t0",
        "attempts",
        "body",
        "body_model",
        "body_parts",
        "cache",
        "client",
        "client_wants_usage",
        "deployment",
        "dialect",
        "dialect_state",
        "endpoint",
        "first_ns",
        "gaps",
        "headers",
        "lease",
        "plan",
        "principal",
        "priority",
        "prompt",
        "rag",
        "ratelimit_headers",
        "reply_headers",
        "request_id",
        "route",
        "settled",
        "start_ns",
        "status",
        "stream",
        "stream_error",
        "timings",
        "trace",
        "upstream_body",
        "usage",
        "view",
    )

    def __init__(
        self,
        request_id: str,
        endpoint: Endpoint,
        body: bytes,
        start_ns: int,
        headers: Any,
        client: str | None = None,
        dialect: Dialect | None = None,
    ) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        #: the client's API when it is not OpenAI's (Anthropic Messages): it translates the
        #: request at decode, and the reply, stream and errors on the way out; None: OpenAI
        self.dialect = dialect
        #: what the dialect keeps from the client's request for the way out
        self.dialect_state: Any = None
        self.body = body
        self.start_ns = start_ns
        #: the RSGI request headers (`.get(name)` with lower-case names)
        self.headers = headers
        #: the client's address as the server saw it (RSGI `scope.client`, "ip:port")
        self.client = client
        #: who is calling (stage `auth`); None when auth is off
        self.principal: Principal | None = None
        #: what stage `limits` reserved for this request, until it is settled
        self.lease: Lease | None = None
        #: `x-ratelimit-*` headers for every reply to this request, set by stage `limits`
        self.ratelimit_headers: tuple[tuple[str, str], ...] = ()
        #: other headers for every reply (e.g. `x-fastpath-guard`, the guards' decisions)
        self.reply_headers: tuple[tuple[str, str], ...] = ()
        self.view: RequestView | None = None
        self.stream = False
        self.client_wants_usage = False
        #: the error code of an error event that ended a started stream (for the usage ledger)
        self.stream_error: str | None = None
        self.route: Route | None = None
        #: the deployment answering (the last attempt's); None before any upstream attempt
        self.deployment: Deployment | None = None
        #: upstream attempts made (retries, fallbacks and hedges included)
        self.attempts = 0
        #: loop time the answering attempt started (0.0: no slot held on `deployment`)
        self.attempt_t0 = 0.0
        #: the upstream model (JSON) that `upstream_body` names, and the body as a template
        #: around its model value (made when a deployment needs another model name)
        self.body_model = b""
        self.body_parts: tuple[bytes, bytes] | None = None
        #: the response cache's verdict (`hit`, `miss`, `shared`: single-flight); None: not cached
        self.cache: str | None = None
        #: the request's priority (its tier's): the fair queue's order, Triton's `priority`
        self.priority = 0
        self.upstream_body = b""
        self.usage: Usage | None = None
        self.status = 0
        #: perf_counter_ns when a stream's first frame was ready (0: not a stream, or none came);
        #: TTFT as the gateway saw it is `first_ns - start_ns`
        self.first_ns = 0
        #: a stream's gaps between upstream reads (inter-token latency as the gateway saw it)
        self.gaps: ReadGaps | None = None
        #: the W3C trace context (stage `trace`, when `tracing.enabled`); adapters propagate it
        self.trace: TraceContext | None = None
        #: the finish stages (settlement) have run: they run exactly once per request
        self.settled = False
        #: stage name -> nanoseconds spent, for the server-timing header and benchmarks
        self.timings: dict[str, int] = {}
        #: the server-side prompt applied, `name@version` (stage `prompts`); None: none
        self.prompt: str | None = None
        #: what stage `retrieve` found (`pipeline/retrieve.py`'s Retrieved); None: no retriever
        self.rag: Any = None
        #: stage `planner`'s decision (`pipeline/planner.py`'s Plan); None: the model is not planned
        self.plan: Plan | None = None
