"""`fastpath-gateway` command line: serve, check-config, run-local, bench, print-default-config, version."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import config as config_mod
from . import envvars


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {name} must be an integer, got {value!r}") from None


def _load(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        where = path or "embedded default config"
        print(f"error: invalid config ({where}):\n  {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    print(
        f"config OK: {len(cfg.providers)} provider(s), {len(cfg.models)} model(s); "
        f"listens on {cfg.server.host}:{cfg.server.port}"
    )
    for m in cfg.models:
        print(f"  model {m.name} -> {m.provider}:{m.upstream_model or m.name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    host = args.host or os.environ.get(envvars.HOST) or cfg.server.host
    port = args.port if args.port is not None else _env_int(envvars.PORT)
    port = cfg.server.port if port is None else port
    workers = args.workers if args.workers is not None else _env_int(envvars.WORKERS)
    workers = workers if workers is not None else cfg.server.workers
    workers = workers or (os.cpu_count() or 1)
    level = (args.log_level or os.environ.get(envvars.LOG_LEVEL) or "info").lower()
    # Workers re-load the validated config from the same source.
    os.environ[envvars.CONFIG] = str(Path(args.config).resolve()) if args.config else ""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Granian(
        "gateway.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes.auto,
        websockets=False,
        backlog=cfg.server.backlog,
        http1_settings=HTTP1Settings(
            header_read_timeout=cfg.server.header_read_timeout_ms,
            keep_alive=True,
            max_buffer_size=max(cfg.server.max_header_bytes * 2, 65536),
        ),
        log_level=LogLevels(level),
        workers_kill_timeout=max(1, cfg.server.shutdown_grace_ms // 1000),
        # granian refuses to start with `process_name` unless its `pname` extra (setproctitle) is
        # installed; the name is cosmetic, so set it only where it can be.
        process_name="fastpath-gateway" if importlib.util.find_spec("setproctitle") else None,
    )
    print(f"fastpath-gateway: serving on http://{host}:{port} with {workers} worker(s)", flush=True)
    server.serve()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_run_local(args: argparse.Namespace) -> int:
    """The embedded default config plus the local upstream it routes to, stopped together
    (Ctrl-C or SIGTERM reach both)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastpath-run-") as tmp:
        ready = Path(tmp) / "mock.ready"
        mock = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.dev.openai_mock",
                "--host",
                "127.0.0.1",
                "--port",
                str(args.upstream_port),
                "--ready-file",
                str(ready),
            ]
        )
        children = [mock]
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            deadline = time.monotonic() + 15
            while not ready.exists():
                if mock.poll() is not None or time.monotonic() > deadline:
                    print(
                        f"error: the local mock upstream did not start on port {args.upstream_port}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.05)
            env = dict(os.environ)
            env[envvars.LOCAL_MOCK_URL] = f"http://127.0.0.1:{args.upstream_port}/v1"
            port = ["--port", str(args.port)] if args.port else []
            serve = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *port], env=env)
            children.append(serve)
            return serve.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            for child in children:
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()


def cmd_print_default_config(_: argparse.Namespace) -> int:
    sys.stdout.write(config_mod.default_text())
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    from . import BUILD_PROFILE, __version__, fastpath_version

    print(f"fastpath-gateway {__version__} (fastpath {fastpath_version}, {BUILD_PROFILE} build)")
    return 0


BENCH_BINARY = "fastpath-bench"


def find_bench_binary() -> str | None:
    """The Rust load generator: ``<repo>/target/release/fastpath-bench`` (``make install`` builds
    it), else one on PATH."""
    built = Path(__file__).resolve().parents[2] / "target" / "release" / BENCH_BINARY
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    return shutil.which(BENCH_BINARY)


def cmd_bench(argv: list[str]) -> int:
    """Hand every argument to the native load generator (its own ``--help`` documents them)."""
    binary = find_bench_binary()
    if binary is None:
        print(
            f"error: {BENCH_BINARY} is not built; run `make install` "
            f"(or `cargo build --release -p {BENCH_BINARY}`) in the repository",
            file=sys.stderr,
        )
        return 2
    os.execv(binary, [binary, *argv])  # replaces this process: signals and exit code are the binary's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpath-gateway", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gateway (default: the embedded config)")
    s.add_argument("--config", help="YAML config file (default: the embedded default config)")
    s.add_argument("--host", help="listen address (overrides server.host)")
    s.add_argument("--port", type=int, help="listen port (overrides server.port)")
    s.add_argument("--workers", type=int, help="worker processes (default: server.workers, 0 = cores)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check-config", help="validate a config file and explain errors")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    r = sub.add_parser("run-local", help="run the default config with its local mock upstream (make run)")
    r.add_argument("--port", type=int, help="gateway port (default: the config's)")
    r.add_argument("--upstream-port", type=int, default=9100)
    r.set_defaults(func=cmd_run_local)
    # Listed for `--help`; main() hands `bench ...` to the native binary before argparse runs.
    sub.add_parser(
        "bench", add_help=False, help="load generator for OpenAI-compatible endpoints (bench --help)"
    )
    d = sub.add_parser("print-default-config", help="print the embedded default config")
    d.set_defaults(func=cmd_print_default_config)
    v = sub.add_parser("version", help="print versions and build profile")
    v.set_defaults(func=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
