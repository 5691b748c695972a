"""Request and response views: small msgspec Structs holding only what a stage reads.

The client's body is forwarded as bytes (unknown fields kept); these views validate the fields
the gateway relies on, and the types and ranges of OpenAI's standard parameters (`Meta`
constraints, `Literal` enums): msgspec checks them while decoding, at almost no cost, and only a
refused body is inspected again (`pipeline/validate.py`) to word the error as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# OpenAI's ranges (its API reference; the bounds its 400s quote)
Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
Choices = Annotated[int, Meta(ge=1, le=128)]
Stop = str | Annotated[list[str], Meta(max_length=4)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
LogitBias = dict[str, Annotated[float, Meta(ge=-100, le=100)]]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
PartType = Literal["text", "image_url", "input_audio", "file", "refusal"]


class StreamOptions(msgspec.Struct, gc=False):
    include_usage: bool | None = None


class ImageUrl(msgspec.Struct, gc=False):
    url: str
    detail: str | None = None


class InputAudio(msgspec.Struct, gc=False):
    data: str
    format: str


class FilePart(msgspec.Struct, gc=False):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class ContentPart(msgspec.Struct, gc=False):
    """One part of a message's content. Which field a `type` needs, and which types a role
    may send, are checked after decoding (`validate.message_suspect`)."""

    type: PartType
    text: str | None = None
    image_url: ImageUrl | None = None
    input_audio: InputAudio | None = None
    file: FilePart | None = None
    refusal: str | None = None


class ToolCallFunction(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct, gc=False):
    """A tool call in an upstream's answer (lenient: the gateway only counts it)."""

    function: ToolCallFunction | None = None
    id: str | None = None
    type: str | None = None


class ToolCallFunctionParam(msgspec.Struct, gc=False):
    name: str
    arguments: str


class ToolCallParam(msgspec.Struct, gc=False):
    """A tool call in a client's assistant message: OpenAI requires every field."""

    id: str
    type: Literal["function"]
    function: ToolCallFunctionParam


class Message(msgspec.Struct, gc=False):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class ChatRequestView(msgspec.Struct, gc=False):
    model: str
    messages: list[Message]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Choices | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    #: plain values: their shapes are checked (`validate.check_tools` ...) only when present
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    #: the end user (OpenAI's field); a session key of `affinity.key: user`
    user: str | None = None
    # only checked (OpenAI's types and ranges): the body is forwarded as sent
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Stop | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    seed: int | None = None
    logit_bias: LogitBias | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequestView(msgspec.Struct, gc=False):
    model: str
    prompt: str | list[Any]  # strings or token ids (msgspec allows one array type per union)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Choices | None = None
    #: 0 is allowed here (OpenAI's reference: minimum 0, e.g. with `echo`)
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    user: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Stop | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    seed: int | None = None
    logit_bias: LogitBias | None = None
    echo: bool | None = None
    best_of: Annotated[int, Meta(ge=0, le=20)] | None = None
    suffix: str | None = None


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
