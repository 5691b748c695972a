"""Triton Python-backend model `minilm_embed`: sentence embeddings for `POST /v1/embeddings`.

Input `text` (BYTES, dims [-1]: all of one request's texts); outputs `embedding` (FP32,
[-1, 384], unit L2 norm: mean pooling then normalisation, as sentence-transformers does) and
`num_tokens` (INT32, [-1]: word pieces per text incl. [CLS]/[SEP], after truncation to 256; the
gateway reports it as usage). The encoder is the prompt guard's numpy all-MiniLM-L6-v2
(`../../prompt_guard/1/minilm.py`, imported from there so there is one copy of the forward pass).
Texts run in micro-batches of similar length (config parameter `micro_batch`), so one long text
does not pad a whole batch; the outputs keep the input order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "prompt_guard" / "1"))

from batching import decode_items  # noqa: E402
from minilm import MODEL_NAME, MiniLM  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        t0 = time.perf_counter()
        params = json.loads(args["model_config"]).get("parameters", {})
        self.micro_batch = max(1, int(params.get("micro_batch", {}).get("string_value", "32")))
        self.encoder = MiniLM()
        self.encoder.embed(["warm-up"])
        pb_utils.Logger.log_info(
            f"minilm_embed: loaded {MODEL_NAME} in {time.perf_counter() - t0:.3f} s "
            f"(micro-batches of {self.micro_batch})"
        )

    @staticmethod
    def _texts(request: pb_utils.InferenceRequest) -> list[str]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        if tensor is None:
            raise ValueError("missing input 'text'")
        arr = tensor.as_numpy()
        if arr.ndim != 1:
            raise ValueError(f"input 'text' must have shape [n], got {list(arr.shape)}")
        return decode_items(arr)

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.encoder
        dim = enc.dim
        out = np.zeros((len(texts), dim), dtype=np.float32)
        counts = np.zeros((len(texts),), dtype=np.int32)
        if not texts:
            return out, counts
        ids, mask = enc.tokenize(texts)  # once, padded to the longest text
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")  # similar lengths share a micro-batch
        for start in range(0, len(order), self.micro_batch):
            idx = order[start : start + self.micro_batch]
            width = int(lengths[idx].max())  # cut the padding this micro-batch does not need
            sub_mask = mask[idx, :width]
            tokens = enc.forward(ids[idx, :width], sub_mask)
            m = sub_mask.astype(np.float32)[:, :, None]
            pooled = (tokens * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
            norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
            out[idx] = pooled / norms
        counts[:] = lengths
        return out, counts

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses = []
        for req in requests:  # max_batch_size 0: requests are not merged; each fails alone
            try:
                emb, counts = self._embed(self._texts(req))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"minilm_embed: {e}")))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("embedding", emb), pb_utils.Tensor("num_tokens", counts)]
                )
            )
        return responses

    def finalize(self) -> None:
        self.encoder = None
