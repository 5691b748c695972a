"""Hot config reload: SIGHUP, `fastpath-gateway reload`, `POST /admin/reload`.

Workers are separate processes that share nothing, so a reload is driven by the master and done
by each worker on its own loop:

- The **master** (`ReloadingServer`, granian's process manager) gets SIGHUP (from `kill`, or from
  `fastpath-gateway reload`, which finds it through the pid file `serve` writes), or SIGUSR1 from
  a worker whose `POST /admin/reload` was accepted. It reads and validates the config file
  (`MasterReload.attempt`); a refused file is one error line (the path and the config error), an
  audit row, and nothing else: the workers never hear of it. Settings that cannot change live
  (`RESTART_ONLY`: the listening socket, the worker count, the engine, ...) are logged as
  "needs a restart" and ignored. On success it forwards SIGHUP to every worker pid it spawned.
- Each **worker** (`app.Gateway.reload`) reads the file again, builds a whole new generation (a
  `Worker`, adapters, routes, a started `Pipeline`) next to the serving one, and swaps it in
  between two requests (one synchronous block on the loop: a request sees either all old or all
  new parts). Requests already in the old pipeline finish there; once its in-flight count is
  zero its parts close (`pipeline.close()`, then the adapters). A worker that fails to build
  keeps its generation and logs why.
- **Certificates**: granian loads `server.tls` files when a worker starts, not later. When a
  reload finds the certificate or key changed (paths, size or mtime), the master uses granian's
  graceful respawn instead of SIGHUP: a new worker starts (with the new config and certificate),
  then the old one stops after finishing its requests, one worker at a time. Idle keep-alive
  connections of a replaced worker are closed. Turning TLS on or off needs a restart.

Why not granian's own SIGHUP (respawn every worker)? It drops idle keep-alive connections and
costs a worker start per reload; a swap on the loop keeps every connection.

Why a signal and not a watched file? A signal costs nothing between reloads and the master is
the one place that can validate once, audit once and know every worker pid. A worker that was
starting when SIGHUP came holds it until its loop runs (`app.hold_stop_signals`), so no worker
misses a reload. The contract for another engine's master: set `RELOAD_MASTER` to its pid for
its workers, and on SIGHUP / SIGUSR1 call `MasterReload.attempt` and forward SIGHUP to them.

Audit: every attempt is a `config.reload` row (detail: result ok|refused, the error, what needs
a restart): actor `signal` (written by the master) or `admin-api` (written by the worker that
took the admin request; the master then does not write a second row).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from . import config as config_mod
from . import envvars, keystore

log = logging.getLogger("gateway.reload")

#: `section.field` of settings a running gateway keeps until a restart: what the master's socket
#: and process manager were started with, and the metrics directory/listener.
RESTART_ONLY = (
    "server.engine",
    "server.host",
    "server.port",
    "server.workers",
    "server.backlog",
    "server.http",
    "server.header_read_timeout_ms",
    "server.shutdown_grace_ms",
    "metrics.enabled",
    "metrics.listen",
    "metrics.dir",
)
#: the audit action of every attempt (keystore.AUDIT_ACTIONS)
ACTION = "config.reload"
#: the actor of a reload asked for by a signal (SIGHUP, `fastpath-gateway reload`)
SIGNAL_ACTOR = "signal"
#: longest config error kept in an audit row
_ERROR_MAX = 600


def load_checked(path: str | None) -> config_mod.Config:
    """The config at `path` (None: the embedded default), validated as `serve` validates it
    (extensions' factories resolved). Raises `config.ConfigError`."""
    cfg = config_mod.load(path)
    if cfg.extensions:
        from .pipeline.extensions import check_extensions

        check_extensions(cfg)
    return cfg


def config_path() -> str | None:
    """The file the workers were started from (`serve --config`; None: the embedded default)."""
    return os.environ.get(envvars.CONFIG) or None


def _get(cfg: config_mod.Config, dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    return getattr(getattr(cfg, section), name, None)


def restart_changes(old: config_mod.Config, new: config_mod.Config) -> list[str]:
    """The `RESTART_ONLY` settings (and TLS on/off) that differ: logged, then ignored."""
    changed = [f for f in RESTART_ONLY if _get(old, f) != _get(new, f)]
    if (getattr(old.server, "tls", None) is None) != (getattr(new.server, "tls", None) is None):
        changed.append("server.tls (on/off)")
    return changed


def keep_restart_only(old: config_mod.Config, new: config_mod.Config) -> config_mod.Config:
    """`new` with the running values of the settings that cannot change live."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted in RESTART_ONLY:
        section, _, name = dotted.partition(".")
        if hasattr(getattr(old, section), name):
            sections.setdefault(section, {})[name] = _get(old, dotted)
    replaced = {s: msgspec.structs.replace(getattr(new, s), **fields) for s, fields in sections.items()}
    return msgspec.structs.replace(new, **replaced)


def tls_fingerprint(cfg: config_mod.Config) -> tuple[Any, ...] | None:
    """What granian read at worker start: the TLS files (path, size, mtime) and the passphrase.
    A different fingerprint after a reload means the workers must be replaced."""
    tls = getattr(cfg.server, "tls", None)
    if tls is None:
        return None
    parts: list[Any] = [tls.key_password]
    for path in (tls.cert_file, tls.key_file):
        try:
            st = os.stat(path)
            parts.append((str(Path(path).resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append((path, None, None))
    return tuple(parts)


def audit_row(cfg: config_mod.Config, event: keystore.AuditEvent) -> None:
    """Write one audit row now, to `cfg`'s key store (the master: off any request path). A failed
    write is logged; a config without a store audits nothing."""
    try:
        store = keystore.open_store(cfg, readonly=False)
    except Exception as exc:
        log.error("config reload not audited: the key store cannot be opened: %s", exc)
        return
    if store is None:
        log.warning("config reloads are not audited: this config has no key store (`auth.store`)")
        return
    try:
        store.audit(event)
    except Exception as exc:
        log.error("config reload audit row not written: %s", exc)
    finally:
        store.close()


def event(actor: str, path: str | None, source: str, detail: dict[str, Any]) -> keystore.AuditEvent:
    return keystore.AuditEvent(ACTION, actor, path or "<embedded default>", source, detail, time.time())


def refused_detail(error: str) -> dict[str, Any]:
    return {"result": "refused", "error": error[:_ERROR_MAX]}


def ok_detail(needs_restart: list[str]) -> dict[str, Any]:
    return {"result": "ok", "needs_restart": needs_restart}


# ---- the master ---------------------------------------------------------------------------------
def default_pid_file(port: int) -> Path:
    """Where `serve` writes its pid and `reload` looks for it: `<data dir>/gateway-<port>.pid`."""
    return keystore.data_dir() / f"gateway-{port}.pid"


def status_file(pid_file: Path) -> Path:
    """The master's last reload result (JSON), next to its pid file: `reload` waits for it."""
    return pid_file.with_name(pid_file.name + ".reload.json")


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    needs_restart: list[str] = field(default_factory=list)
    #: the TLS files changed: workers are replaced (granian's respawn), not signalled
    respawn: bool = False


class MasterReload:
    """The master's side: validate, log, audit, and report the result to the status file."""

    def __init__(self, cfg: config_mod.Config, pid_file: Path | None) -> None:
        self.cfg = cfg
        self.path = config_path()
        self.pid_file = pid_file
        self.tls = tls_fingerprint(cfg)
        self.seq = 0

    def attempt(self, actor: str) -> Outcome:
        """One reload: the file read and checked. `actor` `admin-api`: the worker that took the
        request has audited it already."""
        where = self.path or "embedded default config"
        self.seq += 1
        try:
            new = load_checked(self.path)
        except config_mod.ConfigError as exc:
            log.error("config reload refused: %s: %s (the running config is kept)", where, exc)
            if actor == SIGNAL_ACTOR:
                audit_row(self.cfg, event(actor, self.path, _signal_source(), refused_detail(str(exc))))
            out = Outcome(False, str(exc))
            self._report(actor, out)
            return out
        changes = restart_changes(self.cfg, new)
        if changes:
            log.warning("config reload: %s changed: needs a restart (ignored)", ", ".join(changes))
        if actor == SIGNAL_ACTOR:
            audit_row(new, event(actor, self.path, _signal_source(), ok_detail(changes)))
        tls = tls_fingerprint(new)
        respawn = tls != self.tls and self.tls is not None and tls is not None
        self.cfg, self.tls = keep_restart_only(self.cfg, new), tls
        log.info("config reload: %s accepted%s", where, " (TLS files changed)" if respawn else "")
        out = Outcome(True, needs_restart=changes, respawn=respawn)
        self._report(actor, out)
        return out

    def _report(self, actor: str, out: Outcome) -> None:
        if self.pid_file is None:
            return
        body = {"seq": self.seq, "pid": os.getpid(), "at": time.time(), "actor": actor, "ok": out.ok}
        body |= {"error": out.error, "needs_restart": out.needs_restart, "respawn": out.respawn}
        path = status_file(self.pid_file)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(body), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("config reload: status file %s not written: %s", path, exc)


def _signal_source() -> str:
    return f"SIGHUP to pid {os.getpid()} on {socket.gethostname()}"


def write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n", encoding="utf-8")
    os.replace(tmp, path)


def remove_pid_file(path: Path) -> None:
    """Only our own: a newer server on the same port may have written it since."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="utf-8").strip()) == os.getpid():
            path.unlink()
            status_file(path).unlink(missing_ok=True)


def granian_server(cfg: config_mod.Config, pid_file: Path | None, **kwargs: Any) -> Any:
    """granian's process manager with the reload protocol above (module doc). On a build of
    granian without processes (free-threaded: workers are threads) reloads are unsupported and
    SIGHUP keeps granian's meaning."""
    from granian import Granian
    from granian.constants import SSLProtocols
    from granian.server import MPServer

    if Granian is not MPServer:
        log.warning("config reload: not supported with this granian build (worker threads)")
        return Granian(**kwargs)

    base: Any = MPServer  # untyped

    class ReloadingServer(base):  # type: ignore[misc]
        """MPServer whose SIGHUP is a config reload (module doc), not a respawn of every worker."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self._fp_master = MasterReload(cfg, pid_file)
            self._fp_actor = SIGNAL_ACTOR

        def startup(self, spawn_target: Any, target_loader: Any) -> None:
            os.environ[envvars.RELOAD_MASTER] = str(os.getpid())  # the workers' parent
            if pid_file is not None:
                write_pid_file(pid_file)
            signal.signal(signal.SIGUSR1, self._fp_admin_signal)
            super().startup(spawn_target, target_loader)

        def shutdown(self, exit_code: int = 0) -> None:
            if pid_file is not None:
                remove_pid_file(pid_file)
            super().shutdown(exit_code)

        def _fp_admin_signal(self, *_: Any) -> None:
            self._fp_actor = ADMIN_ACTOR
            self.signal_handler_reload()

        def _reload(self, spawn_target: Any, target_loader: Any) -> None:
            actor, self._fp_actor = self._fp_actor, SIGNAL_ACTOR
            self.reload_signal = False
            self.main_loop_interrupt.clear()
            out = self._fp_master.attempt(actor)
            if not out.ok:
                return
            if out.respawn:  # new certificate: granian reads it in new workers only
                tls = self._fp_master.cfg.server.tls
                assert tls is not None
                proto = SSLProtocols(self.ssl_ctx[4])  # the minimum version it was started with
                self.build_ssl_context(
                    Path(tls.cert_file), Path(tls.key_file), tls.key_password, proto, None, [], False
                )
                super()._reload(spawn_target, target_loader)
                return
            for wrk in list(self.wrks):
                pid = wrk._id()
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)

    return ReloadingServer(**kwargs)


#: the actor of a reload asked for over `POST /admin/reload` (gateway.audit.ADMIN_ACTOR)
ADMIN_ACTOR = "admin-api"


def signal_master_is_parent() -> bool:
    """In a worker: its parent is a master that drives reloads (it set `RELOAD_MASTER` to its
    pid before starting the workers); then SIGHUP to this worker is a reload."""
    master = os.environ.get(envvars.RELOAD_MASTER, "")
    return master.isdigit() and int(master) == os.getppid()


def signal_master() -> bool:
    """From a worker: ask the master for a reload of every worker (SIGUSR1); False when there is
    no such master (a lone in-process app: the caller reloads itself)."""
    if not signal_master_is_parent():
        return False
    os.kill(os.getppid(), signal.SIGUSR1)
    return True


# ---- `fastpath-gateway reload` ------------------------------------------------------------------
def find_pid_file(pid_file: str | None, port: int | None) -> Path:
    """`--pid-file`, else the default one of `port`, else the only pid file in the data dir."""
    if pid_file:
        return Path(pid_file)
    if port is not None:
        return default_pid_file(port)
    found = sorted(keystore.data_dir().glob("gateway-*.pid"))
    if len(found) == 1:
        return found[0]
    where = keystore.data_dir()
    if not found:
        raise SystemExit(f"error: no running gateway's pid file in {where}: pass --pid-file or --port")
    names = ", ".join(p.name for p in found)
    raise SystemExit(f"error: several pid files in {where} ({names}): pass --pid-file or --port")


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def signal_reload(pid_file: Path, timeout_s: float) -> int:
    """SIGHUP to the master named in `pid_file`, then its verdict from the status file."""
    try:
        pid = int(pid_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read the pid file {pid_file}: {exc}") from None
    status = status_file(pid_file)
    before = _read_status(status)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise SystemExit(f"error: no process {pid} (stale pid file {pid_file})") from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _read_status(status)
        if now is not None and now != before and now.get("pid") == pid:
            return _print_verdict(now)
        time.sleep(0.05)
    print(f"reload signalled to pid {pid}; no verdict within {timeout_s:g} s (see the gateway's log)")
    return 1


def _print_verdict(v: dict[str, Any]) -> int:
    if not v.get("ok"):
        print(f"config reload refused: {v.get('error')}\n  the gateway keeps its running config")
        return 1
    print(
        "config reloaded" + (" (TLS files changed: workers replaced one by one)" if v.get("respawn") else "")
    )
    if v.get("needs_restart"):
        print(f"  needs a restart (ignored until then): {', '.join(v['needs_restart'])}")
    return 0


def http_reload(url: str, admin_key: str, timeout_s: float, ca_file: str | None = None) -> int:
    """`POST <url>/admin/reload` with the admin key; prints the gateway's answer."""
    import ssl
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/admin/reload"
    req = urllib.request.Request(
        target, method="POST", data=b"", headers={"authorization": f"Bearer {admin_key}"}
    )
    ctx = ssl.create_default_context(cafile=ca_file) if target.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise SystemExit(f"error: {target}: {exc}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {}
    if status == 200:
        return _print_verdict({"ok": True, "needs_restart": answer.get("needs_restart", [])})
    if status == 202:
        print("config reload requested; the gateway did not confirm in time (see its log)")
        return 0
    if status == 422:
        return _print_verdict({"ok": False, "error": answer.get("error")})
    message = answer.get("error", {}).get("message") if isinstance(answer.get("error"), dict) else None
    print(f"error: {target}: HTTP {status}: {message or answer.get('error') or body[:200]!r}")
    return 1


# ---- a master that forks its own workers (engine uvloop) ------------------------------------------
def child_pids() -> list[int]:
    """This process's children (Linux /proc): the workers of a master that forks them itself."""
    pid = os.getpid()
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="utf-8")
    except OSError:
        return []
    return [int(p) for p in text.split()]


def install_master_signals(cfg: config_mod.Config, pid_file: Path | None) -> Callable[[], None]:
    """Make this process (about to fork its workers) a reload master: SIGHUP and SIGUSR1 run
    `MasterReload.attempt` and forward SIGHUP to its children; its pid goes to `pid_file` and to
    the workers' environment. Handlers run between bytecodes of the main thread (a blocking
    `os.wait` is retried after them). A worker forked with these handlers ignores them until its
    app installs its own. Returns the cleanup (the pid file removed)."""
    master = MasterReload(cfg, pid_file)
    me = os.getpid()
    os.environ[envvars.RELOAD_MASTER] = str(me)
    if pid_file is not None:
        write_pid_file(pid_file)

    def run(actor: str) -> None:
        if os.getpid() != me:  # a worker that has not installed its own handler yet
            return
        if master.attempt(actor).ok:
            for pid in child_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGHUP, lambda *_: run(SIGNAL_ACTOR))
    signal.signal(signal.SIGUSR1, lambda *_: run(ADMIN_ACTOR))

    def cleanup() -> None:
        if pid_file is not None:
            remove_pid_file(pid_file)

    return cleanup
