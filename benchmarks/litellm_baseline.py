"""LiteLLM proxy as a benchmark baseline: the Python gateway most users would pick instead.

Runs the pinned `litellm[proxy]` from `.venv-litellm` (`make bench-litellm`; the pin is in the
Makefile) in front of the same upstream the gateway uses: one model `bench` -> `openai/mock-echo`
with `api_base` at the upstream. Settings follow LiteLLM's production page as far as they apply
without a database: 2 uvicorn workers (`--num_workers`), no DB, `set_verbose: false`,
`json_logs: true`, `LITELLM_LOG=ERROR`, `LITELLM_MODE=PRODUCTION` (no .env loading), spend/error
logs off, a master key (production refuses to start without one; no DB, so checking it is a
string comparison; clients send it as a Bearer token). No network at run
time: `LITELLM_LOCAL_MODEL_COST_MAP=True` (the bundled cost map, no fetch) and telemetry off.

    .venv/bin/python benchmarks/litellm_baseline.py --upstream http://127.0.0.1:8000/v1 --port 4000

(serves until Ctrl-C; `benchmarks/suite.py` imports `start()` instead).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-litellm"
WORKERS = 2
# Production refuses to start without one (a request then carries `Authorization: Bearer <it>`;
# without a DB the check is a comparison with this key, no key store).
MASTER_KEY = "sk-litellm-bench-5f0c9a7e2b4d4e6f8a1c3b5d7e9f0a2c"


def available() -> str | None:
    """The installed LiteLLM version, or None when `.venv-litellm` has none."""
    py = VENV / "bin/python"
    if not py.exists():
        return None
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or None if out.returncode == 0 else None


def config(upstreams: dict[str, str]) -> str:
    """`upstreams`: public model name -> OpenAI-compatible base URL (each an `openai/mock-echo`)."""
    return (
        "model_list:\n"
        + "".join(
            f"  - model_name: {name}\n"
            "    litellm_params:\n"
            "      model: openai/mock-echo\n"
            f"      api_base: {base}\n"
            "      api_key: sk-bench-upstream\n"
            for name, base in upstreams.items()
        )
        + "litellm_settings:\n"
        "  set_verbose: false\n"
        "  json_logs: true\n"
        "  request_timeout: 600\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "  disable_spend_logs: true\n"
        "  disable_error_logs: true\n"
    )


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_MODE="PRODUCTION",
        LITELLM_TELEMETRY="False",
        TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    e.pop("DATABASE_URL", None)
    return e


def start(upstreams: dict[str, str], port: int, tmp: Path, workers: int = WORKERS) -> subprocess.Popen[bytes]:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(config(upstreams))
    log = (tmp / "litellm.log").open("wb")
    return subprocess.Popen(
        [
            str(VENV / "bin/litellm"),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(),
        cwd=tmp,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    body = b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited early ({proc.returncode})")
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json", "authorization": f"Bearer {MASTER_KEY}"},
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("litellm not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--upstream", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    ap.add_argument("--port", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=WORKERS)
    args = ap.parse_args()
    if not available():
        sys.exit("no LiteLLM in .venv-litellm: run `make bench-litellm`")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"litellm-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    proc = start({"bench": args.upstream}, args.port, tmp, args.workers)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
