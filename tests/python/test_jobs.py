"""Async requests and the Redis job queue (issue 16): real Redis, real gateway processes, the
mock upstream; and a property test of the state machine's Lua scripts."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, Gateway, MockUpstream, gateway_config, redis_or_skip, run_gateway

KEY = "sk-jobs-test-key-000001"
OTHER = "sk-jobs-test-key-000002"
ADMIN = "sk-jobs-admin-key-00000000000000001"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello jobs"}]}


def _config(upstream: MockUpstream, prefix: str, **jobs: object) -> str:
    text = gateway_config(upstream.port)
    lines = [
        "auth:",
        "  enabled: true",
        "  salt: jobs-test-salt-0000",
        "  keys:",
        f"    - {{id: alice, key: {KEY}, team: red}}",
        f"    - {{id: bob, key: {OTHER}, team: blue}}",
        "admin:",
        f"  api_key: {ADMIN}",
        "jobs:",
        "  enabled: true",
        f"  redis_url: {REDIS_URL}",
        f"  prefix: {prefix}",
    ]
    settings: dict[str, object] = {"visibility_timeout_ms": 2000, "retention_s": 60} | jobs
    workers = settings.pop("workers", None)
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    if workers is not None:
        lines += ["  workers:", f"    concurrency: {workers}"]
    return text + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def redis() -> Any:
    client = redis_or_skip()
    yield client
    client.close()


@contextlib.contextmanager
def jobs_gateway(tmp: Path, upstream: MockUpstream, prefix: str, **jobs: object) -> Iterator[Gateway]:
    with run_gateway(tmp, upstream, config_text=_config(upstream, prefix, **jobs)) as g:
        yield g


def call(
    g: Gateway, method: str, path: str, body: object = None, key: str = KEY, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    h = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    conn.request(method, path, json.dumps(body) if body is not None else None, h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def submit(g: Gateway, body: object, path: str = "/v1/chat/completions", **headers: str) -> str:
    status, head, data = call(g, "POST", path, body, prefer="respond-async", **headers)
    assert status == 202, data
    job = json.loads(data)
    assert job["object"] == "job" and job["id"].startswith("job_")
    assert head["location"] == job["status_url"] == f"/v1/jobs/{job['id']}"
    return str(job["id"])


def wait_job(g: Gateway, job_id: str, until: tuple[str, ...], timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, _, data = call(g, "GET", f"/v1/jobs/{job_id}")
        assert status == 200, data
        job: dict[str, Any] = json.loads(data)
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def upstream_calls(upstream: MockUpstream, marker: str) -> int:
    return sum(marker in json.dumps(e) for e in upstream.events())


@pytest.fixture(scope="module")
def gw(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory, redis: Any
) -> Iterator[Gateway]:
    prefix = f"jobs-test-{uuid.uuid4().hex[:8]}"
    with jobs_gateway(tmp_path_factory.mktemp("jobs"), mock_upstream, prefix) as g:
        yield g
    for k in redis.scan_iter(f"{{{prefix}}}*"):
        redis.delete(k)


def test_submit_poll_complete_same_body_as_sync(gw: Gateway) -> None:
    status, _, sync_body = call(gw, "POST", "/v1/chat/completions", CHAT)
    assert status == 200
    job_id = submit(gw, CHAT)
    job = wait_job(gw, job_id, ("complete", "failed"))
    assert job["status"] == "complete", job
    assert job["response_status"] == 200 and job["attempts"] == 1
    sync, result = json.loads(sync_body), job["result"]
    for v in (sync, result):  # the ids and timestamps differ per call, the rest is the same
        v.pop("id"), v.pop("created")
    assert result == sync
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    # embeddings too
    emb = {"model": "echo", "input": "hi"}
    status, _, data = call(gw, "POST", "/v1/embeddings", emb, prefer="respond-async")
    assert status in (202, 400), data


def test_refused_at_submit_gets_the_sync_error(gw: Gateway) -> None:
    status, _, data = call(
        gw, "POST", "/v1/chat/completions", CHAT, key="sk-wrong-key-000000", prefer="respond-async"
    )
    assert status == 401, data
    bad = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
    status, _, data = call(gw, "POST", "/v1/chat/completions", bad, prefer="respond-async")
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
    status, _, data = call(
        gw, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, prefer="respond-async"
    )
    assert status == 400 and json.loads(data)["error"]["param"] == "stream"


def test_only_the_submitter_sees_the_job(gw: Gateway) -> None:
    job_id = submit(gw, CHAT)
    assert call(gw, "GET", f"/v1/jobs/{job_id}", key=OTHER)[0] == 404
    assert call(gw, "DELETE", f"/v1/jobs/{job_id}", key=OTHER)[0] == 404
    assert call(gw, "GET", f"/v1/jobs/{job_id}", key=ADMIN)[0] == 200
    assert call(gw, "GET", "/v1/jobs/job_000000000000000000000000")[0] == 404
    wait_job(gw, job_id, ("complete",))


def test_idempotency_key_returns_the_same_job(gw: Gateway, mock_upstream: MockUpstream) -> None:
    marker = uuid.uuid4().hex
    body = {**CHAT, "messages": [{"role": "user", "content": marker}]}
    first = submit(gw, body, idempotency_key=marker)
    second = submit(gw, body, idempotency_key=marker)
    assert first == second
    wait_job(gw, first, ("complete",))
    assert submit(gw, body, idempotency_key=marker) == first
    other = {**CHAT, "messages": [{"role": "user", "content": "different"}]}
    status, _, data = call(
        gw, "POST", "/v1/chat/completions", other, prefer="respond-async", idempotency_key=marker
    )
    assert status == 400 and json.loads(data)["error"]["code"] == "idempotency_key_reused"
    assert upstream_calls(mock_upstream, marker) == 1


def test_cancel_pending_and_processing(mock_upstream: MockUpstream, tmp_path: Path, redis: Any) -> None:
    prefix = f"jobs-cancel-{uuid.uuid4().hex[:8]}"
    # concurrency 1: the slow job holds the only slot; the second stays pending
    with jobs_gateway(tmp_path, mock_upstream, prefix, workers=1) as g:
        slow = submit(g, {**CHAT, "mock": {"first_delay_ms": 3000}})
        wait_job(g, slow, ("processing",))
        pending = submit(g, CHAT)
        status, _, data = call(g, "DELETE", f"/v1/jobs/{pending}")
        assert status == 200 and json.loads(data)["status"] == "cancelled"
        t0 = time.monotonic()
        status, _, data = call(g, "DELETE", f"/v1/jobs/{slow}")
        assert json.loads(data)["status"] == "cancelled"
        # the slot comes back once the running call is aborted (not after the 3 s upstream delay)
        third = submit(g, CHAT)
        assert wait_job(g, third, ("complete",))["status"] == "complete"
        assert time.monotonic() - t0 < 2.5
        assert wait_job(g, pending, ("cancelled",))["result"] is None


def test_events_over_sse(gw: Gateway) -> None:
    job_id = submit(gw, {**CHAT, "mock": {"first_delay_ms": 300}})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", f"/v1/jobs/{job_id}/events", headers={"authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type", "").startswith("text/event-stream")
    events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    states = [json.loads(e)["status"] for e in events[:-1]]
    assert states[-1] == "complete" and states[0] in ("pending", "processing"), states


def test_deadline_times_out(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    prefix = f"jobs-deadline-{uuid.uuid4().hex[:8]}"
    with jobs_gateway(tmp_path, mock_upstream, prefix, deadline_s=1) as g:
        job_id = submit(g, {**CHAT, "mock": {"first_delay_ms": 4000}})
        job = wait_job(g, job_id, ("timeout", "complete", "failed"), timeout_s=6)
        assert job["status"] == "timeout", job
        assert job["error"]["error"]["code"] == "job_deadline_exceeded"


def test_max_attempts_fails_with_the_error(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    prefix = f"jobs-fail-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    with jobs_gateway(tmp_path, mock_upstream, prefix, max_attempts=2) as g:
        body = {**CHAT, "messages": [{"role": "user", "content": marker}], "mock": {"status": 503}}
        job = wait_job(g, submit(g, body), ("failed", "complete"))
        assert job["status"] == "failed" and job["attempts"] == 2, job
        assert job["response_status"] >= 500 and job["error"]["error"]["message"]
        bad = {**CHAT, "mock": {"status": 400}}  # not retriable: failed at the first attempt
        job = wait_job(g, submit(g, bad), ("failed", "complete"))
        assert job["status"] == "failed" and job["attempts"] == 1, job


def test_worker_killed_mid_job_is_redelivered_once(
    mock_upstream: MockUpstream, tmp_path: Path, redis: Any
) -> None:
    prefix = f"jobs-kill-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex
    body = {**CHAT, "messages": [{"role": "user", "content": marker}], "mock": {"first_delay_ms": 1500}}
    with jobs_gateway(tmp_path, mock_upstream, prefix) as g:
        job_id = submit(g, body)
        wait_job(g, job_id, ("processing",))
        deadline = time.monotonic() + 5
        while upstream_calls(mock_upstream, marker) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # the whole gateway: its master and workers (no graceful anything)
        for pid in _tree(g.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        g.proc.wait()
    with jobs_gateway(tmp_path, mock_upstream, prefix) as g2:
        job = wait_job(g2, job_id, ("complete", "failed"), timeout_s=15)
        assert job["status"] == "complete" and job["attempts"] == 2, job
    assert upstream_calls(mock_upstream, marker) == 2  # the lost call and the one that completed
    assert redis.hget(f"{{{prefix}}}:job:{job_id}", "state") == b"complete"


def _tree(pid: int) -> list[int]:
    out = [pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out += _tree(int(p.name))
    return out


# ---- the state machine: random interleavings against the real Lua scripts ---------------------

_LEGAL: dict[str, set[str | None]] = {
    "pending": {"pending", "processing", "cancelled", "timeout", "failed"},
    "processing": {"processing", "pending", "complete", "failed", "timeout", "cancelled"},
    "complete": {"complete", "closed"},
    "failed": {"failed", "closed"},
    "timeout": {"timeout", "closed"},
    "cancelled": {"cancelled", "closed"},
    "closed": {"closed", None},
}


async def _interleavings(seed: int, steps: int) -> dict[str, int]:
    import random

    from gateway.config_jobs import JobsConfig
    from gateway.jobs.queue import STATES, Claimed, JobQueue
    from gateway.redis_resp import Redis

    rnd = random.Random(seed)
    client = Redis(REDIS_URL, timeout_s=5, connect_timeout_s=5)
    cfg = JobsConfig(
        prefix=f"jobs-prop-{seed}-{uuid.uuid4().hex[:6]}",
        visibility_timeout_ms=1000,
        max_attempts=3,
        deadline_s=8,
        retention_s=5,
    )
    q = JobQueue(client, cfg)
    await q.ensure_group()
    now = 1_000_000_000
    workers: dict[str, dict[str, Claimed]] = {f"w{i}": {} for i in range(4)}
    known: dict[str, str | None] = {}  # job -> last state seen
    attempts: dict[str, int] = {}
    completed: dict[str, int] = {}  # job -> successful completes
    results: dict[str, bytes] = {}
    seen: dict[str, int] = {}

    async def check(job_id: str) -> None:
        h = await q.get(job_id)
        state = h["state"].decode() if h else None
        prev = known[job_id]
        assert prev is None or state in _LEGAL[prev], (job_id, prev, state)
        if h is None:
            known[job_id] = None
            return
        assert state in STATES
        n = int(h["attempts"])
        assert attempts.get(job_id, 0) <= n <= cfg.max_attempts, (job_id, n)
        attempts[job_id] = n
        token, entry = h.get("lease_token", b""), h.get("entry", b"")
        assert bool(token) is (state == "processing"), (state, token)
        if state in ("pending", "processing"):
            assert entry and await client.execute("XRANGE", q.stream, entry, entry), (job_id, state)
        else:
            assert not entry
        if state == "complete":
            assert completed.get(job_id) == 1 and h["result"] == results[job_id]
        else:
            assert "result" not in h or state == "closed"
        if state == "closed":
            assert "result" not in h and "body" not in h
        known[job_id] = state
        seen[state] = seen.get(state, 0) + 1

    for _ in range(steps):
        op = rnd.choices(
            [
                "submit",
                "deliver",
                "redeliver",
                "beat",
                "complete",
                "fail",
                "timeout",
                "cancel",
                "die",
                "tick",
                "close",
            ],
            [8, 10, 5, 6, 8, 5, 3, 3, 2, 8, 2],
        )[0]
        w = rnd.choice(list(workers))
        held = workers[w]
        touched: list[str] = []
        if op == "submit":
            idem = rnd.choice([None, None, "a", "b", "c"])
            body = b'{"n":%d}' % rnd.randrange(3) if idem else b'{"n":0}'
            try:
                _, job_id = await q.submit(
                    endpoint="/v1/chat/completions",
                    body=body,
                    owner="k",
                    team="t",
                    principal=b"",
                    headers=b"[]",
                    request_id="r",
                    idempotency_key=idem,
                    now_ms=now,
                )
            except ValueError:  # the key reused with another body
                continue
            known.setdefault(job_id, None)
            touched.append(job_id)
        elif op in ("deliver", "redeliver"):
            got = await (q.read(w, 2, None) if op == "deliver" else q.autoclaim(w, 2, min_idle_ms=0))
            for entry, job_id in got:
                token = uuid.uuid4().hex
                c = await q.claim(entry, job_id, token, w, now_ms=now)
                if isinstance(c, Claimed):
                    for other in workers.values():  # a takeover: the old holder is stale now
                        assert job_id not in other or other is held or other[job_id].token != token
                    held[job_id] = c
                touched.append(job_id)
        elif held:
            job_id = rnd.choice(list(held))
            c = held[job_id]
            touched.append(job_id)
            if op == "beat":
                if await q.heartbeat(job_id, c.token, w, now_ms=now) != "ok":
                    held.pop(job_id)
            elif op == "complete":
                result = b'{"r":"%s"}' % uuid.uuid4().hex.encode()
                if await q.complete(job_id, c.token, 200, result, now_ms=now):
                    completed[job_id] = completed.get(job_id, 0) + 1
                    assert completed[job_id] == 1, f"two results for {job_id}"
                    results[job_id] = result
                else:  # cancelled, timed out, or taken over meanwhile: the write is refused
                    seen["stale_write"] = seen.get("stale_write", 0) + 1
                held.pop(job_id)
            elif op == "fail":
                await q.fail(job_id, c.token, 503, b'{"error":{}}', rnd.random() < 0.7, now_ms=now)
                held.pop(job_id)
            elif op == "timeout":
                await q.timeout(job_id, c.token if rnd.random() < 0.5 else "", now_ms=now)
            elif op == "cancel":
                await q.cancel(job_id, now_ms=now)
            elif op == "die":
                held.clear()
        elif op == "cancel" and known:
            job_id = rnd.choice(list(known))
            await q.cancel(job_id, now_ms=now)
            touched.append(job_id)
        if op == "tick":
            now += rnd.randrange(0, 1500)
        elif op == "close":
            await q.close_due(now_ms=now)
            touched += list(known)
        for job_id in touched:
            await check(job_id)
    for job_id in known:
        await check(job_id)
    await client.execute("DEL", q.stream, q.closing)
    for job_id in known:
        await client.execute("DEL", q.job_key(job_id))
    await client.close()
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_state_machine_random_interleavings(redis: Any, seed: int) -> None:
    """Submit / claim / redeliver / heartbeat / finish / fail / timeout / cancel / worker death /
    time passing / closing, in random order against the real scripts: every observed change is
    a legal transition, and no job ever gets two results."""
    seen = asyncio.run(_interleavings(seed, 5000))
    states = {"pending", "processing", "complete", "failed", "timeout", "cancelled", "closed"}
    assert states | {"stale_write"} <= set(seen), seen


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "error"),
    [
        ("{enabled: true, prefix: 'a b'}", "$.jobs.prefix"),
        ("{visibility_timeout_ms: 10}", "$.jobs.visibility_timeout_ms"),
        ("{max_attempts: 0}", "$.jobs.max_attempts"),
        ("{redis_url: 'http://x'}", "$.jobs.redis_url"),
        ("{workers: {concurrency: -1}}", "$.jobs.workers.concurrency"),
        ("{workers: {threads: 2}}", "jobs.workers"),
    ],
)
def test_config_errors_name_their_path(jobs: str, error: str) -> None:
    from gateway import config as config_mod

    text = gateway_config(1) + f"jobs: {jobs}\n"
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse(text, "<test>")
    assert error in str(info.value)
    cfg = config_mod.parse(gateway_config(1), "<test>")
    assert not cfg.jobs.enabled and cfg.jobs.workers.concurrency == 4


def test_standalone_worker_runs_jobs_of_an_accept_only_gateway(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from conftest import stop

    prefix = f"jobs-standalone-{uuid.uuid4().hex[:8]}"
    with jobs_gateway(tmp_path, mock_upstream, prefix, workers=0) as g:
        job_id = submit(g, CHAT)
        time.sleep(0.3)
        assert wait_job(g, job_id, ("pending",))["attempts"] == 0  # nobody here runs jobs
        cfg = tmp_path / "worker.yaml"
        cfg.write_text(_config(mock_upstream, prefix, workers=2))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--config", str(cfg)], env=env
        )
        try:
            assert wait_job(g, job_id, ("complete", "failed"))["status"] == "complete"
        finally:
            assert stop(proc) == 0
