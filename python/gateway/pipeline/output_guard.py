"""Response stage `output_guard` (`output_guards:`): PII and secrets in what the model sends back.

Detection is Rust (`_fastpath.OutputPolicy`: e-mail, phone, card + Luhn, IBAN + mod-97, SSN,
API keys, JWTs, private keys). Each guard names kinds and an action: `block` (unary: a 400
`output_blocked` naming the guard; stream: an error event with the guard's name as its code,
then `[DONE]`; nothing of the finding goes out), `redact` (`[REDACTED:<kind>]` in place), or
`flag` (unary: `x-fastpath-output-guard` header; stream: an SSE comment of the same name before
`[DONE]`; both: a log line and the stage's counters).

Streams: the stage's hook is a relay `FrameFilter` around a Rust `OutputFilter`, which holds back
a bounded window of text (`holdback_chars`) so a finding split across reads is caught whole; it
adds up to that many bytes of delay to the text, never to other frames. Usage is the upstream's
(what was generated), so a redacted stream reports the same usage as an unredacted one. Requests
of models no guard covers get no hook: they cost nothing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from .. import _fastpath
from ..config_output import PII_KINDS, OutputGuardConfig
from ..context import Endpoint
from ..errors import Fault, GatewayError
from .stage import Part

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall

log = logging.getLogger("gateway.output_guard")

FLAG_HEADER = "x-fastpath-output-guard"
BLOCK_HEADER = "x-output-guard-error-code"


class _Plan:
    """The guards of one public model: one compiled policy and the largest window."""

    __slots__ = ("names", "policy", "window")

    def __init__(self, guards: list[tuple[int, OutputGuardConfig]]) -> None:
        self.names = {i: g.name for i, g in guards}
        rules = [(k, g.action.value, i) for i, g in guards for k in (g.kinds or PII_KINDS)]
        self.policy = _fastpath.OutputPolicy(rules)
        self.window = max(g.holdback_chars for _, g in guards)


class _StreamGuard:
    """One stream's filter (a relay `FrameFilter`) and its flag trailer."""

    __slots__ = ("_filter", "_plan", "_stage", "request_id")

    def __init__(self, stage: OutputGuardStage, plan: _Plan, request_id: str) -> None:
        self._stage = stage
        self._plan = plan
        self._filter = plan.policy.filter(plan.window)
        self.request_id = request_id

    def rewrite(self, frames: bytes) -> bytes:
        out = self._filter.feed(frames)
        self._check()
        return out

    def drain(self) -> bytes:
        out = self._filter.finish()
        self._check()
        return out

    def _check(self) -> None:
        blocked = self._filter.blocked
        if blocked is not None:
            raise self._stage.blocked(self._plan, blocked, self.request_id)

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        return None

    def on_end(self, ctx: RequestContext) -> bytes:
        note = self._stage.noted(self._plan, self._filter.findings, ctx.request_id)
        return f": {FLAG_HEADER} {note}\n\n".encode() if note else b""


class OutputGuardStage(Part):
    name = "output_guard"
    __slots__ = ("_by_model", "counts")

    def __init__(self, guards: list[OutputGuardConfig], models: list[str]) -> None:
        plans: dict[tuple[int, ...], _Plan] = {}
        self._by_model: dict[str, _Plan] = {}
        for m in models:
            mine = [(i, g) for i, g in enumerate(guards) if not g.models or m in g.models]
            if mine:
                key = tuple(i for i, _ in mine)
                if key not in plans:
                    plans[key] = _Plan(mine)
                self._by_model[m] = plans[key]
        #: (guard, kind, action) -> findings acted on, in this worker (for /metrics and tests)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def _plan(self, ctx: RequestContext) -> _Plan | None:
        route = ctx.route
        if route is None or ctx.endpoint is Endpoint.EMBEDDINGS:
            return None
        return self._by_model.get(route.name)

    def on_stream(self, ctx: RequestContext) -> _StreamGuard | None:
        plan = self._plan(ctx)
        return None if plan is None else _StreamGuard(self, plan, ctx.request_id)

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        plan = self._plan(ctx)
        if plan is None:
            return body
        try:
            reply = json.loads(body)
        except ValueError:
            return body
        findings: list[tuple[str, str, int]] = []
        changed = False
        for choice in reply.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            msg = choice.get("message")
            targets: list[tuple[dict[str, Any], str]] = [(choice, "text")]
            if isinstance(msg, dict):
                targets.append((msg, "content"))
                for call in msg.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        targets.append((fn, "arguments"))
            for holder, field in targets:
                text = holder.get(field)
                if not isinstance(text, str) or not text:
                    continue
                new, found, blocked = plan.policy.scan(text)
                if blocked is not None:
                    raise self.blocked(plan, blocked, ctx.request_id)
                findings += found
                if new != text:
                    holder[field] = new
                    changed = True
        note = self.noted(plan, findings, ctx.request_id)
        if note:
            ctx.reply_headers += ((FLAG_HEADER, note),)
        return json.dumps(reply, ensure_ascii=False).encode() if changed else body

    def blocked(self, plan: _Plan, blocked: tuple[str, int], request_id: str) -> GatewayError:
        kind, guard = blocked
        name = plan.names.get(guard, "output_guard")
        self.counts[(name, kind, "block")] += 1
        log.info("request %s: reply blocked by output guard %s (%s)", request_id, name, kind)
        return GatewayError(
            Fault.OUTPUT_BLOCKED,
            f"The reply was blocked by the `{name}` output guard (it contained: {kind}).",
            code=name,
            headers=((BLOCK_HEADER, name),),
        )

    def noted(self, plan: _Plan, findings: list[tuple[str, str, int]], request_id: str) -> str:
        """Counts and logs the findings; the flag note (`guard=kind,kind; ...`) or ""."""
        if not findings:
            return ""
        by_guard: dict[str, list[str]] = {}
        for kind, action, guard in findings:
            name = plan.names.get(guard, "output_guard")
            self.counts[(name, kind, action)] += 1
            by_guard.setdefault(name, []).append(f"{kind}:{action}")
        note = "; ".join(f"{g}={','.join(ks)}" for g, ks in by_guard.items())
        log.info("request %s: output guard findings: %s", request_id, note)
        return note
