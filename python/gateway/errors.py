"""The one error taxonomy: every failure the gateway reports is a `Fault` that knows its HTTP
status, OpenAI `type`, log level and whether a retry may help. Handlers never build error JSON
by hand; they raise `GatewayError(Fault.X, message)` and the app turns it into a reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import msgspec


# eq=False: variants with equal specs must stay distinct enum members, not aliases.
@dataclass(frozen=True, slots=True, eq=False)
class _Spec:
    status: int
    type: str
    retryable: bool = False
    log_level: int = logging.DEBUG


class Fault(Enum):
    """Error variants. The enum name, lower-cased, is the OpenAI `code`."""

    INVALID_JSON = _Spec(400, "invalid_request_error")
    INVALID_REQUEST = _Spec(400, "invalid_request_error")
    JSON_TOO_DEEP = _Spec(400, "invalid_request_error")
    UNSUPPORTED_PARAMETER = _Spec(400, "invalid_request_error")
    #: a prompt guard refused the prompt; the error `code` is the guard's name
    PROMPT_BLOCKED = _Spec(400, "invalid_request_error", log_level=logging.INFO)
    #: an output guard found a `block` kind in the reply (pipeline/output_guard.py)
    OUTPUT_BLOCKED = _Spec(400, "invalid_request_error", log_level=logging.INFO)
    UNAUTHORIZED = _Spec(401, "authentication_error")
    FORBIDDEN = _Spec(403, "permission_error")
    MODEL_NOT_FOUND = _Spec(404, "not_found_error")
    ROUTE_NOT_FOUND = _Spec(404, "not_found_error")
    METHOD_NOT_ALLOWED = _Spec(405, "invalid_request_error")
    REQUEST_TIMEOUT = _Spec(408, "invalid_request_error")
    BODY_TOO_LARGE = _Spec(413, "invalid_request_error")
    UNSUPPORTED_MEDIA_TYPE = _Spec(415, "invalid_request_error")
    HEADERS_TOO_LARGE = _Spec(431, "invalid_request_error")
    RATE_LIMITED = _Spec(429, "rate_limit_error", retryable=True)
    UPSTREAM_RATE_LIMITED = _Spec(429, "rate_limit_error", retryable=True, log_level=logging.INFO)
    #: limits.backend redis with on_error fail_closed, and Redis is down or slow
    LIMITER_UNAVAILABLE = _Spec(503, "api_error", retryable=True, log_level=logging.WARNING)
    #: a `fail_closed` guard errored or ran out of time
    GUARD_UNAVAILABLE = _Spec(503, "api_error", retryable=True, log_level=logging.WARNING)
    UPSTREAM_REJECTED = _Spec(400, "invalid_request_error", log_level=logging.INFO)
    UPSTREAM_AUTH = _Spec(502, "upstream_error", log_level=logging.ERROR)
    UPSTREAM_ERROR = _Spec(502, "upstream_error", retryable=True, log_level=logging.WARNING)
    UPSTREAM_BAD_RESPONSE = _Spec(502, "upstream_error", retryable=True, log_level=logging.WARNING)
    UPSTREAM_UNAVAILABLE = _Spec(503, "upstream_error", retryable=True, log_level=logging.WARNING)
    UPSTREAM_TIMEOUT = _Spec(504, "timeout_error", retryable=True, log_level=logging.WARNING)
    #: every deployment of the model is at `max_concurrent` and the fair queue is full or its
    #: wait ran out
    UPSTREAM_CAPACITY = _Spec(429, "rate_limit_error", retryable=True, log_level=logging.INFO)
    STREAM_TIMEOUT = _Spec(504, "timeout_error", log_level=logging.INFO)
    #: the gateway-run agent loop did not converge (`gateway.tools.agent`): 508 Loop Detected;
    #: codes `tool_loop_detected`, `tool_iterations_exceeded`
    TOOL_LOOP = _Spec(508, "api_error", log_level=logging.INFO)
    #: the agent loop's `time_budget_ms` ran out; code `tool_time_budget`
    TOOL_TIME_BUDGET = _Spec(504, "timeout_error", log_level=logging.INFO)
    INTERNAL = _Spec(500, "api_error", log_level=logging.ERROR)

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def type(self) -> str:
        return self.value.type

    @property
    def code(self) -> str:
        return self.name.lower()


class ErrorDetail(msgspec.Struct, gc=False):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, gc=False):
    error: ErrorDetail


_encode = msgspec.json.Encoder().encode


class GatewayError(Exception):
    """A failure with a known place in the taxonomy; safe to show to the client."""

    __slots__ = ("code", "fault", "headers", "message", "param")

    def __init__(
        self,
        fault: Fault,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.fault = fault
        self.message = message
        self.param = param
        self.headers = headers
        #: the OpenAI `code`; the fault's name unless the error names something finer (a guard)
        self.code = code or fault.code

    @property
    def status(self) -> int:
        return self.fault.status

    def detail(self) -> ErrorDetail:
        return ErrorDetail(self.message, self.fault.type, self.param, self.code)

    def body(self) -> bytes:
        return _encode(ErrorBody(self.detail()))


#: what a typed decode of a request body raises when the body is not JSON at all (msgspec reports
#: invalid UTF-8 inside a string as UnicodeDecodeError, deep nesting as RecursionError)
JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def json_error(exc: Exception) -> GatewayError:
    """The client's error for one of `JSON_ERRORS`; a ValidationError (a DecodeError too) needs
    its own `except` first."""
    if isinstance(exc, UnicodeDecodeError):
        return GatewayError(Fault.INVALID_JSON, "The request body is not valid UTF-8.")
    if isinstance(exc, RecursionError):
        return GatewayError(Fault.JSON_TOO_DEEP, "The request JSON is nested too deeply.")
    return GatewayError(Fault.INVALID_JSON, f"The request body is not valid JSON: {exc}")


#: how much of a client's input an error message may quote (a 100 KiB model name is not echoed)
QUOTE_LIMIT = 100


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` for an error message: at most `limit` characters, then an ellipsis."""
    return text if len(text) <= limit else text[:limit] + "…"
