"""Plumbing the benchmark scripts share: the load line, free ports, child processes that answer
HTTP, and a private redis-server. One copy, so every script measures and reports the same way.
Imported as `from _common import ...` (a script's own folder is first on `sys.path`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loadavg() -> str:
    """The 1, 5 and 15 minute load, to print next to every number (the machine is shared)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(*paths: Path) -> dict[str, str]:
    """This environment, unbuffered, with `paths` (default: the package) as PYTHONPATH."""
    return dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(map(str, paths or (REPO / "python",)))
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until `url` answers; raises if `proc` exits first or it takes over `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} not up (exit {proc.poll()})") from None
            time.sleep(0.1)


@contextlib.contextmanager
def process(
    cmd: list[str], health: str, environ: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` running (quiet) once `health` answers; SIGTERM, then SIGKILL after 10 s, on exit."""
    proc = subprocess.Popen(cmd, env=environ or env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(health, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def start_redis(port: int, tmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server without persistence on `port` (files in `tmp`), once it answers PING."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp)),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while redis_cli(port, "PING") != "PONG":
        if time.monotonic() > end:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc
