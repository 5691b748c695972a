"""The PROXY protocol (HAProxy's, v1 text and v2 binary): an L4 balancer in front of the gateway
says, before the first HTTP byte, who the client really is. Accepted only from the peers in
`server.trusted_proxies`; a connection from anyone else is closed (with `server.proxy_protocol`
on, a header from an untrusted peer would let any client choose its own address).

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # the longest v1 line, CRLF included
_V2_HEADER = 16


class ProxyHeaderError(ValueError):
    """Not a PROXY protocol header, or a malformed one."""


def parse(buf: bytes) -> tuple[int, str | None] | None:
    """`(bytes consumed, "ip:port" of the client or None)` once `buf` holds a whole header;
    None while more bytes are needed. None as the client: the proxy speaks for itself (v2 LOCAL,
    v1 UNKNOWN, or a family other than TCP over IPv4/IPv6): keep the socket peer."""
    if not buf:
        return None
    if buf[:1] != b"\r":
        return _parse_v1(buf)
    if len(buf) < _V2_HEADER:
        if not V2_SIGNATURE.startswith(buf[:12]):
            raise ProxyHeaderError("not a PROXY protocol header")
        return None
    return _parse_v2(buf)


def _parse_v1(buf: bytes) -> tuple[int, str | None] | None:
    if not _V1_PREFIX.startswith(buf[:6]):
        raise ProxyHeaderError("not a PROXY protocol header")
    end = buf.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(buf) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = buf[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    _, family, src, _dst, sport, _dport = parts
    try:
        ip = ipaddress.ip_address(src)
        port = int(sport)
    except ValueError:
        raise ProxyHeaderError("malformed PROXY v1 address") from None
    if (ip.version == 4) != (family == "TCP4") or not 0 <= port <= 65535 or sport != str(port):
        raise ProxyHeaderError("malformed PROXY v1 address")
    return end + 2, _host_port(ip, port)


def _parse_v2(buf: bytes) -> tuple[int, str | None] | None:
    if buf[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("not a PROXY protocol header")
    ver_cmd, fam = buf[12], buf[13]
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    length = int.from_bytes(buf[14:16], "big")
    total = _V2_HEADER + length
    if len(buf) < total:
        return None
    body = buf[_V2_HEADER:total]
    if ver_cmd & 0x0F == 0:  # LOCAL: the proxy's own connection (health checks)
        return total, None
    if fam == 0x11 and length >= 12:  # TCP over IPv4: src, dst, sport, dport
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        port = int.from_bytes(body[8:10], "big")
    elif fam == 0x21 and length >= 36:  # TCP over IPv6
        ip = ipaddress.IPv6Address(body[0:16])
        port = int.from_bytes(body[32:34], "big")
    else:  # UDP, Unix sockets, unspecified: nothing to say about the client's IP
        return total, None
    return total, _host_port(ip, port)


def _host_port(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
