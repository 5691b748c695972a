"""Triton Python-backend model `request_router`: is a request simple or hard (for the planner)?

Inputs `text` (BYTES, dims [1]: the prompt text, all messages joined by newlines) and `features`
(FP32, dims [4]: prompt tokens as the gateway estimates them, a code fence (0/1), tools in the
request (0/1), turns; `features.py`); outputs `score` (FP32, dims [1], P(hard)) and `label`
(BYTES, dims [1], "hard" or "simple" by the trained threshold). All requests of a dynamic batch
are embedded in one forward pass; a bad request fails alone. The encoder and the batch plumbing
are the prompt guard's (`../../prompt_guard/1/minilm.py` and `batching.py`: one copy of each).
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

from batching import classify_batch, decode_texts  # noqa: E402
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
    def _parse(request: pb_utils.InferenceRequest) -> tuple[list[str], np.ndarray]:
        text = pb_utils.get_input_tensor_by_name(request, "text")
        feats = pb_utils.get_input_tensor_by_name(request, "features")
        if text is None or feats is None:
            raise ValueError("inputs 'text' and 'features' are required")
        arr, f = text.as_numpy(), feats.as_numpy()
        texts = decode_texts(arr)
        if f.shape != (arr.shape[0], len(RAW)):
            raise ValueError(f"input 'features' must have shape [batch, {len(RAW)}], got {list(f.shape)}")
        return texts, np.array([transform([float(v) for v in row]) for row in f], dtype=np.float64)

    def _score(self, texts: list[str], feats: list[np.ndarray]) -> np.ndarray:
        emb = self.encoder.embed(texts).astype(np.float64)
        x = np.hstack([emb, (np.vstack(feats) - self.mean) / self.std])
        return (1.0 / (1.0 + np.exp(-(x @ self.w + self.b)))).astype(np.float32)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        labels = (self.pos, self.neg, self.threshold)
        return classify_batch(requests, self._parse, self._score, labels, "request_router")

    def finalize(self) -> None:
        self.encoder = None
