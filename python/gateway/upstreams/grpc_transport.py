"""The gRPC transport under the Triton adapter: raw message bytes in and out, one error type.

The adapter (de)serializes protobufs itself, so a transport only moves gRPC messages over
HTTP/2. `GrpcioTransport` is grpcio's `grpc.aio` channel. Its poller engine hands every message
from gRPC's own threads to the event loop (thread hops and GIL handoffs per message; see
benchmarks/results/2026-11-23-triton-stream.md), which is why the interface is this narrow: an
in-loop HTTP/2 client can stand in without touching the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from grpc import aio

#: Triton's KServe v2 service.
SERVICE = "/inference.GRPCInferenceService/"


class RpcError(Exception):
    """A failed call: its gRPC status and Triton's own words."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class StreamCall(Protocol):
    async def read(self) -> bytes | None:
        """The next message; None once the server ended the call with status OK. Raises RpcError."""

    def cancel(self) -> None:
        """Cancel the call (RST_STREAM); a no-op once it ended."""


class Transport(Protocol):
    async def unary(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> bytes: ...

    def stream(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> StreamCall:
        """A bidirectional call that sends `request` and half-closes."""

    async def close(self) -> None: ...


_IDENTITY: Any = None  # grpcio: no (de)serializer = raw bytes


class _GrpcioStream:
    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    async def read(self) -> bytes | None:
        try:
            msg = await self._call.read()
        except aio.AioRpcError as exc:
            raise RpcError(exc.code(), exc.details() or "") from None
        return None if msg is aio.EOF else msg

    def cancel(self) -> None:
        self._call.cancel()


class GrpcioTransport:
    """grpc.aio over one channel per worker, created lazily in the worker's loop."""

    __slots__ = ("_channel", "_methods", "options", "root_certificates", "target", "tls")

    def __init__(
        self, target: str, *, tls: bool, root_certificates: bytes | None, options: Sequence[tuple[str, Any]]
    ) -> None:
        self.target = target
        self.tls = tls
        self.root_certificates = root_certificates
        self.options = tuple(options)
        self._channel: aio.Channel | None = None
        self._methods: dict[str, Any] = {}

    def _method(self, method: str, streaming: bool) -> Any:
        key = ("s" if streaming else "u") + method
        callable_ = self._methods.get(key)
        if callable_ is None:
            if self._channel is None:
                if self.tls:
                    creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
                    self._channel = aio.secure_channel(self.target, creds, options=self.options)
                else:
                    self._channel = aio.insecure_channel(self.target, options=self.options)
            make = self._channel.stream_stream if streaming else self._channel.unary_unary
            callable_ = make(SERVICE + method, request_serializer=_IDENTITY, response_deserializer=_IDENTITY)
            self._methods[key] = callable_
        return callable_

    async def unary(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> bytes:
        try:
            return await self._method(method, False)(request, timeout=timeout_s, metadata=metadata)  # type: ignore[no-any-return]
        except aio.AioRpcError as exc:
            raise RpcError(exc.code(), exc.details() or "") from None

    def stream(
        self, method: str, request: bytes, timeout_s: float, metadata: Sequence[tuple[str, str]]
    ) -> StreamCall:
        call = self._method(method, True)(iter((request,)), timeout=timeout_s, metadata=metadata)
        return _GrpcioStream(call)

    def channel_state(self, now: float) -> str:
        """gRPC's connectivity state name of the channel, for `/metrics` (never connects)."""
        if self._channel is None:
            return "idle"
        return str(self._channel.get_state(try_to_connect=False).name.lower())

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._methods.clear()
        if channel is not None:
            await channel.close()
