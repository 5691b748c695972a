"""Type stubs for the Rust extension `gateway._fastpath` (crates/fastpath).

Hot per-byte / per-token loops live here: BPE token counting, the incremental SSE parser,
the OpenAI stream re-framer and the chunk emitter.
"""

from typing import Any, Final

__version__: Final[str]
BUILD_PROFILE: Final[str]  # "release" or "debug"

class FastpathError(ValueError):
    """Base class of every error raised by the extension."""

class UnknownEncodingError(FastpathError): ...

class SseError(FastpathError):
    """An SSE event (or line) exceeded the parser's size limit."""

# ---- tokens ---------------------------------------------------------------------------------
def encoding_for_model(model: str) -> str:
    """'o200k_base' or 'cl100k_base'; unknown models map to 'o200k_base'."""

def count_tokens(text: str, encoding: str = "o200k_base") -> int:
    """Exact BPE token count (ordinary tokens; special-token text is counted as text).
    Releases the GIL for large inputs. Raises UnknownEncodingError."""

def encode(text: str, encoding: str = "o200k_base") -> list[int]:
    """Token ids (ordinary encoding), for tests and tools."""

def estimate_tokens(text: str) -> int:
    """Cheap upper-leaning estimate without BPE: ceil(ascii_bytes / 4) + one token per non-ASCII
    code point (so ceil(len / 4) for ASCII text, one per char for CJK); never 0 for non-empty text."""

def count_chat_tokens(body: bytes, encoding: str = "o200k_base") -> int:
    """Prompt tokens of an OpenAI chat request body (raw JSON bytes), following OpenAI's
    cookbook rules: 3 per message + tokens of every string field (role, content text / text
    parts, name (+1), tool_calls function name + arguments, tool_call_id) + 3 reply priming.
    Only the text of text parts counts (image parts add nothing); other request fields
    (tools, response_format, ...) are not counted.
    `/v1/completions` bodies (`prompt` string or list of strings) are counted as plain text;
    pre-tokenized prompts (a list of token ids, or of such lists) count one per id.
    Raises FastpathError on invalid JSON, a shape that is not a request (e.g. `messages` not a
    list), or a body with neither `messages` nor `prompt`. Releases the GIL for large bodies."""

# ---- SSE ------------------------------------------------------------------------------------
class SseEvent:
    """A dispatched event (frozen; compares by value)."""

    event: str | None
    """The `event` field of this event; None when absent or empty (the spec's "message")."""
    data: str
    """The `data` lines joined with "\n" (UTF-8, invalid bytes replaced by U+FFFD)."""
    id: str | None
    """The last event ID: per the spec it persists across events; None until an `id` field
    (without NUL) was seen; an empty `id:` sets it to ""."""
    retry: int | None
    """A valid `retry` field (ASCII digits, < 2**64) in this event's own block, else None."""

class SseParser:
    """Incremental WHATWG `text/event-stream` parser: bytes split anywhere in, whole events out.
    Handles LF, CR and CRLF line ends (also split across feeds), comments, multi-line data,
    a leading BOM, and fields without a value. Events with no data lines are not dispatched."""

    def __init__(self, max_event_bytes: int = 1_048_576) -> None: ...
    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Raises SseError if one pending line/event grows beyond max_event_bytes; the pending
        event is then dropped (the stream is corrupt: abandon it)."""
    def finish(self) -> list[SseEvent]:
        """End of stream: per the spec a pending, unterminated event is discarded (returns [])."""
    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete event (for back-pressure accounting)."""

class ChatStreamReframer:
    """Re-frames an upstream OpenAI-compatible SSE stream (chat.completion.chunk or
    text_completion) for the client, in one call per upstream read:

    * every data event is re-emitted as b"data: <data>\\n\\n", the data bytes exactly as received
      (comments, event/id/retry fields dropped; multi-line data goes out as one `data: ` line
      per line, so it parses back to the same data);
    * `data: [DONE]` sets `done` and is NOT emitted (the gateway writes its own end);
    * a chunk that carries `usage` and has empty `choices` sets `usage`; it is emitted only when
      strip_usage is False;  a chunk with non-empty choices and usage records usage and is emitted;
    * a data payload with a top-level "error" object sets `error` (the first such object's raw
      JSON text) and is emitted;
    * the text of choices[].delta.content, choices[].text and
      choices[].delta.tool_calls[].function.arguments is appended to the completion text
      (for token counting); choices[0].finish_reason (index 0, or no index) is recorded;
    * id / model / created of the first chunk are remembered for synthesized chunks;
    * data that is not JSON, or JSON not shaped like a chunk (e.g. `choices` not a list), is
      emitted unchanged, contributes nothing, and is counted in `invalid_events`.
    feed() raises SseError like SseParser.feed."""

    def __init__(self, strip_usage: bool, max_event_bytes: int = 1_048_576) -> None: ...
    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes:
        """End of upstream bytes: returns any bytes still to emit (normally b""). Leniently, an
        event whose data lines all ended but whose closing blank line never came is still
        processed (and emitted); an unterminated last line is dropped."""
    @property
    def done(self) -> bool: ...
    @property
    def usage(self) -> tuple[int, int, int] | None:
        """(prompt_tokens, completion_tokens, total_tokens) from the upstream, if any."""
    @property
    def cached_tokens(self) -> int | None:
        """`usage.prompt_tokens_details.cached_tokens` from the upstream, if it said."""
    @property
    def error(self) -> str | None: ...
    @property
    def events(self) -> int:
        """Number of data events seen (including [DONE])."""
    @property
    def invalid_events(self) -> int: ...
    @property
    def completion_text(self) -> str: ...
    @property
    def finish_reason(self) -> str | None:
        """finish_reason of choice 0, if seen."""
    @property
    def chunk_id(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def created(self) -> int | None: ...
    def completion_tokens(self, encoding: str = "o200k_base") -> int:
        """BPE count of completion_text."""
    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """A synthesized final `data: {...,"choices":[],"usage":{...}}\\n\\n` frame using the
        remembered id/model/created (object 'chat.completion.chunk', or 'text_completion' when the
        upstream's was); before any chunk: id "", model "", created = now."""

class MessagesStream:
    """OpenAI chat frames (what the relay sends: chunks, the usage chunk, `[DONE]`, its error
    event, pings, comments) -> Anthropic Messages stream events, for one stream: `message_start`
    first (these `input_tokens`), text and tool-call deltas as `content_block_*` events
    (`text_delta`, `input_json_delta`), at `[DONE]` `message_delta` (stop reason: a finish
    `stop` whose vLLM `stop_reason` is one of `stops` is `stop_sequence`; usage from the usage
    chunk) and `message_stop`; an error event becomes an `error` event and ends the stream;
    `: ping` becomes a `ping` event. Frames may be split across sends. Choice 0 only."""

    def __init__(self, msg_id: str, model: str, input_tokens: int, stops: list[str]) -> None: ...
    def feed(self, data: bytes) -> bytes: ...

class ResponsesStream:
    """OpenAI chat frames (what the relay sends) -> Responses API stream events, for one stream:
    `response.created` / `response.in_progress` lead the first send, text as a `message` item,
    each tool call as a `function_call` item (arguments deltas), at `[DONE]` the items' `*.done`
    events and `response.completed` (`response.incomplete` on a length / content-filter stop);
    an error event becomes `error` + `response.failed`. Comments pass through; frames may be
    split across sends; every event has `type` and `sequence_number`. Choice 0 only.
    `responses_stream.ChatToResponses` is the Python reference (tested equal)."""

    def __init__(
        self,
        response_id: str,
        model: str,
        created_at: int,
        previous_response_id: str | None,
        echo: bytes,
        prompt_tokens: int = 0,
    ) -> None:
        """`echo`: the request's echo fields of the response object, a JSON object
        (`FastpathError` otherwise)."""
    def feed(self, data: bytes) -> bytes: ...
    @property
    def done(self) -> bool:
        """The stream ended (`[DONE]` or an error): later sends translate to nothing."""
    @property
    def status(self) -> str | None:
        """The final response's status (`completed`, `incomplete`, `failed`) once done."""
    def response(self) -> bytes | None:
        """The final response object's JSON once done: what the conversation store keeps."""

class ChunkEmitter:
    """Writes OpenAI `chat.completion.chunk` SSE frames (serde_json escaping, no Python formatting)."""

    def __init__(self, id: str, model: str, created: int) -> None: ...
    def role(self, role: str = "assistant", index: int = 0) -> bytes:
        """data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,
        "choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\\n\\n"""
    def content(self, text: str, index: int = 0) -> bytes: ...
    def finish(self, reason: str, index: int = 0) -> bytes:
        """A chunk with an empty delta and the finish_reason."""
    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """A chunk with "choices":[] and "usage":{prompt,completion,total}."""

def sse_error(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    """b'data: {"error":{"message":..,"type":..,"param":..,"code":..}}\\n\\n'"""

DONE: Final[bytes]  # b"data: [DONE]\n\n"
PING: Final[bytes]  # b": ping\n\n"

# ---- request limits -------------------------------------------------------------------------
def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True if the JSON text nests arrays/objects deeper than `limit` (strings are skipped,
    escapes honoured; invalid JSON is not an error here: decoding reports it)."""

# ---- rate limits ----------------------------------------------------------------------------
class LocalLimiter:
    """Token buckets (GCRA on integers, exact for any rate) keyed by string, for one worker.

    Each bucket holds up to `burst` tokens and refills at `rate_per_min`. Time is a monotonic
    clock of the limiter's own (or `now_ns`, any fixed monotonic origin, for tests; do not mix
    the two on one limiter). The store keeps at most `max_keys` buckets: full (idle) buckets are
    dropped first, which changes no decision; beyond that, busy ones are dropped (they start
    over full) and counted in `evicted_busy`. Not thread-safe by design: one worker = one thread."""

    def __init__(self, max_keys: int = 100_000) -> None: ...
    def acquire(
        self, key: str, cost: int, rate_per_min: int, burst: int, now_ns: int | None = None
    ) -> tuple[bool, int, int, int]:
        """Take `cost` tokens if they fit: (allowed, remaining, reset_ms, retry_after_ms).
        remaining: tokens left after this decision; reset_ms: until the bucket is full again;
        retry_after_ms: until this cost would fit (0 when allowed; for cost > burst, which never
        fits, reset_ms). A refused request changes nothing. cost 0 only reads. Times round up.
        Raises FastpathError if rate_per_min or burst is 0."""
    def refund(self, key: str, amount: int) -> None:
        """Return unused reserved tokens (never fills past the burst)."""
    def charge(self, key: str, amount: int, rate_per_min: int, now_ns: int | None = None) -> None:
        """Take tokens unconditionally (real use beyond a reservation)."""
    def sweep(self, now_ns: int | None = None) -> int:
        """Drop idle (full) buckets now; returns how many remain."""
    @property
    def evicted_busy(self) -> int: ...
    def __len__(self) -> int: ...

# ---- generated text (Triton) ----------------------------------------------------------------
class TextStream:
    """Generated-text deltas -> `chat.completion.chunk` frames (role, content, finish, usage).

    Incomplete UTF-8 at the end of a delta is carried to the next one; text that could begin a
    stop sequence is held back until it is known not to; the first stop sequence ends the text
    before it (TensorRT-LLM keeps the stop word in its output, OpenAI does not). `frames=False`
    only collects the text (a non-streamed reply); every method then returns b"".
    `completion=True`: `/v1/completions` frames (`text_completion`, `text`; `role()` is b"")."""

    def __init__(
        self,
        id: str,
        model: str,
        created: int,
        stops: list[str] = ...,
        frames: bool = True,
        completion: bool = False,
    ) -> None: ...
    def role(self) -> bytes: ...
    def push_tensor(self, raw: bytes) -> bytes:
        """A raw Triton BYTES tensor (u32-LE length + bytes per element) with the next delta.
        Raises FastpathError on a malformed tensor."""
    def push_bytes(self, delta: bytes) -> bytes: ...
    def finish(self, reason: str) -> bytes:
        """Flush held-back text, then the finish frame: "stop" after a stop sequence, else `reason`."""
    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes: ...
    @property
    def stopped(self) -> bool:
        """A stop sequence was seen: the caller should cancel the generation."""
    @property
    def text(self) -> str:
        """The text emitted so far (without the stop sequence)."""
    def completion_tokens(self, encoding: str = "o200k_base") -> int: ...

# ---- output guard and tool-call validation ---------------------------------------------------
class OutputPolicy:
    """PII / secret kinds to look for, each with an action (`flag`, `redact`, `block`) and the
    index of the guard that asked (the strongest action wins per kind). Raises FastpathError
    on an unknown kind or action."""

    def __init__(self, rules: list[tuple[str, str, int]]) -> None: ...
    def scan(self, text: str) -> tuple[str, list[tuple[str, str, int]], tuple[str, int] | None]:
        """(text with `redact` findings masked, findings (kind, action, guard), first block
        (kind, guard) or None)."""
    def filter(self, window: int, max_event_bytes: int = ...) -> OutputFilter:
        """A stream filter over OpenAI chunk frames holding back `window` bytes of text."""

class OutputFilter:
    def feed(self, frames: bytes) -> bytes:
        """One read's frames -> the frames to send now. Raises SseError."""
    def finish(self) -> bytes:
        """Everything still held, scanned to its end."""
    @property
    def blocked(self) -> tuple[str, int] | None: ...
    @property
    def findings(self) -> list[tuple[str, str, int]]: ...
    @property
    def held(self) -> int:
        """Text bytes held back now."""

class ToolSet:
    """The request's `tools` (JSON array bytes) with each tool's JSON Schema compiled. Raises
    FastpathError on an invalid schema."""

    def __init__(self, tools: bytes) -> None: ...
    def check(self, name: str, arguments: str) -> str | None:
        """None: a valid call; else why not."""
    @property
    def names(self) -> list[str]: ...

class ToolAssembler:
    """A stream's tool calls rebuilt from its OpenAI chunk frames."""

    def __init__(self, max_event_bytes: int = ...) -> None: ...
    def feed(self, frames: bytes) -> None: ...
    @property
    def calls(self) -> list[tuple[int, int, str, str]]:
        """(choice index, call index, name, arguments) per call."""

# ---- prompt rules (guard) -------------------------------------------------------------------
class PromptRules:
    """Known injection phrases (Aho-Corasick; case-insensitive, whitespace runs = one space) and
    secret patterns (one RegexSet over the original text). Raises FastpathError on an empty
    phrase or an invalid regex."""

    def __init__(self, phrases: list[tuple[str, str]], patterns: list[tuple[str, str]]) -> None: ...
    def first_match(self, text: str) -> str | None:
        """The rule name of the first phrase (else pattern) found in `text`."""

class MetricSlots:
    """One worker's metric slots (counters, gauges, histogram buckets and sums as doubles) and
    the per-request recording of `gateway.metrics` in one call. `tables`: the histogram bounds,
    in order: latency (ns), token latency (ns), token latency (s), token counts; a value goes to
    the first bound >= it. Out-of-range slots are ignored. Not thread-safe: one worker, one thread."""

    def __init__(self, len: int, tables: list[list[float]]) -> None: ...
    def add(self, i: int, x: float) -> None: ...
    def set(self, i: int, x: float) -> None: ...
    def get(self, i: int) -> float: ...
    def observe(self, base: int, table: int, x: float) -> None:
        """One histogram observation at `base` (buckets, +Inf, sum) with bounds table `table`."""
    def plan(
        self,
        requests: int,
        duration: int,
        upstream: int,
        ttft: int,
        tpot: int,
        itl: int,
        tokens_in: int,
        tokens_out: int,
        tokens_cached: int,
    ) -> int:
        """A request shape's slots; returns its id for `request`."""
    def usage_plan(
        self,
        tokens_in: int,
        tokens_out: int,
        tokens_cached: int,
        cost: int,
        prices: tuple[float, float, float],
    ) -> int:
        """A (model, team[, key])'s token and cost counters and its USD-per-token prices
        (input, output, cached input)."""
    def stage(self, name: str, base: int) -> None:
        """A stage name's histogram: `base` >= 0; -1 not recorded; -2 the plan's upstream one."""
    def request(
        self,
        plan: int,
        total_ns: int,
        timings: dict[str, int],
        ttft_ns: int,
        tail_ns: int,
        itl_s: float,
        uplan: int,
        prompt: int,
        completion: int,
        cached: int,
        extra: int,
    ) -> list[str] | None:
        """Record one request: count, duration, each stage of `timings`, streams' TTFT
        (`ttft_ns` > 0), TPOT (`tail_ns` / (completion - 1)) and inter-token gap (`itl_s` >= 0),
        token usage and the usage plan's counters (`uplan` >= 0), slot `extra` + 1 (>= 0).
        Returns the stage names not registered yet (not recorded), or None."""
    def copy_to(self, buffer: Any) -> None:
        """Copy the first len(buffer) slots into a writable buffer of doubles."""
    def __len__(self) -> int: ...
