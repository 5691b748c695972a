"""The embedded vector index of the retrieval stage: a SQLite file of chunks (id, title, text,
vector) beside a usearch HNSW index of the vectors (`<path>.usearch`).

SQLite is the source of truth (upserts by chunk id, one transaction per load); the usearch file
is rebuilt from it after each load and memory-mapped by the gateway, so a worker starts without
re-indexing. usearch was picked over a numpy matrix and sqlite-vec by measurement
(benchmarks/results/2026-12-04-vector-index.md): sub-millisecond queries that stay so past small
corpora, and it needs no SQLite extension loading (which this CPython build lacks).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_SCHEMA = """CREATE TABLE IF NOT EXISTS chunks (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL
)"""


class Doc:
    """One retrieved chunk and its cosine similarity to the query."""

    __slots__ = ("id", "score", "text", "title")

    def __init__(self, id: str, title: str, text: str, score: float) -> None:
        self.id = id
        self.title = title
        self.text = text
        self.score = score

    def as_vars(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "text": self.text, "score": round(self.score, 4)}

    def citation(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "score": round(self.score, 4)}


def _usearch_path(path: Path) -> Path:
    return path.with_name(path.name + ".usearch")


def upsert(path: str | Path, rows: Iterable[tuple[str, str, str, Sequence[float]]]) -> int:
    """Insert or replace chunks `(id, title, text, vector)` (vectors normalised here), then
    rebuild the search file. Returns the number of chunks in the index."""
    from usearch.index import Index

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(p)
    try:
        with conn:
            conn.execute(_SCHEMA)
            for cid, title, text, vec in rows:
                v = np.asarray(vec, dtype=np.float32)
                norm = float(np.linalg.norm(v))
                if norm > 0:
                    v = v / norm
                conn.execute(
                    "INSERT INTO chunks (id, title, text, vector) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET title = excluded.title, text = excluded.text, "
                    "vector = excluded.vector",
                    (cid, title, text, v.tobytes()),
                )
        keys, vecs = [], []
        for key, blob in conn.execute("SELECT key, vector FROM chunks ORDER BY key"):
            keys.append(key)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
    finally:
        conn.close()
    if vecs:
        dims = {len(v) for v in vecs}
        if len(dims) != 1:
            raise ValueError(f"{p}: vectors of several widths {sorted(dims)}: one embedding model per index")
        index = Index(ndim=dims.pop(), metric="cos", dtype="f32")
        index.add(np.asarray(keys, dtype=np.uint64), np.stack(vecs))
        index.save(str(_usearch_path(p)))
    return len(keys)


class VectorIndex:
    """Read-only, loaded once per worker (a hot reload builds a new one): chunk texts in memory,
    vectors in the memory-mapped usearch file."""

    __slots__ = ("_docs", "_index", "dim", "path")

    def __init__(self, path: str | Path) -> None:
        from usearch.index import Index

        self.path = Path(path)
        self._docs: dict[int, tuple[str, str, str]] = {}
        self._index: Any = None
        self.dim = 0
        if not self.path.exists():
            raise FileNotFoundError(
                f"{self.path}: no such index (build it with `fastpath-gateway index add`)"
            )
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            for key, cid, title, text in conn.execute("SELECT key, id, title, text FROM chunks"):
                self._docs[key] = (cid, title, text)
        finally:
            conn.close()
        if self._docs:
            self._index = Index.restore(str(_usearch_path(self.path)), view=True)
            self.dim = int(self._index.ndim)

    def __len__(self) -> int:
        return len(self._docs)

    def search(self, vector: Sequence[float], k: int, min_score: float) -> list[Doc]:
        """The `k` nearest chunks scoring at least `min_score` (cosine similarity), best first."""
        if self._index is None:
            return []
        q = np.asarray(vector, dtype=np.float32)
        if q.shape != (self.dim,):
            raise ValueError(f"query has {q.shape[-1]} dimensions, the index {self.dim}")
        found = self._index.search(q, min(k, len(self._docs)))
        out: list[Doc] = []
        for key, dist in zip(found.keys.tolist(), found.distances.tolist(), strict=True):
            score = 1.0 - float(dist)
            doc = self._docs.get(int(key))
            if doc is not None and score >= min_score:
                out.append(Doc(doc[0], doc[1], doc[2], score))
        return out
