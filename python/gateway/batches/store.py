"""File and batch objects: metadata in Redis, bytes in the object store.

Why Redis for the metadata: the batch lane already lives there (`jobs.queue`), every gateway
and `fastpath-gateway worker` sees the same objects without a second database, a batch's
status changes are compare-and-set Lua scripts (the HTTP cancel and the running worker race
safely), and its request counts are exact by construction: each line's outcome is one
`HSETNX` into the batch's `out` or `err` hash keyed by `custom_id` (a redelivered batch skips
lines already there and can never write one twice), so the counts are the hashes' sizes. File
bytes (inputs, outputs, error files) go to the object store under `files/<id>`.

Every key shares the hash tag `{<jobs.prefix>:batches}` with the batch lane's queue (one Redis
Cluster slot). Lists are sorted sets by creation time per visibility scope: `all` (admin),
`key:<id>` and `team:<name>` (a key sees its own objects and its team's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ..objstore import ObjectStore
    from ..redis_resp import Client

#: states after which a batch changes no more
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})

#: KEYS: object; ARGV: the states it may be in (space-separated), the new state, now (s),
#: field, value, ... A compare-and-set of `status`, stamping `<status>_at`.
_MOVE = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return {'gone', ''} end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. s .. ' ', 1, true) then return {'no', s} end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', ARGV[3], unpack(ARGV, 4))
return {'ok', s}
"""

#: KEYS: batch, out, err: the batch's fields and its live counts in one round trip
_VIEW = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
return {h, redis.call('HLEN', KEYS[2]), redis.call('HLEN', KEYS[3])}
"""

_encode = msgspec.json.Encoder().encode


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pairs(raw: Sequence[Any]) -> dict[str, bytes]:
    return {_s(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}


def scopes(owner: str, team: str) -> list[str]:
    out = ["all"]
    if owner:
        out.append("key:" + owner)
    if team:
        out.append("team:" + team)
    return out


def visible(h: dict[str, bytes], caller: tuple[str, str] | None) -> bool:
    """The jobs' rule: the submitting key, its team, or the admin (`caller` None)."""
    if caller is None:
        return True
    owner, team = _s(h.get("owner", b"")), _s(h.get("team", b""))
    return caller[0] == owner or bool(team and caller[1] == team)


def caller_scope(caller: tuple[str, str] | None) -> str:
    if caller is None or not caller[0]:  # the admin; or auth off: everything is everyone's
        return "all"
    return "team:" + caller[1] if caller[1] else "key:" + caller[0]


class BatchStore:
    def __init__(self, client: Client, jobs_prefix: str, objects: ObjectStore) -> None:
        self.client = client
        self.objects = objects
        self.base = "{" + jobs_prefix + ":batches}"
        self._move = client.register_script(_MOVE)
        self._view = client.register_script(_VIEW)

    # ---- keys -----------------------------------------------------------------------------------
    def file_key(self, file_id: str) -> str:
        return f"{self.base}:file:{file_id}"

    def batch_key(self, batch_id: str) -> str:
        return f"{self.base}:batch:{batch_id}"

    def out_key(self, batch_id: str) -> str:
        return f"{self.base}:batch:{batch_id}:out"

    def err_key(self, batch_id: str) -> str:
        return f"{self.base}:batch:{batch_id}:err"

    @staticmethod
    def blob(file_id: str) -> str:
        return f"files/{file_id}"

    # ---- files ----------------------------------------------------------------------------------
    async def put_file(
        self, data: bytes, *, filename: str, purpose: str, owner: str, team: str, lines: int = 0
    ) -> dict[str, bytes]:
        """Bytes first, then the metadata: a file id never names missing bytes."""
        file_id = new_file_id()
        await self.objects.put(self.blob(file_id), data, "application/jsonl")
        now = int(time.time())
        fields: dict[str, Any] = {
            "id": file_id,
            "bytes": len(data),
            "created_at": now,
            "filename": filename,
            "purpose": purpose,
            "owner": owner,
            "team": team,
            "lines": lines,
        }
        flat = [x for kv in fields.items() for x in kv]
        await self.client.execute("HSET", self.file_key(file_id), *flat)
        await self._index("files", file_id, owner, team, time.time())
        return {k: str(v).encode() for k, v in fields.items()}

    async def get_file(self, file_id: str) -> dict[str, bytes] | None:
        if not file_id.startswith("file-") or len(file_id) > 64:
            return None
        raw = await self.client.execute("HGETALL", self.file_key(file_id))
        return _pairs(raw) if raw else None

    async def file_bytes(self, file_id: str) -> bytes:
        return await self.objects.get(self.blob(file_id))

    async def delete_file(self, file_id: str, h: dict[str, bytes]) -> None:
        """Metadata first (the id stops answering), then the bytes."""
        await self.client.execute("DEL", self.file_key(file_id))
        await self._unindex("files", file_id, _s(h.get("owner", b"")), _s(h.get("team", b"")))
        await self.objects.delete(self.blob(file_id))

    # ---- batches --------------------------------------------------------------------------------
    async def create_batch(self, fields: dict[str, Any]) -> str:
        batch_id = new_batch_id()
        fields = {"id": batch_id, "status": "validating", **fields}
        flat = [x for kv in fields.items() for x in kv]
        await self.client.execute("HSET", self.batch_key(batch_id), *flat)
        await self._index("batches", batch_id, str(fields["owner"]), str(fields["team"]), time.time())
        return batch_id

    async def view(self, batch_id: str) -> tuple[dict[str, bytes], int, int] | None:
        """(fields, lines succeeded, lines failed): the counts live until the batch is final."""
        if not batch_id.startswith("batch_") or len(batch_id) > 64:
            return None
        reply = await self.client.evalsha(
            self._view, (self.batch_key(batch_id), self.out_key(batch_id), self.err_key(batch_id)), ()
        )
        if not reply:
            return None
        return _pairs(reply[0]), int(reply[1]), int(reply[2])

    async def move(self, batch_id: str, allowed: str, to: str, **fields: Any) -> tuple[bool, str]:
        """(moved, the status before): `allowed` is the space-separated states it may leave."""
        flat = [x for kv in fields.items() for x in kv]
        reply = await self.client.evalsha(
            self._move, (self.batch_key(batch_id),), (allowed, to, int(time.time()), *flat)
        )
        return _s(reply[0]) == "ok", _s(reply[1])

    async def update(self, batch_id: str, **fields: Any) -> None:
        flat = [x for kv in fields.items() for x in kv]
        await self.client.execute("HSET", self.batch_key(batch_id), *flat)

    async def record(self, batch_id: str, custom_id: str, line: bytes, ok: bool) -> bool:
        """A line's outcome, once: False when this custom_id already has one."""
        key = self.out_key(batch_id) if ok else self.err_key(batch_id)
        return bool(await self.client.execute("HSETNX", key, custom_id, line))

    async def done_ids(self, batch_id: str) -> set[str]:
        out, err = (
            await self.client.execute("HKEYS", self.out_key(batch_id)),
            await self.client.execute("HKEYS", self.err_key(batch_id)),
        )
        return {_s(k) for k in (*out, *err)}

    async def results(self, batch_id: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
        out = await self.client.execute("HGETALL", self.out_key(batch_id))
        err = await self.client.execute("HGETALL", self.err_key(batch_id))
        return _pairs(out or ()), _pairs(err or ())

    async def drop_results(self, batch_id: str) -> None:
        await self.client.execute("DEL", self.out_key(batch_id), self.err_key(batch_id))

    # ---- lists ----------------------------------------------------------------------------------
    async def _index(self, kind: str, obj_id: str, owner: str, team: str, at: float) -> None:
        for scope in scopes(owner, team):
            await self.client.execute("ZADD", f"{self.base}:{kind}:{scope}", at, obj_id)

    async def _unindex(self, kind: str, obj_id: str, owner: str, team: str) -> None:
        for scope in scopes(owner, team):
            await self.client.execute("ZREM", f"{self.base}:{kind}:{scope}", obj_id)

    async def page(
        self, kind: str, caller: tuple[str, str] | None, after: str | None, limit: int, desc: bool = True
    ) -> tuple[list[str], bool]:
        """One page of ids (newest first unless `desc` is False) after the id `after`; and
        whether more follow."""
        key = f"{self.base}:{kind}:{caller_scope(caller)}"
        start = 0
        if after:
            rank = await self.client.execute("ZREVRANK" if desc else "ZRANK", key, after)
            if rank is None:
                return [], False
            start = int(rank) + 1
        ids = await self.client.execute("ZREVRANGE" if desc else "ZRANGE", key, start, start + limit)
        ids = [_s(i) for i in ids or ()]
        return ids[:limit], len(ids) > limit
