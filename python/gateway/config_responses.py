"""The `responses:` section: the Responses API (`POST /v1/responses`) and its conversation store
(`gateway.conversations`). On by default with an embedded SQLite file, made on first use."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .config import Config


class StoreKind(Enum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


class ResponsesStoreConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    kind: StoreKind = StoreKind.SQLITE
    #: SQLite file; empty = `$FASTPATH_GATEWAY_DATA_DIR/responses.db` (WAL; workers share it)
    path: str = ""
    #: PostgreSQL (`kind: postgres`): `postgresql://user:${PGPASSWORD}@host:5432/db`; instances
    #: on one database share their conversations
    dsn: str = ""
    #: deadline of connecting and of each statement (SQLite: the busy timeout)
    timeout_ms: int = 5_000


class ResponsesWebSocketConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`GET /v1/responses` upgraded to a WebSocket (OpenAI's WebSocket mode, `pipeline/ws.py`);
    a message is at most `server.max_body_bytes` (larger: close 1009)."""

    enabled: bool = True
    #: no message and no response running for this long: an error event, then close 1000
    idle_timeout_ms: int = 300_000
    #: a connection's whole life (OpenAI's: 60 min); past it, the next `response.create` (or the
    #: idle wait) gets `websocket_connection_limit_reached`, then close 1000
    max_connection_ms: int = 3_600_000
    #: open connections per worker process; past it an upgrade is refused with 429
    #: `websocket_connections_exceeded` (each open connection holds a task and its buffers)
    max_connections: int = 1_000


class ResponsesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: `/v1/responses` served (off: 404, as an unknown route)
    enabled: bool = True
    store: ResponsesStoreConfig = ResponsesStoreConfig()
    #: stored responses older than this are deleted (their ids then answer 404)
    retention_days: int = 30
    #: how often each worker runs the retention purge
    purge_interval_s: int = 3_600
    websocket: ResponsesWebSocketConfig = ResponsesWebSocketConfig()


def validate_responses(cfg: Config) -> None:
    from .config import ConfigError

    r = cfg.responses
    where = "$.responses"
    s = r.store
    if s.kind is StoreKind.POSTGRES:
        if not s.dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{where}.store.dsn: kind postgres needs a postgresql:// URL")
        if s.path:
            raise ConfigError(f"{where}.store.path: only for kind sqlite")
    elif s.dsn:
        raise ConfigError(f"{where}.store.dsn: only for kind postgres")
    for name, value in (
        ("store.timeout_ms", s.timeout_ms),
        ("retention_days", r.retention_days),
        ("purge_interval_s", r.purge_interval_s),
        ("websocket.idle_timeout_ms", r.websocket.idle_timeout_ms),
        ("websocket.max_connection_ms", r.websocket.max_connection_ms),
        ("websocket.max_connections", r.websocket.max_connections),
    ):
        if value <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0, got {value}")
    w = r.websocket
    if w.idle_timeout_ms > w.max_connection_ms:
        raise ConfigError(
            f"{where}.websocket.idle_timeout_ms: {w.idle_timeout_ms} is longer than "
            f"max_connection_ms ({w.max_connection_ms})"
        )
