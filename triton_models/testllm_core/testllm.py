"""A deterministic CPU stand-in for a TensorRT-LLM model, shared by the Python-backend models
`tensorrt_llm_bls` and `testllm_core` (and, through `testllm_core`, the `ensemble`).

It lives in testllm_core's folder (Triton takes every folder of the repository for a model).
It speaks the exact TensorRT-LLM `ensemble` / `tensorrt_llm_bls` text contract (see
../README.md): `text_input` + `max_tokens` in, `text_output` (+ `num_input_tokens`,
`num_output_tokens` when asked) out, every tensor with a leading batch dimension.

Generation rules (all deterministic):
- The words come from `VOCAB` (~200 plain English words) drawn by a splitmix64 PRNG seeded with
  SHA-256 of the prompt bytes (plus `seed` when given). Each token is one word with a leading
  space, the first one too.
- The natural length is drawn first, in [12, 48] tokens; reaching it is finish "stop" (an end
  token). `max_tokens` caps the count ("length").
- `bad_words`: a vocabulary word equal to an entry (stripped) is never emitted; the generator
  draws again (deterministically).
- `stop_words`: after each token, if the generated text ends with an entry, generation stops;
  the stop word stays in the output (TensorRT-LLM semantics; the gateway strips it).
- `stream=true`: one response per token carrying the new text only. Otherwise one response with
  the full text, prefixed by the prompt unless `exclude_input_in_output=true`.
- `num_input_tokens` is a test stand-in: the number of whitespace-separated words of
  `text_input`. `num_output_tokens` is the cumulative number of tokens generated so far. Each
  is sent only when the matching `return_num_*_tokens` input is true.

Test knobs, readable from the prompt so tests through the gateway can drive them: a directive
anywhere in `text_input` like `[[testllm delay_ms=20 ignore_cancel=1 fail_after=3]]`.
- `delay_ms`: asyncio sleep before each token (default: config parameter `token_delay_ms`, 0).
- `ignore_cancel=1`: never check `is_cancelled()` (like the stock TensorRT-LLM BLS).
- `fail_after=N`: after N tokens, an error response (with the final flag) instead of the rest,
  when the planned output is longer than N tokens.
The directive stays part of the prompt (it is hashed like the rest).

Scripted outputs, so the gateway's OpenAI features are testable end to end:
- `[[testllm tool_call name=get_weather args={"city":"Paris"}]]` (one per call; `style=llama3`
  after the name for the Llama-3 JSON style): the model answers with the tool call(s) as a
  Hermes model does, `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Llama-3:
  `{"name": ..., "parameters": {...}}`), cut into 4-character tokens. Only directives after the
  last tool result (`<tool_response>`, a `tool` / `ipython` turn) count, so a follow-up turn that
  carries the result gets plain text.
- `guided_decoding_guide_type` `json` (any JSON object) or `json_schema` (+ the schema in
  `guided_decoding_guide`): a deterministic JSON value that satisfies a simple schema (object
  properties, string / integer / number / boolean / array / enum / null), 4-character tokens.
- `return_log_probs=true`: `output_log_probs` FP32 [batch, 1, tokens] (the log probs of this
  response's tokens) and `cum_log_probs` FP32 [batch, 1]; a token's log prob is a function of
  its text (`token_logprob`).
- `num_return_sequences=k` > 1: k sequences (sequence i > 0 hashes `\0seq=i` too), each
  response tagged with `sequence_index` INT32 [batch, 1]; streamed round-robin, token by token;
  `num_output_tokens` counts per sequence. The final flag comes after the last sequence.
- `random_seed` (TensorRT-LLM's name) works like `seed`.

End of stream: config parameter `final_response` = `last_data` puts the final flag on the last
data response (shape (a), like the C++ `tensorrt_llm` model and ensembles); `separate` sends the
data without it and then an empty response with only the final flag (shape (b), like the BLS;
clients see it only with the request parameter `triton_enable_empty_final_response=true`).

Event log: when the environment variable FASTPATH_TESTLLM_EVENTS names a file, one JSON line is
appended per event: {"event": "start"|"cancel"|"end"|"error", "model", "id", "tokens", "t"}
("id" is the request id; open-append-close, several processes write the file).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

EVENTS_ENV = "FASTPATH_TESTLLM_EVENTS"
MIN_TOKENS, MAX_TOKENS = 12, 48

_WORDS = """
    able about above across after again air almost also always animal answer apple area around
    bank basket bed before begin behind bell best better between bird black blue boat body book
    both bread bridge bright brown build busy cake call calm candle care carry castle cat chair
    change child city clean clear clock close cloud coast cold color common corner country
    course cover cup dance dark day deep desk door down dream dress drink during early earth
    easy east egg empty evening every face fair family far farm fast field fine fire fish
    floor flower follow food forest free fresh friend front fruit full garden gentle gift glass
    gold good grass great green ground group happy harbor heart heavy help high hill home honey
    horse house idea island journey kind kitchen lake lamp large late leaf light little long
    lucky market meadow milk moon morning mountain music near new night north ocean old open
    orange paper park path peace pencil people plain plant quiet rain river road rock round
    salt sand school sea season shadow ship short silver simple sky slow small snow soft song
    south spring square star stone story street summer sun sweet table tall tea thin tower
    town train tree valley village warm water wave west wide wind window winter wood yellow young
"""
VOCAB: tuple[str, ...] = tuple(_WORDS.split())

_DIRECTIVE = re.compile(r"\[\[testllm((?:\s+[a-z_]+=[-\w.]+)*)\s*\]\]")
_TOOL_DIRECTIVE = re.compile(r"\[\[testllm tool_call name=([\w.-]+)(?: style=(\w+))? args=(\{.*?\})\]\]")
#: where a tool result starts in the common chat layouts: directives before it are answered
_TOOL_RESULT_MARKS = (
    "<tool_response>",
    "<|im_start|>tool",
    "<|start_header_id|>ipython",
    "<|start_header_id|>tool",
)
PIECE = 4  # characters per token of a scripted output
_MASK64 = (1 << 64) - 1


class SplitMix64:
    """A tiny, portable PRNG: the same numbers on every Python version and platform."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)


@dataclass(frozen=True)
class Knobs:
    delay_ms: float = 0.0
    ignore_cancel: bool = False
    fail_after: int | None = None


def parse_knobs(prompt: str, default_delay_ms: float = 0.0) -> Knobs:
    """The `[[testllm k=v ...]]` directive of a prompt (the first one); unknown keys are ignored."""
    values: dict[str, str] = {}
    match = _DIRECTIVE.search(prompt)
    if match:
        for part in match.group(1).split():
            key, _, value = part.partition("=")
            values[key] = value
    fail = values.get("fail_after")
    return Knobs(
        delay_ms=float(values.get("delay_ms", default_delay_ms)),
        ignore_cancel=values.get("ignore_cancel", "0") not in ("0", "", "false"),
        fail_after=int(fail) if fail is not None else None,
    )


@dataclass(frozen=True)
class Plan:
    tokens: list[str]
    finish: str  # "stop" (natural end or a stop word) or "length" (max_tokens)


def plan(
    prompt: str,
    max_tokens: int,
    *,
    seed: int | None = None,
    stop_words: Sequence[str] = (),
    bad_words: Sequence[str] = (),
) -> Plan:
    """The whole deterministic output for a request, token by token."""
    digest = hashlib.sha256(prompt.encode())
    if seed is not None:
        digest.update(b"\0seed=%d" % seed)
    rng = SplitMix64(int.from_bytes(digest.digest()[:8], "little"))
    natural = MIN_TOKENS + rng.next() % (MAX_TOKENS - MIN_TOKENS + 1)
    banned = {w.strip() for w in bad_words}
    allowed = [w for w in VOCAB if w not in banned]
    stops = [s for s in stop_words if s]
    tokens: list[str] = []
    text = ""
    while len(tokens) < min(natural, max_tokens):
        if not allowed:
            return Plan(tokens, "stop")
        word = VOCAB[rng.next() % len(VOCAB)]
        while word in banned:  # skip banned words deterministically: draw again
            word = VOCAB[rng.next() % len(VOCAB)]
        tokens.append(" " + word)
        text += tokens[-1]
        if any(text.endswith(s) for s in stops):
            return Plan(tokens, "stop")
    return Plan(tokens, "stop" if len(tokens) >= natural else "length")


def pieces(text: str) -> list[str]:
    """A scripted output cut into tokens of `PIECE` characters."""
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


def tool_call_text(prompt: str) -> str | None:
    """The tool-call answer the prompt's directives ask for (after the last tool result)."""
    cut = max(prompt.rfind(m) for m in _TOOL_RESULT_MARKS)
    calls = list(_TOOL_DIRECTIVE.finditer(prompt, max(cut, 0)))
    if not calls:
        return None
    hermes, llama = [], []
    for m in calls:
        name, style, args = m.group(1), m.group(2), json.loads(m.group(3))
        if style == "llama3":
            llama.append(json.dumps({"name": name, "parameters": args}))
        else:
            hermes.append("<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>")
    return "; ".join(llama) if llama else "\n".join(hermes)


def json_value(schema: Any, rng: SplitMix64, depth: int = 0) -> Any:
    """A deterministic value satisfying a simple JSON schema (guided decoding's stand-in)."""
    if not isinstance(schema, dict):
        schema = {}
    if "enum" in schema and schema["enum"]:
        return schema["enum"][rng.next() % len(schema["enum"])]
    kind = schema.get("type", "object" if depth == 0 else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or ({} if depth else {"answer": {"type": "string"}})
        return {k: json_value(v, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [json_value(schema.get("items", {}), rng, depth + 1) for _ in range(2)]
    if kind == "integer":
        return int(rng.next() % 100)
    if kind == "number":
        return (rng.next() % 1000) / 4
    if kind == "boolean":
        return rng.next() % 2 == 0
    if kind == "null":
        return None
    return " ".join(VOCAB[rng.next() % len(VOCAB)] for _ in range(2))


def guided_text(prompt: str, guide_type: str, guide: str) -> str:
    """The JSON output of guided decoding (`json` or `json_schema`)."""
    rng = SplitMix64(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
    schema = json.loads(guide) if guide_type == "json_schema" and guide else {}
    return json.dumps(json_value(schema, rng))


def token_logprob(token: str) -> float:
    """The (made-up, deterministic) log prob of a token: in (-4, 0)."""
    h = int.from_bytes(hashlib.sha256(token.encode()).digest()[:4], "little")
    return -((h % 4000) + 1) / 1000


def scripted(text: str, max_tokens: int, stop_words: Sequence[str]) -> Plan:
    """A fixed output as a plan: `max_tokens` and stop words apply as to generated text."""
    tokens: list[str] = []
    out = ""
    stops = [s for s in stop_words if s]
    for piece in pieces(text):
        if len(tokens) >= max_tokens:
            return Plan(tokens, "length")
        tokens.append(piece)
        out += piece
        if any(out.endswith(s) for s in stops):
            break
    return Plan(tokens, "stop")


def log_event(event: str, model: str, request_id: str, tokens: int) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "model": model, "id": request_id, "tokens": tokens, "t": time.time()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@dataclass
class Request:
    """The decoded inputs of one request."""

    prompt: str
    max_tokens: int
    stream: bool = False
    exclude_input: bool = False
    seed: int | None = None
    stop_words: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    return_num_input: bool = False
    return_num_output: bool = False
    return_log_probs: bool = False
    num_sequences: int = 1
    guide_type: str = ""
    guide: str = ""


class InvalidInput(ValueError):
    pass


def _strings(value: Any) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else str(item) for item in value.reshape(-1).tolist()]


def decode_request(get: Callable[[str], Any]) -> Request:
    """`get(name)` returns the input as a numpy array, or None when absent."""
    text = get("text_input")
    if text is None or text.size == 0:
        raise InvalidInput("text_input is required (BYTES, shape [batch, 1])")
    max_tokens = get("max_tokens")
    if max_tokens is None or max_tokens.size == 0:
        raise InvalidInput("max_tokens is required (INT32, shape [batch, 1])")
    n = int(max_tokens.reshape(-1)[0])
    if n <= 0:
        raise InvalidInput(f"max_tokens must be > 0, got {n}")

    def flag(name: str) -> bool:
        value = get(name)
        return bool(value is not None and value.size and bool(value.reshape(-1)[0]))

    seed = get("random_seed")
    if seed is None:
        seed = get("seed")
    sequences = get("num_return_sequences")
    k = int(sequences.reshape(-1)[0]) if sequences is not None and sequences.size else 1
    if k < 1:
        raise InvalidInput(f"num_return_sequences must be >= 1, got {k}")
    guide_type = get("guided_decoding_guide_type")
    guide = get("guided_decoding_guide")
    return Request(
        prompt=_strings(text)[0],
        max_tokens=n,
        stream=flag("stream"),
        exclude_input=flag("exclude_input_in_output"),
        seed=int(seed.reshape(-1)[0]) if seed is not None and seed.size else None,
        stop_words=_strings(get("stop_words")) if get("stop_words") is not None else [],
        bad_words=_strings(get("bad_words")) if get("bad_words") is not None else [],
        return_num_input=flag("return_num_input_tokens"),
        return_num_output=flag("return_num_output_tokens"),
        return_log_probs=flag("return_log_probs"),
        num_sequences=k,
        guide_type=_strings(guide_type)[0] if guide_type is not None and guide_type.size else "",
        guide=_strings(guide)[0] if guide is not None and guide.size else "",
    )


class TestLLM:
    """The Triton Python-backend model (`TritonPythonModel` in each model.py)."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.model_name = args["model_name"]
        params = json.loads(args["model_config"]).get("parameters", {})

        def param(name: str, default: str) -> str:
            return str(params.get(name, {}).get("string_value", default))

        self.default_delay_ms = float(param("token_delay_ms", "0"))
        shape = param("final_response", "last_data")
        if shape not in ("last_data", "separate"):
            raise ValueError(f"parameter final_response must be last_data or separate, got {shape!r}")
        self.separate_final = shape == "separate"

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(r) for r in requests))

    def finalize(self) -> None:
        pass

    def _response(
        self,
        req: Request,
        text: str,
        count: int,
        logprobs: Sequence[float] = (),
        cum: float = 0.0,
        seq: int = 0,
    ) -> Any:
        np = _numpy()
        pb = self.pb
        tensors = [pb.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_))]
        if req.return_log_probs:
            tensors.append(pb.Tensor("output_log_probs", np.array([[list(logprobs)]], dtype=np.float32)))
            tensors.append(pb.Tensor("cum_log_probs", np.array([[cum]], dtype=np.float32)))
        if req.num_sequences > 1:
            tensors.append(pb.Tensor("sequence_index", np.array([[seq]], dtype=np.int32)))
        if req.return_num_input:
            n_in = len(req.prompt.split())
            tensors.append(pb.Tensor("num_input_tokens", np.array([[n_in]], dtype=np.int32)))
        if req.return_num_output:
            tensors.append(pb.Tensor("num_output_tokens", np.array([[count]], dtype=np.int32)))
        return pb.InferenceResponse(output_tensors=tensors)

    def _fail(self, sender: Any, message: str, code: Any) -> None:
        pb = self.pb
        error = pb.InferenceResponse(error=pb.TritonError(message, code))
        try:
            sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except pb.TritonModelException:
            # A cancelled request may already be released; the final flag is all that matters.
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def _serve(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        request_id = request.request_id()
        log_event("start", self.model_name, request_id, 0)

        def get(name: str) -> Any:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            req = decode_request(get)
        except (InvalidInput, ValueError, UnicodeDecodeError) as exc:
            log_event("error", self.model_name, request_id, 0)
            self._fail(sender, f"{self.model_name}: invalid input: {exc}", pb.TritonError.INVALID_ARG)
            return
        knobs = parse_knobs(req.prompt, self.default_delay_ms)
        plans = [self._plan(req, i) for i in range(req.num_sequences)]
        fail_at = knobs.fail_after
        failing = fail_at is not None and any(fail_at < len(p.tokens) for p in plans)
        emits = [p.tokens[:fail_at] if fail_at is not None else p.tokens for p in plans]
        # streamed round-robin, token by token, across the sequences
        order = [(q, i) for i in range(max(map(len, emits))) for q in range(len(emits)) if i < len(emits[q])]
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        cums = [0.0] * len(emits)
        for step, (q, i) in enumerate(order):
            if knobs.delay_ms > 0:
                await asyncio.sleep(knobs.delay_ms / 1000)
            if not knobs.ignore_cancel and sender.is_cancelled():
                log_event("cancel", self.model_name, request_id, step)
                self._fail(sender, f"{self.model_name}: request cancelled", pb.TritonError.CANCELLED)
                return
            if req.stream:
                token = emits[q][i]
                lp = token_logprob(token)
                cums[q] += lp
                last = step == len(order) - 1 and not failing and not self.separate_final
                sender.send(self._response(req, token, i + 1, [lp], cums[q], q), flags=final if last else 0)
        if failing:
            log_event("error", self.model_name, request_id, len(order))
            message = f"{self.model_name}: injected failure after {fail_at} tokens (fail_after)"
            self._fail(sender, message, pb.TritonError.INTERNAL)
            return
        if not req.stream:
            for q, emit in enumerate(emits):
                text = "".join(emit) if req.exclude_input else req.prompt + "".join(emit)
                lps = [token_logprob(t) for t in emit]
                last = q == len(emits) - 1 and not self.separate_final
                sender.send(
                    self._response(req, text, len(emit), lps, sum(lps), q), flags=final if last else 0
                )
        if self.separate_final or (req.stream and not order):
            sender.send(flags=final)
        log_event("end", self.model_name, request_id, len(order))

    @staticmethod
    def _plan(req: Request, seq: int) -> Plan:
        """Sequence `seq`'s output: a scripted tool call or guided JSON, else generated text."""
        key = req.prompt if seq == 0 else f"{req.prompt}\0seq={seq}"
        text = tool_call_text(req.prompt)
        if text is None and req.guide_type in ("json", "json_schema"):
            text = guided_text(key, req.guide_type, req.guide)
        if text is not None:
            return scripted(text, req.max_tokens, req.stop_words)
        return plan(key, req.max_tokens, seed=req.seed, stop_words=req.stop_words, bad_words=req.bad_words)


def _numpy() -> Any:
    import numpy

    return numpy
