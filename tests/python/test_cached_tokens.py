"""Cached-token metering: prompt tokens an upstream served from its prompt cache (OpenAI's
`prompt_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`) are normalised into
one count, priced at `cached_input_per_mtok`, settled so in budgets, and recorded in the ledger
(`cached_tokens`) and `/v1/usage`. Units in process, then a real gateway over the repo's mock
(both wire conventions, unary and streamed, the `mock.cached_tokens` knob)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from budget_harness import IN, OUT, parse, principal, prompt_tokens, request
from conftest import MockUpstream, run_gateway
from test_ledger import ADMIN, ALICE, chat, config_text, sqlite_store, usage, wait_for
from test_ledger import request as http

from gateway.anthropic_stream import MessagesToChat, chat_from_message
from gateway.config import ConfigError
from gateway.money import cached_tokens, price_table, usage_cost
from gateway.pipeline.limits import LimitsStage
from gateway.pipeline.limits.local_store import LocalStore
from gateway.schemas import PromptTokensDetails, Usage


def _usage(prompt: int, completion: int, cached: int | None) -> Usage:
    u = Usage(prompt, completion, prompt + completion)
    if cached is not None:
        u.prompt_tokens_details = PromptTokensDetails(cached)
    return u


def test_price_and_cost_of_cached_tokens() -> None:
    cfg = parse(
        "prices:\n  echo: {input_per_mtok: 2, output_per_mtok: 8, cached_input_per_mtok: 0.5}\n"
        "  free-model: {input_per_mtok: 2, output_per_mtok: 8}\n"
    )
    table = price_table(cfg)
    assert table["echo"] == (2_000, 8_000, 500)
    assert table["free-model"] == (2_000, 8_000, 2_000)  # no cached price: the input price
    assert usage_cost(_usage(100, 10, 60), table["echo"]) == 40 * 2_000 + 60 * 500 + 10 * 8_000
    assert usage_cost(_usage(100, 10, None), table["echo"]) == 100 * 2_000 + 10 * 8_000
    assert cached_tokens(_usage(10, 0, 50)) == 10  # never more than the prompt
    with pytest.raises(ConfigError, match=r"cached_input_per_mtok: at most 3 decimals"):
        parse("prices:\n  echo: {input_per_mtok: 1, output_per_mtok: 1, cached_input_per_mtok: 0.0001}\n")


def test_anthropic_cache_fields_are_normalised_to_openai_usage() -> None:
    msg = {
        "type": "message",
        "id": "m",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 5,
            "output_tokens": 2,
            "cache_read_input_tokens": 30,
            "cache_creation_input_tokens": 7,
        },
    }
    got = chat_from_message(json.dumps(msg).encode(), "claude")
    assert got is not None
    body, prompt, completion, cached = got
    assert (prompt, completion, cached) == (42, 2, 30)  # reads and writes are prompt tokens
    assert json.loads(body)["usage"] == {
        "prompt_tokens": 42,
        "completion_tokens": 2,
        "total_tokens": 44,
        "prompt_tokens_details": {"cached_tokens": 30},
    }
    tr = MessagesToChat("claude")
    start = {"type": "message_start", "message": {"id": "m", "usage": msg["usage"]}}
    tr.on_event(json.dumps(start))
    assert (tr.input_tokens, tr.cached_tokens) == (42, 30)
    frame = json.loads(tr.usage_frame(42, 2, 30)[len(b"data: ") :])
    assert frame["usage"]["prompt_tokens_details"] == {"cached_tokens": 30}


def test_budget_settles_cached_tokens_at_the_cached_price() -> None:
    cfg = parse(
        "prices:\n  echo: {input_per_mtok: 1000, output_per_mtok: 2000, cached_input_per_mtok: 100}\n"
        "tiers:\n  b: {budget_usd_per_day: 10}\n"
    )
    stage = LimitsStage(cfg, clock=lambda: 1_790_000_000.0)
    who = principal(cfg, "carol", "b")

    async def run() -> None:
        ctx = request(who)
        p = prompt_tokens(ctx)
        await stage.on_request(ctx)  # reserves at the full input price: an upper bound
        assert ctx.lease is not None and ctx.lease.reserved_cost == p * IN + 100 * OUT
        ctx.usage = _usage(p, 10, p - 1)
        ctx.timings["upstream_head"] = 1
        ctx.status = 200
        stage.on_finish(ctx)
        store = stage.store
        assert isinstance(store, LocalStore)
        day = 1_790_000_000 // 86_400
        spent, _ = store.spent("{carol}:b", day, 0)
        assert spent == 1 * IN + (p - 1) * 100_000 + 10 * OUT

    asyncio.run(run())


PRICE_YAML = "  echo: {input_per_mtok: 1.0, output_per_mtok: 2.0, cached_input_per_mtok: 0.25}\n"
CLAUDE = """  - name: claude
    kind: anthropic
    base_url: http://127.0.0.1:{port}/v1
    api_key: sk-ant-upstream-secret
    first_byte_timeout_ms: 5000
"""


def test_gateway_meters_cached_tokens_in_both_conventions(
    mock_upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_LEDGER_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path / "data"))
    store = sqlite_store(tmp_path / "ledger" / "usage.db")
    text = config_text(mock_upstream.port, store.yaml, flush_interval_ms=50)
    text = text.replace("models:\n", CLAUDE.format(port=mock_upstream.port) + "models:\n", 1)
    text = text.replace(
        "  - name: echo\n",
        "  - name: claude-echo\n    provider: claude\n    upstream_model: claude-mock\n  - name: echo\n",
        1,
    )
    text = text.replace("  echo: {input_per_mtok: 1.0, output_per_mtok: 2.0}\n", PRICE_YAML)
    text = text.replace("prices:\n", "prices:\n" + PRICE_YAML.replace("echo", "claude-echo"), 1)
    words = "one two three four five six seven eight"
    with run_gateway(tmp_path, mock_upstream, config_text=text) as gw:
        for model in ("echo", "claude-echo"):
            status, body = http(
                gw.port, "POST", "/v1/chat/completions", chat(model, words, mock={"cached_tokens": 4}), ALICE
            )
            assert status == 200, body
            u = json.loads(body)["usage"]
            assert u["prompt_tokens_details"] == {"cached_tokens": 4}, u
            stream = chat(
                model, words, stream=True, stream_options={"include_usage": True}, mock={"cached_tokens": 4}
            )
            assert http(gw.port, "POST", "/v1/chat/completions", stream, ALICE)[0] == 200
        rows = wait_for(lambda: len(store.rows()) >= 4 and store.rows(), 15)
        status, summary = usage(gw.port, "?group_by=model")
        # `/metrics` prices cached tokens as the ledger does (workers publish every 250 ms)
        want = {
            m: sum(r["cost_nano_usd"] for r in rows if r["model"] == m) / 1e9 for m in ("echo", "claude-echo")
        }
        assert wait_for(lambda: _metric_costs(gw.port) == pytest.approx(want, rel=1e-9), 10), (
            _metric_costs(gw.port),
            want,
        )
    assert status == 200
    for r in rows:
        assert r["cached_tokens"] == 4, r
        cost = (r["prompt_tokens"] - 4) * 1_000 + 4 * 250 + r["completion_tokens"] * 2_000
        assert r["cost_nano_usd"] == cost, r
    by_model = {g["group"]: g for g in summary["data"]}
    assert by_model["echo"]["cached_tokens"] == 8 and by_model["claude-echo"]["cached_tokens"] == 8
    # the Anthropic convention: the prompt includes the cache reads (same prompt as without them)
    claude = [r for r in rows if r["model"] == "claude-echo"]
    assert len({r["prompt_tokens"] for r in claude}) == 1


def _metric_costs(port: int) -> dict[str, float]:
    """`fastpath_cost_usd` per model, summed over teams."""
    status, body = http(port, "GET", "/metrics", None, ADMIN)
    assert status == 200, body
    costs: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("fastpath_cost_usd_total{"):
            labels, _, value = line.rpartition(" ")
            model = labels.split('model="', 1)[1].split('"', 1)[0]
            costs[model] = costs.get(model, 0.0) + float(value)
    return costs
