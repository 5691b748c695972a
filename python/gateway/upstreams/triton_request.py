"""OpenAI chat request -> a Triton `ModelInferRequest` in the TensorRT-LLM tensor contract.

The names, dtypes and shapes are TensorRT-LLM's `ensemble` / `tensorrt_llm_bls` inputs
(Triton's TensorRT-LLM backend docs): every tensor has a leading batch dimension of 1. Only inputs the model
declares are sent (its metadata is read once), so one mapping serves both the stock configs and
older ones without `return_num_*_tokens`. What the model cannot do is refused with a 400 naming
the parameter, never silently dropped.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

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

    # refused: TensorRT-LLM's text contract cannot honour them
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


class CompletionSamplingView(_Sampling, gc=False):
    """The same for `/v1/completions` (`logprobs` is a count there)."""

    # refused: TensorRT-LLM's text contract cannot honour them
    logprobs: int | None = None
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


def jinja_template(source: str) -> Callable[[Sequence[tuple[str, str]]], str]:
    """A Hugging Face style chat template, rendered in Jinja's immutable sandbox."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    template = env.from_string(source)

    def render(messages: Sequence[tuple[str, str]]) -> str:
        return template.render(
            messages=[{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )

    return render


class TritonRequestBuilder:
    """Per route: builds the request for one chat call. `inputs` / `outputs` are the names the
    model declares (from its metadata)."""

    __slots__ = (
        "_outputs",
        "_render",
        "cfg",
        "inputs",
        "model",
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
        template = cfg.chat_template
        if cfg.chat_template_file:
            with open(cfg.chat_template_file, encoding="utf-8") as f:
                template = f.read()
        self._render = jinja_template(template) if template else chatml
        names = ["text_output"]
        #: usage from the model's own counts when it can report them
        self.wants_counts = {"num_input_tokens", "num_output_tokens"} <= outputs and {
            "return_num_input_tokens",
            "return_num_output_tokens",
        } <= inputs
        if self.wants_counts:
            names += ["num_input_tokens", "num_output_tokens"]
        self._outputs = [_Output(name=n) for n in names]

    def prompt(self, view: GenerationView) -> str:
        """`text_input`: the chat template over the messages, or a completion's prompt as is."""
        if isinstance(view, CompletionRequestView):
            prompt = view.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    many = len(prompt) > 1 and all(isinstance(p, str) for p in prompt)
                    what = "one prompt per request" if many else "a text prompt (not token ids)"
                    raise _refuse("prompt", f"The model `{self.model}` takes {what}.")
                prompt = prompt[0]
            return prompt
        messages = [(m.role, _text_of(m, i)) for i, m in enumerate(view.messages)]
        try:
            return self._render(messages)
        except GatewayError:
            raise
        except Exception as exc:  # a template error is the deployment's, not the client's
            raise GatewayError(Fault.INTERNAL, f"The model's chat template failed: {exc}") from None

    def build(
        self, view: GenerationView, body: bytes, request_id: str, stream: bool, priority: int = 0
    ) -> tuple[Any, list[str], int]:
        """-> (ModelInferRequest, stop words to cut, max_tokens). `priority` is the request's
        (its tier's, higher first): see `triton_priority`."""
        s: _Sampling
        try:
            if isinstance(view, ChatRequestView):
                s = _sampling.decode(body)
                self._refuse_unsupported_chat(view, s)
                max_tokens = view.max_completion_tokens or view.max_tokens or self.cfg.default_max_tokens
            else:
                s = _completion_sampling.decode(body)
                self._refuse_unsupported_completion(s)
                max_tokens = view.max_tokens or self.cfg.default_max_tokens
        except msgspec.ValidationError as exc:
            raise GatewayError(Fault.INVALID_REQUEST, f"Invalid request: {exc}") from None
        if view.n is not None and view.n > 1:
            raise _refuse("n", "This model returns one choice per request; `n` must be 1.")
        if s.logit_bias:
            raise _refuse("logit_bias", "This model does not support `logit_bias`.")
        if max_tokens > 2**31 - 1:
            raise GatewayError(Fault.INVALID_REQUEST, "`max_tokens` is too large.", param="max_tokens")
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

        add("text_input", "BYTES", _bytes1(self.prompt(view).encode()))
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
        if s.seed is not None:
            add("seed", "UINT64", struct.pack("<Q", s.seed % 2**64))
        if self.wants_counts:
            add("return_num_input_tokens", "BOOL", b"\x01")
            add("return_num_output_tokens", "BOOL", b"\x01")
        guide = self._guide(view) if isinstance(view, ChatRequestView) else None
        if guide is not None:
            add("guided_decoding_guide_type", "BYTES", _bytes1(guide[0]))
            add("guided_decoding_guide", "BYTES", _bytes1(guide[1]))
        request = pb.ModelInferRequest(
            model_name=self.model,
            id=request_id,
            inputs=tensors,
            outputs=self._outputs,
            raw_input_contents=raws,
        )
        request.parameters["triton_enable_empty_final_response"].CopyFrom(_EMPTY_FINAL)
        level = triton_priority(priority, self.cfg.priority_levels)
        if level:  # a uint64 `priority` parameter, as tritonclient sends it
            request.parameters["priority"].uint64_param = level
        return request, stops, max_tokens

    def _refuse_unsupported_completion(self, s: CompletionSamplingView) -> None:
        if s.logprobs:
            raise _refuse("logprobs", "This model does not return log probabilities.")
        if s.echo:
            raise _refuse("echo", "This model does not echo the prompt.")
        if s.suffix:
            raise _refuse("suffix", "This model does not support `suffix` (insertion).")
        if s.best_of is not None and s.best_of > 1:
            raise _refuse("best_of", "This model returns one choice per request; `best_of` must be 1.")

    def _refuse_unsupported_chat(self, view: ChatRequestView, s: SamplingView) -> None:
        if s.logprobs or s.top_logprobs:
            raise _refuse("logprobs", "This model does not return log probabilities.")
        if (s.modalities and s.modalities != ["text"]) or s.audio is not None:
            raise _refuse("modalities", "This model produces text only.")
        if view.tools:
            raise _refuse("tools", "This model does not support tool calls.")

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
