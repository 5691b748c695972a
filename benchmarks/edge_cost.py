"""What edge hygiene costs per request, in process (issue 17 item 4):

- `headers`: `respond.send_json` with the security headers on vs off (the 4 precomputed tuples
  spliced into the reply's header list); granian then writes ~150 more bytes per reply;
- `client`: resolving the client behind a trusted proxy (`edge.ClientResolver`, a 2-hop
  X-Forwarded-For) vs none configured (the socket peer: no call at all);
- `signing`: serializing one upstream request with `signing:` vs without (HMAC-SHA256 over a
  1 KiB body's digest).

Times are CPU (`process_time`) per call, the best of `--repeat` runs.

    .venv/bin/python benchmarks/edge_cost.py [--calls 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.config import ServerConfig, SigningConfig, parse
from gateway.context import Endpoint, RequestContext
from gateway.edge import ClientResolver
from gateway.pipeline import respond
from gateway.upstreams.openai_http import OpenAIHttpAdapter
from gateway.worker import Worker


class _Protocol:
    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        pass


class _Headers:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self._items if k == name]


def per_call_ns(fn: Callable[[], Any], calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time_ns() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    n, r = a.calls, a.repeat
    rows: list[tuple[str, float, float]] = []

    proto, body = _Protocol(), b'{"ok":true}'
    ctx = RequestContext("req-1", Endpoint.CHAT, b"{}", 0, _Headers([]), "127.0.0.1:1")
    ctx.timings = {"decode": 1000, "upstream": 2000}

    def send() -> None:
        respond.send_json(proto, ctx, 200, body)

    respond.configure(ServerConfig(security_headers=msgspec_replace(enabled=False)))
    off = per_call_ns(send, n, r)
    respond.configure(ServerConfig())
    on = per_call_ns(send, n, r)
    rows.append(("headers: send_json", off, on))

    resolver = ClientResolver(ServerConfig(trusted_proxies=["10.0.0.0/8"]))
    hdrs = _Headers([("x-forwarded-for", "203.0.113.7, 10.1.2.3")])
    rows.append(("client: 2-hop XFF", 0.0, per_call_ns(lambda: resolver("10.0.0.2:5555", hdrs), n, r)))

    loop = asyncio.new_event_loop()
    cfg = parse(
        "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"
    )
    worker = Worker(cfg, loop)
    plain = OpenAIHttpAdapter(cfg.providers[0], worker)  # type: ignore[arg-type]
    signing = SigningConfig(key_id="gw-1", secret="s" * 32)
    signed = OpenAIHttpAdapter(msgspec_replace_provider(cfg.providers[0], signing), worker)  # type: ignore[arg-type]
    req = b"x" * 1024
    sp, ss = plain._serialize, signed._serialize
    rows.append(
        (
            "signing: serialize 1 KiB",
            per_call_ns(lambda: sp("POST", "/chat/completions", req, "rid"), n // 4, r),
            per_call_ns(lambda: ss("POST", "/chat/completions", req, "rid"), n // 4, r),
        )
    )
    loop.close()

    print(f"{'what':28} {'off ns':>8} {'on ns':>8} {'added ns':>9}")
    for name, o, x in rows:
        print(f"{name:28} {o:8.0f} {x:8.0f} {x - o:9.0f}")


def msgspec_replace(**fields: Any) -> Any:
    from gateway.config import SecurityHeadersConfig

    return SecurityHeadersConfig(**fields)


def msgspec_replace_provider(provider: Any, signing: SigningConfig) -> Any:
    import msgspec

    return msgspec.structs.replace(provider, signing=signing)


if __name__ == "__main__":
    main()
