"""A real `tritonserver` as a managed child process (tests, `fastpath-gateway triton-local`).

The binary comes from the `nvidia-pytriton` wheel installed in its own venv (`make triton-venv`,
default `<repo>/.venv-triton`, or the environment variable FASTPATH_TRITON_VENV). Facts this
relies on: the Python backend finds its stub only next to
`libtriton_python.so`, so a backend directory of symlinks is built; the stub must load the
venv interpreter's own libpython (LD_LIBRARY_PATH) and finds the venv's site-packages through
`PATH`; a port already in use makes the server exit, so port 0 picks a free one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .procs import die_with_parent

#: The Triton venv (overrides the default `<repo>/.venv-triton`).
TRITON_VENV_ENV = "FASTPATH_TRITON_VENV"
REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_BYTES = 2000


class TritonNotInstalledError(RuntimeError):
    """The Triton venv or its `tritonserver` binary is missing."""


def default_venv() -> Path:
    override = os.environ.get(TRITON_VENV_ENV)
    return Path(override) if override else REPO_ROOT / ".venv-triton"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _venv_python_info(python: Path) -> tuple[str, str, str]:
    """(site-packages, libpython dir, "major.minor") of the venv's interpreter."""
    code = (
        "import sys, sysconfig; "
        "print(sysconfig.get_paths()['purelib']); "
        "print(sysconfig.get_config_var('LIBDIR') or ''); "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True, timeout=30)
    site, libdir, version = out.stdout.splitlines()[:3]
    return site, libdir, version


class LocalTriton:
    """One `tritonserver` process serving `model_repository` on loopback ports."""

    def __init__(
        self,
        model_repository: Path,
        *,
        venv: Path | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        models: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Ports 0: a free port each. `models`: load only these (explicit model control);
        None loads the whole repository. `extra_args`: more tritonserver flags (e.g. gRPC TLS)."""
        self.model_repository = Path(model_repository).resolve()
        self.venv = Path(venv) if venv is not None else default_venv()
        self.host = host
        self.http_port = http_port or _free_port(host)
        self.grpc_port = grpc_port or _free_port(host)
        self.metrics_port = metrics_port or _free_port(host)
        self.log_path = log_path
        self.env = dict(env or {})
        self.models = list(models) if models is not None else None
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._state: tempfile.TemporaryDirectory[str] | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _binary_and_env(self, backends: Path) -> tuple[Path, dict[str, str]]:
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise TritonNotInstalledError(
                f"no Triton venv at {self.venv} (expected {python}): run `make triton-venv` in the "
                f"repository, or point {TRITON_VENV_ENV} at a venv with nvidia-pytriton installed"
            )
        site, libdir, version = _venv_python_info(python)
        server_dir = Path(site) / "pytriton" / "tritonserver"
        binary = server_dir / "bin" / "tritonserver"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not binary.exists() or not stub.exists():
            raise TritonNotInstalledError(
                f"{self.venv} has no tritonserver (looked for {binary} and {stub}): run `make triton-venv`"
            )
        python_backend = backends / "python"
        python_backend.mkdir(parents=True)
        for target in (
            server_dir / "backends" / "python" / "libtriton_python.so",
            server_dir / "backends" / "python" / "triton_python_backend_utils.py",
            stub,
        ):
            (python_backend / target.name).symlink_to(target)
        env = dict(os.environ)
        env.update(self.env)
        libs = [p for p in (libdir, str(Path(site) / "nvidia_pytriton.libs")) if p]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        return binary, env

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("LocalTriton already started")
        self._state = tempfile.TemporaryDirectory(prefix="fastpath-triton-")
        state = Path(self._state.name)
        try:
            binary, env = self._binary_and_env(state / "backends")
        except BaseException:
            self._state.cleanup()
            self._state = None
            raise
        if self.log_path is None:
            self.log_path = state / "tritonserver.log"
        cmd = [
            str(binary),
            "--model-repository",
            str(self.model_repository),
            "--backend-directory",
            str(state / "backends"),
            "--disable-auto-complete-config",
            "--http-address",
            self.host,
            "--grpc-address",
            self.host,
            "--metrics-address",
            self.host,
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--allow-metrics",
            "true",
        ]
        if self.models is not None:
            cmd += ["--model-control-mode", "explicit"]
            for model in self.models:
                cmd += ["--load-model", model]
        cmd += self.extra_args
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # a killed parent leaves no server holding the ports
            )

    def log_tail(self, limit: int = LOG_TAIL_BYTES) -> str:
        """The server log's error lines (`E...`, `error: ...`), then its last `limit` bytes."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes().decode(errors="replace")
        errors = [line for line in text.splitlines() if line.startswith(("E", "error:"))][-20:]
        head = "errors:\n" + "\n".join(errors) + "\n...\n" if errors else ""
        return head + text[-limit:]

    def wait_ready(self, timeout_s: float = 90) -> None:
        if self._proc is None:
            raise RuntimeError("LocalTriton not started")
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"tritonserver exited with status {code} before it was ready; log tail "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:  # not ready yet: its reply holds the socket
                exc.close()
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tritonserver not ready at {url} within {timeout_s} s; log tail "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def poll(self) -> int | None:
        """The server's exit status, None while it runs (or before start)."""
        return self._proc.poll() if self._proc is not None else None

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM the server's process group (graceful), then SIGKILL; idempotent."""
        proc = self._proc
        if proc is not None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait()
            # Python-backend stubs share the group; none may outlive the server.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._state is not None:
            self._state.cleanup()
            self._state = None

    def kill(self) -> None:
        """SIGKILL the process group now (a crash, for tests); `stop()` still cleans up."""
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> LocalTriton:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
