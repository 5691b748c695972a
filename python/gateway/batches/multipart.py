"""`multipart/form-data` (RFC 7578) for `POST /v1/files`: the whole body is in memory (it was
read under the upload's size limit), so a strict split on the boundary is enough. No
dependency: the form has two fields (`purpose`, `file`); anything malformed is a ValueError
the route turns into a 400."""

from __future__ import annotations

import re
from typing import NamedTuple

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))""", re.IGNORECASE)
_PARAM = re.compile(r"""\s*;\s*([A-Za-z*]+)=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""")
_MAX_PARTS = 16
_MAX_HEADER_BYTES = 8192


class Part(NamedTuple):
    name: str
    filename: str | None
    content_type: str
    data: bytes


def boundary_of(content_type: str) -> str:
    main = content_type.split(";", 1)[0].strip().lower()
    if main != "multipart/form-data":
        raise ValueError("send the file as multipart/form-data")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise ValueError("the multipart Content-Type has no boundary")
    return m.group(1) or m.group(2)


def parse(body: bytes, content_type: str) -> dict[str, Part]:
    """The form's fields by name (a repeated name: the first)."""
    delim = b"--" + boundary_of(content_type).encode("latin-1")
    if not body.startswith(delim):
        body_at = body.find(b"\r\n" + delim)
        if body_at < 0:
            raise ValueError("the multipart body does not contain its boundary")
        body = body[body_at + 2 :]
    parts: dict[str, Part] = {}
    closed = False
    for chunk in _chunks(body[len(delim) :], b"\r\n" + delim):
        if chunk.startswith(b"--"):  # the closing delimiter: what follows is the epilogue
            closed = True
            break
        head, found, data = chunk[2:].partition(b"\r\n\r\n")
        if not found or len(head) > _MAX_HEADER_BYTES:
            raise ValueError("malformed multipart part headers")
        name, filename, ctype = _headers(head.decode("utf-8", "replace"))
        if len(parts) >= _MAX_PARTS:
            raise ValueError("too many multipart parts")
        parts.setdefault(name, Part(name, filename, ctype, data))
    if not closed:
        raise ValueError("the multipart body ends before its closing boundary")
    return parts


def _chunks(rest: bytes, sep: bytes) -> list[bytes]:
    """`rest` (after the first delimiter) cut at each delimiter: one is followed by CRLF (a
    part) or `--` (the end); the same bytes followed by anything else are content."""
    out: list[bytes] = []
    start = at = 0
    while True:
        if not rest[start:].startswith((b"\r\n", b"--")):
            raise ValueError("malformed multipart delimiter")
        if rest.startswith(b"--", start):
            out.append(rest[start:])
            return out
        while True:
            at = rest.find(sep, at + 1 if at > start else start)
            if at < 0:
                raise ValueError("the multipart body ends before its closing boundary")
            if rest.startswith((b"\r\n", b"--"), at + len(sep)):
                break
        out.append(rest[start:at])
        start = at = at + len(sep)


def _headers(head: str) -> tuple[str, str | None, str]:
    disposition = ""
    ctype = "text/plain"
    for line in head.split("\r\n"):
        key, found, value = line.partition(":")
        if not found:
            raise ValueError("malformed multipart part header")
        key = key.strip().lower()
        if key == "content-disposition":
            disposition = value.strip()
        elif key == "content-type":
            ctype = value.strip()
    kind, _, rest = disposition.partition(";")
    if kind.strip().lower() != "form-data":
        raise ValueError("a multipart part without Content-Disposition: form-data")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params.setdefault(m.group(1).lower(), re.sub(r"\\(.)", r"\1", value))
    name = params.get("name")
    if not name:
        raise ValueError("a multipart part without a name")
    return name, params.get("filename"), ctype
