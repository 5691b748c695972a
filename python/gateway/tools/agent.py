"""The gateway-run agent loop: for chat requests whose model (`tools.models`) or key
(`tools.keys`) has server tools on, the model is offered the registry's tools and the calls it
makes to them are run here, the results appended as `tool` messages, and the model asked again,
until a reply without server tool calls. Two parts:

- `AgentStage`, a request stage (after `prompts`, before `tool_check`: `tools_allowed` applies
  to server tools too), adds the tools to the body and refuses what the loop cannot serve: `n > 1`
  and a client tool named like a server tool;
- `AgentDispatch`, the dispatcher with the loop in `open`: the relay sees one answering call
  whose body is the last turn's (usage summed over every turn), so response stages, dialects,
  settlement and the ledger work unchanged.

Streams: every turn is read whole (`stream: false` upstream: a turn's tool calls must be known
before anything goes out, and which turn is the last is only known once read); the answer then
goes out as a stream: the message as one chunk, the finish reason, the usage chunk if asked for,
`[DONE]`. Time to first token is the whole loop's; an error in the loop is a JSON error reply
(nothing was sent yet).

Loop detection: `max_iterations` tool turns (one more is 508 `tool_iterations_exceeded`), the
same call (name and canonical arguments) twice is a cycle (508 `tool_loop_detected`), and
`time_budget_ms` over the whole loop (504 `tool_time_budget`). 508 Loop Detected says what
happened and that the request itself was fine; the reply carries `x-should-retry: false` (the
OpenAI SDKs retry 5xx otherwise, and a deterministic loop would only burn tokens again).

A tool that fails does not fail the request: the model gets the error as the tool's result
(so it can recover or explain), the failure is reported to the error target, and the reply
carries `x-function-error-code`. `x-fastpath-tools` lists every call made with its time.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, cast

import msgspec

from ..context import Endpoint
from ..errors import Fault, GatewayError
from ..pipeline.relay import _add_usage
from ..pipeline.stage import Part
from ..routing.dispatch import Dispatch
from ..schemas import ChatRequestView, Usage
from ..upstream_body import upstream_body
from . import Registry, ToolFailure, ToolRun

if TYPE_CHECKING:
    from ..config import Config
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall
    from ..worker import Worker

#: the tool calls the gateway made: `name;dur=<ms>;status=ok|<error code>`, comma-separated
TOOLS_HEADER = "x-fastpath-tools"
#: the error codes of the tools that failed, comma-separated
ERROR_HEADER = "x-function-error-code"
#: `tools.agent.body_metadata`: the same list in the reply body
BODY_FIELD = "fastpath_tools"
TIMING = "tools"
_NO_RETRY = (("x-should-retry", "false"),)
_CLIENT_TOOL = json.dumps(
    {
        "error": {
            "code": "client_tool",
            "message": "not run: a client-side tool cannot be called in a turn with server-side tools; "
            "call it on its own",
        }
    }
)

_view = msgspec.json.Decoder(ChatRequestView).decode
_encode = msgspec.json.Encoder().encode


def _bad(message: str, param: str, code: str) -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param, code=code)


class _On:
    """Which requests run the loop (shared by the stage and the dispatcher)."""

    __slots__ = ("keys", "models")

    def __init__(self, cfg: Config) -> None:
        self.models = frozenset(cfg.tools.models)
        self.keys = frozenset(cfg.tools.keys)

    def __call__(self, ctx: RequestContext) -> bool:
        if ctx.endpoint is not Endpoint.CHAT:
            return False
        route, p = ctx.route, ctx.principal
        return (route is not None and route.name in self.models) or (p is not None and p.key_id in self.keys)


class AgentStage(Part):
    """Request stage `agent`: the registry's tools join the request's `tools`."""

    name = "agent"

    def __init__(self, cfg: Config, on: _On, registry: Registry) -> None:
        self._on = on
        self._registry = registry

    async def on_request(self, ctx: RequestContext) -> None:
        if not self._on(ctx):
            return
        view = ctx.view
        if isinstance(view, ChatRequestView) and view.n is not None and view.n != 1:
            raise _bad("A model with server-side tools answers one choice (n: 1).", "n", "tool_n_unsupported")
        body = msgspec.json.decode(ctx.body)
        tools = body.get("tools") or []
        if not isinstance(tools, list):
            return  # decode's validation already refused it; nothing to add to
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if name in self._registry.tools:
                raise _bad(
                    f"The tool `{name}` is a server-side tool of this gateway; rename yours.",
                    "tools",
                    "tool_name_conflict",
                )
        body["tools"] = [*tools, *self._registry.specs]
        ctx.body = _encode(body)
        ctx.view = _view(ctx.body)
        assert ctx.route is not None
        upstream_body(ctx, ctx.route)

    async def close(self) -> None:
        await self._registry.close()


class _Replayed:
    """The last turn, already read, as the relay's answering call (usage: every turn's)."""

    __slots__ = ("_body", "_text", "_usage", "frames")

    def __init__(self, body: bytes, usage: Usage | None, text: str, frames: bytes) -> None:
        self._body = body
        self._usage = usage
        self._text = text
        #: a stream's frames (the answer as chunks), all sent as the first read
        self.frames = frames

    async def first(self, deadline: float) -> bytes:
        return b""

    async def next(self, deadline: float) -> bytes | None:
        return None

    def finish(self) -> tuple[bytes, GatewayError | None]:
        return b"", None

    async def body(self, deadline: float) -> bytes:
        return self._body

    def usage(self) -> Usage | None:
        return self._usage

    def completion_text(self) -> str:
        return self._text

    def generated_tokens(self) -> int | None:
        return None if self._usage is None else self._usage.completion_tokens

    def abort(self) -> None:
        pass

    def release(self) -> None:
        pass


class AgentDispatch(Dispatch):
    """The dispatcher: requests the loop applies to are answered after it; others as usual."""

    __slots__ = ("_budget_s", "_max_iter", "_metadata", "_on", "_registry")

    def __init__(self, cfg: Config, worker: Worker, on: _On, registry: Registry) -> None:
        super().__init__(worker.loop, cfg.server.max_stream_duration_ms / 1000)
        self._on = on
        self._registry = registry
        a = cfg.tools.agent
        self._max_iter = a.max_iterations
        self._budget_s = a.time_budget_ms / 1000
        self._metadata = a.body_metadata

    async def open(self, ctx: RequestContext) -> tuple[UpstreamCall, bytes]:
        if not self._on(ctx):
            return await super().open(ctx)
        call = await _Loop(self, ctx).run()
        return cast("UpstreamCall", call), call.frames

    async def turn(self, ctx: RequestContext, end: float) -> tuple[bytes, Usage | None]:
        """One model turn, read whole, within the loop's deadline."""
        loop = self._loop
        try:
            async with asyncio.timeout_at(end):
                call, _ = await super().open(ctx)
                dep = ctx.deployment
                deadline = end
                if dep is not None and ctx.attempt_t0:
                    deadline = min(end, ctx.attempt_t0 + min(self.max_stream_s, dep.adapter.total_timeout_s))
                try:
                    body = await call.body(deadline)
                except BaseException:
                    call.abort()
                    self.finish(ctx, False)
                    raise
                call.release()
                self.finish(ctx, True)
                return body, call.usage()
        except (TimeoutError, GatewayError):
            if loop.time() >= end:
                raise _budget(self._budget_s) from None
            raise


def _budget(budget_s: float) -> GatewayError:
    return GatewayError(
        Fault.TOOL_TIME_BUDGET,
        f"The agent loop ran out of its time budget ({budget_s:g} s) before the model answered.",
        param="tools",
        code="tool_time_budget",
        headers=_NO_RETRY,
    )


def _canonical(arguments: str) -> str:
    try:
        return msgspec.json.encode(msgspec.json.decode(arguments), order="sorted").decode()
    except msgspec.DecodeError:
        return arguments


class _Loop:
    """One request's loop: its turns, the calls seen, the runs made."""

    __slots__ = ("_ctx", "_d", "_end", "_errors", "_runs", "_seen", "_streamed", "_tool_ns", "_top")

    def __init__(self, dispatch: AgentDispatch, ctx: RequestContext) -> None:
        self._d = dispatch
        self._ctx = ctx
        self._end = dispatch._loop.time() + dispatch._budget_s
        self._seen: set[tuple[str, str]] = set()
        self._runs: list[ToolRun] = []
        self._errors: list[str] = []
        self._tool_ns = 0
        self._top: dict[str, Any] | None = None
        #: the client asked for a stream
        self._streamed = ctx.stream

    async def run(self) -> _Replayed:
        ctx, d, reg = self._ctx, self._d, self._d._registry
        usage: Usage | None = None
        stream = ctx.stream
        if stream:  # every turn is read whole; the answer goes out as frames at the end
            top = self._body()
            top["stream"] = False
            top.pop("stream_options", None)
            ctx.stream = False
            self._set_body(top)
        try:
            turns = 0
            while True:
                raw, u = await d.turn(ctx, self._end)
                usage = _add_usage(usage, u)
                reply = _reply_json(raw)
                message = _message(reply)
                calls = [c for c in message.get("tool_calls") or () if _name(c) in reg.tools]
                if not calls:
                    return self._final(reply, raw, usage, message)
                turns += 1
                if turns > d._max_iter:
                    raise GatewayError(
                        Fault.TOOL_LOOP,
                        f"The model kept calling server-side tools past the limit of {d._max_iter} turns.",
                        param="tools",
                        code="tool_iterations_exceeded",
                        headers=_NO_RETRY,
                    )
                for c in calls:
                    key = (_name(c), _canonical(_arguments(c)))
                    if key in self._seen:
                        raise GatewayError(
                            Fault.TOOL_LOOP,
                            f"The model called the server-side tool `{key[0]}` again with the same "
                            "arguments: a loop; stopped.",
                            param="tools",
                            code="tool_loop_detected",
                            headers=_NO_RETRY,
                        )
                    self._seen.add(key)
                results = await self._execute(calls)
                if d._loop.time() >= self._end:
                    raise _budget(d._budget_s)
                answer = self._target_answer(calls, results)
                if answer is not None:  # prompt targets (`summarize: false`): their result is the reply
                    message = {"role": "assistant", "content": answer}
                    reply["choices"][0]["message"] = message
                    reply["choices"][0]["finish_reason"] = "stop"
                    return self._final(reply, None, usage, message)
                self._next_body(message, calls, results)
        finally:
            ctx.stream = stream
            self._note(usage)

    async def _execute(self, calls: list[dict[str, Any]]) -> list[bytes | ToolFailure]:
        reg = self._d._registry
        t0 = time.perf_counter_ns()
        done = await asyncio.gather(*(reg.call(_name(c), _arguments(c), self._end) for c in calls))
        self._tool_ns += time.perf_counter_ns() - t0
        out: list[bytes | ToolFailure] = []
        for c, (result, run) in zip(calls, done, strict=True):
            self._runs.append(run)
            if isinstance(result, ToolFailure):
                self._errors.append(result.code)
                if reg.reporter is not None:
                    reg.reporter.report(self._ctx, run.name, _arguments(c), result)
            out.append(result)
        return out

    def _target_answer(self, calls: list[dict[str, Any]], results: list[bytes | ToolFailure]) -> str | None:
        """The reply text when every call was a prompt target that answered."""
        reg = self._d._registry
        if any(
            reg.summarize[_name(c)] or isinstance(r, ToolFailure) for c, r in zip(calls, results, strict=True)
        ):
            return None
        return "\n".join(r.decode(errors="replace") for r in results if isinstance(r, bytes))

    def _next_body(
        self, message: dict[str, Any], calls: list[dict[str, Any]], results: list[bytes | ToolFailure]
    ) -> None:
        """The upstream body plus the assistant's turn and one `tool` message per call (a client
        tool called in the same turn gets a note: the gateway cannot run it)."""
        top = self._body()
        msgs = top.setdefault("messages", [])
        msgs.append(
            {"role": "assistant", "content": message.get("content"), "tool_calls": message["tool_calls"]}
        )
        by_id = {c.get("id"): r for c, r in zip(calls, results, strict=True)}
        for c in message["tool_calls"]:
            cid = c.get("id")
            if cid in by_id:
                r = by_id[cid]
                if isinstance(r, ToolFailure):
                    content = json.dumps({"error": {"code": r.code, "message": r.message}})
                else:
                    content = r.decode(errors="replace")
            else:
                content = _CLIENT_TOOL
            msgs.append({"role": "tool", "tool_call_id": cid, "content": content})
        self._set_body(top)

    def _body(self) -> dict[str, Any]:
        if self._top is None:
            self._top = msgspec.json.decode(self._ctx.body)
        return self._top

    def _set_body(self, top: dict[str, Any]) -> None:
        """The request body (and its view: Triton builds its prompt from it) and, through
        `upstream_body`, what the upstream gets (its model, a fallback's template)."""
        ctx = self._ctx
        ctx.body = _encode(top)
        ctx.view = _view(ctx.body)
        assert ctx.route is not None
        upstream_body(ctx, ctx.route)

    def _final(
        self, reply: dict[str, Any], raw: bytes | None, usage: Usage | None, message: dict[str, Any]
    ) -> _Replayed:
        """The last turn as the relay's call: usage in the body is every turn's (what is charged)."""
        if self._runs:
            if usage is not None:
                reply["usage"] = msgspec.to_builtins(usage)
            if self._d._metadata:
                reply[BODY_FIELD] = msgspec.to_builtins(self._runs)
            raw = None
        body = raw if raw is not None else _encode(reply)
        content = message.get("content")
        frames = _frames(reply, self._ctx.client_wants_usage) if self._streamed else b""
        return _Replayed(body, usage, content if isinstance(content, str) else "", frames)

    def _note(self, usage: Usage | None) -> None:
        """The reply's metadata (also on an error reply: what ran before it); an error reply
        is charged the turns that ran."""
        ctx = self._ctx
        if not self._runs:
            return
        ctx.usage = usage
        ctx.timings[TIMING] = self._tool_ns
        listed = ", ".join(f"{r.name};dur={r.ms:g};status={r.error or 'ok'}" for r in self._runs)
        headers: tuple[tuple[str, str], ...] = ((TOOLS_HEADER, listed),)
        if self._errors:
            headers += ((ERROR_HEADER, ",".join(dict.fromkeys(self._errors))),)
        ctx.reply_headers += headers


def _frames(reply: dict[str, Any], with_usage: bool) -> bytes:
    """A chat.completion as the stream a client asked for: the message as one delta, the finish
    reason, and the usage chunk when the client asked for it (`[DONE]` is the relay's)."""
    head = {k: reply.get(k) for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = reply["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
    chunks: list[dict[str, Any]] = [
        head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]},
        head
        | {
            "choices": [
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
            ]
        },
    ]
    if with_usage and reply.get("usage") is not None:
        chunks.append(head | {"choices": [], "usage": reply["usage"]})
    return b"".join(b"data: " + _encode(c) + b"\n\n" for c in chunks)


def _reply_json(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream's reply is not JSON.") from None


def _message(reply: Any) -> dict[str, Any]:
    try:
        message = reply["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream's reply has no message.") from None
    if not isinstance(message, dict):
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream's reply has no message.")
    return message


def _name(call: Any) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) else ""


def _arguments(call: dict[str, Any]) -> str:
    args = call["function"].get("arguments")
    return args if isinstance(args, str) else json.dumps(args)


def build(cfg: Config, worker: Worker) -> tuple[AgentStage, AgentDispatch]:
    """The stage and the dispatcher, sharing one registry (closed by the stage)."""
    on = _On(cfg)
    registry = Registry(cfg.tools, worker.loop)
    return AgentStage(cfg, on, registry), AgentDispatch(cfg, worker, on, registry)
