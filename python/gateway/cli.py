"""`fastpath-gateway` command line: serve, reload, check-config, run-local, triton-local, keys, audit, usage,
archive, load-spills, bench, print-default-config, version."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import envvars, keystore


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: environment variable {name} must be an integer, got {value!r}") from None


def _load(path: str | None) -> config_mod.Config:
    if path is None and not os.environ.get(envvars.SALT):
        # the salt `make run` keeps in the data dir: `serve` / `keys` on the default config use it too
        kept = keystore.data_dir() / "salt"
        if kept.is_file():
            os.environ[envvars.SALT] = kept.read_text(encoding="utf-8").strip()
    try:
        cfg = config_mod.load(path)
        if cfg.extensions:
            from .pipeline.extensions import check_extensions

            check_extensions(cfg)
        return cfg
    except config_mod.ConfigError as exc:
        where = path or "embedded default config"
        print(f"error: invalid config ({where}):\n  {exc}", file=sys.stderr)
        if path is None and envvars.SALT in str(exc):
            print(
                f"  the default config has auth on: `make run` keeps a local salt and API key in the data"
                f" dir and prints the key; to serve it yourself, export {envvars.SALT} (16+ random chars)"
                " and create keys with `fastpath-gateway keys create`",
                file=sys.stderr,
            )
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    print(
        f"config OK: {len(cfg.providers)} provider(s), {len(cfg.models)} model(s); "
        f"listens on {cfg.server.host}:{cfg.server.port}"
    )
    for m in cfg.models:
        deps = ", ".join(
            f"{d.provider}:{d.upstream_model or m.upstream_model or m.name}"
            for d in config_mod.model_deployments(m)
        )
        print(f"  model {m.name} -> {deps}" + (f" ({m.balance.value})" if len(m.deployments) > 1 else ""))
    for alias, target in cfg.aliases.items():
        print(f"  alias {alias} -> {target}")
    for g in cfg.guards:
        where = f" ({g.provider}:{g.model})" if g.provider else ""
        scope = ", ".join(g.models) or "all models"
        print(f"  guard {g.name}: {g.kind.value}{where}, {g.on_error.value}, {g.timeout_ms} ms; {scope}")
    for e in cfg.extensions:
        print(f"  extension {e.kind.value}: {e.factory}")
    return 0


def _warn_spills(cfg: config_mod.Config) -> None:
    if not cfg.ledger.enabled:
        return
    from . import ledger

    if spills := ledger.spill_files():
        logging.getLogger("gateway.ledger").warning(
            "%d usage spill file(s) in %s hold rows not yet in the ledger: "
            "run `fastpath-gateway load-spills`",
            len(spills),
            keystore.data_dir(),
        )


def _master_setup(args: argparse.Namespace, cfg: config_mod.Config) -> tuple[str, int, int, str]:
    """What either engine's master does first: host, port, workers (0: one per core) and log
    level from the flag, else the environment, else the config; logging; this instance's empty
    metrics directory (stale ones removed). Workers re-load the validated config from the same
    source (hot reload, gateway.reload, re-reads it too)."""
    host = args.host or os.environ.get(envvars.HOST) or cfg.server.host
    port = args.port if args.port is not None else _env_int(envvars.PORT)
    port = cfg.server.port if port is None else port
    workers = args.workers if args.workers is not None else _env_int(envvars.WORKERS)
    workers = workers if workers is not None else cfg.server.workers
    workers = workers or (os.cpu_count() or 1)
    level = (args.log_level or os.environ.get(envvars.LOG_LEVEL) or "info").lower()
    os.environ[envvars.CONFIG] = str(Path(args.config).resolve()) if args.config else ""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.metrics.enabled:
        from .metrics import prepare_dir

        prepare_dir(cfg)
    _warn_spills(cfg)
    return host, port, workers, level


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    engine = args.engine or os.environ.get(envvars.ENGINE) or cfg.server.engine.value
    if engine not in {e.value for e in config_mod.ServerEngine}:
        raise SystemExit(f"error: unknown server engine {engine!r} (granian, uvloop)")
    if engine == config_mod.ServerEngine.UVLOOP:
        if cfg.server.tls is not None or cfg.server.http is not config_mod.HttpMode.AUTO:
            raise SystemExit("error: server.tls and server.http are served by engine granian, not uvloop")
        return _serve_uvloop(args, cfg)
    if cfg.server.proxy_protocol:
        raise SystemExit("error: server.proxy_protocol is read by engine uvloop, not granian")
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings, HTTP2Settings
    from granian.log import LogLevels

    # Imported here, before granian forks: workers start with it loaded, which keeps short the
    # time in which a new worker still has the master's signal handlers (see app.create_app).
    from . import app  # noqa: F401
    from . import reload as reload_mod

    host, port, workers, level = _master_setup(args, cfg)
    tls = cfg.server.tls
    # the master's pid, for `fastpath-gateway reload` (SIGHUP: a hot reload, gateway.reload)
    pid_file = Path(args.pid_file) if args.pid_file else reload_mod.default_pid_file(port)
    server = reload_mod.granian_server(
        cfg,
        pid_file,
        target="gateway.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        workers=workers,
        loop=Loops.uvloop,
        http=HTTPModes(cfg.server.http.value),
        websockets=cfg.responses.enabled and cfg.responses.websocket.enabled,  # pipeline/ws.py
        backlog=cfg.server.backlog,
        http1_settings=HTTP1Settings(
            header_read_timeout=cfg.server.header_read_timeout_ms,
            keep_alive=True,
            max_buffer_size=max(cfg.server.max_header_bytes * 2, 65536),
        ),
        http2_settings=HTTP2Settings(max_headers_size=max(cfg.server.max_header_bytes * 2, 65536)),
        # TLS (ALPN offers h2 and http/1.1 with `http: auto`); granian reads the files per worker
        ssl_cert=Path(tls.cert_file) if tls else None,
        ssl_key=Path(tls.key_file) if tls else None,
        ssl_key_password=tls.key_password if tls else None,
        log_level=LogLevels(level),
        workers_kill_timeout=max(1, cfg.server.shutdown_grace_ms // 1000),
        # granian refuses to start with `process_name` unless its `pname` extra (setproctitle) is
        # installed; the name is cosmetic, so set it only where it can be.
        process_name="fastpath-gateway" if importlib.util.find_spec("setproctitle") else None,
    )
    scheme = "https" if tls else "http"
    print(f"fastpath-gateway: serving on {scheme}://{host}:{port} with {workers} worker(s)", flush=True)
    server.serve()
    return 0


def _serve_uvloop(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """`server.engine: uvloop` (gateway.server): a master forking workers on one socket."""
    from . import app  # noqa: F401  (loaded once, before the fork: every worker starts with it)
    from .server import workers as engine

    host, port, workers = _master_setup(args, cfg)[:3]
    from . import reload as reload_mod

    pid_file = Path(args.pid_file) if args.pid_file else reload_mod.default_pid_file(port)
    cleanup = reload_mod.install_master_signals(cfg, pid_file)
    print(f"fastpath-gateway: serving on http://{host}:{port} with {workers} worker(s) (uvloop)", flush=True)
    try:
        return engine.serve(cfg, host, port, workers)
    finally:
        cleanup()


def cmd_worker(args: argparse.Namespace) -> int:
    """Job execution only (no HTTP): see gateway.jobs.standalone."""
    cfg = _load(args.config)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .jobs.standalone import main

    return main(cfg)


def cmd_reload(args: argparse.Namespace) -> int:
    """Hot reload (gateway.reload): the gateway re-reads the config file it was started with."""
    from . import reload as reload_mod

    if args.url:
        if args.admin_key_file:
            key = Path(args.admin_key_file).read_text(encoding="utf-8").strip()
        else:
            key = os.environ.get(envvars.ADMIN_KEY, "")
        if not key:
            raise _usage_error(f"--url needs the admin key: --admin-key-file or ${envvars.ADMIN_KEY}")
        return reload_mod.http_reload(args.url, key, args.timeout, args.ca_file)
    pid_file = reload_mod.find_pid_file(args.pid_file, args.port)
    return reload_mod.signal_reload(pid_file, args.timeout)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _local_credentials() -> str:
    """`run-local` is secure by default too: a salt and a local API key kept in the data dir
    (mode 0600), created on first use and reused after. Returns the key's secret."""
    data = keystore.data_dir()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)

    def private(name: str, make: Callable[[], str]) -> str:
        path = data / name
        if path.exists():
            return path.read_text(encoding="utf-8").strip()
        value = make()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
        return value

    if not os.environ.get(envvars.SALT):
        os.environ[envvars.SALT] = private("salt", lambda: secrets.token_hex(24))
    cfg = _load(None)
    store = keystore.open_store(cfg, readonly=False)
    assert store is not None  # the default config has a salt, so a SQLite store
    try:
        key_file = data / "local-key"
        if key_file.exists():
            secret = key_file.read_text(encoding="utf-8").strip()
            digest = config_mod.hash_key(cfg.auth.salt, secret)
            if any(k.key_hash == digest and k.status() == "active" for k in store.list_keys()):
                return secret
            key_file.unlink()  # revoked, or made with another salt: make a new one
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = f"local-{secrets.token_hex(4)}"
        store.create(
            keystore.StoredKey(
                id=key_id,
                key_hash=config_mod.hash_key(cfg.auth.salt, secret),
                team="local",
                tier="default",
                created_at=time.time(),
            )
        )
        return private("local-key", lambda: secret)
    finally:
        store.close()


def cmd_run_local(args: argparse.Namespace) -> int:
    """The embedded default config plus the local upstreams it routes to (a real tritonserver on
    triton_models/ and the OpenAI-wire mock), stopped together (Ctrl-C or SIGTERM reach all)."""
    import tempfile

    from .procs import die_with_parent
    from .triton_local import REPO_ROOT, LocalTriton, TritonNotInstalledError

    with tempfile.TemporaryDirectory(prefix="fastpath-run-") as tmp:
        ready = Path(tmp) / "mock.ready"
        triton = LocalTriton(
            REPO_ROOT / "triton_models",
            grpc_port=args.triton_grpc_port,
            http_port=args.triton_http_port,
            metrics_port=args.triton_metrics_port,
            log_path=Path(tmp) / "tritonserver.log",
        )
        children: list[subprocess.Popen[bytes]] = []
        # Both explicitly: a shell starting us in the background leaves SIGINT ignored, and the
        # children (each in its own session) only stop when this process forwards the signal.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        try:
            key = _local_credentials()
            triton.start()  # first: it takes longest to load its models
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
                ],
                start_new_session=True,
                preexec_fn=die_with_parent(),  # SIGKILLed, run-local still stops every child
            )
            children.append(mock)
            deadline = time.monotonic() + 15
            while not ready.exists():
                if mock.poll() is not None or time.monotonic() > deadline:
                    print(
                        f"error: the local mock upstream did not start on port {args.upstream_port}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.05)
            triton.wait_ready()
            print(
                f"fastpath-gateway: local tritonserver (pid {triton.pid}) ready on grpc {triton.grpc_address}"
                f" with the test LLM and the prompt guard",
                flush=True,
            )
            env = dict(os.environ)
            env[envvars.LOCAL_MOCK_URL] = f"http://127.0.0.1:{args.upstream_port}/v1"
            env[envvars.LOCAL_TRITON_GRPC] = triton.grpc_address
            if args.prometheus:
                from .prometheus_local import LocalPrometheus

                metrics_at = f"127.0.0.1:{args.metrics_port}"
                env[envvars.METRICS_LISTEN] = metrics_at
                prometheus = LocalPrometheus({"fastpath-gateway": (metrics_at, None)})
                prometheus.start()
                prom_proc = prometheus.proc
                assert prom_proc is not None
                children.append(prom_proc)
                print(
                    f"fastpath-gateway: Prometheus on {prometheus.url} scrapes the gateway's metrics at"
                    f" {metrics_at} (alert rules: deploy/prometheus/alerts.yml)",
                    flush=True,
                )
            port = ["--port", str(args.port)] if args.port else []
            serve = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", *port],
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            children.append(serve)
            print(
                "fastpath-gateway: auth is on; your local API key (kept in"
                f" {keystore.data_dir() / 'local-key'}):\n  export OPENAI_API_KEY={key}",
                flush=True,
            )
            return serve.wait()
        except (TritonNotInstalledError, RuntimeError, keystore.KeyStoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            _stop_groups(children)
            triton.stop()


def _stop_groups(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGINT each child's process group (each child leads its own session), wait, then SIGKILL
    what is left of the group: a granian worker still starting when Ctrl-C arrives can outlive
    its parent and keep the port."""
    for child in reversed(children):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT)
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def cmd_triton_local(args: argparse.Namespace) -> int:
    """A real tritonserver on a model repository (default: the repository's triton_models/), in
    the foreground until SIGINT or SIGTERM (see triton_local.py)."""
    from .triton_local import REPO_ROOT, LocalTriton, TritonNotInstalledError

    server = LocalTriton(
        Path(args.model_repository) if args.model_repository else REPO_ROOT / "triton_models",
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_path=Path(args.log_file) if args.log_file else None,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        server.start()
        server.wait_ready()
        print(
            f"tritonserver (pid {server.pid}) ready: grpc {server.grpc_address}, http {server.http_url}, "
            f"metrics {server.metrics_url}; log {server.log_path}",
            flush=True,
        )
        while server.poll() is None:
            time.sleep(0.5)
        print(f"error: tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except (TritonNotInstalledError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


# ---- keys ---------------------------------------------------------------------------------------
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_TEAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/ -]{0,127}")
KEY_PREFIX = "sk-fp-"


def _usage_error(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def _keys_setup(
    args: argparse.Namespace, *, readonly: bool = False
) -> tuple[config_mod.Config, keystore.KeyStore]:
    """The config (`--config`, else the one `serve` was given, else the embedded default) and
    its key store (opened lazily: nothing is created before the first write)."""
    cfg = _load(args.config or os.environ.get(envvars.CONFIG) or None)
    store_cfg = cfg.auth.store
    if store_cfg is None or store_cfg.kind is config_mod.StoreKind.NONE:
        raise _usage_error(
            "this config has no key store: set `auth.salt` (a long random per-deployment secret; "
            "stored key hashes need a stable salt) and set `auth.store.kind` to sqlite or postgres"
        )
    try:
        store = keystore.open_store(cfg, readonly=readonly)
    except keystore.KeyStoreError as exc:
        raise _usage_error(str(exc)) from None
    assert store is not None
    return cfg, store


def _parse_expiry(text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _usage_error(f"--expires: not an ISO 8601 time: {text!r} (e.g. 2030-01-01T00:00:00Z)") from None
    if when.tzinfo is None:
        raise _usage_error("--expires: needs a timezone, e.g. 2030-01-01T00:00:00Z")
    at = when.timestamp()
    if at <= time.time():
        raise _usage_error("--expires: is in the past")
    return at


def _iso(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys_create(args: argparse.Namespace) -> int:
    cfg, store = _keys_setup(args)
    if args.tier not in cfg.tiers:
        raise _usage_error(f"unknown tier {args.tier!r} (known: {', '.join(sorted(cfg.tiers))})")
    if not _TEAM.fullmatch(args.team):
        raise _usage_error(
            "--team: 1-128 letters, digits, spaces and ._:@/- (starting with a letter or digit)"
        )
    models = tuple(dict.fromkeys(m.strip() for m in (args.models or "").split(",") if m.strip()))
    known = {m.name for m in cfg.models}
    unknown = [m for m in models if m not in known]
    if unknown:
        raise _usage_error(
            f"--models: unknown model(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    key_id = args.id or f"key-{secrets.token_hex(6)}"
    if not _KEY_ID.fullmatch(key_id):
        raise _usage_error("--id: 1-64 letters, digits and ._:@- (starting with a letter or digit)")
    if key_id in {k.id for k in cfg.auth.keys}:
        raise _usage_error(f"--id: {key_id!r} is already a key id in the config")
    expires_at = _parse_expiry(args.expires) if args.expires else None
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = keystore.StoredKey(
        id=key_id,
        key_hash=config_mod.hash_key(cfg.auth.salt, secret),
        team=args.team,
        tier=args.tier,
        models=models,
        expires_at=expires_at,
        created_at=time.time(),
    )
    try:
        store.create(key)
    except keystore.KeyExistsError as exc:
        raise _usage_error(f"--id: {exc}") from None
    except keystore.KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(
        f"created key {key_id}: team {args.team}, tier {args.tier}, "
        f"models {', '.join(models) or 'all'}, expires {_iso(expires_at) if expires_at else 'never'}"
    )
    if not cfg.auth.enabled:
        print(
            "note: `auth.enabled` is false in this config: gateways serving it ignore keys", file=sys.stderr
        )
    print("The secret below is shown only this once; the gateway keeps only its salted hash:")
    print(secret, flush=True)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    _, store = _keys_setup(args, readonly=True)
    try:
        keys = store.list_keys()
    except keystore.KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    now = time.time()
    rows = [
        {
            "id": k.id,
            "team": k.team,
            "tier": k.tier,
            "models": list(k.models),
            "status": k.status(now),
            "created_at": _iso(k.created_at),
            "expires_at": _iso(k.expires_at) if k.expires_at is not None else None,
            "revoked_at": _iso(k.revoked_at) if k.revoked_at is not None else None,
        }
        for k in keys
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("ID", "TEAM", "TIER", "MODELS", "STATUS", "CREATED", "EXPIRES")
    table = [header] + [
        (
            str(r["id"]),
            str(r["team"]),
            str(r["tier"]),
            ",".join(k.models) or "all",
            str(r["status"]),
            str(r["created_at"]),
            str(r["expires_at"] or "never"),
        )
        for r, k in zip(rows, keys, strict=True)
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    cfg, store = _keys_setup(args)
    if args.id in {k.id for k in cfg.auth.keys}:
        store.close()
        raise _usage_error(
            f"{args.id!r} is a config key: remove it from the config (or set `disabled: true`)"
        )
    try:
        if store.revoke(args.id, time.time()):
            print(f"revoked key {args.id} (running gateways refuse it within seconds)")
            return 0
        if any(k.id == args.id for k in store.list_keys()):
            print(f"key {args.id} was already revoked")
            return 0
    except keystore.KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"error: no stored key with id {args.id!r}", file=sys.stderr)
    return 1


# ---- audit --------------------------------------------------------------------------------------
def _parse_since(text: str) -> float:
    """`--since`: Unix seconds, or ISO 8601 (a date or a time; without a timezone: UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _usage_error(
            f"--since: neither Unix seconds nor ISO 8601: {text!r} (e.g. 2030-01-01T00:00:00Z)"
        ) from None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def cmd_audit(args: argparse.Namespace) -> int:
    """The key store's audit log: key changes and admin reads, oldest first (read-only)."""
    if args.limit < 1:
        raise _usage_error("--limit: must be at least 1")
    since = _parse_since(args.since) if args.since else None
    _, store = _keys_setup(args, readonly=True)
    try:
        events = store.list_audit(since, args.limit, args.action or None)
    except keystore.KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:  # JSON lines
        for e in events:
            line: dict[str, Any] = {"id": e.id, "ts": e.ts, "time": _iso(e.ts), "actor": e.actor}
            line |= {"action": e.action, "target": e.target, "source": e.source, "detail": e.detail}
            print(json.dumps(line))
        return 0
    header = ("ID", "TIME", "ACTOR", "ACTION", "TARGET", "SOURCE", "DETAIL")
    table = [header] + [
        (
            str(e.id),
            _iso(e.ts),
            e.actor,
            e.action,
            e.target or "-",
            e.source or "-",
            json.dumps(e.detail, separators=(",", ":")) if e.detail else "-",
        )
        for e in events
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


# ---- usage --------------------------------------------------------------------------------------
def _ledger_config(args: argparse.Namespace) -> config_mod.LedgerConfig:
    from . import ledger

    cfg = _load(args.config or os.environ.get(envvars.CONFIG) or None)
    if not ledger.ledger_on(cfg.ledger):
        raise _usage_error("this config has no usage ledger: set `ledger.enabled: true`")
    return cfg.ledger


def cmd_load_spills(args: argparse.Namespace) -> int:
    """Put rows that workers spilled at shutdown (store unreachable) into the ledger."""
    from . import ledger

    ledger_cfg = _ledger_config(args)
    paths = [Path(p) for p in args.files] if args.files else None
    if paths is None and not ledger.spill_files():
        print(f"no spill files in {keystore.data_dir()}")
        return 0
    try:
        loads = ledger.load_spills(ledger_cfg, paths)
    except ledger.LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for done in loads:
        skipped = done.rows - done.inserted
        note = f" ({skipped} already stored)" if skipped else ""
        print(f"{done.path}: {done.inserted} rows loaded{note}; file removed")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Summarise the usage ledger (read from the store directly, like `GET /v1/usage`)."""
    from . import ledger

    ledger_cfg = _ledger_config(args)
    params = [("group_by", args.group_by)]
    params += [
        (name, value) for name in ("since", "until", "key", "team", "model") if (value := getattr(args, name))
    ]
    try:
        query = ledger.parse_query(params)
    except ValueError as exc:
        raise _usage_error(str(exc)) from None
    try:
        rows = ledger.query_usage(ledger_cfg, query)
    except ledger.LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        data = [{f: getattr(r, f) for f in r.__struct_fields__} for r in rows]
        print(
            json.dumps({"group_by": query.group_by, "since": query.since, "until": query.until, "data": data})
        )
        return 0
    header = (
        query.group_by.upper(), "REQUESTS", "PROMPT", "COMPLETION", "COST_USD", "ERRORS", "P50_MS",
        "ATTEMPTS", "CACHED",
    )  # fmt: skip
    table = [header] + [
        (
            r.group if r.group is not None else "-",
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            f"{r.cost_usd:.6f}",
            str(r.errors),
            f"{r.p50_latency_ms:.1f}" if r.p50_latency_ms is not None else "-",
            str(r.attempts),
            str(r.cache_hits),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .top import run

    if args.interval <= 0:
        print("error: --interval must be > 0", file=sys.stderr)
        return 2
    return run(args.url, os.environ.get(args.admin_key_env) or None, args.interval, args.once)


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
    s.add_argument("--engine", choices=["granian", "uvloop"], help="HTTP server (overrides server.engine)")
    s.add_argument(
        "--pid-file", help="where the master writes its pid (default: <data dir>/gateway-<port>.pid)"
    )
    s.set_defaults(func=cmd_serve)
    rl = sub.add_parser(
        "reload",
        help="hot-reload a running gateway's config (SIGHUP via its pid file, or POST /admin/reload)",
    )
    rl.add_argument("--pid-file", help="the gateway's pid file (default: by --port, or the only one)")
    rl.add_argument("--port", type=int, help="the gateway's port: its default pid file")
    rl.add_argument("--url", help="instead of a signal: POST URL/admin/reload with the admin key")
    rl.add_argument("--admin-key-file", help=f"file holding the admin key (default: ${envvars.ADMIN_KEY})")
    rl.add_argument("--ca-file", help="CA certificate for an https --url with a private CA")
    rl.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the verdict")
    rl.set_defaults(func=cmd_reload)
    wk = sub.add_parser("worker", help="run async jobs only (jobs.enabled), no HTTP listener")
    wk.add_argument("--config", default=None, help="the gateway's YAML config")
    wk.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    wk.set_defaults(func=cmd_worker)
    c = sub.add_parser("check-config", help="validate a config file and explain errors")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    r = sub.add_parser(
        "run-local", help="run the default config with its local Triton and mock upstreams (make run)"
    )
    r.add_argument("--port", type=int, help="gateway port (default: the config's)")
    r.add_argument("--upstream-port", type=int, default=9100, help="the OpenAI-wire mock's port")
    r.add_argument("--triton-grpc-port", type=int, default=9101)
    r.add_argument("--triton-http-port", type=int, default=9102)
    r.add_argument("--triton-metrics-port", type=int, default=9103)
    r.add_argument(
        "--prometheus",
        action="store_true",
        help="also start a real Prometheus on :9090 scraping the gateway (make observe)",
    )
    r.add_argument(
        "--metrics-port", type=int, default=9464, help="the private metrics listener (--prometheus)"
    )
    r.set_defaults(func=cmd_run_local)
    tp = sub.add_parser("top", help="a live view of a running gateway from its /metrics")
    tp.add_argument("url", help="the metrics URL, e.g. http://127.0.0.1:9464/metrics")
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("--once", action="store_true", help="print one frame (after one interval) and exit")
    tp.add_argument(
        "--admin-key-env", default="FASTPATH_ADMIN_KEY", help="env var holding the admin key, if any"
    )
    tp.set_defaults(func=cmd_top)
    t = sub.add_parser("triton-local", help="run a real tritonserver on the test models (make triton-venv)")
    t.add_argument("--model-repository", help="model repository (default: <repo>/triton_models)")
    t.add_argument("--grpc-port", type=int, default=8001)
    t.add_argument("--http-port", type=int, default=8000)
    t.add_argument("--metrics-port", type=int, default=8002)
    t.add_argument("--log-file", help="server log (default: a file in a temporary directory)")
    t.set_defaults(func=cmd_triton_local)
    # Listed for `--help`; main() hands `bench ...` to the native binary before argparse runs.
    sub.add_parser(
        "bench", add_help=False, help="load generator for OpenAI-compatible endpoints (bench --help)"
    )
    cfg_opt = argparse.ArgumentParser(add_help=False)
    cfg_opt.add_argument(
        "--config", help="YAML config file (for auth.salt, auth.store, tiers; default: the embedded one)"
    )
    k = sub.add_parser("keys", help="create, list and revoke API keys in the key store")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser(
        "create", parents=[cfg_opt], help="create a key; prints its secret alone on the last line"
    )
    kc.add_argument("--team", required=True)
    kc.add_argument("--tier", required=True, help="a tier name from the config's `tiers:`")
    kc.add_argument("--models", help="comma-separated allowed public models (default: all)")
    kc.add_argument("--expires", help="expiry time with a timezone, e.g. 2030-01-01T00:00:00Z")
    kc.add_argument("--id", help="a name for logs and limits (default: generated)")
    kc.set_defaults(func=cmd_keys_create)
    kl = ksub.add_parser("list", parents=[cfg_opt], help="list stored keys (never secrets)")
    kl.add_argument("--json", action="store_true", help="print JSON")
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", parents=[cfg_opt], help="revoke a stored key")
    kr.add_argument("id")
    kr.set_defaults(func=cmd_keys_revoke)
    a = sub.add_parser(
        "audit", parents=[cfg_opt], help="show the audit log (key changes, admin reads), oldest first"
    )
    a.add_argument("--since", help="only rows from this time: Unix seconds or ISO 8601 (default UTC)")
    a.add_argument("--limit", type=int, default=100, help="the latest N rows (default 100)")
    a.add_argument("--action", help="only this action, e.g. key.create, key.revoke, admin.usage.read")
    a.add_argument("--json", action="store_true", help="print JSON lines")
    a.set_defaults(func=cmd_audit)
    u = sub.add_parser(
        "usage", parents=[cfg_opt], help="summarise the usage ledger by key, team, model, provider or day"
    )
    u.add_argument("--group-by", choices=["key", "team", "model", "provider", "day"], default="key")
    u.add_argument("--since", help="first UTC day, YYYY-MM-DD (inclusive)")
    u.add_argument("--until", help="last UTC day, YYYY-MM-DD (inclusive)")
    u.add_argument("--key", help="only this key id")
    u.add_argument("--team", help="only this team")
    u.add_argument("--model", help="only this public model")
    u.add_argument("--json", action="store_true", help="print JSON")
    u.set_defaults(func=cmd_usage)
    ls = sub.add_parser(
        "load-spills",
        parents=[cfg_opt],
        help="load usage rows spilled at shutdown (store was down) into the ledger; safe to repeat",
    )
    ls.add_argument(
        "files", nargs="*", help="spill files (default: every usage-spill-*.jsonl in the data dir)"
    )
    ls.set_defaults(func=cmd_load_spills)
    d = sub.add_parser("print-default-config", help="print the embedded default config")
    d.set_defaults(func=cmd_print_default_config)
    v = sub.add_parser("version", help="print versions and build profile")
    v.set_defaults(func=cmd_version)
    from .index_cli import add_parser as add_index_parser

    add_index_parser(sub)  # `index add`: documents into a retriever's index
    from .objstore.archive_cli import add_parser as add_archive_parser

    add_archive_parser(sub)  # `archive --day`: a day of the ledger / audit log to the object store
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
