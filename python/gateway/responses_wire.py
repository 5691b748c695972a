"""OpenAI Responses API <-> chat completions shapes: requests, items, the response object.

A Responses request is served as a chat request: its `input` items (messages with
`input_text` / `input_image` parts, `function_call` and `function_call_output` items), the
`instructions`, the stored history of `previous_response_id` and the function tools become one
chat body; the chat reply becomes a `response` object whose `output` holds a `message` item (its
`output_text`) and one `function_call` item per tool call. Plain dicts and one JSON decode: this
runs once per request, not per chunk.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from .errors import Fault, GatewayError, quote

_encode = msgspec.json.Encoder().encode
_ROLES = frozenset({"user", "assistant", "system", "developer"})
#: request fields the gateway serves (anything else is refused: a field silently dropped would
#: change what the client asked for)
_KNOWN = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "max_output_tokens",
        "stream",
        "store",
        "previous_response_id",
        "metadata",
        "user",
        "parallel_tool_calls",
        "text",
        "truncation",
        "reasoning",
        "include",
        "service_tier",
        "stream_options",
        "top_logprobs",
        "safety_identifier",
        "prompt_cache_key",
    }
)


def invalid(message: str, param: str | None, code: str | None = None) -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param, code=code or "invalid_value")


def not_found(response_id: str, param: str | None = None) -> GatewayError:
    """OpenAI's 404 for a response the caller cannot see (or that does not exist)."""
    if param is not None:
        msg = f"Previous response with id '{quote(response_id)}' not found."
        return GatewayError(Fault.ROUTE_NOT_FOUND, msg, param=param, code="previous_response_not_found")
    msg = f"Response with id '{quote(response_id)}' not found."
    return GatewayError(Fault.ROUTE_NOT_FOUND, msg, code="response_not_found")


def new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


class ResponsesRequest(msgspec.Struct, gc=False):
    """What the way out and the store need from the client's request (the rest went to chat)."""

    id: str
    model: str
    stream: bool
    store: bool
    previous_response_id: str | None
    instructions: str | None
    #: this turn's input items, normalized (a string input is one user message)
    items: list[dict[str, Any]]
    #: the response object's echo of the request (tools, tool_choice, temperature, ...)
    echo: dict[str, Any]
    created_at: int


def _num(obj: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(
            f"Invalid type for '{name}': expected a decimal, but got a {type(v).__name__}.",
            name,
            "invalid_type",
        )
    if not lo <= v <= hi:
        raise invalid(
            f"Invalid '{name}': decimal above maximum value or below minimum value ({lo}-{hi}).", name
        )
    return float(v)


def _text_part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(f"Invalid '{where}': expected an object.", where, "invalid_type")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"Invalid '{where}.text': expected a string.", f"{where}.text", "invalid_type")
        return part
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise invalid(
                f"Invalid '{where}.image_url': expected an image URL (file_id is not supported).",
                f"{where}.image_url",
            )
        return part
    raise invalid(f"Invalid '{where}.type': unsupported content part {quote(str(kind))!r}.", f"{where}.type")


def normalize_items(raw: Any) -> list[dict[str, Any]]:
    """`input` as a list of items (checked: roles, part types, function items)."""
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list) or not raw:
        raise invalid(
            "Invalid 'input': expected a string or a non-empty array of items.", "input", "invalid_type"
        )
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"Invalid '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(
                    f"Invalid value: {quote(str(role))!r}. Supported values are: 'assistant', 'system', "
                    "'developer', and 'user'.",
                    f"{where}.role",
                )
            content = item.get("content")
            if isinstance(content, str):
                parts = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
            elif isinstance(content, list):
                parts = [_text_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
            else:
                raise invalid(
                    f"Invalid '{where}.content': expected a string or an array.", f"{where}.content"
                )
            items.append({**item, "type": "message", "content": parts})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise invalid(
                        f"Missing required parameter: '{where}.{name}'.",
                        f"{where}.{name}",
                        "missing_required_parameter",
                    )
            items.append(item)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise invalid(
                    f"Missing required parameter: '{where}.call_id'.",
                    f"{where}.call_id",
                    "missing_required_parameter",
                )
            if not isinstance(item.get("output"), str):
                raise invalid(
                    f"Invalid '{where}.output': expected a string.", f"{where}.output", "invalid_type"
                )
            items.append(item)
        else:
            raise invalid(
                f"Invalid '{where}.type': unsupported item type {quote(str(kind))!r}.", f"{where}.type"
            )
    return items


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "input_image":
        url: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail"):
            url["detail"] = part["detail"]
        return {"type": "image_url", "image_url": url}
    return {"type": "text", "text": part["text"]}


def items_to_messages(items: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    """Append the chat messages of `items` (input items or stored output items) to `out`: a
    message's text parts as one string (parts when it has an image), function calls as the
    tool calls of an assistant message, function outputs as `tool` messages."""
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item["role"]
            parts = item["content"]
            if all(p["type"] != "input_image" for p in parts):
                content: Any = "".join(p["text"] for p in parts)
            else:
                content = [_chat_part(p) for p in parts]
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last["content"] == "":
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise invalid("Invalid 'tools': expected an array.", "tools", "invalid_type")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else t
            raise invalid(
                f"Invalid 'tools[{i}].type': only function tools are supported, got {quote(str(kind))!r}.",
                f"tools[{i}].type",
            )
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise invalid(
                f"Missing required parameter: 'tools[{i}].name'.",
                f"tools[{i}].name",
                "missing_required_parameter",
            )
        fn: dict[str, Any] = {"name": t["name"]}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any) -> Any:
    if raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    raise invalid("Invalid 'tool_choice': 'auto', 'none', 'required' or a function.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise invalid("Invalid 'text.format': a json_schema needs 'name' and 'schema'.", "text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise invalid("Invalid 'text.format.type': 'text', 'json_object' or 'json_schema'.", "text.format.type")


def decode_request(body: bytes) -> tuple[ResponsesRequest, dict[str, Any]]:
    """The client's body -> (what the way out keeps, the chat body without the stored history)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise GatewayError(Fault.INVALID_JSON, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise invalid("The request body must be a JSON object.", None, "invalid_type")
    unknown = next((k for k in obj if k not in _KNOWN), None)
    if unknown is not None:
        raise invalid(f"Unknown parameter: '{quote(unknown)}'.", unknown, "unknown_parameter")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if "input" not in obj:
        raise invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    items = normalize_items(obj["input"])
    instructions = obj.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("Invalid 'instructions': expected a string.", "instructions", "invalid_type")
    prev = obj.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise invalid(
            "Invalid 'previous_response_id': expected a string.", "previous_response_id", "invalid_type"
        )
    stream, store = obj.get("stream", False), obj.get("store", True)
    for name, v in (
        ("stream", stream),
        ("store", store),
        ("parallel_tool_calls", obj.get("parallel_tool_calls", True)),
    ):
        if not isinstance(v, bool) and v is not None:
            raise invalid(f"Invalid type for '{name}': expected a boolean.", name, "invalid_type")
    chat: dict[str, Any] = {"model": model}
    temperature = _num(obj, "temperature", 0, 2)
    top_p = _num(obj, "top_p", 0, 1)
    max_out = obj.get("max_output_tokens")
    if max_out is not None and (isinstance(max_out, bool) or not isinstance(max_out, int) or max_out < 1):
        raise invalid("Invalid 'max_output_tokens': integer below minimum value (1).", "max_output_tokens")
    if temperature is not None:
        chat["temperature"] = obj["temperature"]
    if top_p is not None:
        chat["top_p"] = obj["top_p"]
    if max_out is not None:
        chat["max_tokens"] = max_out
    tools = _tools(obj["tools"]) if obj.get("tools") else None
    if tools:
        chat["tools"] = tools
    if obj.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(obj["tool_choice"])
    if obj.get("parallel_tool_calls") is not None and tools:
        chat["parallel_tool_calls"] = obj["parallel_tool_calls"]
    fmt = _response_format(obj.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    user = obj.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise invalid("Invalid type for 'user': expected a string.", "user", "invalid_type")
        chat["user"] = user
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("Invalid type for 'metadata': expected an object.", "metadata", "invalid_type")
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_out,
        "metadata": metadata or {},
        "parallel_tool_calls": obj.get("parallel_tool_calls", True),
        "temperature": obj.get("temperature"),
        "top_p": obj.get("top_p"),
        "tool_choice": obj.get("tool_choice", "auto"),
        "tools": obj.get("tools") or [],
        "text": obj.get("text") or {"format": {"type": "text"}},
        "user": user,
        "store": bool(store),
        "truncation": "disabled",
    }
    req = ResponsesRequest(
        new_id("resp_"), model, bool(stream), bool(store), prev, instructions, items, echo, int(time.time())
    )
    return req, chat


def chat_body(req: ResponsesRequest, chat: dict[str, Any], history: list[dict[str, Any]]) -> bytes:
    """The chat body: instructions (a system message), the history's messages, this turn's."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items_to_messages(history, messages)
    items_to_messages(req.items, messages)
    return _encode({**chat, "messages": messages})


def response_object(
    req: ResponsesRequest,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": req.id,
        "object": "response",
        "created_at": req.created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": req.model,
        "output": output,
        "previous_response_id": req.previous_response_id,
        "usage": usage,
        **req.echo,
    }


def usage_of(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def incomplete_reason(finish: str | None) -> str | None:
    if finish == "length":
        return "max_output_tokens"
    if finish == "content_filter":
        return "content_filter"
    return None


def message_item(req: ResponsesRequest, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_" + req.id[5:],
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(req: ResponsesRequest, index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{req.id[5:]}_{index}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def response_from_chat(req: ResponsesRequest, body: bytes) -> dict[str, Any]:
    """A unary chat completion -> the response object (choice 0)."""
    chat = msgspec.json.decode(body)
    choice = (chat.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if msg.get("content"):
        output.append(message_item(req, msg["content"]))
    for i, call in enumerate(msg.get("tool_calls") or ()):
        fn = call.get("function") or {}
        output.append(
            call_item(
                req,
                i,
                call.get("id") or f"call_{req.id[5:]}_{i}",
                fn.get("name") or "",
                fn.get("arguments") or "",
            )
        )
    u = chat.get("usage") or {}
    reason = incomplete_reason(choice.get("finish_reason"))
    usage = usage_of(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
    return response_object(req, "incomplete" if reason else "completed", output, usage, reason)
