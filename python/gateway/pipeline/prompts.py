"""Stage `prompts`: server-side, versioned system prompts and templates (issue 18, item 1).

Runs after `route` (the model is known, and so are the principal and the retrieved context) and
before `limits`, so the injected text's tokens are counted and charged like the client's own.

A prompt is chosen by the request (`x-fastpath-prompt: name@version` or `metadata.prompt`, the
version optional), else by the caller's key, team, then the model (config lists). It rewrites the
chat body: the system message is replaced (or inserted first), the last user message is rendered
through `template` (`{{ input }}` is its text). Variables: `input`, `messages`, `user`, `model`,
`metadata`, `key_id`, `team`, `tier` (with auth on) and `context` (stage `retrieve`'s documents,
each with `id`, `title`, `score`, `text`). A variable the request does not have is a 400 naming
it: a prompt the operator configured is never silently skipped. The version used goes out in
`x-fastpath-prompt`, the ledger row and the trace.

With no prompt chosen but retrieved context, the context goes in as a system message of its own
(`DEFAULT_CONTEXT`), so a retriever works without a template.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from jinja2 import Template, TemplateError, UndefinedError

from ..config_prompts import sandbox
from ..context import Endpoint, RequestContext
from ..errors import Fault, GatewayError, quote
from ..schemas import ChatRequestView
from ..upstream_body import message_text, upstream_body
from .stage import Part

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("gateway.prompts")

HEADER = "x-fastpath-prompt"
DEFAULT_CONTEXT = (
    "Use the following documents to answer. Cite them by id.\n"
    "{% for d in context %}[{{ d.id }}] {{ d.title }}\n{{ d.text }}\n\n{% endfor %}"
)
_decode = msgspec.json.Decoder(dict[str, Any]).decode
_view = msgspec.json.Decoder(ChatRequestView).decode
_encode = msgspec.json.Encoder().encode


class _Version:
    __slots__ = ("label", "system", "template")

    def __init__(self, label: str, system: Template | None, template: Template | None) -> None:
        self.label = label
        self.system = system
        self.template = template


class PromptStage(Part):
    name = "prompts"
    __slots__ = ("_by_key", "_by_model", "_by_team", "_context", "_defaults", "_versions")

    def __init__(self, cfg: Config) -> None:
        env = sandbox()
        #: (name, version) -> compiled; name -> its default version
        self._versions: dict[tuple[str, str], _Version] = {}
        self._defaults: dict[str, str] = {}
        self._by_model: dict[str, str] = {}
        self._by_key: dict[str, str] = {}
        self._by_team: dict[str, str] = {}
        for name, p in cfg.prompts.items():
            for v, ver in p.versions.items():
                self._versions[name, v] = _Version(
                    f"{name}@{v}",
                    None if ver.system is None else env.from_string(ver.system),
                    None if ver.template is None else env.from_string(ver.template),
                )
            self._defaults[name] = p.default_version or next(iter(p.versions))
            for m in p.models:
                self._by_model.setdefault(m, name)
            for k in p.keys:
                self._by_key.setdefault(k, name)
            for t in p.teams:
                self._by_team.setdefault(t, name)
        self._context = env.from_string(DEFAULT_CONTEXT)

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.endpoint is not Endpoint.CHAT:
            return
        asked = ctx.headers.get(HEADER)
        body: dict[str, Any] | None = None
        if asked is None and b'"prompt"' in ctx.body:  # metadata.prompt, cheaply ruled out
            body = _decode(ctx.body)
            meta = body.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("prompt"), str):
                asked = meta["prompt"]
        version = self._select(ctx, asked)
        if version is None and not (ctx.rag is not None and ctx.rag.docs):
            return
        if body is None:
            body = _decode(ctx.body)
        meta = body.get("metadata")
        if isinstance(meta, dict) and "prompt" in meta:  # ours, not the upstream's
            del meta["prompt"]
            if not meta:
                del body["metadata"]
        self._apply(ctx, body, version)
        ctx.body = _encode(body)
        try:
            ctx.view = _view(ctx.body)
        except msgspec.ValidationError as exc:
            raise GatewayError(
                Fault.INVALID_REQUEST, f"The rendered prompt is not a valid chat body: {exc}"
            ) from None
        assert ctx.route is not None
        upstream_body(ctx, ctx.route)
        if version is not None:
            ctx.prompt = version.label
            ctx.reply_headers += ((HEADER, version.label),)

    def _select(self, ctx: RequestContext, asked: str | None) -> _Version | None:
        if asked is not None:
            asked_name, _, v = asked.partition("@")
            v = v or self._defaults.get(asked_name, "")
            found = self._versions.get((asked_name, v))
            if found is None:
                raise GatewayError(
                    Fault.INVALID_REQUEST,
                    f"Unknown prompt `{quote(asked, 80)}` (expected name or name@version).",
                    param="metadata.prompt",
                )
            return found
        name: str | None = None
        p = ctx.principal
        if p is not None:
            name = self._by_key.get(p.key_id) or self._by_team.get(p.team)
        if name is None and ctx.route is not None:
            name = self._by_model.get(ctx.route.name)
        return None if name is None else self._versions[name, self._defaults[name]]

    def _apply(self, ctx: RequestContext, body: dict[str, Any], version: _Version | None) -> None:
        messages = body.get("messages")
        assert isinstance(messages, list)  # decode checked the shape
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        variables: dict[str, Any] = {
            "input": message_text(messages[last].get("content")) if last is not None else "",
            "messages": messages,
            "model": ctx.route.name if ctx.route is not None else body.get("model"),
        }
        if "user" in body:
            variables["user"] = body["user"]
        if isinstance(body.get("metadata"), dict):
            variables["metadata"] = body["metadata"]
        p = ctx.principal
        if p is not None:
            variables.update(key_id=p.key_id, team=p.team, tier=p.tier_name)
        rag = ctx.rag
        if rag is not None:
            variables["context"] = [d.as_vars() for d in rag.docs]
        system = version.system if version is not None else None
        if version is None or (rag is not None and rag.docs and system is None and version.template is None):
            system = self._context
        label = version.label if version is not None else "context"
        if version is not None and version.template is not None and last is not None:
            rendered = _render(version.template, variables, label, "template")
            messages[last] = {
                **messages[last],
                "content": _replace_text(messages[last].get("content"), rendered),
            }
        if system is not None:
            text = _render(system, variables, label, "system")
            first = messages[0] if messages else None
            if first is not None and first.get("role") in ("system", "developer"):
                messages[0] = {**first, "content": text}
            else:
                messages.insert(0, {"role": "system", "content": text})


def _render(t: Template, variables: dict[str, Any], label: str, part: str) -> str:
    try:
        return t.render(variables)
    except UndefinedError as exc:
        raise GatewayError(
            Fault.INVALID_REQUEST,
            f"The prompt `{label}` ({part}) needs a value the request does not have: {quote(str(exc), 200)}.",
            param="metadata.prompt",
            code="prompt_variable_missing",
        ) from None
    except TemplateError as exc:  # a sandbox refusal, a filter error
        log.warning("prompt %s (%s) failed to render: %s", label, part, exc)
        raise GatewayError(
            Fault.INVALID_REQUEST,
            f"The prompt `{label}` ({part}) failed to render: {quote(str(exc), 200)}.",
            param="metadata.prompt",
            code="prompt_render_failed",
        ) from None


def _replace_text(content: Any, rendered: str) -> Any:
    """The rendered text in place of the message's text; other parts (images) are kept."""
    if isinstance(content, list):
        others = [p for p in content if not (isinstance(p, dict) and p.get("type") == "text")]
        if others:
            return [{"type": "text", "text": rendered}, *others]
    return rendered
