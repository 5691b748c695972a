"""Redis Cluster over the lean RESP client: one pipelined `redis_resp.Redis` per primary, a slot
map, redirections, and recovery from a failover without a restart.

Why here and not redis-py's cluster client: the same reason as `redis_resp` (its per-call Python
is several times ours); a cluster call is a slot lookup, the node's pipelined call, and one more
future that follows a redirection.

- The slot map comes from `CLUSTER SLOTS` (Redis 3+), asked of the known nodes then the seeds; the
  first call waits for it (single-flight). A command goes to the primary of its key's slot: CRC16
  of the key, or of its `{hash tag}` (so keys sharing a tag share a slot, what a multi-key Lua
  script needs). EVAL/EVALSHA/FCALL route by their first key, other commands by the argument after
  the name; keyless commands (PING, SCRIPT, INFO, ...) go to any primary.
- `MOVED slot host:port`: the slot is remapped at once, the command re-sent there, and a map refresh
  requested; `ASK slot host:port`: ASKING + the command on that node, the map unchanged. At most
  `MAX_REDIRECTS` hops per call.
- Failover: a connection error, `CLUSTERDOWN` or a redirection requests a refresh. Refreshes are
  coalesced and spaced: the gap doubles from `backoff_min_s` to `backoff_max_s` while a refresh
  finds nothing new (a dead primary is listed until its replica is promoted), and resets when the
  map changes. A call in flight on a failing node fails with its `RedisError` (never retried: it
  may have run), so the caller's fail-open / fail-closed policy applies.
- Ordering: calls of one slot share one connection, so they run in call order (a settlement sent
  without waiting still runs before a later decision on the same keys), except across a
  redirection (the redirected call runs later).

URL: `redis+cluster://[[user]:password@]host:port[,host:port...]` (seed nodes; `rediss+cluster://`
for TLS with `rediss://`'s query parameters). Every node is reached with the same credentials and
TLS settings; a cluster has only database 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from binascii import crc_hqx
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from .redis_resp import Arg, ConnectError, Redis, RedisError, ReplyError, parse_url

__all__ = ["MAX_REDIRECTS", "SLOTS", "ClusterUrl", "RedisCluster", "key_slot", "parse_cluster_url"]

log = logging.getLogger("gateway.redis")

SLOTS = 16384
#: redirections followed per call (a resharding moves a slot once; more is a loop)
MAX_REDIRECTS = 3
#: commands whose second argument is not a key: routed to any primary
_KEYLESS = frozenset(
    [
        *("PING", "ECHO", "INFO", "TIME", "CLIENT", "CLUSTER", "SCRIPT", "FUNCTION", "DBSIZE"),
        *("CONFIG", "COMMAND", "FLUSHALL", "FLUSHDB", "WAIT", "LASTSAVE", "SLOWLOG", "LATENCY"),
        *("MEMORY", "HELLO", "AUTH", "SELECT", "ASKING", "READONLY", "READWRITE"),
    ]
)
_SCRIPTS = frozenset(("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"))


def key_slot(key: Arg) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM, `binascii.crc_hqx`) of its hash tag (the text
    between the first `{` and the next `}`, when not empty) or of the whole key, mod 16384."""
    raw = key if isinstance(key, bytes) else str(key).encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc_hqx(raw, 0) & (SLOTS - 1)


class ClusterUrl(NamedTuple):
    #: (host, port) of each seed node
    seeds: tuple[tuple[str, int], ...]
    #: `redis` or `rediss`
    scheme: str
    #: `user:password@` as written ('' for none)
    userinfo: str
    query: str

    def node_url(self, host: str, port: int) -> str:
        """The single-node URL of one node: the same credentials and TLS settings."""
        h = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{self.userinfo}{h}:{port}/" + (f"?{self.query}" if self.query else "")


def parse_cluster_url(url: str) -> ClusterUrl:
    """`redis+cluster://` or `rediss+cluster://` URL -> its seeds and node settings. Raises
    ValueError (never quoting the URL: it may carry a password)."""
    u = urlsplit(url)
    if u.scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError("Redis Cluster URL: must be a redis+cluster:// or rediss+cluster:// URL")
    userinfo, at, hosts = u.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            raise ValueError("Redis Cluster URL: needs host:port seed addresses, comma-separated")
        try:
            seed = urlsplit("//" + part)
            port = seed.port or 6379
        except ValueError:
            raise ValueError("Redis Cluster URL: a seed's port is not a port number") from None
        if not seed.hostname:
            raise ValueError("Redis Cluster URL: a seed has no host")
        seeds.append((seed.hostname, port))
    if u.path not in ("", "/"):
        raise ValueError("Redis Cluster URL: no path (a cluster has only database 0)")
    parsed = ClusterUrl(tuple(seeds), u.scheme.split("+")[0], userinfo + at, u.query)
    host, port = seeds[0]
    if parse_url(parsed.node_url(host, port)).db != 0:  # also checks the TLS parameters
        raise ValueError("Redis Cluster URL: a cluster has only database 0")
    return parsed


def _swallow(fut: asyncio.Future[Any]) -> None:
    """Retrieve a reply nobody needs (ASKING's), so asyncio never logs it as unretrieved."""
    if not fut.cancelled():
        fut.exception()


class RedisCluster:
    """A Redis Cluster client for one event loop: `redis_resp.Redis`'s calls, routed by slot."""

    __slots__ = (
        "_backoff_max_s",
        "_backoff_min_s",
        "_closed",
        "_closing",
        "_connect_timeout_s",
        "_loop",
        "_map_error",
        "_map_retry_at",
        "_nodes",
        "_nowait",
        "_primaries",
        "_refresh_at",
        "_refresh_gap_s",
        "_refresh_timer",
        "_refreshing",
        "_slot_cache",
        "_slots",
        "_url",
        "_waiting",
        "dropped_errors",
        "redirects",
        "refreshes",
        "scripts",
        "timeout_s",
        "where",
    )

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 1.0,
    ) -> None:
        self._url = parse_cluster_url(url)
        self.where = "cluster " + ",".join(f"{h}:{p}" for h, p in self._url.seeds)
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._backoff_min_s = min(backoff_min_s, backoff_max_s)
        self._backoff_max_s = backoff_max_s
        #: "host:port" -> that node's client (primaries in the map, seeds, redirection targets)
        self._nodes: dict[str, Redis] = {}
        #: slot -> its primary's client (None: not served, or the map is not known yet)
        self._slots: list[Redis | None] = [None] * SLOTS
        #: the distinct primaries of the map ("host:port"), for keyless commands and barriers
        self._primaries: list[str] = []
        self._slot_cache: dict[Arg, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        #: no refresh starts before this loop time; the gap grows while refreshes find nothing new
        self._refresh_at = 0.0
        self._refresh_gap_s = self._backoff_min_s
        #: the map was never fetched: calls fail fast until this loop time, saying why
        self._map_retry_at = 0.0
        self._map_error = ""
        #: calls made before the first map: (command, is a script, slot, future)
        self._waiting: list[tuple[tuple[Arg, ...], bool, int, asyncio.Future[Any]]] = []
        #: `evalsha_nowait` calls not answered yet (`barrier` waits for them)
        self._nowait: set[asyncio.Future[Any]] = set()
        self._closed = False
        #: clients of nodes that left the map, closing (`close` waits for them)
        self._closing: set[asyncio.Task[None]] = set()
        self.scripts: dict[str, str] = {}
        #: error replies to `*_nowait` calls
        self.dropped_errors = 0
        #: MOVED / ASK followed, map refreshes done (tests, diagnostics)
        self.redirects = 0
        self.refreshes = 0

    # ---- calls --------------------------------------------------------------------------------
    def register_script(self, source: str) -> str:
        """Remember a Lua script on every node (loaded on each new connection); returns its sha1."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        self.scripts[sha] = source
        for node in self._nodes.values():
            node.register_script(source)
        return sha

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """One command, routed by its key (see the module's routing rules)."""
        return self._call(args, False, self._command_slot(args))

    def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """EVALSHA on the primary of its keys' slot (they must share one: a hash tag)."""
        cmd = ("EVALSHA", sha, len(keys), *keys, *args)
        return self._call(cmd, True, self._slot(keys[0]) if keys else -1)

    def evalsha_nowait(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> None:
        """`evalsha` that nobody waits for (redirections still followed; error replies counted
        in `dropped_errors`); `barrier` waits for it."""
        fut = self.evalsha(sha, keys, args)
        self._nowait.add(fut)
        fut.add_done_callback(self._nowait_done)

    def _nowait_done(self, fut: asyncio.Future[Any]) -> None:
        self._nowait.discard(fut)
        if not fut.cancelled() and isinstance(fut.exception(), ReplyError):
            self.dropped_errors += 1

    async def barrier(self) -> None:
        """Wait until every `*_nowait` call made so far has been answered; raises RedisError if
        the cluster cannot be reached."""
        if self._nowait:
            await asyncio.gather(*self._nowait, return_exceptions=True)
        await self.execute("PING")

    def _slot(self, key: Arg) -> int:
        slot = self._slot_cache.get(key)
        if slot is None:
            if len(self._slot_cache) >= 65_536:
                self._slot_cache.clear()
            slot = self._slot_cache[key] = key_slot(key)
        return slot

    def _command_slot(self, args: tuple[Arg, ...]) -> int:
        if len(args) < 2:
            return -1
        name = args[0]
        name = (name.decode() if isinstance(name, bytes) else str(name)).upper()
        if name in _SCRIPTS:
            return self._slot(args[3]) if len(args) > 3 and int(args[2]) > 0 else -1
        return -1 if name in _KEYLESS else self._slot(args[1])

    def _call(self, cmd: tuple[Arg, ...], script: bool, slot: int) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._primaries:
            self._wait_for_map(cmd, script, slot, fut)
            return fut
        self._send(cmd, script, slot, fut)
        return fut

    def _send(self, cmd: tuple[Arg, ...], script: bool, slot: int, fut: asyncio.Future[Any]) -> None:
        node = self._slots[slot] if slot >= 0 else self._nodes.get(self._primaries[0])
        if node is None:
            self.request_refresh()
            fut.set_exception(ConnectError(f"Redis {self.where}: no node serves slot {slot}"))
            return
        inner = node.call(cmd, script)
        inner.add_done_callback(partial(self._reply, fut, cmd, script, slot, 0, node))

    def _reply(
        self,
        fut: asyncio.Future[Any],
        cmd: tuple[Arg, ...],
        script: bool,
        slot: int,
        hops: int,
        node: Redis,
        inner: asyncio.Future[Any],
    ) -> None:
        """A node answered (or failed): resolve the caller's future, or follow a redirection."""
        if inner.cancelled():
            if not fut.done():
                fut.cancel()
            return
        exc = inner.exception()
        if fut.done():  # the caller gave up
            return
        if exc is None:
            fut.set_result(inner.result())
            return
        if isinstance(exc, ReplyError):
            msg = str(exc)
            if msg.startswith(("MOVED ", "ASK ")) and hops < MAX_REDIRECTS:
                kind, slot_text, addr = msg.split(" ", 2)
                host, _, port = addr.rpartition(":")
                target = self._node(host or node.where.rpartition(":")[0], int(port))
                self.redirects += 1
                if kind == "MOVED":
                    self._slots[int(slot_text)] = target
                    self.request_refresh()
                else:  # one command may run on the importing node: the map stays
                    target.call(("ASKING",)).add_done_callback(_swallow)
                again = target.call(cmd, script)
                again.add_done_callback(partial(self._reply, fut, cmd, script, slot, hops + 1, target))
                return
            if msg.startswith(("CLUSTERDOWN", "MOVED ", "ASK ")):
                self.request_refresh()
        elif isinstance(exc, ConnectionError):
            self.request_refresh()
        fut.set_exception(exc)

    # ---- the slot map -------------------------------------------------------------------------
    def _node(self, host: str, port: int) -> Redis:
        addr = f"{host}:{port}"
        node = self._nodes.get(addr)
        if node is None:
            node = self._nodes[addr] = Redis(
                self._url.node_url(host, port),
                timeout_s=self.timeout_s,
                connect_timeout_s=self._connect_timeout_s,
                backoff_min_s=self._backoff_min_s,
                backoff_max_s=self._backoff_max_s,
            )
            for source in self.scripts.values():
                node.register_script(source)
        return node

    def _wait_for_map(self, cmd: tuple[Arg, ...], script: bool, slot: int, fut: asyncio.Future[Any]) -> None:
        if self._closed:
            fut.set_exception(ConnectError(f"Redis client for {self.where} is closed"))
            return
        assert self._loop is not None
        wait_s = self._map_retry_at - self._loop.time()
        if self._refreshing is None and wait_s > 0:
            fut.set_exception(
                ConnectError(f"Redis {self.where}: no slot map for {wait_s:.3f} s after: {self._map_error}")
            )
            return
        self._waiting.append((cmd, script, slot, fut))
        if self._refreshing is None:
            self._start_refresh()

    def request_refresh(self) -> None:
        """Fetch the slot map again soon: now, or when the gap since the last refresh has passed."""
        if self._closed or self._refreshing is not None or self._refresh_timer is not None:
            return
        loop = self._loop
        if loop is None:
            return
        if loop.time() >= self._refresh_at:
            self._start_refresh()
        else:
            self._refresh_timer = loop.call_at(self._refresh_at, self._start_refresh)

    def _start_refresh(self) -> None:
        self._refresh_timer = None
        if self._refreshing is None and not self._closed:
            assert self._loop is not None
            self._refreshing = self._loop.create_task(self._refresh())

    async def _refresh(self) -> None:
        loop = self._loop
        assert loop is not None
        error = "no node to ask"
        changed = False
        found = False
        try:
            # the primaries we know first (after a failover they know the new one), then the seeds
            asked = [*self._primaries, *(f"{h}:{p}" for h, p in self._url.seeds)]
            for addr in dict.fromkeys(asked):
                host, _, port = addr.rpartition(":")
                node = self._node(host, int(port))
                try:
                    reply = await node.execute("CLUSTER", "SLOTS")
                    changed = self._apply(reply, host)
                except (RedisError, ValueError, TypeError, IndexError) as exc:
                    error = f"{addr}: {exc}"
                    continue
                found = True
                break
        finally:
            self._refreshing = None
            self.refreshes += 1
            if changed:
                self._refresh_gap_s = self._backoff_min_s
            else:
                self._refresh_gap_s = min(self._refresh_gap_s * 2, self._backoff_max_s)
            self._refresh_at = loop.time() + self._refresh_gap_s
        waiting, self._waiting = self._waiting, []
        if found:
            self._map_retry_at = 0.0
            for cmd, script, slot, fut in waiting:
                if not fut.done():
                    self._send(cmd, script, slot, fut)
            return
        self._map_error = error
        self._map_retry_at = loop.time() + self._refresh_gap_s
        log.warning("Redis %s: cannot fetch the slot map (%s)", self.where, error)
        for _, _, _, fut in waiting:
            if not fut.done():
                fut.set_exception(ConnectError(f"Redis {self.where}: no slot map: {error}"))

    def _apply(self, reply: list[Any], asked_host: str) -> bool:
        """Install a `CLUSTER SLOTS` reply; True if any slot changed primary."""
        slots: list[Redis | None] = [None] * SLOTS
        primaries: dict[str, None] = {}
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            if host in ("", "?"):  # the node does not know its own address: the one we used
                host = asked_host
            node = self._node(host, int(primary[1]))
            primaries[f"{host}:{int(primary[1])}"] = None
            slots[start : end + 1] = [node] * (end - start + 1)
        if not primaries:
            raise ValueError("the cluster serves no slots")
        changed = any(a is not b for a, b in zip(slots, self._slots, strict=True))
        self._slots = slots
        self._primaries = list(primaries)
        # nodes that are no longer primaries nor seeds: closed (their calls in flight finish)
        keep = set(primaries) | {f"{h}:{p}" for h, p in self._url.seeds}
        for addr in [a for a in self._nodes if a not in keep]:
            old = self._nodes.pop(addr)
            assert self._loop is not None
            task = self._loop.create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if changed:
            log.info("Redis %s: slot map: %d primaries", self.where, len(primaries))
        return changed

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return any(node.connected for node in self._nodes.values())

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Stop refreshing, let the calls in flight finish (as `Redis.close`), close every node."""
        self._closed = True
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        refreshing = self._refreshing
        if refreshing is not None:
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing
        for _, _, _, fut in self._waiting:
            if not fut.done():
                fut.set_exception(ConnectError(f"Redis client for {self.where} closed"))
        self._waiting = []
        nodes = list(self._nodes.values())
        await asyncio.gather(*(n.close(drain_timeout_s) for n in nodes), *self._closing)
