"""Request and response views: small msgspec Structs holding only what a stage reads.

The client's body is forwarded as bytes (unknown fields kept); these views validate the fields
the gateway relies on and give type errors with their JSON path.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, gc=False):
    include_usage: bool | None = None


class ContentPart(msgspec.Struct, gc=False):
    type: str
    text: str | None = None


class ToolCallFunction(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct, gc=False):
    function: ToolCallFunction | None = None
    id: str | None = None
    type: str | None = None


class Message(msgspec.Struct, gc=False):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequestView(msgspec.Struct, gc=False):
    model: str
    messages: list[Message]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    #: the end user (OpenAI's field); a session key of `affinity.key: user`. Any: a non-string
    #: is the upstream's to judge, not a new 400 here
    user: Any = None


class CompletionRequestView(msgspec.Struct, gc=False):
    model: str
    prompt: str | list[Any]  # strings or token ids (msgspec allows one array type per union)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    max_tokens: int | None = None
    user: Any = None


class EmbeddingsRequestView(msgspec.Struct, gc=False):
    """`POST /v1/embeddings`. `input` is a string, or an array of strings, of token ids or of
    arrays of token ids (one array type per msgspec union: the items are checked by
    `gateway.embeddings.validate`, with OpenAI's limits)."""

    model: str
    input: str | list[Any]
    encoding_format: str | None = None
    dimensions: int | None = None
    user: Any = None


#: the views of the generating endpoints (what the Triton chat mapping takes)
GenerationView = ChatRequestView | CompletionRequestView
RequestView = GenerationView | EmbeddingsRequestView


class PromptTokensDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None


class Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: as the upstream reported it (the cached prompt tokens, for `/metrics`); UNSET is never
    #: encoded, so usage the gateway fills in has the three counts only
    prompt_tokens_details: PromptTokensDetails | msgspec.UnsetType | None = msgspec.UNSET


class ResponseUsageView(msgspec.Struct, gc=False):
    """Just enough of a chat.completion / text_completion body to settle usage."""

    usage: Usage | None = None


class ChoiceMessageView(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChoiceView(msgspec.Struct, gc=False):
    message: ChoiceMessageView | None = None
    text: str | None = None


class ResponseChoicesView(msgspec.Struct, gc=False):
    choices: list[ChoiceView] = []


class UpstreamErrorDetail(msgspec.Struct, gc=False):
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class UpstreamErrorView(msgspec.Struct, gc=False):
    error: UpstreamErrorDetail | str | None = None
    message: str | None = None  # some servers answer {"message": ...} or {"detail": ...}
    detail: str | None = None


class ModelCard(msgspec.Struct, gc=False):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct, gc=False):
    data: list[ModelCard]
    object: str = "list"
