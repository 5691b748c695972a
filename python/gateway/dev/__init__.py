"""Development-only helpers (mock upstreams for tests, ``make run`` and benchmarks)."""
