"""OpenAI chat request -> TensorRT-LLM tensors (no server: the protobuf the gateway would send)."""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import pytest

from gateway.config import TritonModelConfig
from gateway.errors import GatewayError
from gateway.schemas import ChatRequestView
from gateway.upstreams.triton_request import TritonRequestBuilder, chatml, triton_priority

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
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
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
