"""A real S3-compatible server for the tests: moto in server mode (`python -m moto.server`, a
Flask app speaking the S3 REST API) in its own process on a free port, installed by the `dev`
extra. The session fixture `s3_server` (conftest.py) starts one; tests isolate themselves by
key prefix (`S3Server.config(prefix)`), not by bucket.

moto accepts any credentials; the fixture exports dummy ones (the client refuses to sign
without), the way a real deployment exports its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

from gateway.config_storage import AddressingStyle, S3StorageConfig, StorageBackend, StorageConfig

BUCKET = "fastpath-test"
#: dummy credentials: moto checks none, obstore needs some to sign
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}


class S3Server:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def make_bucket(self, name: str = BUCKET) -> None:
        """`PUT /<bucket>` (moto needs no signature for it)."""
        req = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def config(self, prefix: str | None = None, **s3: object) -> StorageConfig:
        """A `storage:` on this server, under a fresh prefix unless given."""
        fields: dict[str, object] = {
            "bucket": BUCKET,
            "endpoint_url": self.url,
            "region": "us-east-1",
            "addressing_style": AddressingStyle.PATH,
            "prefix": prefix if prefix is not None else f"t-{uuid.uuid4().hex[:12]}",
            "connect_timeout_ms": 1_000,
            "timeout_ms": 10_000,
            "max_retries": 1,
            "retry_timeout_ms": 5_000,
        } | s3
        return StorageConfig(backend=StorageBackend.S3, s3=S3StorageConfig(**fields))  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_s3_server(timeout_s: float = 30.0, **env: str) -> Iterator[S3Server]:
    """moto on a free port with `BUCKET` made; stopped (and waited for) on exit. `env`: moto's
    settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT="1" (requests after the first need a known key)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS, **env},
    )
    server = S3Server(port, proc)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto.server exited with {proc.returncode} before it listened")
            try:
                server.make_bucket()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto.server not ready on port {port} within {timeout_s} s") from None
                time.sleep(0.1)
        yield server
    finally:
        server.stop()
