"""The `storage:` section: where objects live (`gateway.objstore`): batch files, job results,
large attachments and the daily archives of the ledger and audit log.

The default is a local directory (nothing to set up). `backend: s3` names a bucket on AWS S3 or
any S3-compatible server (MinIO, Ceph, R2, moto, ...). Credentials are never part of the config:
they come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`) or the platform's chain (web identity token, container or instance
metadata), so a config file or its dump never holds a secret.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

if TYPE_CHECKING:
    from .config import Config

# S3's bucket naming rules (3-63 of a-z 0-9 . -, starting and ending with a letter or digit)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9\-]{1,64}")
_PREFIX_PART = re.compile(r"[A-Za-z0-9._\-=]+")


class StorageBackend(StrEnum):
    LOCAL = "local"
    S3 = "s3"


class AddressingStyle(StrEnum):
    #: virtual-hosted on AWS (the default endpoint), path style on a custom `endpoint_url`
    AUTO = "auto"
    #: `https://endpoint/bucket/key` (MinIO, moto, most self-hosted servers)
    PATH = "path"
    #: `https://bucket.endpoint/key`
    VIRTUAL = "virtual"


class S3StorageConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An S3 bucket. No credential fields on purpose: see the module doc."""

    bucket: str = ""
    #: every key is stored under `<prefix>/` in the bucket (one bucket, several gateways)
    prefix: str = ""
    #: an S3-compatible server, `http(s)://host[:port]`; empty: AWS for `region`
    endpoint_url: str = ""
    #: empty: `AWS_REGION` / `AWS_DEFAULT_REGION` from the environment, else us-east-1
    region: str = ""
    addressing_style: AddressingStyle = AddressingStyle.AUTO
    #: deadline of opening a connection to the server
    connect_timeout_ms: int = 2_000
    #: deadline of one request (a large object's whole transfer included)
    timeout_ms: int = 60_000
    #: retries of a failed request (5xx, connection errors, timeouts), with exponential backoff;
    #: the whole call gives up after `retry_timeout_ms`
    max_retries: int = 3
    retry_timeout_ms: int = 30_000


class ArchiveScheduleConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The nightly archive (`objstore.archiver`): after midnight UTC, one worker per host
    archives the day before (the ledger and the audit log, whichever the config has), unless
    its archives exist already. `fastpath-gateway archive --day` does the same by hand."""

    enabled: bool = False
    #: how long after midnight UTC (rows of the day still queued in workers arrive meanwhile)
    delay_s: int = 600
    #: a failed run (the store or the database down) is tried again this often
    retry_s: int = 300


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    backend: StorageBackend = StorageBackend.LOCAL
    #: backend local: the directory; empty = `$FASTPATH_GATEWAY_DATA_DIR/objects`
    dir: str = ""
    s3: S3StorageConfig = S3StorageConfig()
    archive: ArchiveScheduleConfig = ArchiveScheduleConfig()


def storage_dir(s: StorageConfig) -> Path:
    from .keystore import data_dir

    return Path(s.dir) if s.dir else data_dir() / "objects"


#: appended to msgspec's "unknown field" error under `$.storage.s3` (an access key put in the file)
CREDENTIALS_HINT = (
    " (S3 credentials are never read from the config: export AWS_ACCESS_KEY_ID,"
    " AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or use the platform's role)"
)


def validate_storage(cfg: Config) -> None:
    from .config import ConfigError

    s = cfg.storage
    where = "$.storage"
    if not 0 <= s.archive.delay_s < 86_400:
        raise ConfigError(
            f"{where}.archive.delay_s: 0 to 86399 (seconds after midnight UTC), got {s.archive.delay_s}"
        )
    if s.archive.retry_s <= 0:
        raise ConfigError(f"{where}.archive.retry_s: must be > 0, got {s.archive.retry_s}")
    if s.backend is StorageBackend.LOCAL:
        if s.s3 != S3StorageConfig():
            raise ConfigError(f"{where}.s3: only for backend s3 (backend is local)")
        return
    if s.dir:
        raise ConfigError(f"{where}.dir: only for backend local (backend is s3)")
    s3 = s.s3
    w = f"{where}.s3"
    if not s3.bucket:
        raise ConfigError(f"{w}.bucket: required with backend s3")
    if not _BUCKET.fullmatch(s3.bucket) or ".." in s3.bucket:
        raise ConfigError(f"{w}.bucket: 3-63 of a-z 0-9 . - (S3's bucket naming rules), got {s3.bucket!r}")
    parts = s3.prefix.strip("/").split("/")
    if s3.prefix and not all(_PREFIX_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ConfigError(f"{w}.prefix: /-separated names of A-Z a-z 0-9 . _ - =, got {s3.prefix!r}")
    if s3.endpoint_url:
        # never echo the URL: it should hold no credentials, but if it does they stay unprinted
        url = urlsplit(s3.endpoint_url)
        if url.username is not None or url.password is not None:
            raise ConfigError(
                f"{w}.endpoint_url: must not hold credentials (they come from the environment:"
                " AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"{w}.endpoint_url: an http(s)://host[:port] URL")
        if url.path not in ("", "/") or url.query or url.fragment:
            raise ConfigError(f"{w}.endpoint_url: scheme, host and port only (the bucket is `bucket`)")
    if s3.region and not _REGION.fullmatch(s3.region):
        raise ConfigError(f"{w}.region: an AWS region name like eu-west-1, got {s3.region!r}")
    for name in ("connect_timeout_ms", "timeout_ms", "retry_timeout_ms"):
        value = getattr(s3, name)
        if value <= 0:
            raise ConfigError(f"{w}.{name}: must be > 0, got {value}")
    if s3.max_retries < 0 or s3.max_retries > 10:
        raise ConfigError(f"{w}.max_retries: 0 to 10, got {s3.max_retries}")
