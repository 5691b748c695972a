"""Stage `tool_check` (`tool_validation:`, `tools_allowed:`): tools permitted per key, tier and
team, and the model's tool calls checked against the request's `tools`.

Request side: a request offering a tool outside the caller's allow-lists (the key's, its
tier's and its team's all apply) is refused with 403, param `tools`, before any upstream call;
with validation on, each tool's JSON Schema is compiled (Rust `jsonschema`; an invalid schema is
a 400) and cached per worker by the `tools` value.

Response side: every tool call must name an offered and permitted tool, with JSON arguments that
match its schema. Action `error`: unary -> a 502 `tool_call_invalid`; stream -> an error event at
the end, once the calls are assembled (their frames went out as they came). `flag`: the reply
goes out with `x-fastpath-tool-check` (header; stream: SSE comment). `repair` (unary only): the
upstream is asked once more with the assistant's calls and a tool message per call carrying the
validation error appended; a reply that still fails is an error; both calls are charged
(`server-timing` lists `tool_repair`). Streams treat `repair` as `error`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from .. import _fastpath
from ..config_output import ToolAction
from ..errors import Fault, GatewayError
from ..schemas import ChatRequestView
from .relay import RetryUpstream
from .stage import Part

if TYPE_CHECKING:
    from ..config import Config
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall

log = logging.getLogger("gateway.tool_check")

FLAG_HEADER = "x-fastpath-tool-check"
REPAIR_TIMING = "tool_repair"
_CACHE_MAX = 256


def _invalid(message: str) -> GatewayError:
    return GatewayError(Fault.UPSTREAM_BAD_RESPONSE, message, param="tools", code="tool_call_invalid")


class _StreamCheck:
    """A relay `FrameFilter` that only watches: the calls are checked once assembled."""

    __slots__ = ("_asm", "_ctx", "_stage", "_tools", "note")

    def __init__(self, stage: ToolCheckStage, ctx: RequestContext, tools: Any) -> None:
        self._stage = stage
        self._ctx = ctx
        self._tools = tools
        self._asm = _fastpath.ToolAssembler()
        self.note = ""

    def rewrite(self, frames: bytes) -> bytes:
        self._asm.feed(frames)
        return frames

    def drain(self) -> bytes:
        calls = [(name, args, "") for _, _, name, args in self._asm.calls]
        problems = self._stage.problems(self._ctx, self._tools, calls)
        if problems:
            if self._stage.action is ToolAction.FLAG:
                self.note = "; ".join(problems)
            else:
                raise _invalid("Invalid tool call: " + "; ".join(problems))
        return b""

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        return None

    def on_end(self, ctx: RequestContext) -> bytes:
        return f": {FLAG_HEADER} {self.note}\n\n".encode() if self.note else b""


class ToolCheckStage(Part):
    name = "tool_check"
    __slots__ = ("_keys", "_models", "_sets", "_teams", "action", "counts", "validate")

    def __init__(self, cfg: Config) -> None:
        tv = cfg.tool_validation
        self.validate = tv.enabled
        self.action = tv.action
        self._models = frozenset(tv.models)
        self._keys = {k.id: frozenset(k.tools_allowed) for k in cfg.auth.keys if k.tools_allowed is not None}
        self._teams = {
            n: frozenset(t.tools_allowed) for n, t in cfg.teams.items() if t.tools_allowed is not None
        }
        self._sets: dict[bytes, _fastpath.ToolSet] = {}
        #: verdict -> count in this worker (`valid`, `invalid`, `repaired`, `refused`)
        self.counts: dict[str, int] = {}

    # ---- request side ---------------------------------------------------------------------
    def _allowed(self, ctx: RequestContext) -> frozenset[str] | None:
        p = ctx.principal
        if p is None:
            return None
        lists = [self._keys.get(p.key_id), self._teams.get(p.team)]
        if p.tier.tools_allowed is not None:
            lists.append(frozenset(p.tier.tools_allowed))
        allowed: frozenset[str] | None = None
        for s in lists:
            if s is not None:
                allowed = s if allowed is None else allowed & s
        return allowed

    def _validating(self, ctx: RequestContext) -> bool:
        route = ctx.route
        return self.validate and route is not None and (not self._models or route.name in self._models)

    def _toolset(self, tools: list[Any]) -> _fastpath.ToolSet:
        raw = msgspec.json.encode(tools)
        ts = self._sets.get(raw)
        if ts is None:
            if len(self._sets) >= _CACHE_MAX:
                self._sets.clear()
            ts = self._sets[raw] = _fastpath.ToolSet(raw)
        return ts

    def _count(self, verdict: str) -> None:
        self.counts[verdict] = self.counts.get(verdict, 0) + 1

    async def on_request(self, ctx: RequestContext) -> None:
        view = ctx.view
        if not isinstance(view, ChatRequestView) or not view.tools:
            return
        allowed = self._allowed(ctx)
        if allowed is not None:
            for t in view.tools:
                fn = t.get("function") if isinstance(t, dict) else None
                name = fn.get("name") if isinstance(fn, dict) else None
                if name not in allowed:
                    self._count("refused")
                    raise GatewayError(
                        Fault.FORBIDDEN,
                        f"The tool {name!r} is not allowed for this API key.",
                        param="tools",
                        code="tool_not_allowed",
                    )
        if self._validating(ctx):
            try:
                self._toolset(view.tools)
            except _fastpath.FastpathError as exc:
                raise GatewayError(Fault.INVALID_REQUEST, f"Invalid tools: {exc}", param="tools") from None

    # ---- response side --------------------------------------------------------------------
    def _tools(self, ctx: RequestContext) -> tuple[list[Any] | None, bool]:
        view = ctx.view
        tools = view.tools if isinstance(view, ChatRequestView) else None
        return tools, self._validating(ctx)

    def problems(
        self, ctx: RequestContext, tools: list[Any] | None, calls: list[tuple[str, str, str]]
    ) -> list[str]:
        """Why each call is not acceptable (empty: all are)."""
        if not calls:
            return []
        allowed = self._allowed(ctx)
        ts = self._toolset(tools) if tools and self._validating(ctx) else None
        out: list[str] = []
        for name, args, _ in calls:
            if allowed is not None and name not in allowed:
                out.append(f"tool `{name}` is not allowed for this API key")
            elif ts is not None:
                why = ts.check(name, args)
                if why is not None:
                    out.append(why)
            elif tools is None or not self._validating(ctx):
                continue
        self._count("invalid" if out else "valid")
        return out

    def on_stream(self, ctx: RequestContext) -> _StreamCheck | None:
        tools, validating = self._tools(ctx)
        if not tools and self._allowed(ctx) is None:
            return None
        if not validating and self._allowed(ctx) is None:
            return None
        return _StreamCheck(self, ctx, tools)

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        tools, validating = self._tools(ctx)
        if not validating and self._allowed(ctx) is None:
            return body
        try:
            reply = json.loads(body)
            message = reply["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return body
        raw_calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not raw_calls:
            return body
        calls: list[tuple[str, str, str]] = []
        for c in raw_calls:
            fn = c.get("function") or {}
            calls.append((str(fn.get("name", "")), str(fn.get("arguments", "")), str(c.get("id", ""))))
        problems = self.problems(ctx, tools, calls)
        if REPAIR_TIMING in ctx.timings and not problems:
            self._count("repaired")
        if not problems:
            return body
        text = "; ".join(problems)
        log.info("request %s: invalid tool call(s): %s", ctx.request_id, text)
        if self.action is ToolAction.FLAG:
            ctx.reply_headers += ((FLAG_HEADER, text[:512]),)
            return body
        if self.action is ToolAction.REPAIR and REPAIR_TIMING not in ctx.timings:
            ctx.timings[REPAIR_TIMING] = 0  # marks the one repair (listed in server-timing)
            raise RetryUpstream(self._repair_body(ctx, message, calls, problems))
        raise _invalid("Invalid tool call: " + text)

    @staticmethod
    def _repair_body(
        ctx: RequestContext, message: dict[str, Any], calls: list[tuple[str, str, str]], problems: list[str]
    ) -> bytes:
        """The upstream body plus the assistant's calls and one tool message per call that says
        what was wrong, so the model can call again."""
        body = json.loads(ctx.upstream_body)
        body["messages"] = [
            *body.get("messages", []),
            {"role": "assistant", "content": message.get("content"), "tool_calls": message["tool_calls"]},
            *(
                {
                    "role": "tool",
                    "tool_call_id": cid,
                    "content": "Tool call rejected by the gateway: "
                    + "; ".join(problems)
                    + ". Call the tool again with arguments that match its JSON Schema.",
                }
                for _, _, cid in calls
            ),
        ]
        return json.dumps(body).encode()
