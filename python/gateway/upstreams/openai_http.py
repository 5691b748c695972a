"""Upstream adapter for OpenAI-compatible HTTP servers (vLLM, SGLang, OpenAI, ...).

The base URL comes only from the config: nothing in a client request can choose the host, and
redirects are answered as errors, never followed. A stream's bytes go through the Rust
`ChatStreamReframer` in one call per upstream read: it re-frames the events, records usage
(dropping the usage chunk the gateway asked for when the client did not), the completion text
and an upstream error event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import msgspec

from .. import _fastpath
from ..config import OpenAIProvider
from ..context import Endpoint
from ..embeddings import finish_upstream_body
from ..errors import Fault, GatewayError
from ..schemas import PromptTokensDetails, UpstreamErrorDetail, UpstreamErrorView, Usage
from ..signing import Signer
from ..usage import counted_prompt_tokens, fill_usage
from .httpclient import (
    Connection,
    HttpPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..routing.deployment import Deployment
    from ..worker import Worker

_error_view = msgspec.json.Decoder(UpstreamErrorView)
_MAX_ERROR_BODY = 64 * 1024


class OpenAIHttpAdapter:
    kind = "openai"
    __slots__ = (
        "_prefix",
        "_serialize",
        "_signer",
        "base_path",
        "connect_timeout_s",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "max_response_bytes",
        "name",
        "pool",
        "total_timeout_s",
    )

    def __init__(self, provider: OpenAIProvider, worker: Worker) -> None:
        loop = worker.loop
        url = urlsplit(provider.base_url)
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        host = url.hostname or ""
        self.name = provider.name
        self.base_path = url.path.rstrip("/")
        self.connect_timeout_s = provider.connect_timeout_ms / 1000
        self.first_byte_timeout_s = provider.first_byte_timeout_ms / 1000
        self.idle_timeout_s = provider.idle_timeout_ms / 1000
        self.total_timeout_s = provider.total_timeout_ms / 1000
        self.max_response_bytes = provider.max_response_bytes
        self.pool = HttpPool(
            loop,
            host,
            port,
            tls=tls,
            max_idle=provider.max_idle_connections,
            connect_timeout_s=self.connect_timeout_s,
        )
        default_port = port == (443 if tls else 80)
        authority = host if default_port else f"{host}:{port}"
        if ":" in host:  # IPv6 literal
            authority = f"[{host}]" if default_port else f"[{host}]:{port}"
        lines = [f"Host: {authority}", "User-Agent: fastpath-gateway", "Accept-Encoding: identity"]
        if provider.api_key:
            lines.append(f"Authorization: Bearer {provider.api_key}")
        lines.extend(f"{k}: {v}" for k, v in provider.headers.items())
        #: Header lines shared by every request to this provider, encoded once.
        self._prefix = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        s = provider.signing
        self._signer = None if s is None else Signer(s.key_id, s.secret, s.header)
        # chosen once: a provider without `signing` pays nothing per request for it
        self._serialize = self._serialize_plain if self._signer is None else self._serialize_signed

    def _serialize_signed(
        self, method: str, path: str, body: bytes | None, request_id: str, extra: bytes = b""
    ) -> bytes:
        assert self._signer is not None
        line = self._signer.line(method, self.base_path + path, body or b"")
        return self._serialize_plain(method, path, body, request_id, extra + line)

    def _serialize_plain(
        self, method: str, path: str, body: bytes | None, request_id: str, extra: bytes = b""
    ) -> bytes:
        """`extra`: header lines of this request only (`traceparent`), each ending in CRLF."""
        start = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1")
        if body is None:
            return b"%s%s%sx-request-id: %s\r\n\r\n" % (start, self._prefix, extra, request_id.encode())
        return b"%s%s%sx-request-id: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            start,
            self._prefix,
            extra,
            request_id.encode(),
            len(body),
            body,
        )

    async def start(
        self, ctx: RequestContext, target: Deployment, body: bytes, deadline: float
    ) -> OpenAICall:
        t0 = time.perf_counter_ns()
        extra = trace_lines(ctx)
        conn = await self.open(ctx.endpoint.value.removeprefix("/v1"), body, ctx.request_id, deadline, extra)
        ctx.timings["upstream_head"] = time.perf_counter_ns() - t0
        return OpenAICall(ctx, conn, self.max_response_bytes)

    async def open(
        self, path: str, body: bytes, request_id: str, deadline: float, extra: bytes = b""
    ) -> Connection:
        """POST `body` and return the connection once a 2xx response head has arrived.

        Non-2xx answers are read, mapped to the error taxonomy and raised."""
        loop = self.pool.loop
        head_deadline = min(deadline, loop.time() + self.first_byte_timeout_s)
        try:
            conn = await self.pool.request(
                self._serialize("POST", path, body, request_id, extra), head_deadline=head_deadline
            )
        except (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError) as exc:
            raise map_transport_error(exc) from None
        if 200 <= conn.status < 300:
            return conn
        try:
            raw = await conn.read_all(_MAX_ERROR_BODY, min(deadline, loop.time() + self.idle_timeout_s))
        except (UpstreamTimeout, UpstreamProtocolError):
            raw = b""
        finally:
            conn.release()
        raise map_upstream_status(conn.status, conn.headers, raw)

    async def get(self, path: str, request_id: str, timeout_s: float) -> tuple[int, bytes]:
        loop = self.pool.loop
        deadline = loop.time() + timeout_s
        try:
            conn = await self.pool.request(
                self._serialize("GET", path, None, request_id), head_deadline=deadline
            )
            try:
                return conn.status, await conn.read_all(self.max_response_bytes, deadline)
            finally:
                conn.release()
        except (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError) as exc:
            raise map_transport_error(exc) from None

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        """Readiness: the server answers `GET /models` (any status below 500)."""
        try:
            status, _ = await self.get("/models", "readyz", timeout_s)
        except GatewayError as err:
            return {"ready": False, "detail": err.message}
        return {"ready": status < 500, "detail": f"HTTP {status}"}

    async def check(self, model: str | None, path: str, timeout_s: float) -> tuple[bool, str]:
        """Active health check (routing.health): GET `path` from the server's root, healthy
        below 500. A leading `/v1` is the base URL's own `/v1` (`https://host/openai/v1` +
        `/v1/models` -> `/openai/v1/models`); any other path is from the root (vLLM's `/health`).
        `model` is not looked for: a listing answering is the liveness signal."""
        base = self.base_path
        if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
            path = base + path[3:]
        loop = self.pool.loop
        deadline = loop.time() + timeout_s
        signed = b"" if self._signer is None else self._signer.line("GET", path, b"")
        request = b"GET %s HTTP/1.1\r\n%s%sx-request-id: healthcheck\r\n\r\n" % (
            path.encode("latin-1"),
            self._prefix,
            signed,
        )
        try:
            conn = await self.pool.request(request, head_deadline=deadline)
        except (UpstreamConnectError, UpstreamTimeout, UpstreamProtocolError) as exc:
            return False, str(exc)
        try:  # read the body so the connection can be reused; its content does not matter
            await conn.read_all(self.max_response_bytes, deadline)
        except (UpstreamTimeout, UpstreamProtocolError):
            pass
        finally:
            conn.release()  # closes it unless the body was read whole
        return conn.status < 500, f"HTTP {conn.status}"

    async def close(self) -> None:
        self.pool.close()


class _Framer(Protocol):
    @property
    def error(self) -> str | None: ...
    @property
    def events(self) -> int: ...


class HttpCall:
    """One POST over the pooled client whose 2xx head has arrived, whatever its wire: reading,
    the transport errors' mapping, abort and release. A subclass sets `_framer` (a stream's
    `error` and `events`) and `_feed` (its bytes -> OpenAI frames), bound once so that `next`
    calls the framer directly: no extra layer per chunk."""

    __slots__ = ("_conn", "_ctx", "_feed", "_framer", "_max_bytes", "_usage")
    _feed: Callable[[bytes], bytes]
    _framer: _Framer | None

    def __init__(self, ctx: RequestContext, conn: Connection, max_bytes: int) -> None:
        self._ctx = ctx
        self._conn = conn
        self._max_bytes = max_bytes
        self._usage: Usage | None = None

    async def first(self, deadline: float) -> bytes:
        framer = self._framer
        assert framer is not None
        try:
            data = await self._conn.read(deadline, "first byte")
            out = self._feed(data)
        except (UpstreamTimeout, UpstreamProtocolError) as exc:
            raise map_transport_error(exc) from None
        except _fastpath.SseError as exc:
            raise GatewayError(
                Fault.UPSTREAM_BAD_RESPONSE, f"The upstream stream is malformed: {exc}"
            ) from None
        if framer.error is not None and framer.events <= 1:
            raise GatewayError(Fault.UPSTREAM_ERROR, f"The upstream failed the stream: {framer.error[:500]}")
        if not data:
            raise GatewayError(
                Fault.UPSTREAM_BAD_RESPONSE, "The upstream ended the stream without any event."
            )
        return out

    async def next(self, deadline: float) -> bytes | None:
        try:
            data = await self._conn.read(deadline)
            if not data:
                return None
            return self._feed(data)
        except UpstreamTimeout:
            raise TimeoutError from None
        except (UpstreamProtocolError, _fastpath.SseError) as exc:
            raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The upstream stream broke: {exc}") from None

    async def _read_body(self, deadline: float) -> bytes:
        try:
            return await self._conn.read_all(self._max_bytes, deadline)
        except (UpstreamTimeout, UpstreamProtocolError) as exc:
            raise map_transport_error(exc) from None

    @property
    def generated_tokens(self) -> int | None:
        return None

    def abort(self) -> None:
        self._conn.abort()

    def release(self) -> None:
        self._conn.release()


class OpenAICall(HttpCall):
    """The body (unary) or the SSE stream, re-framed in Rust."""

    __slots__ = ()
    _framer: _fastpath.ChatStreamReframer | None

    def __init__(self, ctx: RequestContext, conn: Connection, max_bytes: int) -> None:
        super().__init__(ctx, conn, max_bytes)
        self._framer = None
        if ctx.stream:
            reframer = self._framer = _fastpath.ChatStreamReframer(strip_usage=not ctx.client_wants_usage)
            self._feed = reframer.feed

    def finish(self) -> tuple[bytes, GatewayError | None]:
        reframer = self._framer
        assert reframer is not None
        tail = reframer.finish()
        if not reframer.done:
            return tail, GatewayError(
                Fault.UPSTREAM_BAD_RESPONSE, "The upstream ended the stream without [DONE]."
            )
        if self._ctx.client_wants_usage and reframer.usage is None:
            usage = self.usage()
            assert usage is not None
            tail += reframer.usage_chunk(usage.prompt_tokens, usage.completion_tokens)
        return tail, None

    async def body(self, deadline: float) -> bytes:
        raw = await self._read_body(deadline)
        if self._ctx.endpoint is Endpoint.EMBEDDINGS:  # usage has no completion; maybe base64
            body = finish_upstream_body(self._ctx, raw)
        else:
            body = fill_usage(self._ctx, raw)
        self._usage = self._ctx.usage
        return body

    def usage(self) -> Usage | None:
        reframer = self._framer
        if reframer is None:
            return self._usage
        if self._usage is None:  # asked once the stream is over: counting it once is enough
            usage = reframer.usage
            if usage is not None:
                cached = reframer.cached_tokens
                self._usage = Usage(*usage)
                if cached is not None:  # for `/metrics`; never re-encoded into a reply
                    self._usage.prompt_tokens_details = PromptTokensDetails(cached)
            else:
                ctx = self._ctx
                assert ctx.route is not None
                prompt = counted_prompt_tokens(ctx)
                completion = reframer.completion_tokens(ctx.route.encoding)
                self._usage = Usage(prompt, completion, prompt + completion)
        return self._usage

    @property
    def completion_text(self) -> str:
        return self._framer.completion_text if self._framer is not None else ""


def trace_lines(ctx: RequestContext) -> bytes:
    """The trace's header lines for the upstream (`traceparent`), each ending in CRLF."""
    trace = ctx.trace
    return b"" if trace is None else "".join(f"{k}: {v}\r\n" for k, v in trace.upstream_headers()).encode()


def map_transport_error(exc: Exception) -> GatewayError:
    if isinstance(exc, UpstreamTimeout):
        return GatewayError(
            Fault.UPSTREAM_TIMEOUT, f"The upstream model server did not answer in time ({exc})"
        )
    if isinstance(exc, UpstreamConnectError):
        return GatewayError(
            Fault.UPSTREAM_UNAVAILABLE,
            f"The upstream model server is unreachable: {exc}",
            headers=(("retry-after", "1"),),
        )
    return GatewayError(Fault.UPSTREAM_BAD_RESPONSE, f"The upstream model server failed: {exc}")


def _upstream_message(raw: bytes) -> str:
    try:
        view = _error_view.decode(raw)
    except msgspec.DecodeError:
        return ""
    err = view.error
    msg = err.message if isinstance(err, UpstreamErrorDetail) else err
    msg = msg or view.message or view.detail or ""
    return msg[:500]


def map_upstream_status(status: int, headers: dict[bytes, bytes], raw: bytes) -> GatewayError:
    """Map an upstream's non-2xx answer into our taxonomy; the raw body is never leaked."""
    detail = _upstream_message(raw)
    suffix = f": {detail}" if detail else ""
    origin: tuple[tuple[str, str], ...] = (("x-upstream-error-code", str(status)),)
    if status in (429, 503):
        retry_after = headers.get(b"retry-after", b"")
        origin += (("retry-after", retry_after.decode() if retry_after.isdigit() else "1"),)
    if 300 <= status < 400:
        fault, msg = (
            Fault.UPSTREAM_BAD_RESPONSE,
            "The upstream answered with a redirect, which is not followed",
        )
    elif status in (401, 403):
        fault, msg = Fault.UPSTREAM_AUTH, "The upstream rejected the gateway's credentials"
    elif status == 404:
        fault, msg = Fault.UPSTREAM_ERROR, f"The upstream has no such model or route{suffix}"
    elif status == 429:
        fault, msg = Fault.UPSTREAM_RATE_LIMITED, f"The upstream is rate limiting requests{suffix}"
    elif 400 <= status < 500 and status != 408:
        fault, msg = Fault.UPSTREAM_REJECTED, f"The upstream rejected the request{suffix}"
    elif status == 503:
        fault, msg = Fault.UPSTREAM_UNAVAILABLE, f"The upstream is unavailable{suffix}"
    elif status in (408, 504):
        fault, msg = Fault.UPSTREAM_TIMEOUT, f"The upstream timed out{suffix}"
    else:
        fault, msg = Fault.UPSTREAM_ERROR, f"The upstream failed with status {status}{suffix}"
    return GatewayError(fault, msg, headers=origin)
