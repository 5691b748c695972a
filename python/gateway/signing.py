"""Request signing of upstream calls (a provider's `signing:`): an HMAC the upstream can check to
know a request came from this gateway, unaltered and recent.

    x-fastpath-signature: t=<unix seconds>,kid=<key id>,sig=<hex HMAC-SHA256>
    over "<METHOD>\\n<path>\\n<hex sha256(body)>\\n<t>"

`path` is the request target's path as sent (the base URL's path included, no query). Both sides
live here: the adapter signs (`Signer`), the mock upstream verifies (`verify`).
"""

from __future__ import annotations

import hashlib
import hmac
import time

DEFAULT_HEADER = "x-fastpath-signature"
#: How far a signature's time may be from the verifier's clock, either way.
DEFAULT_MAX_SKEW_S = 300


def signature(secret: bytes, method: str, path: str, body: bytes, t: int) -> str:
    message = b"%s\n%s\n%s\n%d" % (
        method.encode("ascii"),
        path.encode("latin-1"),
        hashlib.sha256(body).hexdigest().encode("ascii"),
        t,
    )
    return hmac.digest(secret, message, "sha256").hex()  # one-shot, in C


class Signer:
    """One provider's key: `line(...)` is the header line to add to a request, CRLF-terminated."""

    __slots__ = ("_prefix", "_secret", "_sig")

    def __init__(self, key_id: str, secret: str, header: str = DEFAULT_HEADER) -> None:
        self._secret = secret.encode()
        self._prefix = f"{header}: t=%d,kid={key_id},sig=".encode("latin-1")

    def line(self, method: str, path: str, body: bytes, now: float | None = None) -> bytes:
        t = int(time.time() if now is None else now)
        return b"%s%s\r\n" % (self._prefix % t, signature(self._secret, method, path, body, t).encode())


def verify(
    value: str | None,
    secret: str,
    method: str,
    path: str,
    body: bytes,
    *,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
    now: float | None = None,
) -> str | None:
    """None when `value` (the header) is a valid, fresh signature; otherwise why not."""
    if not value:
        return "missing signature"
    fields = dict(part.partition("=")[::2] for part in value.split(","))
    t_text, sig = fields.get("t", ""), fields.get("sig", "")
    if not t_text.isdigit() or not sig or "kid" not in fields:
        return "malformed signature"
    t = int(t_text)
    if abs((time.time() if now is None else now) - t) > max_skew_s:
        return "stale signature"
    if not hmac.compare_digest(sig, signature(secret.encode(), method, path, body, t)):
        return "bad signature"
    return None
