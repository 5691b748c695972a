"""The Responses API over a WebSocket (pipeline/ws.py over the uvloop engine's server/ws_conn.py,
and granian's): a real client (`websockets`) against a gateway in front of the mock upstream.
Many responses on one connection (chained by `previous_response_id`), the same events as the
SSE stream, auth on the upgrade, a 429 as an error event on a connection that stays usable,
1009 for a large message, back-pressure to the upstream, ping/pong, the close codes."""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway
from test_streaming import wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gateway.config import ConfigError, parse

KEY = "sk-websocket-alice-0123456789"
CAROL = "sk-websocket-carol-0123456789"
ADMIN = "adm-websocket-0123456789abcdef0123456789"
MAX_BODY = 256 * 1024
IDLE_MS = 4_000


def config(upstream: MockUpstream, tmp: Path, idle_ms: int = IDLE_MS, **server: object) -> str:
    return gateway_config(upstream.port, max_body_bytes=MAX_BODY, **server) + "\n".join(
        [
            "auth:",
            "  enabled: true",
            "  salt: websocket-test-salt-0000",
            "  keys:",
            f"    - {{id: alice, key: {KEY}, team: red, tier: ws}}",
            f"    - {{id: carol, key: {CAROL}, team: red, tier: ws}}",
            "admin:",
            f"  api_key: {ADMIN}",
            "ledger:",
            "  enabled: true",
            f"  path: {tmp / 'usage.db'}",
            "tiers:",
            "  ws: {rpm: 1000, models: {gpt-4o-mini: {rpm: 1}}}",
            "metrics:",
            "  require_admin: false",
            "responses:",
            "  store:",
            f"    path: {tmp / 'r.db'}",
            "  websocket:",
            f"    idle_timeout_ms: {idle_ms}",
            "",
        ]
    )


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("websocket")
    with run_gateway(tmp, mock_upstream, config_text=config(mock_upstream, tmp)) as g:
        yield g


def ws_connect(g: Gateway, key: str | None = KEY, **kw: Any) -> ClientConnection:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return connect(f"ws://127.0.0.1:{g.port}/v1/responses", additional_headers=headers, open_timeout=20, **kw)


def recv(ws: ClientConnection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(ws.recv(timeout=30))
    return event


def turn(ws: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    """One `response.create`, its events to the last (completed / failed / an error event)."""
    ws.send(json.dumps({"type": "response.create", **body}))
    return until_end(ws)


def until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    events = []
    while True:
        events.append(recv(ws))
        if events[-1]["type"] in ("response.completed", "response.failed", "error"):
            return events


def text(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_two_responses_on_one_connection_chained(gw: Gateway, mock_upstream: MockUpstream) -> None:
    with ws_connect(gw) as ws:
        first = turn(ws, model="echo", input="hello over the socket")
        assert [e["type"] for e in first][:2] == ["response.created", "response.in_progress"]
        assert first[-1]["type"] == "response.completed"
        assert text(first) == "You said: hello over the socket"
        rid = first[-1]["response"]["id"]
        mock_upstream.clear()
        second = turn(ws, model="echo", input="and once more", previous_response_id=rid)
        assert second[0]["type"] == "response.created"  # nothing of the first after its end
        assert second[-1]["type"] == "response.completed"
        assert second[-1]["response"]["previous_response_id"] == rid
        assert text(second) == "You said: and once more"
    # the second turn reached the upstream with the first one in front of it (the stored chain)
    sent = next(e["body"] for e in mock_upstream.events() if e["event"] == "request" and e.get("body"))
    contents = [m["content"] for m in sent["messages"]]
    assert contents == ["hello over the socket", "You said: hello over the socket", "and once more"]


def test_each_response_is_a_ledger_row(gw: Gateway) -> None:
    with ws_connect(gw, CAROL) as ws:
        assert turn(ws, model="echo", input="one two")[-1]["type"] == "response.completed"
        assert turn(ws, model="echo", input="three")[-1]["type"] == "response.completed"
        assert turn(ws, model="nope", input="x")[0]["status"] == 404
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        c.request("GET", "/v1/usage?group_by=key", headers={"authorization": f"Bearer {ADMIN}"})
        body = json.loads(c.getresponse().read())
    finally:
        c.close()
    carol = next(g for g in body["data"] if g["group"] == "carol")
    assert carol["requests"] == 3 and carol["errors"] == 1
    assert carol["completion_tokens"] > 0 and carol["prompt_tokens"] > 0


def test_the_official_sdks_websocket_mode(gw: Gateway) -> None:
    """`client.responses.connect()` of the `openai` SDK: typed events, a chain, an error event."""
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    try:
        with client.responses.connect() as conn:
            texts, ids = [], []
            for words in ("hello from the sdk", "and the next turn"):
                conn.response.create(model="echo", input=words, previous_response_id=ids[-1] if ids else None)
                for event in conn:
                    if event.type == "response.completed":
                        texts.append(event.response.output_text)
                        ids.append(event.response.id)
                        break
            assert texts == ["You said: hello from the sdk", "You said: and the next turn"]
            assert client.responses.retrieve(ids[1]).previous_response_id == ids[0]
            conn.response.create(model="nope", input="x")
            err = conn.recv()
            assert err.type == "error" and err.status == 404
            assert err.error.code == "model_not_found" and err.error.param == "model"
    finally:
        client.close()


def _normal(events: list[dict[str, Any]]) -> list[Any]:
    """Events with what differs between two responses to one request (ids, times) made equal."""
    rid = events[0]["response"]["id"]
    raw = json.dumps(events).replace(rid, "resp_X").replace(rid[5:], "X")

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: 0 if k.endswith("_at") else walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return list(walk(json.loads(raw)))


def sse_events(g: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/responses",
            json.dumps({**body, "stream": True}),
            {"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )
        r = conn.getresponse()
        assert r.status == 200
        data = r.read().decode()
    finally:
        conn.close()
    return [json.loads(line[6:]) for line in data.split("\n") if line.startswith("data: ")]


def test_events_equal_the_sse_stream(gw: Gateway) -> None:
    body = {
        "model": "echo",
        "input": "the same words both ways",
        "instructions": "Be brief.",
        "max_output_tokens": 50,
    }
    over_sse = sse_events(gw, body)
    with ws_connect(gw) as ws:
        over_ws = turn(ws, **body, stream=False)  # `stream` is HTTP's: ignored on a socket
    assert len(over_ws) == len(over_sse) > 5
    assert _normal(over_ws) == _normal(over_sse)


def test_auth_refused_on_upgrade(gw: Gateway) -> None:
    for key in (None, "sk-websocket-nobody-000000000"):
        with pytest.raises(InvalidStatus) as info:
            ws_connect(gw, key)
        response = info.value.response
        assert response.status_code == 401
        assert json.loads(response.body)["error"]["type"] == "authentication_error"


def test_429_is_an_error_event_and_the_connection_stays_usable(gw: Gateway) -> None:
    with ws_connect(gw) as ws:
        turn(ws, model="gpt-4o-mini", input="one")  # rpm 1 for this key on this model
        refused = turn(ws, model="gpt-4o-mini", input="two")
        assert len(refused) == 1
        err = refused[0]
        assert err["type"] == "error" and err["status"] == 429
        assert err["error"]["type"] == "rate_limit_error"
        bad = turn(ws, model="echo", input="x", temperature="hot")
        assert bad[0]["type"] == "error" and bad[0]["status"] == 400
        assert bad[0]["error"]["param"] == "temperature"
        ws.send("not json")
        assert recv(ws)["error"]["code"] == "invalid_json"
        ws.send("[" * 50_000 + "]" * 50_000)  # refused before a parser recurses into it
        assert recv(ws)["error"]["code"] == "json_too_deep"
        ws.send(json.dumps({"type": ["x" * 5000]}))
        unknown = recv(ws)["error"]
        assert unknown["code"] == "unknown_event_type" and len(unknown["message"]) < 500
        ws.send(json.dumps({"type": "response.steer", "input": "x", "previous_response_id": "resp_x"}))
        assert recv(ws)["error"]["code"] == "unknown_event_type"
        for extra in ({"stream_id": "lane-2"}, {"generate": False}):  # not served: OpenAI's newer mode
            refusal = turn(ws, model="echo", input="x", **extra)[0]
            assert refusal["error"]["code"] == "unknown_parameter"
            assert refusal["error"]["param"] == next(iter(extra))
        ok = turn(ws, model="echo", input="still here")
        assert text(ok) == "You said: still here"


def test_a_create_sent_during_a_response_waits_for_it(gw: Gateway) -> None:
    with ws_connect(gw) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "slow", "input": "first one"}))
        ws.send(json.dumps({"type": "response.create", "model": "echo", "input": "second one"}))
        first, second = until_end(ws), until_end(ws)
    assert text(first) == "You said: first one"
    assert text(second) == "You said: second one"


def test_oversized_message_closes_1009(gw: Gateway) -> None:
    with ws_connect(gw) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "echo", "input": "w " * MAX_BODY}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_ping_pong_and_a_clean_close(gw: Gateway) -> None:
    with ws_connect(gw) as ws:
        assert ws.ping(b"are you there").wait(10)
        turn(ws, model="echo", input="between pings")
        assert ws.ping().wait(10)
        ws.close()
        assert ws.close_code == 1000  # the gateway's echo of our close


def test_idle_connection_gets_an_event_then_1000(gw: Gateway) -> None:
    with ws_connect(gw) as ws:
        event = json.loads(ws.recv(timeout=IDLE_MS / 1000 + 20))
        assert event["error"]["code"] == "websocket_idle_timeout"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1000


def in_flight(g: Gateway) -> float:
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    try:
        c.request("GET", "/metrics")
        lines = c.getresponse().read().decode().splitlines()
    finally:
        c.close()
    return float(next(ln.split()[-1] for ln in lines if ln.startswith("fastpath_requests_in_flight ")))


def _stream(mock: MockUpstream) -> dict[str, Any] | None:
    c = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=5)
    try:
        c.request("GET", "/_mock/stats")
        active = json.loads(c.getresponse().read())["active_streams"]
    finally:
        c.close()
    return active[0] if active else None


def test_a_client_that_stops_reading_pauses_the_upstream(gw: Gateway, mock_upstream: MockUpstream) -> None:
    """Nothing is read from a long response: the gateway's sends wait for the socket, the relay
    stops reading, and the mock's writes to the gateway pause with most of the stream unsent
    (no unbounded buffer anywhere). Closing then cancels the response and its upstream call."""
    words = 100_000  # ~20 MB of events: far more than the socket buffers hold
    mock_upstream.clear()
    with ws_connect(gw, max_queue=4) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "echo", "input": "w " * words}))
        deadline = time.monotonic() + 60
        stalled = None
        while time.monotonic() < deadline:
            before = _stream(mock_upstream)
            time.sleep(0.5)
            after = _stream(mock_upstream)
            if (
                before
                and after
                and after["write_paused"]
                and after["chunks_written"] == before["chunks_written"]
            ):
                stalled = after
                break
        assert stalled is not None, "the upstream was never held back"
        # held with the stream unfinished (the socket buffers on the way hold a good part of it)
        assert stalled["chunks_written"] < words
        assert in_flight(gw) == 1  # the socket's response is a request in flight, as over HTTP
        ws.close()
    deadline = time.monotonic() + 30
    while _stream(mock_upstream) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    ends = [e for e in mock_upstream.events() if e["event"] in ("stream_end", "stream_aborted")]
    assert [e["event"] for e in ends] == ["stream_aborted"]


BOB = "sk-websocket-bob-000123456789"


def test_revoked_key_closes_1008_and_stopping_closes_1001(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    """A key removed by a hot reload ends its open connection (error event, 1008) at its next
    response; another key's connection goes on until the worker stops (1001)."""
    alice_line = f"    - {{id: alice, key: {KEY}, team: red, tier: ws}}"
    bob_line = f"    - {{id: bob, key: {BOB}, team: blue, tier: ws}}"
    # bob's connection waits idle through the reload: no idle limit in the way
    text_ = config(mock_upstream, tmp_path, idle_ms=300_000).replace(alice_line, f"{alice_line}\n{bob_line}")
    with run_gateway(tmp_path, mock_upstream, config_text=text_) as g:
        bob = connect(
            f"ws://127.0.0.1:{g.port}/v1/responses", additional_headers={"x-api-key": BOB}, open_timeout=20
        )
        with bob, ws_connect(g) as alice:
            turn(alice, model="echo", input="before the reload")
            (tmp_path / f"gateway-{g.port}.yaml").write_text(
                text_.replace(KEY, "sk-websocket-carol-0000000000")
            )
            g.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while (last := turn(alice, model="echo", input="again")[-1])["type"] != "error":
                assert time.monotonic() < deadline, "the reload never took the key away"
                time.sleep(0.1)
            assert last["status"] == 401
            with pytest.raises(ConnectionClosed) as info:
                alice.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1008
            assert text(turn(bob, model="echo", input="still mine")) == "You said: still mine"
            # a stop during a response: the response finishes, then 1001
            bob.send(json.dumps({"type": "response.create", "model": "slow", "input": "one two three four"}))
            while recv(bob)["type"] != "response.output_text.delta":
                pass
            g.proc.send_signal(signal.SIGTERM)
            rest = until_end(bob)
            assert rest[-1]["type"] == "response.completed"
            assert rest[-1]["response"]["output"][0]["content"][0]["text"] == "You said: one two three four"
            with pytest.raises(ConnectionClosed) as info:
                bob.recv(timeout=20)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001


def test_granian_engine_serves_the_same_app(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    with run_gateway(
        tmp_path, mock_upstream, config_text=config(mock_upstream, tmp_path), engine="granian"
    ) as g:
        with ws_connect(g) as ws:
            first = turn(ws, model="echo", input="granian socket")
            rid = first[-1]["response"]["id"]
            second = turn(ws, model="echo", input="again", previous_response_id=rid)
            assert text(second) == "You said: again"
            refused = turn(ws, model="nope", input="x")
            assert refused[0]["status"] == 404
            # granian takes the whole message (its own limit is 64 MiB), the app closes (1009),
            # and granian's close frame carries no code (the client sees 1005: none received)
            ws.send(json.dumps({"type": "response.create", "model": "echo", "input": "w " * MAX_BODY}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1005
        with pytest.raises(InvalidStatus) as info:
            ws_connect(g, None)
        assert info.value.response.status_code == 401  # without a body: RSGI has no way to send one


@pytest.mark.parametrize(
    ("websocket", "message"),
    [
        ("{idle_timeout_ms: 0}", "websocket.idle_timeout_ms: must be > 0"),
        ("{max_connection_ms: -1}", "websocket.max_connection_ms: must be > 0"),
        ("{max_connections: 0}", "websocket.max_connections: must be > 0"),
        ("{idle_timeout_ms: 5000, max_connection_ms: 1000}", "is longer than max_connection_ms"),
        ("{idle_ms: 5}", "idle_ms"),
    ],
)
def test_config_is_validated(websocket: str, message: str) -> None:
    base = gateway_config(1)
    with pytest.raises(ConfigError) as info:
        parse(f"{base}responses:\n  websocket: {websocket}\n")
    assert message in str(info.value)
    assert parse(base).responses.websocket.max_connection_ms == 3_600_000


def test_connections_per_worker_are_capped(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """`responses.websocket.max_connections`: the upgrade past it is a 429 with the error JSON;
    a closed connection frees its place."""
    text = config(mock_upstream, tmp_path).replace(
        "  websocket:\n", "  websocket:\n    max_connections: 2\n", 1
    )
    with run_gateway(tmp_path, mock_upstream, config_text=text) as g:
        with ws_connect(g) as first, ws_connect(g) as second:
            assert text_of(turn(first, model="echo", input="one"))
            with pytest.raises(InvalidStatus) as info:
                ws_connect(g)
            response = info.value.response
            assert response.status_code == 429
            error = json.loads(response.body)["error"]
            assert error["code"] == "websocket_connections_exceeded" and error["type"] == "rate_limit_error"
            assert text_of(turn(second, model="echo", input="two"))  # the open ones go on

        # both closed: places free again (the server sees the closes shortly after)
        def opens() -> bool:
            try:
                with ws_connect(g) as again:
                    return bool(text_of(turn(again, model="echo", input="three")))
            except InvalidStatus:
                return False

        assert wait_for(opens, timeout_s=10)


def text_of(events: list[dict[str, Any]]) -> str:
    assert events[-1]["type"] == "response.completed", events[-1]
    return text(events)
