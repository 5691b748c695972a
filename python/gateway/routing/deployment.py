"""One deployment of a public model (a provider + the model name it knows) and its live state
in this worker: requests in flight, latency statistics, circuit breaker and health."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import msgspec

from ..config import TritonModelConfig

if TYPE_CHECKING:
    from ..config_routing import DeploymentConfig
    from ..upstreams.base import Adapter
    from . import Route
    from .breaker import Breaker


class LatencyStats:
    """EWMA (for balancing) and the last `size` samples (for the hedging quantile), seconds."""

    __slots__ = ("_q", "_q_at", "_ring", "count", "ewma")

    ALPHA = 0.2

    def __init__(self, size: int = 256) -> None:
        self.ewma = 0.0
        self.count = 0
        self._ring = [0.0] * size
        self._q: dict[float, float] = {}
        self._q_at = 0

    def add(self, seconds: float) -> None:
        self._ring[self.count % len(self._ring)] = seconds
        self.count += 1
        self.ewma = seconds if self.count == 1 else self.ewma + self.ALPHA * (seconds - self.ewma)

    def quantile(self, q: float) -> float:
        """Over the kept samples; recomputed after every 16 new samples (a sort of 256 floats)."""
        n = min(self.count, len(self._ring))
        if n == 0:
            return 0.0
        if self.count - self._q_at >= 16 or q not in self._q:
            self._q.clear()
            self._q_at = self.count
        value = self._q.get(q)
        if value is None:
            ordered = sorted(self._ring[:n])
            value = self._q[q] = ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]
        return value


class Deployment:
    """Per worker, per route. `outstanding` counts this worker's calls in flight on it."""

    __slots__ = (
        "adapter",
        "breaker",
        "cap",
        "healthy",
        "index",
        "latency",
        "name",
        "outstanding",
        "owner",
        "passthrough_model",
        "priority",
        "tags",
        "triton",
        "ttft",
        "upstream_model",
        "upstream_model_json",
        "weight",
    )

    def __init__(
        self,
        index: int,
        public_name: str,
        upstream_model: str,
        adapter: Adapter,
        cfg: DeploymentConfig,
        breaker: Breaker,
        triton: TritonModelConfig | None,
        workers: int,
    ) -> None:
        self.index = index
        self.adapter = adapter
        self.upstream_model = upstream_model
        self.upstream_model_json = msgspec.json.encode(upstream_model)
        self.passthrough_model = upstream_model == public_name
        #: unique within its route: `provider/upstream_model` (+ `#index` when listed twice)
        self.name = f"{adapter.name}/{upstream_model}"
        self.weight = cfg.weight
        self.priority = cfg.priority
        self.tags = cfg.tags
        #: this worker's share of `max_concurrent` (0: unbounded)
        self.cap = 0 if cfg.max_concurrent == 0 else max(1, cfg.max_concurrent // max(1, workers))
        self.triton = triton or TritonModelConfig()
        self.breaker = breaker
        #: the active health check's verdict (True until a check says otherwise)
        self.healthy = True
        self.outstanding = 0
        #: the route it belongs to (its fair queue is woken when a slot here frees)
        self.owner: Route | None = None
        self.ttft = LatencyStats()
        self.latency = LatencyStats()

    def full(self) -> bool:
        return self.cap != 0 and self.outstanding >= self.cap

    def __repr__(self) -> str:
        return f"Deployment({self.name})"
