"""Stage `planner`: which model serves a request, chosen by cost and quality before the call.

For each planned model (`config_planner.py`: an existing public model, or a virtual one such as
`auto` that only exists here), a request classifier on Triton (`triton_models/request_router`:
MiniLM embeddings + logistic regression) scores the prompt as P(hard), given the prompt text and
four cheap features computed here (the Rust token estimate, a code fence, tools in the request,
the number of turns). A `simple` request goes to the plan's cheap model, a `hard` one to its
strong model. The stage runs after `auth` (the key's allow-list sees the name the client sent)
and before `route`: it rewrites the request's model, so `route` and everything after it (limits,
prices, the ledger's `model`, the cache) see the model that serves it, as if the client had asked
for it. `shadow: true` computes and reports the choice but leaves the request as it is.

The decision goes out in `x-fastpath-plan` (`class=hard; model=gpt-4o; score=0.812;
decision=routed; for=auto`), into the ledger's `plan` column and the `fastpath_planner_decisions`
counter. A classifier that fails or is slower than `timeout_ms` does not fail the request: the
plan's `default` model serves it (`class=unknown; decision=fallback`), logged and counted.
Concurrent classifications in a worker are coalesced into one batched `ModelInfer` call while
one is in flight (no wait when idle), as the Triton guard does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import msgspec

from .. import _fastpath
from ..config import Config
from ..config_planner import PlanConfig
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..schemas import ChatRequestView, CompletionRequestView
from ..upstreams.triton_classify import TritonClassifier
from .stage import Part

if TYPE_CHECKING:
    from ..upstreams.triton_grpc import TritonAdapter
    from ..worker import Worker

log = logging.getLogger("gateway.planner")

PLAN_HEADER = "x-fastpath-plan"
ROUTED, SHADOW, FALLBACK = "routed", "shadow", "fallback"
#: the choice was not among the caller's allowed models: the first allowed target serves it
RESTRICTED = "restricted"
#: the request router's `features` input (`request_features`)
N_FEATURES = 4
_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


class Plan(msgspec.Struct, frozen=True, gc=False):
    """One request's decision."""

    #: the model the client asked for
    requested: str
    #: `simple`, `hard`, or `unknown` (the classifier was unavailable)
    cls: str
    #: P(hard) from the classifier; None when unavailable
    score: float | None
    #: the model the plan chose
    model: str
    #: routed (the chosen model serves), shadow (reported only), fallback (the default serves)
    decision: str
    #: the retriever is skipped for this request (`skip_retrieval_when_simple`)
    skip_retrieval: bool = False

    def describe(self) -> str:
        """The header value (and the ledger's `plan` column)."""
        score = "-" if self.score is None else f"{self.score:.3f}"
        text = (
            f"class={self.cls}; model={self.model}; score={score}; decision={self.decision}; "
            f"for={self.requested}"
        )
        return text + "; retrieval=skip" if self.skip_retrieval else text


def request_features(view: ChatRequestView | CompletionRequestView) -> tuple[str, tuple[float, ...]]:
    """The classifier's inputs: the prompt text (every message's text joined by newlines) and the
    raw `features` (`triton_models/request_router/1/features.py`: the Rust token estimate of that
    text, a code fence in it, tools in the request, turns: messages other than system / developer)."""
    if isinstance(view, CompletionRequestView):
        prompt = view.prompt
        text = prompt if isinstance(prompt, str) else "\n".join(p for p in prompt if isinstance(p, str))
        return text, (float(_fastpath.estimate_tokens(text)), float("```" in text), 0.0, 1.0)
    parts: list[str] = []
    turns = 0
    for m in view.messages:
        if m.role not in ("system", "developer"):
            turns += 1
        c = m.content
        if isinstance(c, str):
            parts.append(c)
        elif c is not None:
            parts.extend(p.text for p in c if p.text)
    text = "\n".join(parts)
    tools = float(bool(view.tools))
    return text, (float(_fastpath.estimate_tokens(text)), float("```" in text), tools, float(max(turns, 1)))


class RouterClient:
    """The classifier on Triton: (text, features) -> P(hard), coalescing concurrent calls."""

    __slots__ = ("classifier", "max_chars")

    def __init__(self, cfg: Config, adapter: TritonAdapter) -> None:
        p = cfg.planner
        self.max_chars = p.max_chars
        self.classifier = TritonClassifier(adapter, p.model, p.timeout_ms, p.max_batch, N_FEATURES, "router")

    async def score(self, text: str, features: tuple[float, ...]) -> float:
        return await self.classifier.score(text[-self.max_chars :].encode(), features)


class PlannerStage(Part):
    name = "planner"
    __slots__ = ("client", "counts", "plans", "timeout_s")

    def __init__(self, cfg: Config, worker: Worker) -> None:
        self.plans: dict[str, PlanConfig] = dict(cfg.planner.models)
        # the config allows only a triton provider here (config_planner.validate_planner)
        self.client = RouterClient(cfg, cast("TritonAdapter", worker.adapters[cfg.planner.provider]))
        self.timeout_s = cfg.planner.timeout_ms / 1000
        #: (requested model, class, chosen model, decision) -> requests; read by the metrics observer
        self.counts: dict[tuple[str, str, str, str], int] = {}

    async def on_request(self, ctx: RequestContext) -> None:
        view = ctx.view
        if not isinstance(view, ChatRequestView | CompletionRequestView):
            return  # embeddings (and requests refused before decode): never planned
        plan_cfg = self.plans.get(view.model)
        if plan_cfg is None:
            return
        text, features = request_features(view)
        score: float | None
        try:
            async with asyncio.timeout(self.timeout_s):
                score = await self.client.score(text, features)
        except (TimeoutError, GatewayError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc.message}"
            log.warning("request %s: planner classifier %s; using the default model", ctx.request_id, why)
            score = None
        if score is None:
            cls, model, decision = "unknown", plan_cfg.default or plan_cfg.hard, FALLBACK
        else:
            cls = "hard" if score >= plan_cfg.threshold else "simple"
            model = plan_cfg.hard if cls == "hard" else plan_cfg.simple
            decision = SHADOW if plan_cfg.shadow else ROUTED
        allowed = ctx.principal.models if ctx.principal is not None else None
        if allowed is not None and decision != SHADOW and model not in allowed:
            # a key may use `auto` without every target: the plan chooses within its models
            model = _allowed_target(view.model, model, plan_cfg, allowed)
            decision = RESTRICTED
        skip = cls == "simple" and plan_cfg.skip_retrieval_when_simple and decision == ROUTED
        plan = Plan(view.model, cls, score, model, decision, skip)
        ctx.plan = plan
        key = (plan.requested, cls, model, decision)
        self.counts[key] = self.counts.get(key, 0) + 1
        ctx.reply_headers += ((PLAN_HEADER, plan.describe()),)
        if decision != SHADOW and model != view.model:
            _use_model(ctx, view, model)


def _allowed_target(requested: str, chosen: str, plan: PlanConfig, allowed: frozenset[str]) -> str:
    """The first of the plan's targets the key may use, the other class's before the default;
    none: the key may not use the virtual model's targets at all (403, as for a model)."""
    for model in (plan.simple if chosen == plan.hard else plan.hard, plan.default):
        if model and model in allowed:
            return model
    raise GatewayError(
        Fault.FORBIDDEN,
        f"This API key may not use the model `{chosen}` that `{requested}` chose, nor another of "
        "its targets.",
        param="model",
    )


def _use_model(ctx: RequestContext, view: ChatRequestView | CompletionRequestView, model: str) -> None:
    """The request names `model` from here on: the view `route` resolves and the body it forwards."""
    top = _raw_top.decode(ctx.body)
    top["model"] = msgspec.Raw(_encode(model))
    ctx.body = _encode(top)
    view.model = model
