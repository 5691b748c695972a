"""Stage `decode`: validate the body as an OpenAI request and decode a typed view of it.

The body stays bytes (forwarded as sent, unknown fields included); msgspec decodes only the
fields the gateway reads, straight from the bytes, and checks OpenAI's types and ranges as it
goes. A refused body is refused as OpenAI would (`validate.py`: status, `param`, `code`).
"""

from __future__ import annotations

import re

import msgspec

from .. import _fastpath
from ..config import ServerConfig
from ..context import Endpoint, RequestContext
from ..embeddings import validate as validate_embeddings
from ..errors import JSON_ERRORS, Fault, GatewayError, json_error, quote
from ..schemas import ChatRequestView, CompletionRequestView, EmbeddingsRequestView, RequestView
from .stage import Part
from .validate import (
    STREAM_OPTIONS_WITHOUT_STREAM,
    check,
    check_response_format,
    check_tool_choice,
    check_tools,
    message_suspect,
)

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


def _param_of(message: str) -> str | None:
    """The offending parameter of a msgspec validation message (`messages[0].role`); for a
    missing field that is the field itself, not the object that lacks it."""
    m = _PATH.search(message)
    path = m.group(1) if m else ""
    missing = _MISSING.match(message)
    if missing is not None:
        return f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def _slow_check(endpoint: Endpoint, body: bytes) -> None:
    """Raise OpenAI's error for `body` (decoded again as plain JSON), if it has one."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise GatewayError(Fault.INVALID_JSON, f"The request body is not valid JSON: {exc}") from None
    except (msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return  # (a number out of range; the fast path's own handlers word the others)
    check(endpoint, obj)


class DecodeStage(Part):
    name = "decode"
    __slots__ = ("_decoders", "max_depth")

    def __init__(self, server: ServerConfig) -> None:
        self.max_depth = server.max_json_depth
        self._decoders: dict[Endpoint, msgspec.json.Decoder[RequestView]] = {
            Endpoint.CHAT: msgspec.json.Decoder(ChatRequestView),
            Endpoint.COMPLETIONS: msgspec.json.Decoder(CompletionRequestView),
            Endpoint.EMBEDDINGS: msgspec.json.Decoder(EmbeddingsRequestView),
        }

    async def on_request(self, ctx: RequestContext) -> None:
        body = ctx.body
        if not body.strip():
            raise GatewayError(Fault.INVALID_JSON, "The request body is empty; expected a JSON object.")
        # Cheap bound first: fewer brackets than the limit cannot nest deeper than it.
        if body.count(b"[") + body.count(b"{") > self.max_depth and _fastpath.json_depth_exceeds(
            body, self.max_depth
        ):
            raise GatewayError(
                Fault.JSON_TOO_DEEP, f"The request JSON is nested deeper than {self.max_depth} levels."
            )
        if ctx.dialect is not None:  # another client API (Anthropic): now an OpenAI chat body
            ctx.dialect.decode(ctx)
            body = ctx.body
        try:
            view = self._decoders[ctx.endpoint].decode(body)
        except msgspec.ValidationError as exc:
            # the slow path: OpenAI's error for this body (msgspec's words only if it finds none)
            _slow_check(ctx.endpoint, body)
            msg = str(exc)
            raise GatewayError(
                Fault.INVALID_REQUEST, f"Invalid request: {quote(msg, 300)}", param=_param_of(msg)
            ) from None
        except JSON_ERRORS as exc:
            raise json_error(exc) from None
        if isinstance(view, EmbeddingsRequestView):  # unary, no n / max_tokens: its own rules
            validate_embeddings(view)
            ctx.view = view
            return
        # what msgspec cannot express: a few reads here, the exact error from the slow path
        if view.stream_options is not None and view.stream is not True:
            raise STREAM_OPTIONS_WITHOUT_STREAM
        if type(view) is ChatRequestView:
            if not view.model or not view.messages or message_suspect(view.messages):
                _slow_check(ctx.endpoint, body)
            if view.tools is not None:
                check_tools(view.tools)
            if view.tool_choice is not None:
                check_tool_choice(view.tool_choice, view.tools)
            if view.response_format is not None:
                check_response_format(view.response_format)
        elif not view.model:
            _slow_check(ctx.endpoint, body)
        ctx.view = view
        ctx.stream = view.stream is True
        opts = view.stream_options
        ctx.client_wants_usage = ctx.stream and opts is not None and opts.include_usage is True
