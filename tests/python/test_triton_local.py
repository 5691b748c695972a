"""`gateway.triton_local.LocalTriton` and `fastpath-gateway triton-local`: a real tritonserver
(from the Triton venv, `make triton-venv`) as a managed child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, wait_http

from gateway.triton_local import LocalTriton, TritonNotInstalledError

MODELS = REPO / "triton_models"


def port_is_free(port: int) -> bool:
    """Nothing listens there: a new server can bind it (SO_REUSEADDR, as servers do, so the
    server side's TIME_WAIT connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_start_ready_stop(tmp_path: Path) -> None:
    server = LocalTriton(MODELS, models=["testllm_core"], log_path=tmp_path / "triton.log")
    with server:
        pid = server.pid
        assert pid is not None and server.poll() is None
        assert server.grpc_address == f"127.0.0.1:{server.grpc_port}"
        with urllib.request.urlopen(f"{server.http_url}/v2/models/testllm_core/ready", timeout=5) as r:
            assert r.status == 200
    assert pid_is_gone(pid)
    ports = (server.http_port, server.grpc_port, server.metrics_port)
    assert all(port_is_free(p) for p in ports)
    server.stop()  # idempotent
    assert "Started GRPCInferenceService" in (tmp_path / "triton.log").read_text()


def test_kill_simulates_a_crash(tmp_path: Path) -> None:
    server = LocalTriton(MODELS, models=["testllm_core"], log_path=tmp_path / "triton.log")
    with server:
        pid = server.pid
        assert pid is not None
        server.kill()
        assert server.poll() == -signal.SIGKILL
        assert pid_is_gone(pid)
    server.stop()


def test_missing_venv_names_the_make_target(tmp_path: Path) -> None:
    server = LocalTriton(MODELS, venv=tmp_path / "no-such-venv")
    with pytest.raises(TritonNotInstalledError, match=r"make triton-venv"):
        server.start()
    server.stop()


def test_broken_repository_error_carries_the_log_tail(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nnot a field {\n')
    server = LocalTriton(repo, log_path=tmp_path / "triton.log")
    with pytest.raises(RuntimeError, match=r"(?s)exited with status \d+.*broken") as info, server:
        pass
    assert "failed to load all models" in str(info.value)


def test_cli_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    (tmp_path / "empty").mkdir()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "triton-local",
            "--model-repository",
            str(tmp_path / "empty"),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics),
            "--log-file",
            str(tmp_path / "triton.log"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            wait_http(f"http://127.0.0.1:{http}/v2/health/ready", timeout_s=60, proc=proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"grpc 127.0.0.1:{grpc_port}" in line and f"http http://127.0.0.1:{http}" in line
            server_pid = int(line.split("(pid ")[1].split(")")[0])
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    assert code == 0
    assert pid_is_gone(server_pid)
    assert port_is_free(http) and port_is_free(grpc_port)
