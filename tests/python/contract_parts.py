"""Pipeline parts for the contract tests, loaded by a real gateway through `extensions:` (the
gateway's processes find this module on PYTHONPATH: conftest adds tests/python)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from gateway.context import RequestContext
from gateway.errors import Fault, GatewayError
from gateway.pipeline.stage import Outcome, Part
from gateway.upstreams.base import UpstreamCall


def _append(path: str, row: dict[str, Any]) -> None:
    # one write per line, O_APPEND: lines from several workers never interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


class _Stop:
    __slots__ = ("after", "seen")

    def __init__(self, after: int) -> None:
        self.after = after
        self.seen = 0

    def on_delta(self, call: UpstreamCall, nbytes: int) -> GatewayError | None:
        self.seen += 1
        if self.seen < self.after:
            return None
        return GatewayError(
            Fault.INVALID_REQUEST,
            f"stopped after {self.seen} reads: {call.completion_text!r}",
            code="test_stop",
        )

    def on_end(self, ctx: RequestContext) -> bytes:
        return b": stop_after saw the end\n\n"


class StopAfter(Part):
    """Response stage: ends every stream whose model is `model` after `reads` upstream reads;
    unary replies get a `"stage": "stop_after"` field at the top level."""

    name = "stop_after"
    __slots__ = ("model", "reads")

    def __init__(self, options: dict[str, Any]) -> None:
        self.model = str(options["model"])
        self.reads = int(options["reads"])

    def on_stream(self, ctx: RequestContext) -> _Stop | None:
        if ctx.route is None or ctx.route.name != self.model:
            return None
        return _Stop(self.reads)

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        if ctx.route is None or ctx.route.name != self.model:
            return body
        doc = json.loads(body)
        doc["stage"] = "stop_after"
        return json.dumps(doc).encode()


class Recorder(Part):
    """Observer: one JSON line per request outcome."""

    name = "recorder"
    __slots__ = ("path",)

    def __init__(self, options: dict[str, Any]) -> None:
        self.path = str(options["path"])

    def on_done(self, ctx: RequestContext, outcome: Outcome) -> None:
        usage = ctx.usage
        _append(
            self.path,
            {
                "id": ctx.request_id,
                "status": outcome.status,
                "error": outcome.error,
                "settled": ctx.settled,
                "stream": ctx.stream,
                "model": ctx.route.name if ctx.route is not None else None,
                "completion_tokens": usage.completion_tokens if usage is not None else None,
            },
        )


class SettleCounter(Part):
    """Request stage that does nothing on the request and records every settlement."""

    name = "settle_counter"
    __slots__ = ("path",)

    def __init__(self, options: dict[str, Any]) -> None:
        self.path = str(options["path"])

    async def on_request(self, ctx: RequestContext) -> None:
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        _append(self.path, {"id": ctx.request_id, "lease": ctx.lease is not None})


def stop_after(options: dict[str, Any]) -> StopAfter:
    return StopAfter(options)


def recorder(options: dict[str, Any]) -> Recorder:
    return Recorder(options)


def settle_counter(options: dict[str, Any]) -> SettleCounter:
    return SettleCounter(options)


class HangsOnClose(Part):
    """A request stage whose `close()` never returns (a part stuck at shutdown)."""

    name = "hangs_on_close"

    def __init__(self, options: dict[str, Any]) -> None:
        return None

    async def on_request(self, ctx: RequestContext) -> None:
        return None

    async def close(self) -> None:
        await asyncio.Event().wait()


def hangs_on_close(options: dict[str, Any]) -> HangsOnClose:
    return HangsOnClose(options)
