"""Anthropic Messages <-> OpenAI chat: the request and reply shapes, both ways.

Used by the Messages dialect (`pipeline/messages.py`: Anthropic clients, any upstream) and by the
`anthropic` provider kind (`upstreams/anthropic_http.py`: OpenAI clients, an Anthropic upstream).
Request fields the translation does not know pass through as sent (as the gateway does for chat);
Anthropic-only fields with no OpenAI meaning (`thinking`, `service_tier`, ...) are dropped.
Stop reasons: end_turn <-> stop, max_tokens <-> length, tool_use <-> tool_calls, stop_sequence
<-> stop (with vLLM's `stop_reason` naming the sequence, when the upstream says which one).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from .errors import JSON_ERRORS, Fault, GatewayError, json_error

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder()
_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])

# ---- the Anthropic request ----------------------------------------------------------------------


class CacheControl(msgspec.Struct, gc=False):
    type: str = "ephemeral"


class TextBlock(msgspec.Struct, tag="text", tag_field="type", gc=False):
    text: str
    cache_control: Any = None
    citations: Any = None


class ImageSource(msgspec.Struct, gc=False):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(msgspec.Struct, tag="image", tag_field="type", gc=False):
    source: ImageSource
    cache_control: Any = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", gc=False):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Any = None


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type", gc=False):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None
    cache_control: Any = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", gc=False):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type", gc=False):
    data: str


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type", gc=False):
    source: Any = None


Block = (
    TextBlock
    | ImageBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | DocumentBlock
)


class Message(msgspec.Struct, gc=False):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Metadata(msgspec.Struct, gc=False):
    user_id: str | None = None


class Tool(msgspec.Struct, gc=False):
    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None
    cache_control: Any = None


class ToolChoice(msgspec.Struct, gc=False):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(msgspec.Struct, gc=False):
    model: str
    messages: list[Message]
    max_tokens: int
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class CountTokensRequest(msgspec.Struct, gc=False):
    """`/v1/messages/count_tokens`: no `max_tokens`, no sampling."""

    model: str
    messages: list[Message]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


#: fields translated (or checked) by name; every other field passes through
_KNOWN = frozenset(
    (
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
        "tools",
        "tool_choice",
    )
)
#: Anthropic features with no OpenAI counterpart: dropped, not forwarded to an OpenAI upstream
_DROPPED = frozenset(
    ("thinking", "service_tier", "container", "mcp_servers", "context_management", "betas", "output_format")
)

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")
_request = msgspec.json.Decoder(MessagesRequest)
_count_request = msgspec.json.Decoder(CountTokensRequest)


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param)


def _validation_message(exc: msgspec.ValidationError) -> GatewayError:
    """msgspec's message in Anthropic's words: `path: what is wrong`."""
    msg = str(exc)
    m = _PATH.search(msg)
    path = m.group(1) if m else ""
    missing = _MISSING.match(msg)
    if missing is not None:
        field = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return _invalid(f"{field}: Field required", field)
    text = _PATH.sub("", msg)
    return _invalid(f"{path}: {text}" if path else text, path or None)


def decode_request(
    body: bytes, count_only: bool = False
) -> tuple[MessagesRequest | CountTokensRequest, dict[str, msgspec.Raw]]:
    """Validate an Anthropic request as Anthropic does (types, required fields, ranges, block
    placement); -> the typed request and its top-level raw fields."""
    try:
        top = _raw_top.decode(body)
        req = (_count_request if count_only else _request).decode(body)
    except msgspec.ValidationError as exc:
        if not body.lstrip().startswith(b"{"):
            raise _invalid("The request body must be a JSON object.") from None
        raise _validation_message(exc) from None
    except JSON_ERRORS as exc:
        raise json_error(exc) from None
    if not req.model:
        raise _invalid("model: String should have at least 1 character", "model")
    if not req.messages:
        raise _invalid("messages: at least one message is required", "messages")
    if isinstance(req, MessagesRequest):
        if req.max_tokens < 1:
            raise _invalid("max_tokens: Input should be greater than or equal to 1", "max_tokens")
        for name in ("temperature", "top_p"):
            v = getattr(req, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise _invalid(f"{name}: Input should be between 0 and 1", name)
        if req.top_k is not None and req.top_k < 0:
            raise _invalid("top_k: Input should be greater than or equal to 0", "top_k")
        if req.stop_sequences is not None:
            for i, s in enumerate(req.stop_sequences):
                if not s.strip():
                    raise _invalid(
                        f"stop_sequences[{i}]: each stop sequence must contain non-whitespace",
                        f"stop_sequences.{i}",
                    )
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            continue
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(b, ToolUseBlock) and m.role != "assistant":
                raise _invalid(f"{where}: `tool_use` blocks can only be in `assistant` messages", where)
            if isinstance(b, ToolResultBlock) and m.role != "user":
                raise _invalid(f"{where}: `tool_result` blocks can only be in `user` messages", where)
            if isinstance(b, DocumentBlock):
                raise _invalid(f"{where}: `document` blocks are not supported by this gateway", where)
            if isinstance(b, ImageBlock) and m.role != "user":
                raise _invalid(f"{where}: images can only be in `user` messages", where)
    for i, t in enumerate(req.tools or ()):
        if t.type not in (None, "custom"):
            raise _invalid(f"tools.{i}.type: server tools (`{t.type[:64]}`) are not supported", f"tools.{i}")
        if t.input_schema is None:
            raise _invalid(f"tools.{i}.input_schema: Field required", f"tools.{i}.input_schema")
    tc = req.tool_choice
    if tc is not None and tc.type == "tool" and not tc.name:
        raise _invalid("tool_choice.name: Field required for tool_choice of type `tool`", "tool_choice.name")
    return req, top


def _text_of(blocks: list[TextBlock]) -> str:
    return "\n".join(b.text for b in blocks)


def _image_part(b: ImageBlock) -> dict[str, Any]:
    s = b.source
    url = s.url if s.type == "url" else f"data:{s.media_type};base64,{s.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(b: ToolResultBlock) -> str:
    c = b.content
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if any(isinstance(p, ImageBlock) for p in c):
        raise _invalid("tool_result: images in tool results are not supported by this gateway")
    return "\n".join(p.text for p in c if isinstance(p, TextBlock))


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic system + messages -> OpenAI chat messages: tool_result blocks become `tool`
    messages (before the rest of their user turn), tool_use blocks the assistant's tool_calls."""
    out: list[dict[str, Any]] = []
    system = req.system
    if system:
        out.append({"role": "system", "content": system if isinstance(system, str) else _text_of(system)})
    for m in req.messages:
        content = m.content
        if isinstance(content, str):
            out.append({"role": m.role, "content": content})
            continue
        if m.role == "assistant":
            texts = [b.text for b in content if isinstance(b, TextBlock)]
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": _encode(b.input).decode()},
                }
                for b in content
                if isinstance(b, ToolUseBlock)
            ]
            if calls:
                msg["tool_calls"] = calls
            elif msg["content"] is None:
                msg["content"] = ""
            out.append(msg)
            continue
        parts: list[dict[str, Any]] = []
        for b in content:
            if isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _tool_result_text(b)})
            elif isinstance(b, TextBlock):
                parts.append({"type": "text", "text": b.text})
            elif isinstance(b, ImageBlock):
                parts.append(_image_part(b))
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        elif parts:
            out.append({"role": "user", "content": parts})
    return out


def chat_tools(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    tools = []
    for t in req.tools:
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema}
        if t.description is not None:
            fn["description"] = t.description
        tools.append({"type": "function", "function": fn})
    return tools


def chat_tool_choice(tc: ToolChoice | None) -> Any:
    if tc is None:
        return None
    if tc.type == "tool":
        return {"type": "function", "function": {"name": tc.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[tc.type]


def to_chat_body(req: MessagesRequest | CountTokensRequest, top: dict[str, msgspec.Raw]) -> bytes:
    """The OpenAI chat request equivalent to an Anthropic one (unknown fields as sent). A stream
    asks for the usage chunk: `message_delta` carries the usage."""
    out: dict[str, Any] = {k: v for k, v in top.items() if k not in _KNOWN and k not in _DROPPED}
    out["model"] = req.model
    out["messages"] = chat_messages(req)
    tools = chat_tools(req)
    if tools is not None:
        out["tools"] = tools
    choice = chat_tool_choice(req.tool_choice)
    if choice is not None:
        out["tool_choice"] = choice
        if req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        out["max_tokens"] = req.max_tokens
        if req.stop_sequences:
            out["stop"] = req.stop_sequences
        for name in ("temperature", "top_p", "top_k"):
            v = getattr(req, name)
            if v is not None:
                out[name] = v
        if req.metadata is not None and req.metadata.user_id is not None:
            out["user"] = req.metadata.user_id
        if req.stream:
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
    return _encode(out)


# ---- the OpenAI reply -> Anthropic -------------------------------------------------------------

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish: str | None, matched: Any, stops: list[str] | None) -> tuple[str, str | None]:
    """OpenAI finish_reason (+ vLLM's `stop_reason`, the matched stop string) -> Anthropic's
    (stop_reason, stop_sequence)."""
    if finish == "stop" and isinstance(matched, str) and stops and matched in stops:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish or "stop", "end_turn"), None


class _Fn(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _Call(msgspec.Struct, gc=False):
    id: str | None = None
    function: _Fn | None = None
    index: int = 0


class _Msg(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct, gc=False):
    message: _Msg | None = None
    finish_reason: str | None = None
    stop_reason: Any = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(msgspec.Struct, gc=False):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_completion = msgspec.json.Decoder(_Completion)


def tool_input(arguments: str | None) -> Any:
    """A tool call's JSON arguments as Anthropic's `input` object ({} for none; text that is not
    a JSON object is kept under `_raw`)."""
    if not arguments:
        return {}
    try:
        value = _decode_any.decode(arguments)
    except msgspec.DecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def message_from_chat(body: bytes, msg_id: str, model: str, stops: list[str] | None) -> bytes:
    """A unary chat.completion -> an Anthropic `message`."""
    try:
        comp = _completion.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise GatewayError(
            Fault.UPSTREAM_BAD_RESPONSE, "The upstream returned an invalid chat completion."
        ) from None
    content: list[dict[str, Any]] = []
    finish: str | None = None
    matched: Any = None
    if comp.choices:
        choice = comp.choices[0]
        finish, matched = choice.finish_reason, choice.stop_reason
        msg = choice.message
        if msg is not None:
            if msg.content:
                content.append({"type": "text", "text": msg.content})
            for i, call in enumerate(msg.tool_calls or ()):
                fn = call.function or _Fn()
                content.append(
                    {
                        "type": "tool_use",
                        "id": call.id or f"toolu_{msg_id}_{i}",
                        "name": fn.name or "",
                        "input": tool_input(fn.arguments),
                    }
                )
    reason, sequence = stop_reason(finish, matched, stops)
    usage = comp.usage or _Usage()
    return _encode(
        {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
        }
    )


# ---- errors -------------------------------------------------------------------------------------

#: OpenAI error type / our fault -> Anthropic (status, type). Anthropic answers 529
#: `overloaded_error` where it has no capacity; a gateway with no free deployment or an
#: unavailable upstream is that, for its clients.
_OVERLOADED = frozenset(
    (Fault.UPSTREAM_UNAVAILABLE, Fault.UPSTREAM_CAPACITY, Fault.LIMITER_UNAVAILABLE, Fault.GUARD_UNAVAILABLE)
)
_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_status_type(fault: Fault) -> tuple[int, str]:
    if fault in _OVERLOADED:
        return 529, "overloaded_error"
    status = fault.status
    kind = _BY_STATUS.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "api_error"
    return status, kind


_OVERLOADED_CODES = frozenset(f.code for f in _OVERLOADED)
_SAME_TYPES = frozenset(
    (
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "timeout_error",
    )
)


def error_type_of(openai_type: str | None, code: str | None) -> str:
    """The Anthropic error type of an error event (OpenAI `type`, our `code`), as the Rust
    `MessagesStream` maps it."""
    if code in _OVERLOADED_CODES:
        return "overloaded_error"
    return openai_type if openai_type in _SAME_TYPES else "api_error"


def error_body(kind: str, message: str, request_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return _encode(body)


# ---- OpenAI chat request -> Anthropic (the `anthropic` provider kind) ---------------------------

#: OpenAI fields with no Messages counterpart: not forwarded to an Anthropic upstream
_OPENAI_ONLY = frozenset(
    (
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "logit_bias",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "store",
        "reasoning_effort",
    )
)


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, _, data = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                out.append(_image_block(url))
    return out


def _text_content(content: Any) -> str:
    return "\n".join(b["text"] for b in _blocks(content) if b["type"] == "text")


def messages_from_chat(body: bytes, default_max_tokens: int) -> bytes:
    """An OpenAI chat request -> the Anthropic Messages request for it: system messages become
    `system`, tool messages `tool_result` blocks of a user turn, tool_calls `tool_use` blocks;
    fields Messages has no place for are dropped, others (`top_k`, `thinking`, ...) go as sent."""
    try:
        req = _decode_any.decode(body)
    except msgspec.DecodeError:
        raise _invalid("The request body is not valid JSON.") from None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        raise _invalid("`messages` must be a list.", "messages")
    n = req.get("n")
    if isinstance(n, int) and n > 1:
        raise GatewayError(
            Fault.UNSUPPORTED_PARAMETER,
            "This model (Anthropic Messages) answers one choice: `n` must be 1.",
            param="n",
        )
    out: dict[str, Any] = {k: v for k, v in req.items() if k not in _OPENAI_ONLY}
    out["model"] = req.get("model")
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:  # Messages alternates: merge a turn's parts
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})

    for m in req["messages"]:
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_content(m.get("content")))
        elif role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": str(m.get("tool_call_id") or ""),
                        "content": _text_content(m.get("content")),
                    }
                ],
            )
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    args = fn.get("arguments")
                    blocks.append(
                        {
                            "type": "tool_use",
                            "id": call.get("id") or "",
                            "name": fn.get("name") or "",
                            "input": tool_input(args if isinstance(args, str) else None),
                        }
                    )
            add("assistant", blocks)
        else:
            add("user", _blocks(m.get("content")))
    if system:
        out["system"] = "\n".join(system)
    out["messages"] = messages
    limit = req.get("max_completion_tokens") or req.get("max_tokens")
    out["max_tokens"] = limit if isinstance(limit, int) and limit > 0 else default_max_tokens
    stop = req.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    temperature = req.get("temperature")
    if isinstance(temperature, int | float):
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's 0-2, Messages' 0-1
    if req.get("top_p") is not None:
        out["top_p"] = req["top_p"]
    if isinstance(req.get("user"), str):
        out["metadata"] = {"user_id": req["user"]}
    tools = req.get("tools")
    if isinstance(tools, list) and tools:
        converted = []
        for t in tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if isinstance(fn, dict):
                tool = {"name": fn.get("name"), "input_schema": fn.get("parameters") or {"type": "object"}}
                if fn.get("description"):
                    tool["description"] = fn["description"]
                converted.append(tool)
        out["tools"] = converted
    choice = req.get("tool_choice")
    tc: dict[str, Any] | None = None
    if isinstance(choice, str):
        tc = {"type": {"required": "any"}.get(choice, choice)}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        tc = {"type": "tool", "name": choice["function"].get("name")}
    if tc is not None:
        if req.get("parallel_tool_calls") is False and tc["type"] != "none":
            tc["disable_parallel_tool_use"] = True
        out["tool_choice"] = tc
    if req.get("stream") is True:
        out["stream"] = True
    return _encode(out)
