"""Response stage `live_budget` (`limits.live_budget_enforcement`): a stream's completion tokens
counted as they go out, against what the key's budget allows this stream
(`Lease.stream_token_limit`, set by the limits stage). The stream ends with `budget_exceeded`
after the read that passes it (overshoot: at most that read, which is sent and charged).

Cheap per read: where the upstream counts tokens (Triton) its count is used; otherwise the
frame bytes are an upper bound of the tokens they can carry, so the text is only counted (BPE,
just the text new since the last count) once the count so far plus the bytes since could pass
the limit. Requests without a limit get no hook at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fastpath
from ..errors import Fault, GatewayError
from .stage import Part

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..upstreams.base import UpstreamCall


class _Budget:
    __slots__ = ("counted", "encoding", "limit", "note", "offset", "unchecked")

    def __init__(self, limit: int, encoding: str, note: str) -> None:
        self.limit = limit
        self.encoding = encoding
        self.note = note
        self.counted = 0
        self.offset = 0
        self.unchecked = 0

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        generated = call.generated_tokens
        if generated is not None:
            self.counted = generated
        elif not self._count(call, nbytes):
            return None
        if self.counted <= self.limit:
            return None
        return GatewayError(
            Fault.RATE_LIMITED,
            f"Budget exceeded: the stream was ended after {self.counted} completion tokens, the most "
            f"that the {self.note} allows.",
            code="budget_exceeded",
        )

    def on_end(self, ctx: RequestContext) -> bytes:
        return b""

    def _count(self, call: UpstreamCall, nbytes: int) -> bool:
        """Bring `counted` up to date if the limit may have been passed; False: it cannot have."""
        self.unchecked += nbytes
        if self.counted + self.unchecked <= self.limit:
            return False
        new = call.completion_text[self.offset :]
        # Count up to the last space (BPE words begin with their space, so counting piece by
        # piece then matches counting the whole); the rest waits for the next count.
        cut = new.rfind(" ")
        if cut <= 0:
            cut = len(new)
        if cut:
            self.counted += _fastpath.count_tokens(new[:cut], self.encoding)
            self.offset += cut
        self.unchecked = 4 * (len(new) - cut)  # UTF-8 bytes at most: at least as many as tokens
        return True


class LiveBudgetStage(Part):
    name = "live_budget"
    __slots__ = ()

    def on_stream(self, ctx: RequestContext) -> _Budget | None:
        lease = ctx.lease
        if lease is None or lease.stream_token_limit is None or ctx.route is None:
            return None
        return _Budget(lease.stream_token_limit, ctx.route.encoding, lease.budget_note)

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        return body  # a unary reply's cost was reserved in full: nothing to cut
