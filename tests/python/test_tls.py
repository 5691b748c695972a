"""TLS termination and HTTP/2 ingress (`server.tls`, `server.http`, engine granian) on a real
gateway with a private CA: httpx over HTTP/2 (unary and a stream), the openai SDK over https,
plain HTTP to the TLS port refused cleanly, `http: 1` without h2, config validation, and a
certificate replaced by a reload."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx  # the openai SDK's HTTP client (httpx's maintained fork), h2 installed
import openai
import pytest
from conftest import MockUpstream, _env, free_port, private_ca, stop

from gateway import config as config_mod

MESSAGES = [{"role": "user", "content": "hello over tls"}]


def tls_config(upstream: MockUpstream, cert: Path, key: Path, http: str = "auto") -> str:
    return (
        f"server:\n  host: 127.0.0.1\n  engine: granian\n  http: {http}\n"
        f"  tls: {{cert_file: '{cert}', key_file: '{key}'}}\n"
        "providers:\n"
        f"  - {{name: mock, base_url: 'http://127.0.0.1:{upstream.port}/v1'}}\n"
        "models:\n  - {name: echo, provider: mock, upstream_model: mock-echo}\n"
    )


class TlsGateway:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], config: Path) -> None:
        self.port, self.proc, self.config = port, proc, config
        self.url = f"https://localhost:{port}"


@contextlib.contextmanager
def run_tls_gateway(tmp: Path, config_text: str, ca: Path, workers: int = 1) -> Iterator[TlsGateway]:
    port = free_port()
    cfg = tmp / f"gateway-{port}.yaml"
    cfg.write_text(config_text)
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)]
    cmd += ["--workers", str(workers), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env() | {"FASTPATH_GATEWAY_ENGINE": "granian"})  # TLS: granian
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "the gateway exited"
            try:
                conn = http.client.HTTPSConnection("localhost", port, timeout=1, context=ctx)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                assert time.monotonic() < deadline, "the TLS gateway did not get ready"
                time.sleep(0.05)
        yield TlsGateway(port, proc, cfg)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return private_ca(tmp_path_factory.mktemp("pki"))


def test_http2_and_the_openai_sdk_over_tls(
    mock_upstream: MockUpstream, pki: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ca, cert, key = pki
    verify = ssl.create_default_context(cafile=str(ca))
    with run_tls_gateway(tmp_path, tls_config(mock_upstream, cert, key), ca) as gw:
        body = {"model": "echo", "messages": MESSAGES}
        # HTTP/2 by ALPN: unary and a stream on one connection
        with httpx.Client(http2=True, verify=verify, timeout=10) as h2:
            r = h2.post(f"{gw.url}/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.http_version == "HTTP/2", (r.status_code, r.http_version)
            assert r.json()["choices"][0]["message"]["content"]
            with h2.stream("POST", f"{gw.url}/v1/chat/completions", json=body | {"stream": True}) as s:
                assert s.status_code == 200 and s.http_version == "HTTP/2"
                lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            text = "".join(
                c["choices"][0]["delta"].get("content") or ""
                for c in (json.loads(line[6:]) for line in lines[:-1])
                if c["choices"]
            )
            assert text == r.json()["choices"][0]["message"]["content"]
            assert h2.get(f"{gw.url}/v1/models").json()["data"][0]["id"] == "echo"
        # HTTP/1.1 clients on the same port (ALPN http/1.1)
        with httpx.Client(verify=verify, timeout=10) as h1:
            r1 = h1.post(f"{gw.url}/v1/chat/completions", json=body)
            assert r1.status_code == 200 and r1.http_version == "HTTP/1.1"
        # the openai SDK over https with the private CA
        client = openai.OpenAI(
            base_url=f"{gw.url}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx.Client(verify=verify, timeout=10),
        )
        unary = client.chat.completions.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="echo", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            if c.choices
        )
        assert unary.choices[0].message.content == streamed
        client.close()
        # without the CA: the certificate is refused
        with pytest.raises(httpx.ConnectError), httpx.Client(timeout=5) as untrusted:
            untrusted.get(f"{gw.url}/healthz")
        # plain HTTP to the TLS port fails cleanly (no answer, the connection closed), and the
        # gateway serves TLS on
        plain = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/healthz")
            plain.getresponse().read()
        plain.close()
        with httpx.Client(http2=True, verify=verify, timeout=10) as again:
            assert again.get(f"{gw.url}/healthz").status_code == 200


def test_http1_only_offers_no_h2(
    mock_upstream: MockUpstream, pki: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ca, cert, key = pki
    with run_tls_gateway(tmp_path, tls_config(mock_upstream, cert, key, http="1"), ca) as gw:
        verify = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(http2=True, verify=verify, timeout=10) as c:
            r = c.post(f"{gw.url}/v1/chat/completions", json={"model": "echo", "messages": MESSAGES})
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"


def test_tls_config_is_validated(
    mock_upstream: MockUpstream, pki: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, cert, key = pki
    good = tls_config(mock_upstream, cert, key)
    assert config_mod.parse(good).server.tls is not None
    assert config_mod.parse(good.replace("http: auto", "http: 2")).server.http is config_mod.HttpMode.HTTP2
    missing = tmp_path / "nope.pem"
    with pytest.raises(config_mod.ConfigError, match=r"server\.tls\.cert_file: cannot read"):
        config_mod.parse(tls_config(mock_upstream, missing, key))
    _, other_cert, _ = private_ca(tmp_path, "other")  # another key's certificate
    with pytest.raises(config_mod.ConfigError, match=r"server\.tls: the certificate and key do not load"):
        config_mod.parse(tls_config(mock_upstream, other_cert, key))
    with pytest.raises(config_mod.ConfigError, match=r"engine granian"):
        config_mod.parse(good.replace("engine: granian", "engine: uvloop"))
    with pytest.raises(config_mod.ConfigError, match=r"http"):
        config_mod.parse(good.replace("http: auto", "http: 3"))


def test_a_reload_serves_a_replaced_certificate(mock_upstream: MockUpstream, tmp_path: Path) -> None:
    """The files change in place and SIGHUP: granian loads certificates when a worker starts, so
    the master replaces the worker (gateway.reload); new connections get the new certificate."""
    ca, cert, key = private_ca(tmp_path)
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    with run_tls_gateway(tmp_path, tls_config(mock_upstream, live_cert, live_key), ca) as gw:
        served = ssl.get_server_certificate(("127.0.0.1", gw.port), timeout=5)
        assert _der(served) == _der(cert.read_text())
        _, new_cert, new_key = private_ca(tmp_path, "renewed")
        live_key.write_bytes(new_key.read_bytes())
        live_cert.write_bytes(new_cert.read_bytes())
        os.kill(gw.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _der(ssl.get_server_certificate(("127.0.0.1", gw.port), timeout=5)) != _der(
            new_cert.read_text()
        ):
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.2)
        verify = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(http2=True, verify=verify, timeout=10) as c:
            r = c.post(f"{gw.url}/v1/chat/completions", json={"model": "echo", "messages": MESSAGES})
            assert r.status_code == 200 and r.http_version == "HTTP/2"


def _der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)
