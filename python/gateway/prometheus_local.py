"""A real Prometheus (Debian's `prometheus` binary, `make prometheus-deps`) scraping a local
gateway, with the repo's alert rules loaded: `fastpath-gateway run-local --prometheus`
(`make observe`) and the scrape test. A dev tool, like `triton_local`."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .procs import die_with_parent
from .triton_local import REPO_ROOT

ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


class PrometheusNotInstalledError(RuntimeError):
    pass


class LocalPrometheus:
    """`targets`: job name -> (host:port, bearer token or None)."""

    def __init__(
        self, targets: dict[str, tuple[str, str | None]], port: int = 9090, interval_s: float = 5.0
    ) -> None:
        self.targets = targets
        self.port = port
        self.interval_s = interval_s
        self.url = f"http://127.0.0.1:{port}"
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        jobs = []
        for job, (address, token) in self.targets.items():
            scrape: dict[str, Any] = {"job_name": job, "static_configs": [{"targets": [address]}]}
            if token is not None:
                scrape["authorization"] = {"type": "Bearer", "credentials": token}
            jobs.append(scrape)
        rules = [str(ALERT_RULES)] if ALERT_RULES.exists() else []
        interval = f"{int(self.interval_s * 1000)}ms"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": rules,
            "scrape_configs": jobs,
        }

    def start(self, log: Any = subprocess.DEVNULL) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            raise PrometheusNotInstalledError("prometheus is not installed: run `make prometheus-deps`")
        self._tmp = tempfile.TemporaryDirectory(prefix="fastpath-prometheus-")
        tmp = Path(self._tmp.name)
        cfg = tmp / "prometheus.yml"
        cfg.write_text(json.dumps(self.config()))  # JSON is YAML
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready on {self.url} within {timeout_s} s")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalPrometheus:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
