"""The training recipe the three classifiers share (prompt_guard, toxicity_guard, request_router).

One copy of the fit, the metrics, the group-hash split, the lambda search and the report table, so
the models are trained and reported the same way; each model's train.py keeps only its own data,
labels and report. Imported by the train scripts with this folder on `sys.path`. Float64 throughout
and no randomness: the same data gives byte-identical weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

#: held out: sha256(group) % 100 < TEST_PERCENT; grouped CV folds on the training part
TEST_PERCENT = 25
FOLDS = 5
LAMBDAS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TABLE_HEAD = (
    "| set | n | accuracy | precision | recall | F1 | ROC AUC | TP | FP | FN | TN |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


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


def load_set(path: Path, positive: str, negative: str) -> tuple[bytes, list[dict[str, Any]], np.ndarray]:
    """The raw bytes (hashed into the weights file), the rows, and y (1 = `positive`)."""
    raw = path.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    if {r["label"] for r in rows} - {positive, negative}:
        raise SystemExit(f"labels must be {negative!r} or {positive!r}")
    return raw, rows, np.array([1 if r["label"] == positive else 0 for r in rows])


def embed_all(enc: Any, texts: Sequence[str]) -> tuple[np.ndarray, float]:
    """All texts embedded 32 at a time, similar lengths per batch (less padding); and the seconds taken."""
    t0 = time.perf_counter()
    order = np.argsort([len(t) for t in texts], kind="stable")
    emb = np.zeros((len(texts), enc.dim), dtype=np.float32)
    for i in range(0, len(texts), 32):
        idx = order[i : i + 32]
        emb[idx] = enc.embed([texts[j] for j in idx])
    return emb, time.perf_counter() - t0


def group_split(
    groups: Sequence[str], test_percent: int, folds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test, train, fold) by a hash of each group: near-duplicates never straddle a split."""
    test = np.array([bucket(g) < test_percent for g in groups])
    fold = np.array([bucket("fold:" + g, folds) for g in groups])
    return test, ~test, fold


def select_lambda(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, fold: np.ndarray, folds: int, at: float, column: str
) -> tuple[float, np.ndarray, list[tuple[float, float, float | int]]]:
    """Grouped CV on the training part: the L2 strength with the lowest out-of-fold log-loss, its
    out-of-fold scores, and the table (lambda, log-loss, metrics(at)[column]) for the report."""
    best_lam, best_loss, best_oof = LAMBDAS[0], float("inf"), np.zeros(0)
    cv_table = []
    for lam in LAMBDAS:
        oof = np.zeros(len(y))
        for k in range(folds):
            tr, va = train & (fold != k), train & (fold == k)
            w, b = fit_logreg(x[tr], y[tr], lam)
            oof[va] = sigmoid(x[va] @ w + b)
        p = np.clip(oof[train], 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y[train] * np.log(p) + (1 - y[train]) * np.log(1 - p)))
        cv_table.append((lam, round(loss, 4), metrics(y[train], oof[train], at)[column]))
        if loss < best_loss:
            best_lam, best_loss, best_oof = lam, loss, oof
    return best_lam, best_oof, cv_table


def misses(test: np.ndarray, score: np.ndarray, y: np.ndarray, thr: float) -> list[int]:
    """Held-out rows the classifier gets wrong at `thr`."""
    return [int(i) for i in np.flatnonzero(test) if (score[i] >= thr) != (y[i] == 1)]


def provenance(data: Path, here: Path, raw: bytes, test_percent: int) -> dict[str, str]:
    return {
        "trained_at": dt.date.today().isoformat(),
        "dataset": str(data.relative_to(here)),
        "dataset_sha256": hashlib.sha256(raw).hexdigest(),
        "split": f"sha256(group) % 100 < {test_percent} -> held out",
    }


def counts(
    train: np.ndarray, test: np.ndarray, y: np.ndarray, groups: Sequence[str], positive: str
) -> dict[str, int]:
    return {
        "train": int(train.sum()),
        "test": int(test.sum()),
        f"train_{positive}": int(y[train].sum()),
        f"test_{positive}": int(y[test].sum()),
        "groups": len(set(groups)),
    }


def table_row(name: str, m: dict[str, float | int]) -> str:
    return (
        f"| {name} | {m['n']} | {m['accuracy']:.4f} | {m['precision']:.4f} | {m['recall']:.4f} "
        f"| {m['f1']:.4f} | {m['roc_auc']:.4f} | {m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} |"
    )


def confusion(held: dict[str, float | int], positive: str, negative: str) -> list[str]:
    return [
        f"Positive class = {positive}. Confusion matrix on the held-out set at the threshold:",
        "",
        f"| | predicted {positive} | predicted {negative} |",
        "|---|---|---|",
        f"| actual {positive} | {held['tp']} | {held['fn']} |",
        f"| actual {negative} | {held['fp']} | {held['tn']} |",
    ]


class Labelled(NamedTuple):
    """A labelled set, embedded and split."""

    raw: bytes
    rows: list[dict[str, Any]]
    y: np.ndarray
    texts: list[str]
    groups: list[str]
    emb: np.ndarray
    embed_s: float
    test: np.ndarray
    train: np.ndarray
    fold: np.ndarray


def load_embedded(
    path: Path, positive: str, negative: str, enc: Any, test_percent: int, folds: int
) -> Labelled:
    raw, rows, y = load_set(path, positive, negative)
    texts = [r["text"] for r in rows]
    groups = [r["group"] for r in rows]
    emb, embed_s = embed_all(enc, texts)
    return Labelled(raw, rows, y, texts, groups, emb, embed_s, *group_split(groups, test_percent, folds))


class GuardFit(NamedTuple):
    """A guard's fit: lambda by CV log-loss, the threshold by F-beta out of fold, the training part fit."""

    lam: float
    cv_table: list[tuple[float, float, float | int]]
    thr: float
    cv: dict[str, float | int]
    w: np.ndarray
    b: float
    score: np.ndarray
    held: dict[str, float | int]
    held_05: dict[str, float | int]
    train: dict[str, float | int]


def fit_guard(x: np.ndarray, d: Labelled, folds: int, beta: float) -> GuardFit:
    y, train, test = d.y, d.train, d.test
    lam, oof, cv_table = select_lambda(x, y, train, d.fold, folds, 0.5, "f1")
    thr = fbeta_threshold(y[train], oof[train], beta)
    cv = metrics(y[train], oof[train], thr)
    w, b = fit_logreg(x[train], y[train], lam)
    score = sigmoid(x @ w + b)
    held = metrics(y[test], score[test], thr)
    held_05 = metrics(y[test], score[test], 0.5)
    return GuardFit(lam, cv_table, thr, cv, w, b, score, held, held_05, metrics(y[train], score[train], thr))


def guard_weights(
    model_name: str,
    enc: Any,
    labels: tuple[str, str],
    f: GuardFit,
    rule: str,
    d: Labelled,
    here: Path,
    data: Path,
    test_percent: int,
) -> dict[str, Any]:
    """The weights file a guard model loads (`1/classifier.json`); `labels` is (positive, negative)."""
    return {
        "embedding_model": model_name,
        "embedding_dim": enc.dim,
        "max_seq_len": enc.max_seq_len,
        "positive_label": labels[0],
        "negative_label": labels[1],
        "weights": [float(v) for v in f.w],
        "bias": f.b,
        "threshold": round(f.thr, 6),
        "l2_lambda": f.lam,
        "threshold_rule": rule,
        **provenance(data, here, d.raw, test_percent),
        "counts": counts(d.train, d.test, d.y, d.groups, labels[0]),
        "metrics": {
            "held_out": f.held,
            "held_out_at_0.5": f.held_05,
            "cv_out_of_fold": f.cv,
            "train": f.train,
        },
    }


def guard_table(f: GuardFit) -> list[str]:
    return [
        *TABLE_HEAD,
        table_row("held out (threshold)", f.held),
        table_row("held out (0.5)", f.held_05),
        table_row("train CV, out of fold", f.cv),
        table_row("train (fit)", f.train),
    ]


def set_summary(d: Labelled, lam: float, out: dict[str, Any], noun: str, folds: int) -> list[str]:
    """The report's dataset, split and classifier lines (`noun`: what a row is, e.g. "prompts")."""
    pos, neg = out["positive_label"], out["negative_label"]
    y, train, test = d.y, d.train, d.test
    return [
        f"- dataset: `{out['dataset']}`, {len(d.rows)} {noun} ({int(y.sum())} {pos}, "
        f"{int(len(y) - y.sum())} {neg}) in {len(set(d.groups))} groups, sha256 `{out['dataset_sha256']}`",
        f"- split by group: {int(train.sum())} train / {int(test.sum())} held out "
        f"({int(y[test].sum())} {pos}, {int(test.sum() - y[test].sum())} {neg})",
        f"- classifier: class-balanced logistic regression, L2 lambda {lam:g} (grouped {folds}-fold CV "
        f"log-loss), Newton's method",
    ]


def lambda_table(cv_table: list[tuple[float, float, float | int]], column: str) -> list[str]:
    return [
        f"CV over lambda (out-of-fold log-loss, {column}):",
        "",
        f"| lambda | log-loss | {column.split()[0]} |",
        "|---|---|---|",
        *[f"| {lam:g} | {loss} | {v} |" for lam, loss, v in cv_table],
    ]


def train_guard(
    model_name: str, enc: Any, data: Path, here: Path, labels: tuple[str, str], beta: float
) -> tuple[Labelled, GuardFit, dict[str, Any]]:
    """A guard's whole fit: the set embedded and split, lambda and threshold by grouped CV, the
    training part fit; and its weights file's content."""
    d = load_embedded(data, labels[0], labels[1], enc, TEST_PERCENT, FOLDS)
    f = fit_guard(d.emb.astype(np.float64), d, FOLDS, beta)
    rule = f"max F{beta:g} on grouped {FOLDS}-fold out-of-fold training scores"
    return d, f, guard_weights(model_name, enc, labels, f, rule, d, here, data, TEST_PERCENT)
