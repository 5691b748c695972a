"""What translating a stream for a Responses API client costs, per streamed chunk, in process: the
relay's OpenAI frames (one chunk per send, as one upstream read of one token brings) through
the Python reference (`responses_stream.ChatToResponses`) and the Rust one the gateway uses
(`_fastpath.ResponsesStream`), for a text stream and a tool call's arguments; next to the
Anthropic translator's Python reference and Rust one on the same frames, as a yardstick on a busy
machine. Prints µs per chunk (best of --repeat) and the load average.

    .venv/bin/python benchmarks/responses_translate.py [--chunks 200] [--streams 500] [--repeat 5]
"""

from __future__ import annotations

import platform

from anthropic_translate import Factory, parse_args, table
from gateway import _fastpath
from gateway.anthropic_stream import ChatToMessages
from gateway.responses_stream import ChatToResponses, native
from gateway.responses_wire import decode_request


def main() -> None:
    args = parse_args()
    req, _ = decode_request(b'{"model":"echo","input":"hi","tools":[{"type":"function","name":"lookup"}]}')
    impls: dict[str, Factory] = {
        "responses (python)": lambda: ChatToResponses(req, 12),
        "responses (rust)": lambda: native(req, 12),
        "messages (python)": lambda: ChatToMessages("msg_1", "echo", 12, None),
    }
    if hasattr(_fastpath, "MessagesStream"):
        impls["messages (rust)"] = lambda: _fastpath.MessagesStream("msg_1", "echo", 12, [])
    print(f"# responses stream translation, {platform.python_implementation()} {platform.python_version()}")
    build = _fastpath.BUILD_PROFILE
    print(f"# {args.chunks} chunks/stream, {args.streams} streams, best of {args.repeat}; build {build}")
    table(impls, args, "translator")


if __name__ == "__main__":
    main()
