"""`fastpath-gateway archive --day YYYY-MM-DD [--what ledger|audit|all]`: one UTC day of the
usage ledger and / or the audit log to the object store (`storage:`), as gzip JSON lines
(`objstore.archive`). Safe to repeat: a day archived again replaces its archive with the same
bytes (plus any rows loaded since). Run it from cron after midnight UTC for the day before:
`fastpath-gateway archive --day "$(date -u -d yesterday +%F)"`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import date

from .. import envvars
from . import ObjectStoreError
from .archive import WHATS, Archived, ArchiveError, What, archive_day, day_over, has_source
from .factory import open_store


def _usage(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def _day(text: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise _usage(f"--day: a date YYYY-MM-DD (UTC), got {text[:40]!r}") from None


def cmd_archive(args: argparse.Namespace) -> int:
    from ..cli import _load

    day = _day(args.day)
    if not day_over(day, time.time()):
        raise _usage(f"--day {day}: that UTC day is not over yet; archive it after midnight UTC")
    cfg = _load(args.config or os.environ.get(envvars.CONFIG) or None)
    wanted: list[What] = list(WHATS) if args.what == "all" else [args.what]
    todo = [w for w in wanted if has_source(cfg, w)]
    for w in wanted:
        if w not in todo:
            reason = "`ledger.enabled` is off" if w == "ledger" else "there is no key store (`auth.store`)"
            if args.what != "all":
                raise _usage(f"nothing to archive: {reason}")
            print(f"{w}: skipped ({reason})")
    if not todo:
        print("error: nothing to archive", file=sys.stderr)
        return 2

    async def run() -> list[Archived]:
        store = open_store(cfg)
        try:
            return [await archive_day(cfg, store, w, day) for w in todo]
        finally:
            await store.close()

    try:
        done = asyncio.run(run())
    except (ArchiveError, ObjectStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = cfg.storage.s3.bucket if cfg.storage.backend == "s3" else "the local store"
    for a in done:
        print(f"{a.what} {a.day}: {a.rows} rows, {a.bytes} bytes -> {a.key} ({where})")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser(
        "archive",
        help="archive one UTC day of the usage ledger / audit log to the object store (storage:)",
    )
    a.add_argument("--day", required=True, help="the UTC day, YYYY-MM-DD (a day that is over)")
    a.add_argument("--what", choices=["ledger", "audit", "all"], default="all")
    a.add_argument(
        "--config", help="YAML config file (default: the one `serve` was given, else the embedded)"
    )
    a.set_defaults(func=cmd_archive)
