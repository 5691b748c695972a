"""OpenAI chat request -> TensorRT-LLM tensors (no server: the protobuf the gateway would send)."""

from __future__ import annotations

import json
import struct
from typing import Any

import msgspec
import pytest

from gateway.config import TritonModelConfig
from gateway.errors import GatewayError
from gateway.schemas import ChatRequestView
from gateway.upstreams.triton_request import TritonRequestBuilder, chatml, triton_priority
from gateway.upstreams.triton_tools import ParsedCall, call_id, make_parser

#: The inputs of the stock TensorRT-LLM `ensemble` config (newer releases).
TRTLLM_INPUTS = {
    "text_input",
    "max_tokens",
    "stream",
    "stop_words",
    "bad_words",
    "exclude_input_in_output",
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "seed",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "guided_decoding_guide_type",
    "guided_decoding_guide",
}
OUTPUTS = {"text_output", "num_input_tokens", "num_output_tokens"}


def build(
    body: dict[str, Any],
    cfg: TritonModelConfig | None = None,
    inputs: set[str] = TRTLLM_INPUTS,
    outputs: set[str] = OUTPUTS,
    stream: bool = True,
) -> tuple[dict[str, tuple[str, list[int], bytes]], Any, list[str], int]:
    raw = msgspec.json.encode({"model": "m", **body})
    view = msgspec.json.decode(raw, type=ChatRequestView)
    builder = TritonRequestBuilder("ensemble", cfg or TritonModelConfig(), inputs, outputs)
    req, stops, max_tokens = builder.build(view, raw, "rid-1", stream)
    tensors = {
        t.name: (t.datatype, list(t.shape), req.raw_input_contents[i]) for i, t in enumerate(req.inputs)
    }
    return tensors, req, stops, max_tokens


def strings(raw: bytes) -> list[str]:
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + n].decode())
        at += 4 + n
    return out


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_full_mapping_names_dtypes_shapes_and_values() -> None:
    tensors, req, stops, max_tokens = build(
        {
            "messages": MESSAGES,
            "max_completion_tokens": 77,
            "max_tokens": 5,  # max_completion_tokens wins
            "stop": ["END", "\n\n"],
            "temperature": 0.5,
            "top_p": 0.25,
            "seed": 42,
            "presence_penalty": 1.5,
            "frequency_penalty": -0.5,
            "top_k": 7,
        },
        TritonModelConfig(stop=["<|im_end|>"]),
    )
    assert req.model_name == "ensemble" and req.id == "rid-1"
    assert req.parameters["triton_enable_empty_final_response"].bool_param is True
    assert [o.name for o in req.outputs] == ["text_output", "num_input_tokens", "num_output_tokens"]
    dtype, shape, raw = tensors["text_input"]
    assert (dtype, shape) == ("BYTES", [1, 1])
    assert strings(raw) == [chatml([("system", "Be brief."), ("user", "Hi!")])]
    assert tensors["max_tokens"] == ("INT32", [1, 1], struct.pack("<i", 77)) and max_tokens == 77
    assert tensors["stream"] == ("BOOL", [1, 1], b"\x01")
    assert tensors["exclude_input_in_output"] == ("BOOL", [1, 1], b"\x01")
    dtype, shape, raw = tensors["stop_words"]
    assert (dtype, shape, strings(raw)) == ("BYTES", [1, 3], ["<|im_end|>", "END", "\n\n"])
    assert stops == ["<|im_end|>", "END", "\n\n"]
    assert tensors["temperature"] == ("FP32", [1, 1], struct.pack("<f", 0.5))
    assert tensors["top_p"] == ("FP32", [1, 1], struct.pack("<f", 0.25))
    assert tensors["presence_penalty"][2] == struct.pack("<f", 1.5)
    assert tensors["frequency_penalty"][2] == struct.pack("<f", -0.5)
    assert tensors["top_k"] == ("INT32", [1, 1], struct.pack("<i", 7))
    assert tensors["seed"] == ("UINT64", [1, 1], struct.pack("<Q", 42))
    assert tensors["return_num_input_tokens"][2] == tensors["return_num_output_tokens"][2] == b"\x01"
    assert "guided_decoding_guide_type" not in tensors


def test_minimal_request_on_a_model_without_token_counts() -> None:
    """Older TRT-LLM configs: no return_num_* inputs -> none sent, only text_output requested
    (the gateway then counts usage itself)."""
    inputs = {"text_input", "max_tokens", "stream"}
    tensors, req, stops, max_tokens = build(
        {"messages": [{"role": "user", "content": "x"}]},
        TritonModelConfig(default_max_tokens=33),
        inputs=inputs,
        outputs={"text_output"},
        stream=False,
    )
    assert set(tensors) == inputs
    assert tensors["stream"][2] == b"\x00" and max_tokens == 33 and stops == []
    assert [o.name for o in req.outputs] == ["text_output"]


def test_text_parts_are_joined_and_jinja_templates_render() -> None:
    cfg = TritonModelConfig(
        chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>"
    )
    tensors, *_ = build(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        },
        cfg,
    )
    assert strings(tensors["text_input"][2]) == ["[user] ab\n>"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),  # the model below has no `return_log_probs`
        ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),  # no alternatives in the contract
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"stop": [""]}, "stop"),
        # (more than 4 stop strings never get here: the decode stage refuses them as OpenAI does)
        ({"top_k": -1}, "top_k"),
        ({"seed": 42}, "seed"),  # the model below has no `seed` input
    ],
)
def test_what_the_model_cannot_do_is_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        build({"messages": MESSAGES, **extra}, inputs=TRTLLM_INPUTS - {"seed"})
    assert info.value.status == 400 and info.value.param == param


def test_tools_are_refused_only_when_the_model_has_no_parser() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(GatewayError) as info:
        build({"messages": MESSAGES, "tools": tools}, TritonModelConfig(tool_parser="none"))
    assert info.value.status == 400 and info.value.param == "tools"
    # tool_choice none: the tools are not offered, so nothing needs parsing
    build(
        {"messages": MESSAGES, "tools": tools, "tool_choice": "none"}, TritonModelConfig(tool_parser="none")
    )


def test_non_text_content_is_refused_with_its_path() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    with pytest.raises(GatewayError) as info:
        build({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]})
    assert info.value.param == "messages[0].content[1]" and "text only" in info.value.message


def test_guided_decoding_when_configured() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tensors, *_ = build(
        {"messages": MESSAGES, "response_format": fmt}, TritonModelConfig(guided_decoding=True)
    )
    assert strings(tensors["guided_decoding_guide_type"][2]) == ["json_schema"]
    assert msgspec.json.decode(strings(tensors["guided_decoding_guide"][2])[0]) == schema
    tensors, *_ = build(
        {"messages": MESSAGES, "response_format": {"type": "json_object"}},
        TritonModelConfig(guided_decoding=True),
    )
    assert strings(tensors["guided_decoding_guide_type"][2]) == ["json"]
    tensors, *_ = build({"messages": MESSAGES, "response_format": {"type": "text"}})
    assert "guided_decoding_guide_type" not in tensors


def test_a_model_without_the_text_contract_is_named() -> None:
    with pytest.raises(GatewayError, match="missing max_tokens, text_output"):
        TritonRequestBuilder("resnet", TritonModelConfig(), {"text_input"}, {"probs"})


def test_tier_priority_becomes_tritons_request_priority() -> None:
    """Higher first becomes Triton's 1 = highest; 0 and unconfigured levels send nothing (the
    model's default level), as tritonclient does: a uint64 `priority` parameter."""
    raw = msgspec.json.encode({"model": "m", "messages": MESSAGES})
    view = msgspec.json.decode(raw, type=ChatRequestView)

    def sent(priority: int, levels: int) -> int | None:
        builder = TritonRequestBuilder(
            "ensemble", TritonModelConfig(priority_levels=levels), TRTLLM_INPUTS, OUTPUTS
        )
        req = builder.build(view, raw, "rid-1", True, priority)[0]
        if "priority" not in req.parameters:
            return None
        assert req.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
        return int(req.parameters["priority"].uint64_param)

    assert sent(0, 4) is None and sent(3, 0) is None
    assert [sent(p, 4) for p in (1, 2, 3, 9)] == [3, 2, 1, 1]
    assert sent(-2, 4) == 4  # below the default: the lowest level
    assert [triton_priority(p, 2) for p in (-1, 0, 1, 5)] == [2, 0, 1, 1]


# ---- tools, n, logprobs, seed (issue 14 item 5) ---------------------------------------------------
#: what the stock configs add for these: log probs, several sequences, TensorRT-LLM's seed name
RICH_INPUTS = TRTLLM_INPUTS | {"return_log_probs", "num_return_sequences", "random_seed"}
RICH_OUTPUTS = OUTPUTS | {"output_log_probs", "cum_log_probs", "sequence_index"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def plan(body: dict[str, Any], cfg: TritonModelConfig | None = None, **kw: Any) -> Any:
    raw = msgspec.json.encode({"model": "m", **body})
    view = msgspec.json.decode(raw, type=ChatRequestView)
    builder = TritonRequestBuilder(
        "ensemble", cfg or TritonModelConfig(), kw.get("inputs", RICH_INPUTS), kw.get("outputs", RICH_OUTPUTS)
    )
    return builder.plan(view, raw, "rid-1", kw.get("stream", False))


def tensors_of(req: Any) -> dict[str, bytes]:
    return {t.name: req.raw_input_contents[i] for i, t in enumerate(req.inputs)}


def test_tools_are_rendered_hermes_style_in_the_system_block() -> None:
    p = plan({"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required"})
    assert p.rich and p.tool_parser == "hermes"
    prompt = strings(tensors_of(p.requests[0])["text_input"])[0]
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    assert "<tool_call>" in prompt and "You must call at least one function." in prompt
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    # streamed from the model even for a unary reply (one path for every choice)
    assert tensors_of(p.requests[0])["stream"] == b"\x01"


def test_a_follow_up_turn_renders_the_call_and_its_results() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
    ]
    prompt = strings(tensors_of(plan({"messages": messages, "tools": [WEATHER]}).requests[0])["text_input"])[
        0
    ]
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    ) in prompt
    # without `tools` in the follow-up the history still renders (and nothing is parsed)
    p = plan({"messages": messages})
    assert (
        p.tool_parser is None
        and "<tool_response>\nsunny" in strings(tensors_of(p.requests[0])["text_input"])[0]
    )


def test_jinja_templates_get_the_tools_and_the_calls() -> None:
    template = (
        "{% for t in tools %}T:{{ t.function.name }};{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]"
        "{% endfor %}|"
        "{% endfor %}"
    )
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    p = plan({"messages": messages, "tools": [WEATHER]}, TritonModelConfig(chat_template=template))
    assert (
        strings(tensors_of(p.requests[0])["text_input"])[0]
        == "T:get_weather;user:w?|assistant:[get_weather Oslo]|"
    )


def test_n_uses_num_return_sequences_when_the_model_has_it_else_fans_out() -> None:
    p = plan({"messages": MESSAGES, "n": 3, "seed": 7})
    assert (p.n, p.native_n, len(p.requests)) == (3, True, 1)
    t = tensors_of(p.requests[0])
    assert struct.unpack("<i", t["num_return_sequences"]) == (3,)
    assert struct.unpack("<Q", t["random_seed"]) == (7,) and "seed" not in t  # TensorRT-LLM's name
    assert "sequence_index" in {o.name for o in p.requests[0].outputs}

    p = plan({"messages": MESSAGES, "n": 3, "seed": 7}, outputs=RICH_OUTPUTS - {"sequence_index"})
    assert (p.native_n, len(p.requests)) == (False, 3)
    assert [r.id for r in p.requests] == ["rid-1", "rid-1-1", "rid-1-2"]
    seeds = [struct.unpack("<Q", tensors_of(r)["random_seed"])[0] for r in p.requests]
    assert seeds == [7, 8, 9]  # each choice samples on its own
    assert all("num_return_sequences" not in tensors_of(r) for r in p.requests)


def test_logprobs_ask_for_the_models_log_probs() -> None:
    p = plan({"messages": MESSAGES, "logprobs": True, "top_logprobs": 0})
    assert p.logprobs and p.rich
    assert tensors_of(p.requests[0])["return_log_probs"] == b"\x01"
    assert {"output_log_probs", "cum_log_probs"} <= {o.name for o in p.requests[0].outputs}
    p = plan({"messages": MESSAGES})
    assert not p.rich and "return_log_probs" not in tensors_of(p.requests[0])
    assert tensors_of(p.requests[0])["stream"] == b"\x00"


# ---- the tool-call parsers --------------------------------------------------------------------
HERMES_TEXT = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
)


def run_parser(kind: str, text: str, step: int, leak_check: bool = True) -> tuple[str, list[ParsedCall]]:
    parser = make_parser(kind)
    content, calls = "", []
    for at in range(0, len(text), step):
        c, k = parser.push(text[at : at + step])
        assert not leak_check or ("<tool" not in c and "tool_call>" not in c)  # no marker leaks
        content += c
        calls += k
    c, k = parser.finish()
    return content + c, calls + k


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 1000])
def test_hermes_calls_are_found_however_the_text_is_split(step: int) -> None:
    content, calls = run_parser("hermes", HERMES_TEXT + HERMES_TEXT.replace("Let me check. ", ""), step)
    assert content == "Let me check. "
    assert calls == [ParsedCall("get_weather", '{"city": "Paris"}')] * 2


def test_hermes_edge_cases() -> None:
    # not a marker after all; a block that is not a call: given back as the text it was
    assert run_parser("hermes", "a < b and <tool", 1, False) == ("a < b and <tool", [])
    bad = "<tool_call>not json</tool_call>"
    assert run_parser("hermes", bad, 3, False) == (bad, [])
    # an unclosed block at the end (EOS ate the tag) is still a call
    assert run_parser("hermes", '<tool_call>{"name": "f", "arguments": {}}', 4) == (
        "",
        [ParsedCall("f", "{}")],
    )
    assert run_parser("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', 4)[
        1
    ] == [ParsedCall("f", '{"x": 1}')]


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_llama3_json_calls(step: int) -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert run_parser("llama3_json", text, step) == ("", [ParsedCall("a", '{"x": 1}'), ParsedCall("b", "{}")])
    assert run_parser("llama3_json", '  {"name": "a", "parameters": {"x": "y"}}', step) == (
        "",
        [ParsedCall("a", '{"x": "y"}')],
    )
    assert run_parser("llama3_json", "Plain {text}", step) == ("Plain {text}", [])
    assert run_parser("llama3_json", '{"not": "a call"}', step) == ('{"not": "a call"}', [])
    assert call_id().startswith("call_") and len(call_id()) == 29
