"""Stage `route`: public model -> upstream target, and the body the upstream will get.

The client's bytes are forwarded untouched unless something must change (upstream model name,
`stream_options.include_usage` so the gateway always learns usage, host-choosing fields). Then
only the top level is re-encoded: nested values stay raw bytes (`msgspec.Raw`).
"""

from __future__ import annotations

import msgspec

from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError, quote
from ..routing import Route
from .stage import Part

#: Fields some proxies honour to pick the upstream host or key (an SSRF / key-injection vector
#: in peers); never forwarded.
_HOST_CHOOSING = (b'"api_base"', b'"base_url"', b'"api_key"', b'"custom_llm_provider"', b'"extra_headers"')
_HOST_CHOOSING_KEYS = tuple(k.strip(b'"').decode() for k in _HOST_CHOOSING)
_INCLUDE_USAGE = msgspec.Raw(b'{"include_usage":true}')

_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_any = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


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


def upstream_body(ctx: RequestContext, route: Route) -> None:
    """`ctx.upstream_body` (or `body_parts`) from `ctx.body`: also for a stage that rewrote the
    body after routing (stage `prompts`)."""
    ctx.body_parts = None
    view = ctx.view
    assert view is not None
    body = ctx.body
    inject_usage = ctx.stream and not ctx.client_wants_usage
    # A `\u` escape can spell a key without its literal bytes: then look at decoded keys.
    strip = b"\\u" in body or any(k in body for k in _HOST_CHOOSING)
    model_json = route.model_json
    if model_json is not None and route.upstream_model == view.model and not inject_usage and not strip:
        ctx.upstream_body = body
        ctx.body_model = model_json
        return
    top = _raw_top.decode(body)
    # one upstream model: write it; several: a placeholder the dispatcher splices per deployment
    top["model"] = msgspec.Raw(model_json if model_json is not None else _PLACEHOLDER)
    if inject_usage:
        prior = top.get("stream_options")
        opts = _any.decode(prior) if prior is not None else None
        if isinstance(opts, dict):
            opts["include_usage"] = True
            top["stream_options"] = msgspec.Raw(_encode(opts))
        else:
            top["stream_options"] = _INCLUDE_USAGE
    if strip:
        for key in _HOST_CHOOSING_KEYS:
            top.pop(key, None)
    encoded = _encode(top)
    if model_json is not None:
        ctx.upstream_body = encoded
        ctx.body_model = model_json
    else:
        head, _, tail = encoded.partition(_PLACEHOLDER)
        ctx.body_parts = (head, tail)


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


#: not valid inside JSON text (control characters must be escaped), so it cannot occur elsewhere
_PLACEHOLDER = b"\x00"


def split_template(body: bytes) -> tuple[bytes, bytes]:
    """`body` (a JSON object) around its `model` value: for a deployment of another model
    than the one the body names (a fallback)."""
    top = _raw_top.decode(body)
    top["model"] = msgspec.Raw(_PLACEHOLDER)
    head, _, tail = _encode(top).partition(_PLACEHOLDER)
    return head, tail
