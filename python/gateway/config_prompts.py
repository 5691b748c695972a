"""The `prompts:` and `retrieval:` sections (issue 18): server-side prompt templates, and
retrievers that fetch context for them within a time budget.

Templates are Jinja2 in a sandboxed environment with strict undefined variables: a template that
does not compile is a config error naming its path here, one that needs a variable the request
lacks is a 400 at request time (`pipeline/prompts.py`), never a silently dropped prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from .config import Config


class PromptVersion(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: the system message (replaces the client's first system message, else goes first)
    system: str | None = None
    #: the last user message, rendered with `{{ input }}` (its text) and the other variables
    template: str | None = None


class PromptConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    versions: dict[str, PromptVersion]
    #: the version used when the selector names none; empty: the only version
    default_version: str = ""
    #: applied to these public models / key ids / teams unless the request names a prompt
    #: (precedence: request > key > team > model)
    models: list[str] = []
    keys: list[str] = []
    teams: list[str] = []


class RetrieverConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    #: the embedded index file (`fastpath-gateway index add` writes it)
    index: str
    #: a public embedding model served by this gateway (called in process, through its routes)
    embedding_model: str
    top_k: int = 4
    #: results scoring below it (cosine similarity) are not injected
    min_score: float = 0.0
    #: the time for embedding + lookup; past it the request proceeds without context
    budget_ms: int = 200
    #: also put a top-level `citations` array in unary chat replies (the header is always set)
    citations_in_body: bool = False
    #: at most this many characters of one document go into the prompt
    max_chars: int = 2_000


class RetrievalConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    retrievers: dict[str, RetrieverConfig] = {}
    #: public model -> retriever name
    models: dict[str, str] = {}


def sandbox() -> ImmutableSandboxedEnvironment:
    """The one Jinja environment templates compile in: sandboxed (no attribute escapes), no
    autoescape (the output is a prompt, not HTML), undefined variables raise."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


def validate_prompts(cfg: Config) -> None:
    from jinja2 import TemplateSyntaxError

    from .config import ConfigError

    env = sandbox()
    for name, p in cfg.prompts.items():
        where = f"$.prompts.{name}"
        if not name or "@" in name:
            raise ConfigError(f"{where}: a prompt name is non-empty, without '@'")
        if not p.versions:
            raise ConfigError(f"{where}.versions: at least one version is required")
        if p.default_version and p.default_version not in p.versions:
            raise ConfigError(f"{where}.default_version: no version {p.default_version!r}")
        if not p.default_version and len(p.versions) > 1:
            raise ConfigError(f"{where}.default_version: required with several versions")
        for v, ver in p.versions.items():
            for field in ("system", "template"):
                text = getattr(ver, field)
                if text is None:
                    continue
                try:
                    env.from_string(text)
                except TemplateSyntaxError as exc:
                    raise ConfigError(
                        f"{where}.versions.{v}.{field}: template syntax error, "
                        f"line {exc.lineno}: {exc.message}"
                    ) from None
    r = cfg.retrieval
    models = {m.name for m in cfg.models}
    for name, rt in r.retrievers.items():
        where = f"$.retrieval.retrievers.{name}"
        if rt.embedding_model not in models and rt.embedding_model not in cfg.aliases:
            raise ConfigError(f"{where}.embedding_model: no model {rt.embedding_model!r}")
        if rt.top_k <= 0 or rt.budget_ms <= 0 or rt.max_chars <= 0:
            raise ConfigError(f"{where}: top_k, budget_ms and max_chars must be > 0")
        if not rt.index:
            raise ConfigError(f"{where}.index: a file path is required")
    for model, name in r.models.items():
        if name not in r.retrievers:
            raise ConfigError(f"$.retrieval.models.{model}: no retriever {name!r}")
