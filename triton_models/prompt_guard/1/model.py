"""Triton Python-backend model `prompt_guard`: is a prompt a jailbreak / prompt-injection attempt?

Input `text` (BYTES, dims [1]); outputs `score` (FP32, dims [1], probability of an attack) and
`label` (BYTES, dims [1], "jailbreak" or "benign" by the trained threshold). All requests of a
dynamic batch are embedded in one forward pass. The classifier (1/classifier.json, written by
../train.py) is found through the model-config parameter `classifier_path`, relative to the
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

    def _texts(self, request: pb_utils.InferenceRequest) -> list[str]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        if tensor is None:
            raise ValueError("missing input 'text'")
        arr = tensor.as_numpy()
        if arr.ndim != 2 or arr.shape[1] != 1:
            raise ValueError(f"input 'text' must have shape [batch, 1], got {list(arr.shape)}")
        out = []
        for item in arr.reshape(-1):
            if isinstance(item, bytes):
                out.append(item.decode("utf-8", errors="replace"))
            elif isinstance(item, str):
                out.append(item)
            else:
                raise ValueError(f"input 'text' must be BYTES, got {type(item).__name__}")
        return out

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        spans: list[tuple[int, int, int]] = []  # (request index, start, end) into `texts`
        texts: list[str] = []
        for i, req in enumerate(requests):
            try:
                items = self._texts(req)
            except Exception as e:  # a bad request fails alone, never the batch
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            spans.append((i, len(texts), len(texts) + len(items)))
            texts.extend(items)
        if texts:
            try:
                emb = self.encoder.embed(texts).astype(np.float64)
                scores = (1.0 / (1.0 + np.exp(-(emb @ self.w + self.b)))).astype(np.float32)
            except Exception as e:
                err = pb_utils.TritonError(f"{self.name} inference failed: {e}")
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
