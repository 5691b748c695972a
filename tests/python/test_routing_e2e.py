"""Routing and resilience end to end: a gateway in front of several real mock upstream
processes (and one mock serving several upstream model names), broken on purpose."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, free_port, run_gateway, run_mock


def post(
    port: int, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"content-type": "application/json", "x-request-id": uuid.uuid4().hex, **(headers or {})}
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def chat(model: str, stream: bool = False, content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


def completions(m: MockUpstream) -> list[dict[str, object]]:
    return [e for e in m.events() if e["event"] == "request" and e["path"] == "/v1/chat/completions"]


def set_faults(m: MockUpstream, **faults: object) -> None:
    req = urllib.request.Request(
        f"{m.url}/_mock/faults",
        json.dumps(faults).encode(),
        {"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


def providers(*mocks: MockUpstream, extra: str = "") -> str:
    lines = ["providers:"]
    for i, m in enumerate(mocks):
        lines += [
            f"  - name: m{i}",
            f"    base_url: http://127.0.0.1:{m.port}/v1",
            "    connect_timeout_ms: 500",
            "    first_byte_timeout_ms: 5000",
            "    idle_timeout_ms: 5000",
            extra,
        ]
    return "\n".join(line for line in lines if line) + "\n"


def pool_config(*mocks: MockUpstream, rules: str = "", after: str = "") -> str:
    """Providers m0.. for `mocks` and the model `pool`: round robin over one mock-echo
    deployment on each, with `rules` (indented model fields) and `after` (top-level sections)."""
    deps = "".join(f"      - {{provider: m{i}, upstream_model: mock-echo}}\n" for i in range(len(mocks)))
    return (
        providers(*mocks)
        + "models:\n  - name: pool\n    balance: round_robin\n"
        + "".join(f"    {line}\n" for line in rules.splitlines())
        + f"    deployments:\n{deps}{after}"
    )


def test_deployments_share_load_and_say_who_answered(tmp_path: Path) -> None:
    with run_mock() as a, run_mock() as b:
        cfg = providers(a, b) + (
            "models:\n"
            "  - name: pool\n"
            "    balance: round_robin\n"
            "    deployments:\n"
            "      - {provider: m0, upstream_model: mock-echo, weight: 3}\n"
            "      - {provider: m1, upstream_model: mock-echo}\n"
            "aliases: {pool-alias: pool}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            seen = Counter()
            for i in range(40):
                status, headers, body = post(gw.port, chat("pool-alias" if i % 2 else "pool"))
                assert status == 200, body
                route = headers["x-fastpath-route"]
                assert route.endswith("; attempts=1")
                seen[route.split(";")[0]] += 1
            assert seen == {"m0/mock-echo": 30, "m1/mock-echo": 10}
            assert len(completions(a)) == 30 and len(completions(b)) == 10
            with urllib.request.urlopen(f"{gw.url}/v1/models", timeout=5) as r:
                ids = {m["id"] for m in json.loads(r.read())["data"]}
            assert {"pool", "pool-alias"} <= ids


def test_several_upstream_models_get_their_own_name(tmp_path: Path) -> None:
    """A model group: deployments of different upstream models on one server."""
    with run_mock() as m:
        cfg = providers(m) + (
            "models:\n"
            "  - name: group\n"
            "    balance: round_robin\n"
            "    deployments:\n"
            "      - {provider: m0, upstream_model: model-a}\n"
            "      - {provider: m0, upstream_model: model-b}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            for _ in range(4):
                status, _, body = post(gw.port, chat("group", stream=True))
                assert status == 200, body
            models = Counter(e["model"] for e in completions(m))
            assert models == {"model-a": 2, "model-b": 2}


def test_dead_deployment_is_retried_elsewhere_then_ejected_then_back(tmp_path: Path) -> None:
    """Kill one of two deployments: requests not yet streaming see no error (retried on the
    other), a stream already streaming ends with an error event, the breaker ejects the dead one,
    and the health check brings it back when it returns, with no restart."""
    port_a = free_port()
    with run_mock() as b:
        a_cm = run_mock(port_a)
        a = a_cm.__enter__()
        cfg = pool_config(a, b) + (
            "  - name: slow-a\n"
            "    provider: m0\n"
            "    upstream_model: mock-slow\n"
            "routing:\n"
            "  breaker: {consecutive_failures: 3, base_ejection_ms: 600000, max_ejection_ms: 600000}\n"
            "  health: {enabled: true, interval_ms: 200, jitter_ms: 20, timeout_ms: 300,"
            " unhealthy_threshold: 1, healthy_threshold: 1}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            for _ in range(4):
                assert post(gw.port, chat("pool"))[0] == 200
            # a stream in flight on `a` when it dies
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(chat("slow-a", stream=True, mock={"words": 200})).encode(),
                {"content-type": "application/json"},
            )
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read1(4096)
            a_cm.__exit__(None, None, None)  # kill a
            rest = resp.read().decode()
            conn.close()
            assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")
            # not yet streaming: no error, every request answered by b
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: post(gw.port, chat("pool")), range(40)))
            assert all(s == 200 for s, _, _ in results), [r[2][:200] for r in results if r[0] != 200]
            assert all(h["x-fastpath-route"].startswith("m1/") for _, h, _ in results)
            retried = sum(1 for _, h, _ in results if not h["x-fastpath-route"].endswith("attempts=1"))
            assert retried <= 3 + 8  # the threshold, plus what was in flight at once when it tripped
            # ejected (breaker or health check): no request even tries `a` any more
            for _ in range(10):
                status, headers, _ = post(gw.port, chat("pool"))
                assert status == 200 and headers["x-fastpath-route"] == "m1/mock-echo; attempts=1"
            # `a` comes back on its port: the health check returns it to the pool
            with run_mock(port_a) as a2:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and not completions(a2):
                    post(gw.port, chat("pool"))
                    time.sleep(0.1)
                assert completions(a2), "the restarted deployment never got traffic back"


def test_5xx_storm_retries_stay_within_the_budget(tmp_path: Path) -> None:
    with run_mock() as a, run_mock() as b:
        cfg = pool_config(
            a,
            b,
            rules="retry: {max_attempts: 3, backoff_ms: 1, budget_ratio: 0.2, budget_min_per_s: 0}",
            after="routing:\n  breaker: {enabled: false}\n",
        )
        set_faults(a, status=500, status_rate=1.0)
        set_faults(b, status=500, status_rate=1.0)
        n = 100
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            codes = Counter(post(gw.port, chat("pool"))[0] for _ in range(n))
        upstream = len(completions(a)) + len(completions(b))
        assert codes == {502: n}
        extra = upstream - n
        assert 0 < extra <= 0.2 * n, extra


def test_fallback_to_another_model_by_error_class(tmp_path: Path) -> None:
    with run_mock() as a, run_mock() as b:
        cfg = providers(a, b) + (
            "models:\n"
            "  - name: small\n"
            "    provider: m0\n"
            "    upstream_model: mock-echo\n"
            "    retry: {max_attempts: 1}\n"
            "    fallbacks:\n"
            "      - {errors: [rate_limited], models: [big]}\n"
            "  - name: big\n"
            "    provider: m1\n"
            "    upstream_model: mock-big\n"
        )
        set_faults(a, status=429, status_rate=1.0)
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            status, headers, body = post(gw.port, chat("small"))
            assert status == 200, body
            assert headers["x-fastpath-route"] == "m1/mock-big; attempts=2"
            status, headers, body = post(gw.port, chat("small", stream=True))
            assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        assert [e["model"] for e in completions(b)] == ["mock-big", "mock-big"]


def test_affinity_keeps_a_session_on_one_replica(tmp_path: Path) -> None:
    with run_mock() as m:
        cfg = providers(m) + (
            "models:\n"
            "  - name: pool\n"
            "    balance: affinity\n"
            "    affinity: {key: user}\n"
            "    deployments:\n"
            + "".join(f"      - {{provider: m0, upstream_model: replica-{i}}}\n" for i in range(3))
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            for s in range(30):
                for _ in range(5):
                    assert post(gw.port, chat("pool", user=f"s{s}"))[0] == 200
        by_session: dict[str, Counter[str]] = {}
        for e in completions(m):
            sid = str(e["body"]["user"])  # type: ignore[index]
            by_session.setdefault(sid, Counter())[str(e["model"])] += 1
        assert len(by_session) == 30
        sticky = sum(c.most_common(1)[0][1] for c in by_session.values())
        assert sticky == 150  # sequential requests: every replica is under its bound
        assert len({c.most_common(1)[0][0] for c in by_session.values()}) == 3


def test_hedged_stream_is_answered_by_the_fast_deployment(tmp_path: Path) -> None:
    with run_mock() as a, run_mock() as b:
        cfg = pool_config(a, b, rules="hedge: {enabled: true, after_ms: 150}\nretry: {budget_min_per_s: 100}")
        set_faults(a, first_delay_ms=5000)
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            routes = []
            for _ in range(4):
                status, headers, body = post(gw.port, chat("pool", stream=True))
                assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
                routes.append(headers["x-fastpath-route"])
        # round robin sends every other request to the stalled `a` first: those are hedged to `b`
        assert sorted(routes) == ["m1/mock-echo; attempts=1"] * 2 + ["m1/mock-echo; attempts=2"] * 2


def test_single_flight_shares_one_upstream_call(tmp_path: Path) -> None:
    with run_mock() as m:
        cfg = providers(m) + (
            "models:\n"
            "  - name: cached\n"
            "    provider: m0\n"
            "    upstream_model: mock-echo\n"
            "    cache: {enabled: true}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            body = chat("cached", mock={"first_delay_ms": 1500})
            with concurrent.futures.ThreadPoolExecutor(100) as pool:
                results = list(pool.map(lambda _: post(gw.port, body), range(100)))
            assert all(s == 200 for s, _, _ in results)
            assert len({b for _, _, b in results}) == 1  # byte-identical
            verdicts = Counter(h["x-fastpath-cache"] for _, h, _ in results)
            assert verdicts["miss"] == 1 and verdicts["miss"] + verdicts["shared"] + verdicts["hit"] == 100
            assert len(completions(m)) == 1
            # a later identical request is a hit; a stream is replayed event-identical
            status, headers, again = post(gw.port, body)
            assert status == 200 and headers["x-fastpath-cache"] == "hit" and again == results[0][2]
            s1 = post(gw.port, chat("cached", stream=True))
            s2 = post(gw.port, chat("cached", stream=True))
            assert s1[1]["x-fastpath-cache"] == "miss" and s2[1]["x-fastpath-cache"] == "hit"
            assert s1[2] == s2[2]
            assert len(completions(m)) == 2
            no_cache = post(gw.port, chat("cached", stream=True), {"cache-control": "no-cache"})
            assert no_cache[1]["x-fastpath-cache"] == "miss"
            assert len(completions(m)) == 3


@pytest.mark.parametrize("stream", [False, True])
def test_full_deployments_queue_instead_of_refusing(tmp_path: Path, stream: bool) -> None:
    with run_mock() as m:
        cfg = providers(m) + (
            "models:\n"
            "  - name: capped\n"
            "    queue: {max_wait_ms: 10000}\n"
            "    deployments:\n"
            "      - {provider: m0, upstream_model: mock-echo, max_concurrent: 1}\n"
            "  - name: refuse\n"
            "    deployments:\n"
            "      - {provider: m0, upstream_model: mock-echo, max_concurrent: 1}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            slow = chat("capped", stream=stream, mock={"first_delay_ms": 300})
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: post(gw.port, slow), range(4)))
            assert [s for s, _, _ in results] == [200] * 4
            assert sum("queue;dur=" in h.get("server-timing", "") for _, h, _ in results) >= 3
            assert max(len(completions(m)), 0) == 4
            held = chat("refuse", stream=stream, mock={"first_delay_ms": 1000})
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                codes = sorted(s for s, _, _ in pool.map(lambda _: post(gw.port, held), range(2)))
            assert codes == [200, 429]


@pytest.mark.parametrize(("weights", "share_b"), [("{}", 0.5), ("{a: 3, b: 1}", 0.25)])
def test_fair_queue_shares_capacity_by_team_weight(tmp_path: Path, weights: str, share_b: float) -> None:
    """Capacity 1, team a offers 10x team b's load (10 clients vs 1, closed loop): the queue
    serves the teams by weight, not by who asks most."""
    key_a, key_b = "sk-team-a-0123456789abcdef", "sk-team-b-0123456789abcdef"
    with run_mock() as m:
        cfg = providers(m) + (
            "models:\n"
            "  - name: capped\n"
            f"    queue: {{max_wait_ms: 30000, team_weights: {weights}}}\n"
            "    deployments:\n"
            "      - {provider: m0, upstream_model: mock-echo, max_concurrent: 1}\n"
            "auth:\n"
            "  enabled: true\n"
            "  salt: fair-queue-test-salt-0123\n"
            "  keys:\n"
            f"    - {{id: a, key: {key_a}, team: a}}\n"
            f"    - {{id: b, key: {key_b}, team: b}}\n"
        )
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            stop = time.monotonic() + 60
            sent = iter(range(130))  # shared by the clients: 130 requests in all

            def client(team: str, key: str) -> None:
                body = chat("capped", content=f"team {team}", mock={"first_delay_ms": 20})
                while time.monotonic() < stop and next(sent, None) is not None:
                    assert post(gw.port, body, {"authorization": f"Bearer {key}"})[0] == 200

            with concurrent.futures.ThreadPoolExecutor(11) as pool:
                jobs = [pool.submit(client, "a", key_a) for _ in range(10)] + [
                    pool.submit(client, "b", key_b)
                ]
                for job in jobs:
                    job.result()
        served = [str(e["body"]["messages"][0]["content"])[-1] for e in completions(m)]  # type: ignore[index]
    window = served[20:110]  # past the start, before the clients run out
    assert len(window) == 90
    assert abs(window.count("b") / len(window) - share_b) <= 0.1, "".join(window)


def test_routing_is_visible_in_metrics(tmp_path: Path) -> None:
    with run_mock() as a, run_mock() as b:
        cfg = pool_config(
            a,
            b,
            rules="retry: {backoff_ms: 1, budget_min_per_s: 100}\ncache: {enabled: true}",
            after="routing:\n  breaker: {enabled: false}\nmetrics: {require_admin: false}\n",
        )
        set_faults(a, status=503, status_rate=1.0)
        with run_gateway(tmp_path, None, config_text=cfg) as gw:
            for i in range(6):
                assert post(gw.port, chat("pool", content=f"q{i % 3}"))[0] == 200
            deadline = time.monotonic() + 10  # the worker publishes its routing counters every 250 ms
            text = ""
            while time.monotonic() < deadline and 'event="cache_hit"} 3' not in text:
                time.sleep(0.1)
                with urllib.request.urlopen(f"{gw.url}/metrics", timeout=5) as r:
                    text = r.read().decode()

    def value(name: str, **labels: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    events = "fastpath_routing_events_total"
    # 3 distinct prompts: 3 misses (each tried `a` first or second), then 3 hits
    assert value(events, gen_ai_request_model="pool", event="cache_miss") == 3
    assert value(events, gen_ai_request_model="pool", event="cache_hit") == 3
    assert value(events, gen_ai_request_model="pool", event="retry") >= 1
    assert value("fastpath_deployment_in_flight", gen_ai_request_model="pool") == 0
    assert value("fastpath_deployment_up", gen_ai_request_model="pool") == 2
