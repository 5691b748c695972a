"""W3C trace context (`traceparent`): what the trace stage puts on the context and the adapters
propagate to upstreams (HTTP header, Triton gRPC metadata)."""

from __future__ import annotations

import os
import re

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a well-formed `traceparent`, else None."""
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def new_span_id() -> str:
    return os.urandom(8).hex()


class TraceContext:
    """One request's place in a trace: the gateway's server span (`span_id`, child of the
    client's `parent_id` when it sent one) and the upstream call's span (`upstream_span_id`),
    which is the parent the upstream sees."""

    __slots__ = ("parent_id", "sampled", "span_id", "trace_id", "tracestate", "upstream_span_id")

    def __init__(self, trace_id: str, parent_id: str | None, sampled: bool, tracestate: str | None) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.tracestate = tracestate
        self.span_id = new_span_id()
        self.upstream_span_id = new_span_id()

    def upstream_headers(self) -> tuple[tuple[str, str], ...]:
        """`traceparent` (and `tracestate`, passed on as received) for the upstream request."""
        tp = f"00-{self.trace_id}-{self.upstream_span_id}-{'01' if self.sampled else '00'}"
        if self.tracestate:
            return (("traceparent", tp), ("tracestate", self.tracestate))
        return (("traceparent", tp),)
