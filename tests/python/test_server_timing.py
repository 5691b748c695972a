"""Gateway-side timing for benchmarkers: `server-timing` stage durations on every inference
reply, and (on request) a stream's TTFT and read gaps as the gateway saw them."""

from __future__ import annotations

import json
import re
import urllib.request

import openai
from conftest import Gateway
from test_streaming import data_events, open_stream, sse_lines, stream_request

ENTRY = re.compile(r"([a-z_-]+);dur=([0-9.]+)")


def timings(header: str) -> dict[str, float]:
    return {name: float(dur) for name, dur in ENTRY.findall(header)}


def test_unary_reply_carries_stage_timings(gateway: Gateway) -> None:
    req = urllib.request.Request(
        f"{gateway.url}/v1/chat/completions",
        data=b'{"model":"echo","messages":[{"role":"user","content":"hi"}]}',
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        t = timings(r.headers["server-timing"])
    assert {"decode", "route", "upstream_head", "total"} <= t.keys()
    assert t["total"] >= t["upstream_head"] >= 0
    assert t["total"] >= t["decode"] + t["route"]


def test_stream_reply_carries_stage_timings_and_no_comment_by_default(gateway: Gateway) -> None:
    with open_stream(gateway.port, stream_request(words=5)) as resp:
        t = timings(resp.getheader("server-timing", ""))
        lines = list(sse_lines(resp))
    assert {"decode", "route", "upstream_head", "ttfb"} <= t.keys()
    assert not any(ln.startswith(b": server-timing") for ln in lines)


def test_stream_timing_comment_on_request(gateway: Gateway) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            stream_request(words=8, chunk_delay_ms=10),
            {"content-type": "application/json", "x-fastpath-timing": "1"},
        )
        lines = list(sse_lines(conn.getresponse()))
    finally:
        conn.close()
    comments = [ln for ln in lines if ln.startswith(b": server-timing")]
    assert len(comments) == 1
    t = timings(comments[0].decode())
    assert t["ttft"] > 0 and t["gap-max"] >= t["gap-mean"] > 0
    reads = int(re.search(r'reads;desc="(\d+)"', comments[0].decode()).group(1))  # type: ignore[union-attr]
    assert reads >= 2
    events = data_events(lines)
    assert events[-1] == b"[DONE]"
    assert lines.index(comments[0]) < lines.index(b"data: [DONE]")
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == " ".join(f"w{i}" for i in range(8))


def test_openai_sdk_ignores_the_timing_comment(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=20)
    chunks = list(
        client.chat.completions.create(
            model="echo",
            stream=True,
            messages=[{"role": "user", "content": "timing please"}],
            extra_headers={"x-fastpath-timing": "1"},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: timing please"
