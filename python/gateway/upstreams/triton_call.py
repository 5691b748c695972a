"""One `ModelStreamInfer` call on a Triton route, as an `UpstreamCall`.

Each Triton response carries the new text only (`text_output`); the Rust `TextStream` turns it
into OpenAI frames (`chat.completion.chunk`, or `text_completion` on `/v1/completions`), carries
split UTF-8 and cuts stop words. The end of generation is whichever comes first of the two
end-of-stream shapes (the `triton_final_response` flag on the last data response, or on a
separate empty one) and the RPC ending. A stop word ends the stream and cancels the call, as
does an abort (client gone, a response stage). Unary requests use the same call, collected.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .. import _fastpath
from ..errors import Fault, GatewayError
from ..schemas import CompletionRequestView, Usage
from ..usage import counted_prompt_tokens
from .grpc_transport import RpcError

if TYPE_CHECKING:
    from ..context import RequestContext
    from .triton_grpc import TritonAdapter, TritonStream

_INT_SIZES = {"INT32": 4, "INT64": 8, "UINT32": 4, "UINT64": 8}
#: integer outputs a reply reads, by the slot they fill
_INT_OUTPUTS = {"num_input_tokens": "n_in", "num_output_tokens": "n_out", "sequence_index": "seq"}


def _floats(raw: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) // 4 * 4]))


class Reply:
    """What one `ModelStreamInferResponse` says; one parser for the plain and the rich call (an
    output a request did not ask for is absent, so the plain call pays nothing for `lps`)."""

    __slots__ = ("final", "lps", "n_in", "n_out", "seq", "text")

    def __init__(self, resp: Any) -> None:
        ir = resp.infer_response
        self.text = b""
        self.n_in: int | None = None
        self.n_out: int | None = None
        self.lps: Sequence[float] = ()
        self.seq = 0
        for out, raw in zip(ir.outputs, ir.raw_output_contents, strict=False):  # no raw: nothing read
            name = out.name
            if name == "text_output":
                self.text = raw
            elif name in _INT_OUTPUTS and raw:
                dt = out.datatype
                size = _INT_SIZES.get(dt, 4)
                value = int.from_bytes(raw[-size:], "little", signed=dt.startswith("INT"))
                setattr(self, _INT_OUTPUTS[name], value)
            elif name == "output_log_probs":
                self.lps = _floats(raw)
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


class TextCompletionChoice(msgspec.Struct, gc=False, kw_only=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str


class Completion(msgspec.Struct, gc=False, kw_only=True):
    """`chat.completion` or `text_completion`, by `object` and the choice type."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatCompletionChoice] | list[TextCompletionChoice]
    usage: Usage


_encode = msgspec.json.Encoder().encode


def _malformed(exc: Exception) -> GatewayError:
    return GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The Triton model's output is malformed: {exc}")


def no_first_token() -> GatewayError:
    return GatewayError(Fault.UPSTREAM_TIMEOUT, "The Triton model sent no first token in time.")


def no_response(model: str) -> GatewayError:
    return GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The Triton model `{model}` sent no response.")


def not_finished() -> GatewayError:
    return GatewayError(Fault.UPSTREAM_TIMEOUT, "The Triton model did not finish in time.")


async def read_response(adapter: TritonAdapter, stream: TritonStream, model: str) -> Any:
    """The stream's next response; None at its end. Raises GatewayError (mapped; an unavailable
    model is forgotten). A function, not a method: each call reads through it directly, one layer
    per chunk."""
    from .triton_grpc import map_rpc_error, map_stream_error

    try:
        resp = await stream.read()
    except RpcError as exc:
        raise map_rpc_error(exc, model) from None
    if resp is not None and resp.error_message:
        err = map_stream_error(resp.error_message, model)
        if err.fault is Fault.UPSTREAM_UNAVAILABLE:
            adapter.forget(model)
        raise err
    return resp


class TritonCall:
    """The call's responses through one `TextStream`, counting what the model reports."""

    __slots__ = (
        "_adapter",
        "_call",
        "_ctx",
        "_deltas",
        "_final",
        "_max_tokens",
        "_model",
        "_n_in",
        "_n_out",
        "_ts",
        "_usage",
    )

    def __init__(
        self,
        ctx: RequestContext,
        adapter: TritonAdapter,
        call: TritonStream,
        stops: list[str],
        max_tokens: int,
        model: str,
    ) -> None:
        route = ctx.route
        assert route is not None
        self._ctx = ctx
        self._adapter = adapter
        self._call = call
        self._model = model
        self._max_tokens = max_tokens
        self._final = False
        self._n_in: int | None = None
        self._n_out: int | None = None
        self._deltas = 0
        self._usage: Usage | None = None
        if not ctx.stream:
            self._ts = _fastpath.TextStream("", "", 0, stops, frames=False)
        elif isinstance(ctx.view, CompletionRequestView):
            self._ts = _fastpath.TextStream(
                f"cmpl-{ctx.request_id}", route.name, int(time.time()), stops, completion=True
            )
        else:
            self._ts = _fastpath.TextStream(f"chatcmpl-{ctx.request_id}", route.name, int(time.time()), stops)

    def _push(self, resp: Any) -> bytes:
        r = Reply(resp)
        if r.n_in is not None:
            self._n_in = r.n_in
        if r.n_out is not None:
            self._n_out = r.n_out
        if r.final:
            self._final = True
        if not r.text:
            return b""
        self._deltas += 1
        try:
            return self._ts.push_tensor(r.text)
        except _fastpath.FastpathError as exc:
            raise _malformed(exc) from None

    @property
    def _ended(self) -> bool:
        return self._final or self._ts.stopped

    # ---- UpstreamCall -----------------------------------------------------------------------
    async def first(self, deadline: float) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                resp = await read_response(self._adapter, self._call, self._model)
        except TimeoutError:
            raise no_first_token() from None
        if resp is None:
            raise no_response(self._model)
        return self._ts.role() + self._push(resp)

    async def next(self, deadline: float) -> bytes | None:
        if self._ended:
            return None
        async with asyncio.timeout_at(deadline):
            resp = await read_response(self._adapter, self._call, self._model)
        if resp is None:
            return None
        return self._push(resp)

    def _reason(self) -> str:
        return "length" if self.generated_tokens >= self._max_tokens else "stop"

    def finish(self) -> tuple[bytes, GatewayError | None]:
        ts = self._ts
        if ts.stopped:
            self._call.cancel()  # the stop word ended it: free the model's slot now
        tail = ts.finish(self._reason())
        if self._ctx.client_wants_usage:
            usage = self.usage()
            tail += ts.usage_chunk(usage.prompt_tokens, usage.completion_tokens)
        return tail, None

    async def body(self, deadline: float) -> bytes:
        ctx = self._ctx
        route = ctx.route
        assert route is not None
        adapter, call, model = self._adapter, self._call, self._model
        try:
            async with asyncio.timeout_at(deadline):
                resp = await read_response(adapter, call, model)
                if resp is None:
                    raise no_response(model)
                self._push(resp)
                while not self._ended and (resp := await read_response(adapter, call, model)) is not None:
                    self._push(resp)
        except TimeoutError:
            raise not_finished() from None
        ts = self._ts
        ts.finish("stop")
        usage = self.usage()
        reason = "stop" if ts.stopped else self._reason()
        choices: list[ChatCompletionChoice] | list[TextCompletionChoice]
        if isinstance(ctx.view, CompletionRequestView):
            kind, prefix = "text_completion", "cmpl"
            choices = [TextCompletionChoice(text=ts.text, finish_reason=reason)]
        else:
            kind, prefix = "chat.completion", "chatcmpl"
            message = ChatCompletionMessage(content=ts.text)
            choices = [ChatCompletionChoice(message=message, finish_reason=reason)]
        reply = Completion(
            id=f"{prefix}-{ctx.request_id}",
            object=kind,
            created=int(time.time()),
            model=route.name,
            choices=choices,
            usage=usage,
        )
        return _encode(reply)

    def usage(self) -> Usage:
        if self._usage is None:
            ctx = self._ctx
            assert ctx.route is not None
            prompt = self._n_in if self._n_in is not None else counted_prompt_tokens(ctx)
            completion = (
                self._n_out if self._n_out is not None else self._ts.completion_tokens(ctx.route.encoding)
            )
            self._usage = Usage(prompt, completion, prompt + completion)
        return self._usage

    @property
    def completion_text(self) -> str:
        return self._ts.text

    @property
    def generated_tokens(self) -> int:
        """The model's own count, else one per text delta (TensorRT-LLM streams one token per
        response)."""
        return self._n_out if self._n_out is not None else self._deltas

    def abort(self) -> None:
        self._call.cancel()

    def release(self) -> None:
        self._call.cancel()  # a no-op once the RPC is done
