"""Triton Python-backend model `prompt_guard`: is a prompt a jailbreak / prompt-injection attempt?

Input `text` (BYTES, dims [1]); outputs `score` (FP32, dims [1], probability of an attack) and
`label` (BYTES, dims [1], "jailbreak" or "benign" by the trained threshold). All requests of a
dynamic batch are embedded in one forward pass (`batching.py`). The classifier (1/classifier.json,
written by ../train.py) is found through the model-config parameter `classifier_path`, relative to the
serving model's version folder: toxicity_guard links this file and loads its own weights.
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

from batching import classify_batch, decode_texts  # noqa: E402
from minilm import MODEL_NAME, MiniLM  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        t0 = time.perf_counter()
        self.logger = pb_utils.Logger
        cfg = json.loads(args["model_config"])
        params = cfg.get("parameters", {})
        rel = params.get("classifier_path", {}).get("string_value", "classifier.json")
        self.name = args["model_name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]  # not HERE: may be a link
        path = Path(rel) if Path(rel).is_absolute() else version_dir / rel
        clf = json.loads(path.read_text())
        if clf.get("embedding_model") != MODEL_NAME:
            raise ValueError(f"{path}: trained on {clf.get('embedding_model')!r}, not {MODEL_NAME!r}")
        self.w = np.asarray(clf["weights"], dtype=np.float64)
        self.b = float(clf["bias"])
        self.threshold = float(clf["threshold"])
        self.pos = str(clf.get("positive_label", "jailbreak"))
        self.neg = str(clf.get("negative_label", "benign"))
        self.encoder = MiniLM()
        if self.w.shape != (self.encoder.dim,):
            raise ValueError(f"{path}: {self.w.shape[0]} weights, expected {self.encoder.dim}")
        self.encoder.embed(["warm-up"])
        self.logger.log_info(
            f"{self.name}: loaded {MODEL_NAME} + {path.name} (threshold {self.threshold:.4f}, "
            f"dataset {str(clf.get('dataset_sha256', ''))[:12]}) in {time.perf_counter() - t0:.3f} s"
        )

    def _parse(self, request: pb_utils.InferenceRequest) -> tuple[list[str], None]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        if tensor is None:
            raise ValueError("missing input 'text'")
        return decode_texts(tensor.as_numpy()), None

    def _score(self, texts: list[str], _: list[None]) -> np.ndarray:
        emb = self.encoder.embed(texts).astype(np.float64)
        return (1.0 / (1.0 + np.exp(-(emb @ self.w + self.b)))).astype(np.float32)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        return classify_batch(
            requests, self._parse, self._score, (self.pos, self.neg, self.threshold), self.name
        )

    def finalize(self) -> None:
        self.encoder = None
