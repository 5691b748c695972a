"""Edge hygiene: who the client is behind trusted proxies, and the security response headers.

Both are decided once per worker from `server.*`: the headers are one precomputed tuple spliced
into every reply, and without `server.trusted_proxies` there is no resolver at all (the socket
peer is the client, nothing is parsed per request).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from .config import ForwardedHeader, ServerConfig

Header = tuple[str, str]
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network
_Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def _parse_addr(text: str) -> _Addr | None:
    """One hop as proxies write it: a bare address, `1.2.3.4:80`, `[v6]` or `[v6]:80`, quoted in
    `Forwarded`; an obfuscated identifier (`_hidden`, `unknown`) is None."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


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
        self._nets: tuple[_Net, ...] = tuple(ipaddress.ip_network(c) for c in server.trusted_proxies)
        self._header = server.forwarded_header

    def trusted(self, addr: _Addr) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._nets)

    def __call__(self, peer: str, headers: Any) -> str:
        addr = _parse_addr(_host_of(peer))
        if addr is None or not self.trusted(addr):
            return peer
        if self._header is ForwardedHeader.FORWARDED:
            hops = [h for v in _all(headers, "forwarded") for h in _forwarded_for(v)]
        else:
            hops = [h for v in _all(headers, "x-forwarded-for") for h in v.split(",")]
        client = str(addr)
        for hop in reversed(hops):
            hop_addr = _parse_addr(hop)
            if hop_addr is None:
                break
            client = str(hop_addr)
            if not self.trusted(hop_addr):
                break
        return client


def _all(headers: Any, name: str) -> list[str]:
    """Every value of a repeated header, in order (granian's `get_all`; any other engine's
    header object: its items)."""
    get_all = getattr(headers, "get_all", None)
    if get_all is not None:
        return list(get_all(name))
    return [v for k, v in headers.items() if k.lower() == name]
