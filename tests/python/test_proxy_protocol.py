"""The PROXY protocol (v1 and v2) on the uvloop engine: the parser, and a gateway behind an L4
balancer that speaks it (raw sockets standing for HAProxy), the access log showing the client."""

from __future__ import annotations

import ipaddress
import json
import socket
import uuid
from pathlib import Path

import pytest
from conftest import MockUpstream, run_gateway
from test_edge import access_config, logged

from gateway import config as config_mod
from gateway.server.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse


def v2(src: str, sport: int, *, local: bool = False, fam: int | None = None) -> bytes:
    ip = ipaddress.ip_address(src)
    dst = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    body = ip.packed + dst.packed + sport.to_bytes(2, "big") + (8080).to_bytes(2, "big")
    family = fam if fam is not None else (0x11 if ip.version == 4 else 0x21)
    return V2_SIGNATURE + bytes([0x20 if local else 0x21, family]) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8080\r\n", "203.0.113.7:51234"),
        (b"PROXY TCP6 2001:db8::7 ::1 51234 8080\r\n", "[2001:db8::7]:51234"),
        (b"PROXY UNKNOWN\r\n", None),
        (v2("203.0.113.9", 40000), "203.0.113.9:40000"),
        (v2("2001:db8::9", 40000), "[2001:db8::9]:40000"),
        (v2("203.0.113.9", 40000, local=True), None),  # the balancer's own health check
        (v2("203.0.113.9", 40000, fam=0x12), None),  # UDP: nothing about a TCP client
    ],
)
def test_headers_parse_whole_and_byte_by_byte(header: bytes, client: str | None) -> None:
    rest = b"GET /healthz HTTP/1.1\r\n\r\n"
    assert parse(header + rest) == (len(header), client)
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut  # more bytes needed, never a wrong answer


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 127.0.0.1 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 1.2.3.4 127.0.0.1 70000 2\r\n",
        b"PROXY TCP4 1.2.3.4\r\n",
        b"PROXY " + b"x" * 120,  # no CRLF within the longest v1 line
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00",
        V2_SIGNATURE + b"\x31\x11\x00\x00",  # version 3
    ],
)
def test_malformed_headers_are_refused(bad: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(bad)


def exchange(port: int, preamble: bytes, rid: str) -> bytes:
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            preamble
            + b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"x-request-id: {rid}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # closed by the gateway: what came before the reset counts
            pass
        return out


def proxied_ready(port: int) -> bool:
    """The readiness probe a PROXY protocol balancer would send (LOCAL: its own check)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(
                v2("127.0.0.1", 1, local=True)
                + b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_gateway_behind_a_proxy_protocol_balancer(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    log_path = tmp_path / "proxy.log"
    text = access_config(
        mock_upstream, log_path, engine="uvloop", trusted_proxies='["127.0.0.1/32"]', proxy_protocol="true"
    )
    with run_gateway(tmp_path, mock_upstream, config_text=text, engine="uvloop", ready=proxied_ready) as gw:
        for rid, preamble in (
            (f"v1-{run}", b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8080\r\n"),
            (f"v2-{run}", v2("198.51.100.4", 40000)),
            (f"local-{run}", v2("198.51.100.4", 40000, local=True)),
        ):
            assert exchange(gw.port, preamble, rid).startswith(b"HTTP/1.1 200"), rid
        # no header, or a broken one, from the balancer: the connection is closed, nothing served
        assert exchange(gw.port, b"", f"bare-{run}") == b""
        assert exchange(gw.port, b"PROXY TCP4 nonsense\r\n", f"bad-{run}") == b""
        seen = logged(log_path, {f"v1-{run}", f"v2-{run}", f"local-{run}"})
    assert seen[f"v1-{run}"]["client"] == "203.0.113.7:51234"
    assert seen[f"v2-{run}"]["client"] == "198.51.100.4:40000"
    assert seen[f"local-{run}"]["client"].startswith("127.0.0.1")  # LOCAL: the balancer itself
    assert f"bare-{run}" not in seen and f"bad-{run}" not in seen


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_an_untrusted_peer_is_not_served(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    text = access_config(
        mock_upstream,
        tmp_path / "x.log",
        engine="uvloop",
        trusted_proxies='["10.0.0.0/8"]',
        proxy_protocol="true",
    )
    with run_gateway(tmp_path, mock_upstream, config_text=text, engine="uvloop", ready=_listening) as gw:
        preamble = b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8080\r\n"
        assert exchange(gw.port, preamble, "untrusted") == b""


def test_config_needs_trusted_proxies_and_the_uvloop_engine() -> None:
    base = "providers: [{name: m, base_url: 'http://127.0.0.1:1/v1'}]\nmodels: [{name: a, provider: m}]\n"
    for server, msg in (
        ("{proxy_protocol: true}", "needs `trusted_proxies`"),
        ("{proxy_protocol: true, trusted_proxies: ['10.0.0.0/8'], engine: granian}", "engine: uvloop"),
    ):
        with pytest.raises(config_mod.ConfigError) as info:
            config_mod.parse(base + f"server: {server}\n")
        assert "$.server.proxy_protocol" in str(info.value) and msg in str(info.value)
