"""OpenAI's request validation for chat and legacy completions: its status, `param`, `code` and
wording, for every standard parameter.

Two paths keep the common request cheap. The views (`schemas.py`) carry OpenAI's types and
ranges as msgspec constraints, so decoding a valid body checks it at almost no extra cost; what
msgspec cannot say (a tool message needs `tool_call_id`, which part types a role may send,
`stream_options` only with `stream`) is a few attribute reads on the decoded view
(`message_suspect`), and the shapes of `tools`, `tool_choice` and `response_format` are checked
only when present. A body msgspec refuses, or the view finds suspect, takes the slow path:
`check(endpoint, obj)` walks the plain decoded JSON and raises the error OpenAI gives for it.

Error wording follows the bodies OpenAI returns (quoted in public issue threads): "Invalid type
for 'temperature': expected a decimal, but got a string instead." (`invalid_type`), "Invalid
'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead."
(`integer_below_min_value`), "Invalid 'messages': empty array. ..." (`empty_array`), "Invalid
value: 'image'. Supported values are: ..." (`invalid_value`), "Invalid 'tools[0].function.name':
string does not match pattern. ..." (`invalid_value`), "Missing required parameter:
'response_format.json_schema.name'." (`missing_required_parameter`), and the two refusals OpenAI
sends with `code: null` (a tool message without `tool_call_id`, `stream_options` without
`stream`). Where no real body was found the wording follows the same pattern (marked below).
"""

from __future__ import annotations

import re
from typing import Any

from ..context import Endpoint
from ..errors import ErrorDetail, Fault, GatewayError, quote
from ..schemas import Message

#: OpenAI's order in its own message ("Supported values are: 'system', 'assistant', ...")
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
#: the part types each role may send (OpenAI's per-role content-part unions)
PART_TYPES: dict[str, tuple[str, ...]] = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
    "function": ("text",),
}
#: roles whose message may leave `content` out (an assistant's tool calls; a legacy function result)
_CONTENT_OPTIONAL = ("assistant", "function")
_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_NAME_PATTERN = "^[a-zA-Z0-9_-]+$"
_NAME_MAX = 64
_TOOL_CHOICES = ("none", "auto", "required")
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class NullCodeError(GatewayError):
    """A refusal OpenAI sends with `"code": null`; observers still count it by the fault's code."""

    __slots__ = ()

    def detail(self) -> ErrorDetail:
        return ErrorDetail(self.message, self.fault.type, self.param, None)


def _err(param: str | None, message: str, code: str) -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param, code=code)


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "a boolean"
    if type(value) is int:
        return "an integer"
    if type(value) is float:
        return "a decimal"
    if type(value) is str:
        return "a string"
    if type(value) is list:
        return "an array"
    return "an object"


def _num(value: float) -> str:
    if type(value) is float and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    try:
        return quote(repr(value), 40)
    except ValueError:  # an int too long to print (Python's int-to-str limit)
        return "a very large number"


def _values(values: tuple[str, ...]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) < 3:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def missing(param: str) -> GatewayError:
    return _err(param, f"Missing required parameter: '{param}'.", "missing_required_parameter")


def invalid_type(param: str, value: Any, expected: str) -> GatewayError:
    return _err(
        param,
        f"Invalid type for '{param}': expected {expected}, but got {_got(value)} instead.",
        "invalid_type",
    )


def invalid_value(param: str, value: str, allowed: tuple[str, ...]) -> GatewayError:
    return _err(
        param, f"Invalid value: '{quote(value)}'. Supported values are: {_values(allowed)}.", "invalid_value"
    )


# ---- scalars ---------------------------------------------------------------------------------
def _decimal(param: str, value: Any, lo: float | None, hi: float | None) -> None:
    if value is None:
        return
    if type(value) is not int and type(value) is not float:
        raise invalid_type(param, value, "a decimal")
    if hi is not None and value > hi:
        raise _err(
            param,
            f"Invalid '{param}': decimal above maximum value. Expected a value <= {_num(hi)}, "
            f"but got {_num(value)} instead.",
            "decimal_above_max_value",
        )
    if lo is not None and value < lo:
        raise _err(
            param,
            f"Invalid '{param}': decimal below minimum value. Expected a value >= {_num(lo)}, "
            f"but got {_num(value)} instead.",
            "decimal_below_min_value",
        )


def _integer(param: str, value: Any, lo: int | None, hi: int | None) -> None:
    if value is None:
        return
    if type(value) is not int:
        raise invalid_type(param, value, "an integer")
    if hi is not None and value > hi:
        raise _err(
            param,
            f"Invalid '{param}': integer above maximum value. Expected a value <= {hi}, "
            f"but got {_num(value)} instead.",
            "integer_above_max_value",
        )
    if lo is not None and value < lo:
        raise _err(
            param,
            f"Invalid '{param}': integer below minimum value. Expected a value >= {lo}, "
            f"but got {_num(value)} instead.",
            "integer_below_min_value",
        )


def _string(param: str, value: Any) -> None:
    if value is not None and type(value) is not str:
        raise invalid_type(param, value, "a string")


def _boolean(param: str, value: Any) -> None:
    if value is not None and value is not True and value is not False:
        raise invalid_type(param, value, "a boolean")


def _object(param: str, value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise invalid_type(param, value, "an object")
    return value


def _stop(value: Any) -> None:
    if value is None or type(value) is str:
        return
    if type(value) is not list:
        raise invalid_type("stop", value, "one of a string or array of strings")
    for i, item in enumerate(value):
        _string(f"stop[{i}]", item)
        if item is None:
            raise invalid_type(f"stop[{i}]", item, "a string")
    if len(value) > 4:
        raise _err(
            "stop",
            "Invalid 'stop': array too long. Expected an array with maximum length 4, "
            f"but got an array with length {len(value)} instead.",
            "array_above_max_length",
        )


def _logit_bias(value: Any) -> None:
    if value is None:
        return
    # the param names the map, not the token (unconfirmed: no real body found for a bad entry)
    for bias in _object("logit_bias", value).values():
        _decimal("logit_bias", bias, -100, 100)
        if bias is None:
            raise invalid_type("logit_bias", bias, "a decimal")


def _name(param: str, value: Any) -> None:
    """A function / schema name: OpenAI's pattern, at most 64 characters."""
    if value is None:
        raise missing(param)
    if type(value) is not str:
        raise invalid_type(param, value, "a string")
    if not _NAME.fullmatch(value):
        raise _err(
            param,
            f"Invalid '{param}': string does not match pattern. Expected a string that matches "
            f"the pattern '{_NAME_PATTERN}'.",
            "invalid_value",
        )
    if len(value) > _NAME_MAX:
        # wording after OpenAI's other length errors (unconfirmed for names)
        raise _err(
            param,
            f"Invalid '{param}': string too long. Expected a string with maximum length {_NAME_MAX}, "
            f"but got a string with length {len(value)} instead.",
            "string_above_max_length",
        )


def _model(obj: dict[str, Any]) -> None:
    # OpenAI's wording for a missing model varies by route ("you must provide a model parameter");
    # this follows its missing-parameter pattern, and an empty name counts as none
    model = obj.get("model")
    if model is None or model == "":
        raise missing("model")
    _string("model", model)


def _stream(obj: dict[str, Any]) -> None:
    _boolean("stream", obj.get("stream"))
    opts = obj.get("stream_options")
    if opts is None:
        return
    _boolean("stream_options.include_usage", _object("stream_options", opts).get("include_usage"))
    if obj.get("stream") is not True:
        raise STREAM_OPTIONS_WITHOUT_STREAM


STREAM_OPTIONS_WITHOUT_STREAM = NullCodeError(
    Fault.INVALID_REQUEST,
    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
    param="stream_options",
)


# ---- messages --------------------------------------------------------------------------------
def _message(p: str, m: Any) -> None:
    msg = _object(p, m)
    role = msg.get("role")
    if role is None:
        raise missing(f"{p}.role")
    if type(role) is not str:
        raise invalid_type(f"{p}.role", role, "a string")
    if role not in PART_TYPES:
        raise invalid_value(f"{p}.role", role, ROLES)
    content = msg.get("content")
    if content is None:
        if role not in _CONTENT_OPTIONAL:
            raise missing(f"{p}.content")
    elif type(content) is list:
        if not content:  # wording after OpenAI's `messages` (unconfirmed for content)
            raise _err(
                f"{p}.content",
                f"Invalid '{p}.content': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                "empty_array",
            )
        allowed = PART_TYPES[role]
        for j, part in enumerate(content):
            _part(f"{p}.content[{j}]", part, allowed)
    elif type(content) is not str:
        raise invalid_type(f"{p}.content", content, "one of a string or array of objects")
    _string(f"{p}.name", msg.get("name"))
    _string(f"{p}.refusal", msg.get("refusal"))
    call_id = msg.get("tool_call_id")
    _string(f"{p}.tool_call_id", call_id)
    if role == "tool" and call_id is None:
        # OpenAI's own body: code null (its param reads `messages.[1].tool_call_id`; the usual
        # path form here)
        raise NullCodeError(
            Fault.INVALID_REQUEST,
            "Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.",
            param=f"{p}.tool_call_id",
        )
    calls = msg.get("tool_calls")
    if calls is not None:
        if type(calls) is not list:
            raise invalid_type(f"{p}.tool_calls", calls, "an array")
        for k, call in enumerate(calls):
            _tool_call(f"{p}.tool_calls[{k}]", call)


def _required_string(param: str, value: Any) -> None:
    if value is None:
        raise missing(param)
    _string(param, value)


def _tool_call(p: str, call: Any) -> None:
    c = _object(p, call)
    _required_string(f"{p}.id", c.get("id"))
    kind = c.get("type")
    if kind is None:
        raise missing(f"{p}.type")
    if type(kind) is not str:
        raise invalid_type(f"{p}.type", kind, "a string")
    if kind != "function":
        raise invalid_value(f"{p}.type", kind, ("function",))
    fn = c.get("function")
    if fn is None:
        raise missing(f"{p}.function")
    f = _object(f"{p}.function", fn)
    _required_string(f"{p}.function.name", f.get("name"))
    _required_string(f"{p}.function.arguments", f.get("arguments"))


def _part(p: str, part: Any, allowed: tuple[str, ...]) -> None:
    d = _object(p, part)
    kind = d.get("type")
    if kind is None:
        raise missing(f"{p}.type")
    if type(kind) is not str:
        raise invalid_type(f"{p}.type", kind, "a string")
    if kind not in allowed:
        raise invalid_value(f"{p}.type", kind, allowed)
    # every field's type (as msgspec checks them), then the one this type needs
    _string(f"{p}.text", d.get("text"))
    _string(f"{p}.refusal", d.get("refusal"))
    image = d.get("image_url")
    if image is not None:
        img = _object(f"{p}.image_url", image)
        _required_string(f"{p}.image_url.url", img.get("url"))
        _string(f"{p}.image_url.detail", img.get("detail"))
    audio = d.get("input_audio")
    if audio is not None:
        a = _object(f"{p}.input_audio", audio)
        _required_string(f"{p}.input_audio.data", a.get("data"))
        _required_string(f"{p}.input_audio.format", a.get("format"))
    file = d.get("file")
    if file is not None:
        fd = _object(f"{p}.file", file)
        for key in ("file_data", "file_id", "filename"):
            _string(f"{p}.file.{key}", fd.get(key))
    if d.get(kind) is None:
        raise missing(f"{p}.{kind}")


def message_suspect(messages: list[Message]) -> bool:
    """True when a decoded message breaks a rule msgspec cannot express (role-dependent
    content and fields): the caller then runs the slow path for the exact error. A few
    attribute reads per message."""
    for m in messages:
        content = m.content
        role = m.role
        if content is None:
            if role != "assistant" and role != "function":
                return True
        elif type(content) is list:
            if not content:
                return True
            allowed = PART_TYPES[role]
            for part in content:
                kind = part.type
                if kind not in allowed or getattr(part, kind) is None:
                    return True
        if role == "tool" and m.tool_call_id is None:
            return True
    return False


# ---- tools, tool_choice, response_format (plain values; only when present) -------------------
def _tools_ok(tools: list[Any]) -> bool:
    """The common case, without building a single parameter path."""
    for t in tools:
        if type(t) is not dict:
            return False
        kind = t.get("type")
        if kind == "custom":
            continue
        f = t.get("function")
        if kind != "function" or type(f) is not dict:
            return False
        name = f.get("name")
        if type(name) is not str or len(name) > _NAME_MAX or _NAME.fullmatch(name) is None:
            return False
        desc, params, strict = f.get("description"), f.get("parameters"), f.get("strict")
        if desc is not None and type(desc) is not str:
            return False
        if params is not None and type(params) is not dict:
            return False
        if strict is not None and strict is not True and strict is not False:
            return False
    return True


def check_tools(tools: Any) -> None:
    if tools is None or (type(tools) is list and _tools_ok(tools)):
        return
    if type(tools) is not list:
        raise invalid_type("tools", tools, "an array")
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        t = _object(p, tool)
        kind = t.get("type")
        if kind is None:
            raise missing(f"{p}.type")
        if type(kind) is not str:
            raise invalid_type(f"{p}.type", kind, "a string")
        if kind == "custom":  # OpenAI's free-form tools: theirs to judge
            continue
        if kind != "function":
            raise invalid_value(f"{p}.type", kind, ("function", "custom"))
        fn = t.get("function")
        if fn is None:
            raise missing(f"{p}.function")
        f = _object(f"{p}.function", fn)
        _name(f"{p}.function.name", f.get("name"))
        _string(f"{p}.function.description", f.get("description"))
        params = f.get("parameters")
        if params is not None:
            _object(f"{p}.function.parameters", params)
        _boolean(f"{p}.function.strict", f.get("strict"))


_TOOL_CHOICE_WITHOUT_TOOLS = NullCodeError(
    Fault.INVALID_REQUEST,
    "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
    param="tool_choice",
)


def check_tool_choice(choice: Any, tools: Any) -> None:
    if choice is None:
        return
    if not tools:
        raise _TOOL_CHOICE_WITHOUT_TOOLS
    if type(choice) is str:
        if choice not in _TOOL_CHOICES:
            raise invalid_value("tool_choice", choice, _TOOL_CHOICES)
        return
    if type(choice) is not dict:
        raise invalid_type("tool_choice", choice, "one of a string or object")
    c: dict[str, Any] = choice
    kind = c.get("type")
    if kind is None:
        raise missing("tool_choice.type")
    if type(kind) is not str:
        raise invalid_type("tool_choice.type", kind, "a string")
    if kind in ("allowed_tools", "custom"):  # newer shapes: the upstream's to judge
        return
    if kind != "function":
        raise invalid_value("tool_choice.type", kind, ("function", "allowed_tools", "custom"))
    fn = c.get("function")
    if fn is None:
        raise missing("tool_choice.function")
    name = _object("tool_choice.function", fn).get("name")
    _required_string("tool_choice.function.name", name)
    names = {
        t["function"].get("name")
        for t in tools
        if type(t) is dict and t.get("type") == "function" and type(t.get("function")) is dict
    }
    if name not in names:
        # unconfirmed wording: no real body found for a named tool missing from `tools`
        raise _err(
            "tool_choice.function.name",
            f"Invalid value for 'tool_choice': no function named '{quote(str(name))}' is specified "
            "in 'tools'.",
            "invalid_value",
        )


def check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    f = _object("response_format", fmt)
    kind = f.get("type")
    if kind is None:
        raise missing("response_format.type")
    if type(kind) is not str:
        raise invalid_type("response_format.type", kind, "a string")
    if kind not in _RESPONSE_FORMATS:
        raise invalid_value("response_format.type", kind, _RESPONSE_FORMATS)
    if kind != "json_schema":
        return
    spec = f.get("json_schema")
    if spec is None:
        raise missing("response_format.json_schema")
    s = _object("response_format.json_schema", spec)
    _name("response_format.json_schema.name", s.get("name"))
    _string("response_format.json_schema.description", s.get("description"))
    schema = s.get("schema")
    if schema is not None:
        _object("response_format.json_schema.schema", schema)
    _boolean("response_format.json_schema.strict", s.get("strict"))


# ---- the slow path: the whole body -----------------------------------------------------------
def _common(obj: dict[str, Any]) -> None:
    """The parameters chat and completions share, in OpenAI's reference order."""
    _decimal("frequency_penalty", obj.get("frequency_penalty"), -2, 2)
    _logit_bias(obj.get("logit_bias"))
    _integer("n", obj.get("n"), 1, 128)
    _decimal("presence_penalty", obj.get("presence_penalty"), -2, 2)
    _integer("seed", obj.get("seed"), None, None)
    _stop(obj.get("stop"))
    _stream(obj)
    _decimal("temperature", obj.get("temperature"), 0, 2)
    _decimal("top_p", obj.get("top_p"), 0, 1)
    _string("user", obj.get("user"))


def check_chat(obj: dict[str, Any]) -> None:
    _model(obj)
    messages = obj.get("messages")
    if messages is None:
        raise missing("messages")
    if type(messages) is not list:
        raise invalid_type("messages", messages, "an array")
    if not messages:
        raise _err(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "empty_array",
        )
    for i, m in enumerate(messages):
        _message(f"messages[{i}]", m)
    _common(obj)
    _boolean("logprobs", obj.get("logprobs"))
    _integer("top_logprobs", obj.get("top_logprobs"), 0, 20)
    _integer("max_tokens", obj.get("max_tokens"), 1, None)
    _integer("max_completion_tokens", obj.get("max_completion_tokens"), 1, None)
    _boolean("parallel_tool_calls", obj.get("parallel_tool_calls"))
    tools = obj.get("tools")
    check_tools(tools)
    check_tool_choice(obj.get("tool_choice"), tools)
    check_response_format(obj.get("response_format"))


def check_completion(obj: dict[str, Any]) -> None:
    _model(obj)
    prompt = obj.get("prompt")
    if prompt is None:
        raise missing("prompt")
    if type(prompt) is not str and type(prompt) is not list:
        raise invalid_type(
            "prompt",
            prompt,
            "one of a string, array of strings, array of integers, or array of arrays of integers",
        )
    _common(obj)
    _integer("best_of", obj.get("best_of"), 0, 20)
    _boolean("echo", obj.get("echo"))
    _integer("logprobs", obj.get("logprobs"), 0, 5)
    _integer("max_tokens", obj.get("max_tokens"), 0, None)
    _string("suffix", obj.get("suffix"))


def check(endpoint: Endpoint, obj: Any) -> None:
    """Raise OpenAI's error for the first problem in the plain decoded body, if any. A body that
    is not an object is left to the caller (msgspec's message says it well enough)."""
    if type(obj) is not dict:
        return
    if endpoint is Endpoint.CHAT:
        check_chat(obj)
    elif endpoint is Endpoint.COMPLETIONS:
        check_completion(obj)
