"""Upstream adapter for OpenAI-compatible HTTP servers (vLLM, SGLang, OpenAI, ...).

The base URL comes only from the config: nothing in a client request can choose the host, and
redirects are answered as errors, never followed.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..config import ProviderConfig
from ..errors import Fault, GatewayError
from ..schemas import UpstreamErrorDetail, UpstreamErrorView
from .httpclient import (
    Connection,
    HttpPool,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

_error_view = msgspec.json.Decoder(UpstreamErrorView)
_MAX_ERROR_BODY = 64 * 1024


class OpenAIHttpAdapter:
    kind = "openai"
    __slots__ = (
        "_prefix",
        "base_path",
        "connect_timeout_s",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "max_response_bytes",
        "name",
        "pool",
        "total_timeout_s",
    )

    def __init__(self, provider: ProviderConfig, loop: asyncio.AbstractEventLoop) -> None:
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

    def _serialize(self, method: str, path: str, body: bytes | None, request_id: str) -> bytes:
        start = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1")
        if body is None:
            return b"%s%sx-request-id: %s\r\n\r\n" % (start, self._prefix, request_id.encode())
        return b"%s%sx-request-id: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            start,
            self._prefix,
            request_id.encode(),
            len(body),
            body,
        )

    async def open(self, path: str, body: bytes, request_id: str, deadline: float) -> Connection:
        """POST `body` and return the connection once a 2xx response head has arrived.

        Non-2xx answers are read, mapped to the error taxonomy and raised."""
        loop = self.pool.loop
        head_deadline = min(deadline, loop.time() + self.first_byte_timeout_s)
        try:
            conn = await self.pool.request(
                self._serialize("POST", path, body, request_id), head_deadline=head_deadline
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

    async def probe(self, request_id: str, timeout_s: float) -> dict[str, Any]:
        """Readiness: the server answers `GET /models` (any status below 500)."""
        try:
            status, _ = await self.get("/models", request_id, timeout_s)
        except GatewayError as err:
            return {"ready": False, "detail": err.message}
        return {"ready": status < 500, "detail": f"HTTP {status}"}

    def close(self) -> None:
        self.pool.close()


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
