"""`fastpath-gateway worker`: job execution without HTTP. One process, one event loop, the same
per-worker build as a gateway worker (adapters, routes, the started pipeline, whose `jobs` part
runs the jobs), until SIGTERM / SIGINT; then the parts close as at a gateway's shutdown (running
jobs get a few seconds, the rest are redelivered elsewhere when their leases run out)."""

from __future__ import annotations

import asyncio
import logging
import signal

from ..app import build_parts, close_parts
from ..config import Config
from ..pipeline import respond

log = logging.getLogger("gateway.jobs")


async def run_worker(cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    respond.configure(cfg.server)
    _, adapters, pipeline = build_parts(cfg, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("job worker running: %d job(s) at once", cfg.jobs.workers.concurrency)
    try:
        await stop.wait()
    finally:
        await close_parts(pipeline, adapters)


def main(cfg: Config) -> int:
    if not cfg.jobs.enabled or cfg.jobs.workers.concurrency <= 0:
        print("error: `fastpath-gateway worker` needs jobs.enabled and jobs.workers.concurrency > 0")
        return 2
    try:
        import uvloop

        uvloop.run(run_worker(cfg))
    except ImportError:
        asyncio.run(run_worker(cfg))
    return 0
