"""Load balancers: which deployment of a priority group takes an attempt (issue 13).

The dispatcher calls `pick(ctx, candidates)` once per attempt; `candidates` is non-empty and
holds the usable (healthy, breaker closed, not full, not yet tried) deployments of one priority
group. A balancer is per worker and per route, so its state is plain Python without locks. The
routing decision has a budget of 2 µs at 16 deployments, so the common case (`candidates` is
the whole group) takes fast paths precomputed here: the round-robin cycle, cumulative weights,
the affinity ring's preference lists. Subsets (a retry, an ejected replica) take the general,
O(n) path.
"""

from __future__ import annotations

import hashlib
import math
import random as _random
import zlib
from bisect import bisect_right
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ..config_routing import BalanceKind
from ..schemas import ChatRequestView, Message

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ..config import ModelConfig
    from ..context import RequestContext
    from .deployment import Deployment

#: longest precomputed round-robin cycle (sum of gcd-reduced weights); longer: the O(n) path
MAX_CYCLE = 4096
#: affinity ring: virtual nodes per unit of (gcd-reduced) weight, and at most this many in all
VNODES_PER_WEIGHT = 100
MAX_VNODES = 8192
#: affinity with `sticky_return: false`: sessions remembered away from their ring owner
MAX_MOVED = 65536


class Balancer(Protocol):
    def pick(self, ctx: RequestContext, candidates: Sequence[Deployment]) -> Deployment: ...


def make_balancer(
    model: ModelConfig, deployments: Sequence[Deployment], *, rand: Callable[[], float] | None = None
) -> Balancer:
    """The model's balancer over all its deployments. `rand` (a uniform [0, 1) source) is for
    tests; the default is the `random` module's."""
    r = rand or _random.random
    kind = model.balance
    if kind == BalanceKind.ROUND_ROBIN:
        return RoundRobin(deployments)
    if kind == BalanceKind.LATENCY:
        return LeastLatency(deployments, r)
    if kind == BalanceKind.AFFINITY:
        a = model.affinity
        return Affinity(deployments, r, a.key, a.prefix_messages, a.load_factor, a.sticky_return)
    return PowerOfTwo(deployments, r)


class _Group:
    """One priority group's precomputed tables (for when the candidates are all of it)."""

    __slots__ = ("cum", "cycle", "members", "pos", "size", "total")

    def __init__(self, members: tuple[Deployment, ...]) -> None:
        self.members = members
        self.size = len(members)
        weights = [d.weight for d in members]
        g = math.gcd(*weights)
        reduced = [w // g for w in weights]
        #: cumulative weights (p2c's weighted sampling); None when the weights are all equal
        self.cum: list[int] | None = None
        self.total = sum(weights)
        if len(set(weights)) > 1:
            acc = 0
            self.cum = []
            for w in weights:
                acc += w
                self.cum.append(acc)
        #: one full smooth weighted round-robin cycle (nginx's order), or None when too long
        self.cycle: tuple[Deployment, ...] | None = None
        if sum(reduced) <= MAX_CYCLE:
            current = [0] * len(members)
            total = sum(reduced)
            order: list[Deployment] = []
            for _ in range(total):
                best = 0
                for i, w in enumerate(reduced):
                    current[i] += w
                    if current[i] > current[best]:
                        best = i
                current[best] -= total
                order.append(members[best])
            self.cycle = tuple(order)
        self.pos = 0


def _groups(deployments: Sequence[Deployment]) -> dict[int, _Group]:
    prios = sorted({d.priority for d in deployments})
    return {p: _Group(tuple(d for d in deployments if d.priority == p)) for p in prios}


class RoundRobin:
    """Smooth weighted round robin (nginx): over a cycle each deployment gets exactly its weight's
    share, interleaved rather than in bursts."""

    __slots__ = ("_current", "_groups")

    def __init__(self, deployments: Sequence[Deployment]) -> None:
        self._groups = _groups(deployments)
        #: the subset path's current weights, by `Deployment.index` (nginx keeps them per peer)
        self._current = [0] * (max(d.index for d in deployments) + 1)

    def pick(self, ctx: RequestContext, candidates: Sequence[Deployment]) -> Deployment:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        g = self._groups[candidates[0].priority]
        cycle = g.cycle
        if n == g.size and cycle is not None:
            pos = g.pos
            g.pos = pos + 1 if pos + 1 < len(cycle) else 0
            return cycle[pos]
        current = self._current
        total = 0
        best = candidates[0]
        best_c = -(1 << 62)
        for d in candidates:
            w = d.weight
            c = current[d.index] + w
            current[d.index] = c
            total += w
            if c > best_c:
                best, best_c = d, c
        current[best.index] -= total
        return best


class PowerOfTwo:
    """Power of two choices: two distinct random candidates (by weight when weights differ), the
    one with fewer requests in flight per unit of weight wins. Near least-loaded at O(1)."""

    __slots__ = ("_groups", "_rand", "_weighted")

    def __init__(self, deployments: Sequence[Deployment], rand: Callable[[], float]) -> None:
        self._groups = _groups(deployments)
        self._rand = rand
        self._weighted = any(g.cum is not None for g in self._groups.values())

    def _pair(self, candidates: Sequence[Deployment], n: int) -> tuple[Deployment, Deployment, bool]:
        """Two distinct candidates; the flag says whether weights differ (then a tie needs a
        coin: weighted draws are not symmetric in order)."""
        r = self._rand
        if self._weighted:
            g = self._groups[candidates[0].priority]
            if n == g.size:
                cum = g.cum
                if cum is not None:
                    table = g.cycle  # each deployment `weight` times: draw by weight in O(1)
                    if table is not None:
                        size = len(table)
                        a = table[int(r() * size)]
                        for _ in range(4):  # rejection: the second among the others, by weight
                            b = table[int(r() * size)]
                            if b is not a:
                                return a, b, True
                        return _weighted_pair(g.members, cum, g.total, r, g.members.index(a))
                    return _weighted_pair(g.members, cum, g.total, r, -1)
            else:
                w0 = candidates[0].weight
                differ = False
                sums: list[int] = []
                acc = 0
                for d in candidates:
                    w = d.weight
                    acc += w
                    sums.append(acc)
                    differ = differ or w != w0
                if differ:
                    return _weighted_pair(candidates, sums, acc, r, -1)
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        return candidates[i], candidates[j], False

    def pick(self, ctx: RequestContext, candidates: Sequence[Deployment]) -> Deployment:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        if not self._weighted:  # inline: the common case
            r = self._rand
            i = int(r() * n)
            j = int(r() * (n - 1))
            if j >= i:
                j += 1
            a = candidates[i]
            b = candidates[j]
            return b if b.outstanding < a.outstanding else a  # (i, j) is symmetric: ties random
        a, b, weighted = self._pair(candidates, n)
        if not weighted:
            return b if b.outstanding < a.outstanding else a
        la = a.outstanding * b.weight
        lb = b.outstanding * a.weight
        if la == lb:
            return a if self._rand() < 0.5 else b
        return a if la < lb else b


def _weighted_pair(
    members: Sequence[Deployment], cum: list[int], total: int, r: Callable[[], float], i: int
) -> tuple[Deployment, Deployment, bool]:
    """Draw one by weight (unless `i` >= 0 is drawn already), then another by weight among the
    rest (the first's span cut out of the draw)."""
    n = len(members)
    if i < 0:
        i = bisect_right(cum, r() * total)
        if i >= n:  # float edge
            i = n - 1
    wa = members[i].weight
    y = r() * (total - wa)
    if y >= cum[i] - wa:
        y += wa
    j = bisect_right(cum, y)
    if j >= n or j == i:  # float edges
        j = (i + 1) % n
    return members[i], members[j], True


class LeastLatency(PowerOfTwo):
    """Envoy-like least request with latency: of two random candidates, the lower
    EWMA x (1 + in flight) wins, the EWMA being of TTFT for streams and of whole latency
    otherwise. A deployment without samples wins while it has no more in flight than the other
    (so it gets sampled), but is not flooded before its first answer comes back."""

    __slots__ = ()

    def pick(self, ctx: RequestContext, candidates: Sequence[Deployment]) -> Deployment:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        a, b, _ = self._pair(candidates, n)
        if ctx.stream:
            sa, sb = a.ttft, b.ttft
        else:
            sa, sb = a.latency, b.latency
        ao = a.outstanding
        bo = b.outstanding
        if sa.count and sb.count:
            xa = sa.ewma * (1 + ao)
            xb = sb.ewma * (1 + bo)
        elif sa.count:  # b unsampled
            return b if bo <= ao else a
        elif sb.count:
            return a if ao <= bo else b
        else:
            xa, xb = ao, bo
        if xa == xb:
            return a if self._rand() < 0.5 else b
        return a if xa < xb else b


class _UserView(msgspec.Struct):
    user: Any = None


_decode_user = msgspec.json.Decoder(_UserView).decode
_decode_chat = msgspec.json.Decoder(ChatRequestView).decode
#: the decode stage's view carries `user` (else: decoded here from the body)
_VIEW_HAS_USER = "user" in ChatRequestView.__struct_fields__
#: a prefix message longer than this is hashed by its head, tail and length (bounded cost)
PREFIX_HASH_CHARS = 128


def _prefix_key(messages: list[Message], count: int) -> int | None:
    """crc32 of the leading messages' roles and text: the part of the prompt a replica's KV
    cache holds. Long texts count by head, length and tail, so the cost is bounded per message
    (two prompts alike in all three share a replica: harmless)."""
    if not messages:
        return None
    pieces: list[str] = []
    for m in messages[:count]:
        pieces.append(m.role)
        parts = m.content
        if parts is None:
            continue
        content = parts if isinstance(parts, str) else "\x00".join(p.text or p.type for p in parts)
        if len(content) > 2 * PREFIX_HASH_CHARS:
            pieces += (content[:PREFIX_HASH_CHARS], str(len(content)), content[-PREFIX_HASH_CHARS:])
        else:
            pieces.append(content)
    return zlib.crc32("\x00".join(pieces).encode())


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big")


class Affinity:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam) on a session key,
    so that a conversation keeps landing on the replica that holds its KV cache.

    The ring holds every deployment (`100 x weight` virtual nodes, placed by name, so the same in
    every worker and across restarts); restricted to the candidates it is the consistent hash of
    that subset, so an ejected replica moves only its own sessions. From the key's point the
    first candidate with at most `ceil(load_factor x (in flight + 1) / n)` requests in flight
    takes it (the config's "at most load_factor x the mean (+1)"); one always qualifies, since
    the least loaded is at most the mean. No key: power of two choices.

    `sticky_return: false`: a session that had to leave its ring owner (owner down, full, or
    over the bound) is remembered on its new replica (LRU) and stays there while that one is
    usable, instead of moving back (a second cache miss) when the owner returns. Being excluded
    as already tried by this request (a retry, a hedge) is not a move.
    """

    __slots__ = (
        "_fallback",
        "_header",
        "_lf",
        "_mode",
        "_moved",
        "_points",
        "_prefix",
        "_prefs",
        "_sizes",
        "_sticky",
    )

    def __init__(
        self,
        deployments: Sequence[Deployment],
        rand: Callable[[], float],
        key: str,
        prefix_messages: int,
        load_factor: float,
        sticky_return: bool,
    ) -> None:
        self._fallback = PowerOfTwo(deployments, rand)
        self._mode = key if key in ("user", "prefix") else "header"
        self._header = key.removeprefix("header:").lower()
        self._prefix = prefix_messages
        self._lf = load_factor
        self._sticky = sticky_return
        self._moved: dict[int, Deployment] = {}
        self._sizes: dict[int, int] = {}
        for d in deployments:
            self._sizes[d.priority] = self._sizes.get(d.priority, 0) + 1
        self._points, self._prefs = _ring(deployments)

    def key(self, ctx: RequestContext) -> int | None:
        """The session key's 32-bit hash (crc32: stable across processes, ~50 ns), or None."""
        mode = self._mode
        if mode == "header":
            headers = ctx.headers
            value = headers.get(self._header) if headers is not None else None
            return zlib.crc32(value.encode()) if value else None
        view = ctx.view
        if mode == "user":
            if view is not None and _VIEW_HAS_USER:
                user = getattr(view, "user", None)
            elif b'"user"' in ctx.body:  # (a key spelled with \u escapes counts as none)
                try:
                    user = _decode_user(ctx.body).user
                except msgspec.DecodeError:
                    return None
            else:
                return None
            return zlib.crc32(user.encode()) if user and type(user) is str else None
        if view is None:
            try:
                view = _decode_chat(ctx.body)
            except msgspec.DecodeError:
                return None
        if type(view) is not ChatRequestView:
            return None
        return _prefix_key(view.messages, self._prefix)

    def pick(self, ctx: RequestContext, candidates: Sequence[Deployment]) -> Deployment:
        h = self.key(ctx)
        if h is None:
            return self._fallback.pick(ctx, candidates)
        n = len(candidates)
        sticky = self._sticky
        if n == 1 and sticky:
            return candidates[0]
        prio = candidates[0].priority
        whole = n == self._sizes[prio]
        mask = 0
        if not whole:
            for c in candidates:
                mask |= 1 << c.index
        bound = -1
        moved = self._moved
        if not sticky and moved:
            d = moved.get(h)
            if d is not None and (d.priority == prio if whole else (mask >> d.index) & 1):
                o = d.outstanding
                if o > 1:
                    bound = self._bound(candidates, n)
                if o <= 1 or o <= bound:
                    del moved[h]  # re-inserted last: the LRU order
                    moved[h] = d
                    return d
        prefs = self._prefs[bisect_right(self._points, h) % len(self._points)]
        chosen: Deployment | None = None
        for d in prefs:
            if whole:
                if d.priority != prio:
                    continue
            elif not (mask >> d.index) & 1:
                continue
            o = d.outstanding
            if o > 1:  # bound >= ceil(lf x (o + 1) / n) >= 1: 0 and 1 always fit
                if bound < 0:
                    bound = self._bound(candidates, n)
                if o > bound:
                    continue
            chosen = d
            break
        if chosen is None:  # unreachable by the arithmetic above; kept for safety
            chosen = min(candidates, key=_outstanding)
        if not sticky:
            owner = prefs[0]
            if owner.priority != prio:
                owner = next(d for d in prefs if d.priority == prio)
            if chosen is not owner:
                self._remember(h, owner, whole, mask, chosen)
            elif moved:
                moved.pop(h, None)
        return chosen

    def _bound(self, candidates: Sequence[Deployment], n: int) -> int:
        total = 0
        for c in candidates:
            total += c.outstanding
        return math.ceil(self._lf * (total + 1) / n)

    def _remember(self, h: int, owner: Deployment, whole: bool, mask: int, chosen: Deployment) -> None:
        """The session left its ring owner: remember where it went, unless the owner was only
        left out as already tried by this request (a retry, a hedge): that is not a move."""
        moved = self._moved
        if (
            whole
            or (mask >> owner.index) & 1  # a candidate, passed over: over the bound
            or not owner.healthy
            or owner.full()
            or owner.breaker.state != "closed"
        ):
            moved.pop(h, None)  # re-inserted last: the LRU order
            if len(moved) >= MAX_MOVED:
                del moved[next(iter(moved))]
            moved[h] = chosen

    def owner(self, key: int, priority: int = 0) -> Deployment:
        """The ring owner of a key hash in a priority group (for tests and debugging)."""
        prefs = self._prefs[bisect_right(self._points, key) % len(self._points)]
        return next(d for d in prefs if d.priority == priority)


def _outstanding(d: Deployment) -> int:
    return d.outstanding


def _ring(deployments: Sequence[Deployment]) -> tuple[list[int], list[tuple[Deployment, ...]]]:
    """Sorted ring points and, per point, every deployment in the order a walk meets them."""
    g = math.gcd(*(d.weight for d in deployments))
    units = [d.weight // g for d in deployments]
    scale = min(1.0, MAX_VNODES / (VNODES_PER_WEIGHT * sum(units)))
    placed = [
        (_point(f"{d.name}#{v}".encode()), d.index, d)
        for d, u in zip(deployments, units, strict=True)
        for v in range(max(1, round(u * VNODES_PER_WEIGHT * scale)))
    ]
    placed.sort(key=lambda t: (t[0], t[1]))
    points = [p for p, _, _ in placed]
    owners = [d for _, _, d in placed]
    size = len(owners)
    prefs: list[tuple[Deployment, ...]] = [()] * size
    after: tuple[Deployment, ...] = ()
    # walk backwards twice: the second lap sees every deployment past the wrap-around
    for lap in range(2):
        for i in range(size - 1, -1, -1):
            d = owners[i]
            after = (d, *(x for x in after if x is not d))
            if lap:
                prefs[i] = after
    return points, prefs
