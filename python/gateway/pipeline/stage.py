"""What a pipeline part is: request stages (in order), response stages (in reverse order),
request-done observers (after the reply), all with one lifecycle. See docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..worker import Worker


class Part:
    """The lifecycle every stage, observer and adapter shares: `start` once the worker's loop
    exists (background tasks, connections), `close` at worker shutdown (drain, disconnect)."""

    __slots__ = ()

    def start(self, worker: Worker) -> None:
        return None

    async def close(self) -> None:
        return None


class RequestStage(Protocol):
    name: str

    def start(self, worker: Worker) -> None: ...

    async def close(self) -> None: ...

    async def on_request(self, ctx: RequestContext) -> None:
        """Continue (return) or refuse (raise `GatewayError`: a local error reply)."""


class FinishStage(Protocol):
    """A request stage that holds something until the request ends (the limits lease)."""

    name: str

    def on_finish(self, ctx: RequestContext) -> None:
        """Settle: called exactly once per request that reached the pipeline, before a unary
        reply goes out (its headers show the settled state) or after a stream ended."""


class Outcome:
    """How a request ended, as the client saw it: what observers get once, after the reply."""

    __slots__ = ("error", "status")

    def __init__(self, status: int, error: str | None) -> None:
        #: the HTTP status sent (200 for a stream, also one that later ended with an error
        #: event), the error's status for a refused or failed request, 499 when the client went
        #: away before the reply was complete (nginx's convention), 500 for an internal error
        self.status = status
        #: the error code (the OpenAI `code`: the stream's error event, the error reply, or
        #: `client_disconnected`); None on success
        self.error = error


class Observer(Protocol):
    name: str

    def start(self, worker: Worker) -> None: ...

    async def close(self) -> None: ...

    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The request is over and its reply sent. Runs once per request, on the request's
        task: never raises, never blocks (queue work for later)."""
