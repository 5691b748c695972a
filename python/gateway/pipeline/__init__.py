"""The request pipeline (DESIGN.md §2):

    decode -> [auth -> limits -> guard] -> route -> upstream -> reframe -> respond -> account

Stages the config does not enable are not in the chain at all. A request stage either returns
(continue) or raises `GatewayError` (a local error reply); nothing else escapes into the server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from ..config import Config
from ..context import RequestContext
from ..routing import Route
from . import reframe, respond, upstream
from .decode import DecodeStage
from .route import RouteStage


class RequestStage(Protocol):
    name: str

    async def on_request(self, ctx: RequestContext) -> None: ...


class Pipeline:
    __slots__ = ("max_stream_s", "ping_s", "request_stages")

    def __init__(self, cfg: Config, routes: dict[str, Route]) -> None:
        self.request_stages: tuple[RequestStage, ...] = (DecodeStage(cfg.server), RouteStage(routes))
        self.max_stream_s = cfg.server.max_stream_duration_ms / 1000
        self.ping_s = cfg.server.stream_ping_interval_ms / 1000

    async def handle(self, ctx: RequestContext, protocol: Any) -> None:
        for stage in self.request_stages:
            await stage.on_request(ctx)
        route = ctx.route
        assert route is not None
        adapter = route.adapter
        now = asyncio.get_running_loop().time()
        if ctx.stream:
            deadline = now + min(self.max_stream_s, adapter.total_timeout_s)
            conn = await upstream.open_upstream(ctx, deadline)
            limits = reframe.StreamLimits(adapter.idle_timeout_s, self.ping_s, deadline)
            await reframe.relay_stream(ctx, protocol, conn, limits)
        else:
            deadline = now + adapter.total_timeout_s
            conn = await upstream.open_upstream(ctx, deadline)
            body = reframe.fill_usage(ctx, await upstream.fetch_body(ctx, conn, deadline))
            ctx.timings["total"] = time.perf_counter_ns() - ctx.start_ns
            respond.send_json(protocol, ctx, 200, body)
