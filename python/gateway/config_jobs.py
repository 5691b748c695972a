"""The `jobs:` section: async requests (`Prefer: respond-async`) and the Redis job queue
(`gateway.jobs`). Off by default: a gateway needs no Redis unless asked to."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

if TYPE_CHECKING:
    from .config import Config

_PREFIX = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


class JobWorkersConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The share of each gateway worker process that runs jobs."""

    #: jobs one worker process runs at once; 0 = this gateway only accepts jobs (another gateway
    #: or `fastpath-gateway worker` runs them)
    concurrency: int = 4
    #: `ctx.priority` of a job's upstream call (the fair queue and Triton serve higher first;
    #: tiers default to 0): below interactive traffic
    priority: int = -10


class JobsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = False
    #: the queue's Redis; "" = `limits.redis.url`
    redis_url: str = ""
    #: every key is `{<prefix>}:...` (one hash tag: one Redis Cluster slot, the Lua scripts
    #: touch several keys)
    prefix: str = "fastpath:jobs"
    #: deadline of each Redis call (not the blocking read, which waits up to a second)
    redis_timeout_ms: int = 2_000
    #: a claimed job whose worker stopped renewing its lease for this long is redelivered
    #: (the lease is renewed every quarter of it while the job runs)
    visibility_timeout_ms: int = 30_000
    #: deliveries of one job at most (worker losses and retriable failures: 429, 5xx); then Failed
    max_attempts: int = 3
    #: a job not finished this long after it was submitted ends as Timeout
    deadline_s: int = 3_600
    #: a finished job's result (or error) is kept this long, then the job is Closed (result
    #: deleted; the id answers `closed` for another retention period)
    retention_s: int = 86_400
    workers: JobWorkersConfig = JobWorkersConfig()


def validate_jobs(cfg: Config) -> None:
    from .config import ConfigError

    j = cfg.jobs
    where = "$.jobs"
    if j.redis_url:
        scheme = urlsplit(j.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ConfigError(f"{where}.redis_url: a redis://, rediss://, unix:// or redis+cluster:// URL")
    if not _PREFIX.fullmatch(j.prefix):
        raise ConfigError(f"{where}.prefix: 1-64 of A-Z a-z 0-9 . _ : -, got {j.prefix!r}")
    for name in ("redis_timeout_ms", "visibility_timeout_ms", "max_attempts", "deadline_s", "retention_s"):
        value = getattr(j, name)
        if value <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0, got {value}")
    if j.visibility_timeout_ms < 1_000:
        raise ConfigError(f"{where}.visibility_timeout_ms: at least 1000, got {j.visibility_timeout_ms}")
    if j.workers.concurrency < 0:
        raise ConfigError(f"{where}.workers.concurrency: must be >= 0, got {j.workers.concurrency}")


def jobs_redis_url(cfg: Config) -> str:
    return cfg.jobs.redis_url or cfg.limits.redis.url
