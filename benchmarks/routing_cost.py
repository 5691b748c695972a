"""The CPU one routing decision costs, in process, for a model with 16 deployments (issue 13's
budget: <= 2 µs). Two levels per balance kind:

- `pick`: `Balancer.pick(ctx, group)` alone, the common case (every deployment usable);
- `decision`: the dispatcher's whole choice (`Dispatch._pick`: the route's usable sets, the
  balancer, the breaker's `on_pick`), driven synchronously (its common path never awaits);
- `retry`: the same after one failed attempt (the untried candidates are filtered: the O(n) paths).

Deployments carry a spread of in-flight counts and latency samples, so p2c/latency/affinity
compare real numbers and affinity computes its bound. Times are CPU (`process_time`) over many
calls, minus nothing: the loop's own cost is printed as `empty`.

    .venv/bin/python benchmarks/routing_cost.py [--calls 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from gateway.config import ModelConfig
from gateway.config_routing import AffinityConfig, BalanceKind, BreakerConfig, DeploymentConfig
from gateway.context import Endpoint, RequestContext
from gateway.routing import Route
from gateway.routing.balance import make_balancer
from gateway.routing.breaker import Breaker, EjectionGroup
from gateway.routing.deployment import Deployment
from gateway.schemas import ChatRequestView

N = 16
CASES: list[tuple[str, BalanceKind, AffinityConfig, list[int]]] = [
    ("round_robin", BalanceKind.ROUND_ROBIN, AffinityConfig(), [1] * N),
    ("round_robin weighted", BalanceKind.ROUND_ROBIN, AffinityConfig(), [1, 2, 3, 4] * 4),
    ("p2c", BalanceKind.P2C, AffinityConfig(), [1] * N),
    ("p2c weighted", BalanceKind.P2C, AffinityConfig(), [1, 2, 3, 4] * 4),
    ("latency", BalanceKind.LATENCY, AffinityConfig(), [1] * N),
    ("affinity header", BalanceKind.AFFINITY, AffinityConfig(), [1] * N),
    ("affinity user", BalanceKind.AFFINITY, AffinityConfig(key="user"), [1] * N),
    ("affinity prefix", BalanceKind.AFFINITY, AffinityConfig(key="prefix"), [1] * N),
    ("affinity not sticky", BalanceKind.AFFINITY, AffinityConfig(sticky_return=False), [1] * N),
]


class _Adapter:
    def __init__(self, name: str) -> None:
        self.name = name


def deployments(weights: list[int], model: ModelConfig) -> list[Deployment]:
    rng = random.Random(1)
    group = EjectionGroup(BreakerConfig())
    out = []
    for i, w in enumerate(weights):
        cfg = DeploymentConfig(provider=f"gpu{i}", weight=w)
        breaker = Breaker(BreakerConfig(), group)
        group.add(breaker)
        d = Deployment(i, model.name, "llama", _Adapter(f"gpu{i}"), cfg, breaker, None, 1)  # type: ignore[arg-type]
        d.outstanding = rng.randrange(0, 6)
        for _ in range(20):
            d.ttft.add(rng.uniform(0.05, 0.3))
            d.latency.add(rng.uniform(0.5, 3.0))
        out.append(d)
    return out


def contexts(n: int = 1024) -> list[RequestContext]:
    """A chat body of ~2 KB (a system prompt and a few turns) with a user and a session header."""
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    out = []
    for i in range(n):
        turns = [system, {"role": "user", "content": f"question {i} " * 10}]
        turns += [{"role": "assistant", "content": "answer " * 30}, {"role": "user", "content": "go on"}] * 2
        body = msgspec.json.encode({"model": "m", "messages": turns, "user": f"user-{i}", "stream": True})
        ctx = RequestContext("r", Endpoint.CHAT, body, 0, {"x-session-id": f"session-{i}"})
        ctx.view = msgspec.json.decode(body, type=ChatRequestView)  # as the decode stage does
        ctx.stream = True
        out.append(ctx)
    return out


def per_call_us(fn: Callable[[RequestContext], object], ctxs: list[RequestContext], calls: int) -> float:
    m = len(ctxs)
    t0 = time.process_time()
    for i in range(calls):
        fn(ctxs[i % m])
    return (time.process_time() - t0) / calls * 1e6


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that does not await anything (the dispatcher's common path)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the decision awaited")


def row(
    kind: BalanceKind, affinity: AffinityConfig, weights: list[int], dispatch: Any, calls: int
) -> list[float]:
    """µs per call: the empty loop, pick, the whole decision, the decision of a retry."""
    ctxs = contexts()
    model = ModelConfig(name="m", provider="gpu0", balance=kind, affinity=affinity)
    deps = deployments(weights, model)
    balancer = make_balancer(model, deps)
    out = [
        per_call_us(lambda c: None, ctxs, calls),
        per_call_us(lambda c: balancer.pick(c, deps), ctxs, calls),
    ]
    if dispatch is None:
        return [*out, math.nan, math.nan]
    route = Route("m", "cl100k_base", deps, model)
    route.balancer = balancer
    for c in ctxs:
        c.route = route
    tried = [deps[3]]
    out.append(per_call_us(lambda c: drive(dispatch._pick(c, route, [], 1.0)), ctxs, calls))
    out.append(per_call_us(lambda c: drive(dispatch._pick(c, route, tried, 1.0)), ctxs, calls))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        from gateway.routing.dispatch import Dispatch

        dispatch: Any = Dispatch(asyncio.new_event_loop(), 600.0)
    except Exception as e:  # the dispatcher is not there (yet): pick only
        print(f"(no whole-decision numbers: {e!r})")
        dispatch = None
    with open("/proc/loadavg") as f:
        print(f"python {platform.python_version()}, {N} deployments, {args.calls} calls per cell, CPU time")
        print(f"loadavg at start: {f.read().strip()}")
    print("| case | empty µs | pick µs | decision µs | retry decision µs |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeat):
        for name, kind, affinity, weights in CASES:
            cells = row(kind, affinity, weights, dispatch, args.calls)
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in cells) + " |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"loadavg at end: {f.read().strip()}")


if __name__ == "__main__":
    main()
