"""In-process harness for the `limits` stage (both backends): real stages, real Redis, a
request context built the way the pipeline builds it (decoded view, route, principal)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from gateway import config as config_mod
from gateway.context import Endpoint, RequestContext
from gateway.errors import GatewayError
from gateway.pipeline.limits import LimitsStage, month_number
from gateway.principal import Principal
from gateway.routing import Route
from gateway.schemas import ChatRequestView, Usage
from gateway.usage import counted_prompt_tokens

MODELS = ("echo", "free-model", "gpt-4o-mini")
NANO = 1_000_000_000  # nano-USD per USD
IN = 1_000_000  # nano-USD per prompt token at input_per_mtok 1000
OUT = 2_000_000  # nano-USD per completion token at output_per_mtok 2000


def parse(extra: str) -> config_mod.Config:
    models = "".join(f"  - {{name: {m}, provider: p, upstream_model: mock-echo}}\n" for m in MODELS)
    return config_mod.parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\nmodels:\n" + models + extra
    )


def principal(cfg: config_mod.Config, key_id: str, tier: str, team: str = "default") -> Principal:
    return Principal(key_id, b"", team, tier, cfg.tiers[tier], None, math.inf, False)


def request(
    who: Principal, model: str = "echo", max_tokens: int | None = 100, stream: bool = False, **extra: Any
) -> RequestContext:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    raw = json.dumps(body).encode()
    ctx = RequestContext("req", Endpoint.CHAT, raw, 0, {})
    ctx.view = msgspec.json.decode(raw, type=ChatRequestView)
    ctx.route = Route(model, "o200k_base", (), config_mod.ModelConfig(name=model, provider="mock"))
    ctx.principal = who
    ctx.stream = stream
    return ctx


def prompt_tokens(ctx: RequestContext) -> int:
    return counted_prompt_tokens(ctx)


def used(ctx: RequestContext, completion: int) -> None:
    """The upstream answered with this usage (the prompt as the gateway counted it)."""
    p = prompt_tokens(ctx)
    ctx.usage = Usage(p, completion, p + completion)
    ctx.timings["upstream_head"] = 1
    ctx.status = 200


async def refused(stage: Any, ctx: RequestContext) -> GatewayError:
    try:
        await stage.on_request(ctx)
    except GatewayError as exc:
        assert ctx.lease is None
        return exc
    raise AssertionError("admitted")


def redis_window(r: Any) -> tuple[int, int]:
    """The (day, month) numbers of the Redis server's clock."""
    sec, _ = r.time()
    return int(sec) // 86_400, month_number(int(sec))


def redis_counted(r: Any, name: str) -> tuple[int, int]:
    """A long-window hash's (day, month) counts, 0 for a window that has rolled over."""
    d, ds, m, ms = r.hmget(name, "d", "ds", "m", "ms")
    day, month = redis_window(r)
    return (int(ds) if d is not None and int(d) == day else 0), (
        int(ms) if m is not None and int(m) == month else 0
    )


def run_stages(body: Callable[[list[LimitsStage]], Awaitable[None]]) -> None:
    """Run `body(stages)` with fresh stages, then close them (no connection outlives its loop)."""

    async def main() -> None:
        stages: list[LimitsStage] = []
        try:
            await body(stages)
        finally:
            for stage in stages:
                await stage.close()

    asyncio.run(main())


async def finish(stage: LimitsStage, ctx: RequestContext) -> None:
    stage.on_finish(ctx)
    await stage.settled()
