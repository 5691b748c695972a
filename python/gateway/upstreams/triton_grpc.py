"""Upstream adapter for NVIDIA Triton over gRPC (KServe v2 `GRPCInferenceService`).

One HTTP/2 channel per worker (every request multiplexes on it), created lazily inside the
worker's loop, behind the narrow `grpc_transport.Transport`. Generation goes over
`ModelStreamInfer`, which decoupled models (TensorRT-LLM, BLS) require: unary `ModelInfer` fails
on them. Reconnect backoff is capped short, so once Triton is back the next request reaches it
without a gateway restart.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from tritonclient.grpc import service_pb2 as pb

from ..config import EmbeddingModelConfig, GrpcTransportKind, TritonModelConfig, TritonProvider
from ..errors import Fault, GatewayError
from ..schemas import EmbeddingsRequestView
from .grpc_h2 import H2Transport
from .grpc_transport import GrpcioTransport, RpcError, StreamCall, Transport
from .triton_call import TritonCall
from .triton_embed import EmbeddingCall, EmbeddingShape, shape_from_metadata, start_embedding
from .triton_request import TritonRequestBuilder
from .triton_rich import RichTritonCall

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..routing.deployment import Deployment
    from ..worker import Worker

#: Re-read a model's metadata this long after it was cached (a reload may change its inputs).
_METADATA_TTL_S = 60.0
_CHANNEL_OPTIONS = (
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


@dataclass(slots=True)
class _Cached:
    builder: TritonRequestBuilder
    at: float


def _unavailable(message: str) -> GatewayError:
    return GatewayError(Fault.UPSTREAM_UNAVAILABLE, message, headers=(("retry-after", "1"),))


def _not_loaded(detail: str) -> bool:
    return "unknown model" in detail or "is not found" in detail or "not ready" in detail


def map_rpc_error(exc: RpcError, model: str) -> GatewayError:
    """gRPC status -> the gateway's taxonomy (the details are Triton's own words)."""
    code = exc.code
    detail = exc.details[:500]
    if code == grpc.StatusCode.UNAVAILABLE:
        if _not_loaded(detail):
            return _unavailable(f"The Triton model `{model}` is not loaded: {detail}")
        return _unavailable(f"The Triton server is unreachable: {detail}")
    if code == grpc.StatusCode.NOT_FOUND:
        return _unavailable(f"The Triton model `{model}` is not loaded: {detail}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(Fault.UPSTREAM_TIMEOUT, f"The Triton server did not answer in time: {detail}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return GatewayError(Fault.UPSTREAM_REJECTED, f"The Triton server rejected the request: {detail}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(
            Fault.UPSTREAM_RATE_LIMITED,
            f"The Triton server is out of capacity: {detail}",
            headers=(("retry-after", "1"),),
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return GatewayError(Fault.UPSTREAM_AUTH, "The Triton server rejected the gateway's credentials")
    return GatewayError(Fault.UPSTREAM_ERROR, f"The Triton server failed ({code.name}): {detail}")


def map_stream_error(message: str, model: str) -> GatewayError:
    """An error carried inside a `ModelStreamInfer` response (the RPC itself is fine)."""
    detail = message[:500]
    if _not_loaded(message):
        return _unavailable(f"The Triton model `{model}` is not loaded: {detail}")
    return GatewayError(Fault.UPSTREAM_ERROR, f"The Triton model `{model}` failed: {detail}")


class TritonStream:
    """One `ModelStreamInfer` call: parsed responses, None at the end."""

    __slots__ = ("_call",)

    def __init__(self, call: StreamCall) -> None:
        self._call = call

    async def read(self) -> Any:
        raw = await self._call.read()
        return None if raw is None else pb.ModelStreamInferResponse.FromString(raw)

    def cancel(self) -> None:
        self._call.cancel()


class TritonAdapter:
    """One Triton server. The public-model settings (chat template, stops) live per route."""

    kind = "triton"
    __slots__ = (
        "_embedding",
        "_metadata",
        "_models",
        "connect_timeout_s",
        "first_byte_timeout_s",
        "idle_timeout_s",
        "loop",
        "max_response_bytes",
        "name",
        "provider",
        "total_timeout_s",
        "transport",
        "worker",
    )

    def __init__(self, provider: TritonProvider, worker: Worker) -> None:
        url = urlsplit(provider.base_url)
        self.worker = worker
        self.loop = worker.loop
        self.provider = provider
        self.name = provider.name
        self.connect_timeout_s = provider.connect_timeout_ms / 1000
        self.first_byte_timeout_s = provider.first_byte_timeout_ms / 1000
        self.idle_timeout_s = provider.idle_timeout_ms / 1000
        self.total_timeout_s = provider.total_timeout_ms / 1000
        self.max_response_bytes = provider.max_response_bytes
        meta = [(k.lower(), v) for k, v in provider.headers.items()]
        if provider.api_key:
            meta.append(("authorization", f"Bearer {provider.api_key}"))
        self._metadata = tuple(meta)
        #: request builders by (Triton model, the route's mapping config)
        self._models: dict[tuple[str, int], _Cached] = {}
        #: embedding models' contracts from their metadata: model -> (shape, when read)
        self._embedding: dict[str, tuple[EmbeddingShape, float]] = {}
        roots = None
        if provider.tls_ca_file:
            with open(provider.tls_ca_file, "rb") as f:
                roots = f.read()
        options = (*_CHANNEL_OPTIONS, ("grpc.max_receive_message_length", self.max_response_bytes))
        tls = url.scheme == "grpcs"
        self.transport: Transport
        if provider.transport is GrpcTransportKind.GRPCIO:
            self.transport = GrpcioTransport(url.netloc, tls=tls, root_certificates=roots, options=options)
        else:  # h2, the default: in-loop, no threads (benchmarks/results/2026-11-23-triton-stream.md)
            self.transport = H2Transport(
                url.netloc, tls=tls, root_certificates=roots, max_message_bytes=self.max_response_bytes
            )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def unary(self, method: str, request: Any, response_type: Any, timeout_s: float) -> Any:
        """One unary RPC with protobuf messages. Raises RpcError."""
        raw = await self.transport.unary(method, request.SerializeToString(), timeout_s, self._metadata)
        return response_type.FromString(raw)

    async def _model_metadata(self, model: str) -> Any:
        """`model`'s ModelMetadata (its inputs and outputs), for the chat builders and the embedding
        shapes alike; a failure forgets what is cached of the model (it is re-read next time)."""
        try:
            return await self.unary(
                "ModelMetadata",
                pb.ModelMetadataRequest(name=model),
                pb.ModelMetadataResponse,
                self.connect_timeout_s,
            )
        except RpcError as exc:
            self.forget(model)
            raise map_rpc_error(exc, model) from None

    async def builder(self, model: str, cfg: TritonModelConfig) -> TritonRequestBuilder:
        """The request builder for `model`, from its metadata (cached; one RPC per minute)."""
        now = time.monotonic()
        key = (model, id(cfg))  # two public models may map one Triton model differently
        cached = self._models.get(key)
        if cached is not None and now - cached.at < _METADATA_TTL_S:
            return cached.builder
        meta = await self._model_metadata(model)
        builder = TritonRequestBuilder(
            model, cfg, {t.name for t in meta.inputs}, {t.name for t in meta.outputs}
        )
        self._models[key] = _Cached(builder, now)
        return builder

    async def embedding_shape(self, model: str, cfg: EmbeddingModelConfig) -> EmbeddingShape:
        """An embedding model's vector size and token-count output, from its metadata (cached
        like the chat builders)."""
        now = time.monotonic()
        cached = self._embedding.get(model)
        if cached is not None and now - cached[1] < _METADATA_TTL_S:
            return cached[0]
        meta = await self._model_metadata(model)
        shape = shape_from_metadata(model, meta, cfg)
        self._embedding[model] = (shape, now)
        return shape

    def forget(self, model: str) -> None:
        """Drop cached metadata (the model went away; re-read it next time)."""
        for key in [k for k in self._models if k[0] == model]:
            del self._models[key]
        self._embedding.pop(model, None)

    def stream(
        self, request: Any, deadline_s: float, extra: tuple[tuple[str, str], ...] = ()
    ) -> TritonStream:
        """Start one `ModelStreamInfer` call carrying `request`; the client side half-closes
        after it, so the RPC ends once the request is complete."""
        call = self.transport.stream(
            "ModelStreamInfer", request.SerializeToString(), deadline_s, self._metadata + extra
        )
        return TritonStream(call)

    async def start(
        self, ctx: RequestContext, target: Deployment, body: bytes, deadline: float
    ) -> TritonCall | RichTritonCall | EmbeddingCall:
        """`body` is unused: Triton gets tensors built from the client's request."""
        view = ctx.view
        assert view is not None
        if isinstance(view, EmbeddingsRequestView):  # a unary ModelInfer (triton_embed.py)
            return await start_embedding(self, ctx, target, deadline)
        builder = await self.builder(target.upstream_model, target.triton)
        plan = builder.plan(view, ctx.body, ctx.request_id, ctx.stream, priority=ctx.priority)
        trace = ctx.trace
        extra = () if trace is None else trace.upstream_headers()
        left = max(deadline - self.loop.time(), 0.001)
        if plan.rich:  # n choices, tool calls, log probs (triton_rich.py)
            streams = [self.stream(r, left, extra) for r in plan.requests]
            return RichTritonCall(ctx, self, streams, plan, target.upstream_model)
        call = self.stream(plan.requests[0], left, extra)
        return TritonCall(ctx, self, call, plan.stops, plan.max_tokens, target.upstream_model)

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        """Readiness: the server, then each model routed to it."""
        models = sorted(
            {
                d.upstream_model
                for r in self.worker.routes.values()
                for d in r.deployments
                if d.adapter is self
            }
        )
        try:
            live = await self.unary("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, timeout_s)
            if not live.ready:
                return {"ready": False, "detail": "Triton server not ready"}
            answers = await asyncio.gather(
                *(
                    self.unary("ModelReady", pb.ModelReadyRequest(name=m), pb.ModelReadyResponse, timeout_s)
                    for m in models
                )
            )
        except RpcError as exc:
            return {"ready": False, "detail": f"{exc.code.name}: {exc.details[:200]}"}
        states = {m: a.ready for m, a in zip(models, answers, strict=True)}
        return {"ready": all(states.values()), "detail": "Triton", "models": states}

    async def check(self, model: str | None, path: str, timeout_s: float) -> tuple[bool, str]:
        """Active health check (routing.health): the server's readiness, then `model`'s, over
        the channel the calls use (`path` is the HTTP kinds'). A model not ready loses its cached
        metadata: a reload may change its inputs."""
        deadline = self.loop.time() + timeout_s
        try:
            server = await self.unary(
                "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, timeout_s
            )
            if not server.ready:
                return False, "Triton server not ready"
            if model is None:
                return True, "Triton server ready"
            left = max(deadline - self.loop.time(), 0.001)
            answer = await self.unary(
                "ModelReady", pb.ModelReadyRequest(name=model), pb.ModelReadyResponse, left
            )
        except RpcError as exc:
            return False, f"{exc.code.name}: {exc.details[:200]}"
        if not answer.ready:
            self.forget(model)
            return False, f"model {model!r} not ready"
        return True, "ready"

    async def close(self) -> None:
        await self.transport.close()
