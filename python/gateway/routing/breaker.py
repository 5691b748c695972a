"""Circuit breaking / outlier ejection per deployment (per worker), Envoy's model.

A deployment is ejected (the breaker opens) after `consecutive_failures` failed attempts in a
row, or when failures are at least `error_ratio` of the attempts of the last `window_s` seconds
once `min_requests` were seen. It stays out for `base_ejection_ms` x its ejection streak (at most
`max_ejection_ms`): a deployment that keeps failing is left alone longer each time. Then one
attempt goes through as a probe (half-open): success closes the breaker, failure ejects it again.

The dispatcher decides what a failure is (connect errors, timeouts, 5xx: not the client's 4xx)
and calls `record` once per attempt; `record` is on the request path, so a closed breaker's
bookkeeping is a few integer updates. Nothing runs on a timer: an ejection ends by the clock
(`available(now)`), so a route caches its usable deployments only while every breaker is closed
(`on_change` tells it when that stops or starts being true).

An `EjectionGroup` (one per route) holds `max_ejected_percent`: a breaker never opens when that
would leave too few of the route's deployments taking traffic; it stays closed and keeps
counting. With one deployment and less than 100 %, nothing is ever ejected: a lone upstream is
tried rather than refused, as before there were breakers.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config_routing import BreakerConfig

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

#: buckets of the error-ratio window (each `window_s / _BUCKETS` seconds)
_BUCKETS = 10
#: the streak of ejections starts over after this long closed (in units of max_ejection_ms)
_STREAK_RESET = 1.0


class EjectionGroup:
    """The breakers of one route's deployments: enforces `max_ejected_percent` across them."""

    __slots__ = ("breakers", "ejected", "max_percent")

    def __init__(self, cfg: BreakerConfig) -> None:
        self.max_percent = cfg.max_ejected_percent
        self.breakers: list[Breaker] = []
        #: breakers not closed now (open, or half-open with a probe pending)
        self.ejected = 0

    def add(self, breaker: Breaker) -> None:
        self.breakers.append(breaker)

    def may_eject(self) -> bool:
        """One more ejection keeps the ejected share within `max_ejected_percent`."""
        return (self.ejected + 1) * 100 <= self.max_percent * len(self.breakers)


class Breaker:
    """One deployment's breaker. `now` is the worker's loop clock (seconds)."""

    __slots__ = (
        "_base_s",
        "_bucket",
        "_closed_at",
        "_consecutive",
        "_enabled",
        "_failed",
        "_fails",
        "_group",
        "_inv_width",
        "_max_consecutive",
        "_max_s",
        "_min_requests",
        "_probe_at",
        "_ratio",
        "_slot",
        "_streak",
        "_total",
        "_totals",
        "_until",
        "ejections",
        "on_change",
        "state",
    )

    def __init__(self, cfg: BreakerConfig, group: EjectionGroup) -> None:
        self._enabled = cfg.enabled
        self._group = group
        self._max_consecutive = cfg.consecutive_failures
        self._ratio = cfg.error_ratio
        self._min_requests = cfg.min_requests
        self._inv_width = _BUCKETS / cfg.window_s
        self._base_s = cfg.base_ejection_ms / 1000
        self._max_s = cfg.max_ejection_ms / 1000
        self.state = CLOSED
        #: times ejected so far (all time: for `/readyz`)
        self.ejections = 0
        #: ejections since the breaker last stayed closed for a while (the ejection multiplier)
        self._streak = 0
        #: called when `available()` may change its answer (ejected, closed): the route's cache
        self.on_change: Callable[[], None] | None = None
        self._consecutive = 0
        self._totals = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._total = 0  # attempts in the window (sum of _totals)
        self._failed = 0  # failures in the window (sum of _fails)
        self._bucket = 0  # the absolute bucket number of the current bucket
        self._slot = 0  # its index in the ring
        self._until = 0.0  # open: the ejection ends then
        self._probe_at = -1.0  # half-open: when the probe was picked (-1: none in flight)
        self._closed_at = float("-inf")

    # ---- the picker's side (no side effects) ---------------------------------------------------
    def available(self, now: float) -> bool:
        """May take an attempt now: closed, or the ejection is over and no probe is in flight."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return now >= self._until
        # half-open: a probe that never reported (lost track of) stops blocking after a while
        return self._probe_at < 0 or now - self._probe_at >= self._max_s

    def on_pick(self, now: float) -> None:
        """The dispatcher chose this deployment: an ejection that is over becomes the probe."""
        state = self.state
        if state == CLOSED:
            return
        if state == OPEN:
            if now >= self._until:
                self.state = HALF_OPEN
                self._probe_at = now
        else:
            self._probe_at = now

    # ---- the attempt's outcome -----------------------------------------------------------------
    def record(self, ok: bool, now: float) -> None:
        """An attempt ended; `ok` False only for failures that say the deployment is unwell."""
        if not self._enabled:
            return
        if self.state != CLOSED:
            if self.state == HALF_OPEN:
                if ok:
                    self._close(now)
                else:
                    self._eject(now)
            # open: an attempt started before the ejection; it says nothing new
            return
        b = int(now * self._inv_width)
        if b != self._bucket:
            self._roll(b)
        slot = self._slot
        self._totals[slot] += 1
        self._total += 1
        if ok:
            self._consecutive = 0
            return
        self._fails[slot] += 1
        self._failed += 1
        self._consecutive += 1
        tripped = self._consecutive >= self._max_consecutive or (
            self._total >= self._min_requests and self._failed >= self._ratio * self._total
        )
        if tripped and self._group.may_eject():
            self._group.ejected += 1
            self._eject(now)

    def cancel(self, now: float) -> None:
        """An attempt was cancelled (client gone, hedge lost): it says nothing about the
        deployment; if it was the half-open probe, the next pick probes again."""
        if self.state == HALF_OPEN:
            self._probe_at = -1.0

    def expire(self, now: float) -> None:
        """End an ejection now (the active health check saw the deployment come back): the next
        pick is the half-open probe. The streak stays, so a flapping deployment still waits longer."""
        if self.state == OPEN and self._until > now:
            self._until = now
            if self.on_change is not None:
                self.on_change()

    # ---- transitions ---------------------------------------------------------------------------
    def _eject(self, now: float) -> None:
        if now - self._closed_at >= self._max_s * _STREAK_RESET and self.state == CLOSED:
            self._streak = 0
        self._streak += 1
        self.ejections += 1
        self.state = OPEN
        self._until = now + min(self._base_s * self._streak, self._max_s)
        self._probe_at = -1.0
        self._reset()
        if self.on_change is not None:
            self.on_change()

    def _close(self, now: float) -> None:
        self.state = CLOSED
        self._closed_at = now
        self._probe_at = -1.0
        self._group.ejected -= 1
        self._reset()
        if self.on_change is not None:
            self.on_change()

    def _reset(self) -> None:
        self._consecutive = 0
        self._reset_window()

    def _roll(self, b: int) -> None:
        """Move the window to absolute bucket `b`, dropping the buckets that fell out of it."""
        gap = b - self._bucket
        if gap >= _BUCKETS or gap < 0:
            self._reset_window()
        else:
            totals, fails = self._totals, self._fails
            for k in range(self._bucket + 1, b + 1):
                j = k % _BUCKETS
                self._total -= totals[j]
                self._failed -= fails[j]
                totals[j] = fails[j] = 0
        self._bucket = b
        self._slot = b % _BUCKETS

    def _reset_window(self) -> None:
        self._total = self._failed = 0
        for i in range(_BUCKETS):
            self._totals[i] = self._fails[i] = 0

    def snapshot(self, now: float) -> dict[str, object]:
        """For `/readyz`: the state, ejections so far, seconds left of the ejection."""
        out: dict[str, object] = {"state": self.state, "ejections": self.ejections}
        if self.state == OPEN:
            out["ejected_for_s"] = round(max(0.0, self._until - now), 3)
        return out

    def __repr__(self) -> str:
        return f"Breaker({self.state}, ejections={self.ejections})"
