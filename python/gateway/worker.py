"""The per-worker runtime: what one granian worker process builds once and hands to every stage,
adapter and observer (its event loop, clock, config, adapters and routes).

The loop is kept here rather than looked up: on CPython 3.11 `asyncio.get_running_loop()` and
`current_task()` without a loop make a `getpid()` syscall per call (the fork check), which was
~6 % of a worker's CPU at ~5 calls per request. Code on the request path takes `worker.loop`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config
    from .routing import Route


class Worker:
    __slots__ = ("adapters", "cfg", "loop", "routes")

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        #: provider name -> its adapter (`gateway.upstreams.base.Adapter`)
        self.adapters: dict[str, Any] = {}
        #: public model name -> route
        self.routes: dict[str, Route] = {}

    def time(self) -> float:
        """The loop's monotonic clock (seconds): deadlines are on it."""
        return self.loop.time()
