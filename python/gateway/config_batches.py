"""The `batches:` section: the OpenAI Batch API (`/v1/files`, `/v1/batches`, `gateway.batches`).
It runs on the job queue (`jobs:`), in a lane of its own below interactive traffic and jobs;
file bytes live in the object store (`storage:`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .config import Config


class BatchWorkersConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The share of each gateway worker process that runs batches (the lowest lane)."""

    #: batches one worker process drives at once; 0 = this gateway only accepts batches
    concurrency: int = 1
    #: requests (lines) of one batch in flight at once: the cap on what batch work can take
    #: from interactive traffic in this worker
    lines: int = 4
    #: `ctx.priority` of a batch line's upstream call: below jobs (-10) and interactive tiers (0)
    priority: int = -20
    #: a line starts only while this worker has fewer interactive requests in flight than
    #: this (1: only when it serves none); 0: never wait
    yield_at: int = 1
    #: ... but a line waits at most this long for that moment (a busy worker still moves
    #: its batches, at `lines` requests per this period at the least)
    max_yield_ms: int = 1_000
    #: a line answered 429 or 503 (the gateway's own limits, a busy upstream) is tried again,
    #: after its retry-after (at most 30 s), up to this many times in all
    line_max_attempts: int = 3


class BatchesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = False
    #: the largest file `POST /v1/files` accepts (the upload has its own body limit)
    max_file_bytes: int = 100 * 1024 * 1024
    #: requests in one input file at most
    max_lines: int = 50_000
    #: what `completion_window: "24h"` means here: a batch still running this long after its
    #: creation ends as `expired` (its unfinished lines in the error file)
    completion_window_s: int = 86_400
    #: a batch is handed to a worker at most this many times (each worker stop, reload or loss
    #: mid-batch is one more; it resumes where it was), then it ends `failed`
    max_deliveries: int = 100
    workers: BatchWorkersConfig = BatchWorkersConfig()


def validate_batches(cfg: Config) -> None:
    from .config import ConfigError

    b = cfg.batches
    where = "$.batches"
    if b.enabled and not cfg.jobs.enabled:
        raise ConfigError(f"{where}.enabled: batches run on the job queue; set jobs.enabled: true too")
    for name in ("max_file_bytes", "max_lines", "completion_window_s", "max_deliveries"):
        value = getattr(b, name)
        if value <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0, got {value}")
    w = b.workers
    if w.concurrency < 0:
        raise ConfigError(f"{where}.workers.concurrency: must be >= 0, got {w.concurrency}")
    if w.lines < 1:
        raise ConfigError(f"{where}.workers.lines: must be >= 1, got {w.lines}")
    if w.yield_at < 0:
        raise ConfigError(f"{where}.workers.yield_at: must be >= 0, got {w.yield_at}")
    if w.max_yield_ms < 0:
        raise ConfigError(f"{where}.workers.max_yield_ms: must be >= 0, got {w.max_yield_ms}")
    if w.line_max_attempts < 1:
        raise ConfigError(f"{where}.workers.line_max_attempts: must be >= 1, got {w.line_max_attempts}")
