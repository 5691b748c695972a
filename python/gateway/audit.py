"""Audit rows for the admin routes, written off the request path.

Each gateway worker opens its own writable key-store connection the first time an admin route
is read (nothing before: a gateway whose admin routes are never used never writes the store),
and writes each row from a thread of the loop's default executor. A failed write is logged and
never fails the admin request. Key creates and revokes are audited by the store itself (same
transaction as the change; see `gateway.keystore`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from . import keystore
from .config import Config

log = logging.getLogger("gateway.audit")

#: the actor of every row written by the HTTP admin routes
ADMIN_ACTOR = "admin-api"


class AdminAudit:
    """One per worker (per `Gateway`). Thread-safe: rows may be written from several threads."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._lock = threading.Lock()
        self._store: keystore.KeyStore | None = None
        self._opened = False

    def record(
        self,
        loop: asyncio.AbstractEventLoop,
        action: str,
        target: str,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """Queue one row (its time: now) for a thread; returns at once. The returned future
        never fails (tests may await it)."""
        event = keystore.AuditEvent(action, ADMIN_ACTOR, target, source, detail or {}, time.time())
        return loop.run_in_executor(None, self.write, event)

    def write(self, event: keystore.AuditEvent) -> None:
        try:
            with self._lock:
                store = self._open()
            if store is None:
                return
            store.audit(event)
        except Exception as exc:  # a KeyStoreError's message names no secret
            log.error("audit row %s for %s not written: %s", event.action, event.target, exc)

    def _open(self) -> keystore.KeyStore | None:
        if not self._opened:
            self._opened = True
            self._store = keystore.open_store(self._cfg, readonly=False)
            if self._store is None:
                log.warning("admin reads are not audited: this config has no key store (`auth.store`)")
        return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store, self._opened = None, False
