"""Error targets: a failing tool is reported as a JSON POST to `tools.error_target.url`, from a
task off the request path (the reply never waits for it; a slow or dead target loses reports,
logged, never requests)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from .base import ToolFailure
from .http import exchange, origin_pool

if TYPE_CHECKING:
    from ..config_tools import ErrorTargetConfig
    from ..context import RequestContext

log = logging.getLogger("gateway.tools")

#: reports in flight at once; more are dropped (and logged)
MAX_PENDING = 256


class ErrorReport(msgspec.Struct, frozen=True):
    """The body the error target receives."""

    request_id: str
    tool: str
    code: str
    message: str
    arguments: str
    model: str | None
    key_id: str | None
    time: float


class ErrorReporter:
    """Per worker; `report` queues a POST and returns at once."""

    __slots__ = ("_head", "_loop", "_pool", "_tasks", "_timeout_s", "sent")

    def __init__(self, cfg: ErrorTargetConfig, loop: asyncio.AbstractEventLoop) -> None:
        assert cfg.url is not None
        self._loop = loop
        self._timeout_s = cfg.timeout_ms / 1000
        self._pool, target, host = origin_pool(loop, cfg.url, self._timeout_s)
        lines = [f"POST {target} HTTP/1.1", f"host: {host}", "content-type: application/json"]
        lines += [f"{k}: {v}" for k, v in cfg.headers.items()]
        self._head = ("\r\n".join(lines) + "\r\n").encode()
        self._tasks: set[asyncio.Task[None]] = set()
        #: reports the target accepted (2xx), for tests and logs
        self.sent = 0

    def report(self, ctx: RequestContext, tool: str, arguments: str, failure: ToolFailure) -> None:
        if len(self._tasks) >= MAX_PENDING:
            log.warning("request %s: tool error report dropped (%d in flight)", ctx.request_id, MAX_PENDING)
            return
        p = ctx.principal
        body = msgspec.json.encode(
            ErrorReport(
                ctx.request_id,
                tool,
                failure.code,
                failure.message,
                arguments,
                None if ctx.route is None else ctx.route.name,
                None if p is None else p.key_id,
                time.time(),
            )
        )
        task = self._loop.create_task(self._post(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: bytes) -> None:
        try:
            status, _ = await exchange(self._pool, self._head, body, self._timeout_s, 64 * 1024)
        except ToolFailure as exc:
            log.warning("tool error report not delivered: %s", exc.message)
            return
        if 200 <= status < 300:
            self.sent += 1
        else:
            log.warning("tool error report refused by the error target: HTTP %d", status)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._timeout_s)
        self._pool.close()
