"""What a request used, in tokens: the prompt counted by the fastpath (the route's tokenizer),
usage filled into unary bodies that lack it, and what settlement charges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from . import _fastpath, embeddings
from .errors import Fault, GatewayError
from .money import usage_cost
from .schemas import EmbeddingsRequestView, ResponseChoicesView, ResponseUsageView, Usage

if TYPE_CHECKING:
    from .context import RequestContext
    from .quota import Lease

_usage_view = msgspec.json.Decoder(ResponseUsageView)
_choices_view = msgspec.json.Decoder(ResponseChoicesView)
_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def counted_prompt_tokens(ctx: RequestContext) -> int:
    assert ctx.route is not None
    view = ctx.view
    if isinstance(view, EmbeddingsRequestView):  # inputs, not a chat body
        return embeddings.count_tokens(view, ctx.route.encoding)
    try:
        return _fastpath.count_chat_tokens(ctx.body, ctx.route.encoding)
    except _fastpath.FastpathError:
        return _fastpath.estimate_tokens(ctx.body.decode("utf-8", "replace"))


def fill_usage(ctx: RequestContext, body: bytes) -> bytes:
    """Record usage from a unary upstream body, adding counted usage if the upstream had none."""
    usage = embeddings.upstream_json(_usage_view, body).usage
    if usage is not None:
        ctx.usage = usage
        return body
    assert ctx.route is not None
    encoding = ctx.route.encoding
    completion = 0
    try:
        for choice in _choices_view.decode(body).choices:
            text = choice.text if choice.message is None else choice.message.content
            if text:
                completion += _fastpath.count_tokens(text, encoding)
            if choice.message is not None and choice.message.tool_calls:
                for call in choice.message.tool_calls:
                    if call.function is not None and call.function.arguments:
                        completion += _fastpath.count_tokens(call.function.arguments, encoding)
        top = _raw_top.decode(body)
    except msgspec.DecodeError:
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream returned invalid JSON.") from None
    except msgspec.ValidationError:
        return body  # not an object with choices: pass it on as the upstream sent it
    prompt = counted_prompt_tokens(ctx)
    usage = Usage(prompt, completion, prompt + completion)
    ctx.usage = usage
    top["usage"] = msgspec.Raw(_encode(usage))
    return _encode(top)


def tokens_used(ctx: RequestContext, prompt_tokens: int) -> int:
    """What a request spent, for settlement: the reported usage; the prompt if the upstream
    answered but reported nothing; nothing if it never answered."""
    usage = ctx.usage
    if usage is not None:
        return usage.prompt_tokens + usage.completion_tokens
    if "upstream_head" in ctx.timings:
        return prompt_tokens
    return 0


def cost_used(ctx: RequestContext, lease: Lease) -> int:
    """What a request cost in nano-USD, by the same rules as `tokens_used`."""
    plan = lease.plan
    if not plan.has_budget:
        return 0
    usage = ctx.usage
    if usage is not None:
        return usage_cost(usage, (plan.in_price, plan.out_price, plan.cached_price))
    if "upstream_head" in ctx.timings:
        return lease.prompt_tokens * plan.in_price
    return 0
