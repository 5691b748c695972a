"""fastpath-gateway: a high-performance, OpenAI-compatible LLM gateway.

The Rust extension is private (`gateway._fastpath`); what users need is re-exported here.
"""

from __future__ import annotations

from ._fastpath import BUILD_PROFILE, count_chat_tokens, count_tokens, encoding_for_model, estimate_tokens
from ._fastpath import __version__ as fastpath_version

__version__ = "0.1.0"

__all__ = [
    "BUILD_PROFILE",
    "__version__",
    "count_chat_tokens",
    "count_tokens",
    "encoding_for_model",
    "estimate_tokens",
    "fastpath_version",
]
