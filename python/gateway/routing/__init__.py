"""Public model name -> upstream target, resolved once per worker from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from . import _fastpath
from .config import Config, TritonModelConfig

if TYPE_CHECKING:
    from .upstreams.base import Adapter


class Route:
    """Where one public model goes. `upstream_model_json` is pre-encoded for body rewriting."""

    __slots__ = (
        "adapter",
        "encoding",
        "name",
        "passthrough_model",
        "triton",
        "upstream_model",
        "upstream_model_json",
    )

    def __init__(
        self,
        name: str,
        upstream_model: str,
        adapter: Adapter,
        encoding: str,
        triton: TritonModelConfig | None = None,
    ) -> None:
        self.name = name
        self.upstream_model = upstream_model
        self.upstream_model_json = msgspec.json.encode(upstream_model)
        self.passthrough_model = upstream_model == name
        self.adapter = adapter
        self.encoding = encoding
        #: request mapping of a Triton route (defaults when the model config has none)
        self.triton = triton or TritonModelConfig()


def build_routes(cfg: Config, adapters: dict[str, Adapter]) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for m in cfg.models:
        upstream = m.upstream_model or m.name
        encoding = m.encoding or _fastpath.encoding_for_model(upstream)
        routes[m.name] = Route(m.name, upstream, adapters[m.provider], encoding, m.triton)
    return routes
