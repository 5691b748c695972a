"""Stage `upstream`: one call to the routed adapter, under the request's deadlines."""

from __future__ import annotations

import time

from ..context import RequestContext
from ..upstreams.httpclient import Connection, UpstreamProtocolError, UpstreamTimeout
from ..upstreams.openai_http import OpenAIHttpAdapter, map_transport_error


async def open_upstream(ctx: RequestContext, deadline: float) -> Connection:
    route = ctx.route
    assert route is not None
    adapter = route.adapter
    assert isinstance(adapter, OpenAIHttpAdapter)
    t0 = time.perf_counter_ns()
    conn = await adapter.open(
        ctx.endpoint.value.removeprefix("/v1"), ctx.upstream_body, ctx.request_id, deadline
    )
    ctx.timings["upstream_head"] = time.perf_counter_ns() - t0
    return conn


async def fetch_body(ctx: RequestContext, conn: Connection, deadline: float) -> bytes:
    route = ctx.route
    assert route is not None
    try:
        body = await conn.read_all(route.adapter.max_response_bytes, deadline)
    except (UpstreamTimeout, UpstreamProtocolError) as exc:
        conn.abort()
        raise map_transport_error(exc) from None
    conn.release()
    return body
