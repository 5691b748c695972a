"""The uvloop engine's processes: a master that binds one listening socket and forks N workers.

Workers inherit the bound socket (no SO_REUSEPORT: a second process cannot bind the same port by
mistake, a bind error is the master's and is reported before any worker starts, and a dying
worker leaves no accept queue of its own behind to drop). The kernel wakes one waiting worker
per connection.

Signals: SIGTERM/SIGINT are blocked around the fork, so a worker only sees them once its loop's
handler is installed (none is lost while the app loads). The master forwards a stop to every
worker; each stops accepting, finishes its in-flight requests for up to `shutdown_grace_ms`,
aborts the rest, runs the app's `__rsgi_del__` (the ledger drains) and exits 0. The master
SIGKILLs a worker still there a little later. A worker that dies while serving is replaced; one
that fails while starting stops the whole server (exit 1: a config the workers cannot run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from ..procs import die_with_parent

log = logging.getLogger("gateway.server")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: a worker that exits with an error sooner than this after its start failed to start (a killed
#: or crashed one is replaced)
_START_S = 3.0
#: more replacements than this within the window: something is wrong with every worker, stop
_MAX_RESTARTS = 10
_RESTART_WINDOW_S = 60.0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket every worker accepts on."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def serve(cfg: Any, host: str, port: int, workers: int) -> int:
    """Run the master until SIGTERM/SIGINT; returns the exit code."""
    try:
        sock = bind(host, port, cfg.server.backlog)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    grace_s = cfg.server.shutdown_grace_ms / 1000
    children: dict[int, float] = {}  # pid -> start time
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    code = 0
    restarts: list[float] = []
    try:
        for _ in range(workers):
            pid = _fork(cfg, sock)
            children[pid] = time.monotonic()
        signal.signal(signal.SIGTERM, _raise_stop)
        signal.signal(signal.SIGINT, _raise_stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        while True:
            pid, status = os.wait()
            started = children.pop(pid, None)
            if started is None:
                continue
            rc = os.waitstatus_to_exitcode(status)
            now = time.monotonic()
            if now - started < _START_S and rc > 0:
                log.error("worker %d failed while starting (exit %d): stopping", pid, rc)
                code = 1
                break
            restarts = [t for t in restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(restarts) > _MAX_RESTARTS:
                log.error("workers keep dying (%d in %g s): stopping", len(restarts), _RESTART_WINDOW_S)
                code = 1
                break
            log.error("worker %d exited (%d) while serving: starting another", pid, rc)
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                children[_fork(cfg, sock)] = time.monotonic()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    except (_Stop, KeyboardInterrupt):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_children(children, grace_s + 2.0)
    sock.close()
    return code


def _stop_children(children: dict[int, float], wait_s: float) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        children.pop(pid, None)
    for pid in children:
        log.error("worker %d did not stop in time: killed", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _fork(cfg: Any, sock: socket.socket) -> int:
    # a master killed with SIGKILL runs no cleanup: the kernel stops its workers (they would
    # keep serving the socket, and hold run-local's ports, as orphans)
    die = die_with_parent(signal.SIGTERM)
    pid = os.fork()
    if pid:
        return pid
    if die is not None:
        die()
    code = 1
    try:
        code = run_worker(cfg, sock)
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)


def run_worker(cfg: Any, sock: socket.socket) -> int:
    """One worker process: its loop, its app, the engine on the inherited socket."""
    import uvloop

    from ..app import Gateway
    from .http11 import Server

    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop: asyncio.Future[None] = loop.create_future()

    def on_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_stop)
    app = Gateway(cfg)
    app.__rsgi_init__(loop)
    server = Server(app.__rsgi__, cfg.server, loop)

    async def serve_until_stopped() -> None:
        # One run of the loop from the signals' release to the end: uvloop pauses its signal
        # handling between two `run_until_complete`s, and a SIGTERM arriving in that gap was
        # lost (the worker served on until the master killed it after the grace time).
        listener = await loop.create_server(server, sock=sock, backlog=cfg.server.backlog)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        await stop
        listener.close()
        await server.shutdown(cfg.server.shutdown_grace_ms / 1000)

    loop.run_until_complete(serve_until_stopped())
    app.__rsgi_del__(loop)  # the loop is stopped, not closed: the app's parts close on it
    loop.close()
    return 0
