"""Request stages for the parallel-stage tests and benchmark, loaded by a real gateway through
`extensions:` (conftest puts tests/python on the gateway's PYTHONPATH)."""

from __future__ import annotations

import asyncio
from typing import Any

from contract_parts import _append  # one O_APPEND write per line

from gateway.context import RequestContext
from gateway.errors import Fault, GatewayError
from gateway.pipeline.stage import Part


class Sleeper(Part):
    """Waits `ms` (an async sleep: the stand-in for a guard's or a retriever's call), then
    refuses with code `refuse` when set; with `events`, appends `enter`, `exit` or `cancelled`
    per request (name, request id) to that file, the moment it happens. With `model`, only
    requests for that public model."""

    __slots__ = ("events", "model", "ms", "name", "refuse")

    def __init__(self, options: dict[str, Any]) -> None:
        self.name = str(options["name"])
        self.ms = float(options.get("ms", 0))
        self.refuse = options.get("refuse")
        self.events = options.get("events")
        self.model = options.get("model")

    def _event(self, ctx: RequestContext, event: str) -> None:
        if self.events:
            _append(self.events, {"stage": self.name, "id": ctx.request_id, "event": event})

    async def on_request(self, ctx: RequestContext) -> None:
        if self.model is not None and (ctx.route is None or ctx.route.name != self.model):
            return
        self._event(ctx, "enter")
        try:
            if self.ms:
                await asyncio.sleep(self.ms / 1000)
        except asyncio.CancelledError:
            self._event(ctx, "cancelled")
            raise
        self._event(ctx, "exit")
        if self.refuse:
            raise GatewayError(Fault.INVALID_REQUEST, f"refused by {self.name}", code=str(self.refuse))


class ConcurrentSleeper(Sleeper):
    """A `Sleeper` that declares the parallel-stage contract: it writes no slot."""

    __slots__ = ()
    reads = frozenset({"request_id", "route"})
    writes: frozenset[str] = frozenset()


def sleeper(options: dict[str, Any]) -> Sleeper:
    return ConcurrentSleeper(options) if options.get("parallel", True) else Sleeper(options)
