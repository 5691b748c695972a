"""`/metrics` (gateway.metrics): one scrape answers for every worker; counters and histograms
match the requests sent; TTFT lands in the client's bucket; the admin credential guards it; no
secret shows; OpenMetrics on `Accept`; label cardinality is bounded."""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import MockUpstream, gateway_config, run_gateway

from gateway import config as config_mod
from gateway.cli import find_bench_binary
from gateway.config import TierConfig
from gateway.context import Endpoint, RequestContext
from gateway.metrics import MetricsObserver
from gateway.metrics.expose import collect, render
from gateway.pipeline.stage import Outcome
from gateway.principal import Principal
from gateway.schemas import Usage

KEY = "sk-metrics-0123456789abcdef01"
ADMIN = "adm-metrics-0123456789abcdef0123456789"
UPSTREAM_SECRET = "sk-upstream-secret"

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    out: Samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in match.items())
    )


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        h = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, json.dumps(body).encode() if body is not None else None, h)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def scrape(port: int, accept: str | None = None) -> tuple[int, dict[str, str], str]:
    time.sleep(0.6)  # workers publish their slots every publish_interval_ms (250)
    headers = {"authorization": f"Bearer {ADMIN}"}
    if accept:
        headers["accept"] = accept
    status, h, body = request(port, "GET", "/metrics", headers=headers)
    return status, h, body.decode()


def chat(model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello world"}], **extra}


def config(upstream: MockUpstream, admin: bool = True, metrics: str = "") -> str:
    text = (
        gateway_config(upstream.port) + f"auth:\n  enabled: true\n  keys:\n    - {{id: main, key: {KEY}}}\n"
    )
    if admin:
        text += f"admin:\n  api_key: {ADMIN}\n"
    return text + metrics


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with run_gateway(
        tmp_path_factory.mktemp("metrics"), mock_upstream, workers=2, config_text=config(mock_upstream)
    ) as g:
        yield g


AUTH = {"authorization": f"Bearer {KEY}"}


def test_counters_and_histograms_match_requests_over_two_workers(gw: Any) -> None:
    _, _, before = scrape(gw.port)
    b = parse(before)
    n_ok, n_404, n_401 = 30, 6, 4
    for _ in range(n_ok):
        status, _, _ = request(gw.port, "POST", "/v1/chat/completions", chat(), AUTH)
        assert status == 200
    for _ in range(n_404):
        status, _, _ = request(gw.port, "POST", "/v1/chat/completions", chat("nope"), AUTH)
        assert status == 404
    for _ in range(n_401):
        status, _, _ = request(gw.port, "POST", "/v1/chat/completions", chat())
        assert status == 401
    status, headers, text = scrape(gw.port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    a = parse(text)

    def delta(name: str, **match: str) -> float:
        return total(a, name, **match) - total(b, name, **match)

    n = n_ok + n_404 + n_401
    assert delta("fastpath_requests_total") == n
    assert delta("fastpath_requests_total", status="200", model="echo", provider="mock", error="") == n_ok
    assert delta("fastpath_requests_total", status="404", model="none", error="model_not_found") == n_404
    assert delta("fastpath_requests_total", status="401", error="unauthorized") == n_401
    dur = "gen_ai_server_request_duration_seconds"
    assert delta(f"{dur}_count") == n
    assert delta(f"{dur}_bucket", le="+Inf") == n
    assert delta(f"{dur}_count", gen_ai_request_model="echo", gen_ai_operation_name="chat") == n_ok
    assert 0 < delta(f"{dur}_sum") < n * 5
    # each stage histogram counts the requests that ran it
    assert delta("fastpath_stage_duration_seconds_count", stage="decode") == n
    assert delta("fastpath_stage_duration_seconds_count", stage="route") == n_ok  # not when refused
    assert delta("fastpath_upstream_duration_seconds_count", provider="mock") == n_ok
    # tokens: every echo request has usage; the token histogram and the counter agree
    tok_in = delta("fastpath_tokens_total", model="echo", team="default", type="input")
    assert tok_in > 0
    assert (
        delta("gen_ai_client_token_usage_sum", gen_ai_request_model="echo", gen_ai_token_type="input")
        == tok_in
    )
    assert (
        delta("gen_ai_client_token_usage_count", gen_ai_request_model="echo", gen_ai_token_type="input")
        == n_ok
    )
    # both workers wrote a shard (a scrape sums them)
    assert total(a, "fastpath_requests_in_flight") == 0
    assert total(a, "fastpath_build_info") == 1


def test_stream_ttft_lands_in_the_clients_bucket(gw: Any) -> None:
    _, _, before = scrape(gw.port)
    body = chat(stream=True, stream_options={"include_usage": True}, mock={"first_delay_ms": 150})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body).encode(),
        {**AUTH, "content-type": "application/json"},
    )
    resp = conn.getresponse()
    ttft = None
    for raw in resp:
        if raw.startswith(b"data: {") and b'"content"' in raw and ttft is None:
            ttft = time.perf_counter() - t0
    conn.close()
    assert ttft is not None
    _, _, after = scrape(gw.port)
    name = "gen_ai_server_time_to_first_token_seconds"
    b, a = parse(before), parse(after)
    assert total(a, f"{name}_count", gen_ai_request_model="echo") - total(b, f"{name}_count") == 1
    server_ttft = total(a, f"{name}_sum") - total(b, f"{name}_sum")
    assert 0.15 <= server_ttft <= ttft
    bounds = sorted({float(lb["le"]) for n, lb, _ in a if n == f"{name}_bucket" and lb["le"] != "+Inf"})
    # the bucket the server counted it in is the client's bucket (or the one below: within one)
    changed = [
        le
        for le in bounds
        if total(a, f"{name}_bucket", le=repr(le)) - total(b, f"{name}_bucket", le=repr(le)) == 1
    ]
    server_bucket = changed[0]
    client_bucket = next((le for le in bounds if ttft <= le), math.inf)
    assert (
        bounds.index(server_bucket) >= bounds.index(client_bucket) - 1 if client_bucket != math.inf else True
    )
    assert server_bucket <= client_bucket
    assert total(a, "gen_ai_server_time_per_output_token_seconds_count") > total(
        b, "gen_ai_server_time_per_output_token_seconds_count"
    )


@pytest.mark.skipif(
    find_bench_binary() is None, reason="fastpath-bench is not built (make install builds it)"
)
def test_stream_ttft_histogram_matches_fastpath_bench_within_one_bucket(gw: Any, tmp_path: Path) -> None:
    """The acceptance check: `fastpath-gateway bench` streams 12 requests (the upstream holds
    each first token 180 ms); each request's TTFT as bench measured it and as the gateway's histogram
    counted it fall in the same bucket or neighbouring ones (sorted and paired)."""
    name = "gen_ai_server_time_to_first_token_seconds"
    _, _, before = scrape(gw.port)
    csv = tmp_path / "bench.csv"
    bench = subprocess.run(
        [
            sys.executable, "-m", "gateway.cli", "bench", "--url", f"http://127.0.0.1:{gw.port}/v1/chat/completions",
            "--model", "echo", "--api-key", KEY, "--stream", "--requests", "12", "--warmup", "0",
            "--extra-body", json.dumps({"mock": {"first_delay_ms": 180}}), "--csv", str(csv), "--no-progress",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    rows = [
        dict(zip(csv.read_text().splitlines()[0].split(","), line.split(","), strict=False))
        for line in csv.read_text().splitlines()[1:]
    ]
    client = sorted(float(r["ttft_ms"]) / 1000 for r in rows if r["status"] == "200" and r["ttft_ms"])
    assert len(client) == 12, rows
    _, _, after = scrape(gw.port)
    b, a = parse(before), parse(after)
    bounds = sorted({float(lb["le"]) for n, lb, _ in a if n == f"{name}_bucket" and lb["le"] != "+Inf"})
    server: list[int] = []
    prev = 0.0
    for i, le in enumerate(bounds):
        cum = total(a, f"{name}_bucket", le=repr(le)) - total(b, f"{name}_bucket", le=repr(le))
        server += [i] * round(cum - prev)
        prev = cum
    server += [len(bounds)] * round(total(a, f"{name}_count") - total(b, f"{name}_count") - prev)
    assert len(server) == 12, server
    client_idx = [next((i for i, le in enumerate(bounds) if t <= le), len(bounds)) for t in client]
    assert all(abs(s_ - c) <= 1 for s_, c in zip(sorted(server), client_idx, strict=True)), (
        server,
        client_idx,
    )


def test_admin_credential_openmetrics_and_no_secrets(gw: Any) -> None:
    assert request(gw.port, "GET", "/metrics")[0] == 401
    assert request(gw.port, "GET", "/metrics", headers={"authorization": "Bearer wrong"})[0] == 401
    assert request(gw.port, "GET", "/metrics", headers={"authorization": f"Bearer {KEY}"})[0] == 401
    status, headers, text = scrape(gw.port, accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert "# TYPE fastpath_requests counter" in text
    _, _, plain = scrape(gw.port)
    for secret in (KEY, ADMIN, UPSTREAM_SECRET, "sha256:"):
        assert secret not in text
        assert secret not in plain


def _raw_reply(body: dict[str, Any]) -> str:
    """A whole HTTP response for the mock's `raw` knob (it writes it verbatim, then closes)."""
    data = json.dumps(body)
    return f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n{data}"


def test_cached_prompt_tokens_are_a_token_type(gw: Any) -> None:
    usage = {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}
    reply = {
        "id": "c-1",
        "object": "chat.completion",
        "created": 1,
        "model": "mock-echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 16}},
    }
    _, _, before = scrape(gw.port)
    n = 3
    for _ in range(n):
        status, _, body = request(
            gw.port, "POST", "/v1/chat/completions", chat(mock={"raw": _raw_reply(reply)}), AUTH
        )
        assert status == 200
        assert json.loads(body)["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 16
        }  # passed on as sent
    # a reply without details counts no cached tokens
    no_details = {**reply, "usage": usage}
    status, _, _ = request(
        gw.port, "POST", "/v1/chat/completions", chat(mock={"raw": _raw_reply(no_details)}), AUTH
    )
    assert status == 200
    _, _, after = scrape(gw.port)
    b, a = parse(before), parse(after)

    def delta(name: str, **match: str) -> float:
        return total(a, name, **match) - total(b, name, **match)

    usage_m = "gen_ai_client_token_usage"
    assert delta(f"{usage_m}_sum", gen_ai_request_model="echo", gen_ai_token_type="cached") == 16 * n
    assert delta(f"{usage_m}_count", gen_ai_request_model="echo", gen_ai_token_type="cached") == n
    assert delta(f"{usage_m}_bucket", gen_ai_request_model="echo", gen_ai_token_type="cached", le="16.0") == n
    assert delta(f"{usage_m}_sum", gen_ai_request_model="echo", gen_ai_token_type="input") == 20 * (n + 1)
    assert delta("fastpath_tokens_total", model="echo", type="cached") == 16 * n
    assert delta("fastpath_tokens_total", model="echo", type="input") == 20 * (n + 1)


def _limits_config(upstream: MockUpstream) -> str:
    keys = "".join(f"    - {{id: {k}, key: {KEY}-{k}, tier: {k}}}\n" for k in ("r", "t"))
    return (
        gateway_config(upstream.port)
        + f"auth:\n  enabled: true\n  keys:\n{keys}"
        + "tiers:\n  r: {rpm: 2}\n  t: {tpm: 200}\n"
        + f"admin:\n  api_key: {ADMIN}\n"
    )


def test_limiter_decisions_by_limit_kind(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    # one worker: local limits are per worker, so the counts below are exact
    with run_gateway(tmp_path, mock_upstream, config_text=_limits_config(mock_upstream)) as g:
        statuses = [
            request(g.port, "POST", "/v1/chat/completions", chat(), {"authorization": f"Bearer {KEY}-r"})[0]
            for _ in range(5)
        ]
        assert statuses == [200, 200, 429, 429, 429]
        small, big = chat(max_tokens=8), chat(max_tokens=5000)
        assert (
            request(g.port, "POST", "/v1/chat/completions", small, {"authorization": f"Bearer {KEY}-t"})[0]
            == 200
        )
        assert (
            request(g.port, "POST", "/v1/chat/completions", big, {"authorization": f"Bearer {KEY}-t"})[0]
            == 429
        )
        samples = parse(scrape(g.port)[2])
    name = "fastpath_limiter_decisions_total"
    assert total(samples, name, decision="allowed", limit="none") == 3
    assert total(samples, name, decision="refused", limit="rpm") == 3
    assert total(samples, name, decision="refused", limit="tpm") == 1
    assert total(samples, name, decision="refused") == 4
    assert total(samples, name) == 7


def test_pool_channel_and_deployment_gauges(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    silent = socket.socket()  # a gRPC upstream that accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    tri = f"  - {{name: tri, kind: triton, base_url: 'grpc://127.0.0.1:{silent.getsockname()[1]}'}}\n"
    text = (
        config(mock_upstream)
        .replace("providers:\n", "providers:\n" + tri)
        .replace("models:\n", "models:\n  - {name: llm, provider: tri, upstream_model: ensemble}\n")
    )
    try:
        with run_gateway(tmp_path, mock_upstream, config_text=text) as g:
            samples = parse(scrape(g.port)[2])
            state = "fastpath_upstream_channel_state"
            # before any call: idle (one worker), and only one state is 1
            assert total(samples, state, provider="tri", state="idle") == 1
            assert total(samples, state, provider="tri") == 1
            assert total(samples, "fastpath_deployment_up", gen_ai_request_model="echo") == 1
            assert total(samples, "fastpath_deployment_up", gen_ai_request_model="llm") == 1
            assert request(g.port, "POST", "/v1/chat/completions", chat(), AUTH)[0] == 200
            # a call to the silent upstream: connected, waiting; the client gives up first
            conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=1.5)
            body = json.dumps(chat("llm")).encode()
            conn.request("POST", "/v1/chat/completions", body, {**AUTH, "content-type": "application/json"})
            with pytest.raises(TimeoutError):
                conn.getresponse()
            conn.close()
            samples = parse(scrape(g.port)[2])
            assert total(samples, state, provider="tri", state="ready") == 1
            assert total(samples, state, provider="tri") == 1
            assert total(samples, "fastpath_upstream_pool_idle_connections", provider="mock") >= 1
    finally:
        silent.close()


def test_403_without_admin_key_and_open_when_not_required(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    with run_gateway(tmp_path, mock_upstream, config_text=config(mock_upstream, admin=False)) as g:
        assert request(g.port, "GET", "/metrics")[0] == 403
    text = config(mock_upstream, admin=False, metrics="metrics:\n  require_admin: false\n")
    with run_gateway(tmp_path, mock_upstream, config_text=text) as g:
        status, _, body = request(g.port, "GET", "/metrics")
        assert status == 200 and b"fastpath_requests_in_flight" in body


def test_config_validation() -> None:
    base = "providers: [{name: m, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: a, provider: m}]\n"
    for bad, where in (
        ("metrics: {max_series: 0}", "$.metrics.max_series"),
        ("metrics: {latency_buckets: [1.0, 0.5]}", "$.metrics.latency_buckets"),
        ("metrics: {listen: 'nohost'}", "$.metrics.listen"),
    ):
        with pytest.raises(config_mod.ConfigError, match=re.escape(where)):
            config_mod.parse(base + bad + "\n")


# ---- in process: cardinality --------------------------------------------------------------------
class _Adapter:
    name = "mock"


class _Route:
    name = "echo"
    upstream_model = "mock-echo"
    adapter = _Adapter()


def _cfg(extra: str = "") -> config_mod.Config:
    base = "providers: [{name: mock, base_url: 'http://127.0.0.1:1/v1'}]\n"
    base += "models: [{name: echo, provider: mock}]\n"
    return config_mod.parse(base + extra)


_observers: list[MetricsObserver] = []


def observer(cfg: config_mod.Config, d: Path) -> MetricsObserver:
    obs = MetricsObserver(cfg, d)
    _observers.append(obs)
    return obs


@pytest.fixture(autouse=True)
def _close_observers() -> Iterator[None]:
    yield
    while _observers:
        _observers.pop().shard.close()


def collect_now(obs: MetricsObserver) -> Any:
    obs.publish()  # what the publish timer does every `publish_interval_ms`
    return collect(obs.dir, obs.fams)


def _ctx(key_id: str, team: str = "t") -> RequestContext:
    ctx = RequestContext("r", Endpoint.CHAT, b"", time.perf_counter_ns() - 5_000_000, None)
    ctx.route = _Route()  # type: ignore[assignment]
    ctx.principal = Principal(key_id, b"", team, "default", TierConfig(), None, math.inf, False)
    ctx.usage = Usage(10, 20, 30)
    ctx.timings = {"decode": 10_000, "auth": 5_000, "route": 2_000, "upstream": 4_000_000, "total": 5_000_000}
    return ctx


def test_ten_thousand_keys_do_not_grow_the_series(tmp_path: Path) -> None:
    obs = observer(_cfg(), tmp_path / "a")
    ok = Outcome(200, None)
    obs.on_done(_ctx("k0"), ok)
    series = obs.shard.series
    for i in range(10_000):
        obs.on_done(_ctx(f"key-{i}"), ok)
    assert obs.shard.series == series
    text = render(collect_now(obs), obs.fams).decode()
    assert total(parse(text), "fastpath_requests_total") == 10_001
    assert "key-" not in text


def test_per_key_labels_are_capped(tmp_path: Path) -> None:
    cfg = _cfg("metrics: {per_key_labels: true, max_keys: 5, max_teams: 3}\n")
    obs = observer(cfg, tmp_path / "b")
    for i in range(2_000):
        obs.on_done(_ctx(f"key-{i}", team=f"team-{i % 50}"), Outcome(200, None))
    text = render(collect_now(obs), obs.fams).decode()
    keys = {lb["key"] for n, lb, _ in parse(text) if n == "fastpath_tokens_total"}
    teams = {lb["team"] for n, lb, _ in parse(text) if n == "fastpath_tokens_total"}
    assert len(keys - {"__other__"}) == 5 and "__other__" in keys
    assert len(teams - {"__other__"}) == 3
    assert total(parse(text), "fastpath_tokens_total", type="output") == 2_000 * 20


def test_max_series_caps_a_worker(tmp_path: Path) -> None:
    obs = observer(_cfg("metrics: {max_series: 40, max_teams: 100000}\n"), tmp_path / "c")
    for i in range(500):
        obs.on_done(_ctx("k", team=f"team-{i}"), Outcome(200, None))
    assert obs.shard.series <= 41 + 5  # the cap, plus the all-`__other__` series
    text = render(collect_now(obs), obs.fams).decode()
    assert total(parse(text), "fastpath_tokens_total", type="input") == 500 * 10


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    d = tmp_path / "d"
    obs = observer(_cfg(), d)
    obs.on_done(_ctx("k"), Outcome(200, None))
    obs.v[obs.inflight] = 3.0
    # a copy of the shard under a pid that no longer exists: a worker that exited
    dead = 2**22 + 12345
    obs.publish()
    (d / f"{dead}.shard").write_bytes((d / obs.shard.path.name).read_bytes())
    (d / f"{dead}.series").write_text((d / obs.shard.path.with_suffix(".series").name).read_text())
    obs.publish()
    samples = parse(render(collect(d, obs.fams), obs.fams).decode())
    assert total(samples, "fastpath_requests_total") == 2
    assert total(samples, "fastpath_requests_in_flight") == 3


def test_struct_defaults() -> None:
    m = _cfg().metrics
    assert m.enabled and m.require_admin and not m.per_key_labels and not m.listen
    assert msgspec.structs.asdict(m)["max_series"] == 10_000
