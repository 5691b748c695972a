"""The request pipeline (docs/architecture.md):

    request stages: [trace] -> decode -> [auth] -> route -> [retrieve] -> [prompts] -> [limits] -> [guard]
    dispatch:       deployments, retries, fallbacks, hedges, cache -> an answering UpstreamCall
    relay:          frames out, response stages in reverse order ([live_budget], extensions, [cost])
    settle:         finish stages ([limits]): exactly once, before a unary reply or after a stream
    observers:      once, after the reply ([ledger], [access_log], extensions)

Stages the config does not enable are not in the chain at all. A request stage either returns
(continue) or raises `GatewayError` (a local error reply); nothing else escapes into the server.
`auth` runs after `decode` because the key's model allow-list needs the model; `limits` runs
after `route` because counting prompt tokens needs the route's tokenizer (and an unknown model
is refused before it costs the key anything); `guard` runs after `limits`, so a flood of prompts
is refused before it reaches a guard model, and before any upstream call.

Every reply to an inference request, error replies included, is made here (or by the relay),
and every such request ends in `_done`: the observers see each one exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

# granian's public facade re-exports it under this name (mypy sees no explicit re-export)
from granian.rsgi import ProtocolClosed  # type: ignore[attr-defined]

from ..config import Config, limits_enabled
from ..config_output import tools_permissions_on
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..keystore import open_store
from ..ledger import ledger_on
from ..routing.dispatch import Dispatch
from ..routing.health import health_checker
from . import respond
from .decode import DecodeStage
from .disconnect import DisconnectWatch
from .extensions import load_extensions
from .parallel import chain, flat, place_guard
from .relay import Relay, ResponseStage
from .route import RouteStage
from .stage import FinishStage, Observer, Outcome, Part, RequestStage

if TYPE_CHECKING:
    from ..batches.runner import BatchesPart
    from ..conversations import ConversationStore
    from ..jobs.runner import JobsPart
    from ..metrics import MetricsObserver
    from ..worker import Worker
    from .account import LedgerObserver

log = logging.getLogger("gateway")

#: the status observers get for a request whose client left before the reply was complete
CLIENT_CLOSED = 499
CLIENT_CLOSED_CODE = "client_disconnected"
INTERNAL = GatewayError(Fault.INTERNAL, "The gateway failed to handle the request.")


class Pipeline:
    __slots__ = (
        "_close_timeout_s",
        "_loop",
        "archiver",
        "batches",
        "conversations",
        "dialect_stages",
        "finish_stages",
        "jobs",
        "ledger",
        "metrics",
        "observers",
        "relay",
        "request_stages",
        "response_stages",
        "routing_parts",
    )

    def __init__(self, cfg: Config, worker: Worker) -> None:
        self._loop = worker.loop
        self._close_timeout_s = cfg.server.close_timeout_ms / 1000
        stages: list[RequestStage] = []
        finish: list[FinishStage] = []
        response: list[ResponseStage] = []
        observers: list[Observer] = []
        if cfg.prices:  # first in the list: its on_body runs last, on the final body
            from .cost import CostStage

            response.append(CostStage(cfg))
        if cfg.tracing.enabled:  # first: a request refused by any stage is traced too
            from .trace import TraceObserver, TraceStage

            stages.append(TraceStage(cfg.tracing))
            observers.append(TraceObserver(cfg.tracing))
        stages.append(DecodeStage(cfg.server))
        if cfg.auth.enabled:
            from .auth import AuthStage

            stages.append(AuthStage(cfg, open_store(cfg, readonly=True)))
        if cfg.planner.models:  # before route: it picks the model that route resolves
            from .planner import PlannerStage

            stages.append(PlannerStage(cfg, worker))
        stages.append(RouteStage(worker.routes))
        if cfg.retrieval.models:  # before `prompts`: the context it injects
            from .retrieve import RetrieveStage

            retrieve = RetrieveStage(cfg, worker)
            stages.append(retrieve)
            response.append(retrieve)  # opt-in `citations` in unary bodies
        if cfg.prompts or cfg.retrieval.models:  # before limits: the injected tokens are counted
            from .prompts import PromptStage

            stages.append(PromptStage(cfg))
        agent_dispatch = None
        if cfg.tools.models or cfg.tools.keys:  # before tool_check: tools_allowed covers server tools
            from ..tools.agent import build as build_agent

            agent, agent_dispatch = build_agent(cfg, worker)
            stages.append(agent)
        tool_check = None
        if cfg.tool_validation.enabled or tools_permissions_on(cfg):
            from .tool_check import ToolCheckStage

            tool_check = ToolCheckStage(cfg)
            stages.append(tool_check)  # a forbidden tool is refused before limits count it
        if cfg.auth.enabled and limits_enabled(cfg):
            from .limits import LimitsStage

            limits = LimitsStage(cfg)
            stages.append(limits)
            finish.append(limits)
            if cfg.limits.live_budget_enforcement:
                from .live_budget import LiveBudgetStage

                response.append(LiveBudgetStage())
        if cfg.guards:
            from .guard import GuardStage, build_guards  # grpc and tritonclient only when used

            guard = GuardStage(build_guards(cfg.guards, worker.adapters), list(worker.routes))
            place_guard(stages, guard, cfg.pipeline.parallel_stages)  # beside retrieve: it overlaps
        if cfg.output_guards:
            from .output_guard import OutputGuardStage

            response.append(OutputGuardStage(cfg.output_guards, list(worker.routes)))
        if any(g.check != "prompt" for g in cfg.guards):  # classifier guards that read replies
            from .output_classifier import OutputClassifierStage

            response.append(OutputClassifierStage(cfg.guards, worker.adapters, list(worker.routes)))
        if tool_check is not None:  # after the output guard here: it sees the frames first
            response.append(tool_check)
        #: the usage ledger's observer (the admin usage route flushes it); None when off
        self.ledger: LedgerObserver | None = None
        if ledger_on(cfg.ledger):
            from .account import LedgerObserver

            self.ledger = LedgerObserver(cfg)
            observers.append(self.ledger)
        if cfg.access_log.enabled:
            from .access_log import AccessLogObserver

            observers.append(AccessLogObserver(cfg))
        #: the `/metrics` observer (app.py serves the scrape); None when off
        self.metrics: MetricsObserver | None = None
        if cfg.metrics.enabled:
            from ..metrics import MetricsObserver

            self.metrics = MetricsObserver(cfg)
            self.metrics.watch(*stages, *response, *observers, *worker.adapters.values())  # read off the path
            observers.append(self.metrics)
        ext = load_extensions(cfg)
        stages += ext.request_stages
        finish += ext.finish_stages
        response += ext.response_stages
        observers += ext.observers
        #: independent stages grouped to run concurrently (pipeline/parallel.py)
        on = cfg.pipeline.parallel_stages
        self.request_stages: tuple[RequestStage, ...] = chain(stages, worker.loop, on)
        #: the Responses API's conversation store (None: `responses.enabled: false`)
        self.conversations: ConversationStore | None = None
        if cfg.responses.enabled:
            from ..conversations import ConversationStore

            self.conversations = ConversationStore(cfg.responses)
        #: a dialect request's chain (`ctx.dialect`): stage `history` after auth (Responses'
        #: stored conversation needs the caller); OpenAI requests never run it
        from .responses import HistoryStage

        after = next((i + 1 for i, s in enumerate(stages) if s.name == "auth"), None)
        if after is None:
            after = next(i + 1 for i, s in enumerate(stages) if s.name == "decode")
        history = HistoryStage(self.conversations)
        self.dialect_stages: tuple[RequestStage, ...] = chain(
            (*stages[:after], history, *stages[after:]), worker.loop, on
        )
        self.finish_stages: tuple[FinishStage, ...] = tuple(reversed(finish))
        #: in reverse order of the request stages that own them (Envoy's encoder filters)
        self.response_stages: tuple[ResponseStage, ...] = tuple(reversed(response))
        self.observers: tuple[Observer, ...] = tuple(observers)
        #: per-route parts with a lifecycle (response caches), the health checker
        caches = {id(r.cache): r.cache for r in worker.routes.values() if r.cache is not None}
        health = health_checker(worker)  # None unless `routing.health.enabled`
        self.routing_parts: tuple[Any, ...] = (*caches.values(), *(() if health is None else (health,)))
        s = cfg.server
        self.relay = Relay(
            worker.loop,
            s.max_stream_duration_ms / 1000,
            s.stream_ping_interval_ms / 1000,
            self.response_stages,
            agent_dispatch or Dispatch(worker.loop, s.max_stream_duration_ms / 1000),
        )
        #: async requests (`jobs.enabled`): the queue client and this worker's job runner
        self.jobs: JobsPart | None = None
        if cfg.jobs.enabled:
            from ..jobs.runner import JobsPart

            self.jobs = JobsPart(cfg, self)
        #: the Batch API (`batches.enabled`): its store, its lane's queue and runner
        self.batches: BatchesPart | None = None
        if cfg.batches.enabled:
            from ..batches.runner import BatchesPart

            self.batches = BatchesPart(cfg, self)
        #: the nightly archive of the ledger and audit log (`storage.archive.enabled`)
        self.archiver: Part | None = None
        if cfg.storage.archive.enabled:
            from ..keystore import data_dir
            from ..objstore.archiver import Archiver

            self.archiver = Archiver(cfg, data_dir() / "archiver.lock")

    def _parts(self) -> list[Any]:
        seen: dict[int, Any] = {}
        jobs = tuple(p for p in (self.jobs, self.batches, self.archiver) if p is not None)
        store = () if self.conversations is None else (self.conversations,)
        for part in (
            *flat(self.request_stages),
            *store,
            *self.response_stages,
            *self.observers,
            *self.routing_parts,
            *jobs,
        ):
            seen.setdefault(id(part), part)
        return list(seen.values())

    def start(self, worker: Worker) -> None:
        """Per-worker background work (key store polling, the ledger writer); from `__rsgi_init__`."""
        for part in self._parts():
            part.start(worker)

    async def close(self) -> None:
        """Worker shutdown: every part, in reverse order (the ledger drains its queue)."""
        timeout_s = self._close_timeout_s
        for part in reversed(self._parts()):
            name = getattr(part, "name", part)
            try:
                await asyncio.wait_for(part.close(), timeout_s)
            except TimeoutError:
                log.error(
                    "closing %s took longer than %g s (server.close_timeout_ms): left behind", name, timeout_s
                )
            except Exception:
                log.exception("closing %s failed", name)

    # ---- one request ----------------------------------------------------------------------------
    async def serve(self, ctx: RequestContext, protocol: Any, task: asyncio.Task[Any]) -> None:
        """Run the request to its end: a reply (or a stream), or an error reply; never raises
        into the server except a cancellation that is not the client's."""
        watch = DisconnectWatch(protocol, self._loop, task)
        status = 0
        error: str | None = None
        try:
            await self._handle(ctx, protocol)
        except GatewayError as err:
            error = err.code
            if ctx.status == 0:
                self._reply_error(ctx, protocol, err)
                status = ctx.status  # what the client got (a dialect may answer another)
            else:
                log.warning("request %s: error after the response started: %s", ctx.request_id, err.message)
        except asyncio.CancelledError:
            status, error = CLIENT_CLOSED, CLIENT_CLOSED_CODE
            if not watch.fired:
                error = "cancelled"
                raise
            task.uncancel()
            log.info("request %s: client disconnected; upstream call cancelled", ctx.request_id)
        except ProtocolClosed:
            status, error = CLIENT_CLOSED, CLIENT_CLOSED_CODE
            log.info("request %s: client disconnected mid-response", ctx.request_id)
        except Exception:
            error = INTERNAL.code
            log.exception("request %s: internal error", ctx.request_id)
            if ctx.status == 0:
                status = INTERNAL.status
                self._reply_error(ctx, protocol, INTERNAL)
        finally:
            watch.stop()
            if self.observers:
                self._done(ctx, Outcome(status or ctx.status or INTERNAL.status, error or ctx.stream_error))

    async def _handle(self, ctx: RequestContext, protocol: Any) -> None:
        timings = ctx.timings
        try:
            for stage in self.request_stages if ctx.dialect is None else self.dialect_stages:
                t = time.perf_counter_ns()
                await stage.on_request(ctx)
                timings[stage.name] = time.perf_counter_ns() - t
            await self.relay.run(ctx, protocol, self._settle)
        finally:
            self._settle(ctx)  # a no-op when the relay settled

    def _settle(self, ctx: RequestContext) -> None:
        if ctx.settled:
            return
        ctx.settled = True
        for stage in self.finish_stages:
            try:
                stage.on_finish(ctx)
            except Exception:
                log.exception("request %s: settling in %s failed", ctx.request_id, stage.name)

    def refuse(self, ctx: RequestContext, protocol: Any, err: GatewayError) -> None:
        """A request refused before the pipeline (headers, method, content type, body)."""
        self._reply_error(ctx, protocol, err)
        self._done(ctx, Outcome(ctx.status, err.code))

    @staticmethod
    def _reply_error(ctx: RequestContext, protocol: Any, err: GatewayError) -> None:
        if ctx.dialect is not None:  # in the client's API's shape (Anthropic: its types, 529)
            err = ctx.dialect.error(ctx, err)
        ctx.status = err.status
        respond.send_error(protocol, ctx.request_id, err, ctx.ratelimit_headers + ctx.reply_headers)

    def _done(self, ctx: RequestContext, outcome: Outcome) -> None:
        for observer in self.observers:
            try:
                observer.on_done(ctx, outcome)
            except Exception:
                log.exception("request %s: observer %s failed", ctx.request_id, observer.name)
