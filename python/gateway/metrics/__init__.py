"""`/metrics`: Prometheus text (OpenMetrics on `Accept`), one scrape for every worker process.

The decision (measured, benchmarks/results/2026-12-04-metrics.md and -metrics-cost-2.md):
**per-worker shards in shared memory, summed at scrape time; the samples recorded in Rust.**
granian workers share nothing, so each worker owns a file `<dir>/<pid>.shard`, mmap'd and seen
as doubles (one 8-byte slot per counter, gauge, histogram bucket and histogram sum; a double is
exact for counts below 2**53 and an aligned 8-byte store is never torn on x86-64/arm64). Which
slots belong to which metric and label set is appended, once per new label set, to the sidecar
`<pid>.series` (one JSON line each). The worker's slots live in a `_fastpath.MetricSlots` and are
copied into the file every `publish_interval_ms`; a scrape, in any worker, reads every shard of
the instance and sums. No locks, no syscalls and no allocation on the request path beyond the
first sighting of a label set: `MetricsObserver.on_done` finds the request's plan (its slots,
cached per request shape) in one dict and makes one call into Rust, which bisects and adds every
sample (request count, duration, stages, TTFT/TPOT/inter-token, token usage, tokens and cost).
Why Rust: the same recording in Python (a bisect and two list updates per sample, ~20 samples)
measured ~2.4 µs in a tight loop but ~4.5 µs inside a loaded gateway (cold caches), over the 3 µs
budget for all metrics together; one call is ~1 µs there. prometheus-client's multiprocess mode
was not chosen: it keeps one file per metric per process, takes a lock and formats label JSON on
each update (several µs per sample). Counters a stage owns (limiter decisions) and gauges
(in flight, ledger queue, pool and channel state) are read by a timer, off the request path.

Directory: `metrics.dir`, else `$TMPDIR/fastpath-metrics-<granian master pid>` (the serve
command, `cli.cmd_serve`, creates it empty and removes the directories of earlier instances
whose master is gone; it passes it to the workers in `FASTPATH_METRICS_DIR`).

Worker restarts: a worker's files stay when it exits. Counters and histograms are summed over
every shard, the dead workers' included, so totals never go back; a new worker (a new pid) starts
its own shard at zero. Gauges (in flight, queue depth, pool sizes) are summed over live workers
only (the pid still exists).

Cardinality: every label value comes from the config (models, providers, guards, stages), from a
bounded set (endpoints, status codes, error codes, token types, limiter decisions and limit
kinds, channel states), or is capped:
teams (`max_teams`), key ids (only with `per_key_labels`, `max_keys`), then past the cap
`__other__`. Each worker also caps its label sets at `max_series`; past it a new label set is
recorded under all-`__other__` labels. Secrets never become labels: keys appear only as their
configured id, and upstream keys, JWTs and the admin key are never read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import envvars
from .._fastpath import MetricSlots
from ..config import Config
from ..context import Endpoint
from ..errors import Fault
from ..money import price_table
from ..pipeline.stage import Part

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..pipeline.stage import Outcome
    from ..worker import Worker

log = logging.getLogger("gateway.metrics")

OTHER = "__other__"
#: labels whose values come from callers (capped); the others come from the config or a fixed set
_UNBOUNDED = frozenset(("team", "key"))
DIR_PREFIX = "fastpath-metrics-"
COUNTER, GAUGE, HISTOGRAM, INFO = "counter", "gauge", "histogram", "info"
NS = 1e-9  # a histogram whose sum is kept in nanoseconds


class Family:
    """One metric: its name, type, help, label names and (histograms) bucket bounds."""

    __slots__ = ("bounds", "bounds_ns", "help", "labels", "name", "scale", "type", "width")

    def __init__(
        self,
        name: str,
        type_: str,
        help_: str,
        labels: tuple[str, ...],
        bounds: list[float] | None = None,
        scale: float = 1.0,
    ) -> None:
        self.name = name
        self.type = type_
        self.help = help_
        self.labels = labels
        self.bounds = list(bounds or ())
        self.bounds_ns = [round(b * 1e9) for b in self.bounds]
        #: slots: a counter or gauge 1; a histogram its buckets, +Inf, then the sum
        self.width = len(self.bounds) + 2 if type_ == HISTOGRAM else 1
        #: what the stored histogram sum is multiplied by when exported (1e-9: kept in ns)
        self.scale = scale


_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304]


#: stage name -> the counter family its `counts` ({labels: n}) is published as
_COUNTED = {
    "planner": "fastpath_planner_decisions",
    "output_classifier": "fastpath_output_classifier_verdicts",
}


def families(cfg: Config) -> dict[str, Family]:
    m = cfg.metrics
    lat, tok = m.latency_buckets, m.token_latency_buckets
    per_key = ("model", "team", "key") if m.per_key_labels else ("model", "team")
    fams = [
        Family(
            "fastpath_requests",
            COUNTER,
            "Inference requests by endpoint, public model, provider, HTTP status and error code.",
            ("endpoint", "model", "provider", "status", "error"),
        ),
        Family("fastpath_requests_in_flight", GAUGE, "Inference requests being served now.", ()),
        Family(
            "gen_ai_server_request_duration_seconds",
            HISTOGRAM,
            "End-to-end request latency as the gateway saw it (refusals included; model 'none' "
            "before routing).",
            ("gen_ai_operation_name", "gen_ai_request_model"),
            lat,
            NS,
        ),
        Family(
            "fastpath_upstream_duration_seconds",
            HISTOGRAM,
            "Upstream call time, request sent to last byte, by provider.",
            ("provider",),
            lat,
            NS,
        ),
        Family(
            "fastpath_stage_duration_seconds",
            HISTOGRAM,
            "Time per request stage (the server-timing names: decode, auth, route, limits, "
            "guard_<name>); the upstream's time is fastpath_upstream_duration_seconds.",
            ("stage",),
            lat,
            NS,
        ),
        Family(
            "gen_ai_server_time_to_first_token_seconds",
            HISTOGRAM,
            "Streams: request start to the first frame ready to send.",
            ("gen_ai_request_model",),
            tok,
            NS,
        ),
        Family(
            "gen_ai_server_time_per_output_token_seconds",
            HISTOGRAM,
            "Streams: (end - first token) / (completion tokens - 1).",
            ("gen_ai_request_model",),
            tok,
            NS,
        ),
        Family(
            "fastpath_inter_token_latency_seconds",
            HISTOGRAM,
            "Streams: the mean gap between upstream reads, one observation per stream.",
            ("gen_ai_request_model",),
            tok,
        ),
        Family(
            "gen_ai_client_token_usage",
            HISTOGRAM,
            "Tokens per request by type: input, output, and cached (the prompt tokens the upstream "
            "served from its cache, usage.prompt_tokens_details.cached_tokens, when it reports them).",
            ("gen_ai_request_model", "gen_ai_token_type"),
            [float(b) for b in _TOKEN_BUCKETS],
        ),
        Family(
            "fastpath_tokens",
            COUNTER,
            "Tokens by model, team and type (input, output, cached: part of input).",
            (*per_key, "type"),
        ),
        Family("fastpath_cost_usd", COUNTER, "Cost in USD at the configured prices.", per_key),
        Family(
            "fastpath_limiter_decisions",
            COUNTER,
            "Limiter decisions: allowed; refused, by the limit that refused (limit: rpm, tpm, "
            "concurrency, budget); unavailable (store error with fail_closed). limit is 'none' "
            "unless refused.",
            ("decision", "limit"),
        ),
        Family(
            "fastpath_limiter_fail_open",
            COUNTER,
            "Decisions made locally because the shared limiter store failed (fail_open).",
            (),
        ),
        Family("fastpath_guard_verdicts", COUNTER, "Prompt guard verdicts.", ("guard", "verdict")),
        Family(
            "fastpath_output_classifier_verdicts",
            COUNTER,
            "Reply checks by a classifier guard (response stage output_classifier), per stream window or "
            "unary reply: pass, blocked, fail_open, fail_closed.",
            ("guard", "verdict"),
        ),
        Family("fastpath_guard_duration_seconds", HISTOGRAM, "Prompt guard latency.", ("guard",), lat, NS),
        Family("fastpath_ledger_queue_depth", GAUGE, "Usage rows queued for the ledger.", ()),
        Family("fastpath_ledger_dropped_rows", COUNTER, "Usage rows dropped (queue full).", ()),
        Family("fastpath_ledger_written_rows", COUNTER, "Usage rows written.", ()),
        Family(
            "fastpath_upstream_pool_idle_connections",
            GAUGE,
            "Idle pooled HTTP connections per provider.",
            ("provider",),
        ),
        Family(
            "fastpath_upstream_channel_state",
            GAUGE,
            "gRPC (Triton) providers: 1 for the channel's current connectivity state, 0 for the "
            "others (idle, connecting, ready, transient_failure, shutdown).",
            ("provider", "state"),
        ),
        Family(
            "fastpath_deployment_up",
            GAUGE,
            "1 while a model's deployment takes traffic: its health check passes and its circuit "
            "breaker is not open (summed over workers: the workers that see it up).",
            ("gen_ai_request_model", "deployment"),
        ),
        Family(
            "fastpath_deployment_in_flight",
            GAUGE,
            "Requests in flight on a model's deployment (the balancer's load signal).",
            ("gen_ai_request_model", "deployment"),
        ),
        Family(
            "fastpath_deployment_ejections",
            COUNTER,
            "Circuit-breaker ejections of a model's deployment.",
            ("gen_ai_request_model", "deployment"),
        ),
        Family(
            "fastpath_routing_events",
            COUNTER,
            "Routing events per model: retry, fallback (to another model), hedge (a second attempt "
            "for a slow first token), cache_hit / cache_miss / cache_shared (single-flight).",
            ("gen_ai_request_model", "event"),
        ),
        Family(
            "fastpath_planner_decisions",
            COUNTER,
            "Planner decisions (stage planner): the model asked for, the class (simple, hard, unknown: "
            "the classifier was unavailable), the model chosen, and the decision (routed, shadow: "
            "reported only, fallback: the default model).",
            ("gen_ai_request_model", "class", "target", "decision"),
        ),
        Family(
            "fastpath_build",
            INFO,
            "Build information.",
            ("version", "python"),
        ),
    ]
    return {f.name: f for f in fams}


# ---- the per-worker shard -------------------------------------------------------------------------
#: shards opened by this process: the first is `<pid>`, a reload's are `<pid>.<n>`
_opened = 0


class Shard:
    """This worker's slots (see the module doc). `slot(family, labels)` -> index in `self.slots`."""

    def __init__(self, directory: Path, max_series: int, max_width: int, tables: list[list[float]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        global _opened
        pid = os.getpid()
        # a reloaded config's observer (gateway.reload) gets its own files: `<pid>.<n>`
        self.stem = str(pid) if _opened == 0 else f"{pid}.{_opened}"
        _opened += 1
        self.directory = directory
        self.path = directory / f"{self.stem}.shard"
        self.max_series = max_series
        #: the cap's series, the overflow series, then one sink (a width) past the end
        self.capacity = (max_series + 1024) * max_width
        size = (self.capacity + max_width) * 8
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._mv = memoryview(self._mm).cast("d")
        #: the slots this worker writes, in Rust (one call records a request; the bucket tables
        #: are `tables`), copied into the shared file by `flush` (every `publish_interval_ms`)
        self.slots = MetricSlots(self.capacity + max_width, tables)
        self._side = open(directory / f"{self.stem}.series", "w", encoding="utf-8")  # noqa: SIM115
        self._series: dict[tuple[str, tuple[str, ...]], int] = {}
        self._next = 0

    def slot(self, fam: Family, labels: tuple[str, ...]) -> int:
        key = (fam.name, labels)
        base = self._series.get(key)
        if base is not None:
            return base
        if len(self._series) >= self.max_series:
            # over the cap: the unbounded labels (team, key) become `__other__`; the bounded
            # ones stay, so the overflow series are few (models x token types at most)
            labels = tuple(OTHER if n in _UNBOUNDED else v for n, v in zip(fam.labels, labels, strict=True))
            key = (fam.name, labels)
            base = self._series.get(key)
            if base is not None:
                return base
        base = self._next
        if base + fam.width > self.capacity:
            return self.capacity  # the sink past the last series: counted nowhere
        self._next = base + fam.width
        self._series[key] = base
        self._side.write(json.dumps([base, fam.name, list(labels)]) + "\n")
        self._side.flush()
        return base

    def flush(self) -> None:
        """Copy this worker's slots into its shared file (a memcpy of the used part)."""
        n = self._next
        if n:
            with self._mv[:n] as used:
                self.slots.copy_to(used)

    def close(self) -> None:
        self.flush()
        self._side.close()
        self._mv.release()
        self._mm.close()

    def retire(self) -> None:
        """`<stem>.retired`: its counters still count, its gauges no longer (a replaced config's
        pool sizes and in-flight count are not the worker's any more)."""
        with contextlib.suppress(OSError):
            (self.directory / f"{self.stem}.retired").touch()

    @property
    def series(self) -> int:
        return len(self._series)


# ---- the observer (the request path) ------------------------------------------------------------
_OPERATIONS = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "text_completion",
    Endpoint.EMBEDDINGS: "embeddings",
    # refused before decode (which makes them chat requests)
    Endpoint.MESSAGES: "chat",
    Endpoint.MESSAGES_COUNT_TOKENS: "chat",
    Endpoint.RESPONSES: "chat",
}
#: stage names whose time another histogram records (`MetricSlots.stage`: -1 skip, -2 upstream)
_STAGE_SKIP, _STAGE_UPSTREAM = -1, -2
#: gRPC's channel connectivity states, the values of fastpath_upstream_channel_state's `state`
CHANNEL_STATES = ("idle", "connecting", "ready", "transient_failure", "shutdown")


class _Capped:
    """label value -> itself for the first `cap` distinct values, then `__other__`."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        v = self.seen.get(value)
        if v is None:
            v = value if len(self.seen) < self.cap else OTHER
            if v is value:
                self.seen[value] = v
        return v


class MetricsObserver(Part):
    """Observer `metrics`: every per-request sample in one `on_done` (one call into Rust);
    gauges and stage-owned counters read on a timer, off the request path."""

    name = "metrics"

    def __init__(self, cfg: Config, directory: Path | None = None) -> None:
        m = cfg.metrics
        self.cfg = cfg
        self.fams = families(cfg)
        self.dir = directory or metrics_dir(cfg)
        f = self.fams
        width = max(fam.width for fam in f.values())
        tables = [  # the order of MetricSlots' tables: latency ns, token latency ns / s, tokens
            [float(b) for b in f["gen_ai_server_request_duration_seconds"].bounds_ns],
            [float(b) for b in f["gen_ai_server_time_to_first_token_seconds"].bounds_ns],
            list(f["fastpath_inter_token_latency_seconds"].bounds),
            list(f["gen_ai_client_token_usage"].bounds),
        ]
        self.shard = Shard(self.dir, m.max_series, width, tables)
        self.slots = self.shard.slots
        #: the in-flight gauge, kept by app.py as `v[inflight] += 1.0` / `-= 1.0` (a list item
        #: costs less than a call into Rust); copied into its slot by `publish`
        self.v: list[float] = [0.0]
        self.inflight = 0
        self._inflight_slot = self.shard.slot(f["fastpath_requests_in_flight"], ())
        self._per_key = m.per_key_labels
        self._teams = _Capped(m.max_teams)
        self._keys = _Capped(m.max_keys)
        self._errors = {f.code for f in Fault} | {"budget_exceeded", "client_disconnected", "cancelled"}
        self._errors |= {g.name for g in cfg.guards}
        self._prices = {
            m: (pin * 1e-9, pout * 1e-9, pc * 1e-9) for m, (pin, pout, pc) in price_table(cfg).items()
        }
        self._guards = bool(cfg.guards)
        # per-worker caches: a key of the request's shape -> its plan in `slots`
        self._req: dict[tuple[Any, ...], int] = {}
        self._usage: dict[tuple[Any, ...], int] = {}
        self._misc: dict[tuple[str, tuple[str, ...]], int] = {}
        self._f_stage = f["fastpath_stage_duration_seconds"]
        self._b_stage = f["fastpath_stage_duration_seconds"].bounds_ns
        for name in ("total", "upstream_head", "ttfb"):  # covered by the duration/TTFT histograms
            self.slots.stage(name, _STAGE_SKIP)
        self.slots.stage("upstream", _STAGE_UPSTREAM)  # by provider, in the request's plan
        self.slots.set(self.shard.slot(f["fastpath_build"], (_version(), _python())), 1.0)
        self._task: asyncio.Task[None] | None = None
        self._sources: list[Any] = []
        self._clock = time.monotonic  # the loop's clock once started (transports' times are in it)
        self._routes: dict[str, Any] = {}  # the worker's, once started (deployment health)

    # -- slots for a label set (first sighting only; then cached) --
    def _slot(self, name: str, labels: tuple[str, ...]) -> int:
        key = (name, labels)
        s = self._misc.get(key)
        if s is None:
            s = self._misc[key] = self.shard.slot(self.fams[name], labels)
        return s

    def _req_plan(self, key: tuple[Any, ...]) -> int:
        endpoint, route, deployment, status, error, stream = key
        model = route.name if route is not None else "none"
        provider = deployment.adapter.name if deployment is not None else "none"
        err = "" if error is None else (error if error in self._errors else OTHER)
        sl = self.shard.slot
        f = self.fams
        usage = f["gen_ai_client_token_usage"]
        plan = self.slots.plan(
            sl(f["fastpath_requests"], (endpoint.value, model, provider, str(status), err)),
            sl(f["gen_ai_server_request_duration_seconds"], (_OPERATIONS[endpoint], model)),
            sl(f["fastpath_upstream_duration_seconds"], (provider,)),
            sl(f["gen_ai_server_time_to_first_token_seconds"], (model,)) if stream else 0,
            sl(f["gen_ai_server_time_per_output_token_seconds"], (model,)) if stream else 0,
            sl(f["fastpath_inter_token_latency_seconds"], (model,)) if stream else 0,
            sl(usage, (model, "input")),
            sl(usage, (model, "output")),
            sl(usage, (model, "cached")),
        )
        if len(self._req) < 4096:
            self._req[key] = plan
        return plan

    def _usage_plan(self, key: tuple[Any, ...]) -> int:
        model, team, kid = key
        labels = (model, self._teams(team), self._keys(kid)) if self._per_key else (model, self._teams(team))
        f = self.fams
        sl = self.shard.slot
        prices = self._prices.get(model, (0.0, 0.0, 0.0))
        plan = self.slots.usage_plan(
            sl(f["fastpath_tokens"], (*labels, "input")),
            sl(f["fastpath_tokens"], (*labels, "output")),
            sl(f["fastpath_tokens"], (*labels, "cached")),
            sl(f["fastpath_cost_usd"], labels),
            prices,
        )
        if len(self._usage) < 8192:
            self._usage[key] = plan
        return plan

    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        # Hot: every request. The label sets' slots are looked up once per request shape (a
        # plan in `slots`); the samples are recorded by one call into Rust (`MetricSlots`).
        # Latency sums are kept in ns (`Family.scale` turns them into seconds at scrape time).
        end = time.perf_counter_ns()
        route = ctx.route
        first_ns = ctx.first_ns
        # `is`, not the Enum in the key: an Enum's __hash__ is Python code (~0.15 µs)
        key = (ctx.endpoint, route, ctx.deployment, outcome.status, outcome.error, first_ns != 0)
        plan = self._req.get(key)
        if plan is None:
            plan = self._req_plan(key)
        usage = ctx.usage
        uplan = -1
        prompt = completion = cached = 0
        if usage is not None and route is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            details = usage.prompt_tokens_details
            if details:  # UNSET and None are false
                cached = min(details.cached_tokens or 0, prompt)  # as `money.cached_tokens`
            p = ctx.principal
            if p is None:
                ukey: tuple[str, str, str] = (route.name, "none", "none")
            else:
                ukey = (route.name, p.team, p.key_id if self._per_key else "")
            u = self._usage.get(ukey)
            uplan = u if u is not None else self._usage_plan(ukey)
        itl = -1.0
        if first_ns:
            gaps = ctx.gaps
            if gaps is not None and gaps.count:
                itl = gaps.total / gaps.count  # seconds (the loop's clock)
            ttft, tail = first_ns - ctx.start_ns, end - first_ns
        else:
            ttft = tail = 0
        timings = ctx.timings
        unknown = self.slots.request(
            plan, end - ctx.start_ns, timings, ttft, tail, itl, uplan, prompt, completion, cached, -1
        )
        if unknown is not None:  # a stage name seen the first time: its histogram, then this sample
            for name in unknown:
                base = self.shard.slot(self._f_stage, (name,))
                self.slots.stage(name, base)
                self.slots.observe(base, 0, float(timings[name]))
        if self._guards:
            self._guard_verdicts(ctx)

    def _guard_verdicts(self, ctx: RequestContext) -> None:
        slots = self.slots
        for name, value in ctx.reply_headers:
            if name != "x-fastpath-guard":
                continue
            for item in value.split(", "):
                guard, _, rest = item.partition("=")
                verdict = rest.partition(";")[0]
                if guard and verdict:
                    slots.add(self._slot("fastpath_guard_verdicts", (guard, verdict)), 1.0)
                    ns = ctx.timings.get(f"guard_{guard}")
                    if ns is not None:
                        slots.observe(self._slot("fastpath_guard_duration_seconds", (guard,)), 0, float(ns))

    # -- gauges and stage-owned counters, published off the request path --
    def start(self, worker: Worker) -> None:
        self._clock = worker.loop.time
        self._routes = worker.routes
        self._task = worker.loop.create_task(self._publish_loop())

    def watch(self, *sources: Any) -> None:
        """Objects to read each publish: the ledger writer, the limits stage, adapters."""
        self._sources.extend(sources)

    async def _publish_loop(self) -> None:
        interval = self.cfg.metrics.publish_interval_ms / 1000
        while True:
            try:
                self.publish()
            except Exception:
                log.exception("metrics: publishing gauges failed")
            await asyncio.sleep(interval)

    def publish(self) -> None:
        """Gauges and stage-owned counters into slots, then every slot into the shared file."""
        try:
            self.slots.set(self._inflight_slot, self.v[self.inflight])
            self._publish_sources()
        finally:
            self.shard.flush()

    def _publish_sources(self) -> None:
        put = self.slots.set
        slot = self._slot
        for src in self._sources:
            writer = getattr(src, "writer", None)
            if writer is not None and hasattr(writer, "dropped"):
                put(slot("fastpath_ledger_queue_depth", ()), float(writer.queued))
                put(slot("fastpath_ledger_dropped_rows", ()), float(writer.dropped))
                put(slot("fastpath_ledger_written_rows", ()), float(writer.written))
            store = getattr(src, "store", None)
            if store is not None and hasattr(store, "fail_open"):
                put(slot("fastpath_limiter_fail_open", ()), float(store.fail_open))
            decisions = getattr(src, "decisions", None)
            if decisions is not None:  # the limits stage's own counters (see LimitsStage)
                for labels, n in zip(src.DECISION_LABELS, decisions, strict=True):
                    if n:
                        put(slot("fastpath_limiter_decisions", labels), float(n))
            counted = _COUNTED.get(getattr(src, "name", ""))
            if counted is not None:  # a stage's own counters (labels from the config)
                for labels, n in list(src.counts.items()):
                    put(slot(counted, labels), float(n))
            pool = getattr(src, "pool", None)
            idle = getattr(pool, "idle_connections", None)
            if idle is not None:
                put(slot("fastpath_upstream_pool_idle_connections", (src.name,)), float(idle))
            transport = getattr(src, "transport", None)
            state = getattr(transport, "channel_state", None)
            if state is not None:
                now = state(self._clock())
                for s in CHANNEL_STATES:
                    put(slot("fastpath_upstream_channel_state", (src.name, s)), float(s == now))
        for model, route in self._routes.items():
            if getattr(route, "name", model) != model:
                continue  # an alias: its route is published under the model's name
            for dep in getattr(route, "deployments", ()):
                breaker = getattr(dep, "breaker", None)
                up = dep.healthy and getattr(breaker, "state", "closed") != "open"
                labels = (model, dep.name)
                put(slot("fastpath_deployment_up", labels), float(up))
                put(slot("fastpath_deployment_in_flight", labels), float(dep.outstanding))
                if breaker is not None and breaker.ejections:
                    put(slot("fastpath_deployment_ejections", labels), float(breaker.ejections))
            for event, n in getattr(route, "events", {}).items():
                put(slot("fastpath_routing_events", (model, event)), float(n))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            self.publish()  # the last values of this worker's counters
        except Exception:
            log.exception("metrics: publishing gauges failed")
        self.shard.retire()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastpath-gateway")
    except Exception:
        return "unknown"


def _python() -> str:
    import platform

    return platform.python_version()


# ---- the directory -------------------------------------------------------------------------------
def metrics_dir(cfg: Config) -> Path:
    """Where this instance's shards live (set by `prepare_dir` in the serve command)."""
    env = os.environ.get(envvars.METRICS_DIR)
    if env:
        return Path(env)
    if cfg.metrics.dir:
        return Path(cfg.metrics.dir)
    # not started by `serve` (tests, tools): this process alone
    return Path(tempfile.gettempdir()) / f"{DIR_PREFIX}{os.getpid()}"


def prepare_dir(cfg: Config) -> Path:
    """In the serve command (the granian master), before workers start: this instance's empty
    directory, and the directories of earlier instances whose master is gone removed."""
    if cfg.metrics.dir:
        path = Path(cfg.metrics.dir)
        shutil.rmtree(path, ignore_errors=True)
    else:
        base = Path(tempfile.gettempdir())
        for old in base.glob(f"{DIR_PREFIX}*"):
            pid = old.name.removeprefix(DIR_PREFIX)
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        path = base / f"{DIR_PREFIX}{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.environ[envvars.METRICS_DIR] = str(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
