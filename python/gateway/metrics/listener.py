"""`metrics.listen`: a separate plain-HTTP listener that answers `GET /metrics` (no credential:
bind it to a private address). Every worker listens on the same port (SO_REUSEPORT); whichever
answers sums all workers' shards."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .expose import scrape

if TYPE_CHECKING:
    from ..config import Config
    from . import MetricsObserver

log = logging.getLogger("gateway.metrics")

_MAX_HEAD = 16 * 1024


def start_listener(cfg: Config, metrics: MetricsObserver, loop: asyncio.AbstractEventLoop) -> Listener:
    host, _, port = cfg.metrics.listen.rpartition(":")
    host = host.strip("[]")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if len(head) > _MAX_HEAD:
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, _, rest = lines[0].partition(" ")
                target = rest.partition(" ")[0]
                accept = None
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "accept":
                        accept = value.strip()
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                if method not in ("GET", "HEAD") or target.partition("?")[0] != "/metrics":
                    status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
                else:
                    status = "200 OK"
                    ctype, body = scrape(metrics.dir, metrics.fams, accept)
                head_out = f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                head_out += "\r\n"
                writer.write(head_out.encode() + (body if method != "HEAD" else b""))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics listener: request failed")
        finally:
            writer.close()

    return Listener(loop.create_task(asyncio.start_server(handle, host, int(port), reuse_port=True)))


class Listener:
    """The listener's server, started in a task (`__rsgi_init__` may run before the loop does)."""

    def __init__(self, task: asyncio.Task[asyncio.Server]) -> None:
        self.task = task
        task.add_done_callback(self._started)

    @staticmethod
    def _started(task: asyncio.Task[asyncio.Server]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("metrics listener failed to start: %s", task.exception())

    def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled() and self.task.exception() is None:
            self.task.result().close()
