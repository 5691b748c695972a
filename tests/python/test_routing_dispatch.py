"""The dispatcher's rules in process: error classes, the retry budget, and the upstream body
spliced per deployment (the end-to-end behaviour is in test_routing_e2e.py)."""

from __future__ import annotations

import json

import msgspec
import pytest

from gateway.config_routing import ErrorClass
from gateway.errors import Fault, GatewayError
from gateway.routing.budget import RetryBudget
from gateway.routing.classify import BREAKER_FAILURES, classify, retry_after_s
from gateway.upstream_body import split_template
from gateway.upstreams.httpclient import UpstreamConnectError
from gateway.upstreams.openai_http import map_transport_error, map_upstream_status


def upstream(status: int, message: str = "", retry_after: bytes | None = None) -> GatewayError:
    headers = {b"retry-after": retry_after} if retry_after is not None else {}
    return map_upstream_status(status, headers, json.dumps({"error": {"message": message}}).encode())


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (upstream(429), ErrorClass.RATE_LIMITED),
        (upstream(500), ErrorClass.SERVER_ERROR),
        (upstream(502), ErrorClass.SERVER_ERROR),
        (upstream(503), ErrorClass.SERVER_ERROR),  # the server answered: not a connect failure
        (upstream(504), ErrorClass.TIMEOUT),
        (upstream(401), ErrorClass.SERVER_ERROR),  # another deployment may hold good credentials
        (upstream(400, "This model's maximum context length is 8192 tokens"), ErrorClass.CONTEXT_LENGTH),
        (upstream(400, "prompt is too long: 210000 tokens > 200000 maximum"), ErrorClass.CONTEXT_LENGTH),
        (upstream(400, "Your request was rejected by our content_filter"), ErrorClass.CONTENT_POLICY),
        (upstream(400, "Unrecognized request argument"), ErrorClass.REJECTED),
        (upstream(422, "bad"), ErrorClass.REJECTED),
        (map_transport_error(UpstreamConnectError("refused")), ErrorClass.CONNECT),
        (GatewayError(Fault.UPSTREAM_CAPACITY, "full"), ErrorClass.RATE_LIMITED),
        (GatewayError(Fault.INVALID_REQUEST, "bad"), ErrorClass.REJECTED),
    ],
)
def test_upstream_errors_are_classified(err: GatewayError, cls: ErrorClass) -> None:
    assert classify(err) is cls


def test_only_the_deployments_own_failures_count_against_its_breaker() -> None:
    assert classify(upstream(500)) in BREAKER_FAILURES
    assert classify(upstream(429)) not in BREAKER_FAILURES
    assert classify(upstream(400, "maximum context length")) not in BREAKER_FAILURES


def test_retry_after_is_the_upstreams_own() -> None:
    assert retry_after_s(upstream(429, retry_after=b"3")) == 3.0
    assert retry_after_s(upstream(429)) == 1.0  # the mapper's default for a 429 without one
    assert retry_after_s(map_transport_error(UpstreamConnectError("refused"))) is None


def test_retry_budget_is_a_fraction_of_the_window_plus_a_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0)
    now = 100.0
    for _ in range(50):
        budget.request(now)
    granted = sum(budget.try_retry(now) for _ in range(50))
    assert granted == 10
    # the window slides: 10 s later the old requests no longer pay for retries
    assert not budget.try_retry(now + 10.5)
    floor = RetryBudget(ratio=0.0, min_per_s=0.5)
    assert sum(floor.try_retry(now) for _ in range(20)) == 5  # 0.5/s over the 10 s window


def test_a_template_splices_any_model_name() -> None:
    body = b'{"model":"public","messages":[{"role":"user","content":"m\\u00f6del \\"x\\""}],"stream":true}'
    head, tail = split_template(body)
    for name in ("meta-llama/Llama-3.1-8B-Instruct", 'we"ird', "ünï"):
        spliced = json.loads(head + msgspec.json.encode(name) + tail)
        assert spliced["model"] == name
        assert spliced["messages"][0]["content"] == 'mödel "x"'
        assert spliced["stream"] is True
