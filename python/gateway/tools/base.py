"""What every server-side tool shares: its failure, with a code for `X-Function-Error-Code`."""

from __future__ import annotations


class ToolFailure(Exception):
    """A tool that did not produce a result; `code` names why (`wasm_timeout`, `http_status` ...)
    and goes to the client in `X-Function-Error-Code`, `message` goes to the model."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
