"""The job queue across a Redis crash (issue 16 acceptance): a private redis-server with the
persistence the README asks for (`appendonly yes`; `appendfsync always` here, so the test does
not depend on the clock), SIGKILLed with accepted jobs in it, some of them mid-run, and started
again on the same files. Every accepted job completes, and exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, free_port, stop
from test_jobs import _config, jobs_gateway, submit, upstream_calls, wait_job
from test_streaming import wait_for

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


class DurableRedis:
    """redis-server on `port` with its AOF in `folder`: kill it, start it again, same data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=2)
        try:
            wait_for(lambda: _ping(client), timeout_s=15)
        finally:
            client.close()

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.crash()


def test_a_redis_crash_loses_no_accepted_job(
    durable: DurableRedis, mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules["test_jobs"], "REDIS_URL", durable.url)
    prefix = f"jobs-durable-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex[:10]
    bodies = [
        {"model": "echo", "messages": [{"role": "user", "content": f"{marker}-{i}"}], "max_tokens": 5}
        for i in range(6)
    ]
    # the last two are still running when Redis dies (their upstream answers in 3 s)
    for body in bodies[4:]:
        body["mock"] = {"first_delay_ms": 3000}
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(_config(mock_upstream, prefix, workers=2))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    # an accept-only gateway: jobs wait in Redis until a worker runs them
    with jobs_gateway(tmp_path, mock_upstream, prefix, workers=0) as g:
        ids = [submit(g, b) for b in bodies[:4]]
        worker = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--config", str(cfg)], env=env
        )
        try:
            for job_id in ids:
                assert wait_job(g, job_id, ("complete", "failed"))["status"] == "complete"
            ids += [submit(g, b) for b in bodies[4:]]
            for job_id in ids[4:]:
                wait_job(g, job_id, ("processing",))
            durable.crash()  # SIGKILL: no shutdown save; the AOF is all there is
            time.sleep(0.5)
            durable.start()
            # every job, finished or not, is still there; the two that were running finish
            jobs = [wait_job(g, job_id, ("complete", "failed"), timeout_s=60) for job_id in ids]
        finally:
            assert stop(worker) == 0
    for i, job in enumerate(jobs):
        assert job["status"] == "complete", job
        # one result per job, the answer to its own request (the mock echoes the prompt)
        content = job["result"]["choices"][0]["message"]["content"]
        assert f"{marker}-{i}" in content, job
        assert upstream_calls(mock_upstream, f"{marker}-{i}") >= 1
