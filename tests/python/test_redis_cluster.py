"""`gateway.redis_cluster` on a real Redis Cluster (3 primaries + 3 replicas of
`redis-server --cluster-enabled yes` on loopback, tests/python/redis_cluster.py): routing by slot
and hash tag, MOVED after a slot is resharded, ASK while it migrates, a graceful failover and a
killed primary under load; and the limits through a real gateway (2 workers) on the cluster: an
RPM limit admits exactly the limit, and a killed primary is survived without a restart.

The module shares one cluster; the test that kills a primary runs last. Keys are per run."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvloop
from conftest import Gateway, MockUpstream, run_gateway
from redis_cluster import LocalCluster, cluster_or_skip
from test_auth import auth_config

from gateway.config import ConfigError, parse
from gateway.redis_cluster import RedisCluster, key_slot, parse_cluster_url
from gateway.redis_resp import ConnectError, RedisError, ReplyError

RPM = 20
KEY = "sk-test-cluster-limits-0123456789"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = cluster_or_skip(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def prefix() -> str:
    return f"fp-test:{uuid.uuid4().hex[:10]}:"


def run(main: Callable[[RedisCluster], Awaitable[None]], url: str) -> None:
    """`main(client)` on uvloop (the gateway's loop), the client closed after."""

    async def wrapper() -> None:
        client = RedisCluster(
            url, timeout_s=2.0, connect_timeout_s=2.0, backoff_min_s=0.05, backoff_max_s=0.5
        )
        try:
            await main(client)
        finally:
            await client.close()

    uvloop.run(wrapper())


# ---- without a cluster ------------------------------------------------------------------------


def test_key_slot_known_values() -> None:
    assert key_slot("123456789") == 12739  # the CRC16 check value of the cluster spec
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag: the whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("fastpath:rl:{k1}:r") == key_slot("fastpath:rl:{k1}:m:gpt:t") == key_slot("k1")


def test_cluster_url() -> None:
    u = parse_cluster_url("rediss+cluster://u:p%40w@h1:7000,[::1]:7001,h3?ssl_cert_reqs=none")
    assert u.seeds == (("h1", 7000), ("::1", 7001), ("h3", 6379))
    assert u.node_url("::1", 7001) == "rediss://u:p%40w@[::1]:7001/?ssl_cert_reqs=none"
    for bad, why in [
        ("redis://h:1", r"redis\+cluster://"),
        ("redis+cluster://h:1,", "seed addresses"),
        ("redis+cluster://h:x", "port"),
        ("redis+cluster://h:1/2", "database 0"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_cluster_url(bad)
    base = "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
    cfg = parse(base + "limits: {backend: redis, redis: {url: 'redis+cluster://a:1,b:2'}}\n")
    assert cfg.limits.redis.url.startswith("redis+cluster://")
    with pytest.raises(ConfigError, match=r"limits\.redis\.url: Redis Cluster URL: .*port") as e:
        parse(base + "limits: {backend: redis, redis: {url: 'redis+cluster://:secret@a:x'}}\n")
    assert "secret" not in str(e.value)
    with pytest.raises(ConfigError, match=r"key_prefix: no '\{'"):
        parse(base + "limits: {backend: redis, redis: {url: 'redis+cluster://a:1', key_prefix: 'x{y}:'}}\n")


def test_no_cluster_fails_cleanly() -> None:
    """Nothing listening: calls fail with ConnectError, then fast (backoff) without a new attempt."""

    async def main(c: RedisCluster) -> None:
        with pytest.raises(ConnectError):
            await c.execute("GET", "k")
        refreshes = c.refreshes
        with pytest.raises(ConnectError, match="no slot map"):
            await c.execute("GET", "k")
        assert c.refreshes == refreshes

    run(main, "redis+cluster://127.0.0.1:9")


# ---- on the cluster ---------------------------------------------------------------------------


def test_slots_match_the_servers(cluster: LocalCluster, prefix: str) -> None:
    for i in range(0, 200, 7):
        key = f"{prefix}{{t{i}}}x" if i % 2 else f"{prefix}{i}"
        assert key_slot(key) == int(cluster.command(cluster.ports[0], "CLUSTER", "KEYSLOT", key))


def test_routes_every_command_by_slot(cluster: LocalCluster, prefix: str) -> None:
    keys = [f"{prefix}k{i}" for i in range(300)]

    async def main(c: RedisCluster) -> None:
        # concurrent: the first calls wait for the one map fetch
        assert (
            await asyncio.gather(*(c.execute("SET", k, str(i)) for i, k in enumerate(keys))) == [b"OK"] * 300
        )
        assert c.refreshes == 1 and c.redirects == 0
        assert await asyncio.gather(*(c.execute("GET", k) for k in keys)) == [
            str(i).encode() for i in range(300)
        ]
        assert await c.execute("PING") == b"PONG"  # keyless: any primary
        # a script over keys sharing a hash tag: one slot, one node
        sha = c.register_script(
            "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('MGET', KEYS[1], KEYS[2])"
        )
        tagged = [f"{prefix}{{p1}}:a", f"{prefix}{{p1}}:b"]
        assert await c.evalsha(sha, tagged, ["x"]) == [b"x", None]
        with pytest.raises(ReplyError, match="CROSSSLOT"):
            await c.execute("MGET", keys[0], keys[1], keys[2], keys[3])
        for i in range(20):  # not waited for, then the barrier
            c.evalsha_nowait(sha, [f"{prefix}{{n{i}}}:a", f"{prefix}{{n{i}}}:b"], [str(i)])
        await c.barrier()
        assert c.dropped_errors == 0
        assert await c.execute("GET", f"{prefix}{{n7}}:a") == b"7"
        assert c.redirects == 0

    run(main, cluster.url)
    # each key is on the primary of its slot, and every primary holds some
    owners = cluster.owners()
    held = {p: cluster.keys(p, f"{prefix}k*") for p in cluster.primary_ports()}
    assert all(k in held[owners[key_slot(k)] or 0] for k in keys)
    assert all(held.values()) and sum(map(len, held.values())) == len(keys)


def _migrate(
    cluster: LocalCluster, slot: int, dst: int, keys: list[str] | None = None, finish: bool = True
) -> int:
    """Move `slot` (its `keys`, default all) to primary `dst`; `finish`: assign it there."""
    src = cluster.owner(slot)
    src_id, dst_id = cluster.node_id(src), cluster.node_id(dst)
    assert cluster.command(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id) == "OK"
    assert cluster.command(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id) == "OK"
    if keys is None:
        keys = cluster.command(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000").split()
    if keys:
        assert cluster.command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys) == "OK"
    if finish:
        for port in cluster.primary_ports():
            assert cluster.command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id) == "OK"
    return src


def test_moved_after_resharding(cluster: LocalCluster, prefix: str) -> None:
    key = f"{prefix}moved"
    slot = key_slot(key)

    async def main(c: RedisCluster) -> None:
        await c.execute("SET", key, "v")
        src = cluster.owner(slot)
        dst = next(p for p in cluster.primary_ports() if p != src)
        await asyncio.to_thread(_migrate, cluster, slot, dst)
        before = c.redirects
        assert await c.execute("GET", key) == b"v"  # MOVED: followed, the slot remapped
        assert c.redirects == before + 1
        assert await c.execute("GET", key) == b"v"
        assert c.redirects == before + 1  # straight to the new owner
        await asyncio.sleep(0.1)  # the refresh the MOVED asked for agrees
        assert await c.execute("INCR", f"{prefix}{{moved}}") == 1

    run(main, cluster.url)


def test_ask_while_a_slot_migrates(cluster: LocalCluster, prefix: str) -> None:
    moved, stays = f"{prefix}{{ask}}:a", f"{prefix}{{ask}}:b"
    slot = key_slot(moved)

    async def main(c: RedisCluster) -> None:
        await asyncio.gather(c.execute("SET", moved, "1"), c.execute("SET", stays, "2"))
        src = cluster.owner(slot)
        dst = next(p for p in cluster.primary_ports() if p != src)
        await asyncio.to_thread(_migrate, cluster, slot, dst, [moved], False)
        before = c.redirects
        assert await c.execute("GET", stays) == b"2"  # still on the source: no redirect
        assert c.redirects == before
        assert await c.execute("GET", moved) == b"1"  # ASK: ASKING + GET on the target
        assert await c.execute("GET", moved) == b"1"
        assert c.redirects == before + 2  # the map did not change: asked again
        sha = c.register_script("return redis.call('GET', KEYS[1])")
        assert await c.evalsha(sha, [moved], []) == b"1"
        await asyncio.to_thread(_migrate_rest, cluster, slot, src, dst, [stays])
        assert await c.execute("GET", stays) == b"2"  # MOVED now

    run(main, cluster.url)


def _migrate_rest(cluster: LocalCluster, slot: int, src: int, dst: int, keys: list[str]) -> None:
    assert cluster.command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys) == "OK"
    dst_id = cluster.node_id(dst)
    for port in cluster.primary_ports():
        assert cluster.command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id) == "OK"


async def _load(
    c: RedisCluster, keys: list[str], stop: asyncio.Event, errors: list[BaseException]
) -> tuple[int, int]:
    """INCR the keys round after round until `stop`: (acknowledged, outcome unknown)."""
    acked = unknown = 0
    while not stop.is_set():
        results = await asyncio.gather(*(c.execute("INCR", k) for k in keys), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                errors.append(r)
                unknown += not isinstance(r, ConnectError)  # a ConnectError was not sent
            else:
                acked += 1
        await asyncio.sleep(0.005)
    return acked, unknown


def test_graceful_failover_under_load(cluster: LocalCluster, prefix: str) -> None:
    """CLUSTER FAILOVER on a replica while INCRs run: the old primary answers MOVED, the client
    follows; every INCR acknowledged is counted, none twice."""
    keys = [f"{prefix}f{i}" for i in range(30)]
    primary = cluster.owner(key_slot(keys[0]))
    replica = cluster.replica_of(primary)

    async def main(c: RedisCluster) -> None:
        stop = asyncio.Event()
        errors: list[BaseException] = []
        load = asyncio.ensure_future(_load(c, keys, stop, errors))
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(cluster.command, replica, "CLUSTER", "FAILOVER") == "OK"
        deadline = time.monotonic() + 10
        while cluster.owner(key_slot(keys[0])) != replica:
            assert time.monotonic() < deadline, "the replica was not promoted"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        acked, unknown = await load
        assert all(isinstance(e, RedisError) for e in errors), errors
        total = sum(int(v) for v in await asyncio.gather(*(c.execute("GET", k) for k in keys)))
        assert acked <= total <= acked + unknown
        assert acked > 10 * len(keys)

    run(main, cluster.url)
    cluster.wait_ok()


# ---- the limits through a gateway on the cluster ----------------------------------------------


def _limits_yaml(url: str, prefix: str) -> str:
    lines = ["auth:", "  enabled: true", "  keys:"]
    for key_id, tier in (("a", "rpm"), ("b", "rpm"), ("steady", "big")):
        lines.append(f"    - {{id: {key_id}, key: {KEY}-{key_id}, tier: {tier}}}")
    lines += [
        "tiers:",
        f"  rpm: {{rpm: {RPM}}}",
        "  big: {rpm: 100000}",
        "limits:",
        "  backend: redis",
        "  redis:",
        f"    url: '{url}'",
        f"    key_prefix: '{prefix}'",
        "    on_error: fail_closed",
        "    timeout_ms: 1000",
        "    retry_interval_ms: 200",
    ]
    return "\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def gateway_on_cluster(
    cluster: LocalCluster, mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    prefix = f"fp-test:{uuid.uuid4().hex[:10]}:"
    text = auth_config(mock_upstream.port, _limits_yaml(cluster.url, prefix))
    with run_gateway(tmp_path_factory.mktemp("gw-cluster"), mock_upstream, config_text=text, workers=2) as g:
        yield g, prefix


def _chat(port: int, key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json", "authorization": f"Bearer {key}"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return -1
    finally:
        conn.close()


def test_rpm_exact_across_workers_on_the_cluster(
    cluster: LocalCluster, gateway_on_cluster: tuple[Gateway, str]
) -> None:
    g, prefix = gateway_on_cluster
    with ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda i: _chat(g.port, f"{KEY}-{'ab'[i % 2]}"), range(4 * RPM)))
    for key_id in "ab":
        mine = statuses["ab".index(key_id) :: 2]
        assert mine.count(200) == RPM and mine.count(429) == RPM, mine
        bucket = f"{prefix}{{{key_id}}}:r"  # on the primary of its key id's slot
        assert cluster.command(cluster.owner(key_slot(bucket)), "EXISTS", bucket) == "1"


def test_killed_primary_under_load(
    cluster: LocalCluster, gateway_on_cluster: tuple[Gateway, str], prefix: str
) -> None:
    """SIGKILL the primary of the gateway's key and of half the client's keys while both run: calls
    fail as RedisError (the gateway: 503, fail_closed) until a replica is promoted, then succeed
    again, with no restart and a bounded number of map refreshes. Last: it leaves a node dead."""
    g, gw_prefix = gateway_on_cluster
    victim = cluster.owner(key_slot(f"{gw_prefix}{{steady}}:r"))
    keys = [f"{prefix}x{i}" for i in range(40)]
    gw_statuses: list[tuple[float, int]] = []
    stop_gw = threading.Event()

    def gateway_load() -> None:
        while not stop_gw.is_set():
            gw_statuses.append((time.monotonic(), _chat(g.port, f"{KEY}-steady")))
            time.sleep(0.01)

    async def main(c: RedisCluster) -> None:
        stop = asyncio.Event()
        errors: list[BaseException] = []
        load = asyncio.ensure_future(_load(c, keys, stop, errors))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.kill, victim)
        killed = time.monotonic()
        deadline = killed + 20
        while True:  # until every key answers again
            results = await asyncio.gather(*(c.execute("GET", k) for k in keys), return_exceptions=True)
            if not any(isinstance(r, BaseException) for r in results):
                break
            assert time.monotonic() < deadline, f"no recovery: {results[:3]}"
            await asyncio.sleep(0.1)
        recovered = time.monotonic() - killed
        await asyncio.sleep(0.3)
        stop.set()
        await load
        assert errors, "the kill went unnoticed"
        assert all(isinstance(e, RedisError) for e in errors), {type(e) for e in errors}
        assert c.refreshes < 10 + 4 * recovered / 0.5, (c.refreshes, recovered)  # spaced, no storm

    t = threading.Thread(target=gateway_load)
    t.start()
    try:
        run(main, cluster.url)
        end = time.monotonic() + 20
        while time.monotonic() < end:  # the gateway recovers too (its retry interval: 200 ms)
            if [s for _, s in gw_statuses[-5:]] == [200] * 5:
                break
            time.sleep(0.1)
    finally:
        stop_gw.set()
        t.join()
    seen = {s for _, s in gw_statuses}
    assert seen == {200, 503}, seen  # refused while its primary was down (fail_closed), never wrong
    assert [s for _, s in gw_statuses[-5:]] == [200] * 5
