"""`/v1/embeddings` on a Triton route: one unary `ModelInfer` on the adapter's channel.

Embedding models are not decoupled (triton_models/minilm_embed: `max_batch_size: 0`), so unlike
generation this is a plain unary call: all of the client's texts in one BYTES [n] tensor, the
vectors back as one FP32 [n, dim] tensor, and optionally an INT32 [n] token count per text
(usage). The RPC runs inside `start`, so the dispatcher's retries, fallbacks and breaker cover it;
`body` only formats the reply (float JSON or base64 straight from the tensor bytes).

What the model cannot do is refused before the call with a 400 naming the parameter: token-id
inputs (the model tokenizes text itself; the ids are another tokenizer's) and a `dimensions`
other than the model's own (its vectors are not trained to be shortened).
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

from tritonclient.grpc import service_pb2 as pb

from .. import embeddings
from ..config import EmbeddingModelConfig
from ..errors import Fault, GatewayError
from ..schemas import EmbeddingsRequestView, Usage
from .grpc_transport import RpcError

if TYPE_CHECKING:
    from ..context import RequestContext
    from ..routing.deployment import Deployment
    from .triton_grpc import TritonAdapter

_InferInput = pb.ModelInferRequest.InferInputTensor
_Requested = pb.ModelInferRequest.InferRequestedOutputTensor


class EmbeddingShape:
    """What a model's metadata says about its embedding contract (cached by the adapter)."""

    __slots__ = ("dim", "tokens")

    def __init__(self, dim: int, tokens: bool) -> None:
        self.dim = dim
        #: the model has the configured token-count output
        self.tokens = tokens


def shape_from_metadata(model: str, meta: Any, cfg: EmbeddingModelConfig) -> EmbeddingShape:
    """Check the configured tensors against the model's metadata; a mismatch is an upstream
    fault that names what is missing (a config or model error, not the client's)."""
    inputs = {t.name for t in meta.inputs}
    outputs = {t.name: list(t.shape) for t in meta.outputs}
    if cfg.input not in inputs or cfg.output not in outputs:
        raise GatewayError(
            Fault.UPSTREAM_BAD_RESPONSE,
            f"The Triton model `{model}` has no input `{cfg.input}` or output `{cfg.output}`"
            f" (inputs: {', '.join(sorted(inputs))}; outputs: {', '.join(sorted(outputs))}).",
        )
    dims = outputs[cfg.output]
    dim = int(dims[-1]) if dims else -1
    return EmbeddingShape(dim, bool(cfg.tokens_output) and cfg.tokens_output in outputs)


async def start_embedding(
    adapter: TritonAdapter, ctx: RequestContext, target: Deployment, deadline: float
) -> EmbeddingCall:
    view = ctx.view
    assert isinstance(view, EmbeddingsRequestView) and ctx.route is not None
    owner = target.owner
    cfg = (owner.embedding if owner is not None else None) or EmbeddingModelConfig()
    model = target.upstream_model
    texts = embeddings.text_inputs(view)
    if texts is None:
        raise GatewayError(
            Fault.UNSUPPORTED_PARAMETER,
            f"The model `{ctx.route.name}` takes text inputs: token id arrays are not supported.",
            param="input",
        )
    shape = await adapter.embedding_shape(model, cfg)
    if view.dimensions is not None and view.dimensions != shape.dim:
        raise GatewayError(
            Fault.UNSUPPORTED_PARAMETER,
            f"The model `{ctx.route.name}` returns {shape.dim} dimensions and cannot shorten them;"
            f" omit `dimensions` (or send {shape.dim}).",
            param="dimensions",
        )
    n = len(texts)
    outputs = [_Requested(name=cfg.output)]
    if shape.tokens:
        outputs.append(_Requested(name=cfg.tokens_output))
    request = pb.ModelInferRequest(
        model_name=model,
        id=ctx.request_id,
        inputs=[_InferInput(name=cfg.input, datatype="BYTES", shape=(n,))],
        outputs=outputs,
        raw_input_contents=[b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in texts))],
    )
    trace = ctx.trace
    metadata = adapter.metadata if trace is None else adapter.metadata + trace.upstream_headers()
    t0 = time.perf_counter_ns()
    try:
        raw = await adapter.transport.unary(
            "ModelInfer", request.SerializeToString(), max(deadline - adapter.loop.time(), 0.001), metadata
        )
    except RpcError as exc:
        from .triton_grpc import map_rpc_error

        err = map_rpc_error(exc, model)
        if err.fault is Fault.UPSTREAM_UNAVAILABLE:
            adapter.forget(model)  # reloaded or gone: read its metadata again next time
        raise err from None
    ctx.timings["upstream_head"] = time.perf_counter_ns() - t0
    resp = pb.ModelInferResponse.FromString(raw)
    vectors, tokens = _outputs(resp, cfg, model, n)
    if tokens is None:
        tokens = embeddings.count_tokens(view, ctx.route.encoding)
    return EmbeddingCall(ctx.route.name, vectors, n, view.encoding_format, tokens)


def _outputs(
    resp: Any, cfg: EmbeddingModelConfig, model: str, n: int
) -> tuple[tuple[bytes, int], int | None]:
    """((raw FP32 bytes, dim), summed token count or None) from the response tensors."""
    raws = resp.raw_output_contents
    vectors: tuple[bytes, int] | None = None
    tokens: int | None = None
    for i, out in enumerate(resp.outputs):
        raw = raws[i] if i < len(raws) else b""
        if out.name == cfg.output:
            shape = list(out.shape)
            if out.datatype != "FP32" or len(shape) != 2 or shape[0] != n or len(raw) != 4 * n * shape[1]:
                raise GatewayError(
                    Fault.UPSTREAM_BAD_RESPONSE,
                    f"The Triton model `{model}` returned `{cfg.output}` as {out.datatype} {shape}"
                    f" ({len(raw)} bytes); expected FP32 [{n}, dim].",
                )
            vectors = (raw, int(shape[1]))
        elif out.name == cfg.tokens_output and out.datatype == "INT32" and len(raw) == 4 * n:
            tokens = sum(struct.unpack(f"<{n}i", raw))
    if vectors is None:
        raise GatewayError(
            Fault.UPSTREAM_BAD_RESPONSE, f"The Triton model `{model}` returned no `{cfg.output}` output."
        )
    return vectors, tokens


class EmbeddingCall:
    """An answered embeddings call as an `UpstreamCall` (unary only: the relay never streams
    `/v1/embeddings`, `ctx.stream` is always false there)."""

    __slots__ = ("_dim", "_fmt", "_model", "_n", "_raw", "_tokens")

    def __init__(self, model: str, vectors: tuple[bytes, int], n: int, fmt: str | None, tokens: int) -> None:
        self._model = model
        self._raw, self._dim = vectors
        self._n = n
        self._fmt = fmt
        self._tokens = tokens

    async def first(self, deadline: float) -> bytes:
        raise AssertionError("embeddings are unary")

    async def next(self, deadline: float) -> bytes | None:
        raise AssertionError("embeddings are unary")

    def finish(self) -> tuple[bytes, GatewayError | None]:
        raise AssertionError("embeddings are unary")

    async def body(self, deadline: float) -> bytes:
        return embeddings.reply_from_tensor(
            self._model, self._raw, self._n, self._dim, self._fmt, self._tokens
        )

    def usage(self) -> Usage:
        return Usage(self._tokens, 0, self._tokens)

    @property
    def completion_text(self) -> str:
        return ""

    @property
    def generated_tokens(self) -> int | None:
        return None

    def abort(self) -> None:
        pass

    def release(self) -> None:
        pass
