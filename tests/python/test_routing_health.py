"""Active health checks (routing.health) against real upstreams on real sockets: the OpenAI mock
(in this process, so it can be stopped and started again on its port) and a real tritonserver.
No wall-clock asserts: short intervals, and polling with a generous deadline."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Gateway, TritonServer, free_port, run_gateway, run_mock, stop

from gateway import upstreams
from gateway.config import parse
from gateway.dev.openai_mock import serve
from gateway.routing import Route, build_routes
from gateway.routing.health import HealthChecker, health_checker
from gateway.worker import Worker

CHECKS = (
    "routing:\n"
    "  health: {enabled: true, interval_ms: 30, jitter_ms: 10, timeout_ms: 500,"
    " unhealthy_threshold: 2, healthy_threshold: 1}\n"
    # one failure ejects for a minute, and a lone deployment may be ejected
    "  breaker: {consecutive_failures: 1, base_ejection_ms: 60000, max_ejected_percent: 100}\n"
)


def setup(text: str, loop: asyncio.AbstractEventLoop) -> tuple[Worker, HealthChecker]:
    cfg = parse(text)
    worker = Worker(cfg, loop)
    worker.adapters = {p.name: upstreams.build(p, worker) for p in cfg.providers}
    worker.routes = build_routes(cfg, worker.adapters)
    checker = health_checker(worker)
    assert checker is not None
    return worker, checker


async def until(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


def usable_names(route: Route, now: float) -> list[str]:
    return [d.name for g in route.usable(now) for d in g]


def test_openai_check_goes_down_and_comes_back_without_a_restart() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mock = await serve("127.0.0.1", 0)
        port = mock.port
        dead = free_port()  # nothing listens there
        worker, checker = setup(
            "providers:\n"
            f"  - {{name: a, base_url: 'http://127.0.0.1:{port}/v1', connect_timeout_ms: 300}}\n"
            f"  - {{name: dead, base_url: 'http://127.0.0.1:{dead}/v1', connect_timeout_ms: 300}}\n"
            "models:\n"
            "  - {name: solo, provider: a, upstream_model: mock-echo}\n"
            "  - name: pool\n"
            "    deployments:\n"
            "      - {provider: a, upstream_model: mock-echo}\n"
            "      - {provider: dead, upstream_model: mock-echo}\n"
            "aliases: {solo-alias: solo}\n" + CHECKS,
            loop,
        )
        routes = worker.routes
        solo, pool = routes["solo"], routes["pool"]
        # a provider + model is checked once per round, whichever routes and aliases use it
        assert sorted(checker.routes) == ["pool", "solo"]
        assert len(checker.targets) == 2
        shared = next(t for t in checker.targets if t.adapter.name == "a")
        assert shared.deployments == [solo.deployments[0], pool.deployments[0]]

        checker.start(worker)
        try:
            await until("two rounds", lambda: checker.rounds >= 2)
            a_solo, a_pool, d_pool = solo.deployments[0], *pool.deployments
            assert a_solo.healthy and a_pool.healthy and shared.detail == "HTTP 200"
            await until("the dead provider unhealthy", lambda: not d_pool.healthy)
            assert usable_names(pool, loop.time()) == ["a/mock-echo"]
            ready, report = checker.report()
            assert ready
            assert report["routes"]["pool"]["deployments"]["dead/mock-echo"]["healthy"] is False
            assert "connect" in report["routes"]["pool"]["deployments"]["dead/mock-echo"]["check"]
            assert report["routes"]["solo"]["deployments"]["a/mock-echo"]["breaker"] == {
                "state": "closed",
                "ejections": 0,
            }
            # the checks went to /v1/models (the base URL ends in /v1 already)
            paths = {e["path"] for e in mock.state.events if e["event"] == "request"}
            assert paths == {"/v1/models"}

            assert usable_names(solo, loop.time()) == ["a/mock-echo"]  # cached while all closed
            await mock.aclose()
            await until("a unhealthy once its server is gone", lambda: not a_solo.healthy)
            assert [d.healthy for d in shared.deployments] == [False, False]  # one target, both routes
            assert usable_names(solo, loop.time()) == []  # the cached set was invalidated
            ready, report = checker.report()
            assert not ready and not report["routes"]["solo"]["ready"]
            # a request failing meanwhile ejects it for a minute...
            a_solo.breaker.record(False, loop.time())
            assert a_solo.breaker.state == "open"

            rounds = checker.rounds
            mock = await serve("127.0.0.1", port)  # back on the same port; the checker goes on
            await until("a healthy again", lambda: a_solo.healthy and a_pool.healthy)
            assert checker.rounds > rounds
            # ...and the check that saw it back ends the ejection: the next pick is the probe
            assert a_solo.breaker.available(loop.time())
            assert usable_names(solo, loop.time()) == ["a/mock-echo"]
            assert checker.report()[0]
            assert not d_pool.healthy
        finally:
            await checker.close()
            await mock.aclose()
            for adapter in worker.adapters.values():
                await adapter.close()

    asyncio.run(main())


def test_openai_check_path() -> None:
    """A leading /v1 is the base URL's own; other paths are from the server's root."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        mock = await serve("127.0.0.1", 0)
        try:
            worker, _ = setup(
                "providers:\n"
                f"  - {{name: v1, base_url: 'http://127.0.0.1:{mock.port}/v1'}}\n"
                f"  - {{name: root, base_url: 'http://127.0.0.1:{mock.port}'}}\n"
                "models: [{name: m, provider: v1}]\n" + CHECKS,
                loop,
            )
            v1, root = worker.adapters["v1"], worker.adapters["root"]
            assert await v1.check(None, "/v1/models", 1.0) == (True, "HTTP 200")
            assert await root.check(None, "/v1/models", 1.0) == (True, "HTTP 200")
            assert await v1.check(None, "/health", 1.0) == (True, "HTTP 200")
            assert await v1.check(None, "/v1/models/no-such-model", 1.0) == (True, "HTTP 404")  # below 500
            paths = [e["path"] for e in mock.state.events if e["event"] == "request"]
            assert paths == ["/v1/models", "/v1/models", "/health", "/v1/models/no-such-model"]
            for adapter in worker.adapters.values():
                await adapter.close()
        finally:
            await mock.aclose()

    asyncio.run(main())


def test_disabled_builds_nothing() -> None:
    async def main() -> None:
        cfg = parse(
            "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        )
        worker = Worker(cfg, asyncio.get_running_loop())
        assert health_checker(worker) is None

    asyncio.run(main())


def test_triton_server_and_model_readiness(triton: TritonServer) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker, checker = setup(
            "providers:\n"
            f"  - {{name: t, kind: triton, base_url: 'grpc://{triton.grpc_address}'}}\n"
            "models:\n"
            "  - {name: core, provider: t, upstream_model: testllm_core}\n"
            "  - {name: missing, provider: t, upstream_model: not_loaded_model}\n" + CHECKS,
            loop,
        )
        adapter = worker.adapters["t"]
        assert await adapter.check(None, "/v1/models", 5.0) == (True, "Triton server ready")
        core, missing = worker.routes["core"].deployments[0], worker.routes["missing"].deployments[0]
        checker.start(worker)
        try:
            await until("the missing model unhealthy", lambda: not missing.healthy)
            assert core.healthy
            ready, report = checker.report()
            assert not ready
            assert report["routes"]["core"]["ready"]
            assert report["routes"]["core"]["deployments"]["t/testllm_core"]["check"] == "ready"
            assert not report["routes"]["missing"]["ready"]
        finally:
            await checker.close()
            await adapter.close()

    asyncio.run(main())


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{gw.url}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answered_by(gw: Gateway) -> str:
    body = json.dumps({"model": "pool", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(
        f"{gw.url}/v1/chat/completions", body, {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        return str(r.headers["x-fastpath-route"])


def wait_readyz(gw: Gateway, what: str, cond: Callable[[int, dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        status, body = readyz(gw)
        if cond(status, body):
            return body
        assert time.monotonic() < deadline, f"/readyz: not {what} within 30 s: {status} {body}"
        time.sleep(0.05)


def test_gateway_readyz_follows_the_checks(tmp_path: Path) -> None:
    """A real gateway: /readyz reports each deployment; one upstream dies and comes back on its
    port, and the gateway follows without a restart."""
    with run_mock() as a, run_mock() as b:
        cfg = (
            "server: {host: 127.0.0.1}\n"
            "providers:\n"
            f"  - {{name: a, base_url: 'http://127.0.0.1:{a.port}/v1', connect_timeout_ms: 300}}\n"
            f"  - {{name: b, base_url: 'http://127.0.0.1:{b.port}/v1', connect_timeout_ms: 300}}\n"
            "models:\n"
            "  - name: pool\n"
            "    deployments:\n"
            "      - {provider: a, upstream_model: mock-echo, tags: {region: x}}\n"
            "      - {provider: b, upstream_model: mock-echo}\n" + CHECKS
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            body = wait_readyz(gw, "checked", lambda s, b: s == 200 and b.get("rounds", 0) >= 1)
            deps = body["routes"]["pool"]["deployments"]
            assert deps["a/mock-echo"] == {
                "healthy": True,
                "check": "HTTP 200",
                "breaker": {"state": "closed", "ejections": 0},
                "tags": {"region": "x"},
            }
            b_port = b.port
            stop(b.proc)
            body = wait_readyz(
                gw, "b down", lambda s, x: not x["routes"]["pool"]["deployments"]["b/mock-echo"]["healthy"]
            )
            assert body["status"] == "ready" and body["routes"]["pool"]["ready"]
            # the balancer no longer offers it: no request even tries it (attempts=1)
            for _ in range(6):
                assert answered_by(gw) == "a/mock-echo; attempts=1"
            with run_mock(b_port):
                wait_readyz(
                    gw, "b back", lambda s, x: x["routes"]["pool"]["deployments"]["b/mock-echo"]["healthy"]
                )
            stop(a.proc)
            body = wait_readyz(gw, "nothing left", lambda s, x: s == 503)
            assert body["status"] == "not_ready" and not body["routes"]["pool"]["ready"]
