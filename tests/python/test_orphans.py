"""Nothing outlives its parent: `fastpath-gateway run-local` killed with SIGKILL (no cleanup runs)
still takes its tritonserver, mock upstream and gateway (with its workers) down, and Triton's gRPC
port is free again for the next `make run` (gateway.procs: PR_SET_PDEATHSIG on each child)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import _env, free_port, run_local_cmd, wait_http

from gateway.triton_local import default_venv


def descendants(root: int) -> set[int]:
    """Every process under `root`, from /proc (children keep their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone but unreaped
    except OSError:
        return False


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_run_local_sigkilled_leaves_no_child(tmp_path: Path) -> None:
    if not (default_venv() / "bin" / "python").exists():
        pytest.skip("no Triton venv (make triton-venv)")
    port, mock, grpc, http, metrics = (free_port() for _ in range(5))
    env = {**_env(), "FASTPATH_GATEWAY_DATA_DIR": str(tmp_path / "data")}
    cmd = run_local_cmd(port, mock, (grpc, http, metrics))
    with open(tmp_path / "run-local.out", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    tree: set[int] = set()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=120, proc=proc)
        tree = descendants(proc.pid)
        assert len(tree) >= 4, tree  # tritonserver, the mock, the gateway and its worker at least
        assert not port_free(grpc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        while (left := {p for p in tree if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running after their parent was SIGKILLed: {sorted(left)}"
        assert port_free(grpc) and port_free(port) and port_free(mock)
    finally:  # a failed run must not leave them either
        tree |= descendants(proc.pid) if proc.poll() is None else set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
