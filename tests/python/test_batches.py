"""The OpenAI Batch API (issue 16 item 3): the official `openai` SDK's `files` and `batches`
against a real gateway, real Redis and the mock upstream; the multipart and JSONL parsers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import (
    ENGINE,
    REDIS_URL,
    Gateway,
    MockUpstream,
    gateway_config,
    redis_or_skip,
    run_gateway,
    stop,
)

from gateway.batches import jsonl, multipart

KEY = "sk-batch-test-key-000001"
TEAMMATE = "sk-batch-test-key-000002"
OTHER = "sk-batch-test-key-000003"
ADMIN = "sk-batch-admin-key-0000000000000001"


def _config(upstream: MockUpstream, tmp: Path, prefix: str, **batches: object) -> str:
    server = batches.pop("server", {})
    assert isinstance(server, dict)
    lines = [
        "auth:",
        "  enabled: true",
        "  salt: batch-test-salt-0000",
        "  keys:",
        f"    - {{id: alice, key: {KEY}, team: red}}",
        f"    - {{id: carol, key: {TEAMMATE}, team: red}}",
        f"    - {{id: bob, key: {OTHER}, team: blue}}",
        "admin:",
        f"  api_key: {ADMIN}",
        "jobs:",
        "  enabled: true",
        f"  redis_url: {REDIS_URL}",
        f"  prefix: {prefix}",
        "  visibility_timeout_ms: 2000",
        "storage:",
        f"  dir: {tmp / 'objects'}",
        "batches:",
        "  enabled: true",
    ]
    workers = batches.pop("workers", None)
    lines += [f"  {k}: {v}" for k, v in batches.items()]
    if isinstance(workers, dict):
        lines += ["  workers:", *(f"    {k}: {v}" for k, v in workers.items())]
    return gateway_config(upstream.port, **server) + "\n".join(lines) + "\n"


@contextlib.contextmanager
def batch_gateway(
    tmp: Path, upstream: MockUpstream, prefix: str | None = None, **batches: object
) -> Iterator[Gateway]:
    redis_or_skip().close()
    prefix = prefix or "test-batches-" + uuid.uuid4().hex[:8]
    with run_gateway(tmp, upstream, config_text=_config(upstream, tmp, prefix, **batches)) as g:
        yield g


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with batch_gateway(
        tmp_path_factory.mktemp("batches"),
        mock_upstream,
        workers={"lines": 4},
        max_file_bytes=256 * 1024,
        server={"max_body_bytes": 128 * 1024},
    ) as g:
        yield g


def client(g: Gateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=20)


def request(custom_id: str, content: str = "hi", model: str = "echo", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def wait_batch(c: openai.OpenAI, batch_id: str, states: set[str], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in states:
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.1)


def read_lines(c: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in c.files.content(file_id).content.splitlines()]


def test_batch_end_to_end_with_failing_lines(gw: Gateway) -> None:
    c = client(gw)
    rows = [request(f"ok-{i}", f"line {i}") for i in range(24)]
    rows.insert(5, request("no-model", model="no-such-model"))
    rows.insert(11, request("upstream-400", mock={"status": 400}))
    rows.insert(17, request("no-model-2", model="no-such-model"))
    data = jsonl_bytes(rows)
    f = c.files.create(file=("input.jsonl", data), purpose="batch")
    assert (f.object, f.purpose, f.bytes, f.filename, f.status) == (
        "file",
        "batch",
        len(data),
        "input.jsonl",
        "processed",
    )
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).content == data
    assert f.id in [x.id for x in c.files.list(purpose="batch")]

    b = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "e2e"}
    )
    assert (b.object, b.status, b.input_file_id, b.endpoint) == (
        "batch",
        "validating",
        f.id,
        "/v1/chat/completions",
    )
    assert b.metadata == {"run": "e2e"}
    assert b.expires_at is not None and b.expires_at - b.created_at == 86_400
    done = wait_batch(c, b.id, {"completed", "failed", "expired", "cancelled"})
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        27,
        24,
        3,
    )
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.output_file_id and done.error_file_id

    out = read_lines(c, done.output_file_id)
    assert [r["custom_id"] for r in out] == [f"ok-{i}" for i in range(24)]  # input order
    for i, r in enumerate(out):
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "mock-echo"
        assert f"line {i}" in body["choices"][0]["message"]["content"]
    errors = read_lines(c, done.error_file_id)
    assert [r["custom_id"] for r in errors] == ["no-model", "upstream-400", "no-model-2"]
    assert [r["response"]["status_code"] for r in errors] == [404, 400, 404]
    assert all("error" in r["response"]["body"] for r in errors)
    out_file = c.files.retrieve(done.output_file_id)
    assert (out_file.purpose, out_file.filename) == ("batch_output", f"{b.id}_output.jsonl")
    assert b.id in [x.id for x in c.batches.list(limit=100)]
    outputs = [x.id for x in c.files.list(purpose="batch_output")]
    assert done.output_file_id in outputs and done.error_file_id in outputs and f.id not in outputs

    deleted = c.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True)
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)


@pytest.mark.parametrize(
    ("rows", "line", "what"),
    [
        ([request("a"), request("b"), "not json"], 3, "not a JSON object"),
        ([request("a"), request("a")], 2, "duplicate `custom_id`"),
        ([request("a"), {**request("b"), "url": "/v1/images/generations"}], 2, "`url` must be one of"),
        ([{**request("a"), "method": "GET"}], 1, "`method` must be POST"),
        ([{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}], 1, "not a batch request"),
        ([request("a"), {**request("b"), "body": [1]}], 2, "`body` must be a JSON object"),
        ([request("a", stream=True)], 1, "`body.stream: true` is not supported"),
    ],
)
def test_invalid_jsonl_is_refused_with_its_line(gw: Gateway, rows: list[Any], line: int, what: str) -> None:
    data = b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows)
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).files.create(file=("bad.jsonl", data), purpose="batch")
    body = err.value.body
    assert isinstance(body, dict)
    assert body["code"] == "invalid_jsonl" and body["param"] == "file"
    assert f"line {line}: {what}" in body["message"]


def test_bad_requests(gw: Gateway) -> None:
    c = client(gw)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("x.jsonl", jsonl_bytes([request("a")])), purpose="fine-tune")
    f = c.files.create(file=("x.jsonl", jsonl_bytes([request("a")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        c.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="No file"):
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    # a line whose url is not the batch's endpoint: the batch fails validation, naming the line
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    failed = wait_batch(c, b.id, {"failed", "completed"})
    assert failed.status == "failed" and failed.failed_at
    assert failed.errors is not None and failed.errors.data
    assert (failed.errors.data[0].code, failed.errors.data[0].line) == ("invalid_url", 1)
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-not-a-key").files.list()


def test_upload_limits(gw: Gateway) -> None:
    """`batches.max_file_bytes`: the upload's own limit (above `server.max_body_bytes` here)."""
    c = client(gw)
    line = json.dumps(request("x" * 40, "y" * 900)).encode()
    big = b"".join(line.replace(b"x" * 40, b"%040d" % i) + b"\n" for i in range(400))  # ~380 KiB
    with pytest.raises(openai.APIStatusError, match="larger than") as err:
        c.files.create(file=("big.jsonl", big), purpose="batch")
    assert err.value.status_code == 413
    # over the server's body limit, under the file's: granian reads it whole; the uvloop engine
    # keeps what arrived up to the read that crossed the limit (all of it, or a cut body): a
    # whole file or a 413 naming the limit, never a 400 about a cut multipart body
    mid = big[: 200 * len(big) // 400]
    try:
        assert c.files.create(file=("mid.jsonl", mid), purpose="batch").bytes == len(mid)
    except openai.APIStatusError as exc:
        assert ENGINE == "uvloop" and exc.status_code == 413, exc
        assert "server.max_body_bytes" in exc.message


def test_another_key_cannot_see_the_batch(gw: Gateway) -> None:
    c = client(gw)
    f = c.files.create(file=("mine.jsonl", jsonl_bytes([request("a"), request("b")])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    outsider = client(gw, OTHER)
    with pytest.raises(openai.NotFoundError):
        outsider.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        outsider.batches.cancel(b.id)
    with pytest.raises(openai.NotFoundError):
        outsider.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        outsider.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        outsider.files.delete(f.id)
    with pytest.raises(openai.BadRequestError, match="No file"):
        outsider.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.id not in [x.id for x in outsider.batches.list(limit=100)]
    assert f.id not in [x.id for x in outsider.files.list()]
    # the same team sees it; so does the admin
    assert client(gw, TEAMMATE).batches.retrieve(b.id).id == b.id
    assert b.id in [x.id for x in client(gw, ADMIN).batches.list(limit=100)]
    done = wait_batch(c, b.id, {"completed"})
    assert done.output_file_id is not None
    with pytest.raises(openai.NotFoundError):
        outsider.files.content(done.output_file_id)


def test_list_pagination(gw: Gateway) -> None:
    c = client(gw, TEAMMATE)
    f = c.files.create(file=("p.jsonl", jsonl_bytes([request("a")])), purpose="batch")
    made = [
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = c.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0]
    seen = [b.id for b in c.batches.list(limit=2)]  # the SDK's auto-pagination follows `after`
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))


def test_cancel_mid_batch(gw: Gateway) -> None:
    c = client(gw)
    rows = [request(f"slow-{i}", mock={"first_delay_ms": 250}) for i in range(40)]
    f = c.files.create(file=("slow.jsonl", jsonl_bytes(rows)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while (
        c.batches.retrieve(b.id).request_counts
        or openai.types.BatchRequestCounts(completed=0, failed=0, total=0)
    ).completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(c, b.id, {"cancelled", "completed"})
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and 4 <= counts.completed < 40 and counts.failed == 0
    assert done.output_file_id is not None and done.error_file_id is None
    out = read_lines(c, done.output_file_id)
    assert len(out) == counts.completed
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert c.batches.cancel(b.id).status == "cancelled"  # cancelling a final batch changes nothing


def test_completion_window_expires_unfinished_lines(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    with batch_gateway(tmp_path, mock_upstream, completion_window_s=2, workers={"lines": 1}) as g:
        c = client(g)
        rows = [request(f"r-{i}", mock={"first_delay_ms": 300}) for i in range(20)]
        f = c.files.create(file=("w.jsonl", jsonl_bytes(rows)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = wait_batch(c, b.id, {"expired", "completed"}, timeout_s=30)
        assert done.status == "expired" and done.expired_at
        counts = done.request_counts
        assert counts is not None and counts.total == 20 and counts.completed + counts.failed == 20
        assert 0 < counts.completed < 20
        errors = read_lines(c, done.error_file_id or "")
        assert {r["error"]["code"] for r in errors} == {"batch_expired"}
        assert all(r["response"] is None for r in errors)
        ok = {r["custom_id"] for r in read_lines(c, done.output_file_id or "")}
        assert ok.isdisjoint(r["custom_id"] for r in errors) and len(ok) + len(errors) == 20


def test_a_worker_stopped_or_killed_mid_batch_is_resumed_by_another(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    """An accept-only gateway and `fastpath-gateway worker`s: one stopped (SIGTERM) mid-batch
    exits at once, leaving the batch in progress; the next is SIGKILLed mid-batch; after the
    visibility timeout a third resumes and finishes it: every line exactly one outcome."""
    prefix = "test-batches-" + uuid.uuid4().hex[:8]
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(_config(mock_upstream, tmp_path, prefix, workers={"concurrency": 1, "lines": 2}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    worker = [sys.executable, "-m", "gateway.cli", "worker", "--config", str(cfg)]
    with batch_gateway(tmp_path, mock_upstream, prefix, workers={"concurrency": 0}) as g:
        c = client(g)
        rows = [request(f"k-{i}", mock={"first_delay_ms": 150}) for i in range(30)]
        f = c.files.create(file=("k.jsonl", jsonl_bytes(rows)), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        for at_least, end in ((4, "stop"), (10, "kill")):
            proc = subprocess.Popen(worker, env=env)
            try:
                deadline = time.monotonic() + 30
                while _completed(c, b.id) < at_least:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                before = _completed(c, b.id)
            finally:
                if end == "stop":
                    assert stop(proc, timeout_s=8) == 0
                else:
                    proc.kill()
                    proc.wait(10)
            left = c.batches.retrieve(b.id)
            assert left.status == "in_progress" and left.request_counts is not None
            if end == "stop":  # the 2 lines in flight finish (2 more may start before the signal)
                assert left.request_counts.completed <= before + 4
        last = subprocess.Popen(worker, env=env)
        try:
            done = wait_batch(c, b.id, {"completed", "failed", "expired", "cancelled"})
        finally:
            assert stop(last) == 0
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (30, 0)
        out = read_lines(c, done.output_file_id or "")
        assert [r["custom_id"] for r in out] == [f"k-{i}" for i in range(30)]


def _completed(c: openai.OpenAI, batch_id: str) -> int:
    counts = c.batches.retrieve(batch_id).request_counts
    return counts.completed if counts is not None else 0


def test_object_store_down_then_back(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """The store unusable (its directory is a file): uploads answer 503, nothing half-made;
    back: the same upload works and its batch runs."""
    with batch_gateway(tmp_path, mock_upstream) as g:
        (tmp_path / "objects").write_bytes(b"not a directory")
        c = client(g)
        data = jsonl_bytes([request("a"), request("b")])
        with pytest.raises(openai.InternalServerError) as err:
            c.files.create(file=("a.jsonl", data), purpose="batch")
        assert err.value.status_code == 503
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "batch_store_unavailable"
        assert list(c.files.list()) == []  # no metadata without its bytes
        (tmp_path / "objects").unlink()
        f = c.files.create(file=("a.jsonl", data), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_batch(c, b.id, {"completed", "failed"}).status == "completed"


# ---- the parsers, without a gateway -------------------------------------------------------------
def test_multipart_parse() -> None:
    body = (
        b'preamble\r\n--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a \\"q\\".jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\nline1\r\n--XyZ-ish\nline2\r\n--XyZ--\r\nepilogue"
    )
    form = multipart.parse(body, 'multipart/form-data; boundary="XyZ"')
    assert form["purpose"].data == b"batch" and form["purpose"].filename is None
    assert form["file"].filename == 'a "q".jsonl' and form["file"].content_type == "application/jsonl"
    assert form["file"].data == b"line1\r\n--XyZ-ish\nline2"
    for bad in (b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nx', b"no boundary here"):
        with pytest.raises(ValueError):
            multipart.parse(bad, "multipart/form-data; boundary=XyZ")
    with pytest.raises(ValueError, match="multipart/form-data"):
        multipart.boundary_of("application/json")


def test_jsonl_parse_skips_blank_lines_and_counts_physical_lines() -> None:
    data = b"\n" + json.dumps(request("a")).encode() + b"\n\n" + json.dumps(request("b")).encode()
    parsed = jsonl.parse(data, 10)
    assert [(n, ln.custom_id) for n, ln in parsed] == [(2, "a"), (4, "b")]
    with pytest.raises(jsonl.LineError, match="line 4: the file has more than 1 requests"):
        jsonl.parse(data, 1)
    with pytest.raises(jsonl.LineError, match="no requests"):
        jsonl.parse(b"\n\n", 10)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("batches: {enabled: true}", "set jobs.enabled: true too"),
        ("jobs: {enabled: true}\nbatches: {enabled: true, max_lines: 0}", "max_lines: must be > 0"),
        ("batches: {workers: {lines: 0}}", "workers.lines: must be >= 1"),
        ("batches: {max_deliveries: 0}", "max_deliveries: must be > 0"),
        ("batches: {workers: {yield_at: -1}}", "workers.yield_at: must be >= 0"),
        ("batches: {nope: 1}", "nope"),
    ],
)
def test_config_is_validated(section: str, message: str) -> None:
    from gateway.config import ConfigError, parse

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(gateway_config(1) + section + "\n")


def test_visibility_rules() -> None:
    from gateway.batches.store import caller_scope, scopes, visible

    mine = {"owner": b"alice", "team": b"red"}
    assert visible(mine, ("alice", "")) and visible(mine, ("carol", "red")) and visible(mine, None)
    assert not visible(mine, ("bob", "blue")) and not visible({"owner": b"alice", "team": b""}, ("carol", ""))
    # each list reads one sorted set, and the object is indexed in the one its reader reads
    assert caller_scope(("alice", "red")) in scopes("alice", "red")
    assert caller_scope(("dave", "")) in scopes("dave", "")
    assert caller_scope(None) == "all" and caller_scope(("", "")) == "all"  # admin; auth off
    assert visible({"owner": b"", "team": b""}, ("", ""))
