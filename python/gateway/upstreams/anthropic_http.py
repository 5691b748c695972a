"""Upstream adapter for Anthropic's Messages API (provider kind `anthropic`).

The HTTP side is the OpenAI adapter's (pooled HTTP/1.1, the base URL from the config only, no
redirects), with Anthropic's headers (`x-api-key`, `anthropic-version`). The request is the
deployment's OpenAI chat body translated to a Messages request (`anthropic_wire`); the answer,
streamed or not, is translated back to OpenAI chunks / a chat.completion (`anthropic_stream`),
so the relay, the response stages and a Messages client's own dialect see what they see from
every other kind. Anthropic's 529 (overloaded) is an unavailable upstream (retried, failed over).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import _fastpath
from ..anthropic_stream import MessagesToChat, chat_from_message
from ..anthropic_wire import messages_from_chat
from ..config import AnthropicProvider, OpenAIProvider
from ..errors import Fault, GatewayError
from ..money import cached_tokens
from ..schemas import PromptTokensDetails, Usage
from ..usage import counted_prompt_tokens
from .httpclient import Connection
from .openai_http import HttpCall, OpenAIHttpAdapter, trace_lines

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..routing.deployment import Deployment
    from ..worker import Worker


class AnthropicHttpAdapter:
    """The OpenAI adapter's HTTP client (an OpenAI provider of the same address, timeouts and
    pool, no bearer key) with Anthropic's headers and wire."""

    kind = "anthropic"
    __slots__ = (
        "_http",
        "default_max_tokens",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "name",
        "pool",
        "total_timeout_s",
    )

    def __init__(self, provider: AnthropicProvider, worker: Worker) -> None:
        http = self._http = OpenAIHttpAdapter(
            OpenAIProvider(
                name=provider.name,
                base_url=provider.base_url,
                headers={
                    **({"x-api-key": provider.api_key} if provider.api_key else {}),
                    "anthropic-version": provider.anthropic_version,
                    **provider.headers,
                },
                connect_timeout_ms=provider.connect_timeout_ms,
                first_byte_timeout_ms=provider.first_byte_timeout_ms,
                idle_timeout_ms=provider.idle_timeout_ms,
                total_timeout_ms=provider.total_timeout_ms,
                max_response_bytes=provider.max_response_bytes,
                max_idle_connections=provider.max_idle_connections,
            ),
            worker,
        )
        self.name = provider.name
        self.pool = http.pool
        self.first_byte_timeout_s = http.first_byte_timeout_s
        self.idle_timeout_s = http.idle_timeout_s
        self.total_timeout_s = http.total_timeout_s
        self.default_max_tokens = provider.default_max_tokens

    async def start(
        self, ctx: RequestContext, target: Deployment, body: bytes, deadline: float
    ) -> AnthropicCall:
        t0 = time.perf_counter_ns()
        extra = trace_lines(ctx)
        wire = messages_from_chat(body, self.default_max_tokens)
        try:
            conn = await self._http.open("/messages", wire, ctx.request_id, deadline, extra)
        except GatewayError as err:
            if ("x-upstream-error-code", "529") in err.headers:
                raise GatewayError(
                    Fault.UPSTREAM_UNAVAILABLE,
                    "The upstream is overloaded (529)",
                    headers=(*err.headers, ("retry-after", "1")),
                ) from None
            raise
        ctx.timings["upstream_head"] = time.perf_counter_ns() - t0
        return AnthropicCall(ctx, conn, self._http.max_response_bytes, target.upstream_model or "")

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        """Readiness: `GET /models` answers below 500 (Anthropic lists its models there)."""
        return await self._http.probe(timeout_s)

    async def check(self, model: str | None, path: str, timeout_s: float) -> tuple[bool, str]:
        return await self._http.check(model, path, timeout_s)

    async def close(self) -> None:
        await self._http.close()


def _frames(parser: _fastpath.SseParser, tr: MessagesToChat, data: bytes) -> bytes:
    return b"".join(tr.on_event(e.data) for e in parser.feed(data))


class AnthropicCall(HttpCall):
    """One Messages POST whose 2xx head has arrived; its events or body, as OpenAI's."""

    __slots__ = ("_parser",)
    _framer: MessagesToChat

    def __init__(self, ctx: RequestContext, conn: Connection, max_bytes: int, model: str) -> None:
        super().__init__(ctx, conn, max_bytes)
        self._framer = MessagesToChat(model)
        self._parser: _fastpath.SseParser | None = None
        if ctx.stream:
            self._parser = _fastpath.SseParser()
            self._feed = partial(_frames, self._parser, self._framer)  # not a bound method: no cycle

    def finish(self) -> tuple[bytes, GatewayError | None]:
        if not self._framer.done:
            return b"", GatewayError(
                Fault.UPSTREAM_BAD_RESPONSE, "The upstream ended the stream without message_stop."
            )
        tail = b""
        if self._ctx.client_wants_usage:
            usage = self.usage()
            assert usage is not None
            tail = self._framer.usage_frame(
                usage.prompt_tokens, usage.completion_tokens, cached_tokens(usage)
            )
        return tail, None

    async def body(self, deadline: float) -> bytes:
        raw = await self._read_body(deadline)
        got = chat_from_message(raw, self._framer._model)
        if got is None:
            raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream returned an invalid message.")
        body, prompt, completion, cached = got
        self._usage = self._ctx.usage = _usage(prompt, completion, cached)
        return body

    def usage(self) -> Usage | None:
        if self._usage is not None or self._parser is None:
            return self._usage
        tr = self._framer
        if tr.events == 0:
            return None
        ctx = self._ctx
        assert ctx.route is not None
        prompt = tr.input_tokens if tr.input_tokens is not None else counted_prompt_tokens(ctx)
        completion = tr.output_tokens
        if completion is None:
            completion = _fastpath.count_tokens(self.completion_text, ctx.route.encoding)
        if tr.done:  # final: count once
            self._usage = _usage(prompt, completion, tr.cached_tokens)
            return self._usage
        return _usage(prompt, completion, tr.cached_tokens)

    @property
    def completion_text(self) -> str:
        return "".join(self._framer.text)


def _usage(prompt: int, completion: int, cached: int) -> Usage:
    """Usage in OpenAI's convention; cache reads (normalised by `anthropic_stream`) as
    `prompt_tokens_details.cached_tokens`, which prices and the ledger count apart."""
    usage = Usage(prompt, completion, prompt + completion)
    if cached:
        usage.prompt_tokens_details = PromptTokensDetails(cached)
    return usage
