"""Check a Grafana dashboard's PromQL (make test-rules): every expression parses (promtool checks
it as a recording rule) and names only metrics and labels the gateway exports.

    .venv/bin/python deploy/check_dashboard.py deploy/grafana/fastpath-gateway.json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway import config as config_mod
from gateway.metrics import COUNTER, GAUGE, HISTOGRAM, INFO, families

_IDENT = re.compile(r"\b((?:fastpath|gen_ai)_[a-z_]+)\b")
_SUFFIXES = {COUNTER: ("_total",), GAUGE: ("",), HISTOGRAM: ("_bucket", "_count", "_sum"), INFO: ("_info",)}


def exprs(dashboard: dict[str, object]) -> list[tuple[str, str]]:
    panels: list[dict[str, object]] = dashboard.get("panels", [])  # type: ignore[assignment]
    return [(str(p["title"]), str(t["expr"])) for p in panels for t in p.get("targets", [])]  # type: ignore[attr-defined]


def main(path: str) -> int:
    dashboard = json.loads(Path(path).read_text())
    found = exprs(dashboard)
    if not found:
        print(f"{path}: no expressions", file=sys.stderr)
        return 1
    # the families of a config with every optional label on: names do not depend on the config
    cfg = config_mod.parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        "metrics: {per_key_labels: true}\n"
    )
    fams = families(cfg).values()
    series = {f.name + s for f in fams for s in _SUFFIXES[f.type]}
    labels = {label for f in fams for label in f.labels}
    bad = [
        f"{title}: unknown metric {name!r} in {expr!r}"
        for title, expr in found
        for name in _IDENT.findall(expr)
        if name not in series and name not in labels
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr:{i}", "expr": e} for i, (_, e) in enumerate(found)],
            }
        ]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        json.dump(rules, f)  # JSON is YAML
    check = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if check.returncode != 0:
        bad.append(f"promtool rejected an expression:\n{check.stdout}{check.stderr}")
    for line in bad:
        print(line, file=sys.stderr)
    if not bad:
        print(f"{path}: {len(found)} expressions parse and name only exported metrics")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
