"""The config of the response-side checks: output guards (PII and secrets in what the model
sends back, `gateway.pipeline.output_guard`) and tool-call validation
(`gateway.pipeline.tool_check`). Kept apart from the prompt `guards:` because they run on the
reply, with other fields (kinds, actions, the hold-back window) and none of a classifier's."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .config import Config

#: what the Rust detector (`crates/fastpath/src/pii.rs`) knows
PII_KINDS = ("email", "phone", "card", "iban", "ssn", "api_key", "jwt", "private_key")


class OutputAction(StrEnum):
    #: a header (unary) or an SSE comment before `[DONE]` (stream), a log line, a metric
    FLAG = "flag"
    #: masked in place: `[REDACTED:<kind>]`
    REDACT = "redact"
    #: unary: an error reply; stream: an error event naming the guard, then `[DONE]`
    BLOCK = "block"


class OutputGuardConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One output guard (`output_guards:`): kinds of PII / secret to look for in replies."""

    #: Names the guard in the error `code`, the flag header / comment and the metric.
    name: str
    #: Of `PII_KINDS`; empty = all.
    kinds: list[str] = []
    action: OutputAction = OutputAction.REDACT
    #: Public models this guard applies to; empty = all.
    models: list[str] = []
    #: Streams: text held back (bytes) so a finding split across reads is seen whole (the
    #: largest of the guards that apply is used; at least 64: the longest bounded pattern).
    holdback_chars: int = 96


class ToolAction(StrEnum):
    #: an error reply (unary) or an error event at the end (stream)
    ERROR = "error"
    #: the reply goes out; `x-fastpath-tool-check` header (unary) or SSE comment (stream)
    FLAG = "flag"
    #: unary only: one more upstream call with the validation error appended as a tool message;
    #: a reply that still fails is an error (a stream falls back to `error`)
    REPAIR = "repair"


class ToolValidationConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Tool calls in replies checked against the request's `tools` (name, JSON, JSON Schema)."""

    enabled: bool = False
    action: ToolAction = ToolAction.ERROR
    #: Public models this applies to; empty = all.
    models: list[str] = []


def validate_output(cfg: Config, models: set[str]) -> None:
    """Every output guard and the tool-validation section, with the path of what is wrong."""
    from .config import ConfigError

    seen: set[str] = set()
    for i, g in enumerate(cfg.output_guards):
        where = f"$.output_guards[{i}]"
        if not re.fullmatch(r"[a-z0-9_]{1,64}", g.name):
            raise ConfigError(f"{where}.name: use 1-64 of [a-z0-9_] (it becomes an error code)")
        if g.name in seen:
            raise ConfigError(f"{where}.name: duplicate output guard name {g.name!r}")
        seen.add(g.name)
        for j, k in enumerate(g.kinds):
            if k not in PII_KINDS:
                raise ConfigError(f"{where}.kinds[{j}]: unknown kind {k!r} (known: {', '.join(PII_KINDS)})")
        for m in g.models:
            if m not in models:
                raise ConfigError(f"{where}.models: unknown model {m!r}")
        if not 64 <= g.holdback_chars <= 4096:
            raise ConfigError(f"{where}.holdback_chars: must be in [64, 4096], got {g.holdback_chars}")
    for m in cfg.tool_validation.models:
        if m not in models:
            raise ConfigError(f"$.tool_validation.models: unknown model {m!r}")
    for where, allowed in _tool_lists(cfg):
        if any(not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", n) for n in allowed):
            raise ConfigError(f"{where}.tools_allowed: tool names are 1-64 of [A-Za-z0-9_.-]")


def _tool_lists(cfg: Config) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for i, k in enumerate(cfg.auth.keys):
        if k.tools_allowed is not None:
            out.append((f"$.auth.keys[{i}]", k.tools_allowed))
    for name, t in cfg.tiers.items():
        if t.tools_allowed is not None:
            out.append((f"$.tiers.{name}", t.tools_allowed))
    for name, team in cfg.teams.items():
        if team.tools_allowed is not None:
            out.append((f"$.teams.{name}", team.tools_allowed))
    return out


def tools_permissions_on(cfg: Config) -> bool:
    """Any key, tier or team limits the tools a request may offer."""
    return bool(_tool_lists(cfg))
