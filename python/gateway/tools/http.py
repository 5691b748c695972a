"""HTTP tools and prompt targets: the model's arguments sent to an endpoint (a JSON object body;
GET: the query string), its 2xx reply body the result. Over the gateway's pooled HTTP/1.1 client (one pool per
tool), with the tool's timeout for the whole exchange."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

import msgspec

from ..upstreams.httpclient import HttpPool, UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from .base import ToolFailure

if TYPE_CHECKING:
    from ..config_tools import HttpToolConfig


def origin_pool(
    loop: asyncio.AbstractEventLoop, url: str, connect_timeout_s: float
) -> tuple[HttpPool, str, str]:
    """A pool to the URL's origin, the request target (path and query) and the Host header."""
    u = urlsplit(url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    host = u.hostname or ""
    pool = HttpPool(loop, host, port, tls=tls, max_idle=8, connect_timeout_s=connect_timeout_s)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return pool, target, u.netloc


async def exchange(
    pool: HttpPool, head: bytes, body: bytes, timeout_s: float, limit: int
) -> tuple[int, bytes]:
    """One request (`head` ends before Content-Length) -> (status, body); raises `ToolFailure`."""
    request = head + b"content-length: %d\r\n\r\n" % len(body) + body
    deadline = pool.loop.time() + timeout_s
    try:
        conn = await pool.request(request, head_deadline=deadline)
        try:
            data = await conn.read_all(limit, deadline)
        except BaseException:
            conn.abort()
            raise
        conn.release()
    except UpstreamTimeout:
        raise ToolFailure("http_timeout", f"the endpoint did not answer within {timeout_s:g} s") from None
    except UpstreamConnectError as exc:
        raise ToolFailure("http_connect", f"the endpoint could not be reached: {exc}") from None
    except (UpstreamProtocolError, OSError) as exc:
        raise ToolFailure("http_protocol", f"the endpoint's reply was broken: {exc}") from None
    return conn.status, data


class HttpTool:
    """One registered HTTP tool / prompt target. `GET`: the arguments go in the query string
    (scalars; a list repeats its key); else they are the JSON body."""

    __slots__ = ("_head", "_limit", "_method", "_pool", "_target", "summarize", "timeout_s")

    def __init__(self, cfg: HttpToolConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.timeout_s = cfg.timeout_ms / 1000
        self._pool, self._target, host = origin_pool(loop, cfg.url, self.timeout_s)
        self._method = cfg.method
        lines = [f"host: {host}", "accept: application/json"]
        if cfg.method != "GET":
            lines.append("content-type: application/json")
        lines += [f"{k}: {v}" for k, v in cfg.headers.items()]
        #: the head after the request line
        self._head = ("\r\n".join(lines) + "\r\n").encode()
        self._limit = cfg.max_response_bytes
        self.summarize = cfg.summarize

    async def run(self, loop: asyncio.AbstractEventLoop, args: bytes) -> bytes:
        target, body = self._target, args
        if self._method == "GET":
            target, body = _with_query(target, args), b""
        line = f"{self._method} {target} HTTP/1.1\r\n".encode()
        status, data = await exchange(self._pool, line + self._head, body, self.timeout_s, self._limit)
        if not 200 <= status < 300:
            text = data[:200].decode(errors="replace")
            raise ToolFailure("http_status", f"the endpoint answered HTTP {status}: {text}")
        return data

    def close(self) -> None:
        self._pool.close()


def _with_query(target: str, args: bytes) -> str:
    """`target` with the arguments object as query parameters."""
    doc = msgspec.json.decode(args)
    if not isinstance(doc, dict) or not doc:
        return target
    pairs: list[tuple[str, str]] = []
    for k, v in doc.items():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict | list):
                raise ToolFailure(
                    "tool_arguments_invalid", f"a GET tool takes scalar arguments; `{k}` is not"
                )
            text = item if isinstance(item, str) else msgspec.json.encode(item).decode()
            pairs.append((k, text))
    return target + ("&" if "?" in target else "?") + urlencode(pairs)
