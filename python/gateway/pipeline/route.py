"""Stage `route`: public model -> upstream target, and the body the upstream will get
(gateway.upstream_body)."""

from __future__ import annotations

from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError, quote
from ..routing import Route
from ..upstream_body import upstream_body
from .stage import Part


class RouteStage(Part):
    name = "route"
    __slots__ = ("routes",)

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes

    async def on_request(self, ctx: RequestContext) -> None:
        view = ctx.view
        assert view is not None
        route = self.routes.get(view.model)
        if route is None:
            raise GatewayError(
                Fault.MODEL_NOT_FOUND,
                f"The model `{quote(view.model)}` does not exist or you do not have access to it.",
                param="model",
            )
        if (route.embedding is None) is (ctx.endpoint is Endpoint.EMBEDDINGS):
            raise _wrong_endpoint(route, ctx.endpoint)
        ctx.route = route
        principal = ctx.principal
        if principal is not None:
            ctx.priority = principal.tier.priority
        upstream_body(ctx, route)


def _wrong_endpoint(route: Route, endpoint: Endpoint) -> GatewayError:
    """A chat request to an embedding model, or the reverse: say which endpoint serves it."""
    if route.embedding is not None:
        what, use = "an embedding model", Endpoint.EMBEDDINGS.value
    else:
        what, use = "not an embedding model", Endpoint.CHAT.value
    return GatewayError(
        Fault.INVALID_REQUEST,
        f"The model `{route.name}` is {what}: it is not served on {endpoint.value}; use {use}.",
        param="model",
        code="model_not_supported",
    )
