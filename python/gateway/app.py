"""The RSGI application: one instance per granian worker process.

Per-worker state (upstream pools, routes, the pipeline) is built in `__rsgi_init__`, once the
worker's event loop exists; workers share nothing in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

import msgspec

from . import config as config_mod
from . import ledger, upstreams
from . import reload as reload_mod
from .audit import AdminAudit
from .batches.routes import BatchesApi
from .config import Config
from .config_planner import planned_names
from .context import Endpoint, RequestContext
from .edge import ClientResolver
from .errors import Fault, GatewayError, quote
from .jobs.routes import JobsApi, wants_async
from .pipeline import Pipeline, respond
from .pipeline import ws as ws_responses
from .pipeline.dialect import Dialect
from .pipeline.messages import DIALECTS as MESSAGES_DIALECTS
from .pipeline.responses import PREFIX as RESPONSES_PREFIX
from .pipeline.responses import RESPONSES, serve_stored
from .routing import build_routes
from .routing.health import HealthChecker
from .schemas import ModelCard, ModelList
from .worker import Worker

if TYPE_CHECKING:
    from .metrics.listener import Listener
    from .upstreams.base import Adapter

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON_TYPES = ("application/json", "application/json; charset=utf-8")
_encode = msgspec.json.Encoder().encode
_HEALTH_BODY = b'{"status":"ok"}'
_READY_CACHE_S = 1.0
_READY_TIMEOUT_S = 2.0
_BODY_TIMEOUT = "fastpath: request body deadline"
#: after a replaced generation drained: time left for a readiness probe or usage read still on it
_RETIRE_GRACE_S = 1.0
#: `POST /admin/reload` waits this long for its own worker's swap (then 202)
_ADMIN_RELOAD_WAIT_S = 10.0


class Gateway:
    """RSGI app object (granian calls `__rsgi__` per request)."""

    def __init__(self, cfg: Config | None = None) -> None:
        self._id_prefix = os.urandom(6).hex() + "-"
        self._id_counter = 0
        self._loop: asyncio.AbstractEventLoop  # set by __rsgi_init__
        self.worker: Worker | None = None
        self.adapters: dict[str, Adapter] = {}
        self.pipeline: Pipeline | None = None
        self._models_body = b""
        self._ready: tuple[float, int, bytes] | None = None
        self._inference = {e.value: e for e in Endpoint}
        #: hot reload (gateway.reload): the serving generation, its in-flight request count (a
        #: list the requests of that generation hold on to), generations still draining
        self.generation = 0
        self._active = [0]
        self._retiring: list[asyncio.Task[None]] = []
        self._reload_lock: asyncio.Lock | None = None
        self._reloads = 0  # attempts finished in this worker
        self._reload_error: str | None = None
        self._configure(cfg if cfg is not None else config_mod.load_for_worker())
        m = self.cfg.metrics
        #: `/metrics` on the main port (not when a separate `metrics.listen` serves it); a setting
        #: that needs a restart (gateway.reload.RESTART_ONLY)
        self._metrics_here = m.enabled and not m.listen
        self._metrics_server: Listener | None = None

    def _configure(self, cfg: Config) -> None:
        """Everything the app reads from the config outside the pipeline: at start and at each
        reload (an attribute derived from the config belongs here, so it changes live)."""
        self.cfg = cfg
        s = cfg.server
        self.max_body = s.max_body_bytes
        self.max_header_bytes = s.max_header_bytes
        self.max_headers = s.max_headers
        self.body_timeout_s = s.body_read_timeout_ms / 1000
        respond.configure(s)
        #: the client behind trusted proxies (None: none configured, the socket peer is the client)
        self._resolve_client = ClientResolver(s) if s.trusted_proxies else None
        admin_hash = cfg.admin.api_key_hash
        self._admin_digest = admin_hash.encode() if admin_hash is not None else None
        self._audit = AdminAudit(cfg)  # admin reads: opens the store on first use

    # ---- lifecycle ----------------------------------------------------------------------------
    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # The worker's loop, kept: asyncio.get_running_loop() / current_task() without a loop
        # make a getpid() syscall each (CPython 3.11's fork check), ~6 % of a worker's CPU.
        self._loop = loop
        if reload_mod.signal_master_is_parent():  # SIGHUP: a reload (held until now by create_app)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, ()):  # held by create_app
            loop.call_soon(release_stop_signals)  # runs once the loop runs: see hold_stop_signals
        self.worker, self.adapters, self.pipeline = build_parts(self.cfg, self._loop)
        self._wire_batches(self.pipeline)
        if self.pipeline.metrics is not None and self.cfg.metrics.listen:
            from .metrics.listener import start_listener

            self._metrics_server = start_listener(self.cfg, self.pipeline.metrics, loop)
        self._models_body = _models_body(self.cfg)

    # ---- hot reload (gateway.reload) ------------------------------------------------------------
    def _on_sighup(self) -> None:
        self._loop.create_task(self.reload())

    async def reload(self) -> bool:
        """Read the config file again and, when it is valid, swap to a new generation between two
        requests; the old one closes once its requests finished. False (old config kept, one
        error line) when the file is refused or the new parts cannot be built."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            try:
                return await self._reload()
            finally:
                self._reloads += 1

    async def _reload(self) -> bool:
        path = reload_mod.config_path()
        where = path or "embedded default config"
        try:
            new = await self._loop.run_in_executor(None, reload_mod.load_checked, path)
            new = reload_mod.keep_restart_only(self.cfg, new)
            # on the loop: builds what __rsgi_init__ does
            worker, adapters, pipeline = build_parts(new, self._loop)
            self._wire_batches(pipeline)
        except Exception as exc:  # a ConfigError, or a part that cannot start (a store, an extension)
            self._reload_error = f"{where}: {exc}"
            log.error(
                "config reload refused: %s: %s (still serving generation %d)", where, exc, self.generation
            )
            return False
        old = (self.pipeline, self.adapters, self._audit, self._active)
        # the swap: one synchronous block, so a request sees all old or all new parts
        self._configure(new)
        self.worker, self.adapters, self.pipeline = worker, adapters, pipeline
        self._models_body = _models_body(new)
        self._ready = None
        self._active = [0]
        self.generation += 1
        self._reload_error = None
        task = self._loop.create_task(self._retire(*old))
        self._retiring.append(task)
        task.add_done_callback(self._retiring.remove)
        log.info("config reloaded from %s: generation %d", where, self.generation)
        return True

    async def _retire(
        self, pipeline: Pipeline | None, adapters: dict[str, Adapter], audit: AdminAudit, active: list[int]
    ) -> None:
        """Close a replaced generation once its in-flight requests finished (at most the longest a
        stream may last), then one more readiness probe's time for non-inference routes."""
        deadline = self._loop.time() + self.cfg.server.max_stream_duration_ms / 1000 + 1.0
        # polled: an event set by the last request out would cost every request a check
        while active[0] > 0 and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(_RETIRE_GRACE_S)
        await close_parts(pipeline, adapters)
        await self._loop.run_in_executor(None, audit.close)
        log.debug("a replaced config's parts closed (%d requests still on them)", active[0])

    async def _admin_reload(self, scope: Any, headers: Any, client: str) -> tuple[int, bytes]:
        """`POST /admin/reload` (admin key): this worker checks the file (a refused file is a 422
        naming the error), the master then reloads every worker (SIGUSR1); the reply waits for
        this worker's swap. Audited (`config.reload`, actor `admin-api`) either way."""
        try:
            self._check_admin(headers)
        except GatewayError as err:
            log.warning("admin route %s refused for %s: %s", scope.path, client, err.message)
            raise
        path = reload_mod.config_path()
        try:
            new = await self._loop.run_in_executor(None, reload_mod.load_checked, path)
        except config_mod.ConfigError as exc:
            log.error(
                "config reload refused: %s: %s (the running config is kept)", path or "embedded default", exc
            )
            detail = reload_mod.refused_detail(str(exc))
            self._audit.record(
                self._loop, reload_mod.ACTION, path or "<embedded default>", str(client), detail
            )
            return 422, _encode({"status": "refused", "error": str(exc)})
        changes = reload_mod.restart_changes(self.cfg, new)
        detail = reload_mod.ok_detail(changes)
        self._audit.record(self._loop, reload_mod.ACTION, path or "<embedded default>", str(client), detail)
        seen, generation = self._reloads, self.generation
        if not reload_mod.signal_master():  # no master that takes requests: this worker alone
            await self.reload()
        deadline = self._loop.time() + _ADMIN_RELOAD_WAIT_S
        while self._reloads == seen and self._loop.time() < deadline:  # noqa: ASYNC110  (rare, admin)
            await asyncio.sleep(0.02)
        if self._reloads == seen:
            body = {"status": "requested", "needs_restart": changes}
            return 202, _encode(body)
        if self.generation == generation:
            return 500, _encode({"status": "failed", "error": self._reload_error or "unknown"})
        return 200, _encode({"status": "reloaded", "generation": self.generation, "needs_restart": changes})

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        # granian calls this once the worker stopped serving (SIGTERM: after in-flight requests
        # finished; the loop is stopped, not closed): the pipeline's parts close (the ledger
        # drains, Redis settlements finish), then the upstream connections.
        if loop.is_closed() or loop.is_running():
            return
        loop.run_until_complete(self.close())

    async def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
        for task in list(self._retiring):  # generations still draining: their requests are done
            task.cancel()
        await close_parts(self.pipeline, self.adapters)

    # ---- dispatch -----------------------------------------------------------------------------
    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            if scope.proto == "ws":  # the Responses API's WebSocket mode (pipeline/ws.py)
                resolve = self._resolve_client
                client = scope.client if resolve is None else resolve(scope.client, scope.headers)
                rid = self._request_id(scope.headers.get("x-request-id"))
                await ws_responses.serve(self, scope, protocol, rid, client)
            return
        start = time.perf_counter_ns()
        headers = scope.headers
        request_id = self._request_id(headers.get("x-request-id"))
        path = scope.path
        endpoint = self._inference.get(path)
        resolve = self._resolve_client
        client = scope.client if resolve is None else resolve(scope.client, headers)
        try:
            self._check_headers(headers)
            if endpoint is not None:
                if scope.method != "POST":
                    raise _method_not_allowed("POST")
                await self._infer(endpoint, request_id, headers, protocol, client, DIALECTS.get(path))
            elif path in ("/v1/models", "/models") or path.startswith(_MODEL_PATHS):
                self._only_get(scope)
                protocol.response_bytes(200, respond.head(request_id), await self._models(path, headers))
            elif path == "/healthz":
                self._only_get(scope)
                protocol.response_bytes(200, respond.head(request_id), _HEALTH_BODY)
            elif path == "/readyz":
                self._only_get(scope)
                status, body = await self._readiness()
                protocol.response_bytes(status, respond.head(request_id), body)
            elif path == "/metrics" and self._metrics_here:
                self._only_get(scope)
                ctype, body = self._metrics(headers)
                protocol.response_bytes(200, respond.head(request_id, ("content-type", ctype)), body)
            elif path == "/admin/reload":
                if scope.method != "POST":
                    raise _method_not_allowed("POST")
                status, body = await self._admin_reload(scope, headers, client)
                protocol.response_bytes(status, respond.head(request_id), body)
            elif path.startswith("/v1/jobs/"):
                await self._jobs(scope, protocol, request_id)
            elif path.startswith(_BATCH_PATHS) or path in ("/v1/files", "/v1/batches"):
                await self._batches(scope, protocol, request_id)
            elif path.startswith(RESPONSES_PREFIX) and self.pipeline is not None:
                # stored responses: GET / DELETE /v1/responses/{id}, GET .../input_items
                await serve_stored(self.pipeline, scope, protocol, request_id, self._is_admin(headers))
            elif path == "/v1/usage":
                self._only_get(scope)
                body = await self._usage(scope, headers, client)
                protocol.response_bytes(200, respond.head(request_id), body)
            else:
                raise GatewayError(Fault.ROUTE_NOT_FOUND, f"Unknown route: {scope.method} {quote(path)}")
        except GatewayError as err:
            if endpoint is not None and self.pipeline is not None:
                # an inference request refused before the pipeline (headers, method, content
                # type, body): the pipeline replies and tells its observers
                ctx = RequestContext(request_id, endpoint, b"", start, headers, client, DIALECTS.get(path))
                self.pipeline.refuse(ctx, protocol, err)
            else:
                respond.send_error(protocol, request_id, err)

    async def _infer(
        self,
        endpoint: Endpoint,
        request_id: str,
        headers: Any,
        protocol: Any,
        client: str,
        dialect: Dialect | None = None,
    ) -> None:
        start = time.perf_counter_ns()
        ctype = headers.get("content-type")
        if ctype is not None and ctype.lower() not in _JSON_TYPES and not _is_json_type(ctype):
            raise GatewayError(
                Fault.UNSUPPORTED_MEDIA_TYPE,
                f"Unsupported Content-Type {quote(ctype)!r}; send application/json.",
            )
        loop = self._loop
        task = asyncio.current_task(loop)
        assert task is not None
        body = await self._read_body(headers, protocol, loop, task)
        pipeline = self.pipeline  # this request's generation, to its end (a reload swaps the attribute)
        assert pipeline is not None
        ctx = RequestContext(request_id, endpoint, body, start, headers, client, dialect)
        if pipeline.jobs is not None and wants_async(endpoint, headers):  # Prefer: respond-async
            await self._jobs_api(pipeline).submit(ctx, protocol)
            return
        metrics = pipeline.metrics
        active = self._active  # the generation's in-flight count: it closes when this drains
        active[0] += 1
        try:
            if metrics is None:
                await pipeline.serve(ctx, protocol, task)
                return
            v, slot = metrics.v, metrics.inflight  # the in-flight gauge: one slot, up and down
            v[slot] += 1.0
            try:
                await pipeline.serve(ctx, protocol, task)
            finally:
                v[slot] -= 1.0
        finally:
            active[0] -= 1

    # ---- async requests (gateway.jobs) -----------------------------------------------------------
    def _jobs_api(self, pipeline: Pipeline) -> JobsApi:
        assert pipeline.jobs is not None
        return JobsApi(pipeline.jobs, pipeline, self._is_admin)

    async def _jobs(self, scope: Any, protocol: Any, request_id: str) -> None:
        pipeline = self.pipeline
        if pipeline is None or pipeline.jobs is None:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "Async requests are off (`jobs.enabled`).")
        await self._jobs_api(pipeline).serve(scope, protocol, request_id)

    def _wire_batches(self, pipeline: Pipeline) -> None:
        """The batch lane yields to this worker's interactive requests (its in-flight count)."""
        if pipeline.batches is not None:
            pipeline.batches.interactive = lambda: self._active[0]

    async def _batches(self, scope: Any, protocol: Any, request_id: str) -> None:
        """`/v1/files`, `/v1/batches` (gateway.batches): uploads have their own body limit."""
        pipeline = self.pipeline
        if pipeline is None or pipeline.batches is None:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "The Batch API is off (`batches.enabled`).")
        loop = self._loop
        task = asyncio.current_task(loop)
        assert task is not None

        def read(limit: int) -> Awaitable[bytes]:
            return self._read_body(scope.headers, protocol, loop, task, limit)

        api = BatchesApi(pipeline.batches, pipeline, self._is_admin)
        await api.serve(scope, protocol, request_id, read)

    def _is_admin(self, headers: Any) -> bool:
        if self._admin_digest is None or headers.get("authorization") is None:
            return False
        try:
            self._check_admin(headers)
        except GatewayError:
            return False
        return True

    # ---- admin: usage ---------------------------------------------------------------------------
    def _check_admin(self, headers: Any) -> None:
        """`Authorization: Bearer <admin.api_key>`: missing -> 401, wrong -> 401, no admin key
        configured -> 403. Compared as salted hashes, in constant time."""
        digest = self._admin_digest
        if digest is None:
            raise GatewayError(
                Fault.FORBIDDEN, "The admin routes are disabled: this gateway has no `admin.api_key`."
            )
        auth = headers.get("authorization")
        if auth is None:
            raise GatewayError(Fault.UNAUTHORIZED, "Missing admin key: send `Authorization: Bearer <key>`.")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(Fault.UNAUTHORIZED, "Send the admin key as `Authorization: Bearer <key>`.")
        presented = config_mod.hash_key(self.cfg.auth.salt, token).encode()
        if not hmac.compare_digest(presented, digest):
            raise GatewayError(Fault.UNAUTHORIZED, "Invalid admin key.")

    def _metrics(self, headers: Any) -> tuple[str, bytes]:
        """`GET /metrics`: every worker's shard summed (see `gateway.metrics`). Behind the admin
        key unless `metrics.require_admin: false`."""
        metrics = self.pipeline.metrics if self.pipeline is not None else None
        assert metrics is not None
        if self.cfg.metrics.require_admin:
            self._check_admin(headers)
        from .metrics.expose import scrape

        return scrape(metrics.dir, metrics.fams, headers.get("accept"))

    def _check_admin_audited(self, scope: Any, headers: Any, client: str, action: str) -> None:
        """`_check_admin`, then an audit row (`action`; target: the route and its query; source:
        the client's address) written by a thread, off the request path. A refused attempt is
        logged, not stored: anyone may send one, and none may make the gateway write the store."""
        try:
            self._check_admin(headers)
        except GatewayError as err:
            log.warning("admin route %s refused for %s: %s", scope.path, client, err.message)
            raise
        query = scope.query_string
        target = f"{scope.path}?{query}" if query else scope.path
        self._audit.record(self._loop, action, target, str(client), {"method": scope.method})

    async def _usage(self, scope: Any, headers: Any, client: str) -> bytes:
        """`GET /v1/usage?group_by=key|team|model|provider|day&since=&until=&key=&team=&model=` (admin)."""
        account = self.pipeline.ledger if self.pipeline is not None else None
        if account is None:
            raise GatewayError(Fault.ROUTE_NOT_FOUND, "The usage ledger is off (`ledger.enabled`).")
        self._check_admin_audited(scope, headers, client, "admin.usage.read")
        try:
            query = ledger.parse_query(parse_qsl(scope.query_string, keep_blank_values=True))
        except ValueError as exc:
            raise GatewayError(Fault.INVALID_REQUEST, f"Invalid usage query: {exc}") from None
        await account.writer.flush()  # this worker's queued rows first (others: flush_interval_ms)
        try:
            rows = await self._loop.run_in_executor(None, ledger.query_usage, self.cfg.ledger, query)
        except ledger.LedgerError as exc:
            log.error("usage query failed: %s", exc)
            raise GatewayError(Fault.INTERNAL, "The usage ledger cannot be read now.") from None
        return _encode(
            {
                "object": "usage.summary",
                "group_by": query.group_by,
                "since": query.since,
                "until": query.until,
                "data": rows,
            }
        )

    # ---- request hygiene ----------------------------------------------------------------------
    def _request_id(self, incoming: str | None) -> str:
        if incoming is not None and _REQUEST_ID.fullmatch(incoming):
            return incoming
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:x}"

    def _check_headers(self, headers: Any) -> None:
        items = headers.items()
        if len(items) > self.max_headers:
            raise GatewayError(
                Fault.HEADERS_TOO_LARGE, f"Too many request headers (limit {self.max_headers})."
            )
        size = 0
        for k, v in items:
            size += len(k) + len(v) + 4
        if size > self.max_header_bytes:
            raise GatewayError(
                Fault.HEADERS_TOO_LARGE, f"Request headers are larger than {self.max_header_bytes} bytes."
            )

    async def _read_body(
        self,
        headers: Any,
        protocol: Any,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        limit: int | None = None,
    ) -> bytes:
        """Read the body under a size limit (checked before reading where the length is
        declared, and as chunks arrive otherwise) and a deadline (slow-loris bodies).
        `limit`: a route's own (a file upload); default `server.max_body_bytes`."""
        limit = self.max_body if limit is None else limit
        declared = headers.get("content-length")
        # A timer handle that cancels the task is cheaper per request than asyncio.timeout().
        timer = loop.call_later(self.body_timeout_s, task.cancel, _BODY_TIMEOUT)
        try:
            if declared is not None:
                if not declared.isdigit():
                    raise GatewayError(Fault.INVALID_REQUEST, "Invalid Content-Length header.")
                if int(declared) > limit:
                    raise _too_large(limit)
                body: bytes = await protocol()
                if len(body) > limit:
                    raise _too_large(limit)
                return body
            parts: list[bytes] = []
            total = 0
            async for chunk in protocol:
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                parts.append(chunk)
            return b"".join(parts)
        except asyncio.CancelledError as exc:
            if exc.args != (_BODY_TIMEOUT,):
                raise
            task.uncancel()
            raise GatewayError(
                Fault.REQUEST_TIMEOUT, f"The request body was not received within {self.body_timeout_s:g} s."
            ) from None
        finally:
            timer.cancel()

    # ---- models ---------------------------------------------------------------------------------
    async def _models(self, path: str, headers: Any) -> bytes:
        """`GET /v1/models` and `/v1/models/{id}`: OpenAI's model objects (aliases are models).
        With auth on they take a key (the auth stage's own check) and show only what its model
        allow-list names; `auth.public_models: true` makes them public."""
        allowed: frozenset[str] | None = None
        if self.cfg.auth.enabled and not self.cfg.auth.public_models and self.pipeline is not None:
            from .pipeline.auth import AuthStage

            auth = next((s for s in self.pipeline.request_stages if isinstance(s, AuthStage)), None)
            if auth is not None:
                allowed = (await auth.authenticate(headers)).models
        cards = _model_list(self._models_body).data
        if allowed is not None:
            cards = [c for c in cards if c.id in allowed]
        _, sep, model_id = path.partition("/models/")
        if not sep:
            return self._models_body if allowed is None else _encode(ModelList(cards))
        model_id = unquote(model_id)
        card = next((c for c in cards if c.id == model_id), None)
        if card is None:
            raise GatewayError(
                Fault.MODEL_NOT_FOUND,
                f"The model `{quote(model_id)}` does not exist or you do not have access to it.",
                param="model",
            )
        return _encode(card)

    @staticmethod
    def _only_get(scope: Any) -> None:
        if scope.method not in ("GET", "HEAD"):
            raise _method_not_allowed("GET")

    # ---- readiness ----------------------------------------------------------------------------
    async def _readiness(self) -> tuple[int, bytes]:
        """Ready when every upstream answers within 2 s: an HTTP server with any status below
        500; a Triton server with itself and every model routed to it ready. With active health
        checks (`routing.health`), their verdicts instead: every model has a deployment that is
        healthy and not ejected; per deployment its last check and breaker state."""
        loop = self._loop
        cached = self._ready
        if cached is not None and loop.time() - cached[0] < _READY_CACHE_S:
            return cached[1], cached[2]
        parts = self.pipeline.routing_parts if self.pipeline is not None else ()
        health = next((p for p in parts if isinstance(p, HealthChecker)), None)
        if health is not None:
            ok, report = health.report()
            body = _encode({"status": "ready" if ok else "not_ready", **report})
        else:
            results = await asyncio.gather(*(a.probe(_READY_TIMEOUT_S) for a in self.adapters.values()))
            upstreams = dict(zip(self.adapters, results, strict=True))
            ok = all(r["ready"] for r in results)
            body = _encode({"status": "ready" if ok else "not_ready", "upstreams": upstreams})
        status = 200 if ok else 503
        self._ready = (loop.time(), status, body)
        return status, body


def _models_body(cfg: Config) -> bytes:
    created = int(time.time())
    return _encode(
        ModelList(
            [ModelCard(m.name, created, m.owned_by) for m in cfg.models]
            + [ModelCard(alias, created, "fastpath-gateway") for alias in cfg.aliases]
            + [ModelCard(name, created, "fastpath-gateway") for name in planned_names(cfg)]  # `auto`
        )
    )


def build_parts(cfg: Config, loop: asyncio.AbstractEventLoop) -> tuple[Worker, dict[str, Adapter], Pipeline]:
    """One generation: the worker runtime, the adapters, the routes, a started pipeline (a
    gateway worker's, at start and at each reload, and the job worker's: `jobs.standalone`)."""
    worker = Worker(cfg, loop)
    adapters = worker.adapters = {p.name: upstreams.build(p, worker) for p in cfg.providers}
    worker.routes = build_routes(cfg, adapters, worker)
    pipeline = Pipeline(cfg, worker)
    pipeline.start(worker)
    return worker, adapters, pipeline


async def close_parts(pipeline: Pipeline | None, adapters: dict[str, Adapter]) -> None:
    """A generation's shutdown: the pipeline's parts (the ledger drains), then the upstreams."""
    if pipeline is not None:
        await pipeline.close()
    for name, adapter in adapters.items():
        try:
            await adapter.close()
        except Exception:
            log.exception("closing upstream %s failed", name)


_MODEL_PATHS = ("/v1/models/", "/models/")
_BATCH_PATHS = ("/v1/files/", "/v1/batches/")
#: request path -> the client API (dialect) it speaks; absent: OpenAI's
DIALECTS: dict[str, Dialect] = {**MESSAGES_DIALECTS, Endpoint.RESPONSES.value: RESPONSES}
_model_list = msgspec.json.Decoder(ModelList).decode


def _is_json_type(ctype: str) -> bool:
    main = ctype.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def _too_large(limit: int) -> GatewayError:
    return GatewayError(Fault.BODY_TOO_LARGE, f"The request body is larger than {limit} bytes.")


def _method_not_allowed(allowed: str) -> GatewayError:
    return GatewayError(
        Fault.METHOD_NOT_ALLOWED, f"Method not allowed; use {allowed}.", headers=(("allow", allowed),)
    )


def create_app() -> Gateway:
    """granian factory target (`gateway.app:create_app`): runs in each worker process."""
    hold_stop_signals()
    return Gateway()


#: SIGHUP too: a reload asked for while the worker starts is held, then served by its loop's handler
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def hold_stop_signals() -> bool:
    """In a granian worker, hold SIGTERM/SIGINT pending until its event loop runs (released by
    `__rsgi_init__` with `loop.call_soon`). A worker starts with the master's handlers (they only
    flag the master's copied server object), and granian's own loop handlers miss a signal that
    arrives before the loop first runs: a stop signal sent while a worker loaded the app or ran
    `__rsgi_init__` was lost, and the worker served on until the master killed it
    `shutdown_grace_ms` later (1 start in 4 with 2 workers). Held, it is delivered once the
    loop runs, and the worker stops like any other. Elsewhere (tests, tools): nothing."""
    if multiprocessing.current_process().name != "granian-worker":
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    return True


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
