"""The client-disconnect signal of RSGI (`protocol.client_disconnect()`, never polled): it
cancels the request task, which aborts the upstream call on its way out."""

from __future__ import annotations

import asyncio
from typing import Any

#: Armed only after this long: requests that finish sooner (most unary calls) never pay for the
#: watcher task and its native future.
_GRACE_S = 0.05


class DisconnectWatch:
    __slots__ = ("_handle", "_loop", "_protocol", "_task", "_watcher", "fired")

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self._protocol = protocol
        self._loop = loop
        self._task = task
        self._watcher: asyncio.Future[None] | None = None
        self.fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_later(_GRACE_S, self._arm)

    def _arm(self) -> None:
        self._handle = None
        self._watcher = self._loop.create_task(self._wait())

    async def _wait(self) -> None:
        await self._protocol.client_disconnect()
        self.fired = True
        self._task.cancel()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
