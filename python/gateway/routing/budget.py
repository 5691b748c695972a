"""The retry budget of a route: retries at most a fraction of its requests over a sliding
window, plus a floor per second (Finagle's RetryBudget), so retries never multiply an outage."""

from __future__ import annotations

import math

WINDOW_S = 10


class RetryBudget:
    """Ten one-second buckets of (requests, retries) on the loop clock. `request` is on every
    request's path: an int division and two increments."""

    __slots__ = ("_epoch", "_requests", "_retries", "min_per_s", "ratio")

    def __init__(self, ratio: float, min_per_s: float) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self._requests = [0] * WINDOW_S
        self._retries = [0] * WINDOW_S
        self._epoch = 0  # the second of the newest bucket

    def _roll(self, now: float) -> int:
        sec = int(now)
        if sec != self._epoch:
            gap = min(sec - self._epoch, WINDOW_S)
            for k in range(1, gap + 1):
                i = (self._epoch + k) % WINDOW_S
                self._requests[i] = 0
                self._retries[i] = 0
            self._epoch = sec
        return sec % WINDOW_S

    def request(self, now: float) -> None:
        self._requests[self._roll(now)] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the window allows it."""
        i = self._roll(now)
        allowed = math.floor(self.ratio * sum(self._requests) + self.min_per_s * WINDOW_S)
        if sum(self._retries) >= allowed:
            return False
        self._retries[i] += 1
        return True

    def retries(self) -> int:
        return sum(self._retries)
