"""The Anthropic Messages dialect: `POST /v1/messages` and `/v1/messages/count_tokens`.

At decode the Anthropic body becomes the equivalent OpenAI chat body (`anthropic_wire`), and
from there the request is a chat request like any other: auth (`x-api-key`), limits, guards,
routing, every upstream kind, the ledger and usage. On the way out the relay's OpenAI frames go
through a translating writer (Anthropic's stream events), a unary body is rewritten into a
`message`, and errors take Anthropic's shape and statuses (529 `overloaded_error` where the
gateway has no capacity), each reply with a `request-id` header. count_tokens is answered here,
with the route's tokenizer, without an upstream call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from .. import _fastpath
from ..anthropic_wire import (
    MessagesRequest,
    decode_request,
    error_body,
    error_status_type,
    message_from_chat,
    to_chat_body,
)
from ..context import Endpoint, RequestContext
from ..errors import GatewayError
from ..usage import counted_prompt_tokens
from . import respond

_encode = msgspec.json.Encoder().encode
REQUEST_ID = "request-id"


class MessagesError(GatewayError):
    """A `GatewayError` answered in Anthropic's shape: its own status and body; the fault (and
    its code, for the observers) stays the original's."""

    __slots__ = ("_body", "_status")

    def __init__(
        self, err: GatewayError, status: int, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> None:
        super().__init__(err.fault, err.message, param=err.param, headers=headers, code=err.code)
        self._status = status
        self._body = body

    @property
    def status(self) -> int:
        return self._status

    def body(self) -> bytes:
        return self._body


class _State(msgspec.Struct, gc=False):
    """What the way out needs from the request (kept on the dialect's writer / reply)."""

    model: str
    stops: list[str] | None


class MessagesStreamWriter(respond.StreamWriter):
    """The relay's stream writer for a Messages client: every send (frames, pings, the error
    event, `[DONE]`) is translated to Anthropic's events first, in Rust (`MessagesStream`:
    0.6 µs a chunk where the Python reference, `anthropic_stream.ChatToMessages`, took 2.7)."""

    __slots__ = ("_inner", "_tr")

    def __init__(self, inner: respond.StreamWriter, translator: _fastpath.MessagesStream) -> None:
        super().__init__(None)
        self._inner = inner
        self._tr = translator

    async def send(self, data: bytes) -> None:
        out = self._tr.feed(data)
        if out:
            await self._inner.send(out)

    def close(self) -> None:
        self._inner.close()


class MessagesDialect:
    """One per endpoint (`count_only` for `/v1/messages/count_tokens`), shared by every request."""

    __slots__ = ("_count_only", "local")

    def __init__(self, count_only: bool = False) -> None:
        self._count_only = count_only
        self.local = count_only

    def decode(self, ctx: RequestContext) -> None:
        req, top = decode_request(ctx.body, self._count_only)
        ctx.reply_headers += ((REQUEST_ID, ctx.request_id),)
        ctx.body = to_chat_body(req, top)
        ctx.endpoint = Endpoint.CHAT
        stops = req.stop_sequences if isinstance(req, MessagesRequest) else None
        ctx.dialect_state = _State(req.model, stops)
        # the stream's `message_delta` carries the usage: the translated body asks for it
        ctx.client_wants_usage = bool(isinstance(req, MessagesRequest) and req.stream)

    # ---- count_tokens ---------------------------------------------------------------------------
    def answer(
        self, ctx: RequestContext, protocol: Any, settle: Callable[[RequestContext], None]
    ) -> Coroutine[Any, Any, None]:
        return self._count(ctx, protocol, settle)

    async def _count(
        self, ctx: RequestContext, protocol: Any, settle: Callable[[RequestContext], None]
    ) -> None:
        """Messages and system prompt by the chat rules, plus the tool definitions' JSON."""
        assert ctx.route is not None
        tokens = counted_prompt_tokens(ctx)
        tools = msgspec.json.decode(ctx.body).get("tools")
        if tools:
            tokens += _fastpath.count_tokens(_encode(tools).decode(), ctx.route.encoding)
        settle(ctx)
        ctx.timings["total"] = time.perf_counter_ns() - ctx.start_ns
        respond.send_json(protocol, ctx, 200, b'{"input_tokens":%d}' % tokens)

    # ---- the way out ----------------------------------------------------------------------------
    def start_stream(self, protocol: Any, ctx: RequestContext) -> respond.StreamWriter:
        state = ctx.dialect_state
        assert isinstance(state, _State)
        translator = _fastpath.MessagesStream(
            f"msg_{ctx.request_id}", state.model, counted_prompt_tokens(ctx), state.stops or []
        )
        return MessagesStreamWriter(respond.start_stream(protocol, ctx), translator)

    async def unary(self, ctx: RequestContext, body: bytes) -> bytes:
        state = ctx.dialect_state
        assert isinstance(state, _State)
        return message_from_chat(body, f"msg_{ctx.request_id}", state.model, state.stops)

    def error(self, ctx: RequestContext, err: GatewayError) -> GatewayError:
        status, kind = error_status_type(err.fault)
        headers = err.headers
        if (REQUEST_ID, ctx.request_id) not in ctx.reply_headers:
            headers += ((REQUEST_ID, ctx.request_id),)
        return MessagesError(err, status, error_body(kind, err.message, ctx.request_id), headers)


MESSAGES = MessagesDialect()
COUNT_TOKENS = MessagesDialect(count_only=True)
#: request path -> its dialect (app.py: one dict lookup per inference request)
DIALECTS: dict[str, MessagesDialect] = {
    Endpoint.MESSAGES.value: MESSAGES,
    Endpoint.MESSAGES_COUNT_TOKENS.value: COUNT_TOKENS,
}
