"""Stream timing the gateway measures on the way, kept on the context for observers (metrics,
access log) and for the `x-fastpath-timing` comment."""

from __future__ import annotations


class ReadGaps:
    """Gaps between upstream reads (the inter-token latency as the gateway sees it)."""

    __slots__ = ("count", "last", "max", "total")

    def __init__(self, start: float) -> None:
        self.last = start
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, now: float) -> None:
        gap = now - self.last
        self.last = now
        self.count += 1
        self.total += gap
        if gap > self.max:
            self.max = gap

    def comment(self, ttft_ms: float) -> bytes:
        mean = self.total / self.count * 1e3 if self.count else 0.0
        return (
            f": server-timing ttft;dur={ttft_ms:.3f}, gap-mean;dur={mean:.3f}, "
            f'gap-max;dur={self.max * 1e3:.3f}, reads;desc="{self.count + 1}"\n\n'
        ).encode()
