"""Extensions: stages and observers of your own, named in the config (`extensions:`), built
once per worker by their factory. They take the same place and protocol as the built-in ones:
request stages run after the built-in request stages (one with `on_finish` also settles; one
declaring `reads` / `writes` may run concurrently with its neighbours: pipeline/parallel.py),
response stages see each streamed read and each unary body, observers every outcome."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..config import Config, ConfigError, ExtensionKind
from .parallel import check_declared

if TYPE_CHECKING:
    from .relay import ResponseStage
    from .stage import FinishStage, Observer, RequestStage

#: what a part of each kind must have
_METHODS = {
    ExtensionKind.REQUEST_STAGE: ("on_request",),
    ExtensionKind.RESPONSE_STAGE: ("on_stream", "on_body"),
    ExtensionKind.OBSERVER: ("on_done",),
}
_LIFECYCLE = ("name", "start", "close")


class Extensions:
    __slots__ = ("finish_stages", "observers", "request_stages", "response_stages")

    def __init__(self) -> None:
        self.request_stages: list[RequestStage] = []
        self.finish_stages: list[FinishStage] = []
        self.response_stages: list[ResponseStage] = []
        self.observers: list[Observer] = []


def _factory(where: str, spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}.factory: cannot load {spec!r}: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"{where}.factory: {spec!r} is not callable")
    return factory


def check_extensions(cfg: Config) -> None:
    """Every factory imports and is callable (`check-config`, and `serve` before it forks)."""
    for i, spec in enumerate(cfg.extensions):
        _factory(f"$.extensions[{i}]", spec.factory)


def load_extensions(cfg: Config) -> Extensions:
    ext = Extensions()
    for i, spec in enumerate(cfg.extensions):
        where = f"$.extensions[{i}]"
        part: Any = _factory(where, spec.factory)(spec.options)
        missing = [m for m in (*_LIFECYCLE, *_METHODS[spec.kind]) if not hasattr(part, m)]
        if missing:
            raise ConfigError(f"{where}: {spec.factory} made a part without {', '.join(missing)}")
        if spec.kind is ExtensionKind.REQUEST_STAGE:
            check_declared(part, where)  # `reads` / `writes`: it may run concurrently
            ext.request_stages.append(part)
            if hasattr(part, "on_finish"):
                ext.finish_stages.append(part)
        elif spec.kind is ExtensionKind.RESPONSE_STAGE:
            ext.response_stages.append(part)
        else:
            ext.observers.append(part)
    return ext
