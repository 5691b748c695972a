"""Object storage behind one interface (`ObjectStore`): batch input/output files, job results,
large attachments and the daily archives of the ledger and audit log.

Backends: `LocalDirStore` (the embedded default: a directory, same semantics) and an S3 API
client (`objstore.s3`). Keys are `/`-separated relative names; a backend never sees a key that
escapes its root (`check_key`). Calls are async: a backend that blocks runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..config_storage import StorageConfig


class ObjectStoreError(Exception):
    """The store failed (unreachable, denied, ...): callers retry or fail with a clear error."""


class ObjectNotFound(ObjectStoreError):
    """No object under that key."""


_CONTROL = frozenset(map(chr, (*range(0x20), 0x7F)))


def check_key(key: str) -> str:
    """A relative `/`-separated name without `.`/`..` parts, empty parts or control characters
    (S3 clients refuse those, and a directory name could not hold some)."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or not _CONTROL.isdisjoint(key):
        raise ValueError(f"invalid object key: {key!r}")
    return key


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    async def get(self, key: str) -> bytes:
        """Raises `ObjectNotFound`."""
        ...

    async def delete(self, key: str) -> None:
        """Deleting a missing key is not an error."""
        ...

    async def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """The keys under `prefix`, in lexicographic order."""
        ...

    async def close(self) -> None: ...


class LocalDirStore:
    """A directory: writes go to a temporary file then `os.replace` (a reader never sees half
    an object)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._put, path, data)
        except OSError as exc:
            raise ObjectStoreError(f"{self.root}: put {key!r} failed: {exc.strerror or exc}") from None

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise ObjectStoreError(f"{self.root}: get {key!r} failed: {exc.strerror or exc}") from None

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except (IsADirectoryError, NotADirectoryError):
            return  # no object under that key
        except OSError as exc:
            raise ObjectStoreError(f"{self.root}: delete {key!r} failed: {exc.strerror or exc}") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for key in await asyncio.to_thread(self._keys, prefix):
            yield key

    def _keys(self, prefix: str) -> tuple[str, ...]:
        """The keys under `prefix`, sorted; only the directory the prefix names is walked."""
        root = self.root
        base = root
        if "/" in prefix:
            try:
                base = root / check_key(prefix.rsplit("/", 1)[0])
            except ValueError:
                return ()  # a prefix no valid key has (and a walk that could leave the root)
        if not base.is_dir():
            return ()
        return tuple(
            sorted(
                key
                for p in base.rglob("*")
                if p.is_file()
                and not p.name.startswith(".tmp-")
                and (key := p.relative_to(root).as_posix()).startswith(prefix)
            )
        )

    async def close(self) -> None:
        return None


def open_store(cfg: Config | StorageConfig) -> ObjectStore:
    """The configured store (`storage:`): `objstore.factory.open_store`, re-exported here."""
    from .factory import open_store as _open

    return _open(cfg)
