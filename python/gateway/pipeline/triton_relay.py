"""Stages `upstream` + `reframe` for Triton routes: one `ModelStreamInfer` call -> OpenAI.

Streams: each Triton response carries the new text only (`text_output`); the Rust `TextStream`
turns it into `chat.completion.chunk` frames (role first, content deltas, finish, usage; on
`/v1/completions`, `text_completion` frames),
carries split UTF-8 and cuts stop words. The end of generation is whichever comes first of the
two end-of-stream shapes (the `triton_final_response` flag on the last data response, or on a
separate empty one) and the RPC ending. A stop word seen in the text ends the stream and
cancels the call, as does a client disconnect (cancelling the task cancels the RPC).
Non-streamed requests use the same call with `stream=false` and collect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .. import _fastpath
from ..context import RequestContext
from ..errors import Fault, GatewayError
from ..schemas import CompletionRequestView, Usage
from ..upstreams.grpc_transport import RpcError
from ..upstreams.triton_grpc import TritonAdapter, TritonStream, map_rpc_error, map_stream_error
from ..usage import counted_prompt_tokens
from . import respond
from .reframe import TIMING_HEADER, ReadGaps, StreamLimits

_INT_SIZES = {"INT32": 4, "INT64": 8, "UINT32": 4, "UINT64": 8}


class _Reply:
    """What one `ModelStreamInferResponse` says."""

    __slots__ = ("final", "n_in", "n_out", "text")

    def __init__(self, resp: Any) -> None:
        ir = resp.infer_response
        self.text: bytes | None = None
        self.n_in: int | None = None
        self.n_out: int | None = None
        raws = ir.raw_output_contents
        for i, out in enumerate(ir.outputs):
            raw = raws[i] if i < len(raws) else b""
            name = out.name
            if name == "text_output":
                self.text = raw
            elif name in ("num_input_tokens", "num_output_tokens") and raw:
                size = _INT_SIZES.get(out.datatype, 4)
                value = int.from_bytes(raw[-size:], "little", signed=out.datatype.startswith("INT"))
                if name == "num_input_tokens":
                    self.n_in = value
                else:
                    self.n_out = value
        params = ir.parameters
        self.final = "triton_final_response" in params and params["triton_final_response"].bool_param


# kw_only: fields in OpenAI's order, defaults first
class ChatCompletionMessage(msgspec.Struct, gc=False, kw_only=True):
    role: str = "assistant"
    content: str


class ChatCompletionChoice(msgspec.Struct, gc=False, kw_only=True):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(msgspec.Struct, gc=False, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class TextCompletionChoice(msgspec.Struct, gc=False, kw_only=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str


class TextCompletion(msgspec.Struct, gc=False, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: Usage


_encode = msgspec.json.Encoder().encode


class _Counts:
    """Token counts the model reported, and how many text deltas arrived."""

    __slots__ = ("deltas", "n_in", "n_out")

    def __init__(self) -> None:
        self.n_in: int | None = None
        self.n_out: int | None = None
        self.deltas = 0

    def add(self, r: _Reply) -> None:
        if r.n_in is not None:
            self.n_in = r.n_in
        if r.n_out is not None:
            self.n_out = r.n_out
        if r.text:
            self.deltas += 1

    @property
    def generated(self) -> int:
        """Tokens generated so far: the model's own count, else one per text delta (TensorRT-LLM
        streams one token per response)."""
        return self.n_out if self.n_out is not None else self.deltas

    def finish_reason(self, max_tokens: int) -> str:
        return "length" if self.generated >= max_tokens else "stop"

    def usage(self, ctx: RequestContext, ts: _fastpath.TextStream) -> Usage:
        assert ctx.route is not None
        prompt = self.n_in if self.n_in is not None else counted_prompt_tokens(ctx)
        completion = self.n_out if self.n_out is not None else ts.completion_tokens(ctx.route.encoding)
        return Usage(prompt, completion, prompt + completion)


class _Pinger:
    """Keep-alive comments while the model is silent (long prefill, queueing): one timer per
    stream that fires every `ping_s` and pings only if nothing was sent meanwhile."""

    __slots__ = ("_handle", "_loop", "_ping_s", "_tasks", "_writer", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: respond.StreamWriter, ping_s: float) -> None:
        self._loop = loop
        self._writer = writer
        self._ping_s = ping_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_later(ping_s, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        due = self.last + self._ping_s
        if now >= due:
            task = self._loop.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.last = now
            due = now + self._ping_s
        self._handle = self._loop.call_at(due, self._tick)

    async def _send(self) -> None:
        # The client went away: the main loop notices on its next send.
        with contextlib.suppress(Exception):
            await self._writer.send(_fastpath.PING)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def _first(call: TritonStream, adapter: TritonAdapter, model: str) -> Any:
    try:
        resp = await call.read()
    except RpcError as exc:
        raise map_rpc_error(exc, model) from None
    if resp is None:
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The Triton model `{model}` sent no response.")
    if resp.error_message:
        err = map_stream_error(resp.error_message, model)
        if err.fault is Fault.UPSTREAM_UNAVAILABLE:
            adapter.forget(model)
        raise err
    return resp


async def handle(
    ctx: RequestContext,
    protocol: Any,
    limits: StreamLimits,
    deadline: float,
    settle: Callable[[RequestContext], None],
) -> None:
    """The whole upstream call for one request on a Triton route (stream or not); `settle`
    runs before a unary reply is sent."""
    route = ctx.route
    assert route is not None
    adapter = route.adapter
    assert isinstance(adapter, TritonAdapter)
    view = ctx.view
    assert view is not None
    loop = adapter.loop
    model = route.upstream_model
    t0 = time.perf_counter_ns()
    builder = await adapter.builder(model, route.triton)
    request, stops, max_tokens = builder.build(view, ctx.body, ctx.request_id, ctx.stream)
    call = adapter.stream(request, max(deadline - loop.time(), 0.001))
    try:
        if ctx.stream:
            await _relay(ctx, protocol, call, limits, stops, max_tokens, t0)
        else:
            body = await _collect(ctx, call, stops, max_tokens, deadline)
            ctx.timings["upstream"] = time.perf_counter_ns() - t0
            settle(ctx)
            respond.send_json(protocol, ctx, 200, body)
    finally:
        call.cancel()  # a no-op once the RPC is done


def _malformed(exc: Exception) -> GatewayError:
    return GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The Triton model's output is malformed: {exc}")


async def _collect(
    ctx: RequestContext, call: TritonStream, stops: list[str], max_tokens: int, deadline: float
) -> bytes:
    assert ctx.route is not None
    model = ctx.route.upstream_model
    adapter = ctx.route.adapter
    assert isinstance(adapter, TritonAdapter)
    ts = _fastpath.TextStream("", "", 0, stops, frames=False)
    counts = _Counts()
    try:
        async with asyncio.timeout_at(deadline):
            resp = await _first(call, adapter, model)
            while True:
                r = _Reply(resp)
                counts.add(r)
                if r.text is not None:
                    ts.push_tensor(r.text)
                if r.final or ts.stopped:
                    break
                try:
                    resp = await call.read()
                except RpcError as exc:
                    raise map_rpc_error(exc, model) from None
                if resp is None:
                    break
                if resp.error_message:
                    raise map_stream_error(resp.error_message, model)
    except TimeoutError:
        raise GatewayError(Fault.UPSTREAM_TIMEOUT, "The Triton model did not finish in time.") from None
    except _fastpath.FastpathError as exc:
        raise _malformed(exc) from None
    ts.finish("stop")
    usage = counts.usage(ctx, ts)
    ctx.usage = usage
    reason = "stop" if ts.stopped else counts.finish_reason(max_tokens)
    created, name = int(time.time()), ctx.route.name
    if isinstance(ctx.view, CompletionRequestView):
        text = TextCompletionChoice(text=ts.text, finish_reason=reason)
        return _encode(
            TextCompletion(
                id=f"cmpl-{ctx.request_id}", created=created, model=name, choices=[text], usage=usage
            )
        )
    choice = ChatCompletionChoice(message=ChatCompletionMessage(content=ts.text), finish_reason=reason)
    return _encode(
        ChatCompletion(
            id=f"chatcmpl-{ctx.request_id}", created=created, model=name, choices=[choice], usage=usage
        )
    )


async def _relay(
    ctx: RequestContext,
    protocol: Any,
    call: TritonStream,
    limits: StreamLimits,
    stops: list[str],
    max_tokens: int,
    t0: int,
) -> None:
    route = ctx.route
    assert route is not None
    adapter = route.adapter
    assert isinstance(adapter, TritonAdapter)
    model = route.upstream_model
    loop = adapter.loop
    if isinstance(ctx.view, CompletionRequestView):
        ts = _fastpath.TextStream(
            f"cmpl-{ctx.request_id}", route.name, int(time.time()), stops, completion=True
        )
    else:
        ts = _fastpath.TextStream(f"chatcmpl-{ctx.request_id}", route.name, int(time.time()), stops)
    counts = _Counts()
    first_deadline = min(limits.stream_deadline, loop.time() + adapter.first_byte_timeout_s)
    try:
        async with asyncio.timeout_at(first_deadline):
            resp = await _first(call, adapter, model)
    except TimeoutError:
        raise GatewayError(Fault.UPSTREAM_TIMEOUT, "The Triton model sent no first token in time.") from None
    first_ns = time.perf_counter_ns()
    ctx.timings["ttfb"] = first_ns - t0
    # live budget enforcement: the most completion tokens the key's budget allows this stream
    lease = ctx.lease
    live_limit = lease.stream_token_limit if lease is not None else None
    writer = respond.start_stream(protocol, ctx)
    pinger = _Pinger(loop, writer, limits.ping_s)
    gaps = ReadGaps(loop.time())
    finished = False
    try:
        out = ts.role()
        async with asyncio.timeout_at(limits.stream_deadline) as timeout:
            while True:
                r = _Reply(resp)
                counts.add(r)
                if r.text is not None:
                    out += ts.push_tensor(r.text)
                if out:
                    await writer.send(out)
                    pinger.last = loop.time()
                    out = b""
                if live_limit is not None and counts.generated > live_limit and not r.final:
                    # what was produced is sent (and charged); the model stops now
                    call.cancel()
                    msg = (
                        f"Budget exceeded: the stream was ended after {counts.generated} completion"
                        f" tokens, the most that the {lease.budget_note if lease else 'budget'} allows."
                    )
                    await _end_with_error(
                        ctx, writer, GatewayError(Fault.RATE_LIMITED, msg, code="budget_exceeded")
                    )
                    return
                if r.final or ts.stopped:
                    break
                timeout.reschedule(min(limits.stream_deadline, loop.time() + limits.idle_s))
                try:
                    resp = await call.read()
                except RpcError as exc:
                    await _end_with_error(ctx, writer, map_rpc_error(exc, model))
                    return
                if resp is None:
                    break
                gaps.add(loop.time())
                if resp.error_message:
                    await _end_with_error(ctx, writer, map_stream_error(resp.error_message, model))
                    return
        if ts.stopped:
            call.cancel()  # the stop word ended it: free the model's slot now
        tail = ts.finish(counts.finish_reason(max_tokens))
        usage = counts.usage(ctx, ts)
        ctx.usage = usage
        if ctx.client_wants_usage:
            tail += ts.usage_chunk(usage.prompt_tokens, usage.completion_tokens)
        if ctx.headers.get(TIMING_HEADER) is not None:
            tail += gaps.comment((first_ns - ctx.start_ns) / 1e6)
        await writer.send(tail + _fastpath.DONE)
        finished = True
    except TimeoutError:
        if loop.time() >= limits.stream_deadline:
            err = GatewayError(Fault.STREAM_TIMEOUT, "The stream exceeded its maximum duration.")
        else:
            err = GatewayError(Fault.UPSTREAM_TIMEOUT, "The Triton model went silent mid-stream.")
        await _end_with_error(ctx, writer, err)
    except _fastpath.FastpathError as exc:
        await _end_with_error(ctx, writer, _malformed(exc))
    finally:
        pinger.stop()
        writer.close()
        if not finished and ctx.usage is None:
            ctx.usage = counts.usage(ctx, ts)


async def _end_with_error(ctx: RequestContext, writer: respond.StreamWriter, err: GatewayError) -> None:
    await respond.end_stream_with_error(ctx, writer, err.message, err.fault.type, err.code)
