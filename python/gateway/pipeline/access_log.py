"""Observer `access_log` (`access_log.enabled`): one JSON line per inference request.

Fields: `ts` (when the request arrived, ISO 8601 UTC), `request_id`, `trace_id` (from a
trace context when tracing is on, else from a well-formed W3C `traceparent` request
header, else null), `client` (the peer address),
`endpoint`, `key_id` / `team` / `tier` (never the secret), `model` (the public model; the
requested one when it was not routed), `upstream_model`, `provider`, `stream`, `status`, `error`
(the outcome's error code), `prompt_tokens` / `completion_tokens`, `cost_usd` (at `prices:`; null
for an unpriced model), `ttft_ms` (streams: first frame ready, from arrival), `total_ms` (arrival
to the end of the reply), `upstream_ms` (waiting on the upstream: its whole body for a unary
reply, its first frame for a stream), `guard` (the `x-fastpath-guard` decisions), `limits` (the
`x-ratelimit-remaining-*` values, by what they count). Never the API key, a header value other
than those, or prompt / completion text.

Off the request path: `on_done` appends a tuple of what it needs (references and numbers, not
the context, whose body may be large) to a bounded queue (full: the
line is dropped and counted); a thread per worker formats and writes the lines in batches every
`flush_interval_ms`, to stdout or to a file rotated by size. Workers share the file: each appends
whole batches (O_APPEND) and rotation happens under an exclusive lock on `<path>.lock`, after which
every worker reopens the new file. `close()` writes what waits. Successes (2xx without an error)
are sampled at `sample_success`; errors are always logged.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from ..money import NANO_PER_USD, price_table, usage_cost
from ..tracing import parse_traceparent
from .stage import Part

if TYPE_CHECKING:
    from ..config import AccessLogConfig, Config
    from ..context import RequestContext
    from ..worker import Worker
    from .stage import Outcome

log = logging.getLogger("gateway.access_log")

_GUARD = "x-fastpath-guard"
_REMAINING = "x-ratelimit-remaining-"
_MAX_MODEL_CHARS = 256


class Line(msgspec.Struct):
    ts: str
    request_id: str
    trace_id: str | None
    client: str | None
    endpoint: str
    key_id: str | None
    team: str | None
    tier: str | None
    model: str | None
    upstream_model: str | None
    provider: str | None
    stream: bool
    status: int
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    ttft_ms: float | None
    total_ms: float
    upstream_ms: float | None
    guard: str | None
    limits: dict[str, str] | None


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` (version-traceid-parentid-flags), None unless valid."""
    parsed = parse_traceparent(traceparent)
    return parsed[0] if parsed is not None else None


# What `on_done` captures (cheap: references and numbers; the formatting is the writer's).
_Raw = tuple[Any, ...]


class _FileSink:
    """Appends batches to `path`; rotates by size under an exclusive lock on `<path>.lock`, so
    the workers that share the file rotate it once, and reopens when another worker rotated."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock_fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o640)
        self._fd = -1
        self._ino = -1

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._ino = os.fstat(self._fd).st_ino

    def _rotate(self) -> None:
        if self.backups == 0:
            os.truncate(self.path, 0)
            return
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def write(self, data: bytes) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is None or st.st_ino != self._ino:
                self._open()  # first write, or another worker rotated the file
                size = 0 if st is None else os.fstat(self._fd).st_size
            else:
                size = st.st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                self._open()
            _write_all(self._fd, data)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1


class _StdoutSink:
    def write(self, data: bytes) -> None:
        _write_all(1, data)

    def close(self) -> None:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AccessLogObserver(Part):
    name = "access_log"
    __slots__ = (
        "_cfg",
        "_dropped_reported",
        "_prices",
        "_queue",
        "_sample",
        "_sink",
        "_stop",
        "_thread",
        "dropped",
        "write_errors",
    )

    def __init__(self, cfg: Config) -> None:
        self._cfg: AccessLogConfig = cfg.access_log
        self._prices = price_table(cfg)
        self._sample = self._cfg.sample_success
        self._queue: deque[_Raw] = deque()
        self._sink: _FileSink | _StdoutSink | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: lines dropped because the queue was full (this worker)
        self.dropped = 0
        self._dropped_reported = 0
        #: batches that could not be written
        self.write_errors = 0

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, worker: Worker | None = None) -> None:
        c = self._cfg
        self._sink = _FileSink(c.path, c.max_bytes, c.backups) if c.path else _StdoutSink()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Write every queued line (the worker is stopping)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join, 10)
        self._thread = None
        if self._sink is not None:
            self._sink.close()

    # ---- the request path -------------------------------------------------------------------
    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        status = outcome.status
        error = outcome.error
        if error is None and 200 <= status < 300 and self._sample < 1.0 and random.random() >= self._sample:
            return
        queue = self._queue
        if len(queue) >= self._cfg.max_queue:
            self.dropped += 1
            return
        view = ctx.view
        queue.append(
            (
                time.time(),
                time.perf_counter_ns() - ctx.start_ns,
                ctx.trace.trace_id if ctx.trace is not None else trace_id(ctx.headers.get("traceparent")),
                status,
                error,
                ctx.request_id,
                ctx.client,
                ctx.endpoint,
                ctx.principal,
                ctx.route,
                ctx.deployment,
                view.model if view is not None else None,
                ctx.stream,
                ctx.usage,
                ctx.first_ns - ctx.start_ns if ctx.first_ns else None,
                ctx.timings,
                ctx.reply_headers,
                ctx.ratelimit_headers,
            )
        )

    # ---- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        interval = self._cfg.flush_interval_ms / 1000
        while True:
            stopping = self._stop.wait(interval)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        queue = self._queue
        encode = msgspec.json.Encoder().encode
        while queue:
            parts: list[bytes] = []
            for _ in range(min(len(queue), 1000)):
                try:
                    parts.append(encode(self._line(queue.popleft())) + b"\n")
                except Exception:
                    log.exception("access log: a line could not be formatted")
            try:
                assert self._sink is not None
                self._sink.write(b"".join(parts))
            except Exception as exc:
                self.write_errors += 1
                log.error("access log: write failed (%d lines lost): %s", len(parts), exc)
        if self.dropped != self._dropped_reported:
            log.warning("access log: %d lines dropped so far (queue full)", self.dropped)
            self._dropped_reported = self.dropped

    def _line(self, raw: _Raw) -> Line:
        (
            wall,
            total_ns,
            trace,
            status,
            error,
            request_id,
            client,
            endpoint,
            principal,
            route,
            dep,
            requested,
            stream,
            usage,
            ttft_ns,
            timings,
            reply_headers,
            ratelimit_headers,
        ) = raw
        prompt = completion = 0
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        model = route.name if route is not None else requested[:_MAX_MODEL_CHARS] if requested else None
        cost: float | None = None
        price = self._prices.get(route.name) if route is not None else None
        if price is not None:
            cost = (usage_cost(usage, price) if usage is not None else 0) / NANO_PER_USD
        waited = [timings[k] for k in ("upstream_head", "upstream", "ttfb") if k in timings]
        guard = None
        for k, v in reply_headers:
            if k == _GUARD:
                guard = v
        limits = {k[len(_REMAINING) :]: v for k, v in ratelimit_headers if k.startswith(_REMAINING)}
        start = datetime.fromtimestamp(wall - total_ns / 1e9, UTC)
        return Line(
            ts=start.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            request_id=request_id,
            trace_id=trace,
            client=client,
            endpoint=endpoint.value,
            key_id=principal.key_id if principal is not None else None,
            team=principal.team if principal is not None else None,
            tier=principal.tier_name if principal is not None else None,
            model=model,
            upstream_model=dep.upstream_model if dep is not None else None,
            provider=dep.adapter.name if dep is not None else None,
            stream=stream,
            status=status,
            error=error,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            ttft_ms=round(ttft_ns / 1e6, 3) if ttft_ns is not None else None,
            total_ms=round(total_ns / 1e6, 3),
            upstream_ms=round(sum(waited) / 1e6, 3) if waited else None,
            guard=guard,
            limits=limits or None,
        )
