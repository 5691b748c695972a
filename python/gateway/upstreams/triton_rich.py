"""A Triton call with several choices, tool calls or log probs, as an `UpstreamCall`.

The plain `TritonCall` frames one text stream in Rust. This one serves what that cannot: `n`
choices (one `num_return_sequences` request whose responses carry `sequence_index`, or n
requests read together: fan-out), tool calls read from the text (`triton_tools`) and streamed as
`tool_calls` deltas with `index` and `id`, and `logprobs` from `output_log_probs`. Each choice
still goes through its own Rust `TextStream` (collecting only) for split UTF-8 and stop words;
the frames are written here. Streams interleave choices as their tokens arrive, each frame
naming its choice `index`; a choice's finish frame comes once all have ended.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from .. import _fastpath
from ..errors import GatewayError
from ..schemas import CompletionRequestView, Usage
from ..usage import counted_prompt_tokens
from .triton_call import Reply, _malformed, no_first_token, no_response, not_finished, read_response
from .triton_tools import ParsedCall, ToolParser, call_id, make_parser

if TYPE_CHECKING:
    from ..context import RequestContext
    from .triton_grpc import TritonAdapter, TritonStream
    from .triton_request import TritonPlan

_encode = msgspec.json.Encoder().encode


def _tensor_text(raw: bytes) -> bytes:
    """The bytes of a `BYTES` tensor's elements (u32 length prefixes dropped)."""
    out, at = [], 0
    while at + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return b"".join(out)


class _Choice:
    """One choice: its text stream, tool parser, pending log probs and counts."""

    __slots__ = (
        "calls",
        "content",
        "deltas",
        "done",
        "index",
        "lp_at",
        "lp_out",
        "lp_pending",
        "n_out",
        "parser",
        "sent_bytes",
        "ts",
    )

    def __init__(self, index: int, stops: list[str], parser: ToolParser | None) -> None:
        self.index = index
        self.ts = _fastpath.TextStream("", "", 0, stops, frames=False)
        self.parser = parser
        self.content: list[str] = []
        self.calls: list[tuple[str, ParsedCall]] = []  # (id, call)
        self.deltas = 0
        self.n_out: int | None = None
        self.done = False
        #: log probs: (token bytes, log prob) not yet covered by released text
        self.lp_pending: list[tuple[bytes, float]] = []
        self.lp_at = 0  # bytes of the text the released entries cover
        self.lp_out: list[dict[str, Any]] = []
        self.sent_bytes = 0  # bytes of text past the stop matcher

    @property
    def tokens(self) -> int:
        return self.n_out if self.n_out is not None else self.deltas


class RichTritonCall:
    """See the module docstring. `streams[i]` serves choice i (fan-out), or `streams[0]` serves
    all of them (`plan.native_n`, or n = 1)."""

    __slots__ = (
        "_adapter",
        "_chat",
        "_choices",
        "_created",
        "_ctx",
        "_ended",
        "_live",
        "_logprobs",
        "_model",
        "_n_in",
        "_pending",
        "_plan",
        "_prefix",
        "_streams",
        "_text",
        "_usage",
    )

    def __init__(
        self,
        ctx: RequestContext,
        adapter: TritonAdapter,
        streams: list[TritonStream],
        plan: TritonPlan,
        model: str,
    ) -> None:
        route = ctx.route
        assert route is not None
        self._ctx = ctx
        self._adapter = adapter
        self._streams = streams
        self._plan = plan
        self._model = model
        self._chat = not isinstance(ctx.view, CompletionRequestView)
        self._logprobs = plan.logprobs
        self._choices = [
            _Choice(i, plan.stops, make_parser(plan.tool_parser) if plan.tool_parser else None)
            for i in range(plan.n)
        ]
        self._live = set(range(len(streams)))
        self._pending: dict[int, asyncio.Task[Any]] = {}
        self._ended = False
        self._n_in: int | None = None
        self._usage: Usage | None = None
        self._text: list[str] = []
        self._created = int(time.time())
        prefix = "chatcmpl" if self._chat else "cmpl"
        kind = "chat.completion.chunk" if self._chat else "text_completion"
        head = _encode({"id": f"{prefix}-{ctx.request_id}", "object": kind, "created": self._created})
        self._prefix = b"data: " + head[:-1] + b',"model":' + _encode(route.name) + b',"choices":['

    # ---- reading ----------------------------------------------------------------------------
    async def _read_some(self) -> list[tuple[int, Any]]:
        """The next response(s): (stream, response or None at its end)."""
        adapter, streams, model = self._adapter, self._streams, self._model
        if len(self._live) == 1 and not self._pending:
            (i,) = self._live
            return [(i, await read_response(adapter, streams[i], model))]
        loop = adapter.loop
        for i in self._live:
            if i not in self._pending:
                self._pending[i] = loop.create_task(read_response(adapter, streams[i], model))
        done, _ = await asyncio.wait(self._pending.values(), return_when=asyncio.FIRST_COMPLETED)
        out = []
        for i, task in list(self._pending.items()):
            if task in done:
                del self._pending[i]
                out.append((i, task.result()))
        return out

    def _end_stream(self, i: int) -> None:
        self._live.discard(i)
        if not self._live:
            self._ended = True

    def _push(self, i: int, resp: Any) -> bytes:
        if resp is None:
            self._end_stream(i)
            return b""
        r = Reply(resp)
        if r.n_in is not None:
            self._n_in = r.n_in
        native = len(self._streams) == 1
        index = r.seq if native else i
        if not 0 <= index < len(self._choices):
            raise _malformed(ValueError(f"sequence_index {index} out of range"))
        c = self._choices[index]
        if r.n_out is not None:
            c.n_out = r.n_out
        out = b""
        if r.text and not c.done:
            c.deltas += 1
            before = len(c.ts.text)
            try:
                c.ts.push_tensor(r.text)
            except _fastpath.FastpathError as exc:
                raise _malformed(exc) from None
            if self._logprobs:
                self._tokens(c, _tensor_text(r.text), r.lps)
            out = self._released(c, c.ts.text[before:])
            if c.ts.stopped:
                c.done = True
                if not native:  # the stop word ended this choice: free its slot now
                    self._streams[i].cancel()
                    self._end_stream(i)
                elif all(ch.done for ch in self._choices):
                    self._streams[0].cancel()
                    self._ended = True
        if r.final:
            self._end_stream(i)
        return out

    def _tokens(self, c: _Choice, token: bytes, lps: Sequence[float]) -> None:
        if not lps:
            return
        c.lp_pending.append((token, lps[0]))
        c.lp_pending.extend((b"", lp) for lp in lps[1:])  # several tokens in one response: text on the first

    def _release_logprobs(self, c: _Choice, final: bool) -> list[dict[str, Any]]:
        """Log-prob entries of the tokens the released text covers (at the end: those it
        reaches into; the rest were cut by a stop word)."""
        entries = []
        while c.lp_pending:
            token, lp = c.lp_pending[0]
            end = c.lp_at + len(token)
            if end > c.sent_bytes and not (final and c.lp_at < c.sent_bytes):
                break
            c.lp_pending.pop(0)
            c.lp_at = end
            text = token.decode(errors="replace")
            entries.append({"token": text, "logprob": lp, "bytes": list(token), "top_logprobs": []})
        if final:
            c.lp_pending.clear()
        c.lp_out.extend(entries)
        return entries

    def _released(self, c: _Choice, text: str, final: bool = False) -> bytes:
        """Frames for text past the stop matcher (through the tool parser when there is one)."""
        c.sent_bytes += len(text.encode())
        calls: list[ParsedCall] = []
        if c.parser is not None:
            content, calls = c.parser.push(text)
            if final:
                more, more_calls = c.parser.finish()
                content, calls = content + more, calls + more_calls
        else:
            content = text
        entries = self._release_logprobs(c, final) if self._logprobs else None
        out = b""
        if content:
            c.content.append(content)
            self._text.append(content)
            out += self._frame(c.index, self._delta({"content": content}, entries, content))
            entries = None
        elif entries:
            out += self._frame(c.index, self._delta({}, entries, ""))
        for call in calls:
            k = len(c.calls)
            cid = call_id()
            c.calls.append((cid, call))
            self._text.append(call.arguments)
            if self._chat and self._ctx.stream:
                head = {
                    "index": k,
                    "id": cid,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                out += self._frame(
                    c.index, {"delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None}
                )
                args = {"index": k, "function": {"arguments": call.arguments}}
                out += self._frame(
                    c.index, {"delta": {"tool_calls": [args]}, "logprobs": None, "finish_reason": None}
                )
        return out

    def _delta(
        self, delta: dict[str, Any], entries: list[dict[str, Any]] | None, text: str
    ) -> dict[str, Any]:
        if self._chat:
            logprobs = None if entries is None else {"content": entries}
            return {"delta": delta, "logprobs": logprobs, "finish_reason": None}
        return {"text": text, "logprobs": _legacy(entries), "finish_reason": None}

    def _frame(self, index: int, body: dict[str, Any]) -> bytes:
        if not self._ctx.stream:
            return b""
        return self._prefix + _encode({"index": index, **body}) + b"]}\n\n"

    # ---- UpstreamCall -------------------------------------------------------------------------
    async def first(self, deadline: float) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                got = await self._read_some()
        except TimeoutError:
            raise no_first_token() from None
        if all(resp is None for _, resp in got) and self._ended:
            raise no_response(self._model)
        out = b""
        if self._chat:
            for c in self._choices:
                role = {
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                out += self._frame(c.index, role)
        for i, resp in got:
            out += self._push(i, resp)
        return out

    async def next(self, deadline: float) -> bytes | None:
        if self._ended:
            return None
        async with asyncio.timeout_at(deadline):
            got = await self._read_some()
        return b"".join(self._push(i, resp) for i, resp in got)

    def _reason(self, c: _Choice) -> str:
        if c.calls:
            return "tool_calls"
        if c.ts.stopped:
            return "stop"
        return "length" if c.tokens >= self._plan.max_tokens else "stop"

    def _close_choices(self) -> bytes:
        """Flush every choice (held-back text, open tool calls, log probs); -> their frames."""
        out = b""
        for c in self._choices:
            before = len(c.ts.text)
            c.ts.finish("stop")
            out += self._released(c, c.ts.text[before:], final=True)
        return out

    def finish(self) -> tuple[bytes, GatewayError | None]:
        self.release()
        out = self._close_choices()
        for c in self._choices:
            if self._chat:
                out += self._frame(c.index, {"delta": {}, "logprobs": None, "finish_reason": self._reason(c)})
            else:
                out += self._frame(c.index, {"text": "", "logprobs": None, "finish_reason": self._reason(c)})
        if self._ctx.client_wants_usage:
            u = self.usage()
            usage = {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
            }
            out += self._prefix + b"]," + _encode({"usage": usage})[1:] + b"\n\n"
        return out, None

    async def body(self, deadline: float) -> bytes:
        ctx = self._ctx
        route = ctx.route
        assert route is not None
        try:
            async with asyncio.timeout_at(deadline):
                got = await self._read_some()
                if all(resp is None for _, resp in got) and self._ended:
                    raise no_response(self._model)
                for i, resp in got:
                    self._push(i, resp)
                while not self._ended:
                    for i, resp in await self._read_some():
                        self._push(i, resp)
        except TimeoutError:
            raise not_finished() from None
        finally:
            self.release()
        self._close_choices()
        choices = []
        for c in self._choices:
            text = "".join(c.content)
            if self._chat:
                message: dict[str, Any] = {"role": "assistant", "content": text or (None if c.calls else "")}
                if c.calls:
                    message["tool_calls"] = [
                        {
                            "id": cid,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        }
                        for cid, call in c.calls
                    ]
                logprobs = {"content": c.lp_out} if self._logprobs else None
                choices.append(
                    {
                        "index": c.index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": self._reason(c),
                    }
                )
            else:
                lp = _legacy(c.lp_out) if self._logprobs else None
                choices.append(
                    {"text": text, "index": c.index, "logprobs": lp, "finish_reason": self._reason(c)}
                )
        u = self.usage()
        reply = {
            "id": f"{'chatcmpl' if self._chat else 'cmpl'}-{ctx.request_id}",
            "object": "chat.completion" if self._chat else "text_completion",
            "created": self._created,
            "model": route.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
            },
        }
        return _encode(reply)

    def usage(self) -> Usage:
        """The prompt once (as OpenAI counts it for n choices), the choices' tokens summed."""
        if self._usage is None:
            ctx = self._ctx
            assert ctx.route is not None
            prompt = self._n_in if self._n_in is not None else counted_prompt_tokens(ctx)
            completion = 0
            for c in self._choices:
                if c.n_out is not None:
                    completion += c.n_out
                else:
                    completion += c.ts.completion_tokens(ctx.route.encoding)
            self._usage = Usage(prompt, completion, prompt + completion)
        return self._usage

    @property
    def completion_text(self) -> str:
        return "".join(self._text)

    @property
    def generated_tokens(self) -> int:
        return sum(c.tokens for c in self._choices)

    def abort(self) -> None:
        self.release()

    def release(self) -> None:
        for task in self._pending.values():
            task.cancel()
        self._pending.clear()
        for stream in self._streams:
            stream.cancel()  # a no-op once the RPC is done


def _legacy(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """`/v1/completions` log probs: parallel lists (no alternatives: `top_logprobs` null)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": None,
        "text_offset": offsets,
    }
