"""In-situ timing of the metrics observer inside a real, loaded gateway (not committed to the
request path: loaded only through PYTHONPATH). Why: a tight loop (`metrics_cost.py`) runs with
warm caches and misses what the observer costs between real requests; the end-to-end CPU
difference (`proxy_overhead.py --metrics-off`) drowns in noise on a shared machine.

    PYTHONPATH=benchmarks/insitu FASTPATH_INSITU=/tmp/insitu .venv/bin/python \\
        benchmarks/proxy_overhead.py --stream --conc 16 --repeat 1

Each gateway worker wraps `Pipeline._done` (every observer's `on_done`, once per request) with
`perf_counter_ns` and appends, every 20,000 requests, `median p90 mean` ns of those calls and the checkout to
`$FASTPATH_INSITU.<pid>`. A median is robust to the preemptions a loaded machine adds."""

from __future__ import annotations

import os
import time

_OUT = os.environ.get("FASTPATH_INSITU")

if _OUT:
    import gateway
    from gateway.pipeline import Pipeline

    _TREE = os.path.dirname(os.path.dirname(gateway.__file__))  # which checkout's gateway

    _inner = Pipeline._done
    _samples: list[int] = []

    def _done(self: Pipeline, ctx: object, outcome: object) -> None:
        t0 = time.perf_counter_ns()
        _inner(self, ctx, outcome)  # type: ignore[arg-type]
        _samples.append(time.perf_counter_ns() - t0)
        if len(_samples) >= 20_000:
            s = sorted(_samples)
            with open(f"{_OUT}.{os.getpid()}", "a", encoding="utf-8") as f:
                f.write(f"{s[len(s) // 2]} {s[len(s) * 9 // 10]} {sum(s) / len(s):.0f} {_TREE}\n")
            _samples.clear()

    Pipeline._done = _done  # type: ignore[method-assign]
