"""Observer `ledger`: one usage-ledger row per inference request, after its reply.

`on_done` only builds a row and appends it to the worker's `LedgerWriter` queue: no I/O on the
request path (see `gateway.ledger`). The status is the outcome's (`stage.Outcome`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..config import Config
from ..context import Endpoint, RequestContext
from ..ledger import DayClock, LedgerWriter, Row, open_sink
from ..money import cached_tokens, price_table, usage_cost
from .stage import Outcome, Part

if TYPE_CHECKING:
    from ..schemas import Usage
    from ..worker import Worker

#: a Messages request is served as chat (its dialect switches the endpoint at decode): "messages"
#: names only the ones refused before that
_ENDPOINTS = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "completions",
    Endpoint.EMBEDDINGS: "embeddings",
    Endpoint.MESSAGES: "messages",
    Endpoint.MESSAGES_COUNT_TOKENS: "messages",
    Endpoint.RESPONSES: "responses",
}


class LedgerObserver(Part):
    name = "ledger"
    __slots__ = ("_clock", "_loop", "_prices", "writer")

    def __init__(self, cfg: Config, writer: LedgerWriter | None = None) -> None:
        ledger = cfg.ledger
        self.writer = writer or LedgerWriter(
            open_sink(ledger),
            batch_max_rows=ledger.batch_max_rows,
            flush_interval_s=ledger.flush_interval_ms / 1000,
            max_queue=ledger.max_queue,
        )
        #: public model -> (nano-USD per prompt token, per completion token). The cost hook:
        #: models without a price cost 0.
        self._prices = price_table(cfg)
        self._clock = DayClock()

    def start(self, worker: Worker) -> None:
        self.writer.start(worker.loop)

    async def close(self) -> None:
        """Write every queued row (the worker is stopping)."""
        await self.writer.aclose()

    def cost_nano_usd(self, model: str | None, usage: Usage | None) -> int:
        price = self._prices.get(model) if model is not None else None
        if price is None or usage is None:
            return 0
        return usage_cost(usage, price)

    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The request is over: queue its row (never raises into the request)."""
        now_ns = time.perf_counter_ns()
        latency_ms = (now_ns - ctx.start_ns) / 1e6
        principal = ctx.principal
        route = ctx.route
        usage = ctx.usage
        prompt = completion = cached = 0
        if usage is not None:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, cached_tokens(usage)
        model = route.name if route is not None else None
        deployment = ctx.deployment  # the answering (last) attempt's; None: no upstream attempt
        ts = time.time() - latency_ms / 1000
        row: Row = (
            ctx.request_id,
            ts,
            self._clock.day(ts),
            principal.key_id if principal is not None else None,
            principal.team if principal is not None else None,
            principal.tier_name if principal is not None else None,
            _ENDPOINTS[ctx.endpoint],
            model,
            deployment.upstream_model if deployment is not None else None,
            ctx.stream,
            outcome.status,
            outcome.error,
            prompt,
            completion,
            self.cost_nano_usd(model, usage),
            round(latency_ms, 3),
            deployment.adapter.name if deployment is not None else None,
            ctx.attempts,
            ctx.cache,
            ctx.prompt,
            cached,
            ctx.plan.describe() if ctx.plan is not None else None,
        )
        self.writer.append(row)
