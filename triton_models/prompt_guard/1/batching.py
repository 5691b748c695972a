"""The dynamic-batch plumbing of the embedding classifiers (prompt_guard, toxicity_guard, request_router).

Each request of a batch is parsed alone (a bad one fails alone, never the batch), every text of the
batch is scored in one forward pass, and each request gets its slice back as `score` (FP32) and
`label` (BYTES, by the trained threshold). One copy, imported from this folder by each model.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def decode_texts(arr: np.ndarray) -> list[str]:
    """A `text` input of shape [batch, 1] (BYTES) as str."""
    if arr.ndim != 2 or arr.shape[1] != 1:
        raise ValueError(f"input 'text' must have shape [batch, 1], got {list(arr.shape)}")
    return decode_items(arr.reshape(-1))


def decode_items(items: np.ndarray) -> list[str]:
    """The items of a BYTES `text` input as str; invalid UTF-8 is replaced, never fatal."""
    out = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item.decode("utf-8", errors="replace"))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise ValueError(f"input 'text' must be BYTES, got {type(item).__name__}")
    return out


def classify_batch(
    requests: list[pb_utils.InferenceRequest],
    parse: Callable[[pb_utils.InferenceRequest], tuple[list[str], Any]],
    score: Callable[[list[str], list[Any]], np.ndarray],
    labels: tuple[str, str, float],
    name: str,
) -> list[pb_utils.InferenceResponse]:
    """`parse` gives a request's texts and its extra inputs; `score` maps all texts (and the extras,
    in request order) to one float32 score each; `labels` is (positive, negative, threshold)."""
    pos, neg, threshold = labels
    responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
    spans: list[tuple[int, int, int]] = []  # (request index, start, end) into `texts`
    texts: list[str] = []
    extras: list[Any] = []
    for i, req in enumerate(requests):
        try:
            items, extra = parse(req)
        except Exception as e:  # a bad request fails alone, never the batch
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
            continue
        spans.append((i, len(texts), len(texts) + len(items)))
        texts.extend(items)
        extras.append(extra)
    if texts:
        try:
            scores = score(texts, extras)
        except Exception as e:
            err = pb_utils.TritonError(f"{name} inference failed: {e}")
            for i, _, _ in spans:
                responses[i] = pb_utils.InferenceResponse(error=err)
            return responses
        for i, start, end in spans:
            s = scores[start:end].reshape(-1, 1)
            out = np.array([[(pos if v >= threshold else neg).encode()] for v in s[:, 0]], dtype=np.object_)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("score", s), pb_utils.Tensor("label", out)]
            )
    return responses
