"""The Responses API dialect: `POST /v1/responses`, and `GET` / `DELETE /v1/responses/{id}`
(+ `/input_items`) on the conversation store.

At decode the Responses body becomes a chat body (`responses_wire`); after auth the `history`
stage (in the pipeline's dialect chain only: OpenAI requests never meet it) loads the chain of
`previous_response_id` from the store, refuses one the caller may not see (404, as one that does
not exist), and puts its input and output items in front of this turn's, so that limits, guards,
routing and the upstream see the whole conversation. On the way out a stream goes through a
translating writer (`responses_stream`), a unary chat reply becomes a `response`; with `store`
(the default) the response is committed before the reply's last byte (stream: before
`response.completed`), so a `GET` right after, on any worker or instance, finds it. Only the
creator's key, its team, and the admin key see or delete a stored response.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec

from ..context import Endpoint, RequestContext
from ..conversations import ConversationStore, Stored, StoreError
from ..errors import Fault, GatewayError
from ..responses_stream import native
from ..responses_wire import ResponsesRequest, chat_body, decode_request, not_found, response_from_chat
from ..schemas import ChatRequestView
from . import respond
from .stage import Part

if TYPE_CHECKING:
    from . import Pipeline

log = logging.getLogger("gateway.responses")
_encode = msgspec.json.Encoder().encode
_decode_view = msgspec.json.Decoder(ChatRequestView).decode
_UNAVAILABLE = GatewayError(
    Fault.UPSTREAM_UNAVAILABLE,
    "The conversation store is unavailable; retry shortly.",
    code="store_unavailable",
)


class _State:
    """The request's Responses side, from decode to the reply."""

    __slots__ = ("chat", "req", "store")

    def __init__(self, req: ResponsesRequest, chat: dict[str, Any]) -> None:
        self.req = req
        self.chat = chat
        self.store: ConversationStore | None = None


def _caller(ctx: RequestContext) -> tuple[str, str]:
    p = ctx.principal
    return ("", "") if p is None else (p.key_id, p.team)


def _stored(ctx: RequestContext, req: ResponsesRequest, response: str) -> Stored:
    owner, team = _caller(ctx)
    items = [
        item if "id" in item else {"id": f"msg_{req.id[5:]}_in{i}", **item}
        for i, item in enumerate(req.items)
    ]
    return Stored(
        req.id,
        req.created_at,
        owner,
        team,
        req.previous_response_id,
        _encode(items).decode(),
        response,
    )


async def _store(ctx: RequestContext, state: _State, status: str | None, response: bytes) -> None:
    """Commit the response object (JSON) before the reply ends; a failed write is logged (the
    client still gets its answer, and a later `GET` answers 404)."""
    if not state.req.store or state.store is None or status == "failed":
        return
    try:
        await state.store.put(_stored(ctx, state.req, response.decode()))
    except StoreError as exc:
        log.error("request %s: response %s not stored: %s", ctx.request_id, state.req.id, exc)


class ResponsesStreamWriter(respond.StreamWriter):
    """Translates every send of the relay to Responses events, in Rust (`ResponsesStream`; the
    Python reference is `responses_stream.ChatToResponses`); stores the response before the send
    that carries `response.completed`."""

    __slots__ = ("_ctx", "_ended", "_inner", "_state", "_tr")

    def __init__(self, inner: respond.StreamWriter, ctx: RequestContext, state: _State) -> None:
        super().__init__(None)
        self._inner = inner
        self._ctx = ctx
        self._state = state
        self._tr = native(state.req)
        self._ended = False

    async def send(self, data: bytes) -> None:
        if self._ended:  # nothing after response.completed / failed
            return
        tr = self._tr
        out = tr.feed(data)  # (the first send starts with response.created: sequence number 0)
        if tr.done:  # `[DONE]` or an error: the final response object is set
            self._ended = True
            response = tr.response()
            if response is not None:
                await _store(self._ctx, self._state, tr.status, response)
        if out:
            await self._inner.send(out)

    def close(self) -> None:
        self._inner.close()


class ResponsesDialect:
    local = False

    def decode(self, ctx: RequestContext) -> None:
        req, chat = decode_request(ctx.body)
        ctx.body = chat_body(req, chat, [])  # the history (if any) joins after auth
        ctx.endpoint = Endpoint.CHAT
        ctx.dialect_state = _State(req, chat)

    def answer(self, ctx: RequestContext, protocol: Any, settle: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def start_stream(self, protocol: Any, ctx: RequestContext) -> respond.StreamWriter:
        state = ctx.dialect_state
        assert isinstance(state, _State)
        return ResponsesStreamWriter(respond.start_stream(protocol, ctx), ctx, state)

    async def unary(self, ctx: RequestContext, body: bytes) -> bytes:
        state = ctx.dialect_state
        assert isinstance(state, _State)
        response = response_from_chat(state.req, body)
        out = _encode(response)
        await _store(ctx, state, response["status"], out)
        return out

    def error(self, ctx: RequestContext, err: GatewayError) -> GatewayError:
        return err  # OpenAI's shape already


RESPONSES = ResponsesDialect()


class HistoryStage(Part):
    """Request stage `history` (the dialect chain, after auth): the stored conversation of
    `previous_response_id`, checked against the caller, assembled into the chat body."""

    name = "history"
    __slots__ = ("store",)

    def __init__(self, store: ConversationStore | None) -> None:
        self.store = store

    async def on_request(self, ctx: RequestContext) -> None:
        state = ctx.dialect_state
        if type(state) is not _State:
            return  # another dialect (Anthropic Messages)
        if self.store is None:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "The Responses API is off (`responses.enabled`).")
        state.store = self.store
        req = state.req
        prev = req.previous_response_id
        if prev is None:
            return
        try:
            chain = await self.store.chain(prev)
        except StoreError as exc:
            log.warning("request %s: history of %s unreadable: %s", ctx.request_id, prev, exc)
            raise _UNAVAILABLE from None
        caller = _caller(ctx)
        if not chain or chain[-1].id != prev or not all(r.visible_to(caller) for r in chain):
            raise not_found(prev, "previous_response_id")
        if chain[0].previous_id is not None:  # a link was deleted (or purged)
            raise not_found(chain[0].previous_id, "previous_response_id")
        history: list[dict[str, Any]] = []
        for row in chain:
            history += msgspec.json.decode(row.input)
            history += msgspec.json.decode(row.response)["output"]
        ctx.body = chat_body(req, state.chat, history)
        ctx.view = _decode_view(ctx.body)


# ---- GET / DELETE /v1/responses/{id}[/input_items] ----------------------------------------------
PREFIX = "/v1/responses/"


async def serve_stored(
    pipeline: Pipeline, scope: Any, protocol: Any, request_id: str, is_admin: bool
) -> None:
    rest = scope.path[len(PREFIX) :]
    response_id, _, tail = rest.partition("/")
    method = scope.method
    if tail not in ("", "input_items") or not response_id:
        raise GatewayError(Fault.ROUTE_NOT_FOUND, "Unknown route.")
    allowed = "GET" if tail else "GET, DELETE"
    if method not in ("GET", "HEAD") and not (method == "DELETE" and not tail):
        raise GatewayError(
            Fault.METHOD_NOT_ALLOWED, f"Method not allowed; use {allowed}.", headers=(("allow", allowed),)
        )
    store = pipeline.conversations
    if store is None:
        raise GatewayError(Fault.ROUTE_NOT_FOUND, "The Responses API is off (`responses.enabled`).")
    caller: tuple[str, str] | None = None
    if not is_admin:
        auth = next((s for s in pipeline.request_stages if s.name == "auth"), None)
        caller = ("", "") if auth is None else _key(await auth.authenticate(scope.headers))  # type: ignore[attr-defined]
    if not response_id.startswith("resp_") or len(response_id) > 64:
        raise not_found(response_id)
    try:
        row = await store.get(response_id)
        if row is None or not row.visible_to(caller):
            raise not_found(response_id)
        if method == "DELETE":
            await store.delete(response_id)
            body = _encode({"id": response_id, "object": "response", "deleted": True})
        elif tail:
            body = _input_items(row, scope.query_string)
        else:
            body = row.response.encode()
    except StoreError as exc:
        log.warning("responses: %s: %s", response_id, exc)
        raise _UNAVAILABLE from None
    protocol.response_bytes(200, respond.head(request_id), body)


def _key(p: Any) -> tuple[str, str]:
    return (p.key_id, p.team)


def _input_items(row: Stored, query: str) -> bytes:
    """The turn's input items (`order`: desc by default, as OpenAI; `limit` 1-100, default 20)."""
    q = dict(parse_qsl(query or ""))
    items: list[dict[str, Any]] = msgspec.json.decode(row.input)
    if q.get("order", "desc") == "desc":
        items.reverse()
    try:
        limit = max(1, min(100, int(q.get("limit", "20"))))
    except ValueError:
        raise GatewayError(
            Fault.INVALID_REQUEST, "Invalid 'limit': an integer 1-100.", param="limit"
        ) from None
    after = q.get("after")
    if after:
        ids = [i.get("id") for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return _encode(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
