"""The job queue in Redis: a stream for delivery, a hash per job for its state, Lua for every
state change.

    submit ─▶ pending ─claim─▶ processing ─complete─▶ complete ─┐
                 ▲  │              │ ├─fail (last try)─▶ failed ─┤
                 │  │              │ └─timeout──────────▶ timeout ┼─(retention)─▶ closed
                 │  └─cancel───────┴─cancel────────────▶ cancelled ┘
                 └──── fail (retriable, tries left): a new delivery

Why Redis Streams with one consumer group: XREADGROUP hands each entry to exactly one worker and
keeps it in the group's pending list until XACK, so a worker that dies holding a job leaves the
entry behind; XAUTOCLAIM gives entries idle for longer than the visibility timeout to another
worker (redelivery). A blocking read wakes a worker as soon as work arrives, without polling.

Delivery is not the truth, the job hash is: every transition is one Lua script that reads the
job's current state (and, for a claimed job, the claim's lease token) and changes it atomically.
A claim makes a fresh random token and bumps `attempts`; `complete`, `fail`, `heartbeat` and a
worker's own `timeout` only act when the token is still the job's. A redelivered job's stale
worker (it was only slow, or its Redis replies were lost) therefore can never write a result:
its token was replaced by the new claim's, or the job is already final. At most one `complete`
succeeds per job, ever. A running worker renews its lease every quarter of the visibility
timeout (`heartbeat`; it also resets the entry's idle time, so XAUTOCLAIM leaves it alone) and
learns there, at the latest, that its job was cancelled or taken over.

Time is Redis's (`TIME` in the script), one clock for every gateway; tests pass `now_ms` to
drive a virtual clock. Every key shares the hash tag `{prefix}` (one Redis Cluster slot: the
scripts touch several keys). Each transition publishes the job's new status on
`<job key>:events` (the SSE route subscribes to it).

Durability: an accepted job is only as durable as Redis's persistence: run it with
`appendonly yes` and `appendfsync everysec` (at most a second of acknowledged submits lost on
a power cut; `always` for none) - see README "Async requests".
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..config_jobs import JobsConfig
    from ..redis_resp import Client

GROUP = "workers"
#: states after which nothing but `closed` follows
FINAL = frozenset({"complete", "failed", "timeout", "cancelled"})
STATES = frozenset({"pending", "processing", "closed"}) | FINAL

_PRELUDE = """
local GROUP = 'workers'
local function now_ms(v)
  if v ~= nil and v ~= '' then return tonumber(v) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(job, field) return tonumber(redis.call('HGET', job, field) or '0') or 0 end
local function event(job, state, now)
  local e = {id = redis.call('HGET', job, 'id'), status = state, at = now, attempts = num(job, 'attempts')}
  redis.call('PUBLISH', job .. ':events', cjson.encode(e))
end
local function drop(stream, entry)
  if entry and entry ~= '' then
    redis.call('XACK', stream, GROUP, entry)
    redis.call('XDEL', stream, entry)
  end
end
local function err(message, etype, code)
  return cjson.encode({error = {message = message, type = etype, code = code}})
end
-- a final state: the delivery is done, the result or error stays until `closes_at`
local function finish(job, stream, closing, state, now, retention, ...)
  drop(stream, redis.call('HGET', job, 'entry'))
  redis.call('HSET', job, 'state', state, 'finished_at', now, 'closes_at', now + retention,
             'lease_token', '', 'entry', '', ...)
  redis.call('ZADD', closing, now + retention, redis.call('HGET', job, 'id'))
  event(job, state, now)
end
"""

#: KEYS: job, stream, idem; ARGV: id, has_idem, idem_value, idem_ttl_ms, deadline_ms, now, fields...
_SUBMIT = """
if ARGV[2] == '1' then
  local got = redis.call('GET', KEYS[3])
  if got then return {'exists', got} end
end
local job, now = KEYS[1], now_ms(ARGV[6])
redis.call('HSET', job, 'id', ARGV[1], 'state', 'pending', 'created_at', now, 'started_at', '',
           'finished_at', '', 'attempts', 0, 'deadline_at', now + tonumber(ARGV[5]),
           'lease_token', '', 'lease_until', 0, unpack(ARGV, 7))
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])
redis.call('HSET', job, 'entry', entry)
if ARGV[2] == '1' then redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4]) end
event(job, 'pending', now)
return {'created', ARGV[1]}
"""

#: KEYS: job, stream, closing; ARGV: entry, token, consumer, visibility_ms, retention_ms, now.
#: A delivered entry -> processing: a pending job, or a processing one whose lease expired (its
#: worker is gone: a redelivery). Past the deadline -> timeout; out of attempts -> failed.
_CLAIM = """
local job, stream, closing = KEYS[1], KEYS[2], KEYS[3]
local entry, now, retention = ARGV[1], now_ms(ARGV[6]), tonumber(ARGV[5])
local state = redis.call('HGET', job, 'state')
if not state then drop(stream, entry) return {'gone'} end
if redis.call('HGET', job, 'entry') ~= entry then drop(stream, entry) return {'skip', state} end
if state == 'processing' then
  if num(job, 'lease_until') > now then return {'busy'} end
elseif state ~= 'pending' then
  drop(stream, entry) return {'skip', state}
end
if now >= num(job, 'deadline_at') then
  finish(job, stream, closing, 'timeout', now, retention,
         'error', err('The job did not finish before its deadline.', 'timeout', 'job_deadline_exceeded'))
  return {'timeout'}
end
local attempts = num(job, 'attempts')
if attempts >= num(job, 'max_attempts') then
  local last = redis.call('HGET', job, 'last_error')
  if not last or last == '' then
    last = err('The job was delivered ' .. attempts .. ' times and never finished (its workers were lost).',
               'server_error', 'job_attempts_exhausted')
  end
  finish(job, stream, closing, 'failed', now, retention, 'error', last)
  return {'failed'}
end
attempts = redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HSET', job, 'state', 'processing', 'lease_token', ARGV[2],
           'lease_until', now + tonumber(ARGV[4]), 'consumer', ARGV[3])
if redis.call('HGET', job, 'started_at') == '' then redis.call('HSET', job, 'started_at', now) end
event(job, 'processing', now)
local f = redis.call('HMGET', job, 'endpoint', 'body', 'principal', 'headers', 'deadline_at')
return {'ok', attempts, f[1], f[2], f[3], f[4], f[5]}
"""

#: KEYS: job, stream; ARGV: token, consumer, visibility_ms, now
_HEARTBEAT = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if state ~= 'processing' or redis.call('HGET', job, 'lease_token') ~= ARGV[1] then
  return state or 'gone'
end
redis.call('HSET', job, 'lease_until', now_ms(ARGV[4]) + tonumber(ARGV[3]))
redis.call('XCLAIM', KEYS[2], GROUP, ARGV[2], 0, redis.call('HGET', job, 'entry'), 'JUSTID')
return 'ok'
"""

#: KEYS: job, stream, closing; ARGV: token, status, result, retention_ms, now
_COMPLETE = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if state ~= 'processing' or redis.call('HGET', job, 'lease_token') ~= ARGV[1] then
  return {'stale', state or 'gone'}
end
finish(job, KEYS[2], KEYS[3], 'complete', now_ms(ARGV[5]), tonumber(ARGV[4]),
       'result_status', ARGV[2], 'result', ARGV[3])
return {'ok'}
"""

#: KEYS: job, stream, closing; ARGV: token, status, error, retriable, retention_ms, now.
#: Retriable with tries and time left -> pending again (a new stream entry); else -> failed.
_FAIL = """
local job, stream = KEYS[1], KEYS[2]
local state = redis.call('HGET', job, 'state')
if state ~= 'processing' or redis.call('HGET', job, 'lease_token') ~= ARGV[1] then
  return {'stale', state or 'gone'}
end
local now = now_ms(ARGV[6])
if ARGV[4] == '1' and num(job, 'attempts') < num(job, 'max_attempts') and now < num(job, 'deadline_at') then
  drop(stream, redis.call('HGET', job, 'entry'))
  local entry = redis.call('XADD', stream, '*', 'id', redis.call('HGET', job, 'id'))
  redis.call('HSET', job, 'state', 'pending', 'entry', entry, 'lease_token', '', 'lease_until', 0,
             'last_error', ARGV[3], 'result_status', ARGV[2])
  event(job, 'pending', now)
  return {'retry'}
end
finish(job, stream, KEYS[3], 'failed', now, tonumber(ARGV[5]), 'error', ARGV[3], 'result_status', ARGV[2])
return {'failed'}
"""

#: KEYS: job, stream, closing; ARGV: token ('' = not the claimant), retention_ms, now.
#: Past its deadline: a pending job, the claimant's own job, or one whose claimant is gone.
_TIMEOUT = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
local now = now_ms(ARGV[3])
if state == 'processing' then
  local mine = ARGV[1] ~= '' and redis.call('HGET', job, 'lease_token') == ARGV[1]
  if not mine and num(job, 'lease_until') > now then return {'busy', state} end
elseif state ~= 'pending' then
  return {'no', state or 'gone'}
end
if now < num(job, 'deadline_at') then return {'not_due', state} end
finish(job, KEYS[2], KEYS[3], 'timeout', now, tonumber(ARGV[2]),
       'error', err('The job did not finish before its deadline.', 'timeout', 'job_deadline_exceeded'))
return {'ok', state}
"""

#: KEYS: job, stream, closing; ARGV: retention_ms, now
_CANCEL = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if state ~= 'pending' and state ~= 'processing' then return {'no', state or 'gone'} end
finish(job, KEYS[2], KEYS[3], 'cancelled', now_ms(ARGV[2]), tonumber(ARGV[1]),
       'error', err('The job was cancelled.', 'cancelled', 'job_cancelled'))
return {'ok', state}
"""

#: KEYS: job, closing; ARGV: id, tombstone_ms, now. A final job past its retention -> closed:
#: the request, result and error are deleted; the rest stays `tombstone_ms` longer.
_CLOSE = """
local job = KEYS[1]
local state = redis.call('HGET', job, 'state')
if not state then redis.call('ZREM', KEYS[2], ARGV[1]) return 'gone' end
local now = now_ms(ARGV[3])
if state == 'complete' or state == 'failed' or state == 'timeout' or state == 'cancelled' then
  if now < num(job, 'closes_at') then return state end
  redis.call('HDEL', job, 'body', 'result', 'error', 'last_error', 'headers')
  redis.call('HSET', job, 'state', 'closed', 'closed_at', now)
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', job, ARGV[2])
  event(job, 'closed', now)
  return 'ok'
end
return state
"""


class Claimed(NamedTuple):
    """A job this worker now runs, under `token`."""

    job_id: str
    token: str
    attempts: int
    endpoint: str
    body: bytes
    principal: bytes
    headers: bytes
    deadline_ms: int


def new_id() -> str:
    return "job_" + os.urandom(12).hex()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _now(now_ms: int | None) -> str:
    return "" if now_ms is None else str(now_ms)


class JobQueue:
    """The transitions as calls; every one is a single Lua script (one round trip)."""

    def __init__(self, client: Client, cfg: JobsConfig) -> None:
        self.client = client
        self.cfg = cfg
        base = "{" + cfg.prefix + "}"
        self.stream = base + ":stream"
        self.closing = base + ":closing"
        self._job = base + ":job:"
        self._idem = base + ":idem:"
        self.visibility_ms = cfg.visibility_timeout_ms
        self.retention_ms = cfg.retention_s * 1000
        reg = client.register_script
        self._submit = reg(_PRELUDE + _SUBMIT)
        self._claim = reg(_PRELUDE + _CLAIM)
        self._heartbeat = reg(_PRELUDE + _HEARTBEAT)
        self._complete = reg(_PRELUDE + _COMPLETE)
        self._fail = reg(_PRELUDE + _FAIL)
        self._timeout = reg(_PRELUDE + _TIMEOUT)
        self._cancel = reg(_PRELUDE + _CANCEL)
        self._close = reg(_PRELUDE + _CLOSE)

    def job_key(self, job_id: str) -> str:
        return self._job + job_id

    def channel(self, job_id: str) -> str:
        return self._job + job_id + ":events"

    async def ensure_group(self) -> None:
        """The consumer group, created from the stream's start (entries added before it count)."""
        try:
            await self.client.execute("XGROUP", "CREATE", self.stream, GROUP, "0", "MKSTREAM")
        except Exception as exc:  # ReplyError BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise

    # ---- transitions --------------------------------------------------------------------------
    async def submit(
        self,
        *,
        endpoint: str,
        body: bytes,
        owner: str,
        team: str,
        principal: bytes,
        headers: bytes,
        request_id: str,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
        now_ms: int | None = None,
    ) -> tuple[bool, str]:
        """(created, job id). With an idempotency key already used by this owner: (False, the
        first job's id), or a ValueError when that key came with another request body."""
        job_id = new_id()
        digest = hashlib.sha256(endpoint.encode() + b"\0" + body).hexdigest()
        idem = ""
        if idempotency_key is not None:
            idem = self._idem + hashlib.sha256(f"{owner}\0{idempotency_key}".encode()).hexdigest()
        deadline_ms = int((deadline_s if deadline_s is not None else self.cfg.deadline_s) * 1000)
        fields: tuple[Any, ...] = ("endpoint", endpoint, "body", body, "owner", owner, "team", team)
        fields += ("principal", principal, "headers", headers, "request_hash", digest)
        fields += ("max_attempts", self.cfg.max_attempts, "idem", idem, "request_id", request_id)
        ttl = deadline_ms + 2 * self.retention_ms
        reply = await self.client.evalsha(
            self._submit,
            (self.job_key(job_id), self.stream, idem or self.job_key(job_id)),
            (job_id, "1" if idem else "0", f"{job_id} {digest}", ttl, deadline_ms, _now(now_ms), *fields),
        )
        if _s(reply[0]) == "created":
            return True, job_id
        first, _, first_digest = _s(reply[1]).partition(" ")
        if first_digest != digest:
            raise ValueError(first)
        return False, first

    async def read(
        self, consumer: str, count: int, block_ms: int | None, client: Client | None = None
    ) -> list[tuple[str, str]]:
        """New entries for this consumer: [(entry id, job id)]; `block_ms` waits for one (on
        `client`, a connection of its own: a blocked connection answers nothing else)."""
        cmd: tuple[Any, ...] = ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count)
        if block_ms is not None:
            cmd += ("BLOCK", block_ms)
        reply = await (client or self.client).execute(*cmd, "STREAMS", self.stream, ">")
        if not reply:
            return []
        return _entries(reply[0][1])

    async def autoclaim(
        self, consumer: str, count: int, min_idle_ms: int | None = None
    ) -> list[tuple[str, str]]:
        """Entries whose worker stopped renewing for the visibility timeout (it died)."""
        idle = self.visibility_ms if min_idle_ms is None else min_idle_ms
        reply = await self.client.execute(
            "XAUTOCLAIM", self.stream, GROUP, consumer, idle, "0-0", "COUNT", count
        )
        return _entries(reply[1])

    async def claim(
        self, entry: str, job_id: str, token: str, consumer: str, now_ms: int | None = None
    ) -> Claimed | str:
        reply = await self.client.evalsha(
            self._claim,
            (self.job_key(job_id), self.stream, self.closing),
            (entry, token, consumer, self.visibility_ms, self.retention_ms, _now(now_ms)),
        )
        if _s(reply[0]) != "ok":
            return _s(reply[0])
        _, attempts, endpoint, body, principal, headers, deadline = reply
        return Claimed(job_id, token, int(attempts), _s(endpoint), body, principal, headers, int(deadline))

    async def heartbeat(self, job_id: str, token: str, consumer: str, now_ms: int | None = None) -> str:
        """'ok' (the lease runs another visibility timeout), or the state that took the job."""
        reply = await self.client.evalsha(
            self._heartbeat,
            (self.job_key(job_id), self.stream),
            (token, consumer, self.visibility_ms, _now(now_ms)),
        )
        return _s(reply)

    async def complete(
        self, job_id: str, token: str, status: int, result: bytes, now_ms: int | None = None
    ) -> bool:
        reply = await self.client.evalsha(
            self._complete,
            (self.job_key(job_id), self.stream, self.closing),
            (token, status, result, self.retention_ms, _now(now_ms)),
        )
        return _s(reply[0]) == "ok"

    async def fail(
        self,
        job_id: str,
        token: str,
        status: int,
        error: bytes,
        retriable: bool,
        now_ms: int | None = None,
    ) -> str:
        """'retry' (pending again), 'failed', or 'stale' (not this claimant's job any more)."""
        reply = await self.client.evalsha(
            self._fail,
            (self.job_key(job_id), self.stream, self.closing),
            (token, status, error, "1" if retriable else "0", self.retention_ms, _now(now_ms)),
        )
        return _s(reply[0])

    async def timeout(self, job_id: str, token: str = "", now_ms: int | None = None) -> bool:
        reply = await self.client.evalsha(
            self._timeout,
            (self.job_key(job_id), self.stream, self.closing),
            (token, self.retention_ms, _now(now_ms)),
        )
        return _s(reply[0]) == "ok"

    async def cancel(self, job_id: str, now_ms: int | None = None) -> tuple[bool, str]:
        """(cancelled now, the state before: or the final state that stays)."""
        reply = await self.client.evalsha(
            self._cancel,
            (self.job_key(job_id), self.stream, self.closing),
            (self.retention_ms, _now(now_ms)),
        )
        return _s(reply[0]) == "ok", _s(reply[1])

    async def close(self, job_id: str, now_ms: int | None = None) -> bool:
        reply = await self.client.evalsha(
            self._close, (self.job_key(job_id), self.closing), (job_id, self.retention_ms, _now(now_ms))
        )
        return _s(reply) == "ok"

    async def close_due(self, limit: int = 100, now_ms: int | None = None) -> int:
        """Close the final jobs whose retention ended (any worker may; the script decides)."""
        if now_ms is None:
            sec, usec = await self.client.execute("TIME")
            now_ms = int(sec) * 1000 + int(usec) // 1000
        due = await self.client.execute("ZRANGEBYSCORE", self.closing, "-inf", now_ms, "LIMIT", 0, limit)
        closed = 0
        for raw in due or ():
            closed += await self.close(_s(raw), now_ms)
        return closed

    async def get(self, job_id: str) -> dict[str, bytes] | None:
        reply = await self.client.execute("HGETALL", self.job_key(job_id))
        if not reply:
            return None
        return {_s(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


def _entries(raw: Sequence[Any]) -> list[tuple[str, str]]:
    out = []
    for entry in raw or ():
        if not entry or entry[1] is None:  # an entry deleted while pending
            continue
        fields = entry[1]
        job_id = next((_s(fields[i + 1]) for i in range(0, len(fields), 2) if _s(fields[i]) == "id"), None)
        if job_id is not None:
            out.append((_s(entry[0]), job_id))
    return out
