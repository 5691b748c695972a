"""Stage `guard` (pre): configured guards check the prompt before any upstream sees it.

Two kinds: `rules` (the fastpath's phrase automaton + secret regexes: microseconds, cannot fail)
and `triton` (a classifier model on Triton: milliseconds on a GPU, tens on a CPU). Guards run
in config order, cheapest first by convention; the first that blocks ends the request with a
400 whose `code` and `X-Prompt-Guard-Error-Code` header name the guard. A model guard that
errors or exceeds its `timeout_ms` follows its policy: `fail_open` lets the request through
(logged, and visible in `x-fastpath-guard`), `fail_closed` refuses it with 503; the policy may
differ by risk, per key, team or tier (`on_error_for`). Each guard's
decision and latency go out in the `x-fastpath-guard` header and in `server-timing`.

`/v1/embeddings` inputs go through the `rules` guards (a secret sent to a third-party embedding
API leaks as surely as in a chat prompt; a guard's `models` list can leave embedding models out)
but skip the `triton` classifiers (`skipped_embeddings` in the header): embedding inputs are
documents to index, never instructions a model follows, so a jailbreak score means nothing there
(the text is judged when it reaches a chat prompt), and a 2048-input batch would cost 2048
classifications. Token-id inputs carry no text and are not scanned.

Concurrent checks in a worker are coalesced into one batched `ModelInfer` call while a previous
one is in flight (no added wait when idle), so a busy worker sends batches, not a call each
(`upstreams/triton_classify.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from .. import _fastpath, embeddings
from ..config import GuardCheck, GuardConfig, GuardKind, OnError
from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError
from ..schemas import ChatRequestView, EmbeddingsRequestView
from ..upstreams.triton_classify import TritonClassifier
from ..upstreams.triton_grpc import TritonAdapter
from . import guard_rules
from .sentences import segments
from .stage import Part

if TYPE_CHECKING:
    from ..principal import Principal

log = logging.getLogger("gateway.guard")

BLOCK_HEADER = "x-prompt-guard-error-code"
DECISION_HEADER = "x-fastpath-guard"


def prompt_text(ctx: RequestContext) -> str:
    """Everything the client wrote that a model will read (all roles: an attacker controls
    the whole request, including fake assistant turns and tool results)."""
    view = ctx.view
    if isinstance(view, ChatRequestView):
        parts: list[str] = []
        for m in view.messages:
            c = m.content
            if isinstance(c, str):
                parts.append(c)
            elif c is not None:
                parts.extend(p.text for p in c if p.text)
        return "\n".join(parts)
    if view is None:
        return ""
    if isinstance(view, EmbeddingsRequestView):
        return "\n".join(embeddings.texts(view))
    prompt = view.prompt
    if isinstance(prompt, str):
        return prompt
    return "\n".join(p for p in prompt if isinstance(p, str))


def on_error_for(cfg: GuardConfig, principal: Principal | None) -> OnError:
    """The guard's failure policy for this caller: by key id, else team, else tier, else
    `on_error` (read only when the guard failed: nothing per passing request)."""
    if principal is not None:
        for by, name in (
            (cfg.on_error_by_key, principal.key_id),
            (cfg.on_error_by_team, principal.team),
            (cfg.on_error_by_tier, principal.tier_name),
        ):
            policy = by.get(name)
            if policy is not None:
                return policy
    return cfg.on_error


class _Blocked(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RulesGuard:
    __slots__ = ("cfg", "rules")

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        phrases = dict(guard_rules.PHRASES) if cfg.builtin_rules else {}
        patterns = dict(guard_rules.PATTERNS) if cfg.builtin_rules else {}
        for rule, extra in cfg.phrases.items():
            phrases[rule] = [*phrases.get(rule, []), *extra]
        patterns.update(cfg.patterns)
        self.rules = _fastpath.PromptRules(
            [(rule, p) for rule, ps in phrases.items() for p in ps], list(patterns.items())
        )

    async def check(self, text: str) -> str | None:
        rule = self.rules.first_match(text)
        if rule is not None:
            raise _Blocked(f"rule `{rule}`")
        return None


class TritonGuard:
    """Scores prompts with a classifier model (`text` BYTES [1] -> `score` FP32 [1])."""

    __slots__ = ("adapter", "cfg", "classifier")

    def __init__(self, cfg: GuardConfig, adapter: TritonAdapter) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.classifier = TritonClassifier(adapter, cfg.model, cfg.timeout_ms, cfg.max_batch, 0, "guard")

    async def check(self, text: str) -> str | None:
        """None (passed) or the verdict when the model was not asked; raises _Blocked."""
        if self.cfg.min_chars and len(text.strip()) < self.cfg.min_chars:
            return "skipped_short"
        if self.cfg.sentences:
            parts = segments(text[-self.cfg.max_chars :], self.cfg.max_chars)
            score = max(await asyncio.gather(*(self.score(p) for p in parts)), default=0.0)
        else:
            score = await self.score(text)
        if score >= self.cfg.threshold:
            raise _Blocked(f"score {score:.3f} >= {self.cfg.threshold}")
        return None

    async def score(self, text: str) -> float:
        return await self.classifier.score(text[-self.cfg.max_chars :].encode())


Guard = RulesGuard | TritonGuard


class GuardStage(Part):
    name = "guard"
    __slots__ = ("_by_model", "guards")
    #: may overlap `retrieve` (pipeline/parallel.py): it judges the client's messages, not the
    #: retrieved context; cancelled, a queued check's future is dropped (the batch goes on)
    reads = frozenset({"endpoint", "principal", "request_id", "route", "view"})
    writes: frozenset[str] = frozenset()

    def __init__(self, guards: list[Guard], models: list[str]) -> None:
        self.guards = guards
        #: public model -> the guards that apply to it, in config order
        prompt = [g for g in guards if g.cfg.check is not GuardCheck.REPLY]  # reply: output_classifier
        self._by_model = {m: [g for g in prompt if not g.cfg.models or m in g.cfg.models] for m in models}

    @property
    def waits(self) -> bool:
        """Only a model guard waits (rules are microseconds: they run inline)."""
        return any(isinstance(g, TritonGuard) for gs in self._by_model.values() for g in gs)

    def wants(self, ctx: RequestContext) -> bool:
        """Whether a guard applies to this request's model (a parallel group skips it otherwise)."""
        return ctx.route is not None and bool(self._by_model.get(ctx.route.name))

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.route is not None
        guards = self._by_model.get(ctx.route.name)
        if not guards:
            return
        text = prompt_text(ctx)
        decisions: list[str] = []
        try:
            for g in guards:
                await self._run(ctx, g, text, decisions)
        finally:
            ctx.reply_headers += ((DECISION_HEADER, ", ".join(decisions)),)

    async def _run(self, ctx: RequestContext, g: Guard, text: str, decisions: list[str]) -> None:
        name = g.cfg.name
        t0 = time.perf_counter_ns()
        verdict = "pass"
        try:
            if isinstance(g, RulesGuard):
                verdict = await g.check(text) or verdict
            elif ctx.endpoint is Endpoint.EMBEDDINGS:
                verdict = "skipped_embeddings"
            else:
                async with asyncio.timeout(g.cfg.timeout_ms / 1000):
                    verdict = await g.check(text) or verdict
        except _Blocked as b:
            verdict = "blocked"
            log.info("request %s: prompt blocked by guard %s (%s)", ctx.request_id, name, b.detail)
            raise GatewayError(
                Fault.PROMPT_BLOCKED,
                f"The prompt was blocked by the `{name}` guard ({b.detail}).",
                param="messages",
                code=name,
                headers=((BLOCK_HEADER, name),),
            ) from None
        except asyncio.CancelledError:  # another stage refused, or the client left
            verdict = "cancelled"
            raise
        except (TimeoutError, GatewayError, _fastpath.FastpathError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            if on_error_for(g.cfg, ctx.principal) is OnError.FAIL_OPEN:
                verdict = "fail_open"
                log.warning("request %s: guard %s %s; failing open", ctx.request_id, name, why)
                return
            verdict = "fail_closed"
            log.warning("request %s: guard %s %s; failing closed", ctx.request_id, name, why)
            raise GatewayError(
                Fault.GUARD_UNAVAILABLE,
                f"The `{name}` guard is unavailable ({why}); the request was not sent.",
                headers=(("retry-after", "1"),),
            ) from None
        finally:
            ns = time.perf_counter_ns() - t0
            ctx.timings[f"guard_{name}"] = ns
            decisions.append(f"{name}={verdict};dur={ns / 1e6:.3f}")


def build_guards(cfgs: list[GuardConfig], adapters: dict[str, Any]) -> list[Guard]:
    guards: list[Guard] = []
    for c in cfgs:
        if c.kind is GuardKind.RULES:
            guards.append(RulesGuard(c))
        else:
            # the config allows only a triton provider here (config._validate_guards)
            guards.append(TritonGuard(c, cast("TritonAdapter", adapters[c.provider])))
    return guards
