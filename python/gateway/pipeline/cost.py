"""Response stage `cost` (on when `prices:` lists any model): what a request cost, for the client.

A unary reply of a priced model gets `x-fastpath-cost-usd: <exact decimal USD>` (prompt and
completion tokens of its usage at the model's prices). A stream's headers go out before its usage
is known, so a stream of a priced model ends with the SSE comment
`: x-fastpath-cost-usd <decimal>` just before `[DONE]` (SSE clients ignore comments). Error
replies, streams that end with an error event, unpriced models and replies without usage carry
none. The ledger stays the record of what is charged; this is the same arithmetic, for the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..money import Price, price_table, usage_cost, usd_text
from .stage import Part

if TYPE_CHECKING:
    from ..config import Config
    from ..context import RequestContext
    from ..errors import GatewayError
    from ..upstreams.base import UpstreamCall

HEADER = "x-fastpath-cost-usd"


def cost_nano_usd(ctx: RequestContext, price: Price) -> int | None:
    usage = ctx.usage
    if usage is None:
        return None
    return usage_cost(usage, price)


class _StreamCost:
    __slots__ = ("price",)

    def __init__(self, price: Price) -> None:
        self.price = price

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        return None

    def on_end(self, ctx: RequestContext) -> bytes:
        nano = cost_nano_usd(ctx, self.price)
        if nano is None:
            return b""
        return f": {HEADER} {usd_text(nano)}\n\n".encode()


class CostStage(Part):
    name = "cost"
    __slots__ = ("_prices",)

    def __init__(self, cfg: Config) -> None:
        self._prices = price_table(cfg)

    def _price(self, ctx: RequestContext) -> Price | None:
        route = ctx.route
        return self._prices.get(route.name) if route is not None else None

    def on_stream(self, ctx: RequestContext) -> _StreamCost | None:
        price = self._price(ctx)
        return _StreamCost(price) if price is not None else None

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        price = self._price(ctx)
        if price is not None:
            nano = cost_nano_usd(ctx, price)
            if nano is not None:
                ctx.reply_headers += ((HEADER, usd_text(nano)),)
        return body
