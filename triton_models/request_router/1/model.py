"""Triton Python-backend model `request_router`: is a request simple or hard (for the planner)?

Inputs `text` (BYTES, dims [1]: the prompt text, all messages joined by newlines) and `features`
(FP32, dims [4]: prompt tokens as the gateway estimates them, a code fence (0/1), tools in the
request (0/1), turns; `features.py`); outputs `score` (FP32, dims [1], P(hard)) and `label`
(BYTES, dims [1], "hard" or "simple" by the trained threshold). All requests of a dynamic batch
are embedded in one forward pass; a bad request fails alone. The encoder is the prompt guard's
numpy all-MiniLM-L6-v2 (`../../prompt_guard/1/minilm.py`, one copy of the forward pass).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "prompt_guard" / "1"))

from features import NAMES, RAW, transform  # noqa: E402
from minilm import MODEL_NAME, MiniLM  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        t0 = time.perf_counter()
        params = json.loads(args["model_config"]).get("parameters", {})
        rel = params.get("classifier_path", {}).get("string_value", "classifier.json")
        path = Path(rel) if Path(rel).is_absolute() else HERE / rel
        clf = json.loads(path.read_text())
        if clf.get("embedding_model") != MODEL_NAME:
            raise ValueError(f"{path}: trained on {clf.get('embedding_model')!r}, not {MODEL_NAME!r}")
        if tuple(clf.get("features", ())) != NAMES:
            raise ValueError(f"{path}: features {clf.get('features')}, expected {list(NAMES)}")
        self.w = np.asarray(clf["weights"], dtype=np.float64)
        self.b = float(clf["bias"])
        self.mean = np.asarray(clf["feature_mean"], dtype=np.float64)
        self.std = np.asarray(clf["feature_std"], dtype=np.float64)
        self.threshold = float(clf["threshold"])
        self.pos, self.neg = str(clf["positive_label"]), str(clf["negative_label"])
        self.encoder = MiniLM(max_seq_len=int(clf.get("max_seq_len", 256)))
        if self.w.shape != (self.encoder.dim + len(NAMES),):
            raise ValueError(f"{path}: {self.w.shape[0]} weights, expected {self.encoder.dim + len(NAMES)}")
        self.encoder.embed(["warm-up"])
        pb_utils.Logger.log_info(
            f"request_router: loaded {MODEL_NAME} + {path.name} (threshold {self.threshold}, "
            f"dataset {str(clf.get('dataset_sha256', ''))[:12]}) in {time.perf_counter() - t0:.3f} s"
        )

    @staticmethod
    def _inputs(request: pb_utils.InferenceRequest) -> tuple[list[str], np.ndarray]:
        text = pb_utils.get_input_tensor_by_name(request, "text")
        feats = pb_utils.get_input_tensor_by_name(request, "features")
        if text is None or feats is None:
            raise ValueError("inputs 'text' and 'features' are required")
        arr, f = text.as_numpy(), feats.as_numpy()
        if arr.ndim != 2 or arr.shape[1] != 1:
            raise ValueError(f"input 'text' must have shape [batch, 1], got {list(arr.shape)}")
        if f.shape != (arr.shape[0], len(RAW)):
            raise ValueError(f"input 'features' must have shape [batch, {len(RAW)}], got {list(f.shape)}")
        texts = []
        for item in arr.reshape(-1):
            if not isinstance(item, bytes | str):
                raise ValueError(f"input 'text' must be BYTES, got {type(item).__name__}")
            texts.append(item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item)
        return texts, np.array([transform([float(v) for v in row]) for row in f], dtype=np.float64)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        spans: list[tuple[int, int, int]] = []
        texts: list[str] = []
        feats: list[np.ndarray] = []
        for i, req in enumerate(requests):
            try:
                t, f = self._inputs(req)
            except Exception as e:  # a bad request fails alone, never the batch
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            spans.append((i, len(texts), len(texts) + len(t)))
            texts.extend(t)
            feats.append(f)
        if texts:
            try:
                emb = self.encoder.embed(texts).astype(np.float64)
                x = np.hstack([emb, (np.vstack(feats) - self.mean) / self.std])
                scores = (1.0 / (1.0 + np.exp(-(x @ self.w + self.b)))).astype(np.float32)
            except Exception as e:
                err = pb_utils.TritonError(f"request_router inference failed: {e}")
                for i, _, _ in spans:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            for i, start, end in spans:
                s = scores[start:end].reshape(-1, 1)
                labels = np.array(
                    [[(self.pos if v >= self.threshold else self.neg).encode()] for v in s[:, 0]],
                    dtype=np.object_,
                )
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("score", s), pb_utils.Tensor("label", labels)]
                )
        return responses

    def finalize(self) -> None:
        self.encoder = None
