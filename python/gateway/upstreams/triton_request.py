"""OpenAI chat request -> a Triton `ModelInferRequest` in the TensorRT-LLM tensor contract.

The names, dtypes and shapes are TensorRT-LLM's `ensemble` / `tensorrt_llm_bls` inputs
(Triton's TensorRT-LLM backend docs): every tensor has a leading batch dimension of 1. Only inputs the model
declares are sent (its metadata is read once), so one mapping serves both the stock configs and
older ones without `return_num_*_tokens`. What the model cannot do is refused with a 400 naming
the parameter, never silently dropped.

Beyond text: `tools` are rendered into the prompt (the chat template's `tools`, or the built-in
ChatML layout's Hermes/Qwen system block) and read back by `triton_tools`; `n > 1` uses
`num_return_sequences` when the model has it (and tags responses with `sequence_index`), else n
requests (fan-out); `logprobs` asks for `return_log_probs`; `response_format` is guided decoding;
`seed` is `random_seed` (or an older config's `seed`). Such requests are served by
`triton_rich.RichTritonCall`; the rest by the plain `TritonCall`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
from tritonclient.grpc import service_pb2 as pb

from ..config import TritonModelConfig
from ..errors import Fault, GatewayError
from ..schemas import ChatRequestView, CompletionRequestView, GenerationView, Message

_Tensor = pb.ModelInferRequest.InferInputTensor
_Output = pb.ModelInferRequest.InferRequestedOutputTensor

#: The BLS shape sends its end-of-stream flag on a separate empty response, which Triton only
#: delivers when the request asks for it (otherwise the only end signal is the RPC ending).
_EMPTY_FINAL = pb.InferParameter(bool_param=True)
MAX_STOP_WORDS = 16


class _Sampling(msgspec.Struct, gc=False):
    """Sampling fields both endpoints share."""

    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # common OpenAI-server extensions (vLLM, TGI)
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    # refused: TensorRT-LLM's text contract cannot honour it
    logit_bias: dict[str, Any] | None = None


class SamplingView(_Sampling, gc=False):
    """The request fields the Triton mapping reads beyond `ChatRequestView`."""

    logprobs: bool | None = None
    top_logprobs: int | None = None
    # refused: TensorRT-LLM's text contract cannot honour them
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


class CompletionSamplingView(_Sampling, gc=False):
    """The same for `/v1/completions` (`logprobs` is a count there)."""

    logprobs: int | None = None  # 0 only: the engine returns no alternatives
    # refused: TensorRT-LLM's text contract cannot honour them
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


_sampling = msgspec.json.Decoder(SamplingView)
_completion_sampling = msgspec.json.Decoder(CompletionSamplingView)
_encode = msgspec.json.Encoder().encode


def _bytes1(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def triton_priority(priority: int, levels: int) -> int:
    """Our priority (higher first, 0 = the default) -> Triton's request priority (1 = the
    highest of `levels`; 0 = the model's `default_priority_level`, the lowest by our advice).

    Triton reads 0 and anything above the model's levels as its default, so priority 0 (or no
    levels configured) sends nothing and a priority below 0 shares the lowest level."""
    if priority == 0 or levels == 0:
        return 0
    return min(levels, max(1, levels - priority))


def _refuse(param: str, what: str) -> GatewayError:
    return GatewayError(Fault.UNSUPPORTED_PARAMETER, what, param=param)


def _text_of(msg: Message, index: int) -> str:
    content = msg.content
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _refuse(
                f"messages[{index}].content[{j}]", f"This model accepts text only (got a `{part.type}` part)."
            )
        parts.append(part.text)
    return "".join(parts)


def chatml(messages: Sequence[tuple[str, str]]) -> str:
    """The built-in chat layout (ChatML), ending with the assistant's turn."""
    out = [f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in messages]
    out.append("<|im_start|>assistant\n")
    return "".join(out)


_HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_LLAMA3_TOOLS = (
    "# Tools\n\nYou have access to the following functions:\n\n{tools}\n\n"
    "To call a function, respond only with a JSON object in the format "
    '{{"name": function name, "parameters": dictionary of argument name and its value}}.'
)


def _must_call(tool_choice: Any) -> str:
    if tool_choice == "required":
        return "\n\nYou must call at least one function."
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return f"\n\nYou must call the function `{name}`."
    return ""


def chatml_tools(
    messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None, tool_choice: Any, style: str
) -> str:
    """ChatML with tools, as the Hermes / Qwen 2.5 templates lay them out: the definitions in the
    system block, assistant calls as `<tool_call>` JSON, tool results as `<tool_response>` in a
    user turn (consecutive results share one). `style` llama3_json words the calls its way."""
    out: list[str] = []
    rest = list(messages)
    if tools:
        defs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = (_LLAMA3_TOOLS if style == "llama3_json" else _HERMES_TOOLS).format(tools=defs)
        block += _must_call(tool_choice)
        if rest and rest[0]["role"] in ("system", "developer"):
            block = f"{rest.pop(0)['content']}\n\n{block}"
        out.append(f"<|im_start|>system\n{block}<|im_end|>\n")
    results: list[str] = []
    for m in rest:
        if m["role"] == "tool":
            results.append(f"<tool_response>\n{m['content']}\n</tool_response>")
            continue
        if results:
            out.append("<|im_start|>user\n" + "\n".join(results) + "<|im_end|>\n")
            results = []
        text = m["content"]
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            if style == "llama3_json":
                text += json.dumps({"name": fn["name"], "parameters": fn["arguments"]}, ensure_ascii=False)
            else:
                body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
                text += f"\n<tool_call>\n{body}\n</tool_call>"
        if not m["content"]:
            text = text.removeprefix("\n")
        out.append(f"<|im_start|>{m['role']}\n{text}<|im_end|>\n")
    if results:
        out.append("<|im_start|>user\n" + "\n".join(results) + "<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def jinja_template(source: str) -> Callable[..., str]:
    """A Hugging Face style chat template, rendered in Jinja's immutable sandbox. Messages are
    (role, text) pairs (strict: a template error is found at once), or dicts with `tool_calls` /
    `tool_call_id` (then `tools` too), rendered as Hugging Face does (an absent key is undefined,
    which tool-aware templates test with `if message.tool_calls`)."""
    from jinja2 import StrictUndefined, Undefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def compile_(undefined: type[Undefined]) -> Any:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=undefined)
        return env.from_string(source)

    strict, lenient = compile_(StrictUndefined), compile_(Undefined)

    def render(messages: Sequence[Any], tools: Sequence[Any] | None = None, tool_choice: Any = None) -> str:
        if messages and isinstance(messages[0], tuple):
            msgs = [{"role": r, "content": c} for r, c in messages]
            return str(strict.render(messages=msgs, add_generation_prompt=True, bos_token="", eos_token=""))
        return str(
            lenient.render(
                messages=messages, tools=tools, add_generation_prompt=True, bos_token="", eos_token=""
            )
        )

    return render


class TritonPlan(NamedTuple):
    """What `TritonRequestBuilder.plan` decided for one client request."""

    requests: list[Any]  # one ModelInferRequest, or n of them (fan-out)
    stops: list[str]
    max_tokens: int
    n: int
    native_n: bool  # one request with num_return_sequences: responses carry sequence_index
    logprobs: bool
    tool_parser: str | None  # the parser for a `tools` request

    @property
    def rich(self) -> bool:
        """Served by `RichTritonCall` (several choices, tool calls or log probs)."""
        return self.n > 1 or self.logprobs or self.tool_parser is not None


def _arguments(text: str) -> Any:
    """A call's `arguments` (JSON text) as the object templates print."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class TritonRequestBuilder:
    """Per route: builds the request for one chat call. `inputs` / `outputs` are the names the
    model declares (from its metadata)."""

    __slots__ = (
        "_jinja",
        "_outputs",
        "_render",
        "cfg",
        "inputs",
        "model",
        "outputs",
        "wants_counts",
    )

    def __init__(self, model: str, cfg: TritonModelConfig, inputs: set[str], outputs: set[str]) -> None:
        missing = {"text_input", "max_tokens"} - inputs
        if missing or "text_output" not in outputs:
            raise GatewayError(
                Fault.UPSTREAM_ERROR,
                f"The Triton model `{model}` does not have the TensorRT-LLM text contract"
                f" (missing {', '.join(sorted(missing | ({'text_output'} - outputs)))}).",
            )
        self.model = model
        self.cfg = cfg
        self.inputs = inputs
        self.outputs = outputs
        template = cfg.chat_template
        if cfg.chat_template_file:
            with open(cfg.chat_template_file, encoding="utf-8") as f:
                template = f.read()
        self._jinja = jinja_template(template) if template else None
        self._render: Callable[..., str] = self._jinja or chatml
        names = ["text_output"]
        #: usage from the model's own counts when it can report them
        self.wants_counts = {"num_input_tokens", "num_output_tokens"} <= outputs and {
            "return_num_input_tokens",
            "return_num_output_tokens",
        } <= inputs
        if self.wants_counts:
            names += ["num_input_tokens", "num_output_tokens"]
        self._outputs = [_Output(name=n) for n in names]

    def prompt(self, view: GenerationView, tools: bool = True) -> str:
        """`text_input`: the chat template over the messages (and the tools, unless `tools` is
        False: `tool_choice: none`), or a completion's prompt as is."""
        if isinstance(view, CompletionRequestView):
            prompt = view.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    many = len(prompt) > 1 and all(isinstance(p, str) for p in prompt)
                    what = "one prompt per request" if many else "a text prompt (not token ids)"
                    raise _refuse("prompt", f"The model `{self.model}` takes {what}.")
                prompt = prompt[0]
            return prompt
        with_tools = tools and bool(view.tools)
        if with_tools or any(m.role == "tool" or m.tool_calls for m in view.messages):
            return self._render_tools(view, with_tools)
        messages = [(m.role, _text_of(m, i)) for i, m in enumerate(view.messages)]
        try:
            return self._render(messages)
        except GatewayError:
            raise
        except Exception as exc:  # a template error is the deployment's, not the client's
            raise GatewayError(Fault.INTERNAL, f"The model's chat template failed: {exc}") from None

    def _render_tools(self, view: ChatRequestView, with_tools: bool) -> str:
        messages: list[dict[str, Any]] = []
        for i, m in enumerate(view.messages):
            msg: dict[str, Any] = {"role": m.role, "content": _text_of(m, i)}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        tools = view.tools if with_tools else None
        try:
            if self._jinja is not None:
                return self._jinja(messages, tools, view.tool_choice)
            return chatml_tools(messages, tools, view.tool_choice, self.cfg.tool_parser)
        except GatewayError:
            raise
        except Exception as exc:  # a template error is the deployment's, not the client's
            raise GatewayError(Fault.INTERNAL, f"The model's chat template failed: {exc}") from None

    def build(
        self, view: GenerationView, body: bytes, request_id: str, stream: bool, priority: int = 0
    ) -> tuple[Any, list[str], int]:
        """-> (ModelInferRequest, stop words to cut, max_tokens): the first request of `plan`."""
        p = self.plan(view, body, request_id, stream, priority)
        return p.requests[0], p.stops, p.max_tokens

    def plan(
        self, view: GenerationView, body: bytes, request_id: str, stream: bool, priority: int = 0
    ) -> TritonPlan:
        """The request(s) for one client request. `priority` is the request's (its tier's, higher
        first): see `triton_priority`. A rich plan always streams from the model (token
        boundaries for log probs, one path for every choice)."""
        s: _Sampling
        chat = isinstance(view, ChatRequestView)
        try:
            if isinstance(view, ChatRequestView):
                s = _sampling.decode(body)
                self._refuse_unsupported_chat(s)
                max_tokens = view.max_completion_tokens or view.max_tokens or self.cfg.default_max_tokens
                logprobs = bool(s.logprobs)
            else:
                s = _completion_sampling.decode(body)
                self._refuse_unsupported_completion(s)
                max_tokens = view.max_tokens or self.cfg.default_max_tokens
                logprobs = s.logprobs is not None
        except msgspec.ValidationError as exc:
            raise GatewayError(Fault.INVALID_REQUEST, f"Invalid request: {exc}") from None
        n = view.n or 1
        if s.logit_bias:
            raise _refuse("logit_bias", "This model does not support `logit_bias`.")
        if max_tokens > 2**31 - 1:
            raise GatewayError(Fault.INVALID_REQUEST, "`max_tokens` is too large.", param="max_tokens")
        parser: str | None = None
        use_tools = isinstance(view, ChatRequestView) and bool(view.tools) and view.tool_choice != "none"
        if use_tools:
            if self.cfg.tool_parser == "none":
                raise _refuse("tools", f"The model `{self.model}` is not configured for tool calls.")
            parser = self.cfg.tool_parser
        if logprobs and not ({"return_log_probs"} <= self.inputs and "output_log_probs" in self.outputs):
            raise _refuse("logprobs", f"The model `{self.model}` does not return log probabilities.")
        native_n = n > 1 and "num_return_sequences" in self.inputs and "sequence_index" in self.outputs
        rich = n > 1 or logprobs or parser is not None
        stream = stream or rich
        stops = list(self.cfg.stop)
        if s.stop is not None:
            client = [s.stop] if isinstance(s.stop, str) else s.stop
            if len(client) > MAX_STOP_WORDS or any(not w for w in client):
                raise GatewayError(
                    Fault.INVALID_REQUEST,
                    f"`stop` takes up to {MAX_STOP_WORDS} non-empty strings.",
                    param="stop",
                )
            stops += client
        tensors: list[Any] = []
        raws: list[bytes] = []

        def add(name: str, dtype: str, raw: bytes, width: int = 1) -> None:
            if name not in self.inputs:
                raise _refuse(name, f"The model `{self.model}` does not take `{name}`.")
            tensors.append(_Tensor(name=name, datatype=dtype, shape=(1, width)))
            raws.append(raw)

        add("text_input", "BYTES", _bytes1(self.prompt(view, tools=use_tools).encode()))
        add("max_tokens", "INT32", struct.pack("<i", max_tokens))
        if "stream" in self.inputs:
            add("stream", "BOOL", b"\x01" if stream else b"\x00")
        if "exclude_input_in_output" in self.inputs:
            add("exclude_input_in_output", "BOOL", b"\x01")
        if stops and "stop_words" in self.inputs:
            add("stop_words", "BYTES", b"".join(_bytes1(w.encode()) for w in stops), len(stops))
        for name, value in (
            ("temperature", s.temperature),
            ("top_p", s.top_p),
            ("presence_penalty", s.presence_penalty),
            ("frequency_penalty", s.frequency_penalty),
            ("repetition_penalty", s.repetition_penalty),
        ):
            if value is not None:
                add(name, "FP32", struct.pack("<f", value))
        for name, ivalue in (("top_k", s.top_k), ("min_tokens", s.min_tokens)):
            if ivalue is not None:
                if not 0 <= ivalue < 2**31:
                    raise GatewayError(Fault.INVALID_REQUEST, f"`{name}` is out of range.", param=name)
                add(name, "INT32", struct.pack("<i", ivalue))
        seed_input = "random_seed" if "random_seed" in self.inputs else "seed"
        if s.seed is not None:
            if seed_input not in self.inputs:
                raise _refuse("seed", f"The model `{self.model}` does not take a seed.")
            add(seed_input, "UINT64", struct.pack("<Q", s.seed % 2**64))
        if self.wants_counts:
            add("return_num_input_tokens", "BOOL", b"\x01")
            add("return_num_output_tokens", "BOOL", b"\x01")
        if logprobs:
            add("return_log_probs", "BOOL", b"\x01")
        if native_n:
            add("num_return_sequences", "INT32", struct.pack("<i", n))
        guide = self._guide(view) if chat and isinstance(view, ChatRequestView) else None
        if guide is not None:
            add("guided_decoding_guide_type", "BYTES", _bytes1(guide[0]))
            add("guided_decoding_guide", "BYTES", _bytes1(guide[1]))
        outputs = self._outputs
        if logprobs or native_n:
            names = ["output_log_probs", "cum_log_probs"] if logprobs else []
            names += ["sequence_index"] if native_n else []
            outputs = [*outputs, *(_Output(name=x) for x in names if x in self.outputs)]
        level = triton_priority(priority, self.cfg.priority_levels)

        def request(rid: str, seed_raw: bytes | None) -> Any:
            raw_inputs = raws
            if seed_raw is not None:  # fan-out: choice i samples with seed + i
                raw_inputs = [
                    seed_raw if t.name == seed_input else r for t, r in zip(tensors, raws, strict=True)
                ]
            req = pb.ModelInferRequest(
                model_name=self.model, id=rid, inputs=tensors, outputs=outputs, raw_input_contents=raw_inputs
            )
            req.parameters["triton_enable_empty_final_response"].CopyFrom(_EMPTY_FINAL)
            if level:  # a uint64 `priority` parameter, as tritonclient sends it
                req.parameters["priority"].uint64_param = level
            return req

        if n == 1 or native_n:
            requests = [request(request_id, None)]
        else:
            requests = [
                request(
                    request_id if i == 0 else f"{request_id}-{i}",
                    None if s.seed is None or i == 0 else struct.pack("<Q", (s.seed + i) % 2**64),
                )
                for i in range(n)
            ]
        return TritonPlan(requests, stops, max_tokens, n, native_n, logprobs, parser)

    def _refuse_unsupported_completion(self, s: CompletionSamplingView) -> None:
        if s.logprobs:
            raise _refuse(
                "logprobs",
                "This model returns the chosen token's log probability only; `logprobs` must be 0.",
            )
        if s.echo:
            raise _refuse("echo", "This model does not echo the prompt.")
        if s.suffix:
            raise _refuse("suffix", "This model does not support `suffix` (insertion).")
        if s.best_of is not None and s.best_of > 1:
            raise _refuse("best_of", "This model returns one choice per request; `best_of` must be 1.")

    def _refuse_unsupported_chat(self, s: SamplingView) -> None:
        if s.top_logprobs:
            raise _refuse(
                "top_logprobs",
                "This model returns the chosen token's log probability only; `top_logprobs` must be 0.",
            )
        if (s.modalities and s.modalities != ["text"]) or s.audio is not None:
            raise _refuse("modalities", "This model produces text only.")

    def _guide(self, view: ChatRequestView) -> tuple[bytes, bytes] | None:
        fmt = view.response_format
        if fmt is None or fmt.get("type") in (None, "text"):
            return None
        kind = fmt.get("type")
        if kind not in ("json_object", "json_schema"):
            raise GatewayError(
                Fault.INVALID_REQUEST, f"Unknown response_format type {kind!r}.", param="response_format"
            )
        if not self.cfg.guided_decoding:
            raise _refuse("response_format", "This model is not configured for structured output.")
        if kind == "json_object":
            return b"json", b""
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GatewayError(
                Fault.INVALID_REQUEST,
                "`response_format.json_schema.schema` must be an object.",
                param="response_format",
            )
        return b"json_schema", _encode(schema)
