"""Tracing over real sockets: a gateway exporting OTLP/HTTP to a receiver that decodes the
payloads with the official `opentelemetry-proto` messages, the mock upstream recording the
`traceparent` it was sent."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MockUpstream, free_port, gateway_config, run_gateway
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.trace.v1 import trace_pb2 as tr

from gateway.tracing import parse_traceparent


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []
        #: the payloads as received (for the secret grep)
        self.raw: list[bytes] = []
        self.port = free_port()
        spans, resources, raw = self.spans, self.resources, self.raw

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                raw.append(body)
                assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
                req = tsvc.ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                out = tsvc.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of(self, trace_id: str, timeout_s: float = 10.0, least: int = 1) -> list[Any]:
        want = bytes.fromhex(trace_id)
        deadline = time.monotonic() + timeout_s
        while True:
            found = [s for s in self.spans if s.trace_id == want]
            if len(found) >= least or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def config(upstream: MockUpstream, receiver: Receiver, ratio: float = 1.0) -> str:
    return gateway_config(upstream.port) + (
        f"tracing: {{enabled: true, otlp_endpoint: 'http://127.0.0.1:{receiver.port}/v1/traces',"
        f" sample_ratio: {ratio}, flush_interval_ms: 100, service_name: gw-test}}\n"
    )


def post(port: int, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json", **headers}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def upstream_traceparent(upstream: MockUpstream, rid: str) -> str:
    for e in upstream.events():
        if e["event"] == "request" and e.get("headers", {}).get("x-request-id") == rid:
            return str(e["headers"]["traceparent"])
    raise AssertionError(f"no upstream request for {rid}")


@pytest.mark.parametrize("stream", [False, True])
def test_a_traced_request_is_a_tree_under_the_clients_parent(
    mock_upstream: MockUpstream, receiver: Receiver, tmp_path: Path, stream: bool
) -> None:
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    rid = f"trace-{trace_id[:8]}"
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    with run_gateway(tmp_path, mock_upstream, config_text=config(mock_upstream, receiver)) as gw:
        headers = {"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": rid}
        status, _ = post(gw.port, body, {**headers, "authorization": "Bearer sk-client-secret-0123456789"})
        assert status == 200
        spans = receiver.of(trace_id, least=5)
    by_kind = {}
    for s in spans:
        by_kind.setdefault(s.kind, []).append(s)
    (server,) = by_kind[tr.Span.SPAN_KIND_SERVER]
    assert server.parent_span_id.hex() == parent and server.name == "POST /v1/chat/completions"
    a = attrs(server)
    assert a["http.response.status_code"] == 200 and a["gen_ai.request.model"] == "echo"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["fastpath.request_id"] == rid
    assert ("gen_ai.server.time_to_first_token" in a) == stream
    stages = {s.name: s for s in by_kind[tr.Span.SPAN_KIND_INTERNAL]}
    assert {"stage trace", "stage decode", "stage route"} <= set(stages)
    assert all(s.parent_span_id == server.span_id for s in stages.values())
    assert all(server.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano for s in spans)
    (client,) = by_kind[tr.Span.SPAN_KIND_CLIENT]
    assert client.parent_span_id == server.span_id and client.name == "chat mock-echo"
    assert attrs(client)["gen_ai.system"] == "openai"
    # the upstream was sent the client span as its parent, in the same trace
    sent = parse_traceparent(upstream_traceparent(mock_upstream, rid))
    assert sent == (trace_id, client.span_id.hex(), True)
    assert receiver.resources[0]["service.name"] == "gw-test"
    # no secret in any span: the client's key, the upstream key (conftest's provider api_key)
    assert not any(
        b"sk-client-secret" in r or b"sk-upstream-secret" in r or b"Bearer" in r for r in receiver.raw
    )


def test_sampling_is_parent_based_and_a_sampled_out_request_exports_nothing(
    mock_upstream: MockUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    off_trace, on_trace = os.urandom(16).hex(), os.urandom(16).hex()
    # ratio 0: only a sampled parent is traced
    with run_gateway(tmp_path, mock_upstream, config_text=config(mock_upstream, receiver, ratio=0.0)) as gw:
        assert (
            post(
                gw.port,
                body,
                {"traceparent": f"00-{off_trace}-{os.urandom(8).hex()}-00", "x-request-id": "off"},
            )[0]
            == 200
        )
        assert post(gw.port, body, {"x-request-id": "no-parent"})[0] == 200
        assert post(gw.port, body, {"traceparent": f"00-{on_trace}-{os.urandom(8).hex()}-01"})[0] == 200
        assert receiver.of(on_trace, least=3)  # exported: so the earlier ones had their chance
        time.sleep(0.3)
    traced = {s.trace_id.hex() for s in receiver.spans}
    assert traced == {on_trace}
    # not sampled, still propagated (flags 00) with the trace id the client chose
    sent = parse_traceparent(upstream_traceparent(mock_upstream, "off"))
    assert sent is not None and sent[0] == off_trace and sent[2] is False
    # no parent, ratio 0: a fresh trace id goes upstream, unsampled
    fresh = parse_traceparent(upstream_traceparent(mock_upstream, "no-parent"))
    assert fresh is not None and fresh[2] is False and fresh[0] not in (off_trace, on_trace)


def test_an_unreachable_collector_costs_the_requests_nothing(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    dead = free_port()
    text = gateway_config(mock_upstream.port) + (
        f"tracing: {{enabled: true, otlp_endpoint: 'http://127.0.0.1:{dead}/v1/traces',"
        " flush_interval_ms: 50}\n"
    )
    log = tmp_path / "gw.log"
    with open(log, "wb") as out, run_gateway(tmp_path, mock_upstream, config_text=text, output=out) as gw:
        for _ in range(5):
            assert (
                post(gw.port, {"model": "echo", "messages": [{"role": "user", "content": "x"}]}, {})[0] == 200
            )
        time.sleep(0.5)
    assert "tracing: exporting" in log.read_text()


def test_a_parallel_groups_members_are_spans_side_by_side(
    mock_upstream: MockUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    """Two stages run together (pipeline/parallel.py): their spans start together, inside the
    group's own span `stage pre`, and the stages after it start after it."""
    ext = "".join(
        f"""  - {{kind: request_stage, factory: "parallel_parts:sleeper", options: {{name: {n}, ms: {ms}}}}}
"""
        for n, ms in (("slow_a", 100), ("slow_b", 50))
    )
    text = config(mock_upstream, receiver) + f"pipeline: {{parallel_stages: true}}\nextensions:\n{ext}"
    trace_id = os.urandom(16).hex()
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        status, _ = post(gw.port, body, {"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
        assert status == 200
        spans = receiver.of(trace_id, least=6)
    stages = {s.name: s for s in spans if s.kind == tr.Span.SPAN_KIND_INTERNAL}
    a, b, group = stages["stage slow_a"], stages["stage slow_b"], stages["stage pre"]
    assert a.start_time_unix_nano == b.start_time_unix_nano == group.start_time_unix_nano
    assert max(a.end_time_unix_nano, b.end_time_unix_nano) <= group.end_time_unix_nano
    (client,) = [s for s in spans if s.kind == tr.Span.SPAN_KIND_CLIENT]
    assert client.start_time_unix_nano >= group.end_time_unix_nano
