"""`S3Store`: the `ObjectStore` on an S3 bucket (AWS or any S3-compatible server), through
obstore (Python bindings of the Rust `object_store` crate, the Apache Arrow project's client).

Why obstore (benchmarks/objstore_cost.py, results in
benchmarks/results/2026-12-05-objstore-cost.md; against moto in server mode on the shared
2-core machine, loadavg 6-7): it is natively async (the request runs on obstore's Tokio runtime,
the loop only awaits a future: no thread per call, signing and parsing off the GIL), it retries
and times out in Rust, and it cost the least CPU of the three candidates, per op:

    client                 put 1 KiB  get 1 KiB  put 8 MiB  get 8 MiB   (CPU ms/op, 2 runs)
    obstore 0.12           0.45/0.42  0.65/0.52  10.2/10.9  4.8/5.2
    boto3 in a thread      1.94/2.69  1.99/2.55  16.5/15.3  9.2/6.6
    aiobotocore 3.10       2.57/1.95  2.23/2.14  20.1/16.7  20.5/16.0

with the lowest small-op latency (p50 2.5-3.9 ms vs 3.9-14.6) and the best concurrent
throughput (64 concurrent 1 KiB puts: 251-309 ops/s vs 124-239).

Credentials: never from the config. obstore reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN` from the environment, else the web identity token
(`AWS_WEB_IDENTITY_TOKEN_FILE`), the container (ECS) or instance (IMDSv2) metadata. It does not
read `~/.aws/credentials` profiles. Messages never carry a credential: an error names the
bucket, endpoint, operation and key and S3's error code and message (`NoSuchBucket`,
`AccessDenied` with a hint to the credential variables, never their values), or "cannot reach
the server" after the bounded retries; any other text is cut to its first line, without query
strings or signature headers.

Objects over 5 MiB go up as multipart uploads (parts in parallel); one cut short by a crash leaves
its parts in the bucket until S3 removes them: give the bucket a lifecycle rule
`AbortIncompleteMultipartUpload` (a day is plenty).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store as _ObS3Store

from ..config_storage import AddressingStyle, S3StorageConfig
from . import ObjectNotFound, ObjectStoreError, check_key

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

#: what obstore raises: its own errors, the builtin FileNotFoundError for a missing object,
#: ValueError for a bad argument
_ERRORS = (BaseError, OSError, ValueError)
#: the S3 error document's code and message (never a secret: S3 echoes no credentials)
_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{1,200})</Message>")
_DENIED = frozenset(
    ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")
)
_CREDENTIALS = ": check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role) and the bucket policy"
_UNREACHABLE = re.compile(r"error sending request|timed out|timeout|connection", re.IGNORECASE)
#: a part of a message that may carry a secret (a presigned URL's query, a header value)
_SECRETS = re.compile(r"(\?[^\s\"']*|(?i:x-amz-[a-z-]+|authorization|signature|credential)[=:]\s*\S+)")
_MESSAGE_MAX = 300


def _clean(text: str) -> str:
    text = " ".join(text.split())
    return _SECRETS.sub("", text)[:_MESSAGE_MAX]


class S3Store:
    """One obstore client per store (connection pool inside); safe to share within a process.
    Keys are `check_key`ed, then stored under `prefix/` in the bucket."""

    def __init__(self, cfg: S3StorageConfig) -> None:
        self.bucket = cfg.bucket
        where = cfg.endpoint_url or "AWS S3"
        self._where = f"s3://{cfg.bucket} at {where}"
        config: S3Config = {}
        if cfg.endpoint_url:
            config["endpoint"] = cfg.endpoint_url.rstrip("/")
        if cfg.region:
            config["region"] = cfg.region
        virtual = cfg.addressing_style is AddressingStyle.VIRTUAL or (
            cfg.addressing_style is AddressingStyle.AUTO and not cfg.endpoint_url
        )
        config["virtual_hosted_style_request"] = virtual
        client: ClientConfig = {
            "connect_timeout": timedelta(milliseconds=cfg.connect_timeout_ms),
            "timeout": timedelta(milliseconds=cfg.timeout_ms),
            "allow_http": cfg.endpoint_url.startswith("http://"),
        }
        retry: RetryConfig = {
            "max_retries": cfg.max_retries,
            "retry_timeout": timedelta(milliseconds=cfg.retry_timeout_ms),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=5),
                "base": 2,
            },
        }
        prefix = cfg.prefix.strip("/") or None
        try:
            self._store = _ObS3Store(
                cfg.bucket, prefix=prefix, config=config, client_options=client, retry_config=retry
            )
        except _ERRORS as exc:
            first = str(exc).split("\n", 1)[0]
            raise ObjectStoreError(f"{self._where}: cannot configure the client: {_clean(first)}") from None

    def __repr__(self) -> str:
        return f"S3Store({self._where!r})"

    def _error(self, op: str, key: str, exc: Exception) -> ObjectStoreError:
        text = str(exc)
        code = _CODE.search(text)
        if isinstance(exc, FileNotFoundError) and not (code and code.group(1) == "NoSuchBucket"):
            return ObjectNotFound(key)
        if code:
            message = _MESSAGE.search(text)
            reason = code.group(1) + (f" ({_clean(message.group(1))})" if message else "")
            if code.group(1) in _DENIED:
                reason += _CREDENTIALS
        elif isinstance(exc, PermissionDeniedError | UnauthenticatedError):
            reason = "access denied" + _CREDENTIALS
        elif _UNREACHABLE.search(text):
            reason = "cannot reach the server (refused, reset or timed out, retries included)"
        else:
            reason = f"{type(exc).__name__}: {_clean(text.split(chr(10), 1)[0])}"
        return ObjectStoreError(f"{self._where}: {op} {key!r} failed: {reason}")

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = check_key(key)
        try:
            await obstore.put_async(self._store, path, data, attributes={"Content-Type": content_type})
        except _ERRORS as exc:
            raise self._error("put", key, exc) from None

    async def get(self, key: str) -> bytes:
        path = check_key(key)
        try:
            result = await obstore.get_async(self._store, path)
            return (await result.bytes_async()).to_bytes()
        except _ERRORS as exc:
            raise self._error("get", key, exc) from None

    async def delete(self, key: str) -> None:
        path = check_key(key)
        try:
            await obstore.delete_async(self._store, path)
        except FileNotFoundError:
            return
        except _ERRORS as exc:
            raise self._error("delete", key, exc) from None

    async def exists(self, key: str) -> bool:
        path = check_key(key)
        try:
            await obstore.head_async(self._store, path)
        except FileNotFoundError:
            return False
        except _ERRORS as exc:
            raise self._error("head", key, exc) from None
        return True

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        # obstore's prefix matches whole path segments; the interface's is a string prefix: list
        # the last complete segment and filter
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:
            if base:
                check_key(base)
        except ValueError:
            return  # a prefix no valid key has
        try:
            stream: Any = obstore.list(self._store, base or None, chunk_size=1000)
            async for chunk in stream:
                for meta in chunk:
                    key = meta["path"]
                    if key.startswith(prefix):
                        yield key
        except _ERRORS as exc:
            raise self._error("list", prefix, exc) from None

    async def close(self) -> None:
        return None
