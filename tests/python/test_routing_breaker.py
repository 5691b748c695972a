"""Outlier ejection per deployment (routing.breaker): explicit clock values, no sleeps."""

from __future__ import annotations

import timeit

from gateway.config_routing import BreakerConfig
from gateway.routing.breaker import Breaker, EjectionGroup


def make(n: int = 4, **kw: object) -> tuple[list[Breaker], EjectionGroup, list[int]]:
    """`n` breakers in one group; the list counts on_change calls per breaker."""
    cfg = BreakerConfig(**kw)  # type: ignore[arg-type]
    group = EjectionGroup(cfg)
    changes = [0] * n
    breakers = []
    for i in range(n):
        b = Breaker(cfg, group)
        group.add(b)

        def bump(i: int = i) -> None:
            changes[i] += 1

        b.on_change = bump
        breakers.append(b)
    return breakers, group, changes


def fail(b: Breaker, times: int, now: float) -> None:
    for _ in range(times):
        b.record(False, now)


def test_consecutive_failures_eject() -> None:
    (b, *_), group, changes = make(consecutive_failures=3, base_ejection_ms=1_000)
    fail(b, 2, 100.0)
    b.record(True, 100.0)  # a success breaks the run
    fail(b, 2, 100.0)
    assert b.state == "closed" and b.available(100.0)
    b.record(False, 100.0)
    assert b.state == "open" and b.ejections == 1 and changes[0] == 1
    assert group.ejected == 1
    assert not b.available(100.5)
    assert b.available(101.0)  # the ejection is over: ready for a probe
    assert b.state == "open"  # available() changes nothing


def test_error_ratio_window_ejects() -> None:
    (b, *_), _, _ = make(consecutive_failures=100, error_ratio=0.5, window_s=10.0, min_requests=10)
    now = 50.0
    for _ in range(4):
        b.record(True, now)
        b.record(False, now)
    b.record(True, now)
    assert b.state == "closed"  # 4 of 9: too few seen yet
    b.record(False, now)  # 5 of 10: half, once min_requests were seen
    assert b.state == "open" and b.ejections == 1
    (c, *_), _, _ = make(consecutive_failures=100, error_ratio=0.5, window_s=10.0, min_requests=10)
    for _ in range(6):
        c.record(True, now)
    for _ in range(4):
        c.record(False, now)  # 4 of 10
    assert c.state == "closed"
    c.record(False, now)  # 5 of 11: below 0.5
    assert c.state == "closed"
    c.record(False, now)  # 6 of 12
    assert c.state == "open"


def test_error_ratio_window_slides() -> None:
    (b, *_), _, _ = make(consecutive_failures=100, error_ratio=0.5, window_s=10.0, min_requests=10)
    for _ in range(10):
        b.record(True, 0.0)
    fail(b, 4, 0.0)  # 4 of 14
    # 20 s later those are out of the window: half of the new ones failing is enough
    for _ in range(5):
        assert b.state == "closed"
        b.record(True, 20.0)
        b.record(False, 20.0)
    assert b.state == "open"
    # within the window they still count: 5 s later, the old successes dilute the failures
    (c, *_), _, _ = make(consecutive_failures=100, error_ratio=0.5, window_s=10.0, min_requests=5)
    for _ in range(10):
        c.record(True, 0.0)
    fail(c, 9, 5.0)
    assert c.state == "closed"  # 9 of 19
    c.record(False, 5.0)  # 10 of 20
    assert c.state == "open"


def test_half_open_single_probe_and_success_closes() -> None:
    (b, *_), group, changes = make(consecutive_failures=2, base_ejection_ms=1_000)
    fail(b, 2, 10.0)
    assert b.state == "open"
    assert b.available(11.0)
    b.on_pick(11.0)
    assert b.state == "half_open"
    assert not b.available(11.0)  # one probe at a time
    b.record(True, 11.2)
    assert b.state == "closed" and b.available(11.2) and group.ejected == 0
    assert changes[0] == 2  # ejected, closed
    b.record(False, 11.3)  # counters were reset by the close
    assert b.state == "closed"


def test_half_open_failure_ejects_longer() -> None:
    (b, *_), group, _ = make(consecutive_failures=2, base_ejection_ms=1_000, max_ejection_ms=2_500)
    fail(b, 2, 10.0)
    assert not b.available(10.9) and b.available(11.0)
    b.on_pick(11.0)
    b.record(False, 11.1)  # the probe failed: out again, for 2 x base
    assert b.state == "open" and b.ejections == 2 and group.ejected == 1
    assert not b.available(13.0) and b.available(13.1)
    b.on_pick(13.1)
    b.record(False, 13.1)  # 3 x base, capped at max_ejection_ms
    assert b.ejections == 3
    assert not b.available(15.5) and b.available(15.6)


def test_ejection_streak_starts_over_after_a_long_healthy_spell() -> None:
    (b, *_), _, _ = make(consecutive_failures=1, base_ejection_ms=1_000, max_ejection_ms=10_000)
    fail(b, 1, 0.0)
    b.on_pick(1.0)
    b.record(False, 1.0)  # streak 2: 2 s
    b.on_pick(3.0)
    b.record(True, 3.0)
    fail(b, 1, 4.0)  # soon after: streak 3
    assert not b.available(6.9) and b.available(7.0)
    b.on_pick(7.0)
    b.record(True, 7.0)
    fail(b, 1, 100.0)  # closed for longer than max_ejection_ms: back to base
    assert b.ejections == 4
    assert b.available(101.0)


def test_cancelled_probe_lets_another_probe() -> None:
    (b, *_), _, _ = make(consecutive_failures=1, base_ejection_ms=1_000)
    fail(b, 1, 0.0)
    b.on_pick(1.0)
    assert not b.available(1.0)
    b.cancel(1.0)  # the probe was a hedge that lost: it says nothing
    assert b.state == "half_open" and b.available(1.0)
    b.on_pick(1.0)
    b.record(True, 1.5)
    assert b.state == "closed"


def test_expire_ends_ejection_for_a_probe() -> None:
    (b, *_), _, changes = make(consecutive_failures=1, base_ejection_ms=60_000)
    fail(b, 1, 0.0)
    assert not b.available(1.0)
    b.expire(1.0)  # the health check saw it come back
    assert b.available(1.0) and changes[0] == 2
    b.on_pick(1.0)
    assert b.state == "half_open"


def test_records_while_open_are_ignored() -> None:
    (b, *_), _, _ = make(consecutive_failures=1, base_ejection_ms=1_000)
    fail(b, 1, 0.0)
    b.record(True, 0.5)  # an attempt from before the ejection
    b.record(False, 0.5)
    assert b.state == "open" and b.ejections == 1
    assert b.available(1.0)


def test_max_ejected_percent_respected() -> None:
    breakers, group, _ = make(4, consecutive_failures=1, max_ejected_percent=50)
    for b in breakers:
        b.record(False, 0.0)
    assert [b.state for b in breakers] == ["open", "open", "closed", "closed"]
    assert group.ejected == 2
    c = breakers[2]
    fail(c, 3, 0.0)  # keeps counting, stays closed
    assert c.state == "closed" and c.available(0.0)
    a = breakers[0]  # one comes back...
    a.on_pick(6.0)
    a.record(True, 6.0)
    c.record(False, 6.0)  # ...so the next failure may eject another
    assert c.state == "open" and group.ejected == 2


def test_a_lone_deployment_is_never_ejected_below_100_percent() -> None:
    (b,), _, _ = make(1, consecutive_failures=1, max_ejected_percent=99)
    fail(b, 10, 0.0)
    assert b.state == "closed" and b.available(0.0)
    (c,), _, _ = make(1, consecutive_failures=1, max_ejected_percent=100)
    c.record(False, 0.0)
    assert c.state == "open"


def test_disabled_is_a_no_op() -> None:
    (b, *_), group, changes = make(enabled=False, consecutive_failures=1)
    fail(b, 100, 0.0)
    assert b.state == "closed" and b.available(0.0) and b.ejections == 0
    assert group.ejected == 0 and changes[0] == 0


def test_snapshot() -> None:
    (b, *_), _, _ = make(consecutive_failures=1, base_ejection_ms=2_000)
    assert b.snapshot(0.0) == {"state": "closed", "ejections": 0}
    b.record(False, 0.0)
    assert b.snapshot(0.5) == {"state": "open", "ejections": 1, "ejected_for_s": 1.5}


def test_record_is_cheap() -> None:
    """Not a timed assert: the closed-state bookkeeping per attempt, printed for the record."""
    (b, *_), _, _ = make()
    n = 100_000
    per = timeit.timeit(lambda: b.record(True, 1.0), number=n) / n
    print(f"Breaker.record(ok): {per * 1e9:.0f} ns (incl. the lambda call)")
    assert b.state == "closed"
