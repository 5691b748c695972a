"""The HTTP side of async requests: submit (`Prefer: respond-async` on an inference endpoint),
`GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` (cancel), `GET /v1/jobs/{id}/events` (SSE).

A submit runs the admission stages a synchronous request would meet before any upstream call
(`decode`, `auth`, `route`, `limits`; the lease is settled at once, nothing used), so a request
they refuse gets its normal error, not a job. What is stored is the body, the endpoint, the
submitter's principal (never its key) and the request headers minus credentials. Guards, the
upstream call and the ledger row happen when the job runs (`runner.py`).

`stream: true` with `respond-async` is refused (400): the job's result is one JSON body, and
silently answering a stream request with a non-stream body would change what the client asked
for; the status events (SSE) are the streaming view of a job.

Jobs are visible to the key that submitted them and to the other keys of its team (the admin
key sees all); anyone else gets 404, as for a job that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError
from ..pipeline import respond
from ..redis_resp import RedisError, parse_url
from .queue import FINAL
from .runner import store_principal

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .runner import JobsPart

log = logging.getLogger("gateway.jobs")

ASYNC_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})
_ADMISSION = ("decode", "auth", "route", "limits")
#: request headers not stored with a job (credentials, and what only the submit is about)
_NOT_STORED = frozenset(
    {
        "authorization",
        "x-api-key",
        "cookie",
        "prefer",
        "idempotency-key",
        "content-length",
        "host",
        "connection",
        "transfer-encoding",
        "expect",
    }
)
_encode = msgspec.json.Encoder().encode
_PING_S = 15.0


def wants_async(endpoint: Endpoint, headers: Any) -> bool:
    prefer = headers.get("prefer")
    return prefer is not None and "respond-async" in prefer.lower() and endpoint in ASYNC_ENDPOINTS


def _not_found(job_id: str) -> GatewayError:
    return GatewayError(Fault.ROUTE_NOT_FOUND, f"No job {job_id!r}.", code="job_not_found")


_UNAVAILABLE = GatewayError(
    Fault.UPSTREAM_UNAVAILABLE, "The job queue is unavailable; retry shortly.", code="job_queue_unavailable"
)


def _s(v: bytes | None) -> str:
    return v.decode() if v is not None else ""


def _secs(v: bytes | None) -> float | None:
    return int(v) / 1000 if v else None


def job_object(job_id: str, h: dict[str, bytes]) -> dict[str, Any]:
    """The job as `GET /v1/jobs/{id}` shows it: `result` is the synchronous reply's JSON."""
    state = _s(h.get("state"))
    result = h.get("result")
    error = h.get("error") or (h.get("last_error") if state == "pending" else None)
    obj: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "status": state,
        "endpoint": _s(h.get("endpoint")) or None,
        "created_at": _secs(h.get("created_at")),
        "started_at": _secs(h.get("started_at")),
        "finished_at": _secs(h.get("finished_at")),
        "expires_at": _secs(h.get("closes_at")) if state in FINAL else None,
        "deadline_at": _secs(h.get("deadline_at")),
        "attempts": int(h.get("attempts") or 0),
        "max_attempts": int(h.get("max_attempts") or 0),
        "status_url": f"/v1/jobs/{job_id}",
        "response_status": int(h["result_status"]) if h.get("result_status") else None,
        "result": msgspec.Raw(result) if result else None,
        "error": msgspec.Raw(error) if error else None,
    }
    return obj


class JobsApi:
    """Per worker generation: the routes over its `JobsPart`'s queue."""

    def __init__(self, part: JobsPart, pipeline: Pipeline, is_admin: Callable[[Any], bool]) -> None:
        self.part = part
        self.pipeline = pipeline
        self.is_admin = is_admin
        self.stream_max_s = part.cfg.server.max_stream_duration_ms / 1000

    @property
    def queue(self) -> Any:
        q = self.part.queue
        assert q is not None
        return q

    # ---- submit ---------------------------------------------------------------------------------
    async def submit(self, ctx: RequestContext, protocol: Any) -> None:
        pipeline = self.pipeline
        try:
            try:
                for stage in pipeline.request_stages:
                    if stage.name in _ADMISSION:
                        await stage.on_request(ctx)
            finally:
                if not ctx.settled:
                    ctx.settled = True
                    for finish in pipeline.finish_stages:
                        finish.on_finish(ctx)
            if ctx.stream:
                raise GatewayError(
                    Fault.INVALID_REQUEST,
                    "`stream: true` cannot be combined with `Prefer: respond-async`; poll the job or "
                    "follow its status events instead.",
                    param="stream",
                )
            p = ctx.principal
            headers = [(k, v) for k, v in ctx.headers.items() if k.lower() not in _NOT_STORED]
            idem = ctx.headers.get("idempotency-key")
            try:
                created, job_id = await self.queue.submit(
                    endpoint=ctx.endpoint.value,
                    body=ctx.body,
                    owner=p.key_id if p is not None else "",
                    team=p.team if p is not None else "",
                    principal=store_principal(p),
                    headers=_encode(headers),
                    request_id=ctx.request_id,
                    idempotency_key=idem,
                )
                status = "pending"
                if not created:
                    h = await self.queue.get(job_id)
                    status = _s(h.get("state")) if h else "closed"
            except ValueError:
                raise GatewayError(
                    Fault.INVALID_REQUEST,
                    "This Idempotency-Key was already used with a different request.",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                ) from None
            except RedisError as exc:
                log.warning("jobs: submit failed: %s", exc)
                raise _UNAVAILABLE from None
        except GatewayError as err:
            pipeline.refuse(ctx, protocol, err)
            return
        url = f"/v1/jobs/{job_id}"
        body = {"id": job_id, "object": "job", "status": status, "status_url": url}
        head = respond.head(ctx.request_id)
        head += [("location", url), ("preference-applied", "respond-async"), *ctx.ratelimit_headers]
        ctx.status = 202
        protocol.response_bytes(202, head, _encode(body))

    # ---- /v1/jobs/{id}[/events] -----------------------------------------------------------------
    async def serve(self, scope: Any, protocol: Any, request_id: str) -> None:
        rest = scope.path[len("/v1/jobs/") :]
        job_id, _, tail = rest.partition("/")
        method = scope.method
        if tail not in ("", "events") or not job_id:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "Unknown route.")
        allowed = "GET" if tail else "GET, DELETE"
        if method not in ("GET", "HEAD") and not (method == "DELETE" and not tail):
            raise GatewayError(
                Fault.METHOD_NOT_ALLOWED, f"Method not allowed; use {allowed}.", headers=(("allow", allowed),)
            )
        caller = await self._caller(scope.headers)
        try:
            h = await self._visible(job_id, caller)
            if tail == "events":
                await self._events(protocol, request_id, job_id, h)
                return
            if method == "DELETE":
                await self.queue.cancel(job_id)
                h = await self.queue.get(job_id) or h
            else:
                h = await self._settle_lazily(job_id, h)
        except RedisError as exc:
            log.warning("jobs: %s: %s", job_id, exc)
            raise _UNAVAILABLE from None
        protocol.response_bytes(200, respond.head(request_id), _encode(job_object(job_id, h)))

    async def _caller(self, headers: Any) -> tuple[str, str] | None:
        """(key id, team) of the caller; None for the admin key (sees every job)."""
        if self.is_admin(headers):
            return None
        auth = next((s for s in self.pipeline.request_stages if s.name == "auth"), None)
        if auth is None:
            return ("", "")
        p = await auth.authenticate(headers)  # type: ignore[attr-defined]
        return (p.key_id, p.team)

    async def _visible(self, job_id: str, caller: tuple[str, str] | None) -> dict[str, bytes]:
        if not job_id.startswith("job_") or len(job_id) > 64:
            raise _not_found(job_id)
        h = await self.queue.get(job_id)
        if h is None:
            raise _not_found(job_id)
        if caller is not None:
            owner, team = _s(h.get("owner")), _s(h.get("team"))
            if caller[0] != owner and (not team or caller[1] != team):
                raise _not_found(job_id)
        return dict(h)

    async def _settle_lazily(self, job_id: str, h: dict[str, bytes]) -> dict[str, bytes]:
        """A job past its deadline whose worker is gone, or past its retention: the transition
        is due, whoever notices first (the scripts check it against Redis's clock)."""
        state = _s(h.get("state"))
        now_ms = time.time() * 1000
        if state in ("pending", "processing") and now_ms >= int(h.get("deadline_at") or 0):
            await self.queue.timeout(job_id)
        elif state in FINAL and now_ms >= int(h.get("closes_at") or 0):
            await self.queue.close(job_id)
        else:
            return h
        return await self.queue.get(job_id) or h

    async def _events(self, protocol: Any, request_id: str, job_id: str, h: dict[str, bytes]) -> None:
        """Status events: the current state first, then each transition (Redis pub/sub), until
        a final state; a comment every 15 s keeps proxies from closing an idle stream."""
        sub = await Subscriber.open(self.part.cfg.jobs.redis_url or self.part.cfg.limits.redis.url)
        try:
            await sub.subscribe(self.queue.channel(job_id))
            h = await self.queue.get(job_id) or h  # after subscribing: no transition missed
            transport = protocol.response_stream(
                200, [*respond.SSE_HEADERS, *respond.EDGE, ("x-request-id", request_id)]
            )
            first = job_object(job_id, h)
            first.pop("result", None)
            await transport.send_bytes(b"data: " + _encode(first) + b"\n\n")
            state = first["status"]
            deadline = time.monotonic() + self.stream_max_s
            while state not in FINAL and state != "closed" and time.monotonic() < deadline:
                msg = await sub.next(_PING_S)
                if msg is None:
                    await transport.send_bytes(b": ping\n\n")
                    continue
                await transport.send_bytes(b"data: " + msg + b"\n\n")
                state = msgspec.json.decode(msg).get("status")
            await transport.send_bytes(b"data: [DONE]\n\n")
        finally:
            sub.close()


class Subscriber:
    """One Redis pub/sub connection (SUBSCRIBE puts a connection in a mode where it answers
    nothing else, so it is not the pipelined client's): an SSE stream holds one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hiredis

        self._r, self._w = reader, writer
        self._parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> Subscriber:
        if "+cluster" in url.split("://", 1)[0]:  # PUBLISH reaches every node: any seed will do
            scheme, _, rest = url.partition("://")
            url = scheme.replace("+cluster", "") + "://" + rest.split(",")[0]
        ep = parse_url(url)
        try:
            if ep.path:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(ep.path), 5)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(ep.host, ep.port, ssl=ep.ssl), 5
                )
        except (OSError, TimeoutError) as exc:
            raise RedisError(f"cannot connect to Redis at {ep.where}: {exc!r}") from None
        sub = cls(reader, writer)
        if ep.password is not None or ep.username:
            await sub._call(
                *(("AUTH", ep.username, ep.password or "") if ep.username else ("AUTH", ep.password or ""))
            )
        return sub

    async def _read(self, timeout_s: float) -> Any:
        while True:
            got = self._parser.gets()
            if got is not False:
                return got
            data = await asyncio.wait_for(self._r.read(65536), timeout_s)
            if not data:
                raise RedisError("Redis closed the subscription")
            self._parser.feed(data)

    async def _call(self, *args: str) -> Any:
        import hiredis

        self._w.write(hiredis.pack_command(args))  # type: ignore[arg-type]
        return await self._read(5.0)

    async def subscribe(self, channel: str) -> None:
        await self._call("SUBSCRIBE", channel)

    async def next(self, timeout_s: float) -> bytes | None:
        """The next message's payload; None after `timeout_s` without one."""
        while True:
            try:
                msg = await self._read(timeout_s)
            except TimeoutError:
                return None
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                return bytes(msg[2])

    def close(self) -> None:
        self._w.close()
