"""A real Redis Cluster for tests and benchmarks: `redis-server --cluster-enabled yes` processes on
loopback free ports in a temp dir, joined by `redis-cli --cluster create`, ready when every node
says `cluster_state:ok` and agrees on the map. No persistence; stopped (SIGKILL) on exit.

`cluster_or_skip` skips when redis-server / redis-cli are missing (fails under CI, where .ci/run
installs them), as `conftest.redis_or_skip` does for the shared Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmd(port: int, *args: str, timeout_s: float = 10.0) -> str:
    """One redis-cli command on one node (text reply)."""
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return out.stdout.strip()


class LocalCluster:
    """`primaries` primaries with `replicas` replicas each on 127.0.0.1."""

    def __init__(self, tmp: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.tmp = tmp
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        n = self.primaries * (1 + self.replicas)
        self.ports = [_free_port() for _ in range(n)]
        for port in self.ports:
            self._spawn(port)
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            while _cmd(port, "PING") != "PONG":
                if time.monotonic() > deadline or self.procs[port].poll() is not None:
                    raise RuntimeError(f"redis-server on {port} did not start (see {self.tmp})")
                time.sleep(0.02)
        out = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}"
            )
        self.wait_ok(deadline - time.monotonic())
        return self

    def _spawn(self, port: int) -> None:
        d = self.tmp / str(port)
        d.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(d)),
                # the bus port: a free one too (the default, port + 10000, may be taken or > 65535)
                *("--cluster-enabled", "yes", "--cluster-port", str(_free_port())),
                *("--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *("--logfile", str(d / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and they agree on the primaries."""
        deadline = time.monotonic() + max(timeout_s, 1.0)
        while True:
            live = [p for p in self.ports if self.procs[p].poll() is None]
            states = [_cmd(p, "CLUSTER", "INFO") for p in live]
            maps = {self._slots_text(p) for p in live}
            if all("cluster_state:ok" in s for s in states) and len(maps) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout_s:.0f} s: {states}")
            time.sleep(0.05)

    def _slots_text(self, port: int) -> str:
        return " ".join(sorted(self._primary_ranges(port)))

    def _primary_ranges(self, port: int) -> list[str]:
        """'start-end:port' per slot range, as `port` sees the map."""
        ranges = []
        for line in _cmd(port, "CLUSTER", "NODES").splitlines():
            f = line.split()
            if len(f) > 8 and "master" in f[2] and "fail" not in f[2]:
                node_port = f[1].split("@")[0].rsplit(":", 1)[1]
                ranges += [f"{r}:{node_port}" for r in f[8:] if not r.startswith("[")]
        return ranges

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- looking and acting -------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The gateway's `limits.redis.url`: two seeds (any node will do)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def node_id(self, port: int) -> str:
        return _cmd(port, "CLUSTER", "MYID")

    def owner(self, slot: int) -> int:
        """The port of the primary serving `slot` (as the first live node sees it)."""
        port = self.owners()[slot]
        if port is None:
            raise LookupError(f"no primary serves slot {slot}")
        return port

    def owners(self) -> list[int | None]:
        """Slot -> the port of its primary (as the first live node sees it)."""
        live = next(p for p in self.ports if self.procs[p].poll() is None)
        owners: list[int | None] = [None] * 16384
        for r in self._primary_ranges(live):
            span, _, port = r.rpartition(":")
            lo, _, hi = span.partition("-")
            owners[int(lo) : int(hi or lo) + 1] = [int(port)] * (int(hi or lo) - int(lo) + 1)
        return owners

    def keys(self, port: int, pattern: str) -> set[str]:
        """The keys matching `pattern` on one node."""
        return set(_cmd(port, "--scan", "--pattern", pattern).split())

    def primary_ports(self) -> list[int]:
        return sorted({int(r.rsplit(":", 1)[1]) for r in self._primary_ranges(self.ports[0])})

    def replica_of(self, port: int) -> int:
        """A replica port of the primary on `port`."""
        me = self.node_id(port)
        for line in _cmd(port, "CLUSTER", "NODES").splitlines():
            f = line.split()
            if "slave" in f[2] and f[3] == me and "fail" not in f[2]:
                return int(f[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no replica of {port}")

    def command(self, port: int, *args: str) -> str:
        return _cmd(port, *args)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def used_cpu_s(self) -> float:
        """used_cpu_sys + used_cpu_user summed over the live nodes (benchmarks)."""
        total = 0.0
        for p in self.ports:
            if self.procs[p].poll() is None:
                for line in _cmd(p, "INFO", "cpu").splitlines():
                    if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                        total += float(line.split(":", 1)[1])
        return total


def cluster_or_skip(tmp: Path, **kw: Any) -> LocalCluster:
    """A started cluster, or skip when redis-server / redis-cli are missing (fail under CI)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        if os.environ.get("CI"):
            raise RuntimeError("redis-server and redis-cli are needed (.ci/run installs them)")
        pytest.skip("redis-server / redis-cli not installed")
    cluster = LocalCluster(tmp, **kw)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
