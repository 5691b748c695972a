"""The `planner:` section (issue 18): cost/quality model selection before the call.

A request classifier on Triton (`triton_models/request_router`) scores each request of a planned
model as `simple` or `hard`; the planner (`pipeline/planner.py`) sends it to that class's model.
A planned model is either an existing public model (its requests may be re-routed; `shadow: true`
only reports the choice) or a **virtual** model such as `auto` that exists only here.

```yaml
planner:
  provider: triton                 # a provider of kind triton serving the classifier
  models:
    auto: {simple: gpt-4o-mini, hard: gpt-4o, threshold: 0.5}
    gpt-4o: {simple: gpt-4o-mini, hard: gpt-4o, shadow: true}
```
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .config import Config

CLASSES = ("simple", "hard")


class PlanConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How one public (or virtual) model's requests are planned."""

    #: the public model that serves a `simple` request (score below `threshold`)
    simple: str
    #: the public model that serves a `hard` request
    hard: str
    #: score (P(hard)) at or above which a request is hard
    threshold: float = 0.5
    #: the model when the classifier is unavailable (error, timeout); empty: `hard` (fail open to quality)
    default: str = ""
    #: only report the choice (header, ledger, metrics); the request keeps its model
    shadow: bool = False
    #: a `simple` request skips the retriever of the model serving it (`retrieval.models`)
    skip_retrieval_when_simple: bool = False


class PlannerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: a provider of kind `triton` that serves `model`
    provider: str = ""
    #: the classifier: `text` BYTES [1] + `features` FP32 [4] -> `score` FP32 [1] (P(hard))
    model: str = "request_router"
    #: the classifier's time; past it the request goes to the plan's `default`
    timeout_ms: int = 250
    #: only the last this many characters of the prompt go to the classifier (it reads 128 word
    #: pieces of them; the prompt-tokens feature counts the whole prompt)
    max_chars: int = 1_000
    #: requests scored in one classifier call at most (concurrent ones are coalesced per worker)
    max_batch: int = 32
    #: public (or virtual) model -> its plan
    models: dict[str, PlanConfig] = {}


def planned_names(cfg: Config) -> list[str]:
    """The virtual models (planned names that are no model or alias): public names too."""
    real = {m.name for m in cfg.models} | set(cfg.aliases)
    return [name for name in cfg.planner.models if name not in real]


def validate_planner(cfg: Config) -> None:
    from .config import ConfigError, ModelKind, ProviderKind

    p = cfg.planner
    if not p.models:
        return
    where = "$.planner"
    triton = {q.name for q in cfg.providers if q.kind is ProviderKind.TRITON}
    if p.provider not in triton:
        known = ", ".join(sorted(triton)) or "none configured"
        raise ConfigError(f"{where}.provider: must name a triton provider (known: {known})")
    if not p.model:
        raise ConfigError(f"{where}.model: the classifier's Triton model name is required")
    for field in ("timeout_ms", "max_chars", "max_batch"):
        if getattr(p, field) <= 0:
            raise ConfigError(f"{where}.{field}: must be > 0, got {getattr(p, field)}")
    kinds = {m.name: m.kind for m in cfg.models}
    chat = {name for name, kind in kinds.items() if kind is ModelKind.CHAT}
    chat |= {alias for alias, target in cfg.aliases.items() if target in chat}
    real = set(kinds) | set(cfg.aliases)
    for name, plan in p.models.items():
        at = f"{where}.models.{name}"
        virtual = name not in real
        if virtual and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", name):
            raise ConfigError(f"{at}: a virtual model name is 1-128 of [A-Za-z0-9._:/-]")
        if not virtual and name not in chat:
            raise ConfigError(f"{at}: {name!r} is an embedding model; only chat models are planned")
        if virtual and plan.shadow:
            raise ConfigError(
                f"{at}.shadow: {name!r} is a virtual model (no model of that name serves it); "
                "shadow mode needs an existing model to keep"
            )
        if not 0.0 < plan.threshold < 1.0:
            raise ConfigError(f"{at}.threshold: must be in (0, 1), got {plan.threshold}")
        for field in ("simple", "hard", "default"):
            target = getattr(plan, field)
            if field == "default" and not target:
                continue
            if target not in real:
                known = ", ".join(sorted(chat)) or "none"
                raise ConfigError(f"{at}.{field}: no model {target!r} (chat models: {known})")
            if target not in chat:
                raise ConfigError(f"{at}.{field}: {target!r} is an embedding model, not a chat model")
