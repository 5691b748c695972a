"""A real Prometheus (Debian's binary) scraping a 2-worker gateway under load, through the
private metrics listener and through the main port with the admin key; the repo's alert rules
loaded and healthy. (The rules' own unit tests: `make test-rules`.)"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, free_port, gateway_config, run_gateway

from gateway.prometheus_local import LocalPrometheus

ADMIN = "admin-key-for-the-scrape-test-0123456789"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("CI"),
    reason="prometheus is not installed (make prometheus-deps; .ci/run installs it)",
)


def post(port: int, model: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def until(fn: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


@pytest.mark.parametrize("via", ["listener", "main-port"])
def test_prometheus_scrapes_every_worker_and_loads_the_alert_rules(
    mock_upstream: MockUpstream, tmp_path: Path, via: str
) -> None:
    """`listener`: the private `metrics.listen` port, no credential; `main-port`: `/metrics` on
    the gateway's port with the admin key as Prometheus' bearer token."""
    listen = f"127.0.0.1:{free_port()}"
    text = gateway_config(mock_upstream.port) + f"admin: {{api_key: {ADMIN}}}\n"
    if via == "listener":
        text += f"metrics: {{listen: '{listen}'}}\n"
    with run_gateway(tmp_path, mock_upstream, workers=2, config_text=text) as gw:
        target = (listen, None) if via == "listener" else (f"127.0.0.1:{gw.port}", ADMIN)
        targets = {"fastpath-gateway": target}
        with LocalPrometheus(targets, port=free_port(), interval_s=0.5) as prom:
            statuses = [post(gw.port, "echo" if i % 3 else "no-such-model") for i in range(30)]
            assert statuses.count(200) == 20 and statuses.count(404) == 10

            def totals() -> dict[tuple[str, str], float] | None:
                rows = prom.query(
                    'sum by (job, status) (fastpath_requests_total{endpoint="/v1/chat/completions"})'
                )
                got = {(r["metric"]["job"], r["metric"]["status"]): float(r["value"][1]) for r in rows}
                want = {(j, s): n for j in targets for s, n in (("200", 20.0), ("404", 10.0))}
                return got if got == want else None

            assert until(totals), prom.query("sum by (job, status) (fastpath_requests_total)")
            up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
            assert up == {"fastpath-gateway": "1"}
            # a histogram across both workers: every request counted once
            count = prom.query(
                'sum by (job) (gen_ai_server_request_duration_seconds_count{gen_ai_request_model="echo"})'
            )
            assert {r["metric"]["job"]: float(r["value"][1]) for r in count} == {j: 20.0 for j in targets}
            groups = prom.api("rules")["groups"]
            rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            assert {"FastpathHighErrorRatio", "FastpathTTFTSLOBurn", "FastpathUpstreamDown"} <= set(rules)
            assert until(lambda: all(h == "ok" for h in _health(prom).values())), _health(prom)


def _health(prom: LocalPrometheus) -> dict[str, str]:
    return {r["name"]: r["health"] for g in prom.api("rules")["groups"] for r in g["rules"]}
