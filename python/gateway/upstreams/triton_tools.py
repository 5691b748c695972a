"""Tool calls in a Triton model's generated text -> OpenAI `tool_calls`, while it streams.

TensorRT-LLM returns text only: a tool-calling model writes its calls in its template's own
syntax, and the gateway must find them, never show their markers as content, and hand them out
as `tool_calls`. Two syntaxes cover the common open models:

- `hermes` (Hermes, Qwen 2/2.5/3, many fine-tunes): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, anywhere in the text, any number of them. Text that could be the start of
  `<tool_call>` is held back until it is known not to be one.
- `llama3_json` (Llama 3.1+ JSON tool calling): the whole answer is `{"name": ..., "parameters":
  {...}}` (optionally after `<|python_tag|>`, several separated by `;`). An answer that starts
  with `{` is held to its end and read as calls; anything else streams as text.

A block that does not parse as a call is given back as the text it was. Only requests with
`tools` pay for this (the plain path is Rust's `TextStream` alone).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, NamedTuple, Protocol


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def call_id() -> str:
    """An OpenAI-style tool call id (`call_` + 24 characters)."""
    return "call_" + secrets.token_hex(12)


def _call(obj: Any, args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser(Protocol):
    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Add generated text; -> (content safe to send now, calls completed by it)."""
        ...

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The end of the text: what was held back, as content or calls."""
        ...


class HermesParser:
    """`<tool_call>...</tool_call>` blocks (see the module docstring)."""

    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"
    __slots__ = ("_buf", "_called", "_inside")

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self._called = False  # after a call, whitespace between calls is not content

    def _content(self, text: str) -> str:
        if self._called:
            text = text.lstrip()
            if text:
                self._called = False
        return text

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        if not self._buf and not self._inside and "<" not in text:
            return self._content(text), []
        buf = self._buf + text
        content: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            if not self._inside:
                at = buf.find(self.OPEN)
                if at < 0:
                    keep = _partial_suffix(buf, self.OPEN)
                    content.append(self._content(buf[: len(buf) - keep]))
                    buf = buf[len(buf) - keep :]
                    break
                content.append(self._content(buf[:at]))
                buf = buf[at + len(self.OPEN) :]
                self._inside = True
            else:
                at = buf.find(self.CLOSE)
                if at < 0:
                    break
                block = buf[:at]
                buf = buf[at + len(self.CLOSE) :]
                self._inside = False
                call = self._parse(block)
                if call is None:
                    content.append(self.OPEN + block + self.CLOSE)
                else:
                    calls.append(call)
                    self._called = True
        self._buf = buf
        return "".join(content), calls

    @staticmethod
    def _parse(block: str) -> ParsedCall | None:
        try:
            return _call(json.loads(block), "arguments")
        except ValueError:
            return None

    def finish(self) -> tuple[str, list[ParsedCall]]:
        buf, self._buf = self._buf, ""
        if not self._inside:
            return self._content(buf), []
        self._inside = False  # an unclosed block at the end of generation (EOS ate the tag)
        call = self._parse(buf)
        if call is None:
            return self.OPEN + buf, []
        return "", [call]


class Llama3JsonParser:
    """A whole answer of JSON calls (see the module docstring)."""

    TAG = "<|python_tag|>"
    __slots__ = ("_buf", "_mode")

    def __init__(self) -> None:
        self._buf = ""
        self._mode = 0  # 0: undecided (only whitespace or a partial tag so far), 1: calls, 2: text

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        if self._mode == 2:
            return text, []
        self._buf += text
        if self._mode == 1:
            return "", []
        head = self._buf.lstrip()
        if not head or (self.TAG.startswith(head) and head != self.TAG):
            return "", []
        if head.startswith("{") or head.startswith(self.TAG):
            self._mode = 1
            return "", []
        self._mode = 2
        buf, self._buf = self._buf, ""
        return buf, []

    def finish(self) -> tuple[str, list[ParsedCall]]:
        buf, self._buf = self._buf, ""
        if self._mode != 1:
            return buf, []
        body = buf.strip().removeprefix(self.TAG).strip()
        decoder = json.JSONDecoder()
        calls: list[ParsedCall] = []
        at = 0
        while at < len(body):
            try:
                obj, at = decoder.raw_decode(body, at)
            except ValueError:
                return buf, []
            call = _call(obj, "parameters")
            if call is None:
                return buf, []
            calls.append(call)
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return ("", calls) if calls else (buf, [])


def make_parser(kind: str) -> ToolParser:
    """The parser a model's `triton.tool_parser` names (`none` never gets here)."""
    if kind == "llama3_json":
        return Llama3JsonParser()
    return HermesParser()
