"""What the output guard costs a stream: CPU per chunk of the Rust filter (all eight kinds, redact)
over a 64-chunk stream of realistic text, against the plain path (no filter), and the delay it
adds: how much text is held back after each chunk (bytes, and in chunks of that stream).

    .venv/bin/python benchmarks/output_guard_cost.py [--streams 2000]

The load average is printed with the result: on a shared machine, compare runs with similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from gateway import _fastpath
from gateway.config_output import PII_KINDS

CORPUS = Path(__file__).parent.parent / "tests" / "python" / "data" / "benign_outputs.txt"


def frames(words: list[str], with_pii: bool) -> list[bytes]:
    """64 chunk frames of a few words each (the mock's shape), optionally with an e-mail inside."""
    out = []
    for i in range(64):
        text = " ".join(words[i * 3 : i * 3 + 3]) + " "
        if with_pii and i == 32:
            text = "mail jane.doe@example.com "
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}}],
        }
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    return out


def run(streams: int, window: int, with_pii: bool) -> tuple[float, float, float]:
    words = CORPUS.read_text().split()
    chunks = frames(words, with_pii)
    policy = _fastpath.OutputPolicy([(k, "redact", 0) for k in PII_KINDS])
    held: list[int] = []
    t0 = time.process_time_ns()
    for _ in range(streams):
        f = policy.filter(window)
        for c in chunks:
            f.feed(c)
        f.finish()
    per_chunk = (time.process_time_ns() - t0) / (streams * len(chunks))
    f = policy.filter(window)
    for c in chunks:
        f.feed(c)
        held.append(f.held)
    mean_chunk = statistics.mean(len(c) for c in chunks) - 90  # about the JSON around the text
    return per_chunk, statistics.mean(held), statistics.mean(held) / max(mean_chunk, 1)


def baseline(streams: int) -> float:
    """The same frames through the re-framer alone (what every stream pays anyway)."""
    chunks = frames(CORPUS.read_text().split(), False)
    t0 = time.process_time_ns()
    for _ in range(streams):
        r = _fastpath.ChatStreamReframer(True)
        for c in chunks:
            r.feed(c)
    return (time.process_time_ns() - t0) / (streams * len(chunks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=2000)
    args = ap.parse_args()
    print(f"loadavg {os.getloadavg()[0]:.2f} (cores {os.cpu_count()}), build {_fastpath.BUILD_PROFILE}")
    print(f"re-framer alone: {baseline(args.streams) / 1000:.2f} us/chunk (reference)")
    for window in (64, 96, 128):
        for pii in (False, True):
            cpu, held, held_chunks = run(args.streams, window, pii)
            print(
                f"window {window:3d} {'with an e-mail' if pii else 'clean        '}: "
                f"{cpu / 1000:.2f} us/chunk CPU, {cpu * 64 / 1000:.1f} us per 64-chunk stream; "
                f"held back {held:.0f} bytes on average (~{held_chunks:.1f} chunks of delay)"
            )
    print("plain requests (no output guard for their model): no filter, 0 us")


if __name__ == "__main__":
    main()
