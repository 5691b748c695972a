"""Tracing (`tracing.enabled`): stage `trace` and the observer that exports spans over OTLP/HTTP.

The stage runs first: it takes the client's W3C `traceparent` (parent-based sampling: a sampled
parent is traced, an unsampled one is not) or starts a trace sampled at `sample_ratio`, and puts
a `TraceContext` on the request; the adapters send its `traceparent` upstream. After the reply the
observer queues a snapshot of a sampled request (no encoding on the request path); a thread builds
the spans (one server span, one child per pipeline stage from `ctx.timings`, one client span for
the upstream call whose id the upstream saw as its parent) and posts them in batches as OTLP
protobuf. With tracing off neither part is in the chain: the request path pays nothing.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.request
from collections import deque
from typing import TYPE_CHECKING, Any

from ..tracing import TraceContext, parse_traceparent
from .parallel import GROUP_MEMBERS
from .stage import Outcome, Part

if TYPE_CHECKING:
    from ..config import TracingConfig
    from ..context import RequestContext
    from ..worker import Worker

log = logging.getLogger("gateway.tracing")

#: timings that are not request stages (the upstream call is its own span)
_NOT_STAGES = frozenset(("upstream_head", "ttfb", "upstream", "total"))
_OPERATION = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
_LOG_EVERY_S = 10.0


class TraceStage(Part):
    name = "trace"
    __slots__ = ("_ratio",)

    def __init__(self, cfg: TracingConfig) -> None:
        self._ratio = cfg.sample_ratio

    async def on_request(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        parent = parse_traceparent(headers.get("traceparent"))
        if parent is not None:
            ctx.trace = TraceContext(parent[0], parent[1], parent[2], headers.get("tracestate"))
        else:
            sampled = self._ratio >= 1.0 or random.random() < self._ratio
            ctx.trace = TraceContext(os.urandom(16).hex(), None, sampled, None)


class _Done:
    """What a sampled request's spans are built from (taken after the reply)."""

    __slots__ = (
        "end_unix_ns",
        "endpoint",
        "error",
        "first_ns",
        "model",
        "prompt",
        "provider",
        "rag",
        "request_id",
        "start_ns",
        "start_unix_ns",
        "status",
        "stream",
        "system",
        "timings",
        "trace",
        "upstream_model",
        "usage",
    )

    def __init__(self, ctx: RequestContext, outcome: Outcome, trace: TraceContext) -> None:
        now_ns = time.perf_counter_ns()
        self.end_unix_ns = time.time_ns()
        self.start_unix_ns = self.end_unix_ns - (now_ns - ctx.start_ns)
        self.start_ns = ctx.start_ns
        self.first_ns = ctx.first_ns
        self.trace = trace
        self.timings = ctx.timings  # not written after the reply
        self.status = outcome.status
        self.error = outcome.error
        self.endpoint = ctx.endpoint.value
        self.request_id = ctx.request_id
        self.stream = ctx.stream
        route = ctx.route
        self.model = route.name if route is not None else None
        dep = ctx.deployment
        self.upstream_model = dep.upstream_model if dep is not None else None
        self.provider = dep.adapter.name if dep is not None else None
        self.system = dep.adapter.kind if dep is not None else None
        usage = ctx.usage
        self.usage = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None
        self.prompt = ctx.prompt
        rag = ctx.rag
        self.rag = (rag.outcome, ",".join(d.id for d in rag.docs)) if rag is not None else None


class TraceObserver(Part):
    name = "trace"
    __slots__ = ("_cfg", "_dropped", "_last_log", "_queue", "_stop", "_thread", "_wake", "exported")

    def __init__(self, cfg: TracingConfig) -> None:
        self._cfg = cfg
        self._queue: deque[_Done] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._last_log = -1e9
        #: spans sent (for tests and logs)
        self.exported = 0

    def start(self, worker: Worker) -> None:
        self._thread = threading.Thread(target=self._run, name="fastpath-otlp", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = True
            self._wake.set()
            thread.join(self._cfg.timeout_ms / 1000 + 1)
        if self._dropped:
            log.warning("tracing: %d traces dropped (export queue full or export failed)", self._dropped)

    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        trace = ctx.trace
        if trace is None or not trace.sampled:
            return
        if len(self._queue) >= self._cfg.max_queue:
            self._dropped += 1
            return
        self._queue.append(_Done(ctx, outcome, trace))
        if len(self._queue) * 8 >= self._cfg.batch_max_spans:  # about 8 spans a trace
            self._wake.set()

    # ---- the export thread --------------------------------------------------------------------
    def _run(self) -> None:
        interval = self._cfg.flush_interval_ms / 1000
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            while self._queue:
                batch: list[_Done] = []
                spans = 0
                while self._queue and spans < self._cfg.batch_max_spans:
                    done = self._queue.popleft()
                    batch.append(done)
                    spans += 3 + len(done.timings)
                self._export(batch)
            if self._stop:
                return

    def _export(self, batch: list[_Done]) -> None:
        try:
            body = encode(self._cfg.service_name, batch)
            req = urllib.request.Request(
                self._cfg.otlp_endpoint,
                data=body,
                method="POST",
                headers={"content-type": "application/x-protobuf", **self._cfg.headers},
            )
            with urllib.request.urlopen(req, timeout=self._cfg.timeout_ms / 1000) as resp:
                resp.read()
            self.exported += len(batch)
        except Exception as exc:  # the exporter never takes the worker down
            self._dropped += len(batch)
            now = time.monotonic()
            if now - self._last_log >= _LOG_EVERY_S:
                self._last_log = now
                log.warning(
                    "tracing: exporting %d traces to %s failed: %s", len(batch), self._cfg.otlp_endpoint, exc
                )


def encode(service: str, batch: list[_Done]) -> bytes:
    """An OTLP `ExportTraceServiceRequest` (protobuf) with the spans of `batch`."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
    from opentelemetry.proto.common.v1 import common_pb2 as common
    from opentelemetry.proto.resource.v1 import resource_pb2 as resource
    from opentelemetry.proto.trace.v1 import trace_pb2 as tr

    def attrs(items: dict[str, Any]) -> list[Any]:
        out = []
        for k, v in items.items():
            if v is None:
                continue
            if isinstance(v, bool):
                value = common.AnyValue(bool_value=v)
            elif isinstance(v, int):
                value = common.AnyValue(int_value=v)
            elif isinstance(v, float):
                value = common.AnyValue(double_value=v)
            else:
                value = common.AnyValue(string_value=str(v))
            out.append(common.KeyValue(key=k, value=value))
        return out

    spans = []
    for d in batch:
        t = d.trace
        trace_id = bytes.fromhex(t.trace_id)
        server_id = bytes.fromhex(t.span_id)
        failed = d.status >= 500 or (d.status >= 400 and d.status != 499) or d.error is not None
        status = tr.Status(
            code=tr.Status.STATUS_CODE_ERROR if failed else tr.Status.STATUS_CODE_UNSET, message=d.error or ""
        )
        ttft_s = (d.first_ns - d.start_ns) / 1e9 if d.first_ns else None
        operation = _OPERATION.get(d.endpoint, "chat")
        gen_ai = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": d.model,
            "gen_ai.usage.input_tokens": d.usage[0] if d.usage else None,
            "gen_ai.usage.output_tokens": d.usage[1] if d.usage else None,
            "gen_ai.server.time_to_first_token": ttft_s,
        }
        spans.append(
            tr.Span(
                trace_id=trace_id,
                span_id=server_id,
                parent_span_id=bytes.fromhex(t.parent_id) if t.parent_id else b"",
                name=f"POST {d.endpoint}",
                kind=tr.Span.SPAN_KIND_SERVER,
                start_time_unix_nano=d.start_unix_ns,
                end_time_unix_nano=d.end_unix_ns,
                attributes=attrs(
                    {
                        "http.request.method": "POST",
                        "url.path": d.endpoint,
                        "http.response.status_code": d.status,
                        "error.type": d.error,
                        "fastpath.request_id": d.request_id,
                        "fastpath.stream": d.stream,
                        # stages prompts / retrieve: the template version, what was injected
                        "fastpath.prompt": d.prompt,
                        "fastpath.rag.outcome": d.rag[0] if d.rag else None,
                        "fastpath.rag.documents": d.rag[1] if d.rag and d.rag[1] else None,
                        **gen_ai,
                    }
                ),
                status=status,
            )
        )
        # the request stages ran one after the other from the arrival: lay them out in order;
        # the members of a parallel group (pipeline/parallel.py) side by side from its start
        cursor = d.start_unix_ns
        sub = 0
        timings = d.timings
        in_group = {m: g for g, ms in GROUP_MEMBERS.items() if g in timings for m in ms}
        group_start: int | None = None
        for name, ns in timings.items():
            if name in _NOT_STAGES:
                continue
            if name.startswith("guard_"):  # one guard inside stage `guard`, which follows them
                start = cursor + sub
                sub += ns
            elif name in in_group:  # recorded when the group ends: the cursor is at its start
                group_start = cursor if group_start is None else group_start
                start = group_start
                sub = 0
            else:
                if name in GROUP_MEMBERS and group_start is not None:  # the group's own span
                    cursor = group_start
                    group_start = None
                start = cursor
                cursor += ns
                sub = 0
            spans.append(
                tr.Span(
                    trace_id=trace_id,
                    span_id=os.urandom(8),
                    parent_span_id=server_id,
                    name=f"stage {name}",
                    kind=tr.Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=start,
                    end_time_unix_nano=start + ns,
                    attributes=attrs({"fastpath.stage": name}),
                )
            )
        if d.provider is not None and ("upstream_head" in d.timings or "upstream" in d.timings or d.first_ns):
            spans.append(
                tr.Span(
                    trace_id=trace_id,
                    span_id=bytes.fromhex(t.upstream_span_id),
                    parent_span_id=server_id,
                    name=f"{operation} {d.upstream_model}",
                    kind=tr.Span.SPAN_KIND_CLIENT,
                    start_time_unix_nano=cursor,
                    end_time_unix_nano=d.end_unix_ns,
                    attributes=attrs(
                        {
                            **gen_ai,
                            "gen_ai.system": d.system,
                            "fastpath.provider": d.provider,
                            "server.model": d.upstream_model,
                        }
                    ),
                    status=status,
                )
            )
    req = tsvc.ExportTraceServiceRequest(
        resource_spans=[
            tr.ResourceSpans(
                resource=resource.Resource(attributes=attrs({"service.name": service})),
                scope_spans=[
                    tr.ScopeSpans(scope=common.InstrumentationScope(name="fastpath-gateway"), spans=spans)
                ],
            )
        ]
    )
    return bytes(req.SerializeToString())
