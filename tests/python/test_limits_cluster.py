"""The limits on a real Redis Cluster (3 primaries on loopback, tests/python/redis_cluster.py) beyond
RPM (test_redis_cluster.py): TPM and the daily budget exact across 2 gateway instances x 2
workers (admitted tokens and money never beyond the limit; refunds settle on the key's node),
`mode: leased` within its bound (leased.py: from a key with no slice held, never beyond the limit
plus what its bucket refilled; every unit admitted was taken from the key's node and the slices
come back; idle slices leave the worker's store), and every script's keys in one hash slot for
every limit kind (key, model and team scopes; exact and leased): a decision on the cluster is one
node, never CROSSSLOT; and a budget stays exact through a primary's failover mid-load.

One cluster and one pair of gateways for the module; keys are per run (the cluster is private)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from budget_harness import IN, OUT, finish, principal, prompt_tokens, refused, request, run_stages, used
from budget_harness import parse as parse_models
from conftest import Gateway, MockUpstream, run_gateway
from redis_cluster import LocalCluster, cluster_or_skip
from test_auth import auth_config, chat, post
from test_limits_leased import tiers_yaml
from test_limits_redis import U, _burst, _refilled
from test_streaming import wait_for

from gateway.pipeline.limits import LimitsStage
from gateway.pipeline.limits.leased import LeasedStore, Parts
from gateway.pipeline.limits.redis_store import PlanKeys, RedisStore
from gateway.redis_cluster import key_slot

redis = pytest.importorskip("redis")

KEY = "sk-test-limits-cluster-0123456789"
WORKERS = 4  # 2 instances x 2 workers
TPM = 10_000
BUDGET_NANO = 10_000_000  # 0.01 USD; max_tokens 50 at 20 USD / Mtok reserves 1,000,000
BUDGET_NANO_F = 100_000_000  # fbudget: 100 requests (>= 2.5 s at the test's pace)
LRPM = 120
LTPM = 6_000
TIERS = {
    "tpm": f"{{rpm: 100000, tpm: {TPM}}}",
    "budget": "{rpm: 100000, budget_usd_per_day: 0.01}",
    "lrpm": f"{{rpm: {LRPM}, mode: leased}}",
    "ltpm": f"{{rpm: 100000, tpm: {LTPM}, mode: leased}}",
    "lbudget": "{rpm: 100000, budget_usd_per_day: 0.002, mode: leased}",
    "fbudget": "{rpm: 100000, budget_usd_per_day: 0.1}",
}

# Every limit kind in every scope (key, key on a model, team), exact and leased.
EVERY_KIND = """
prices:
  echo: {input_per_mtok: 1000, output_per_mtok: 2000}
tiers:
  every:
    rpm: 1000
    tpm: 100000
    max_concurrent: 5
    budget_usd_per_day: 10
    budget_usd_per_month: 100
    requests_per_day: 1000
    tokens_per_day: 1000000
    tokens_per_month: 10000000
    models: {echo: {rpm: 500, tpm: 50000, max_concurrent: 3}}
  leased:
    rpm: 1000
    tpm: 100000
    budget_usd_per_day: 10
    requests_per_day: 1000
    max_concurrent: 5
    mode: leased
    models: {echo: {rpm: 500, tpm: 50000, mode: leased}}
teams:
  red: {rpm: 2000, tpm: 200000, max_concurrent: 10, budget_usd_per_day: 20, tokens_per_day: 2000000}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = cluster_or_skip(tmp_path_factory.mktemp("limits-cluster"))  # 3 primaries, 3 replicas
    try:
        yield c
    finally:
        c.stop()


def _yaml(url: str, prefix: str) -> str:
    # a cluster error is a 503 here, never a local decision
    return tiers_yaml(KEY, TIERS, url, prefix, "on_error: fail_closed")


@pytest.fixture(scope="module")
def pair(
    cluster: LocalCluster, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway, str]]:
    """Two gateway instances, 2 worker processes each, on the cluster."""
    prefix = f"fp-test:{uuid.uuid4().hex[:10]}:"
    text = auth_config(mock_upstream.port, _yaml(cluster.url, prefix))
    tmp = tmp_path_factory.mktemp("gw-limits-cluster")
    with (
        run_gateway(tmp, mock_upstream, config_text=text, workers=2) as a,
        run_gateway(tmp, mock_upstream, config_text=text, workers=2) as b,
    ):
        yield a, b, prefix


def _node(cluster: LocalCluster, key: str) -> Any:
    """A redis-py client on the primary that holds `key` (its slot's owner)."""
    return redis.Redis(port=cluster.owner(key_slot(key)), socket_timeout=5)


def _debt_tokens(r: Any, key: str) -> float:
    """A bucket's debt now, in tokens (`d:t` as the scripts store it; no key: 0)."""
    value = r.get(key)
    if value is None:
        return 0.0
    d, t = (int(x) for x in value.split(b":"))
    sec, usec = r.time()
    now = int(sec) * 1_000_000 + int(usec)
    rate = LRPM  # units per microsecond = the limit per minute
    return max(0, d - max(0, now - t) * rate) / U


# ---- exact -----------------------------------------------------------------------------------


def test_tpm_exact_across_instances_on_the_cluster(
    cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]
) -> None:
    a, b, prefix = pair
    name = f"{prefix}{{tpm}}:t"
    r = _node(cluster, name)
    max_tokens = 1_000
    # held a second upstream: every admitted request is in flight at once, none settled
    body = chat(max_tokens=max_tokens, mock={"first_delay_ms": 1_000})
    statuses, elapsed = _burst(r, [a.port, b.port], f"{KEY}-tpm", 15, body)
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    # each reserved its prompt (< 100 tokens) + max_tokens out of 10,000
    assert TPM // (max_tokens + 100) <= admitted <= (TPM + _refilled(elapsed, TPM)) // max_tokens, admitted
    # the replies used a few tokens each: the rest comes back (settlements, deferred refunds)
    assert post(a.port, chat(max_tokens=1), f"{KEY}-tpm")[0] == 200

    def remaining() -> int:
        status, headers, _ = post(b.port, chat(max_tokens=1), f"{KEY}-tpm")
        assert status == 200
        return int(headers["x-ratelimit-remaining-tokens"])

    assert wait_for(lambda: remaining() > TPM - 1_000)
    assert r.pttl(name) > 0  # on its slot's node, with a TTL
    holder = cluster.owner(key_slot(name))
    assert all(not cluster.keys(p, name) for p in cluster.primary_ports() if p != holder)


def test_budget_never_overspent_across_instances_on_the_cluster(
    cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]
) -> None:
    a, b, prefix = pair
    name = f"{prefix}{{budget}}:b"
    r = _node(cluster, name)
    max_tokens = 50
    per_request = max_tokens * 20_000  # nano-USD reserved (the prompt is free)
    body = chat(max_tokens=max_tokens, mock={"first_delay_ms": 1_000, "words": max_tokens})
    statuses, _ = _burst(r, [a.port, b.port], f"{KEY}-budget", 12, body)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) == BUDGET_NANO // per_request == 10
    # settled with what the replies used (all of it: `words` = max_tokens)
    assert wait_for(lambda: int(r.hget(name, "ds") or 0) == 10 * per_request)
    assert r.pttl(name) > 0
    status, headers, err = post(b.port, chat(max_tokens=1), f"{KEY}-budget")
    assert status == 429 and err["error"]["code"] == "budget_exceeded", err
    assert 1 <= int(headers["retry-after"]) <= 86_400


# ---- leased ----------------------------------------------------------------------------------


def test_leased_rpm_within_the_bound_and_slices_come_back(
    cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]
) -> None:
    a, b, prefix = pair
    name = f"{prefix}{{lrpm}}:r"
    r = _node(cluster, name)
    statuses, elapsed = _burst(r, [a.port, b.port], f"{KEY}-lrpm", LRPM, chat())
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    # a fresh key (no slice held): nothing beyond the limit and its refill; below it, at most
    # the slices the workers hold (each <= limit / (2 x its count of workers): <= limit / 2 in all)
    assert LRPM // 2 <= admitted <= LRPM + _refilled(elapsed, LRPM), (admitted, elapsed)
    start = time.monotonic()
    # idle (slice_idle_ms 1 s): the slices go back, so the node's bucket holds exactly what was
    # admitted, less what it refilled since the burst began
    assert wait_for(lambda: _debt_tokens(r, name) <= admitted + 0.01, timeout_s=10)
    since = elapsed + int((time.monotonic() - start + 1) * 1_000_000)
    assert admitted - _refilled(since, LRPM) - 1 <= _debt_tokens(r, name) <= admitted + 0.01


def test_leased_tpm_within_the_bound(cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]) -> None:
    a, b, prefix = pair
    r = _node(cluster, f"{prefix}{{ltpm}}:t")
    max_tokens = 200
    body = chat(max_tokens=max_tokens, mock={"first_delay_ms": 1_000})
    statuses, elapsed = _burst(r, [a.port, b.port], f"{KEY}-ltpm", 25, body)
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    most = (LTPM + _refilled(elapsed, LTPM)) // max_tokens  # each reserves > max_tokens
    assert (LTPM // 2) // (max_tokens + 20) <= admitted <= most, (admitted, elapsed)


def test_leased_budget_never_overspent_and_spends_what_was_used(
    cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]
) -> None:
    """Each request reserves 1,000,000 nano-USD of a 2,000,000 daily budget and uses less: from 2
    instances at once, never more than the budget; once the slices went back (idle), the node
    holds exactly what the admitted replies cost."""
    a, b, prefix = pair
    name = f"{prefix}{{lbudget}}:b"
    r = _node(cluster, name)
    costs: list[int] = []
    refusals = [0]
    stop = time.monotonic() + 2.0

    def client(port: int) -> None:
        while time.monotonic() < stop:
            status, _, body = post(port, chat(max_tokens=50), f"{KEY}-lbudget")
            if status == 200:
                costs.append(body["usage"]["completion_tokens"] * 20_000)
            else:
                assert status == 429 and body["error"]["code"] == "budget_exceeded", body
                refusals[0] += 1

    threads = [threading.Thread(target=client, args=(port,)) for port in (a.port, b.port, a.port, b.port)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refusals[0] > 0 and costs
    assert sum(costs) <= 2_000_000
    assert wait_for(lambda: int(r.hget(name, "ds") or 0) == sum(costs), timeout_s=8), (
        r.hget(name, "ds"),
        sum(costs),
    )


# ---- one slot per script ---------------------------------------------------------------------


def _plan_keys(stage: LimitsStage, prefix: str, who: Any) -> list[tuple[str, ...]]:
    """Every key tuple a script of this principal's plan is sent with (the decision, the
    settlement, deferred refunds, leases; the leased grants and the exact rest)."""
    plan = stage.plan(who, "echo")
    groups: list[tuple[str, ...]] = []
    for p in (plan, Parts(plan, WORKERS).exact_plan):
        if p is None:
            continue
        keys = PlanKeys(p, prefix)
        groups += [keys.keys, keys.settle_keys, keys.lease_sets, tuple(k for k, _ in keys.tpm_keys)]
    groups.append(tuple(prefix + plan.checks[i].local_key for i in Parts(plan, WORKERS).leased))
    return [g for g in groups if g]


def test_every_script_keys_share_one_slot(cluster: LocalCluster) -> None:
    """For every limit kind and scope, exact and leased: each script's keys hash to one slot (the
    `{key id}` or `{team:<team>}` tag), and a request through the real stage on the cluster is
    admitted, refused and settled on one node (a CROSSSLOT would be a 503)."""
    prefix = f"fp-test:{uuid.uuid4().hex[:10]}:"
    cfg = parse_models(
        EVERY_KIND
        + f"limits:\n  backend: redis\n  redis: {{url: '{cluster.url}', key_prefix: '{prefix}', "
        + "on_error: fail_closed, timeout_ms: 2000}\n"
    )
    people = [
        principal(cfg, "k1", "every"),
        principal(cfg, "k2", "every", "red"),
        principal(cfg, "k3", "leased"),
        principal(cfg, "k4", "leased", "red"),
    ]
    stage = LimitsStage(cfg)
    slots = set()
    for who in people:
        groups = _plan_keys(stage, prefix, who)
        assert sum(map(len, groups)) >= 6, groups
        for g in groups:
            assert len({key_slot(k) for k in g}) == 1, g
        slots.add(key_slot(groups[0][0]))
    assert len(slots) == 3  # k1, k3, and the team red: the tag is what hashes
    assert isinstance(stage.store, LeasedStore) and isinstance(stage.store.shared, RedisStore)

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        for who in people:
            ctxs = [request(who, max_tokens=10) for _ in range(3)]
            for ctx in ctxs:
                await stage.on_request(ctx)  # admitted: not a 503 (CROSSSLOT, MOVED not followed)
            # the model's concurrency (3 per key on echo) refuses the fourth, on the same node
            if who.tier_name == "every":
                exc = await refused(stage, request(who, max_tokens=10))
                assert "concurrent requests for this API key on model echo (limit 3)" in exc.message
            for ctx in ctxs:
                used(ctx, 5)
                await finish(stage, ctx)

    run_stages(run)
    # every key written is on the node of its tag's slot, and in that slot
    owners = cluster.owners()
    found = 0
    for port in cluster.primary_ports():
        for k in cluster.keys(port, f"{prefix}*"):
            if k == f"{prefix}workers":  # the leased workers' registry: one key of its own
                continue
            found += 1
            assert owners[key_slot(k)] == port, k
            assert key_slot(k) in {key_slot(f"{{{t}}}") for t in ("k1", "k3", "team:red")}, k
    assert found >= 10


def test_leased_idle_slices_go_back_and_are_forgotten(cluster: LocalCluster) -> None:
    """The worker's leased store is bounded by the keys active within `slice_idle_ms`: 200
    distinct keys' budget slices are held while they are used, then given back to each key's
    node and forgotten; each node then holds exactly what its key's requests cost (budgets do
    not refill: an exact reading)."""
    prefix = f"fp-test:{uuid.uuid4().hex[:10]}:"
    cfg = parse_models(
        "prices:\n  echo: {input_per_mtok: 1000, output_per_mtok: 2000}\n"
        "tiers:\n  l: {budget_usd_per_day: 10, mode: leased}\n"
        f"limits:\n  backend: redis\n  redis: {{url: '{cluster.url}', key_prefix: '{prefix}', "
        "on_error: fail_closed, timeout_ms: 2000, slice_idle_ms: 1000, slice_renew_ms: 100}\n"
    )
    people = [principal(cfg, f"u{i}", "l") for i in range(200)]
    spent: dict[str, int] = {}

    async def run(stages: list[LimitsStage]) -> None:
        stage = LimitsStage(cfg)
        stages.append(stage)
        store = stage.store
        assert isinstance(store, LeasedStore)
        ctxs = [request(who, max_tokens=20) for who in people]
        await asyncio.gather(*(stage.on_request(ctx) for ctx in ctxs))
        assert len(store._slices) == len(people)  # held while in use
        for who, ctx in zip(people, ctxs, strict=True):
            used(ctx, 7)
            spent[who.key_id] = prompt_tokens(ctx) * IN + 7 * OUT
            stage.on_finish(ctx)
        deadline = time.monotonic() + 10
        while store._slices:  # idle: given back and forgotten
            assert time.monotonic() < deadline, len(store._slices)
            await asyncio.sleep(0.05)
        await stage.settled()

    run_stages(run)
    for who in people[:: len(people) // 20]:
        name = f"{prefix}{{{who.key_id}}}:b"
        assert int(_node(cluster, name).hget(name, "ds") or 0) == spent[who.key_id], who.key_id


# ---- failover ---------------------------------------------------------------------------------


def test_budget_exact_through_a_failover(cluster: LocalCluster, pair: tuple[Gateway, Gateway, str]) -> None:
    """The primary of a budget's slot fails over (CLUSTER FAILOVER on its replica: no write lost)
    while both instances spend the budget: the gateways follow the new primary (MOVED), and the
    budget admits exactly what it holds, never more; what was admitted is what the node counts."""
    a, b, prefix = pair
    name = f"{prefix}{{fbudget}}:b"
    per_request = 50 * 20_000  # max_tokens 50 at 20 USD / Mtok, all used (`words`)
    body = chat(max_tokens=50, mock={"words": 50})
    primary = cluster.owner(key_slot(name))
    replica = cluster.replica_of(primary)
    statuses: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client(port: int) -> None:
        while not stop.is_set():
            status, _, reply = post(port, body, f"{KEY}-fbudget")
            code = reply.get("error", {}).get("code", "") if status != 200 else ""
            statuses.append((time.monotonic(), status, code))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(port,)) for port in (a.port, b.port)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(statuses) >= 5)
        assert cluster.command(replica, "CLUSTER", "FAILOVER") == "OK"
        assert wait_for(lambda: cluster.owner(key_slot(name)) == replica)
        switched = time.monotonic()
        # on until the budget refuses after the switch
        assert wait_for(lambda: any(t > switched and c == "budget_exceeded" for t, _, c in statuses), 20)
    finally:
        stop.set()
        for t in threads:
            t.join()
    cluster.wait_ok()
    seen = {s for _, s, _ in statuses}
    assert seen <= {200, 429, 503}, seen  # 503: refused while the slot moved (fail_closed)
    admitted = sum(s == 200 for _, s, _ in statuses)
    unknown = sum(s == 503 for _, s, _ in statuses)  # may have been charged (the reply was lost)
    assert any(t > switched and s == 200 for t, s, _ in statuses)  # served by the new primary
    most = BUDGET_NANO_F // per_request
    assert most - unknown <= admitted <= most, (admitted, unknown)
    r = _node(cluster, name)
    spent = lambda: int(r.hget(name, "ds") or 0)  # noqa: E731
    assert wait_for(lambda: admitted * per_request <= spent() <= (admitted + unknown) * per_request)
    assert spent() <= BUDGET_NANO_F
