"""Batch execution: a batch is one job in the batch lane (a `JobQueue` of its own, beside the
interactive jobs' queue), so it inherits the queue's guarantees: one worker drives it at a
time (lease + heartbeat), a worker that dies hands it to another after the visibility timeout
(which resumes: lines with an outcome are skipped), cancel reaches the driver through the
lease, and the completion window is the job's deadline.

The lane sits below interactive traffic three ways: its own stream (batch work never queues
in front of async jobs), a cap on what it takes from a worker (`batches.workers.concurrency`
batches, `lines` requests of each in flight), and `ctx.priority` (`batches.workers.priority`,
below jobs and tiers) for the routing fair queue and Triton. Each line runs through the
worker's pipeline as a job does (`jobs.runner.job_pipeline`: the submitter's principal,
limits, guards, routing, ledger).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..config_jobs import JobWorkersConfig, jobs_redis_url
from ..context import Endpoint, RequestContext
from ..jobs.queue import Claimed, JobQueue
from ..jobs.runner import CaptureProtocol, Runner
from ..objstore import ObjectNotFound, ObjectStore
from ..objstore.factory import open_store
from ..redis_resp import make_client
from . import jsonl, wire
from .store import FINAL, BatchStore

if TYPE_CHECKING:
    from ..config import Config
    from ..pipeline import Pipeline
    from ..worker import Worker

log = logging.getLogger("gateway.batches")

_encode = msgspec.json.Encoder().encode
#: a cancelled batch's lines already in flight get this long to finish
_CANCEL_GRACE_S = 5.0
_RETRY_MAX_S = 30.0
#: how often a line waiting for the worker's interactive traffic to pause looks again
_YIELD_POLL_S = 0.005


def open_objects(cfg: Config) -> ObjectStore:
    """The batch files' store: the configured one (`storage:`)."""
    return open_store(cfg)


def lane_config(cfg: Config) -> Config:
    """The config a batch-lane `Runner` / `JobQueue` sees: `jobs:` with the lane's prefix,
    deadline (the completion window) and worker share."""
    b, j = cfg.batches, cfg.jobs
    lane = msgspec.structs.replace(
        j,
        prefix=j.prefix + ":batches",
        deadline_s=b.completion_window_s,
        max_attempts=b.max_deliveries,
        workers=JobWorkersConfig(concurrency=b.workers.concurrency, priority=b.workers.priority),
    )
    return msgspec.structs.replace(cfg, jobs=lane)


class BatchesPart:
    """The pipeline part: the batch store, the lane's queue and (concurrency > 0) its runner."""

    name = "batches"

    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self._pipeline = pipeline
        self.lane = lane_config(cfg)
        self.queue: JobQueue | None = None
        self.store: BatchStore | None = None
        self.runner: BatchRunner | None = None
        #: this worker's interactive requests in flight (the app sets it; a job worker has none)
        self.interactive: Callable[[], int] = _none

    def interactive_count(self) -> int:
        return self.interactive()

    def start(self, worker: Worker) -> None:
        j = self.lane.jobs
        timeout = j.redis_timeout_ms / 1000
        client = make_client(jobs_redis_url(self.cfg), timeout_s=timeout, connect_timeout_s=timeout)
        self.queue = JobQueue(client, j)
        self.store = BatchStore(client, self.cfg.jobs.prefix, open_objects(self.cfg))
        if j.workers.concurrency > 0:
            self.runner = BatchRunner(self.lane, self.queue, self._pipeline, worker, self.store)
            self.runner.interactive = self.interactive_count
            self.runner.start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        if self.store is not None:
            await self.store.objects.close()
        if self.queue is not None:
            await self.queue.client.close()


class LineNotRecorded(Exception):
    """A line ran but its outcome could not be written: the batch is resumed later (its lease
    runs out), not finalized without it."""


class BatchRunner(Runner):
    """The jobs' runner on the lane's queue; a claimed job is a batch to drive."""

    def __init__(
        self, cfg: Config, queue: JobQueue, pipeline: Pipeline, worker: Worker, store: BatchStore
    ) -> None:
        super().__init__(cfg, queue, pipeline, worker)
        self.store = store
        self.max_lines = cfg.batches.max_lines
        self.lines = cfg.batches.workers.lines
        self.line_attempts = cfg.batches.workers.line_max_attempts
        self.yield_at = cfg.batches.workers.yield_at
        self.max_yield_s = cfg.batches.workers.max_yield_ms / 1000
        self.interactive: Callable[[], int] = _none

    async def _execute(self, job: Claimed, proto: CaptureProtocol) -> None:
        beat = self.loop.create_task(self._heartbeat(job, proto))
        timer = self.loop.call_later(max(0.0, job.deadline_ms / 1000 - time.time()), proto.abort, "timeout")
        batch_id = job.body.decode()
        try:
            done = await self._drive(batch_id, job, proto)
        except Exception:  # the lease runs out: another worker resumes it
            log.exception("batches: %s: driving failed", batch_id)
            return
        finally:
            timer.cancel()
            beat.cancel()
        if done:
            try:
                await self.queue.complete(job.job_id, job.token, 200, batch_id.encode())
            except Exception as exc:
                log.warning("batches: %s: closing its job failed: %s", batch_id, exc)

    async def _drive(self, batch_id: str, job: Claimed, proto: CaptureProtocol) -> bool:
        """True when the batch is final (its job is done); False: the lease was lost or the
        worker is closing (another delivery resumes it)."""
        store = self.store
        got = await store.view(batch_id)
        if got is None:
            return True
        h = got[0]
        status = h.get("status", b"").decode()
        if status in FINAL:
            return True
        try:
            lines = jsonl.parse(await store.file_bytes(h["input_file_id"].decode()), self.max_lines)
        except (ObjectNotFound, jsonl.LineError) as exc:
            await fail(store, batch_id, "invalid_input_file", f"The input file cannot be used: {exc}", None)
            return True
        if status == "validating":
            endpoint = h["endpoint"].decode()
            wrong = next(((n, ln) for n, ln in lines if ln.url != endpoint), None)
            if wrong is not None:
                message = f"The url {wrong[1].url!r} does not match the batch's endpoint {endpoint!r}."
                await fail(store, batch_id, "invalid_url", message, wrong[0])
                return True
            moved, status = await store.move(batch_id, "validating", "in_progress", total=len(lines))
            if moved:
                status = "in_progress"
        if status == "in_progress":
            await self._run_lines(batch_id, lines, job, proto)
        if proto.aborted in ("lost", "closing") or (self._closing and proto.aborted is None):
            return False  # another delivery resumes it
        await finalize(store, batch_id, [ln for _, ln in lines], expired=proto.aborted == "timeout")
        return True

    async def _run_lines(
        self, batch_id: str, lines: list[tuple[int, jsonl.InputLine]], job: Claimed, proto: CaptureProtocol
    ) -> None:
        done = await self.store.done_ids(batch_id)
        todo = [(n, ln) for n, ln in lines if ln.custom_id not in done]
        active: dict[asyncio.Task[None], list[CaptureProtocol]] = {}
        errors: list[BaseException] = []

        def reap() -> None:
            for t in [t for t in active if t.done()]:
                active.pop(t)
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    errors.append(exc)

        stopped = self.loop.create_task(proto.client_disconnect())
        try:
            for number, line in todo:
                while len(active) >= self.lines and not stopped.done():
                    await asyncio.wait([*active, stopped], return_when=asyncio.FIRST_COMPLETED)
                    reap()
                if self.yield_at:
                    await self._yield(stopped)
                if stopped.done() or self._closing:  # closing: lines in flight may finish
                    break
                holder: list[CaptureProtocol] = []
                active[self.loop.create_task(self._line(batch_id, number, line, job, holder))] = holder
            while active and not stopped.done():
                await asyncio.wait([*active, stopped], return_when=asyncio.FIRST_COMPLETED)
                reap()
            if proto.aborted == "cancelled" and active:  # in-flight lines may finish
                await asyncio.wait(list(active), timeout=_CANCEL_GRACE_S)
                reap()
            if errors and proto.aborted is None:  # a line without its outcome: not final yet
                raise LineNotRecorded(f"{len(errors)} lines: {errors[0]!r}")
        finally:
            stopped.cancel()
            for holder in active.values():
                for p in holder:
                    p.abort("batch")
            if active:
                await asyncio.wait(list(active), timeout=5.0)
                reap()

    async def _yield(self, stopped: asyncio.Task[None]) -> None:
        """Wait (up to `max_yield_ms`) for a moment this worker serves fewer interactive
        requests than `yield_at`: batch work fills the gaps of interactive traffic."""
        waited = 0.0
        while self.interactive() >= self.yield_at and waited < self.max_yield_s and not stopped.done():
            await asyncio.sleep(_YIELD_POLL_S)
            waited += _YIELD_POLL_S

    async def _line(
        self, batch_id: str, number: int, line: jsonl.InputLine, job: Claimed, holder: list[CaptureProtocol]
    ) -> None:
        """One request through the pipeline; 429 / 503 tried again after its retry-after."""
        task = asyncio.current_task(self.loop)
        assert task is not None
        for attempt in range(1, self.line_attempts + 1):
            p = CaptureProtocol()
            holder[:] = [p]
            request_id = f"{batch_id}.{number}.{attempt}"
            ctx = RequestContext(
                request_id, Endpoint(line.url), bytes(line.body), time.perf_counter_ns(), {}, "batch"
            )
            ctx.principal = self.auth.principal(request_id, job.principal)
            try:
                await self.pipeline.serve(ctx, p, task)
            finally:
                self.auth.refusals.pop(request_id, None)
            if p.aborted is not None:
                return  # no outcome: the batch stopped (the line runs again if it resumes)
            status = p.status or 500
            if status in (429, 503) and attempt < self.line_attempts:
                await asyncio.sleep(_retry_after(p.headers))
                continue
            out = wire.response_line(line.custom_id, status, request_id, p.body)
            await self.store.record(batch_id, line.custom_id, out, status < 400)
            return


def _none() -> int:
    return 0


def _retry_after(headers: list[tuple[str, str]]) -> float:
    for k, v in headers:
        if k.lower() == "retry-after":
            try:
                return min(max(float(v), 0.05), _RETRY_MAX_S)
            except ValueError:
                break
    return 1.0


async def fail(store: BatchStore, batch_id: str, code: str, message: str, line: int | None) -> None:
    errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}
    await store.move(
        batch_id, "validating in_progress", "failed", errors=_encode(errors), completed=0, failed=0
    )


async def finalize(store: BatchStore, batch_id: str, lines: list[jsonl.InputLine], expired: bool) -> str:
    """Write the output and error files (input order) and end the batch: completed, expired
    (unfinished lines in the error file) or, when a cancel came first, cancelled. Safe to run
    again (a resumed finalization reuses the files already written)."""
    moved, status = await store.move(batch_id, "in_progress", "finalizing")
    if moved:
        status = "finalizing"
    if status not in ("finalizing", "cancelling"):
        return status
    got = await store.view(batch_id)
    if got is None:
        return "gone"
    h = got[0]
    if not h.get("output_file_id") and not h.get("error_file_id"):
        out, err = await store.results(batch_id)
        out_lines = [out[ln.custom_id] for ln in lines if ln.custom_id in out]
        err_lines = [err[ln.custom_id] for ln in lines if ln.custom_id in err]
        if expired:
            err_lines += [
                wire.error_line(ln.custom_id, wire.EXPIRED_ERROR)
                for ln in lines
                if ln.custom_id not in out and ln.custom_id not in err
            ]
        owner, team = h.get("owner", b"").decode(), h.get("team", b"").decode()
        ids: dict[str, Any] = {"completed": len(out_lines), "failed": len(err_lines)}
        for field, rows, name in (
            ("output_file_id", out_lines, "output"),
            ("error_file_id", err_lines, "error"),
        ):
            if rows:
                f = await store.put_file(
                    b"".join(r + b"\n" for r in rows),
                    filename=f"{batch_id}_{name}.jsonl",
                    purpose="batch_output",
                    owner=owner,
                    team=team,
                    lines=len(rows),
                )
                ids[field] = f["id"].decode()
        await store.update(batch_id, **ids)
        await store.drop_results(batch_id)
    if status == "cancelling":
        await store.move(batch_id, "cancelling", "cancelled")
        return "cancelled"
    final = "expired" if expired else "completed"
    await store.move(batch_id, "finalizing", final)
    return final
