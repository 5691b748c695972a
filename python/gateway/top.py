"""`fastpath-gateway top URL`: a live terminal view of a running gateway from its `/metrics`:
per model RPS, error rate, TTFT p50/p99 (over the last interval, from the histogram's bucket
deltas, as PromQL's histogram_quantile does), plus in flight and limiter refusals."""

from __future__ import annotations

import math
import re
import sys
import time
import urllib.request
from collections import defaultdict
from typing import TextIO

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> dict[Sample, float]:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def fetch(url: str, token: str | None, timeout_s: float = 5.0) -> dict[Sample, float]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
        return parse(r.read().decode())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """`histogram_quantile` over cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def frame(before: dict[Sample, float], after: dict[Sample, float], seconds: float, url: str) -> str:
    def delta(key: Sample) -> float:
        return max(0.0, after.get(key, 0.0) - before.get(key, 0.0))

    rps: dict[str, float] = defaultdict(float)
    errors: dict[str, float] = defaultdict(float)
    ttft: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    refused = 0.0
    in_flight = 0.0
    for key, value in after.items():
        name, labels = key
        lab = dict(labels)
        if name == "fastpath_requests_total":
            d = delta(key)
            model = lab.get("model", "?")
            rps[model] += d / seconds
            if lab.get("status", "").startswith("5") or (lab.get("error") and lab.get("status") != "200"):
                errors[model] += d / seconds
        elif name == "gen_ai_server_time_to_first_token_seconds_bucket":
            le = float(lab.get("le", "inf").replace("+Inf", "inf"))
            ttft[lab.get("gen_ai_request_model", "?")][le] += delta(key)
        elif name == "fastpath_limiter_decisions_total" and lab.get("decision") != "allowed":
            refused += delta(key) / seconds
        elif name == "fastpath_requests_in_flight":
            in_flight += value
    lines = [
        f"fastpath-gateway top — {url} — {time.strftime('%H:%M:%S')}  (every {seconds:.1f} s)",
        f"in flight {in_flight:.0f}   limiter refusals {refused:.1f}/s   total {sum(rps.values()):.1f} req/s",
        "",
        f"{'model':<28} {'req/s':>9} {'err/s':>8} {'err %':>6} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}",
    ]
    for model in sorted(set(rps) | set(ttft), key=lambda m: -rps.get(m, 0.0)):
        r, e = rps.get(model, 0.0), errors.get(model, 0.0)
        hist = list(ttft.get(model, {}).items())
        p50, p99 = quantile(0.5, hist), quantile(0.99, hist)
        share = f"{100 * e / r:.1f}" if r else "-"
        lines.append(f"{model:<28} {r:>9.1f} {e:>8.1f} {share:>6} {_ms(p50):>12} {_ms(p99):>12}")
    return "\n".join(lines) + "\n"


def run(url: str, token: str | None, interval_s: float, once: bool, out: TextIO = sys.stdout) -> int:
    try:
        before = fetch(url, token)
        while True:
            time.sleep(interval_s)
            after = fetch(url, token)
            text = frame(before, after, interval_s, url)
            out.write(text if once else "\x1b[H\x1b[2J" + text)
            out.flush()
            if once:
                return 0
            before = after
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"error: cannot read {url}: {exc}", file=sys.stderr)
        return 1
