"""Public model name -> upstream target, resolved once per worker from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from . import _fastpath
from .config import Config

if TYPE_CHECKING:
    from .upstreams.openai_http import OpenAIHttpAdapter


class Route:
    """Where one public model goes. `upstream_model_json` is pre-encoded for body rewriting."""

    __slots__ = ("adapter", "encoding", "name", "passthrough_model", "upstream_model", "upstream_model_json")

    def __init__(self, name: str, upstream_model: str, adapter: OpenAIHttpAdapter, encoding: str) -> None:
        self.name = name
        self.upstream_model = upstream_model
        self.upstream_model_json = msgspec.json.encode(upstream_model)
        self.passthrough_model = upstream_model == name
        self.adapter = adapter
        self.encoding = encoding


def build_routes(cfg: Config, adapters: dict[str, OpenAIHttpAdapter]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for m in cfg.models:
        upstream = m.upstream_model or m.name
        encoding = m.encoding or _fastpath.encoding_for_model(upstream)
        routes[m.name] = Route(m.name, upstream, adapters[m.provider], encoding)
    return routes
