"""Active health checks (issue 13 item 6): one background task per worker checks every deployment
of every route, so a dead upstream is skipped before a request has to fail on it, and a returned
one is taken back without a restart.

Each round checks every distinct (adapter, upstream model) once, however many routes and aliases
share it, all at once, each bounded by `timeout_ms`; rounds are `interval_ms` apart +- `jitter_ms`
(and the first waits a random part of the jitter) so that workers and instances do not check in
step. `unhealthy_threshold` failed checks in a row set `Deployment.healthy` False (the balancer
skips it); `healthy_threshold` passing ones set it True again and end a breaker ejection early, so
the next request probes it. What a check is belongs to the adapter (`Adapter.check`): HTTP `GET
path`, Triton server and model readiness. The verdicts, with the breakers, are `/readyz`'s answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config_routing import HealthCheckConfig
    from ..upstreams.base import Adapter
    from ..worker import Worker
    from . import Route
    from .deployment import Deployment

log = logging.getLogger("gateway.routing.health")


class Target:
    """One (adapter, upstream model) and the deployments of every route that use it."""

    __slots__ = ("adapter", "deployments", "detail", "failures", "healthy", "model", "successes")

    def __init__(self, adapter: Adapter, model: str) -> None:
        self.adapter = adapter
        self.model = model
        self.deployments: list[Deployment] = []
        self.healthy = True  # as every deployment starts
        self.successes = 0  # checks passed in a row
        self.failures = 0  # checks failed in a row
        self.detail = "not checked yet"


class HealthChecker:
    """Per worker, with a pipeline part's lifecycle: `start(worker)` starts the task, `close()`
    stops it."""

    name = "health"
    __slots__ = ("_cfg", "_rand", "_task", "_worker", "rounds", "routes", "targets")

    def __init__(self, worker: Worker, routes: dict[str, Route], cfg: HealthCheckConfig) -> None:
        self._worker = worker
        self._cfg = cfg
        self._rand = random.Random()
        self._task: asyncio.Task[None] | None = None
        #: the routes once each (aliases share their target's), by public name
        self.routes: dict[str, Route] = {}
        seen: set[int] = set()
        for route in routes.values():
            if id(route) not in seen:
                seen.add(id(route))
                self.routes[route.name] = route
        by_key: dict[tuple[int, str], Target] = {}
        for route in self.routes.values():
            for dep in route.deployments:
                key = (id(dep.adapter), dep.upstream_model)
                target = by_key.get(key)
                if target is None:
                    target = by_key[key] = Target(dep.adapter, dep.upstream_model)
                target.deployments.append(dep)
        self.targets: tuple[Target, ...] = tuple(by_key.values())
        #: rounds completed (tests and `/readyz` wait on it)
        self.rounds = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, worker: Worker | None = None) -> None:
        if self._task is None and self.targets:
            self._task = self._worker.loop.create_task(self._run(), name="health-checks")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        cfg = self._cfg
        interval = cfg.interval_ms / 1000
        jitter = cfg.jitter_ms / 1000
        await asyncio.sleep(self._rand.uniform(0, jitter))
        while True:
            try:
                await self.check_round()
            except Exception:  # a bug here must not end the checks for good
                log.exception("health check round failed")
            await asyncio.sleep(max(0.0, interval + self._rand.uniform(-jitter, jitter)))

    # ---- one round -----------------------------------------------------------------------------
    async def check_round(self) -> None:
        """Check every target once, concurrently."""
        await asyncio.gather(*(self._check(t) for t in self.targets))
        self.rounds += 1

    async def _check(self, target: Target) -> None:
        cfg = self._cfg
        timeout_s = cfg.timeout_ms / 1000
        try:
            # the adapter bounds its own wait; this bounds an adapter that does not
            async with asyncio.timeout(timeout_s * 2 + 1):
                ok, detail = await target.adapter.check(target.model, cfg.path, timeout_s)
        except Exception as exc:  # TimeoutError included: an unanswered check is a failed one
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.apply(target, ok, detail)

    def apply(self, target: Target, ok: bool, detail: str) -> None:
        """Count one check's verdict; flip the deployments' `healthy` at the thresholds."""
        cfg = self._cfg
        target.detail = detail
        if ok:
            target.failures = 0
            target.successes += 1
            if target.successes < cfg.healthy_threshold:
                return
            if target.healthy:
                # Passing checks end a breaker's ejection early (Envoy's "successful active
                # health check uneject"): a server the checks missed going down and coming back
                # is not kept out for the rest of a long ejection; one half-open probe decides.
                self._uneject(target)
                return
            target.healthy = True
            log.warning(
                "upstream %s model %s is healthy again: %s", target.adapter.name, target.model, detail
            )
        else:
            target.successes = 0
            target.failures += 1
            if not target.healthy or target.failures < cfg.unhealthy_threshold:
                return
            target.healthy = False
            log.warning("upstream %s model %s is unhealthy: %s", target.adapter.name, target.model, detail)
        now = self._worker.time()
        for dep in target.deployments:
            dep.healthy = target.healthy
            breaker = dep.breaker
            if target.healthy:
                breaker.expire(now)  # an ejection still running ends: the next pick probes it
            if breaker.on_change is not None:
                breaker.on_change()  # the route's cached usable set

    def _uneject(self, target: Target) -> None:
        now = self._worker.time()
        for dep in target.deployments:
            if dep.breaker.state == "open":
                dep.breaker.expire(now)

    # ---- /readyz -------------------------------------------------------------------------------
    def report(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every route has a deployment that may take a request (healthy, breaker
        not holding it out); per route, each deployment's verdict, last check and breaker."""
        now = self._worker.time()
        detail = {id(d): t.detail for t in self.targets for d in t.deployments}
        routes: dict[str, Any] = {}
        ready = True
        for name, route in self.routes.items():
            deployments = {}
            usable = False
            for dep in route.deployments:
                usable = usable or (dep.healthy and dep.breaker.available(now))
                deployments[dep.name] = {
                    "healthy": dep.healthy,
                    "check": detail.get(id(dep), ""),
                    "breaker": dep.breaker.snapshot(now),
                    **({"tags": dep.tags} if dep.tags else {}),
                }
            routes[name] = {"ready": usable, "deployments": deployments}
            ready = ready and usable
        return ready, {"rounds": self.rounds, "routes": routes}


def health_checker(worker: Worker) -> HealthChecker | None:
    """The worker's checker when `routing.health.enabled`, not started (a pipeline part)."""
    cfg = worker.cfg.routing.health
    if not cfg.enabled:
        return None
    return HealthChecker(worker, worker.routes, cfg)
