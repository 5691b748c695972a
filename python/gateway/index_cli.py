"""`fastpath-gateway index add`: load documents into a retriever's embedded index.

Each file is split into chunks of whole paragraphs (blank-line separated) up to `--max-tokens`
tokens (a longer paragraph is cut by words), embedded by `--embedding-model` through a running
gateway (`--url`, `--api-key` or FASTPATH_API_KEY: the same model, and so the same vectors, the
gateway will embed queries with), and upserted by id `<file>#<n>`: loading a file again replaces
its chunks in place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

from . import _fastpath
from .vector_index import upsert

_PARAGRAPHS = re.compile(r"\n\s*\n")
_HEADING = re.compile(r"^#+\s+(.+)$", re.MULTILINE)
_BATCH = 64


def chunks(text: str, max_tokens: int) -> list[str]:
    """Whole paragraphs packed up to `max_tokens` (o200k_base); a longer one is cut by words."""

    def n(s: str) -> int:
        return int(_fastpath.count_tokens(s, "o200k_base"))

    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in (p.strip() for p in _PARAGRAPHS.split(text)):
        if not para:
            continue
        pieces = [para]
        if n(para) > max_tokens:
            pieces, words = [], para.split()
            while words:
                take = len(words)
                while take > 1 and n(" ".join(words[:take])) > max_tokens:
                    take = max(1, take // 2)
                pieces.append(" ".join(words[:take]))
                words = words[take:]
        for piece in pieces:
            t = n(piece)
            if cur and size + t > max_tokens:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            cur.append(piece)
            size += t
    if cur:
        out.append("\n\n".join(cur))
    return out


def _embed(url: str, key: str, model: str, texts: list[str]) -> list[list[float]]:
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/embeddings",
        data=json.dumps({"model": model, "input": texts}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        reply: dict[str, Any] = json.loads(r.read())
    return [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]


def cmd_index_add(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("FASTPATH_API_KEY", "")
    rows: list[tuple[str, str, str, list[float]]] = []
    for name in args.files:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        m = _HEADING.search(text)
        title = m.group(1).strip() if m else path.name
        parts = chunks(text, args.max_tokens)
        for start in range(0, len(parts), _BATCH):
            batch = parts[start : start + _BATCH]
            try:
                vectors = _embed(args.url, key, args.embedding_model, batch)
            except OSError as exc:
                print(f"error: embedding {path} through {args.url}: {exc}", file=sys.stderr)
                return 1
            for i, (chunk, vec) in enumerate(zip(batch, vectors, strict=True), start):
                rows.append((f"{path}#{i}", title, chunk, vec))
    total = upsert(args.index, rows)
    print(f"{len(rows)} chunks from {len(args.files)} files upserted; {total} in {args.index}")
    return 0


def add_parser(sub: Any) -> None:
    ix = sub.add_parser("index", help="manage retrieval indexes (retrieval.retrievers.*.index)")
    isub = ix.add_subparsers(dest="index_command", required=True)
    a = isub.add_parser("add", help="chunk, embed and upsert documents into an index")
    a.add_argument("--index", required=True, help="the index file (a retriever's `index`)")
    a.add_argument("--embedding-model", required=True, help="the retriever's embedding_model")
    a.add_argument("--url", default="http://127.0.0.1:8000", help="a running gateway")
    a.add_argument("--api-key", default="", help="its API key (default: $FASTPATH_API_KEY)")
    a.add_argument("--max-tokens", type=int, default=256, help="tokens per chunk at most")
    a.add_argument("files", nargs="+")
    a.set_defaults(func=cmd_index_add)
