"""Public model name -> its deployments and their routing rules, built once per worker.

A `Route` is what the `route` stage resolves a public model (or an alias) to; the dispatcher
(`routing.dispatch`) picks its deployments per attempt. Deployment state (in flight, latency,
breaker, health) is per worker: every worker balances, ejects and checks on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _fastpath
from ..config import Config, EmbeddingModelConfig, ModelConfig, ModelKind, model_deployments
from ..config_routing import ErrorClass, HedgeConfig, RetryConfig
from .budget import RetryBudget
from .deployment import Deployment

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..upstreams.base import Adapter
    from ..worker import Worker
    from .balance import Balancer
    from .breaker import EjectionGroup
    from .cache import ResponseCache
    from .queue import FairQueue


class Route:
    """Where one public model goes: its deployments by priority group, and how to use them."""

    __slots__ = (
        "_usable",
        "balancer",
        "budget",
        "cache",
        "capped",
        "deployments",
        "ejection",
        "embedding",
        "encoding",
        "events",
        "fallbacks",
        "groups",
        "hedge",
        "model_json",
        "name",
        "queue",
        "retry",
        "upstream_model",
    )

    def __init__(
        self, name: str, encoding: str, deployments: Sequence[Deployment], model: ModelConfig
    ) -> None:
        self.name = name
        self.encoding = encoding
        #: the Triton tensors of `/v1/embeddings` for a `kind: embedding` model; None: a chat model
        self.embedding: EmbeddingModelConfig | None = None
        if model.kind is ModelKind.EMBEDDING:
            self.embedding = model.embedding or EmbeddingModelConfig()
        self.deployments = tuple(deployments)
        #: priority groups, lowest `priority` first
        self.groups = tuple(
            tuple(d for d in self.deployments if d.priority == p)
            for p in sorted({d.priority for d in self.deployments})
        )
        #: the upstream model name (JSON) when every deployment shares one, else None
        names = {d.upstream_model_json for d in self.deployments}
        self.model_json = next(iter(names)) if len(names) == 1 else None
        self.upstream_model = self.deployments[0].upstream_model if self.model_json is not None else None
        self.capped = any(d.cap for d in self.deployments)
        #: this worker's routing events so far (retry, fallback, hedge, cache_hit|miss|shared),
        #: for `/metrics`; counted off the common path only
        self.events: dict[str, int] = {}
        self.retry: RetryConfig = model.retry
        self.budget = RetryBudget(model.retry.budget_ratio, model.retry.budget_min_per_s)
        self.hedge: HedgeConfig = model.hedge
        #: (error classes, routes to try in order), resolved by `build_routes`
        self.fallbacks: tuple[tuple[frozenset[ErrorClass], tuple[Route, ...]], ...] = ()
        self.balancer: Balancer | None = None
        self.cache: ResponseCache | None = None
        self.queue: FairQueue | None = None
        self.ejection: EjectionGroup | None = None
        #: cached usable deployments per group while nothing changed (breaker/health flips clear it)
        self._usable: tuple[tuple[Deployment, ...], ...] | None = None

    def invalidate(self) -> None:
        """A deployment's breaker or health state changed: recompute the usable sets."""
        self._usable = None

    def usable(self, now: float) -> tuple[tuple[Deployment, ...], ...]:
        """Per priority group, the deployments that may take a request now (healthy, breaker
        closed or ready for a probe). Cached until a state change, or while one is ejected
        (an ejection ends by time, not by an event)."""
        usable = self._usable
        if usable is not None:
            return usable
        usable = tuple(tuple(d for d in g if d.healthy and d.breaker.available(now)) for g in self.groups)
        if all(d.breaker.state == "closed" for d in self.deployments):
            self._usable = usable
        return usable

    def __repr__(self) -> str:
        return f"Route({self.name}, {len(self.deployments)} deployments)"


def build_routes(cfg: Config, adapters: dict[str, Adapter], worker: Worker | None = None) -> dict[str, Route]:
    """Public name (models and aliases) -> route."""
    from .balance import make_balancer
    from .breaker import Breaker, EjectionGroup

    workers = _worker_count(cfg)
    routes: dict[str, Route] = {}
    for m in cfg.models:
        group = EjectionGroup(cfg.routing.breaker)
        deps: list[Deployment] = []
        for i, d in enumerate(model_deployments(m)):
            upstream = d.upstream_model or m.upstream_model or m.name
            breaker = Breaker(cfg.routing.breaker, group)
            dep = Deployment(i, m.name, upstream, adapters[d.provider], d, breaker, m.triton, workers)
            group.add(breaker)
            deps.append(dep)
        _unique_names(deps)
        first = deps[0].upstream_model
        encoding = m.encoding or _fastpath.encoding_for_model(first)
        route = Route(m.name, encoding, deps, m)
        route.ejection = group
        for dep in deps:
            dep.owner = route
            dep.breaker.on_change = route.invalidate
        route.balancer = make_balancer(m, deps)
        if worker is not None:
            from .cache import ResponseCache  # built for every model: a request may opt in

            route.cache = ResponseCache(m.cache, m.name, worker)
            if route.capped:
                from .queue import FairQueue

                route.queue = FairQueue(m.queue, worker.loop)
        routes[m.name] = route
    for m in cfg.models:
        routes[m.name].fallbacks = tuple(
            (frozenset(fb.errors), tuple(routes[name] for name in fb.models)) for fb in m.fallbacks
        )
    for alias, target in cfg.aliases.items():
        routes[alias] = routes[target]
    return routes


def _unique_names(deps: list[Deployment]) -> None:
    seen: set[str] = set()
    for d in deps:
        if d.name in seen:
            d.name = f"{d.name}#{d.index}"
        seen.add(d.name)


def _worker_count(cfg: Config) -> int:
    import os

    return cfg.server.workers or os.cpu_count() or 1
