"""The HTTP side: `/v1/files` (upload, list, retrieve, content, delete) and `/v1/batches`
(create, retrieve, list, cancel), OpenAI's wire shapes (`wire`).

Visibility is the jobs' rule: a key sees the files and batches it made and its team's; the
admin key sees all; anyone else gets 404, as for an id that does not exist. A batch runs with
its creator's principal (never its key), stored as a job's is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec

from ..errors import Fault, GatewayError, quote
from ..jobs.runner import store_principal
from ..objstore import ObjectNotFound, ObjectStoreError
from ..pipeline import respond
from ..principal import Principal
from ..redis_resp import RedisError
from . import jsonl, multipart, wire
from .runner import finalize
from .store import FINAL, visible

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from .runner import BatchesPart

log = logging.getLogger("gateway.batches")

_encode = msgspec.json.Encoder().encode
_MAX_LIST = 10_000
_WINDOW = "24h"
#: the multipart framing around the file (headers, boundaries, the purpose field)
_FORM_SLACK = 64 * 1024
_NOT_RUN = (
    "The batch stopped before it finished: its deliveries ran out (workers lost, or its files could"
    " not be read from the object store; see the gateway's log)."
)
#: a batch whose worker's lease ended this long ago is ended by its next reader
_LAZY_GRACE_MS = 10_000
_UNAVAILABLE = GatewayError(
    Fault.UPSTREAM_UNAVAILABLE,
    "The batch store is unavailable; retry shortly.",
    code="batch_store_unavailable",
)

#: a body read under a limit (the app's, with its deadline)
ReadBody = Callable[[int], Awaitable[bytes]]


class CreateBatch(msgspec.Struct, forbid_unknown_fields=False):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


_create = msgspec.json.Decoder(CreateBatch).decode


def _bad(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param, code=code)


def _not_found(what: str, obj_id: str) -> GatewayError:
    return GatewayError(Fault.ROUTE_NOT_FOUND, f"No {what} {quote(obj_id)!r}.", code=f"{what}_not_found")


def _method(allowed: str) -> GatewayError:
    return GatewayError(
        Fault.METHOD_NOT_ALLOWED, f"Method not allowed; use {allowed}.", headers=(("allow", allowed),)
    )


class BatchesApi:
    """Per worker generation: the routes over its `BatchesPart`."""

    def __init__(self, part: BatchesPart, pipeline: Pipeline, is_admin: Callable[[Any], bool]) -> None:
        self.part = part
        self.cfg = part.cfg.batches
        self.pipeline = pipeline
        self.is_admin = is_admin

    @property
    def store(self) -> Any:
        assert self.part.store is not None
        return self.part.store

    async def serve(self, scope: Any, protocol: Any, request_id: str, read_body: ReadBody) -> None:
        parts = scope.path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        method = scope.method
        query = dict(parse_qsl(scope.query_string or "", keep_blank_values=True))
        caller, principal = await self._caller(scope.headers)
        try:
            if parts[1] == "files":
                body = await self._files(parts[2:], method, query, caller, principal, scope, read_body)
            else:
                body = await self._batches(parts[2:], method, query, caller, principal, read_body)
        except (RedisError, ObjectStoreError, OSError) as exc:  # OSError: a local store's disk
            log.warning("batches: %s %s: %s", method, scope.path, exc)
            raise _UNAVAILABLE from None
        if isinstance(body, tuple):
            protocol.response_bytes(
                200, respond.head(request_id, ("content-type", "application/octet-stream")), body[0]
            )
            return
        protocol.response_bytes(200, respond.head(request_id), body)

    async def _caller(self, headers: Any) -> tuple[tuple[str, str] | None, Principal | None]:
        """((key id, team) or None for the admin, the caller's principal)."""
        if self.is_admin(headers):
            return None, None
        auth = next((s for s in self.pipeline.request_stages if s.name == "auth"), None)
        if auth is None:
            return ("", ""), None
        p: Principal = await auth.authenticate(headers)  # type: ignore[attr-defined]
        return (p.key_id, p.team), p

    # ---- /v1/files ------------------------------------------------------------------------------
    async def _files(
        self,
        rest: list[str],
        method: str,
        query: dict[str, str],
        caller: tuple[str, str] | None,
        principal: Principal | None,
        scope: Any,
        read_body: ReadBody,
    ) -> bytes | tuple[bytes]:
        store = self.store
        if not rest:
            if method == "POST":
                return await self._upload(scope.headers, caller, principal, read_body)
            if method != "GET":
                raise _method("GET, POST")
            limit, after, desc = _paging(query)
            purpose = query.get("purpose")
            data: list[dict[str, Any]] = []
            more = True
            while more and len(data) <= limit:  # one past the page: is there more?
                ids, more = await store.page("files", caller, after, limit + 1, desc)
                for file_id, h in zip(ids, await asyncio.gather(*map(store.get_file, ids)), strict=True):
                    after = file_id
                    if h is not None and (purpose is None or h.get("purpose", b"").decode() == purpose):
                        data.append(wire.file_object(h))
                        if len(data) > limit:
                            break
            has_more = len(data) > limit
            data = data[:limit]
            return wire.page(data, has_more)
        if len(rest) > 2 or (len(rest) == 2 and rest[1] != "content"):
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "Unknown route.")
        file_id = rest[0]
        h = await store.get_file(file_id)
        if h is None or not visible(h, caller):
            raise _not_found("file", file_id)
        if len(rest) == 2:
            if method not in ("GET", "HEAD"):
                raise _method("GET")
            try:
                return (await store.file_bytes(file_id),)
            except ObjectNotFound:
                raise _not_found("file", file_id) from None
        if method == "DELETE":
            await store.delete_file(file_id, h)
            return _encode({"id": file_id, "object": "file", "deleted": True})
        if method not in ("GET", "HEAD"):
            raise _method("GET, DELETE")
        return _encode(wire.file_object(h))

    async def _upload(
        self, headers: Any, caller: tuple[str, str] | None, principal: Principal | None, read_body: ReadBody
    ) -> bytes:
        ctype = headers.get("content-type") or ""
        try:
            multipart.boundary_of(ctype)
        except ValueError as exc:
            raise GatewayError(Fault.UNSUPPORTED_MEDIA_TYPE, f"Unsupported upload: {exc}.") from None
        body = await read_body(self.cfg.max_file_bytes + _FORM_SLACK)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > len(body):
            # the uvloop engine stops keeping a body past `server.max_body_bytes`
            limit = self.part.cfg.server.max_body_bytes
            raise GatewayError(
                Fault.BODY_TOO_LARGE, f"The upload is larger than server.max_body_bytes ({limit})."
            )
        try:
            form = multipart.parse(body, ctype)
        except ValueError as exc:
            raise _bad(f"Invalid multipart body: {exc}.") from None
        purpose = form.get("purpose")
        if purpose is None:
            raise _bad("Missing the `purpose` field.", param="purpose")
        if purpose.data.strip() != b"batch":
            raise _bad("Only `purpose: batch` files are supported here.", param="purpose")
        f = form.get("file")
        if f is None or f.filename is None:
            raise _bad("Missing the `file` field (a file part).", param="file")
        if len(f.data) > self.cfg.max_file_bytes:
            raise GatewayError(
                Fault.BODY_TOO_LARGE,
                f"The file is larger than {self.cfg.max_file_bytes} bytes.",
                param="file",
            )
        try:
            lines = jsonl.parse(f.data, self.cfg.max_lines)
        except jsonl.LineError as exc:
            raise _bad(f"Invalid batch input file, {exc}", param="file", code="invalid_jsonl") from None
        owner, team = caller if caller is not None else ("", "")
        h = await self.store.put_file(
            f.data,
            filename=f.filename or "input.jsonl",
            purpose="batch",
            owner=owner,
            team=team,
            lines=len(lines),
        )
        return _encode(wire.file_object(h))

    # ---- /v1/batches ----------------------------------------------------------------------------
    async def _batches(
        self,
        rest: list[str],
        method: str,
        query: dict[str, str],
        caller: tuple[str, str] | None,
        principal: Principal | None,
        read_body: ReadBody,
    ) -> bytes:
        store = self.store
        if not rest:
            if method == "POST":
                return await self._create(caller, principal, read_body)
            if method != "GET":
                raise _method("GET, POST")
            limit, after, _ = _paging(query)
            ids, has_more = await store.page("batches", caller, after, limit)
            views = await asyncio.gather(*map(store.view, ids))
            return wire.page([wire.batch_object(*got) for got in views if got is not None], has_more)
        if len(rest) > 2 or (len(rest) == 2 and rest[1] != "cancel"):
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "Unknown route.")
        batch_id = rest[0]
        got = await store.view(batch_id)
        if got is None or not visible(got[0], caller):
            raise _not_found("batch", batch_id)
        if len(rest) == 2:
            if method != "POST":
                raise _method("POST")
            await self._cancel(batch_id, got[0])
        elif method not in ("GET", "HEAD"):
            raise _method("GET")
        else:
            await self._settle_lazily(batch_id, got[0])
        got = await store.view(batch_id) or got
        return _encode(wire.batch_object(*got))

    async def _create(
        self, caller: tuple[str, str] | None, principal: Principal | None, read_body: ReadBody
    ) -> bytes:
        try:
            req = _create(await read_body(64 * 1024))
        except msgspec.ValidationError as exc:
            raise _bad(f"Invalid batch request: {exc}") from None
        except msgspec.DecodeError:
            raise _bad("The request body is not valid JSON.") from None
        if req.endpoint not in jsonl.URLS:
            raise _bad(f"`endpoint` must be one of {', '.join(sorted(jsonl.URLS))}.", param="endpoint")
        if req.completion_window != _WINDOW:
            raise _bad(f"`completion_window` must be {_WINDOW!r}.", param="completion_window")
        meta = req.metadata or {}
        if len(meta) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in meta.items()):
            raise _bad(
                "`metadata`: at most 16 pairs, keys up to 64 and values up to 512 characters.", "metadata"
            )
        f = await self.store.get_file(req.input_file_id)
        if f is None or not visible(f, caller):
            raise _bad(f"No file {quote(req.input_file_id)!r}.", param="input_file_id", code="file_not_found")
        if f.get("purpose") != b"batch":
            raise _bad("The input file's purpose must be `batch`.", param="input_file_id")
        if principal is None and caller is None and self._auth_on():
            raise GatewayError(
                Fault.FORBIDDEN, "Create batches with an API key: a batch runs as its creator."
            )
        owner, team = caller if caller is not None else ("", "")
        now = int(time.time())
        raw_principal = store_principal(principal)
        batch_id = await self.store.create_batch(
            {
                "endpoint": req.endpoint,
                "input_file_id": req.input_file_id,
                "completion_window": req.completion_window,
                "created_at": now,
                "expires_at": now + self.cfg.completion_window_s,
                "owner": owner,
                "team": team,
                "total": int(f.get("lines") or 0),
                "metadata": _encode(req.metadata) if req.metadata is not None else b"",
            }
        )
        queue = self.part.queue
        assert queue is not None
        _, job_id = await queue.submit(
            endpoint="batch",
            body=batch_id.encode(),
            owner=owner,
            team=team,
            principal=raw_principal,
            headers=b"",
            request_id=batch_id,
        )
        await self.store.update(batch_id, job_id=job_id)
        got = await self.store.view(batch_id)
        assert got is not None
        return _encode(wire.batch_object(*got))

    def _auth_on(self) -> bool:
        return any(s.name == "auth" for s in self.pipeline.request_stages)

    async def _cancel(self, batch_id: str, h: dict[str, bytes]) -> None:
        """validating / in_progress -> cancelling; the driver (told through its job's lease)
        writes what finished and ends it cancelled. A batch no worker holds is ended here."""
        moved, _ = await self.store.move(batch_id, "validating in_progress", "cancelling")
        if not moved:
            return
        queue = self.part.queue
        assert queue is not None
        job_id = h.get("job_id", b"").decode()
        _, before = await queue.cancel(job_id) if job_id else (False, "")
        if before != "processing":  # not claimed (or its job already ended): nobody else will
            await self._finalize(batch_id, h, expired=False)

    async def _settle_lazily(self, batch_id: str, h: dict[str, bytes]) -> None:
        """A batch whose job ended without it (past the window unclaimed, workers lost): the
        first reader ends it too (expired past its window, else failed)."""
        status = h.get("status", b"").decode()
        if status in FINAL or status == "":
            return
        queue = self.part.queue
        assert queue is not None
        job = await queue.get(h.get("job_id", b"").decode() or "none")
        expired = time.time() >= int(h.get("expires_at") or 0)
        if job is not None:
            state = job.get("state", b"").decode()
            if state in ("pending", "processing") and not expired:
                return  # the queue delivers it (again)
            if int(job.get("lease_until") or 0) + _LAZY_GRACE_MS > time.time() * 1000:
                return  # a worker holds it, or held it a moment ago: it ends the batch
        if status == "validating" or (status == "in_progress" and not expired):
            from .runner import fail

            await fail(self.store, batch_id, "batch_not_run", _NOT_RUN, None)
            return
        await self._finalize(batch_id, h, expired=expired)

    async def _finalize(self, batch_id: str, h: dict[str, bytes], expired: bool) -> None:
        try:
            data = await self.store.file_bytes(h.get("input_file_id", b"").decode())
            lines = [ln for _, ln in jsonl.parse(data, self.cfg.max_lines)]
        except (ObjectNotFound, jsonl.LineError):
            lines = []
        await finalize(self.store, batch_id, lines, expired=expired)


def _paging(query: dict[str, str]) -> tuple[int, str | None, bool]:
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIST:
        raise _bad(f"`limit` must be an integer from 1 to {_MAX_LIST}.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _bad("`order` must be asc or desc.", param="order")
    return int(raw), query.get("after") or None, order == "desc"
