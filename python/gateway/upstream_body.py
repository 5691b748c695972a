"""The body an upstream gets: the client's bytes forwarded untouched unless something must
change (upstream model name, `stream_options.include_usage` so the gateway always learns usage,
host-choosing fields). Then only the top level is re-encoded: nested values stay raw bytes
(`msgspec.Raw`). Below the stages: `route` makes it, `prompts` / `retrieve` remake it after a
rewrite, the dispatcher splices a fallback's model into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from .context import RequestContext
    from .routing import Route

#: Fields some proxies honour to pick the upstream host or key (an SSRF / key-injection vector
#: in peers); never forwarded.
_HOST_CHOOSING = (b'"api_base"', b'"base_url"', b'"api_key"', b'"custom_llm_provider"', b'"extra_headers"')
_HOST_CHOOSING_KEYS = tuple(k.strip(b'"').decode() for k in _HOST_CHOOSING)
_INCLUDE_USAGE = msgspec.Raw(b'{"include_usage":true}')

_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_any = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


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


#: not valid inside JSON text (control characters must be escaped), so it cannot occur elsewhere
_PLACEHOLDER = b"\x00"


def split_template(body: bytes) -> tuple[bytes, bytes]:
    """`body` (a JSON object) around its `model` value: for a deployment of another model
    than the one the body names (a fallback)."""
    top = _raw_top.decode(body)
    top["model"] = msgspec.Raw(_PLACEHOLDER)
    head, _, tail = _encode(top).partition(_PLACEHOLDER)
    return head, tail


def message_text(content: Any) -> str:
    """A chat message's text: the string, or its text parts joined (other parts skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
