"""A classifier model on Triton (`text` BYTES [n, 1] + optional `features` FP32 [n, k] -> `score`
FP32 [n, 1]), scored one text at a time by its callers and batched here.

Concurrent calls in a worker are coalesced into one batched `ModelInfer` while a previous one is in
flight (no added wait when idle), so a busy worker sends batches, not a call each. Shared by the
stages that ask such a model (`guard`'s Triton guards, `planner`'s request router); a caller that
gave up (its own timeout) is left out of the next batch.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from tritonclient.grpc import service_pb2 as pb

from ..errors import Fault, GatewayError
from .grpc_transport import RpcError
from .triton_grpc import map_rpc_error

if TYPE_CHECKING:
    from .triton_grpc import TritonAdapter

_Item = tuple[bytes, tuple[float, ...], "asyncio.Future[float]"]


class TritonClassifier:
    """P(positive) for a text (and its `n_features` features) from `model`, coalescing callers."""

    __slots__ = ("_inflight", "_queue", "adapter", "max_batch", "model", "n_features", "timeout_s", "what")

    def __init__(
        self,
        adapter: TritonAdapter,
        model: str,
        timeout_ms: float,
        max_batch: int,
        n_features: int,
        what: str,
    ) -> None:
        self.adapter = adapter
        self.model = model
        self.timeout_s = timeout_ms / 1000
        self.max_batch = max_batch
        self.n_features = n_features
        #: names the model in errors ("guard model returned ...")
        self.what = what
        self._queue: list[_Item] = []
        self._inflight = False

    async def score(self, text: bytes, features: tuple[float, ...] = ()) -> float:
        fut: asyncio.Future[float] = self.adapter.loop.create_future()
        self._queue.append((text, features, fut))
        if not self._inflight:
            self._launch()
        return await fut

    def _launch(self) -> None:
        batch = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        self._inflight = True
        self.adapter.loop.create_task(self._run(batch))

    async def _run(self, batch: list[_Item]) -> None:
        try:
            live = [item for item in batch if not item[2].done()]  # waiters that timed out are gone
            if live:
                scores = await self._infer(live)
                for (_, _, f), s in zip(live, scores, strict=True):
                    if not f.done():
                        f.set_result(s)
        except Exception as exc:
            for _, _, f in batch:
                if not f.done():
                    f.set_exception(exc)
        finally:
            self._inflight = False
            if self._queue:
                self._launch()

    async def _infer(self, items: list[_Item]) -> list[float]:
        n, k = len(items), self.n_features
        tensor = pb.ModelInferRequest.InferInputTensor
        inputs = [tensor(name="text", datatype="BYTES", shape=(n, 1))]
        raw_inputs = [b"".join(struct.pack("<I", len(t)) + t for t, _, _ in items)]
        if k:
            inputs.append(tensor(name="features", datatype="FP32", shape=(n, k)))
            raw_inputs.append(struct.pack(f"<{k * n}f", *(v for _, f, _ in items for v in f)))
        request = pb.ModelInferRequest(
            model_name=self.model,
            inputs=inputs,
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="score")],
            raw_input_contents=raw_inputs,
        )
        try:
            resp = await self.adapter.unary("ModelInfer", request, pb.ModelInferResponse, self.timeout_s)
        except RpcError as exc:
            raise map_rpc_error(exc, self.model) from None
        raw = resp.raw_output_contents[0] if resp.raw_output_contents else b""
        if len(raw) != 4 * n:
            raise GatewayError(
                Fault.UPSTREAM_BAD_RESPONSE, f"{self.what} model returned {len(raw)} bytes for {n}"
            )
        return list(struct.unpack(f"<{n}f", raw))
