"""`open_store`: the configured `ObjectStore` (`storage:`), one per process or per component.

The S3 client library is imported only when `backend: s3`: a gateway on the local directory
loads none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config_storage import StorageBackend, StorageConfig, storage_dir
from . import LocalDirStore, ObjectStore

if TYPE_CHECKING:
    from ..config import Config


def open_store(cfg: Config | StorageConfig) -> ObjectStore:
    """The store `cfg.storage` (or the `StorageConfig` itself) names. Opening connects nothing:
    an unreachable server shows on the first call (`ObjectStoreError`)."""
    s = cfg if isinstance(cfg, StorageConfig) else cfg.storage
    if s.backend is StorageBackend.S3:
        from .s3 import S3Store

        return S3Store(s.s3)
    return LocalDirStore(storage_dir(s))
