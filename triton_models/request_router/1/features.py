"""The request router's cheap features, shared by the model, `train.py` and the gateway's tests.

The gateway computes the raw values (`pipeline/planner.py`: the Rust `estimate_tokens`, a code
fence, tools in the request, the number of turns) and sends them as the `features` input; this
module holds the same token estimate in Python (so training sees exactly what the gateway sends)
and the transform both sides agree on. Pure Python: the gateway's tests import it to check parity.
"""

from __future__ import annotations

import math

#: the order of the `features` input (FP32 [4])
RAW = ("prompt_tokens", "code_fence", "tools", "turns")
#: what the classifier sees, after `transform`
NAMES = ("log1p_prompt_tokens", "code_fence", "tools", "log_turns")


def estimate_tokens(text: str) -> int:
    """The Rust `tokens::estimate`: a quarter token per ASCII byte (rounded up) plus one per
    non-ASCII code point."""
    data = text.encode("utf-8")
    ascii_bytes = sum(1 for b in data if b < 0x80)
    lead = sum(1 for b in data if b >= 0xC0)
    return (ascii_bytes + 3) // 4 + lead


def raw_features(text: str, tools: bool = False, turns: int = 1) -> list[float]:
    """The `features` input for a prompt text (all messages' text joined by newlines)."""
    return [float(estimate_tokens(text)), float("```" in text), float(tools), float(max(turns, 1))]


def transform(raw: list[float]) -> list[float]:
    """Raw features -> the classifier's (log scale for the counts; standardised by the caller)."""
    tokens, fence, tools, turns = raw
    return [math.log1p(max(tokens, 0.0)), 1.0 if fence else 0.0, 1.0 if tools else 0.0, math.log(max(turns, 1.0))]
