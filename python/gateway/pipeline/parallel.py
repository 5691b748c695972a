"""Concurrent request stages (issue 18, item 3): consecutive stages that do not depend on each
other's output run at the same time; the request waits for the slowest, and the first refusal
cancels the rest.

A stage opts in by declaring, as class attributes, which `RequestContext` slots it `reads` and
which it `writes` (frozensets of slot names). Declaring them is a promise:

- it reads only `reads` and sets only `writes`, plus two shared, append-only slots: it may add
  to `reply_headers` (one `+=` statement: no await between reading and writing the tuple) and
  put its own keys in `timings`;
- it is cancel-safe: cancelled at any await (another stage refused, the client left), it gives
  back what it holds (an upstream call, a deployment's slot) and writes nothing more.

A declared stage may also say `waits = False` (a class attribute or property): it never waits
on I/O, so it runs inline, where a task would only add cost.

`chain` turns a run of 2+ consecutive declared, waiting stages, none reading or writing what
another of the run writes, into one `StageGroup` (timings: each member under its own name,
then the group's wall time as `pre`). Anything else runs in order as before, at no added cost.
Undeclared stages are barriers: `decode`, `auth` (nothing that costs runs before the caller is
known), `route`, `prompts` (it reads what `retrieve` found), `limits` (not cancel-safe: a
cancelled Redis decision would leave its reservation without a lease to settle; and it counts
the final body's tokens), `tool_check`. So a guard never overlaps limits.

Which built-in stages overlap: `retrieve` (writes `rag`) and `guard` when it waits (a model
guard): the prompt guard judges what the client wrote, not the retrieved documents nor the
operator's prompt (those are trusted: the index and templates are the operator's), so with a
retriever it goes right after `retrieve`, ahead of `prompts` and `limits` (`place_guard`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..context import RequestContext
from .stage import Part

if TYPE_CHECKING:
    from .stage import RequestStage

#: slots every stage may touch whatever it declares (append-only, see the contract above)
SHARED = frozenset({"reply_headers", "timings"})
#: the timing name of the first group (the next ones: pre2, pre3, ...)
GROUP_TIMING = "pre"
#: a group's timing name -> its members' names (static: the config's chain), for the trace
#: observer, which lays the members' spans side by side from the group's start
GROUP_MEMBERS: dict[str, tuple[str, ...]] = {}


def concurrent(stage: Any) -> bool:
    """The stage declared the contract and waits on something: it may run in a group."""
    return getattr(stage, "writes", None) is not None and bool(getattr(stage, "waits", True))


def check_declared(stage: Any, where: str) -> None:
    """An extension's `reads` / `writes` name context slots (a typo would silently make a
    dependency invisible to `chain`)."""
    if getattr(stage, "writes", None) is None:
        return
    slots = set(RequestContext.__slots__)
    for attr in ("reads", "writes"):
        value = getattr(stage, attr, None)
        if not isinstance(value, frozenset | set) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: `{attr}` must be a set of context slot names")
        unknown = sorted(set(value) - slots)
        if unknown:
            raise ConfigError(f"{where}: `{attr}` names no context slot: {', '.join(unknown)}")
    if set(stage.writes) & SHARED:
        raise ConfigError(f"{where}: `writes` lists a shared slot ({', '.join(sorted(SHARED))})")


def _depends(stage: Any, run: list[Any]) -> bool:
    wrote: set[str] = set()
    read: set[str] = set()
    for r in run:
        wrote |= r.writes
        read |= r.reads
    return bool(stage.reads & wrote or stage.writes & (wrote | read))


def chain(stages: Sequence[RequestStage], loop: asyncio.AbstractEventLoop, on: bool) -> tuple[Any, ...]:
    """The stages as the pipeline runs them: runs of concurrent stages grouped (when `on`)."""
    if not on:
        return tuple(stages)
    out: list[Any] = []
    run: list[Any] = []

    def close() -> None:
        if len(run) > 1:
            n = sum(isinstance(s, StageGroup) for s in out)
            out.append(StageGroup(GROUP_TIMING + (str(n + 1) if n else ""), tuple(run), loop))
        else:
            out.extend(run)
        run.clear()

    for s in stages:
        if not concurrent(s):
            close()
            out.append(s)
            continue
        if run and _depends(s, run):
            close()
        run.append(s)
    close()
    return tuple(out)


def flat(stages: Iterable[Any]) -> Iterator[Any]:
    """The stages with every group replaced by its members (their lifecycle is their own)."""
    for s in stages:
        if isinstance(s, StageGroup):
            yield from s.members
        else:
            yield s


def place_guard(stages: list[Any], guard: Any, on: bool) -> None:
    """Stage `guard`'s place: right after `retrieve` when it would overlap it, else last (after
    `limits`, which then refuse an over-limit caller before any classifier is asked). Only a
    guard that waits moves: a rules-only guard gains nothing from overlapping."""
    if on and concurrent(guard):
        at = next((i for i, s in enumerate(stages) if s.name == "retrieve"), None)
        if at is not None:
            stages.insert(at + 1, guard)
            return
    stages.append(guard)


async def _timed(stage: Any, ctx: RequestContext, ns: list[int], i: int) -> None:
    t = time.perf_counter_ns()
    await stage.on_request(ctx)
    ns[i] = time.perf_counter_ns() - t


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a finished member's exception seen (no 'never retrieved' warning)."""
    if not task.cancelled():
        task.exception()


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel and wait: a cancelled member has released what it held before the reply."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
        t.add_done_callback(_retrieved)
    if pending:
        await asyncio.wait(pending)


class StageGroup(Part):
    """Stages run as concurrent tasks of the request: it continues when all returned; the first
    to raise (a refusal) cancels the others and its error is the request's. A member with a
    `wants(ctx)` method (optional, cheap, synchronous: False only when `on_request` would do
    nothing) is left out of requests it has nothing to do for; one member left runs inline."""

    __slots__ = ("_loop", "_wants", "members", "name")

    def __init__(self, name: str, members: tuple[Any, ...], loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.members = members
        self._loop = loop
        GROUP_MEMBERS[name] = tuple(m.name for m in members)
        wants = tuple(getattr(m, "wants", None) for m in members)
        self._wants = None if all(w is None for w in wants) else wants

    async def on_request(self, ctx: RequestContext) -> None:
        wants = self._wants
        members = self.members
        if wants is not None:
            members = tuple(m for m, w in zip(members, wants, strict=True) if w is None or w(ctx))
        if len(members) > 1:
            await self._together(ctx, members)
        elif members:  # one has work: no task for it
            m = members[0]
            t = time.perf_counter_ns()
            await m.on_request(ctx)
            ctx.timings[m.name] = time.perf_counter_ns() - t

    async def _together(self, ctx: RequestContext, members: tuple[Any, ...]) -> None:
        loop = self._loop
        ns = [0] * len(members)
        waiter = loop.create_future()
        left = len(members)

        def done(task: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            failed = not task.cancelled() and task.exception() is not None
            if (failed or not left) and not waiter.done():
                waiter.set_result(None)

        tasks = []
        for i, m in enumerate(members):
            task = loop.create_task(_timed(m, ctx, ns, i))
            task.add_done_callback(done)
            tasks.append(task)
        try:
            await waiter
        except asyncio.CancelledError:  # the request's own task: the client left
            await _cancel(tasks)
            raise
        finished = [t for t in tasks if t.done() and not t.cancelled()]
        if left:  # a member raised while others still run
            await _cancel(tasks)
        for t in finished:  # the first refusal in member order among those that had ended
            exc = t.exception()
            if exc is not None:
                raise exc
        timings = ctx.timings
        for m, d in zip(members, ns, strict=True):
            timings[m.name] = d
