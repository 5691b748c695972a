"""Job execution inside a gateway worker process: claim jobs from the queue and run each through
this worker's own pipeline, so limits, guards, routing, the ledger and metrics apply unchanged.

A job runs as a request: a `RequestContext` for the stored body, with the submitter's principal
(the `auth` stage is replaced by `JobAuthStage`, which re-checks that the key still exists and
may use the model, and a `job` stage after `route` sets the jobs' low `ctx.priority`), served by
`Pipeline.serve` onto `CaptureProtocol`, an in-memory RSGI protocol that keeps the status,
headers and body. The captured body is the job's result: byte for byte what the synchronous
endpoint would have answered.

Aborting a running job (cancelled, taken over, past its deadline, the worker closing) is RSGI's
client-disconnect signal on that protocol: the pipeline aborts the upstream call, settles and
tells its observers (status 499), as for a client that went away.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..config import TierConfig
from ..config_jobs import jobs_redis_url
from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError, quote
from ..principal import Principal
from ..redis_resp import Redis, make_client
from ..worker import Worker
from .queue import Claimed, JobQueue

if TYPE_CHECKING:
    from ..config import Config
    from ..pipeline import Pipeline
    from ..pipeline.auth import AuthStage

log = logging.getLogger("gateway.jobs")

#: what a blocking read waits at most (then the loop sweeps for lost jobs and closes old ones)
_BLOCK_MS = 1_000
_CLOSE_GRACE_S = 5.0


class StoredPrincipal(msgspec.Struct, frozen=True):
    """Who submitted a job (never a secret): a key's id, or a JWT's claims as auth read them."""

    key_id: str
    team: str
    tier: str
    models: list[str] | None = None
    expires_at: float | None = None
    jwt: bool = False


_encode = msgspec.json.Encoder().encode
_principal = msgspec.json.Decoder(StoredPrincipal).decode
_headers = msgspec.json.Decoder(list[tuple[str, str]]).decode


def store_principal(p: Principal | None) -> bytes:
    if p is None:
        return b""
    expires = None if p.expires_at == float("inf") else p.expires_at
    models = sorted(p.models) if p.models is not None else None
    return _encode(StoredPrincipal(p.key_id, p.team, p.tier_name, models, expires, not p.digest))


class CaptureProtocol:
    """The RSGI calls the pipeline makes, kept in memory (a job's reply)."""

    __slots__ = ("_gone", "aborted", "body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        #: why the job was aborted ('cancelled', 'timeout', 'closing'); None: it ran to its end
        self.aborted: str | None = None
        self._gone = asyncio.Event()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, list(headers), body

    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.response_bytes(status, headers, body.encode())

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> _Sink:
        self.status, self.headers = status, list(headers)
        return _Sink(self)

    async def client_disconnect(self) -> None:
        await self._gone.wait()

    def abort(self, why: str) -> None:
        if self.aborted is None:
            self.aborted = why
            self._gone.set()


class _Sink:
    __slots__ = ("_p",)

    def __init__(self, p: CaptureProtocol) -> None:
        self._p = p

    async def send_bytes(self, data: bytes) -> None:
        self._p.body += data

    async def send_str(self, data: str) -> None:
        self._p.body += data.encode()


class JobAuthStage:
    """In place of `auth` for jobs: the submitter's principal, checked again now (a key deleted,
    disabled or expired since, or a model no longer allowed, refuses the job)."""

    name = "auth"
    __slots__ = ("_auth", "_tiers", "refusals")

    def __init__(self, auth: AuthStage | None, tiers: dict[str, TierConfig]) -> None:
        self._auth = auth
        self._tiers = tiers
        #: request id -> why its principal could not be rebuilt (set by the runner)
        self.refusals: dict[str, GatewayError] = {}

    def start(self, worker: Worker) -> None:
        return None

    async def close(self) -> None:
        return None

    def principal(self, request_id: str, raw: bytes) -> Principal | None:
        if not raw or self._auth is None:
            return None
        s = _principal(raw)
        tier = self._tiers.get(s.tier)
        if not s.jwt:
            current = self._auth.principal_by_id(s.key_id)
            if current is None:
                self.refusals[request_id] = GatewayError(
                    Fault.UNAUTHORIZED, "The API key that submitted this job no longer exists."
                )
            return current
        if tier is None:
            self.refusals[request_id] = GatewayError(
                Fault.FORBIDDEN, f"The submitter's tier {s.tier!r} is not configured."
            )
            return None
        expires = float("inf") if s.expires_at is None else s.expires_at
        models = frozenset(s.models) if s.models is not None else None
        return Principal(s.key_id, b"", s.team, s.tier, tier, models, expires, False)

    async def on_request(self, ctx: RequestContext) -> None:
        refusal = self.refusals.pop(ctx.request_id, None)
        if refusal is not None:
            raise refusal
        p = ctx.principal
        if p is None:
            if self._auth is not None:
                raise GatewayError(Fault.UNAUTHORIZED, "This job was submitted without a key.")
            return
        if p.disabled:
            raise GatewayError(Fault.UNAUTHORIZED, "This API key is disabled.")
        if p.expires_at <= time.time():
            raise GatewayError(Fault.UNAUTHORIZED, "This API key has expired.")
        view = ctx.view
        assert view is not None
        if p.models is not None and view.model not in p.models:
            raise GatewayError(
                Fault.FORBIDDEN, f"This API key may not use the model `{quote(view.model)}`.", param="model"
            )


class JobPriorityStage:
    """After `route` (which sets the tier's priority): jobs run at `jobs.workers.priority`."""

    name = "job"
    __slots__ = ("_priority",)

    def __init__(self, priority: int) -> None:
        self._priority = priority

    def start(self, worker: Worker) -> None:
        return None

    async def close(self) -> None:
        return None

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.priority = self._priority


def job_pipeline(pipeline: Pipeline, auth_stage: JobAuthStage, priority: int) -> Pipeline:
    """The worker's pipeline with `auth` replaced by `auth_stage` and the priority stage after
    `route`: the same parts otherwise (started and closed with the original)."""
    stages: list[Any] = []
    for stage in pipeline.request_stages:
        if stage.name == "auth":
            stages.append(auth_stage)
            continue
        stages.append(stage)
        if stage.name == "route":
            if auth_stage not in stages:  # auth off: the principal still comes from the job
                stages.insert(len(stages) - 1, auth_stage)
            stages.append(JobPriorityStage(priority))
    jp = copy.copy(pipeline)
    jp.request_stages = tuple(stages)
    return jp


class JobsPart:
    """The pipeline part that owns a worker's queue client and, with `workers.concurrency` > 0,
    its runner (a background task): `start(worker)` / `close()` like every part."""

    name = "jobs"

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.jobs = cfg.jobs
        self._pipeline = pipeline
        self.queue: JobQueue | None = None
        self.runner: Runner | None = None

    def start(self, worker: Worker) -> None:
        j = self.jobs
        url = jobs_redis_url(self.cfg)
        client = make_client(
            url, timeout_s=j.redis_timeout_ms / 1000, connect_timeout_s=j.redis_timeout_ms / 1000
        )
        self.queue = JobQueue(client, j)
        if j.workers.concurrency > 0:
            self.runner = Runner(self.cfg, self.queue, self._pipeline, worker)
            self.runner.start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        if self.queue is not None:
            await self.queue.client.close()


class Runner:
    """Up to `workers.concurrency` jobs at once in this worker: a loop that reads new entries
    (blocking, on a connection of its own), sweeps for entries whose worker died (XAUTOCLAIM
    after the visibility timeout) and closes jobs past their retention."""

    def __init__(self, cfg: Config, queue: JobQueue, pipeline: Pipeline, worker: Worker) -> None:
        j = cfg.jobs
        self.queue = queue
        self.loop = worker.loop
        self.concurrency = j.workers.concurrency
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        auth = next((s for s in pipeline.request_stages if s.name == "auth"), None)
        self.auth = JobAuthStage(auth, cfg.tiers)  # type: ignore[arg-type]
        self.pipeline = job_pipeline(pipeline, self.auth, j.workers.priority)
        self._blocking: Redis | Any = make_client(
            jobs_redis_url(cfg),
            timeout_s=_BLOCK_MS / 1000 + j.redis_timeout_ms / 1000,
            connect_timeout_s=j.redis_timeout_ms / 1000,
        )
        self._vt_s = j.visibility_timeout_ms / 1000
        self._sweep_s = max(0.25, min(self._vt_s / 4, 5.0))
        self._running: dict[str, tuple[asyncio.Task[None], CaptureProtocol]] = {}
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def close(self) -> None:
        """Stop claiming; give running jobs a few seconds, then abort them (unwritten: their
        leases expire and another worker runs them again)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        tasks = [t for t, _ in self._running.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_GRACE_S)
            for _, proto in list(self._running.values()):
                proto.abort("closing")
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await self._blocking.close(0.0)

    async def _run(self) -> None:
        q = self.queue
        next_sweep = 0.0
        ready = False
        while True:
            try:
                if not ready:
                    await q.ensure_group()
                    ready = True
                free = self.concurrency - len(self._running)
                if free <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                if self.loop.time() >= next_sweep:
                    next_sweep = self.loop.time() + self._sweep_s
                    for entry, job_id in await q.autoclaim(self.consumer, free):
                        await self._claim(entry, job_id)
                    await q.close_due()
                    continue
                block = max(1, min(_BLOCK_MS, int((next_sweep - self.loop.time()) * 1000)))
                for entry, job_id in await q.read(self.consumer, free, block, self._blocking):
                    await self._claim(entry, job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("jobs: queue error (retrying in 1 s): %s", exc)
                await asyncio.sleep(1.0)

    async def _claim(self, entry: str, job_id: str) -> None:
        token = os.urandom(16).hex()
        got = await self.queue.claim(entry, job_id, token, self.consumer)
        if not isinstance(got, Claimed):
            log.debug("jobs: %s not claimed: %s", job_id, got)
            return
        proto = CaptureProtocol()
        task = self.loop.create_task(self._execute(got, proto))
        self._running[job_id] = (task, proto)
        task.add_done_callback(lambda _t: self._done(job_id))

    def _done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._room.set()

    async def _execute(self, job: Claimed, proto: CaptureProtocol) -> None:
        task = asyncio.current_task(self.loop)
        assert task is not None
        request_id = f"{job.job_id}.{job.attempts}"
        try:
            endpoint = Endpoint(job.endpoint)
            headers = dict(_headers(job.headers)) if job.headers else {}
            ctx = RequestContext(request_id, endpoint, job.body, time.perf_counter_ns(), headers, "job")
            ctx.principal = self.auth.principal(request_id, job.principal)
        except Exception:
            log.exception("jobs: %s: unreadable stored request", job.job_id)
            err = GatewayError(Fault.INTERNAL, "The stored request could not be read.")
            await self.queue.fail(job.job_id, job.token, err.status, err.body(), False)
            return
        beat = self.loop.create_task(self._heartbeat(job, proto))
        timer = self.loop.call_later(max(0.0, job.deadline_ms / 1000 - time.time()), proto.abort, "timeout")
        try:
            await self.pipeline.serve(ctx, proto, task)
        finally:
            timer.cancel()
            beat.cancel()
            self.auth.refusals.pop(request_id, None)
        try:
            await self._record(job, proto)
        except Exception as exc:  # the lease then expires: another worker runs it again
            log.warning("jobs: %s: recording the outcome failed: %s", job.job_id, exc)

    async def _record(self, job: Claimed, proto: CaptureProtocol) -> None:
        q = self.queue
        why = proto.aborted
        if why == "timeout":
            await q.timeout(job.job_id, job.token)
        elif why is None:
            status = proto.status or 500
            if status < 400:
                if not await q.complete(job.job_id, job.token, status, proto.body):
                    log.info("jobs: %s: result dropped (the job was cancelled or taken over)", job.job_id)
            else:
                retriable = status in (408, 429) or status >= 500
                await q.fail(job.job_id, job.token, status, proto.body, retriable)
        # 'cancelled' / 'lost': the job is someone else's now; 'closing': its lease runs out

    async def _heartbeat(self, job: Claimed, proto: CaptureProtocol) -> None:
        every = min(self._vt_s / 4, 1.0)  # also how soon a cancel reaches a running job
        while True:
            await asyncio.sleep(every)
            try:
                state = await self.queue.heartbeat(job.job_id, job.token, self.consumer)
            except Exception as exc:
                log.warning("jobs: %s: lease renewal failed: %s", job.job_id, exc)
                continue
            if state != "ok":
                log.info("jobs: %s: no longer ours (%s): aborting", job.job_id, state)
                proto.abort("cancelled" if state == "cancelled" else "lost")
                return
