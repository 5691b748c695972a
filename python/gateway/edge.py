"""Edge hygiene: who the client is behind trusted proxies, and the security response headers.

Both are decided once per worker from `server.*`: the headers are one precomputed tuple spliced
into every reply, and without `server.trusted_proxies` there is no resolver at all (the socket
peer is the client, nothing is parsed per request).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from .config import ForwardedHeader, ServerConfig

Header = tuple[str, str]


def security_headers(server: ServerConfig) -> tuple[Header, ...]:
    """The tuple every reply carries (empty when `server.security_headers.enabled` is off)."""
    h = server.security_headers
    if not h.enabled:
        return ()
    out: list[Header] = [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ]
    if h.content_security_policy:
        out.append(("content-security-policy", h.content_security_policy))
    if h.hsts_max_age_s > 0:
        sts = f"max-age={h.hsts_max_age_s}" + ("; includeSubDomains" if h.hsts_include_subdomains else "")
        out.append(("strict-transport-security", sts))
    return tuple(out)


def _host_of(peer: str) -> str:
    """The address part of RSGI's `scope.client` ("1.2.3.4:5678", "[::1]:5678")."""
    if peer.startswith("["):
        return peer[1 : peer.find("]")]
    if peer.count(":") == 1:
        return peer.rpartition(":")[0]
    return peer


#: (IP version, address as an int): parsed with inet_pton, ~10x cheaper than `ipaddress`
_Addr = tuple[int, int]


def _addr(text: str) -> _Addr | None:
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    try:
        v = int.from_bytes(socket.inet_pton(socket.AF_INET6, text))
    except OSError:
        return None
    if v >> 32 == 0xFFFF:  # ::ffff:a.b.c.d, a v4 peer on a dual-stack socket
        return 4, v & 0xFFFFFFFF
    return 6, v


def _hop(text: str) -> tuple[str, _Addr] | None:
    """One hop as proxies write it: a bare address, `1.2.3.4:80`, `[v6]` or `[v6]:80`, quoted in
    `Forwarded`; an obfuscated identifier (`_hidden`, `unknown`) is None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    a = _addr(text)
    return None if a is None else (text, a)


def _forwarded_for(value: str) -> list[str]:
    """RFC 7239 `Forwarded: for=...;proto=..., for=...` -> the `for` of each element."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, v = pair.partition("=")
            if name.strip().lower() == "for":
                hops.append(v)
                break
        else:
            hops.append("")  # an element without `for`: an unknown hop
    return hops


class ClientResolver:
    """The client's address when the socket peer is a trusted proxy: walk the forwarding header
    from the right (the hops the trusted proxies appended) and take the first address that is not
    itself trusted; everything left of it is what the client chose to send. A hop that is not an
    address stops the walk at the last trusted one (the nearest proxy vouches for no more)."""

    __slots__ = ("_header", "_nets")

    def __init__(self, server: ServerConfig) -> None:
        nets = [ipaddress.ip_network(c) for c in server.trusted_proxies]
        #: (version, network as an int, netmask as an int)
        self._nets = tuple((n.version, int(n.network_address), int(n.netmask)) for n in nets)
        self._header = server.forwarded_header

    def trusted(self, addr: _Addr) -> bool:
        version, value = addr
        return any(v == version and value & mask == net for v, net, mask in self._nets)

    def is_trusted(self, peer: str) -> bool:
        """`peer` ("ip:port", RSGI's form) is one of the trusted proxies."""
        addr = _addr(_host_of(peer))
        return addr is not None and self.trusted(addr)

    def __call__(self, peer: str, headers: Any) -> str:
        host = _host_of(peer)
        addr = _addr(host)
        if addr is None or not self.trusted(addr):
            return peer
        if self._header is ForwardedHeader.FORWARDED:
            hops = [h for v in _all(headers, "forwarded") for h in _forwarded_for(v)]
        else:
            hops = [h for v in _all(headers, "x-forwarded-for") for h in v.split(",")]
        client = host
        for raw in reversed(hops):
            hop = _hop(raw)
            if hop is None:
                break
            client = hop[0]
            if not self.trusted(hop[1]):
                break
        return client


def _all(headers: Any, name: str) -> list[str]:
    """Every value of a repeated header, in order (granian's `get_all`; any other engine's
    header object: its items)."""
    get_all = getattr(headers, "get_all", None)
    if get_all is not None:
        return list(get_all(name))
    return [v for k, v in headers.items() if k.lower() == name]
