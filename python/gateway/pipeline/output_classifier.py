"""Response stage `output_classifier`: Triton classifier guards (`guards:` with `check: reply` or
`both`, e.g. triton_models/toxicity_guard) read what the model sends back.

Streams are scored in windows, off the stream's path: once `window_chars` of new completion
text arrived, a task scores it up to its last whole sentence while the frames keep flowing (a
run of two windows without a sentence's end is cut there, and the next window starts
`overlap_chars` before the cut); one window in flight per guard and stream (text that arrives
meanwhile joins the next window: a slow model makes windows longer, not a queue). A window is
scored sentence by sentence in one batched call (`segments`: a mean-pooled embedding of a whole
window dilutes one toxic sentence among benign ones). A hit ends the stream at the next read
with an error event naming the guard (`code`: the guard's name); what went out before the
verdict went out (about one classification's worth of text). At the upstream's end the rest is
scored and awaited before `[DONE]` (relay `EndCheck`): a toxic last window never ends well.
Unary replies are scored whole, sentence by sentence, before the reply is sent (relay
`BodyCheck`): a hit is a 400 `output_blocked` naming the guard.

A guard that errors or times out follows its policy for the caller (`on_error_for`: by key,
team or tier): `fail_closed` ends the stream with / answers `guard_unavailable` (503 on unary),
`fail_open` lets the reply through, says so (`x-fastpath-output-classifier: <name>=fail_open`,
header on unary, SSE comment before `[DONE]` on streams), logs it and counts it.

Scoring reuses the prompt guard's `TritonGuard` (its per-worker coalescing into batched
`ModelInfer` calls), one per reply guard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..config import GuardCheck, GuardConfig, OnError
from ..context import Endpoint
from ..errors import Fault, GatewayError
from .guard import TritonGuard, build_guards, on_error_for
from .sentences import boundary, segments
from .stage import Part

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall

log = logging.getLogger("gateway.output_classifier")

DECISION_HEADER = "x-fastpath-output-classifier"
BLOCK_HEADER = "x-output-guard-error-code"  # the output guard's: a client reads one header


class _Windows:
    """One stream's windows for one guard (a relay delta hook and `EndCheck`)."""

    __slots__ = (
        "_due",
        "_error",
        "_failed",
        "_from",
        "_guard",
        "_principal",
        "_scored",
        "_stage",
        "_task",
        "_unseen",
        "request_id",
        "windows",
    )

    def __init__(self, stage: OutputClassifierStage, guard: TritonGuard, ctx: RequestContext) -> None:
        self._stage = stage
        self._guard = guard
        self._principal = ctx.principal
        self.request_id = ctx.request_id
        self._scored = 0  # characters of completion text sent to the model
        self._from = 0  # where the next window's text starts
        self._unseen = 0  # frame bytes since then (frames carry JSON around the text)
        self._due = guard.cfg.window_chars  # frame bytes before the text is looked at again
        self._task: asyncio.Task[None] | None = None
        self._error: GatewayError | None = None
        self._failed = ""  # why a window was let through unscored (fail_open)
        self.windows = 0

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        if self._error is not None:
            return self._error
        self._unseen += nbytes
        if self._unseen < self._due or self._task is not None:
            return None
        text = call.completion_text
        new = len(text) - self._scored
        window = self._guard.cfg.window_chars
        end = boundary(text, self._scored) if new >= window else self._scored
        if end == self._scored and new < 2 * window:
            # not yet (a window, or a sentence's end within two): look again after about as
            # many frame bytes as the rest needs (bytes per character of the text so far)
            per_char = self._unseen // new if new >= 32 else 1
            self._due = self._unseen + ((window if new < window else 2 * window) - new) * per_char
            return None
        if end > self._scored:
            self._start(text, end)
        else:  # two windows without a sentence's end: cut here, the next window overlaps
            self._start(text, len(text), overlap=self._guard.cfg.overlap_chars)
        return None

    def _start(self, text: str, end: int, overlap: int = 0) -> asyncio.Task[None]:
        """Score `text[self._from:end]` off the stream's path; the next window starts `overlap`
        characters before `end` (a cut inside a sentence)."""
        cfg = self._guard.cfg
        texts = segments(text[self._from : end], cfg.max_chars)
        self._scored = end
        self._from = max(0, end - overlap)
        self._unseen = 0
        self._due = cfg.window_chars
        self.windows += 1
        task = self._task = self._guard.adapter.loop.create_task(self._score(texts))
        return task

    async def _score(self, texts: list[str]) -> None:
        try:
            err, failed = await self._stage.verdict(self._guard, texts, self._principal, self.request_id)
            if err is not None and self._error is None:
                self._error = err
            if failed:
                self._failed = failed
        finally:
            self._task = None

    async def check_end(self, call: UpstreamCall) -> GatewayError | None:
        if self._error is None and self._task is not None:
            await self._task
        if self._error is None:
            text = call.completion_text
            if len(text) > self._scored:
                await self._start(text, len(text))
        return self._error

    def on_end(self, ctx: RequestContext) -> bytes:
        verdict = "fail_open" if self._failed else "pass"
        return f": {DECISION_HEADER} {self._guard.cfg.name}={verdict};windows={self.windows}\n\n".encode()


class OutputClassifierStage(Part):
    name = "output_classifier"
    __slots__ = ("_by_model", "counts")

    def __init__(self, cfgs: list[GuardConfig], adapters: dict[str, Any], models: list[str]) -> None:
        reply = [c for c in cfgs if c.check is not GuardCheck.PROMPT]
        guards = [g for g in build_guards(reply, adapters) if isinstance(g, TritonGuard)]
        #: public model -> the reply guards that apply to it, in config order
        self._by_model = {m: [g for g in guards if not g.cfg.models or m in g.cfg.models] for m in models}
        #: (guard, verdict) -> windows or replies, in this worker (pass, blocked, fail_open, fail_closed)
        self.counts: Counter[tuple[str, str]] = Counter()

    def _guards(self, ctx: RequestContext) -> list[TritonGuard] | None:
        route = ctx.route
        if route is None or ctx.endpoint is Endpoint.EMBEDDINGS:
            return None
        return self._by_model.get(route.name) or None

    def on_stream(self, ctx: RequestContext) -> _Windows | _Many | None:
        guards = self._guards(ctx)
        if guards is None:
            return None
        if len(guards) == 1:
            return _Windows(self, guards[0], ctx)
        return _Many([_Windows(self, g, ctx) for g in guards])

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        return body

    async def check_body(self, ctx: RequestContext, body: bytes) -> None:
        guards = self._guards(ctx)
        if guards is None:
            return
        text = reply_text(body)
        if not text:
            return
        for g in guards:
            t0 = time.perf_counter_ns()
            texts = segments(text, g.cfg.max_chars)
            err, failed = await self.verdict(g, texts, ctx.principal, ctx.request_id)
            ns = time.perf_counter_ns() - t0
            ctx.timings[f"output_classifier_{g.cfg.name}"] = ns
            verdict = "blocked" if err is not None else "fail_open" if failed else "pass"
            ctx.reply_headers += ((DECISION_HEADER, f"{g.cfg.name}={verdict};dur={ns / 1e6:.3f}"),)
            if err is not None:
                raise err

    async def verdict(
        self, g: TritonGuard, texts: list[str], principal: Any, request_id: str
    ) -> tuple[GatewayError | None, str]:
        """(the error to end the reply with or None, why it was let through unscored or "")."""
        cfg = g.cfg
        try:
            async with asyncio.timeout(cfg.timeout_ms / 1000):
                scores = await asyncio.gather(*(g.score(t) for t in texts))
        except Exception as exc:  # any failure of a window's task follows the policy, none is lost
            why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            if on_error_for(cfg, principal) is OnError.FAIL_OPEN:
                self.counts[(cfg.name, "fail_open")] += 1
                log.warning("request %s: output classifier %s %s; failing open", request_id, cfg.name, why)
                return None, why
            self.counts[(cfg.name, "fail_closed")] += 1
            log.warning("request %s: output classifier %s %s; failing closed", request_id, cfg.name, why)
            return GatewayError(
                Fault.GUARD_UNAVAILABLE,
                f"The `{cfg.name}` guard is unavailable ({why}); the reply was not completed.",
                headers=(("retry-after", "1"),),
            ), ""
        top = max(scores, default=0.0)
        if top < cfg.threshold:
            self.counts[(cfg.name, "pass")] += 1
            return None, ""
        self.counts[(cfg.name, "blocked")] += 1
        log.info("request %s: reply blocked by guard %s (score %.3f)", request_id, cfg.name, top)
        return GatewayError(
            Fault.OUTPUT_BLOCKED,
            f"The reply was blocked by the `{cfg.name}` guard (score {top:.3f} >= {cfg.threshold}).",
            code=cfg.name,
            headers=((BLOCK_HEADER, cfg.name),),
        ), ""


class _Many:
    """Several reply guards on one stream: each keeps its own windows."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: list[_Windows]) -> None:
        self.hooks = hooks

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        for h in self.hooks:
            err = h.on_delta(call, nbytes)
            if err is not None:
                return err
        return None

    async def check_end(self, call: UpstreamCall) -> GatewayError | None:
        for h in self.hooks:
            err = await h.check_end(call)
            if err is not None:
                return err
        return None

    def on_end(self, ctx: RequestContext) -> bytes:
        return b"".join(h.on_end(ctx) for h in self.hooks)


def reply_text(body: bytes) -> str:
    """The text of a unary chat or completions reply (every choice), "" when it has none."""
    try:
        reply = json.loads(body)
    except ValueError:
        return ""
    parts: list[str] = []
    for choice in reply.get("choices") or () if isinstance(reply, dict) else ():
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message")
        texts = (choice.get("text"), msg.get("content") if isinstance(msg, dict) else None)
        parts.extend(t for t in texts if isinstance(t, str) and t)
    return "\n".join(parts)
