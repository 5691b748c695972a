"""Every environment variable the gateway reads, declared once, with one prefix."""

from __future__ import annotations

#: Path of the YAML config a worker loads (set by `fastpath-gateway serve --config`). Empty:
#: the embedded default config.
CONFIG = "FASTPATH_GATEWAY_CONFIG"
#: Overrides of `server.host`, `server.port` and `server.workers` (the CLI flags win).
HOST = "FASTPATH_GATEWAY_HOST"
PORT = "FASTPATH_GATEWAY_PORT"
WORKERS = "FASTPATH_GATEWAY_WORKERS"
#: Override of `server.engine` (granian | uvloop; the CLI's --engine wins).
ENGINE = "FASTPATH_GATEWAY_ENGINE"
#: Log level of the gateway's own logger (debug, info, warning, error).
LOG_LEVEL = "FASTPATH_GATEWAY_LOG_LEVEL"

#: Directory of the gateway's own files (the SQLite key store); default `.fastpath` in the
#: working directory.
DATA_DIR = "FASTPATH_GATEWAY_DATA_DIR"

#: The key-hash salt of the embedded default config (`auth.salt: ${FASTPATH_GATEWAY_SALT}`);
#: `run-local` keeps one in the data dir.
SALT = "FASTPATH_GATEWAY_SALT"

#: Base URL of the local mock upstream in the embedded default config (`run-local` sets it).
LOCAL_MOCK_URL = "FASTPATH_LOCAL_MOCK_URL"

#: host:port of the local tritonserver's gRPC endpoint in the embedded default config.
LOCAL_TRITON_GRPC = "FASTPATH_LOCAL_TRITON_GRPC"

#: `metrics.listen` of the embedded default config (empty: `/metrics` on the main port, behind
#: the admin key); `run-local --prometheus` sets a private listener for its Prometheus.
METRICS_LISTEN = "FASTPATH_GATEWAY_METRICS_LISTEN"

#: Set by `serve` for its workers: the directory of this instance's metrics shards (internal).
METRICS_DIR = "FASTPATH_GATEWAY_METRICS_DIR"

#: Set by `serve`'s master for its workers: its pid, saying it takes reload requests (SIGUSR1
#: from a worker's `POST /admin/reload`; gateway.reload) (internal).
RELOAD_MASTER = "FASTPATH_GATEWAY_RELOAD_MASTER"

#: `fastpath-gateway reload --url`: the admin key to send (else --admin-key-file).
ADMIN_KEY = "FASTPATH_GATEWAY_ADMIN_KEY"

ALL = (
    CONFIG,
    HOST,
    PORT,
    WORKERS,
    ENGINE,
    LOG_LEVEL,
    DATA_DIR,
    SALT,
    LOCAL_MOCK_URL,
    LOCAL_TRITON_GRPC,
    METRICS_LISTEN,
    METRICS_DIR,
    RELOAD_MASTER,
    ADMIN_KEY,
)
