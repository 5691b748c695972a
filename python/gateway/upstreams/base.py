"""The upstream adapter protocol: one adapter per upstream kind, one call per request.

An adapter turns the request context into a call on its upstream (`start`) and owns everything
kind-specific: the wire, the mapping of its errors into the taxonomy, and its Rust framer (the
`Reframer` for OpenAI SSE, the `TextStream` for Triton tensors). The relay
(`gateway.pipeline.relay`) drives every call the same way and never asks which kind it has.

Deadlines are on the worker's loop clock (`Worker.time()`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..errors import GatewayError
    from ..routing.deployment import Deployment
    from ..schemas import Usage


class UpstreamCall(Protocol):
    """One call in flight. Each step yields frame bytes ready to send (already OpenAI SSE frames
    for the client's endpoint); the text and token counts so far are there for response stages;
    `finish` says how the stream ended; `usage` what it cost."""

    async def first(self, deadline: float) -> bytes:
        """Streams: wait for the first upstream event and return its frames. Raises
        `GatewayError` (nothing was sent yet: it becomes a JSON error reply), also when
        `deadline` passes first."""
        ...

    async def next(self, deadline: float) -> bytes | None:
        """Frames of the next upstream read (b"" when the read completed none); None once the
        upstream stream has ended. Raises `TimeoutError` when `deadline` passes with nothing
        read (the relay decides what that means), `GatewayError` when the upstream fails."""
        ...

    def finish(self) -> tuple[bytes, GatewayError | None]:
        """The upstream stream ended: frames still owed (the finish chunk; the usage chunk when
        the client asked for one and none went out), and the error that must end the stream
        instead of `[DONE]` (e.g. the upstream never sent its own end), if any."""
        ...

    async def body(self, deadline: float) -> bytes:
        """Unary: the whole OpenAI reply body, `usage` filled in. Raises `GatewayError`."""
        ...

    def usage(self) -> Usage | None:
        """What the call used so far, also after a break: the upstream's numbers, else counted;
        None when the upstream never answered."""
        ...

    @property
    def completion_text(self) -> str:
        """The completion text sent to the client so far (response stages count it)."""
        ...

    @property
    def generated_tokens(self) -> int | None:
        """Completion tokens so far when the upstream reports them per step (Triton), else None
        (count `completion_text`)."""
        ...

    def abort(self) -> None:
        """Stop the call now (error, client gone, a response stage ended it)."""
        ...

    def release(self) -> None:
        """The call ended cleanly: give its connection back for reuse."""
        ...


class Adapter(Protocol):
    """One upstream server (a provider of the config). Built once per worker by
    `gateway.upstreams.build` (its start of life: it gets the worker there), closed at shutdown."""

    kind: str
    name: str
    first_byte_timeout_s: float
    idle_timeout_s: float
    total_timeout_s: float

    async def close(self) -> None: ...

    async def start(
        self, ctx: RequestContext, target: Deployment, body: bytes, deadline: float
    ) -> UpstreamCall:
        """Send the request to `target` (a deployment on this adapter's server; `body` is the
        upstream body for its model); return once the upstream has accepted it (HTTP: a 2xx
        head). Raises `GatewayError` (mapped) on refusal or failure. May be cancelled (a lost
        hedge, a client gone): then it leaves nothing behind."""
        ...

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        """Readiness of this upstream: `{"ready": bool, "detail": str, ...}`."""
        ...

    async def check(self, model: str | None, path: str, timeout_s: float) -> tuple[bool, str]:
        """The active health check of one deployment (`routing.health`): (healthy, what was
        seen). Kind-specific: an HTTP server answers `GET path` below 500; Triton says the
        server and `model` are ready. Never raises for an unreachable upstream."""
        ...
