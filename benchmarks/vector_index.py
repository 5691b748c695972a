"""Embedded vector indexes for the retrieval stage (issue 18): insert and query latency at
10k x 384-d (all-MiniLM-L6-v2's width), cosine / inner product on unit vectors, top 5.

Compares a plain numpy matrix (exact), usearch (HNSW and exact), sqlite-vec (vec0, exact).
`python benchmarks/vector_index.py [N] [DIM]` prints a Markdown table.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

K = 5
QUERIES = 200


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_queries(q: np.ndarray, fn: Callable[[np.ndarray], object]) -> tuple[float, float]:
    lat = []
    for v in q:
        t = time.perf_counter()
        fn(v)
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    data, q = unit(n, dim, 1), unit(QUERIES, dim, 2)
    rows: list[tuple[str, float, float, float]] = []

    t = time.perf_counter()
    mat = np.empty((0, dim), np.float32)
    for i in range(0, n, 100):  # upserts in batches of 100 (a document's chunks)
        mat = np.vstack([mat, data[i : i + 100]])
    ins = time.perf_counter() - t

    def np_query(v: np.ndarray) -> object:
        s = mat @ v
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    rows.append(("numpy matrix (exact)", ins, *timed_queries(q, np_query)))

    from usearch.index import Index

    for label, exact in (("usearch HNSW", False), ("usearch exact", True)):
        idx = Index(ndim=dim, metric="cos", dtype="f32")
        t = time.perf_counter()
        for i in range(0, n, 100):
            idx.add(np.arange(i, min(i + 100, n)), data[i : i + 100])
        ins = time.perf_counter() - t
        rows.append((label, ins, *timed_queries(q, lambda v, idx=idx, ex=exact: idx.search(v, K, exact=ex))))

    import sqlite_vec

    db = sqlite3.connect(":memory:")
    if not hasattr(db, "enable_load_extension"):  # CPython built without loadable extensions
        rows.append(("sqlite-vec (not loadable: sqlite3 without enable_load_extension)", 0.0, 0.0, 0.0))
        _print(n, dim, rows)
        return
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.execute(
        f"CREATE VIRTUAL TABLE v USING vec0(id INTEGER PRIMARY KEY, e float[{dim}] distance_metric=cosine)"
    )
    t = time.perf_counter()
    for i in range(0, n, 100):
        db.executemany(
            "INSERT INTO v(id, e) VALUES (?, ?)", [(j, data[j].tobytes()) for j in range(i, min(i + 100, n))]
        )
    db.commit()
    ins = time.perf_counter() - t

    def sv_query(v: np.ndarray) -> object:
        return db.execute("SELECT id, distance FROM v WHERE e MATCH ? AND k = ?", (v.tobytes(), K)).fetchall()

    rows.append(("sqlite-vec vec0 (exact)", ins, *timed_queries(q, sv_query)))
    _print(n, dim, rows)


def _print(n: int, dim: int, rows: list[tuple[str, float, float, float]]) -> None:
    print(f"{n} x {dim}-d float32, top {K}, {QUERIES} queries; loadavg {os.getloadavg()}")
    print()
    print("| index | insert all (s) | query p50 (ms) | query p99 (ms) |")
    print("|---|---:|---:|---:|")
    for name, ins, p50, p99 in rows:
        print(f"| {name} | {ins:.3f} | {p50:.3f} | {p99:.3f} |")


if __name__ == "__main__":
    main()
