"""`fastpath-gateway worker`: job execution without HTTP. One process, one event loop, the same
per-worker build as a gateway worker (adapters, routes, the started pipeline, whose `jobs` part
runs the jobs), until SIGTERM / SIGINT; then the parts close as at a gateway's shutdown (running
jobs get a few seconds, the rest are redelivered elsewhere when their leases run out)."""

from __future__ import annotations

import asyncio
import logging
import signal

from .. import upstreams
from ..config import Config
from ..pipeline import Pipeline, respond
from ..routing import build_routes
from ..worker import Worker

log = logging.getLogger("gateway.jobs")


async def run_worker(cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    respond.configure(cfg.server)
    worker = Worker(cfg, loop)
    adapters = worker.adapters = {p.name: upstreams.build(p, worker) for p in cfg.providers}
    worker.routes = build_routes(cfg, adapters, worker)
    pipeline = Pipeline(cfg, worker)
    pipeline.start(worker)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("job worker running: %d job(s) at once", cfg.jobs.workers.concurrency)
    try:
        await stop.wait()
    finally:
        await pipeline.close()
        for name, adapter in adapters.items():
            try:
                await adapter.close()
            except Exception:
                log.exception("closing upstream %s failed", name)


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
