"""Daily archives (`gateway.objstore.archive`): one UTC day of the usage ledger (SQLite and a real
PostgreSQL) and of the audit log exported to the object store (a local directory and a real S3
server, moto) and read back equal, other days excluded, a second run writing the same bytes;
`fastpath-gateway archive` and its errors."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import bare_worker, pg_database, run_gateway

from gateway import cli, keystore, ledger
from gateway import config as config_mod
from gateway.config_storage import ArchiveScheduleConfig, StorageConfig
from gateway.objstore import ObjectNotFound, ObjectStoreError, open_store
from gateway.objstore.archive import (
    ArchiveError,
    archive_day,
    archive_key,
    decode_ledger,
    read_audit_archive,
    read_ledger_archive,
)
from gateway.objstore.archiver import Archiver, _next_run, due_day

SALT = "archive-test-salt-0123456789"
DAY = date(2026, 11, 3)
ADDED_DEFAULTS = {name: default for name, _, _, default in ledger._ADDED}
DAY_START = datetime(2026, 11, 3, tzinfo=UTC).timestamp()


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    if request.param == "local":
        return StorageConfig(dir=str(tmp_path / "objects"))
    cfg: StorageConfig = request.getfixturevalue("s3_server").config()
    return cfg


def make_config(
    tmp_path: Path, storage: StorageConfig | None = None, ledger_dsn: str = ""
) -> config_mod.Config:
    led = f"{{enabled: true, kind: postgres, dsn: '{ledger_dsn}'}}" if ledger_dsn else (
        f"{{enabled: true, path: '{tmp_path / 'usage.db'}'}}"
    )  # fmt: skip
    text = (
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        f"auth: {{enabled: false, salt: {SALT}, store: {{kind: sqlite, path: '{tmp_path / 'keys.db'}'}}}}\n"
        f"ledger: {led}\n"
        f"storage: {{dir: '{tmp_path / 'objects'}'}}\n"
    )
    cfg = config_mod.parse(text)
    return msgspec.structs.replace(cfg, storage=storage) if storage is not None else cfg


def row(i: int, ts: float, **over: Any) -> ledger.Row:
    day = time.strftime("%Y-%m-%d", time.gmtime(ts))
    values: dict[str, Any] = {
        "request_id": f"req-{i:04d}",
        "ts": ts,
        "day": day,
        "key_id": f"key-{i % 3}" if i % 4 else None,  # some anonymous
        "team": "apps" if i % 2 else None,
        "tier": "default",
        "endpoint": "chat" if i % 5 else "embeddings",
        "model": "m",
        "upstream_model": "up-model",
        "stream": bool(i % 2),
        "status": 200 if i % 7 else 429,
        "error_code": None if i % 7 else "rate_limit_exceeded",
        "prompt_tokens": 10 + i,
        "completion_tokens": 3 * i,
        "cost_nano_usd": 123_456_789_012 + i,  # beyond 2^32
        "latency_ms": 12.345678901 + i / 7,  # floats round-trip exactly
        "provider": "p" if i % 3 else None,
        "attempts": 1 + i % 2,
        "cache": ("hit", "miss", None)[i % 3],
        "prompt": "summary@2" if i % 6 == 0 else None,
        "cached_tokens": i % 4,
    } | over
    # a column added since this test was written: its default
    return tuple(values.get(c, ADDED_DEFAULTS.get(c)) for c in ledger.COLUMNS)  # type: ignore[return-value]


def day_rows() -> tuple[list[ledger.Row], list[ledger.Row]]:
    """(the rows of DAY in arrival order, every row written: DAY and the days around it)."""
    inside = [row(i, DAY_START + i * 2_000.123) for i in range(40)]  # 0 .. ~22 h
    inside.append(row(98, DAY_START))  # the first instant of the day
    inside.append(row(99, DAY_START + 86_399.999, key_id="ünïcode-key", error_code='quote " and \\'))
    before = [row(200 + i, DAY_START - 1 - i * 5_000) for i in range(5)]  # the day before
    after = [row(300 + i, DAY_START + 86_400 + i * 5_000) for i in range(5)]  # the first second after
    written = before[:2] + inside[20:] + after + inside[:20] + before[2:]  # not in order
    return sorted(inside, key=lambda r: (r[1], r[0])), written


def write_ledger(cfg: config_mod.Config, rows: list[ledger.Row]) -> None:
    sink = ledger.open_sink(cfg.ledger)
    try:
        sink.write(rows)
    finally:
        sink.close()


def export(cfg: config_mod.Config, what: Any, day: date = DAY) -> Any:
    async def main() -> Any:
        store = open_store(cfg)
        try:
            return await archive_day(cfg, store, what, day)
        finally:
            await store.close()

    return asyncio.run(main())


def read_back(cfg: config_mod.Config, reader: Any, day: date = DAY) -> Any:
    async def main() -> Any:
        store = open_store(cfg)
        return await reader(store, day)

    return asyncio.run(main())


def raw(cfg: config_mod.Config, key: str) -> bytes:
    return bytes(asyncio.run(open_store(cfg).get(key)))


# ---- the ledger ---------------------------------------------------------------------------------
def test_ledger_day_exported_and_read_back_equal(tmp_path: Path, storage: StorageConfig) -> None:
    cfg = make_config(tmp_path, storage)
    expected, written = day_rows()
    write_ledger(cfg, written)
    done = export(cfg, "ledger")
    assert (done.what, done.day, done.rows) == ("ledger", "2026-11-03", len(expected))
    assert done.key == "archives/ledger/2026/11/03.jsonl.gz"
    got = read_back(cfg, read_ledger_archive)
    assert got == expected  # the same rows, values and types, nothing of the days around it
    assert [type(v) for v in got[0]] == [type(v) for v in expected[0]]
    first = raw(cfg, done.key)
    assert len(first) == done.bytes
    # the object is plain gzip JSON lines, keyed by column
    lines = gzip.decompress(first).decode().splitlines()
    assert json.loads(lines[0]) == dict(zip(ledger.COLUMNS, expected[0], strict=True))

    # again: the same bytes under the same key (idempotent)
    assert export(cfg, "ledger").bytes == done.bytes
    assert raw(cfg, done.key) == first
    # a late row (e.g. a spill file loaded after midnight): archiving the day again brings it
    late = row(500, DAY_START + 43_000.5)
    write_ledger(cfg, [late])
    assert export(cfg, "ledger").rows == len(expected) + 1
    assert read_back(cfg, read_ledger_archive) == sorted([*expected, late], key=lambda r: (r[1], r[0]))
    # the neighbouring days have archives of their own
    assert export(cfg, "ledger", date(2026, 11, 4)).rows == 5
    next_day = sorted((r for r in written if r[0].startswith("req-03")), key=lambda r: r[1])
    assert read_back(cfg, read_ledger_archive, date(2026, 11, 4)) == next_day


def test_empty_day_and_missing_store(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert export(cfg, "ledger").rows == 0  # no ledger file yet: an empty archive, no error
    assert read_back(cfg, read_ledger_archive) == []
    assert export(cfg, "audit").rows == 0  # no key store file yet
    with pytest.raises(ObjectNotFound):
        read_back(cfg, read_ledger_archive, date(2026, 1, 1))


def test_ledger_on_postgres(tmp_path: Path) -> None:
    with pg_database("fp_archive") as dsn:
        cfg = make_config(tmp_path, ledger_dsn=dsn)
        expected, written = day_rows()
        write_ledger(cfg, written)
        assert export(cfg, "ledger").rows == len(expected)
        assert read_back(cfg, read_ledger_archive) == expected


def test_ledger_table_of_an_older_gateway(tmp_path: Path) -> None:
    """A table without the columns added later: its rows archive with their defaults."""
    import sqlite3

    cfg = make_config(tmp_path)
    expected, _ = day_rows()
    old_cols = ledger.COLUMNS[:16]
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        conn.execute(f"CREATE TABLE fastpath_usage ({', '.join(old_cols)})")
        conn.executemany(
            f"INSERT INTO fastpath_usage VALUES ({', '.join('?' * len(old_cols))})",
            [r[:16] for r in expected],
        )
    conn.close()
    got = (export(cfg, "ledger"), read_back(cfg, read_ledger_archive))[1]
    defaults = tuple(ADDED_DEFAULTS[c] for c in ledger.COLUMNS[16:])
    assert got == [(*r[:16], *defaults) for r in expected]


def test_a_corrupt_archive_is_an_error() -> None:
    with pytest.raises(ArchiveError, match="not a gzip archive"):
        decode_ledger(b"plain text", "k")
    with pytest.raises(ArchiveError, match="k:2: not a usage row"):
        good = json.dumps(dict(zip(ledger.COLUMNS, row(1, DAY_START), strict=True)))
        decode_ledger(gzip.compress(f'{good}\n{{"request_id": "b"}}\n'.encode()), "k")


# ---- the audit log ------------------------------------------------------------------------------
def write_audit(cfg: config_mod.Config) -> list[keystore.AuditEvent]:
    """Audit rows on DAY (by key changes and admin reads) and on the days around it; DAY's, as
    stored (ids included)."""
    store = keystore.open_store(cfg, readonly=False)
    assert store is not None
    by = keystore.Actor("cli:tester", "host-1")
    try:
        store.audit(
            keystore.AuditEvent("admin.usage.read", "admin-api", "/v1/usage", "10.0.0.1:5", ts=DAY_START - 1)
        )
        store.create(keystore.StoredKey("k1", config_mod.hash_key(SALT, "sk-fp-0123456789abcdef-1"), "apps",
                                        "default", created_at=DAY_START + 10.25), by)  # fmt: skip
        detail = {"n": 3, "nested": {"a": [1, 2.5, None]}}
        target = "/v1/usage?group_by=team&x=ü"
        store.audit(
            keystore.AuditEvent(
                "admin.usage.read", "admin-api", target, "10.0.0.2:7", detail, DAY_START + 3_600
            )
        )
        store.revoke("k1", DAY_START + 86_399.5, by)
        store.audit(
            keystore.AuditEvent("config.reload", "admin-api", "", "", {"ok": True}, DAY_START + 86_400)
        )
        rows = store.list_audit(None, 100)
    finally:
        store.close()
    assert len(rows) == 5
    return rows[1:4]


def test_audit_day_exported_and_read_back_equal(tmp_path: Path, storage: StorageConfig) -> None:
    cfg = make_config(tmp_path, storage)
    expected = write_audit(cfg)
    assert [e.action for e in expected] == ["key.create", "admin.usage.read", "key.revoke"]
    done = export(cfg, "audit")
    assert (done.rows, done.key) == (3, "archives/audit/2026/11/03.jsonl.gz")
    assert read_back(cfg, read_audit_archive) == expected
    first = raw(cfg, done.key)
    export(cfg, "audit")
    assert raw(cfg, done.key) == first


# ---- the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    cfg = make_config(tmp_path)
    write_ledger(cfg, day_rows()[1])
    write_audit(cfg)
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        f"auth: {{enabled: false, salt: {SALT}, store: {{kind: sqlite, path: '{tmp_path / 'keys.db'}'}}}}\n"
        f"ledger: {{enabled: true, path: '{tmp_path / 'usage.db'}'}}\n"
        f"storage: {{dir: '{tmp_path / 'objects'}'}}\n"
    )
    yield path


def test_cli_archives_a_day(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["archive", "--day", "2026-11-03", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "ledger 2026-11-03: 42 rows" in out and "archives/ledger/2026/11/03.jsonl.gz" in out
    assert "audit 2026-11-03: 3 rows" in out
    cfg = make_config(config_file.parent)
    assert read_back(cfg, read_ledger_archive) == day_rows()[0]
    assert (config_file.parent / "objects" / archive_key("audit", DAY)).is_file()
    assert cli.main(["archive", "--day", "2026-11-02", "--what", "audit", "--config", str(config_file)]) == 0
    assert "audit 2026-11-02: 1 rows" in capsys.readouterr().out
    assert not (config_file.parent / "objects" / archive_key("ledger", date(2026, 11, 2))).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--day", "2026-13-01"], "--day: a date YYYY-MM-DD (UTC), got '2026-13-01'"),
        (["--day", "yesterday"], "--day: a date YYYY-MM-DD"),
        (["--day", datetime.now(UTC).date().isoformat()], "that UTC day is not over yet"),
        (["--day", "2999-01-01"], "that UTC day is not over yet"),
    ],
)
def test_cli_refuses_bad_days(
    config_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["archive", *args, "--config", str(config_file)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        "auth: {enabled: false}\n"
        f"storage: {{dir: '{tmp_path / 'objects'}'}}\n"
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["archive", "--day", "2026-11-03", "--what", "ledger", "--config", str(path)])
    assert exit_.value.code == 2
    assert "nothing to archive: `ledger.enabled` is off" in capsys.readouterr().err
    assert cli.main(["archive", "--day", "2026-11-03", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "ledger: skipped" in captured.out and "audit: skipped" in captured.out
    assert "nothing to archive" in captured.err


def test_cli_store_down_is_a_clear_error(
    config_file: Path, s3_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = config_file.read_text().replace(
        f"storage: {{dir: '{config_file.parent / 'objects'}'}}",
        "storage: {backend: s3, s3: {bucket: fastpath-test, endpoint_url: 'http://127.0.0.1:"
        f"{port}', connect_timeout_ms: 300, timeout_ms: 500, max_retries: 1, retry_timeout_ms: 1000}}}}",
    )
    config_file.write_text(text)
    assert cli.main(["archive", "--day", "2026-11-03", "--config", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert f"s3://fastpath-test at http://127.0.0.1:{port}: put 'archives/ledger/2026/11/03.jsonl.gz'" in err
    assert "cannot reach the server" in err
    assert "Traceback" not in err


def test_store_errors_propagate(tmp_path: Path) -> None:
    """A local store that cannot be written: ObjectStoreError, not a half-written archive."""
    (tmp_path / "objects").write_text("a file where the directory should be")
    cfg = make_config(tmp_path)
    with pytest.raises(ObjectStoreError, match=r"put 'archives/ledger/2026/11/03\.jsonl\.gz' failed"):
        export(cfg, "ledger")


# ---- the nightly archiver -----------------------------------------------------------------------
def test_due_day_and_next_run() -> None:
    midnight = DAY_START + 86_400  # 2026-11-04 00:00 UTC
    assert due_day(midnight + 599, 600) == date(2026, 11, 2)  # not yet: the day before is due
    assert due_day(midnight + 600, 600) == DAY
    assert due_day(midnight + 86_399, 600) == DAY
    assert _next_run(midnight + 10, 600) == midnight + 600
    assert _next_run(midnight + 600, 600) == midnight + 86_400 + 600


def archiver_config(tmp_path: Path, retry_s: int = 300) -> config_mod.Config:
    cfg = make_config(tmp_path)
    archive = ArchiveScheduleConfig(enabled=True, delay_s=600, retry_s=retry_s)
    return msgspec.structs.replace(cfg, storage=msgspec.structs.replace(cfg.storage, archive=archive))


async def eventually(check: Any, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


def test_archiver_archives_the_day_before_once_per_host(tmp_path: Path) -> None:
    cfg = archiver_config(tmp_path)
    expected, written = day_rows()
    write_ledger(cfg, written)
    audit = write_audit(cfg)
    clock = lambda: DAY_START + 86_400 + 700  # noqa: E731 - 00:11:40 UTC the day after
    lock = tmp_path / "archiver.lock"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = Archiver(cfg, lock, clock=clock, lock_retry_s=0.05)
        second = Archiver(cfg, lock, clock=clock, lock_retry_s=0.05)
        first.start(bare_worker(loop))
        await eventually(lambda: first.done == DAY, "the first archiver archived DAY")
        second.start(bare_worker(loop))
        await asyncio.sleep(0.3)
        assert first.locked and not second.locked and second.done is None  # one per host
        store = open_store(cfg)
        assert await read_ledger_archive(store, DAY) == expected
        assert await read_audit_archive(store, DAY) == audit
        path = Path(cfg.storage.dir) / archive_key("ledger", DAY)
        stamp = path.stat().st_mtime_ns
        await first.close()  # e.g. a hot reload's old generation: the other one takes over
        await eventually(lambda: second.done == DAY, "the second archiver took over")
        assert path.stat().st_mtime_ns == stamp  # found archived: not written again
        await second.close()
        assert not second.locked

    asyncio.run(main())


def test_archiver_retries_until_the_store_works(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = archiver_config(tmp_path, retry_s=1)
    expected, written = day_rows()
    write_ledger(cfg, written)
    objects = Path(cfg.storage.dir)
    objects.write_text("a file where the store's directory should be")

    async def main() -> None:
        archiver = Archiver(cfg, tmp_path / "archiver.lock", clock=lambda: DAY_START + 86_400 + 700)
        archiver.start(bare_worker(asyncio.get_running_loop()))
        await eventually(lambda: archiver.failures >= 1, "a failed run")
        assert archiver.done is None
        await asyncio.to_thread(objects.unlink)  # the store is back
        await eventually(lambda: archiver.done == DAY, "archived after the retry")
        assert await read_ledger_archive(open_store(cfg), DAY) == expected
        await archiver.close()

    asyncio.run(main())
    assert "archiver: archiving 2026-11-03 failed, retrying in 1 s" in caplog.text


def test_a_gateway_archives_yesterday(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`storage.archive.enabled` on a real gateway (2 workers): yesterday's ledger rows appear in
    the store, once."""
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path / "data"))
    today = datetime.now(UTC).date()
    yesterday = date.fromordinal(today.toordinal() - 1)
    start = datetime(yesterday.year, yesterday.month, yesterday.day, tzinfo=UTC).timestamp()
    cfg = make_config(tmp_path)
    rows = [row(i, start + i * 1_000.5) for i in range(30)]
    write_ledger(cfg, [*rows, row(900, start - 10), row(901, start + 86_400 + 1)])
    text = (
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
        "auth: {enabled: false}\n"
        f"ledger: {{enabled: true, path: '{tmp_path / 'usage.db'}'}}\n"
        f"storage: {{dir: '{tmp_path / 'objects'}', archive: {{enabled: true, delay_s: 0}}}}\n"
    )
    archive = tmp_path / "objects" / archive_key("ledger", yesterday)
    with run_gateway(tmp_path, None, workers=2, config_text=text):
        deadline = time.monotonic() + 20
        while not archive.exists():
            assert time.monotonic() < deadline, "no archive within 20 s"
            time.sleep(0.05)
        assert decode_ledger(archive.read_bytes()) == rows
    assert (tmp_path / "data" / "archiver.lock").exists()
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]
