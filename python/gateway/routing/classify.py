"""Upstream failures -> error classes (`config_routing.ErrorClass`), for retry and fallback
rules and for the circuit breaker."""

from __future__ import annotations

import re

from ..config_routing import ErrorClass
from ..errors import Fault, GatewayError

#: failures that count against a deployment's circuit breaker (its fault, not the request's)
BREAKER_FAILURES = frozenset({ErrorClass.CONNECT, ErrorClass.TIMEOUT, ErrorClass.SERVER_ERROR})

#: how OpenAI, vLLM, SGLang and TensorRT-LLM word "the prompt is too long"
_CONTEXT = re.compile(
    r"context[ _]length|context window|maximum context|too many tokens|prompt is too long|"
    r"exceeds? the model|max_model_len|input length",
    re.IGNORECASE,
)
_POLICY = re.compile(r"content[ _](policy|filter|management)|safety system|flagged", re.IGNORECASE)

_BY_FAULT = {
    Fault.UPSTREAM_TIMEOUT: ErrorClass.TIMEOUT,
    Fault.UPSTREAM_RATE_LIMITED: ErrorClass.RATE_LIMITED,
    Fault.UPSTREAM_CAPACITY: ErrorClass.RATE_LIMITED,
    Fault.UPSTREAM_ERROR: ErrorClass.SERVER_ERROR,
    Fault.UPSTREAM_BAD_RESPONSE: ErrorClass.SERVER_ERROR,
    # another deployment may hold working credentials: a server-side problem, not the request's
    Fault.UPSTREAM_AUTH: ErrorClass.SERVER_ERROR,
}


def _from_upstream(err: GatewayError) -> bool:
    """The upstream answered with an HTTP status (rather than not answering)."""
    return any(name == "x-upstream-error-code" for name, _ in err.headers)


def classify(err: GatewayError) -> ErrorClass:
    fault = err.fault
    cls = _BY_FAULT.get(fault)
    if cls is not None:
        return cls
    if fault is Fault.UPSTREAM_UNAVAILABLE:
        return ErrorClass.SERVER_ERROR if _from_upstream(err) else ErrorClass.CONNECT
    if fault is Fault.UPSTREAM_REJECTED:
        if _CONTEXT.search(err.message):
            return ErrorClass.CONTEXT_LENGTH
        if _POLICY.search(err.message):
            return ErrorClass.CONTENT_POLICY
    return ErrorClass.REJECTED


def retry_after_s(err: GatewayError) -> float | None:
    """The upstream's own `Retry-After` (seconds), if it sent one."""
    if not _from_upstream(err):
        return None
    for name, value in err.headers:
        if name == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None
