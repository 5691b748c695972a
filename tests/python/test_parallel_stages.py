"""Concurrent request stages (pipeline/parallel.py): which stages are grouped, and a group's
behaviour: members in flight at the same time, the first refusal cancels the rest (which see
CancelledError before the reply goes out), timings per member plus the group's `pre`. Overlap is
asserted by the order of the stages' enter / exit events, never by wall-clock time. End to end:
extension stages on a real gateway (on and off), and the real `guard` (a fail-closed model guard
whose Triton connection drops) cancelling the real `retrieve` mid-call (a slow embedding
upstream): the deployment slot it held is free again."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, MockUpstream, gateway_config, run_gateway, run_mock
from parallel_parts import ConcurrentSleeper, Sleeper

from gateway.config import ConfigError, parse
from gateway.context import Endpoint, RequestContext
from gateway.dev.openai_mock import embed_text
from gateway.errors import GatewayError
from gateway.pipeline.guard import GuardStage
from gateway.pipeline.parallel import StageGroup, chain, check_declared, flat, place_guard
from gateway.pipeline.retrieve import RetrieveStage
from gateway.vector_index import upsert


# ---- which stages are grouped -------------------------------------------------------------------
class Plain:
    """An undeclared stage: a barrier."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def on_request(self, ctx: RequestContext) -> None:
        return None


class Declared(Plain):
    def __init__(self, name: str, reads: Iterable[str] = (), writes: Iterable[str] = (), waits: bool = True):
        super().__init__(name)
        self.reads = frozenset(reads)
        self.writes = frozenset(writes)
        self.waits = waits


def shape(stages: tuple[Any, ...]) -> list[Any]:
    return [[m.name for m in s.members] if isinstance(s, StageGroup) else s.name for s in stages]


def test_consecutive_independent_waiting_stages_form_a_group() -> None:
    loop = asyncio.new_event_loop()
    try:
        stages = [
            Plain("decode"),
            Declared("retrieve", {"body", "route"}, {"rag"}),
            Declared("guard", {"view", "route"}),
            Plain("prompts"),
            Declared("alone"),
            Plain("limits"),
            Declared("x"),
            Declared("y"),
        ]
        got = chain(stages, loop, True)
        assert shape(got) == ["decode", ["retrieve", "guard"], "prompts", "alone", "limits", ["x", "y"]]
        assert [s.name for s in got if isinstance(s, StageGroup)] == ["pre", "pre2"]
        assert list(flat(got)) == stages  # every part keeps its own lifecycle
        off = chain(stages, loop, False)
        assert off == tuple(stages)  # switched off: the chain as configured, nothing wrapped
        no_group = [Plain("decode"), Declared("retrieve", writes={"rag"}), Plain("prompts")]
        assert chain(no_group, loop, True) == tuple(no_group)  # no group forms: nothing added
    finally:
        loop.close()


def test_a_stage_that_depends_on_another_starts_a_new_run() -> None:
    loop = asyncio.new_event_loop()
    try:
        writer = Declared("retrieve", writes={"rag"})
        reader = Declared("uses_rag", reads={"rag"})
        assert shape(chain([writer, reader], loop, True)) == ["retrieve", "uses_rag"]
        both_write = [Declared("a", writes={"prompt"}), Declared("b", writes={"prompt"})]
        assert shape(chain(both_write, loop, True)) == ["a", "b"]
        # the reader splits off, then groups with what follows it
        third = Declared("c", reads={"view"})
        assert shape(chain([writer, reader, third], loop, True)) == ["retrieve", ["uses_rag", "c"]]
        # a declared stage that never waits runs inline: no task for it
        inline = Declared("rules", waits=False)
        assert shape(chain([writer, inline, third], loop, True)) == ["retrieve", "rules", "c"]
    finally:
        loop.close()


def test_the_guard_goes_beside_retrieve_only_when_it_would_overlap_it() -> None:
    retrieve = Declared("retrieve", writes={"rag"})
    waiting, rules = Declared("guard"), Declared("guard", waits=False)
    stages: list[Any] = [Plain("route"), retrieve, Plain("prompts"), Plain("limits")]
    chain_on = list(stages)
    place_guard(chain_on, waiting, True)
    assert [s.name for s in chain_on] == ["route", "retrieve", "guard", "prompts", "limits"]
    for guard, on, base in ((waiting, False, stages), (rules, True, stages), (waiting, True, stages[2:])):
        got = list(base)
        place_guard(got, guard, on)
        assert got[-1] is guard  # after limits, as without parallel stages


def test_built_in_declarations_name_real_context_slots() -> None:
    for cls in (GuardStage, RetrieveStage):
        check_declared(cls, cls.__name__)
    assert RetrieveStage.writes == {"rag"} and not GuardStage.writes
    assert not GuardStage.reads & RetrieveStage.writes  # the guard does not read the context found


@pytest.mark.parametrize(
    ("reads", "writes", "message"),
    [
        ({"view"}, {"ragg"}, "`writes` names no context slot: ragg"),
        ({"viwe"}, set(), "`reads` names no context slot: viwe"),
        ({"view"}, {"reply_headers"}, "`writes` lists a shared slot"),
        ("view", set(), "`reads` must be a set of context slot names"),
    ],
)
def test_an_extension_declaration_is_checked(reads: Any, writes: Any, message: str) -> None:
    stage = Declared("ext")
    stage.reads, stage.writes = reads, writes
    with pytest.raises(ConfigError, match=message):
        check_declared(stage, "$.extensions[0]")


def test_the_switch_is_validated_and_on_by_default() -> None:
    base = "providers: [{name: p, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: m, provider: p}]\n"
    assert parse(base).pipeline.parallel_stages is True
    assert parse(base + "pipeline: {parallel_stages: false}\n").pipeline.parallel_stages is False
    with pytest.raises(ConfigError, match="parallel_stages"):
        parse(base + "pipeline: {parallel_stages: sometimes}\n")
    with pytest.raises(ConfigError, match="parallel"):
        parse(base + "pipeline: {parallel: true}\n")


# ---- a group's behaviour, in process --------------------------------------------------------------
def events(path: Path, rid: str = "r1") -> list[tuple[str, str]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["stage"], r["event"]) for r in rows if r["id"] == rid]


def sleeper(tmp: Path, name: str, ms: float, parallel: bool = True, **options: Any) -> Sleeper:
    cls = ConcurrentSleeper if parallel else Sleeper
    return cls({"name": name, "ms": ms, "events": str(tmp / "events.jsonl"), **options})


def run_group(stages: list[Any], cancel_after_s: float | None = None) -> tuple[RequestContext, Any]:
    """Run the group on a fresh context in a request task of its own; (ctx, the outcome)."""

    async def main() -> tuple[RequestContext, Any]:
        ctx = RequestContext("r1", Endpoint.CHAT, b"{}", time.perf_counter_ns(), {})
        group = StageGroup("pre", tuple(stages), asyncio.get_running_loop())
        task = asyncio.get_running_loop().create_task(group.on_request(ctx))
        if cancel_after_s is not None:
            await asyncio.sleep(cancel_after_s)
            task.cancel()
        try:
            await task
            outcome: Any = None
        except BaseException as exc:
            outcome = exc
        # every member task is over by the time the group returned or raised
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return ctx, outcome

    return asyncio.run(main())


def test_members_are_in_flight_together_and_each_is_timed(tmp_path: Path) -> None:
    ctx, outcome = run_group([sleeper(tmp_path, "slow", 60), sleeper(tmp_path, "fast", 20)])
    assert outcome is None
    seen = events(tmp_path / "events.jsonl")
    # the second entered before the first exited: they overlapped
    assert seen.index(("fast", "enter")) < seen.index(("slow", "exit"))
    assert seen.index(("slow", "enter")) < seen.index(("fast", "exit"))
    assert list(ctx.timings) == ["slow", "fast"]  # member order, whatever finished first


def test_the_first_refusal_cancels_the_rest_before_it_is_raised(tmp_path: Path) -> None:
    slow = sleeper(tmp_path, "slow", 30_000)
    refuser = sleeper(tmp_path, "refuser", 5, refuse="test_refused")
    ctx, outcome = run_group([slow, refuser])
    assert isinstance(outcome, GatewayError) and outcome.code == "test_refused"
    seen = events(tmp_path / "events.jsonl")
    assert [e for s, e in seen if s == "slow"] == ["enter", "cancelled"]  # saw CancelledError
    assert ("slow", "cancelled") in seen[seen.index(("refuser", "exit")) :]
    assert ctx.timings == {}  # nothing recorded for a refused group


def test_a_cancelled_request_cancels_every_member(tmp_path: Path) -> None:
    _, outcome = run_group([sleeper(tmp_path, "a", 30_000), sleeper(tmp_path, "b", 30_000)], 0.05)
    assert isinstance(outcome, asyncio.CancelledError)
    seen = events(tmp_path / "events.jsonl")
    assert sorted(seen) == [("a", "cancelled"), ("a", "enter"), ("b", "cancelled"), ("b", "enter")]


class Picky(Declared):
    """Has work only when `busy`; records the task it ran on."""

    def __init__(self, name: str, busy: bool) -> None:
        super().__init__(name)
        self.busy = busy
        self.ran_on: list[Any] = []

    def wants(self, ctx: RequestContext) -> bool:
        return self.busy

    async def on_request(self, ctx: RequestContext) -> None:
        self.ran_on.append(asyncio.current_task())


def test_members_without_work_are_left_out_and_a_lone_one_runs_inline() -> None:
    async def main() -> tuple[Any, ...]:
        idle, busy, other = Picky("idle", False), Picky("busy", True), Picky("other", True)
        ctx = RequestContext("r1", Endpoint.CHAT, b"{}", time.perf_counter_ns(), {})
        loop = asyncio.get_running_loop()
        await StageGroup("pre", (idle, busy), loop).on_request(ctx)
        lone = list(ctx.timings)
        await StageGroup("pre", (busy, other), loop).on_request(ctx)
        return idle, busy, other, lone, asyncio.current_task()

    idle, busy, other, lone, request_task = asyncio.run(main())
    assert idle.ran_on == [] and lone == ["busy"]
    assert busy.ran_on[0] is request_task  # alone: inline, no task
    assert busy.ran_on[1] is not request_task and other.ran_on[0] is not request_task  # together: tasks


# ---- end to end: a real gateway ------------------------------------------------------------------
class HungTriton:
    """A Triton address that accepts connections and never answers (a hung server), until
    `drop()` closes them all (the guard's call then fails) and stops listening."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def drop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def config(mock: MockUpstream, tmp: Path, on: bool, slow: MockUpstream | None = None, triton: int = 0) -> str:
    """Extension stages (a: 100 ms, b: 50 ms on `echo`; a refuser and a 30 s stage on
    `mock-echo`); with `slow` and `triton`: model `guarded` has a retriever whose embedding model
    is on `slow`, and a fail-closed model guard on the Triton at port `triton`."""
    ev = tmp / "events.jsonl"
    parts = [
        ("a", 100, "echo", None),
        ("b", 50, "echo", None),
        ("refuser", 5, "mock-echo", "test_refused"),
        ("slow", 30_000, "mock-echo", None),
    ]
    ext = "".join(
        f"""  - {{kind: request_stage, factory: "parallel_parts:sleeper",
     options: {{name: {n}, ms: {ms}, model: {model}, refuse: {refuse or "null"}, events: "{ev}"}}}}
"""
        for n, ms, model, refuse in parts
    )
    text = gateway_config(mock.port) + f"pipeline: {{parallel_stages: {str(on).lower()}}}\nextensions:\n{ext}"
    if slow is None:
        return text
    index = tmp / "docs.db"
    upsert(index, [("hello.md#0", "Hello", "hello there, general", embed_text(["hello", "there"], 64))])
    text = text.replace(
        "models:",
        f"""  - {{name: triton, kind: triton, base_url: "grpc://127.0.0.1:{triton}"}}
  - {{name: slowemb, base_url: "http://127.0.0.1:{slow.port}/v1"}}
models:
  - {{name: guarded, provider: mock, upstream_model: mock-echo}}
  - {{name: embed-slow, kind: embedding, provider: slowemb, upstream_model: mock-embed}}""",
        1,
    )
    return (
        text
        + f"""guards:
  - {{name: tg, kind: triton, provider: triton, model: prompt_guard, timeout_ms: 30000,
      on_error: fail_closed, models: [guarded]}}
retrieval:
  retrievers: {{docs: {{index: '{index}', embedding_model: embed-slow, budget_ms: 30000}}}}
  models: {{guarded: docs}}
metrics: {{publish_interval_ms: 50, require_admin: false}}
"""
    )


def post(gw: Gateway, model: str, rid: str, timeout_s: float = 20) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(
        f"{gw.url}/v1/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}]}).encode(),
        headers={"content-type": "application/json", "x-request-id": rid},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def timing_names(headers: dict[str, str]) -> list[str]:
    return [p.split(";")[0].strip() for p in headers["server-timing"].split(",")]


class Setup:
    def __init__(self, gw: Gateway, slow: MockUpstream, hung: HungTriton, tmp: Path) -> None:
        self.gw, self.slow, self.hung, self.tmp = gw, slow, hung, tmp


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    with run_mock() as m:
        yield m


@pytest.fixture(scope="module")
def on(mock: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("parallel-on")
    hung = HungTriton()
    with run_mock() as slow:
        faults = json.dumps({"first_delay_ms": 30_000}).encode()  # the embedding model: 30 s
        urllib.request.urlopen(urllib.request.Request(f"{slow.url}/_mock/faults", data=faults), timeout=5)
        with run_gateway(tmp, mock, config_text=config(mock, tmp, True, slow, hung.port)) as gw:
            yield Setup(gw, slow, hung, tmp)
    hung.drop()


def test_extension_stages_overlap_and_a_refusal_cancels_the_slow_one(on: Setup) -> None:
    status, headers, _ = post(on.gw, "echo", "overlap-1")
    assert status == 200
    seen = events(on.tmp / "events.jsonl", "overlap-1")
    assert seen.index(("b", "enter")) < seen.index(("a", "exit"))
    names = timing_names(headers)
    assert names.index("a") < names.index("b") < names.index("pre2")  # each stage, then the group

    # the reply waits neither for the slow stage's 30 s nor for a poll: its cancellation was
    # awaited before the refusal went out
    status, headers, body = post(on.gw, "mock-echo", "refuse-1", timeout_s=10)
    assert status == 400 and body["error"]["code"] == "test_refused"
    seen = events(on.tmp / "events.jsonl", "refuse-1")
    assert [e for s, e in seen if s == "slow"] == ["enter", "cancelled"]
    assert [e for s, e in seen if s == "refuser"] == ["enter", "exit"]


def test_switched_off_the_same_stages_run_one_after_the_other(mock: MockUpstream, tmp_path: Path) -> None:
    with run_gateway(tmp_path, mock, config_text=config(mock, tmp_path, False)) as gw:
        status, headers, _ = post(gw, "echo", "serial-1")
        assert status == 200
        assert events(tmp_path / "events.jsonl", "serial-1") == [
            ("a", "enter"),
            ("a", "exit"),
            ("b", "enter"),
            ("b", "exit"),
        ]
        assert "pre" not in timing_names(headers)


def in_flight(gw: Gateway, deployment: str) -> float | None:
    with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fastpath_deployment_in_flight{") and f'"{deployment}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(what: str, check: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_guard_refusal_cancels_retrieval_mid_call(on: Setup) -> None:
    """The real stages: `guard` beside `retrieve` (before prompts and limits); the guard's
    Triton hangs while the retrieval's embedding call is at its upstream; the Triton connection
    drops, the fail-closed guard refuses, and the retrieval is cancelled mid-call."""
    gw = on.gw
    reply: list[Any] = []
    t = threading.Thread(target=lambda: reply.append(post(gw, "guarded", "guarded-1", timeout_s=20)))
    t.start()
    # both in flight: the embedding request is at its upstream, holding its deployment's slot,
    # while the guard waits on its model
    wait_for("the embedding request", lambda: any(e["path"] == "/v1/embeddings" for e in on.slow.events()))
    wait_for("the slot held", lambda: in_flight(gw, "embed-slow") == 1.0)
    on.hung.drop()
    t.join(20)
    status, headers, body = reply[0]
    assert status == 503 and body["error"]["code"] == "guard_unavailable"
    assert "tg=fail_closed" in headers["x-fastpath-guard"]
    assert "x-fastpath-rag" not in headers  # the cancelled retrieval wrote nothing
    # its upstream call was aborted and the deployment's slot given back (not held for the
    # 30 s the upstream takes)
    wait_for("the slot freed", lambda: in_flight(gw, "embed-slow") == 0.0, timeout_s=10)
