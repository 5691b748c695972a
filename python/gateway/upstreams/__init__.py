"""Upstream adapters, one per provider kind (`base.Adapter`), and the one factory that builds
them. An adapter's module is imported only when a provider of its kind is configured (Triton's
pulls in grpc, tritonclient and h2: ~30 MB a worker that an HTTP-only config never pays)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ProviderConfig
    from ..worker import Worker
    from .base import Adapter

#: provider kind -> "module:class" of its adapter (a new upstream kind is one line here)
ADAPTERS = {
    "openai": "gateway.upstreams.openai_http:OpenAIHttpAdapter",
    "triton": "gateway.upstreams.triton_grpc:TritonAdapter",
    "anthropic": "gateway.upstreams.anthropic_http:AnthropicHttpAdapter",
}


def build(provider: ProviderConfig, worker: Worker) -> Adapter:
    module, _, cls = ADAPTERS[provider.kind].partition(":")
    adapter: Adapter = getattr(importlib.import_module(module), cls)(provider, worker)
    return adapter
