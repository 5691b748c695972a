"""The request pipeline (DESIGN.md §2):

    decode -> [auth] -> route -> [limits] -> [guard] -> upstream -> reframe -> respond
           -> [limits.on_finish] -> [account] (the app, once the reply is out)

Stages the config does not enable are not in the chain at all. A request stage either returns
(continue) or raises `GatewayError` (a local error reply); nothing else escapes into the server.
`auth` runs after `decode` because the key's model allow-list needs the model; `limits` runs
after `route` because counting prompt tokens needs the route's tokenizer (and an unknown model
is refused before it costs the key anything); `guard` runs after `limits`, so a flood of prompts
is refused before it reaches a guard model, and before any upstream call. Finish stages run in
reverse order in a `finally` whatever happened (settlement), and before a unary reply is sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Config, LimitsBackend, limits_enabled
from ..context import RequestContext
from ..keystore import open_store
from ..ledger import ledger_on
from ..routing import Route
from ..usage import fill_usage
from . import reframe, respond, upstream
from .account import AccountStage
from .auth import AuthStage
from .decode import DecodeStage
from .limits import LimitsStage
from .route import RouteStage

if TYPE_CHECKING:
    from .limits_redis import RedisLimitsStage


class RequestStage(Protocol):
    name: str

    async def on_request(self, ctx: RequestContext) -> None: ...


class FinishStage(Protocol):
    name: str

    def on_finish(self, ctx: RequestContext) -> None:
        """Runs at least once per request that reached the pipeline; must be idempotent."""


class Pipeline:
    __slots__ = ("_loop", "account", "auth", "finish_stages", "max_stream_s", "ping_s", "request_stages")

    def __init__(self, cfg: Config, routes: dict[str, Route], adapters: dict[str, Any] | None = None) -> None:
        self._loop: asyncio.AbstractEventLoop  # set by start()
        stages: list[RequestStage] = [DecodeStage(cfg.server)]
        finish: list[FinishStage] = []
        self.auth: AuthStage | None = None
        if cfg.auth.enabled:
            self.auth = AuthStage(cfg, open_store(cfg, readonly=True))
            stages.append(self.auth)
        stages.append(RouteStage(routes))
        if cfg.auth.enabled and limits_enabled(cfg):
            limits: LimitsStage | RedisLimitsStage
            if cfg.limits.backend is LimitsBackend.REDIS:
                from .limits_redis import RedisLimitsStage  # imports redis only when used

                limits = RedisLimitsStage(cfg)
            else:
                limits = LimitsStage(cfg)
            stages.append(limits)
            finish.append(limits)
        if cfg.guards:
            from .guard import GuardStage, build_guards  # grpc and tritonclient only when used

            guards = build_guards(cfg.guards, adapters or {})
            stages.append(GuardStage(guards, list(routes)))
        self.request_stages: tuple[RequestStage, ...] = tuple(stages)
        self.finish_stages: tuple[FinishStage, ...] = tuple(reversed(finish))
        #: the usage ledger's row per request: recorded by the app after the reply (its status
        #: is final only then), so not one of `finish_stages`
        self.account = AccountStage(cfg) if ledger_on(cfg.ledger) else None
        self.max_stream_s = cfg.server.max_stream_duration_ms / 1000
        self.ping_s = cfg.server.stream_ping_interval_ms / 1000

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Per-worker background work (key store polling); called from `__rsgi_init__`."""
        self._loop = loop  # get_running_loop() costs a getpid() syscall per call (CPython 3.11)
        if self.auth is not None:
            self.auth.start(loop)
        if self.account is not None:
            self.account.start(loop)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.auth is not None:
            self.auth.close(loop)
        if self.account is not None:
            self.account.close(loop)  # writes every queued row

    def _settle(self, ctx: RequestContext) -> None:
        """Before a unary reply goes out: settle (finish stages) and stamp the total time."""
        for finish in self.finish_stages:
            finish.on_finish(ctx)
        ctx.timings["total"] = time.perf_counter_ns() - ctx.start_ns

    async def handle(self, ctx: RequestContext, protocol: Any) -> None:
        timings = ctx.timings
        try:
            for stage in self.request_stages:
                t = time.perf_counter_ns()
                await stage.on_request(ctx)
                timings[stage.name] = time.perf_counter_ns() - t
            route = ctx.route
            assert route is not None
            adapter = route.adapter
            now = self._loop.time()
            if adapter.kind == "triton":
                from . import triton_relay  # loaded once a Triton provider is configured

                deadline = now + min(self.max_stream_s, adapter.total_timeout_s)
                limits = reframe.StreamLimits(adapter.idle_timeout_s, self.ping_s, deadline)
                await triton_relay.handle(ctx, protocol, limits, deadline, self._settle)
            elif ctx.stream:
                deadline = now + min(self.max_stream_s, adapter.total_timeout_s)
                conn = await upstream.open_upstream(ctx, deadline)
                limits = reframe.StreamLimits(adapter.idle_timeout_s, self.ping_s, deadline)
                await reframe.relay_stream(ctx, protocol, conn, limits)
            else:
                deadline = now + adapter.total_timeout_s
                conn = await upstream.open_upstream(ctx, deadline)
                body = fill_usage(ctx, await upstream.fetch_body(ctx, conn, deadline))
                self._settle(ctx)
                respond.send_json(protocol, ctx, 200, body)
        finally:
            for finish in self.finish_stages:
                finish.on_finish(ctx)
