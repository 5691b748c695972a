"""Stage `account`: one usage-ledger row per inference request, after its reply.

The row needs the status the client actually got, which only the app knows once every exit
path has run (an error reply is sent after the pipeline's `finally`; a client that leaves is
a cancellation): so the app calls `record` exactly once per request, from its own `finally`,
after the reply or the failure. `record` only builds a tuple and appends it to the worker's
`LedgerWriter` queue: no I/O on the request path (see `gateway.ledger`).

Status recorded: the HTTP status sent (200 for a stream, also one that later ended with an
error event: its error code is recorded), the error's status for a refused or failed request,
499 when the client went away before the reply was complete (nginx's convention), 500 for an
internal error.
"""

from __future__ import annotations

import asyncio
import time

from ..config import Config, nano_usd_per_token
from ..context import Endpoint, RequestContext
from ..errors import GatewayError
from ..ledger import DayClock, LedgerWriter, Row, open_sink

#: the status recorded for a request whose client disconnected before the reply was complete
CLIENT_CLOSED = 499
CLIENT_CLOSED_CODE = "client_disconnected"
_ENDPOINTS = {Endpoint.CHAT: "chat", Endpoint.COMPLETIONS: "completions"}


class AccountStage:
    name = "account"
    __slots__ = ("_clock", "_prices", "writer")

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
        self._prices = {
            model: (nano_usd_per_token(p.input_per_mtok), nano_usd_per_token(p.output_per_mtok))
            for model, p in cfg.prices.items()
        }
        self._clock = DayClock()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.writer.start(loop)

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Write every queued row (the worker is stopping)."""
        self.writer.close(loop)

    def cost_nano_usd(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> int:
        price = self._prices.get(model) if model is not None else None
        if price is None:
            return 0
        return prompt_tokens * price[0] + completion_tokens * price[1]

    def record(self, ctx: RequestContext, status: int, error_code: str | None) -> None:
        """The request is over: queue its row (never raises into the request)."""
        now_ns = time.perf_counter_ns()
        latency_ms = (now_ns - ctx.start_ns) / 1e6
        principal = ctx.principal
        route = ctx.route
        usage = ctx.usage
        prompt = completion = 0
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        model = route.name if route is not None else None
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
            route.upstream_model if route is not None else None,
            ctx.stream,
            status,
            error_code,
            prompt,
            completion,
            self.cost_nano_usd(model, prompt, completion),
            round(latency_ms, 3),
        )
        self.writer.append(row)

    def record_refused(self, request_id: str, endpoint: Endpoint, start_ns: int, err: GatewayError) -> None:
        """A request refused before it had a context (headers, content type, body size or
        deadline): no principal, no model."""
        latency_ms = (time.perf_counter_ns() - start_ns) / 1e6
        ts = time.time() - latency_ms / 1000
        row: Row = (
            request_id,
            ts,
            self._clock.day(ts),
            None,
            None,
            None,
            _ENDPOINTS[endpoint],
            None,
            None,
            False,
            err.status,
            err.code,
            0,
            0,
            0,
            round(latency_ms, 3),
        )
        self.writer.append(row)
