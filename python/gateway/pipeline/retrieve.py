"""Stage `retrieve`: documents for the prompt, within a time budget (issue 18, item 2).

For a chat request to a model with a retriever, the last user message is embedded by the
retriever's embedding model through this gateway's own routes and adapters (in process: the
dispatcher's retries, breakers and balancing apply, no HTTP loopback), looked up in the embedded
vector index (`vector_index.py`), and the results put on `ctx.rag` for stage `prompts`, which
runs next and injects them (`{{ context }}`).

Retrieval is an enhancement, never a reason to fail a request: past `budget_ms` (embedding and
lookup together) or on any error, the request proceeds without context. `x-fastpath-rag` says
which it was (`hit`, `empty`, `timeout`, `error`), `x-fastpath-citations` lists what was injected
(JSON, bounded), and a retriever with `citations_in_body` adds a top-level `citations` array to
unary chat replies (this stage is also a response stage for that). The embedding call is the
gateway's own: it is not charged to the caller's limits or ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..context import Endpoint, RequestContext
from ..routing.dispatch import Dispatch
from ..schemas import EmbeddingsRequestView
from ..upstream_body import message_text, upstream_body
from ..vector_index import Doc, VectorIndex
from .relay import DeltaHook
from .stage import Part

if TYPE_CHECKING:
    from ..config import Config
    from ..config_prompts import RetrieverConfig
    from ..worker import Worker

log = logging.getLogger("gateway.retrieve")

RAG_HEADER = "x-fastpath-rag"
CITATIONS_HEADER = "x-fastpath-citations"
#: the citations header's JSON stays under this many characters (whole entries dropped)
MAX_CITATIONS_CHARS = 1_024
#: the query sent to the embedding model: the tail of the last user message
MAX_QUERY_CHARS = 2_000

_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode
_messages = msgspec.json.Decoder(dict[str, Any])


class _Vectors(msgspec.Struct, gc=False):
    embedding: list[float]


class _EmbeddingReply(msgspec.Struct, gc=False):
    data: list[_Vectors]


_reply = msgspec.json.Decoder(_EmbeddingReply)


class Retrieved:
    """What the stage found for one request (`ctx.rag`)."""

    __slots__ = ("docs", "in_body", "outcome")

    def __init__(self, outcome: str, docs: list[Doc], in_body: bool) -> None:
        self.outcome = outcome
        self.docs = docs
        self.in_body = in_body


class _Retriever:
    __slots__ = ("cfg", "index", "name")

    def __init__(self, name: str, cfg: RetrieverConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.index: VectorIndex | None = None
        try:
            self.index = VectorIndex(cfg.index)
        except Exception as exc:  # the gateway serves; every request says `error`
            log.error("retriever %s: cannot open its index: %s", name, exc)


class RetrieveStage(Part):
    name = "retrieve"
    __slots__ = ("_dispatch", "_loop", "_models", "counts", "routes")
    #: may overlap other stages (pipeline/parallel.py): it writes only `rag`; cancelled, the
    #: embedding call is aborted and its deployment slot freed (`_embed`), nothing is written
    reads = frozenset({"body", "endpoint", "plan", "priority", "request_id", "route", "trace"})
    writes = frozenset({"rag"})

    def __init__(self, cfg: Config, worker: Worker) -> None:
        self._loop = worker.loop
        self.routes = worker.routes
        self._dispatch = Dispatch(worker.loop, cfg.server.max_stream_duration_ms / 1000)
        retrievers = {n: _Retriever(n, r) for n, r in cfg.retrieval.retrievers.items()}
        self._models = {m: retrievers[n] for m, n in cfg.retrieval.models.items()}
        #: outcome -> requests (hit, empty, timeout, error), this worker
        self.counts: dict[str, int] = {"hit": 0, "empty": 0, "timeout": 0, "error": 0}

    def wants(self, ctx: RequestContext) -> bool:
        """Whether this request has a retriever (a parallel group skips it otherwise)."""
        route, plan = ctx.route, ctx.plan
        if ctx.endpoint is not Endpoint.CHAT or route is None or route.name not in self._models:
            return False
        return plan is None or not plan.skip_retrieval

    async def on_request(self, ctx: RequestContext) -> None:
        route = ctx.route
        if ctx.endpoint is not Endpoint.CHAT or route is None:
            return
        r = self._models.get(route.name)
        if r is None or (ctx.plan is not None and ctx.plan.skip_retrieval):  # stage `planner`
            return
        query = _query(ctx.body)
        if not query:
            return
        try:
            docs = await asyncio.wait_for(self._retrieve(ctx, r, query), r.cfg.budget_ms / 1000)
            outcome = "hit" if docs else "empty"
        except TimeoutError:
            docs, outcome = [], "timeout"
            log.warning(
                "request %s: retriever %s: over its %d ms budget", ctx.request_id, r.name, r.cfg.budget_ms
            )
        except Exception as exc:
            docs, outcome = [], "error"
            log.warning("request %s: retriever %s failed: %s", ctx.request_id, r.name, exc)
        self.counts[outcome] += 1
        ctx.rag = Retrieved(outcome, docs, r.cfg.citations_in_body)
        headers: tuple[tuple[str, str], ...] = ((RAG_HEADER, outcome),)
        if docs:
            headers += ((CITATIONS_HEADER, citations_header(docs)),)
        ctx.reply_headers += headers

    async def _retrieve(self, ctx: RequestContext, r: _Retriever, query: str) -> list[Doc]:
        index = r.index
        if index is None:
            raise RuntimeError(f"the index {r.cfg.index} is not loaded")
        if not len(index):
            return []
        vector = await self._embed(ctx, r.cfg.embedding_model, query)
        return index.search(vector, r.cfg.top_k, r.cfg.min_score)

    async def _embed(self, ctx: RequestContext, model: str, text: str) -> list[float]:
        """One embeddings request through the dispatcher, as if a client had sent it."""
        route = self.routes.get(model)
        if route is None or route.embedding is None:
            raise RuntimeError(f"`{model}` is not an embedding model of this gateway")
        body = _encode({"model": model, "input": text})
        sub = RequestContext(f"{ctx.request_id}-rag", Endpoint.EMBEDDINGS, body, time.perf_counter_ns(), {})
        sub.view = EmbeddingsRequestView(model=model, input=text)
        sub.route = route
        sub.trace = ctx.trace
        sub.priority = ctx.priority
        upstream_body(sub, route)
        call, _ = await self._dispatch.open(sub)
        try:
            reply = await call.body(self._loop.time() + 60)
        except BaseException:
            call.abort()
            self._dispatch.finish(sub, False)
            raise
        call.release()
        self._dispatch.finish(sub, True)
        return _reply.decode(reply).data[0].embedding

    # ---- the response side: `citations` in unary bodies (opt-in per retriever) ----------------
    def on_stream(self, ctx: RequestContext) -> DeltaHook | None:
        return None

    def on_body(self, ctx: RequestContext, body: bytes) -> bytes:
        rag = ctx.rag
        if rag is None or not rag.in_body or not rag.docs or ctx.endpoint is not Endpoint.CHAT:
            return body
        top = _raw_top.decode(body)
        top["citations"] = msgspec.Raw(_encode([d.citation() for d in rag.docs]))
        return _encode(top)


def citations_header(docs: list[Doc]) -> str:
    """JSON of the documents' ids, titles and scores, whole entries only, at most
    MAX_CITATIONS_CHARS (ASCII: a header value)."""
    out: list[dict[str, Any]] = []
    for d in docs:
        out.append(d.citation())
        if len(json.dumps(out, separators=(",", ":"))) > MAX_CITATIONS_CHARS:
            out.pop()
            break
    return json.dumps(out, separators=(",", ":"))


def _query(body: bytes) -> str:
    messages = _messages.decode(body).get("messages")
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))[-MAX_QUERY_CHARS:]
    return ""
