"""The nightly archive (`storage.archive.enabled`): a pipeline part that, `delay_s` after each
midnight UTC, archives the day before (`objstore.archive`) unless its archives exist.

One per host: every worker (and every generation after a hot reload) starts one, and the one
holding an exclusive lock on `<data dir>/archiver.lock` runs; the others try the lock again
every minute (a reload's new generation takes over once the old one closed). Several hosts on
one ledger each archive the day; the `exists` check makes all but the first a no-op, and a race
writes the same bytes twice. A failure (store or database down) is logged and retried every
`retry_s` until it succeeds; a day missed entirely (the gateway was down) is archived with
`fastpath-gateway archive --day`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from ..pipeline.stage import Part
from . import ObjectStore, ObjectStoreError
from .archive import WHATS, ArchiveError, What, archive_day, archive_key, has_source
from .factory import open_store

if TYPE_CHECKING:
    from ..config import Config
    from ..worker import Worker

log = logging.getLogger("gateway.archiver")

#: how often a worker without the lock tries it again
LOCK_RETRY_S = 60.0
#: the longest single sleep (a wall clock stepped forward is noticed within it)
_MAX_SLEEP_S = 600.0


def due_day(now: float, delay_s: float) -> date:
    """The last day whose archive is due at `now`: the day before (now - delay), UTC."""
    return datetime.fromtimestamp(now - delay_s, UTC).date() - timedelta(days=1)


def _next_run(now: float, delay_s: float) -> float:
    shifted = datetime.fromtimestamp(now - delay_s, UTC)
    midnight = datetime(shifted.year, shifted.month, shifted.day, tzinfo=UTC) + timedelta(days=1)
    return midnight.timestamp() + delay_s


class Archiver(Part):
    name = "archiver"

    def __init__(
        self,
        cfg: Config,
        lock_path: Path,
        *,
        clock: Callable[[], float] = time.time,
        lock_retry_s: float = LOCK_RETRY_S,
    ) -> None:
        self._cfg = cfg
        self._lock_path = lock_path
        self._clock = clock
        self._lock_retry_s = lock_retry_s
        self._delay_s = float(cfg.storage.archive.delay_s)
        self._retry_s = float(cfg.storage.archive.retry_s)
        self._whats: list[What] = [w for w in WHATS if has_source(cfg, w)]
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        #: the last day archived (or found archived) by this part
        self.done: date | None = None
        #: runs that failed (logged)
        self.failures = 0

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def start(self, worker: Worker) -> None:
        if self._whats:
            self._task = worker.loop.create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._unlock()

    def _try_lock(self) -> bool:
        try:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.error("archiver: cannot open %s: %s", self._lock_path, exc.strerror)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the lock

    async def _run(self) -> None:
        while not self.locked:
            if self._try_lock():
                break
            await asyncio.sleep(self._lock_retry_s)
        store = open_store(self._cfg)
        try:
            while True:
                now = self._clock()
                day = due_day(now, self._delay_s)
                if day != self.done:
                    try:
                        await self._archive(store, day)
                    except (ArchiveError, ObjectStoreError) as exc:
                        self.failures += 1
                        log.error(
                            "archiver: archiving %s failed, retrying in %.0f s: %s", day, self._retry_s, exc
                        )
                        await asyncio.sleep(self._retry_s)
                        continue
                    self.done = day
                await asyncio.sleep(min(_MAX_SLEEP_S, max(0.0, _next_run(now, self._delay_s) - now)))
        finally:
            await store.close()

    async def _archive(self, store: ObjectStore, day: date) -> None:
        for what in self._whats:
            key = archive_key(what, day)
            if await store.exists(key):
                continue
            done = await archive_day(self._cfg, store, what, day)
            log.info("archiver: %s %s: %d rows, %d bytes -> %s", what, day, done.rows, done.bytes, key)
