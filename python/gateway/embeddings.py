"""`POST /v1/embeddings`: what the pipeline needs beyond the chat path.

The request runs through the same stages as chat (decode, auth, route, limits, guard, dispatch,
relay, settlement, observers), unary only. This module holds the embeddings-only pieces, so the
stages call one function each: OpenAI's input rules (`validate`), the prompt token count for
limits and usage (`count_tokens`), the texts the guards read (`texts`), the reply the Triton
adapter builds from raw FP32 tensors (`reply_from_tensor`) and, for OpenAI-wire upstreams, usage
read from the reply plus base64 for a client that asked for it from an upstream that answered
floats (`finish_upstream_body`).

base64 is OpenAI's: the little-endian float32 bytes of each vector. The official `openai` SDK asks
for it by default (and decodes it itself), so it is the common case, not an option.
"""

from __future__ import annotations

import array
import base64
import re
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from . import _fastpath
from .errors import Fault, GatewayError
from .schemas import EmbeddingsRequestView, Usage

if TYPE_CHECKING:
    from .context import RequestContext

_T = TypeVar("_T")

#: OpenAI's limit on the number of inputs of one request
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")

_LITTLE = sys.byteorder == "little"
_FLOAT_ARRAY = re.compile(rb'"embedding"\s*:\s*\[')
_encode = msgspec.json.Encoder().encode
_raw_top = msgspec.json.Decoder(dict[str, msgspec.Raw])


class EmbeddingsUsage(msgspec.Struct, gc=False):
    """OpenAI's embeddings usage: no completion tokens."""

    prompt_tokens: int = 0
    total_tokens: int = 0


class _UsageView(msgspec.Struct, gc=False):
    usage: EmbeddingsUsage | None = None


_usage_view = msgspec.json.Decoder(_UsageView)


# kw_only: fields in OpenAI's order, defaults first
class Embedding(msgspec.Struct, gc=False, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(msgspec.Struct, gc=False, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


_data_view = msgspec.json.Decoder(list[Embedding])


def _invalid(message: str, param: str = "input") -> GatewayError:
    return GatewayError(Fault.INVALID_REQUEST, message, param=param)


def validate(view: EmbeddingsRequestView) -> None:
    """OpenAI's rules (types are msgspec's): a non-empty `model`; `input` a non-empty string,
    or 1..2048 items, all non-empty strings, all token ids (>= 0), or all non-empty arrays of
    token ids; `encoding_format` float | base64; `dimensions` >= 1."""
    if not view.model:
        raise _invalid("`model` must be a non-empty string.", "model")
    inp = view.input
    if isinstance(inp, str):
        if not inp:
            raise _invalid("`input` must not be empty.")
    else:
        if not inp:
            raise _invalid("`input` must not be an empty array.")
        if len(inp) > MAX_INPUTS:
            raise _invalid(f"`input` must have at most {MAX_INPUTS} items, got {len(inp)}.")
        first = inp[0]
        if type(first) is str:
            for i, item in enumerate(inp):
                if type(item) is not str:
                    raise _invalid("`input` must be all strings, all token ids or all arrays of token ids.")
                if not item:
                    raise _invalid(f"`input[{i}]` must not be an empty string.", f"input[{i}]")
        elif type(first) is int:
            if not all(type(t) is int and t >= 0 for t in inp):
                raise _invalid("`input` token ids must be integers >= 0, all of one kind.")
        elif type(first) is list:
            for i, item in enumerate(inp):
                if type(item) is not list or not item:
                    raise _invalid(f"`input[{i}]` must be a non-empty array of token ids.", f"input[{i}]")
                if not all(type(t) is int and t >= 0 for t in item):
                    raise _invalid(f"`input[{i}]` token ids must be integers >= 0.", f"input[{i}]")
        else:
            raise _invalid(
                "`input` must be a string or an array of strings, token ids or arrays of token ids."
            )
    fmt = view.encoding_format
    if fmt is not None and fmt not in ENCODINGS:
        raise _invalid(
            f"Invalid value for `encoding_format`: {fmt[:40]!r}; expected 'float' or 'base64'.",
            "encoding_format",
        )
    if view.dimensions is not None and view.dimensions < 1:
        raise _invalid("`dimensions` must be at least 1.", "dimensions")


def texts(view: EmbeddingsRequestView) -> list[str]:
    """The string inputs (token-id inputs carry no text the gateway can read)."""
    inp = view.input
    if isinstance(inp, str):
        return [inp]
    return [t for t in inp if type(t) is str]


def text_inputs(view: EmbeddingsRequestView) -> list[str] | None:
    """Every input as text, in order; None when the inputs are token ids."""
    inp = view.input
    if isinstance(inp, str):
        return [inp]
    return inp if type(inp[0]) is str else None


def count_tokens(view: EmbeddingsRequestView, encoding: str) -> int:
    """Prompt tokens with the route's tokenizer: BPE per string, one per token id."""
    inp = view.input
    if isinstance(inp, str):
        return _fastpath.count_tokens(inp, encoding)
    first = inp[0] if inp else None
    if type(first) is str:
        return sum(_fastpath.count_tokens(t, encoding) for t in inp)
    if type(first) is int:
        return len(inp)
    return sum(len(t) for t in inp)


def _b64(vec: list[float]) -> str:
    a = array.array("f", vec)
    if not _LITTLE:
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode("ascii")


def finish_upstream_body(ctx: RequestContext, body: bytes) -> bytes:
    """An OpenAI-wire upstream's reply: `ctx.usage` from its usage (counted when it has none,
    then written in), and base64 vectors when the client asked for base64 and got floats (an
    upstream without `encoding_format`). Anything else passes as the upstream sent it."""
    view = ctx.view
    assert isinstance(view, EmbeddingsRequestView)
    usage = upstream_json(_usage_view, body).usage
    top: dict[str, msgspec.Raw] | None = None
    if usage is None:
        assert ctx.route is not None
        n = count_tokens(view, ctx.route.encoding)
        usage = EmbeddingsUsage(n, n)
        top = _top(body)
        top["usage"] = msgspec.Raw(_encode(usage))
    ctx.usage = Usage(usage.prompt_tokens, 0, usage.total_tokens or usage.prompt_tokens)
    if view.encoding_format == "base64" and _FLOAT_ARRAY.search(body) is not None:
        if top is None:
            top = _top(body)
        raw = top.get("data")
        if raw is not None:
            try:
                data = _data_view.decode(raw)
            except msgspec.ValidationError:
                raise GatewayError(
                    Fault.UPSTREAM_BAD_RESPONSE, "The upstream's embeddings `data` is malformed."
                ) from None
            for item in data:
                if isinstance(item.embedding, list):
                    item.embedding = _b64(item.embedding)
            top["data"] = msgspec.Raw(_encode(data))
    return body if top is None else _encode(top)


def _top(body: bytes) -> dict[str, msgspec.Raw]:
    return upstream_json(_raw_top, body)


def upstream_json(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    """An upstream's unary reply decoded (here and in `usage.fill_usage`, which imports this
    module). Not JSON, or not of the decoder's shape (msgspec's ValidationError is a
    DecodeError), is the upstream's fault: a 502."""
    try:
        return decoder.decode(body)
    except msgspec.DecodeError:
        raise GatewayError(Fault.UPSTREAM_BAD_RESPONSE, "The upstream returned invalid JSON.") from None


def reply_from_tensor(model: str, raw: bytes, n: int, dim: int, fmt: str | None, prompt_tokens: int) -> bytes:
    """OpenAI's reply from `n` x `dim` little-endian FP32 values (a Triton output tensor):
    base64 slices the bytes as they are; float converts them once in C (`array`)."""
    row = dim * 4
    data: list[Any]
    if fmt == "base64" and _LITTLE:
        data = [
            Embedding(index=i, embedding=base64.b64encode(raw[i * row : (i + 1) * row]).decode("ascii"))
            for i in range(n)
        ]
    else:
        values = array.array("f")
        values.frombytes(raw[: n * row])
        if not _LITTLE:
            values.byteswap()
        if fmt == "base64":
            data = [
                Embedding(index=i, embedding=_b64(values[i * dim : (i + 1) * dim].tolist())) for i in range(n)
            ]
        else:
            flat = values.tolist()
            data = [Embedding(index=i, embedding=flat[i * dim : (i + 1) * dim]) for i in range(n)]
    return _encode(EmbeddingList(data=data, model=model, usage=EmbeddingsUsage(prompt_tokens, prompt_tokens)))
