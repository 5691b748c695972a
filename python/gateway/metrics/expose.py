"""A scrape: read every shard of the instance, sum per (metric, labels), render the text format
(Prometheus 0.0.4, or OpenMetrics 1.0 when the client asks for it). See the package doc."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import cast

from . import COUNTER, GAUGE, HISTOGRAM, INFO, Family, _alive

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_INF = 'le="+Inf"'
Series = dict[tuple[str, tuple[str, ...]], list[float]]


def collect(directory: Path, fams: dict[str, Family]) -> Series:
    """Sum every shard: counters and histograms over all shards, gauges over live workers."""
    total: Series = {}
    for side in directory.glob("*.series"):
        stem = side.stem  # `<pid>`, or `<pid>.<n>` for a reloaded config's (gateway.reload)
        pid = stem.partition(".")[0]
        shard = directory / f"{stem}.shard"
        if not pid.isdigit() or not shard.exists():
            continue
        live = _alive(int(pid)) and not (directory / f"{stem}.retired").exists()
        try:
            lines = side.read_text(encoding="utf-8").splitlines()
            with open(shard, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            continue
        values = memoryview(mm).cast("d")
        for line in lines:
            try:
                base, name, labels = json.loads(line)
            except ValueError:  # a line being written
                continue
            fam = fams.get(name)
            if fam is None or base + fam.width > len(values):
                continue
            if fam.type in (GAUGE, INFO) and not live:
                continue
            key = (name, tuple(labels))
            acc = total.get(key)
            chunk = cast("list[float]", values[base : base + fam.width].tolist())
            if acc is None:
                total[key] = chunk
            elif fam.type == INFO:
                acc[0] = max(acc[0], chunk[0])
            else:
                for i, x in enumerate(chunk):
                    acc[i] += x
        values.release()
        mm.close()
    return total


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if x == int(x) and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


def _le(b: float) -> str:
    return repr(float(b))


def render(series: Series, fams: dict[str, Family], openmetrics: bool = False) -> bytes:
    by_family: dict[str, list[tuple[tuple[str, ...], list[float]]]] = {}
    for (name, labels), vals in series.items():
        by_family.setdefault(name, []).append((labels, vals))
    out: list[str] = []
    for name, fam in fams.items():
        rows = sorted(by_family.get(name, ()))
        if not rows and fam.type in (COUNTER, HISTOGRAM, INFO) and fam.labels:
            continue
        typ = fam.type
        if typ == INFO:
            typ = "info" if openmetrics else "gauge"
        base = name
        out.append(f"# HELP {name} {fam.help}")
        out.append(f"# TYPE {name} {typ}")
        if not rows and not fam.labels:
            rows = [((), [0.0] * fam.width)]
        for labels, vals in rows:
            if fam.type == COUNTER:
                out.append(f"{base}_total{_labels(fam.labels, labels)} {_num(vals[0])}")
            elif fam.type == GAUGE:
                out.append(f"{base}{_labels(fam.labels, labels)} {_num(vals[0])}")
            elif fam.type == INFO:
                out.append(f"{base}_info{_labels(fam.labels, labels)} {_num(vals[0])}")
            else:
                cum = 0.0
                nb = len(fam.bounds)
                for i, b in enumerate(fam.bounds):
                    cum += vals[i]
                    le = 'le="' + _le(b) + '"'
                    out.append(f"{base}_bucket{_labels(fam.labels, labels, le)} {_num(cum)}")
                cum += vals[nb]
                out.append(f"{base}_bucket{_labels(fam.labels, labels, _INF)} {_num(cum)}")
                out.append(f"{base}_count{_labels(fam.labels, labels)} {_num(cum)}")
                out.append(f"{base}_sum{_labels(fam.labels, labels)} {_num(vals[nb + 1] * fam.scale)}")
    if openmetrics:
        out.append("# EOF")
    return ("\n".join(out) + "\n").encode()


def wants_openmetrics(accept: str | None) -> bool:
    return accept is not None and "application/openmetrics-text" in accept


def scrape(directory: Path, fams: dict[str, Family], accept: str | None) -> tuple[str, bytes]:
    om = wants_openmetrics(accept)
    return (OPENMETRICS if om else PROMETHEUS), render(collect(directory, fams), fams, om)
