"""The client dialect protocol: a client API other than OpenAI's, served by translation.

The pipeline is OpenAI-shaped end to end (stages, dispatch, adapters, the relay, observers). A
dialect is the one place another client API lives: it turns the request body into an OpenAI one
at decode time, and the reply, the stream and the errors back into its own on the way out. The
request context holds the client's dialect (`ctx.dialect`, None for OpenAI clients); the relay
and the pipeline look at it once per request, never per chunk, so plain OpenAI requests pay
nothing for dialects. `pipeline/messages.py` (Anthropic Messages) and `pipeline/responses.py`
(OpenAI Responses, with its conversation store) are the two there are. A dialect request runs
the pipeline's dialect chain: the request stages plus `history` after auth (the Responses
dialect's stored conversation, which must know the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..errors import GatewayError
    from .respond import StreamWriter


class Dialect(Protocol):
    #: answers from the gateway itself after the request stages, without an upstream call
    #: (`/v1/messages/count_tokens`)
    local: bool

    def decode(self, ctx: RequestContext) -> None:
        """Replace `ctx.body` by the equivalent OpenAI request (stage `decode`, first); raise
        `GatewayError` for a request the client's API refuses."""
        ...

    def answer(
        self, ctx: RequestContext, protocol: Any, settle: Callable[[RequestContext], None]
    ) -> Coroutine[Any, Any, None]:
        """A `local` dialect's reply (the relay's place)."""
        ...

    def start_stream(self, protocol: Any, ctx: RequestContext) -> StreamWriter:
        """The stream's writer: it translates every OpenAI frame, ping and error event the relay
        sends."""
        ...

    async def unary(self, ctx: RequestContext, body: bytes) -> bytes:
        """A unary OpenAI reply body (after the response stages) -> the client's (async: the
        Responses dialect commits the stored response before the reply)."""
        ...

    def error(self, ctx: RequestContext, err: GatewayError) -> GatewayError:
        """An error reply in the client's format (status, body, headers)."""
        ...
