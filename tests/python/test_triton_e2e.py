"""End to end: the `openai` SDK -> the gateway -> a real tritonserver running the test LLMs.

Expected texts are never hard-coded: each case asks the same model directly with tritonclient
(the reference a TensorRT-LLM user would compare with) and checks that the gateway turns that
into what OpenAI documents (stop word cut, finish_reason, usage).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import REPO, Gateway, TritonServer, private_ca, restartable_triton, run_gateway, wait_event

from gateway.triton_local import LocalTriton

MODELS = {"llm-bls": "tensorrt_llm_bls", "llm-core": "testllm_core", "llm-ensemble": "ensemble"}
MESSAGES: list[Any] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Tell me about rivers and boats."},
]
#: The built-in chat template (ChatML) applied to MESSAGES: what Triton gets as `text_input`.
PROMPT = (
    "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
    "<|im_start|>user\nTell me about rivers and boats.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def triton_config(grpc_address: str, extra: str = "") -> str:
    lines = [
        "server: {host: 127.0.0.1, stream_ping_interval_ms: 200}",
        "providers:",
        "  - name: triton",
        "    kind: triton",
        f"    base_url: grpc://{grpc_address}",
        "    first_byte_timeout_ms: 10000",
        "    idle_timeout_ms: 10000",
        f"  - {{name: impatient, kind: triton, base_url: 'grpc://{grpc_address}',"
        " first_byte_timeout_ms: 300, total_timeout_ms: 600}",
        "models:",
        *(f"  - {{name: {k}, provider: triton, upstream_model: {v}}}" for k, v in MODELS.items()),
        "  - {name: llm-missing, provider: triton, upstream_model: not_loaded_model}",
        "  - {name: llm-impatient, provider: impatient, upstream_model: tensorrt_llm_bls}",
    ]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture(scope="module")
def gw(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(
        tmp_path_factory.mktemp("gw-triton"), None, config_text=triton_config(triton.grpc_address)
    ) as g:
        yield g


@pytest.fixture(scope="module")
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=30)


def direct(
    triton: TritonServer, model: str, text: str, max_tokens: int = 1000, stop: list[str] | None = None
) -> tuple[str, dict[str, int]]:
    """Stream `text` through `model` with tritonclient; -> (generated text, last token counts)."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_address)

    def tensor(name: str, dtype: str, value: Any) -> grpcclient.InferInput:
        arr = np.array([value], dtype=object if dtype == "BYTES" else None)
        if dtype == "INT32":
            arr = arr.astype(np.int32)
        elif dtype == "BOOL":
            arr = arr.astype(bool)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    inputs = [
        tensor("text_input", "BYTES", [text.encode()]),
        tensor("max_tokens", "INT32", [max_tokens]),
        tensor("stream", "BOOL", [True]),
        tensor("exclude_input_in_output", "BOOL", [True]),
        tensor("return_num_input_tokens", "BOOL", [True]),
        tensor("return_num_output_tokens", "BOOL", [True]),
    ]
    if stop:
        inputs.append(tensor("stop_words", "BYTES", [w.encode() for w in stop]))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(
            model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
        )
        text_out, counts = "", {}
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            out = result.as_numpy("text_output")
            if out is not None:
                text_out += b"".join(out.flatten()).decode()
            for name in ("num_input_tokens", "num_output_tokens"):
                value = result.as_numpy(name)
                if value is not None:
                    counts[name] = int(value.flatten()[0])
            if resp.parameters["triton_final_response"].bool_param:
                return text_out, counts
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("public", list(MODELS))
def test_sdk_stream_and_unary_equal_direct_output(
    client: openai.OpenAI, triton: TritonServer, public: str
) -> None:
    expected, counts = direct(triton, MODELS[public], PROMPT)
    assert expected  # the model said something

    chunks = list(
        client.chat.completions.create(
            model=public, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    # usage comes from the model's own counts (num_input_tokens / num_output_tokens)
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        counts["num_input_tokens"],
        counts["num_output_tokens"],
    )
    assert all(c.model == public for c in chunks)

    resp = client.chat.completions.create(model=public, messages=MESSAGES)
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == counts["num_output_tokens"]
    assert resp.model == public and resp.object == "chat.completion"


@pytest.mark.parametrize("stream", [True, False])
def test_max_tokens_ends_with_length(client: openai.OpenAI, triton: TritonServer, stream: bool) -> None:
    expected, _ = direct(triton, "tensorrt_llm_bls", PROMPT, max_tokens=3)
    if stream:
        chunks = list(
            client.chat.completions.create(model="llm-bls", messages=MESSAGES, max_tokens=3, stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        resp = client.chat.completions.create(model="llm-bls", messages=MESSAGES, max_completion_tokens=3)
        text, reason = resp.choices[0].message.content or "", resp.choices[0].finish_reason
    assert text == expected
    assert len(text.split()) == 3
    assert reason == "length"


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("public", ["llm-bls", "llm-ensemble"])
def test_stop_word_is_cut_as_openai_documents(
    client: openai.OpenAI, triton: TritonServer, stream: bool, public: str
) -> None:
    full, _ = direct(triton, MODELS[public], PROMPT)
    stop = full.split()[3]  # a word the model will produce; it may occur earlier inside a word
    with_stop, _ = direct(triton, MODELS[public], PROMPT, stop=[stop])
    assert with_stop.endswith(stop)  # TensorRT-LLM keeps the stop word ...
    expected = full[: full.index(stop)]  # ... OpenAI ends the text before the first occurrence
    if stream:
        chunks = list(
            client.chat.completions.create(model=public, messages=MESSAGES, stop=[stop], stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        resp = client.chat.completions.create(model=public, messages=MESSAGES, stop=stop)
        text, reason = resp.choices[0].message.content or "", resp.choices[0].finish_reason
    assert text == expected
    assert stop not in text
    assert reason == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        # (tools, n, logprobs: test_triton_parity.py; this model has no guided decoding configured)
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_what_the_model_cannot_do_is_a_clear_400(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llm-bls", messages=MESSAGES, extra_body=extra)
    err = info.value.body
    assert isinstance(err, dict)
    assert err["param"] == param and err["code"] == "unsupported_parameter", err


def test_image_parts_are_refused(client: openai.OpenAI) -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model="llm-bls", messages=[{"role": "user", "content": image}])


@pytest.mark.parametrize("public", ["llm-bls", "llm-core"])
def test_completions_endpoint_sends_the_prompt_as_is(
    client: openai.OpenAI, triton: TritonServer, public: str
) -> None:
    """`/v1/completions`: the prompt goes to `text_input` untemplated; the answer has the
    `text_completion` shape (streamed: text chunks, finish, usage; unary: choices[].text)."""
    prompt = "Once upon a time by the river"
    expected, counts = direct(triton, MODELS[public], prompt)
    assert expected
    chunks = list(
        client.completions.create(
            model=public, prompt=prompt, max_tokens=1000, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "text_completion" and c.model == public for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        counts["num_input_tokens"],
        counts["num_output_tokens"],
    )

    resp = client.completions.create(model=public, prompt=[prompt], max_tokens=1000)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == counts["num_output_tokens"]

    short, _ = direct(triton, MODELS[public], prompt, max_tokens=2)
    resp = client.completions.create(model=public, prompt=prompt, max_tokens=2)
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (short, "length")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 2}, "logprobs"),  # alternatives: the contract has none
    ],
)
def test_completions_what_the_model_cannot_do_is_a_clear_400(
    gw: Gateway, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "llm-bls", "prompt": "hi there", **extra}
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
    finally:
        conn.close()
    assert r.status == 400 and err["param"] == param and err["code"] == "unsupported_parameter", err


def test_model_not_loaded_is_503_with_a_clear_message(client: openai.OpenAI, gw: Gateway) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="llm-missing", messages=MESSAGES)
    assert info.value.status_code == 503
    assert "not_loaded_model" in str(info.value.body) and "not loaded" in str(info.value.body)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("GET", "/readyz")
        r = conn.getresponse()
        body = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 503  # a routed model is missing: not ready, and it says which
    models = body["upstreams"]["triton"]["models"]
    assert models["not_loaded_model"] is False
    assert all(models[m] for m in MODELS.values())


def _stream_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": max_tokens,
    }


@contextlib.contextmanager
def _sse_post(port: int, body: dict[str, Any], request_id: str) -> Iterator[http.client.HTTPResponse]:
    """POST a streamed chat request; leaving the block closes the connection (a disconnect)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"content-type": "application/json", "x-request-id": request_id},
        )
        yield conn.getresponse()
    finally:
        conn.close()


def _read_events(resp: http.client.HTTPResponse, n: int) -> list[str]:
    """The first `n` SSE data payloads."""
    out: list[str] = []
    while len(out) < n:
        line = resp.readline().decode()
        assert line, "stream ended early"
        if line.startswith("data: "):
            out.append(line[6:].strip())
    return out


@pytest.mark.parametrize(
    ("public", "cancelled"),
    [("llm-bls", True), ("llm-core", True), ("llm-ensemble", False)],
)
def test_client_disconnect_cancels_decoupled_models_but_not_an_ensemble(
    gw: Gateway, triton: TritonServer, public: str, cancelled: bool
) -> None:
    """A direct decoupled model sees the cancel (`is_cancelled()`) within a token. An ensemble
    does not pass the cancel into its running step: the step generates to the end (Triton
    checks cancellation only between steps), so cancelling frees nothing on that shape."""
    rid = f"disc-{uuid.uuid4().hex[:12]}"
    prompt = "[[testllm delay_ms=40]] count slowly"
    body = _stream_body(public, prompt, 40)
    with _sse_post(gw.port, body, rid) as resp:
        assert resp.status == 200
        _read_events(resp, 3)  # role + two tokens
    # the client went away mid-stream
    inner = "testllm_core" if public == "llm-ensemble" else MODELS[public]
    if cancelled:
        event = wait_event(triton.events_path, rid, "cancel", model=inner)
        assert event["tokens"] < 40
    else:
        end = wait_event(triton.events_path, rid, "end", timeout_s=10, model=inner)
        assert not triton.events(rid, event="cancel")
        assert end["tokens"] > 3  # it kept generating after the client left


def test_ignore_cancel_model_runs_on_after_disconnect(gw: Gateway, triton: TritonServer) -> None:
    """Like the stock TensorRT-LLM BLS, which never checks `is_cancelled()`."""
    rid = f"ign-{uuid.uuid4().hex[:12]}"
    prompt = "[[testllm delay_ms=20 ignore_cancel=1]] go on"
    body = _stream_body("llm-bls", prompt, 30)
    with _sse_post(gw.port, body, rid) as resp:
        _read_events(resp, 2)
    wait_event(triton.events_path, rid, "end", timeout_s=10, model="tensorrt_llm_bls")
    assert not triton.events(rid, event="cancel")


def test_model_error_mid_stream_is_an_error_event_then_done(gw: Gateway) -> None:
    prompt = "[[testllm fail_after=2]] please fail"
    body = _stream_body("llm-bls", prompt, 40)
    with _sse_post(gw.port, body, f"fail-{uuid.uuid4().hex[:8]}") as resp:
        assert resp.status == 200
        raw = resp.read().decode()
    events = [line[6:].strip() for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "upstream_error" and "tensorrt_llm_bls" in err["message"]
    tokens = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert len([t for t in tokens if t]) == 2


def test_model_error_before_the_first_token_is_a_json_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="llm-bls", messages=[{"role": "user", "content": "[[testllm fail_after=0]] x"}], stream=True
        )
    assert info.value.status_code == 502


def _until_ok(client: openai.OpenAI, model: str, timeout_s: float = 15.0) -> str:
    """The first successful answer; the channel's reconnect backoff is capped at 2 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return (
                client.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content
                or ""
            )
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_triton_down_up_killed_mid_stream_and_back(tmp_path: Path) -> None:
    """Triton down -> 503 at once; Triton up -> served without a gateway restart; Triton killed
    mid-stream -> an SSE error event then [DONE] (no hang); Triton back -> served again."""
    grpc_port, server = restartable_triton(tmp_path / "tritonserver.log")
    config = triton_config(f"127.0.0.1:{grpc_port}")
    with run_gateway(tmp_path, None, config_text=config) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="llm-core", messages=MESSAGES)
        assert info.value.status_code == 503
        assert "unreachable" in str(info.value.body)
        assert info.value.response.headers["retry-after"] == "1"

        first = server()
        with first:
            answer = _until_ok(client, "llm-core")
            assert answer
            body = _stream_body("llm-core", "[[testllm delay_ms=50]] keep going", 40)
            with _sse_post(gw.port, body, f"kill-{uuid.uuid4().hex[:8]}") as resp:
                assert resp.status == 200
                _read_events(resp, 3)
                first.kill()
                rest = resp.read().decode()  # returns: the gateway ends the stream
            events = [line[6:].strip() for line in rest.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            err = json.loads(events[-2])["error"]
            assert err["code"] in ("upstream_unavailable", "upstream_error"), err

        with server():
            assert _until_ok(client, "llm-core") == answer


@pytest.mark.parametrize("stream", [True, False])
def test_triton_too_slow_is_a_504(client: openai.OpenAI, stream: bool) -> None:
    """First token later than `first_byte_timeout_ms` (streams) or no answer within
    `total_timeout_ms` (unary): 504, and the call is cancelled."""
    slow = [{"role": "user", "content": "[[testllm delay_ms=1000]] take your time"}]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="llm-impatient", messages=slow, max_tokens=3, stream=stream)
    assert info.value.status_code == 504
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_timeout"


def test_live_budget_enforcement_ends_a_triton_stream(triton: TritonServer, tmp_path: Path) -> None:
    """The reservation covers `limits.default_max_tokens` (5) completion tokens; the budget has
    room for 5 more: the stream is cut after the token that passes 10, with `budget_exceeded`
    then [DONE], and the call is cancelled (the model logs the cancel)."""
    key = "sk-live-triton-0123456789abcdef"
    config = (
        triton_config(triton.grpc_address)
        + f"""
auth:
  enabled: true
  keys: [{{id: live, key: {key}, tier: live}}]
tiers:
  default: {{}}
  live: {{rpm: 1000, budget_usd_per_day: 0.0002}}
prices:
  llm-bls: {{input_per_mtok: 0, output_per_mtok: 20}}
limits: {{default_max_tokens: 5, live_budget_enforcement: true}}
"""
    )
    rid = f"live-{uuid.uuid4().hex[:10]}"
    with run_gateway(tmp_path, None, config_text=config) as gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            body = {
                "model": "llm-bls",
                "stream": True,
                "messages": [{"role": "user", "content": "[[testllm delay_ms=20]] a long answer please"}],
            }
            headers = {
                "content-type": "application/json",
                "authorization": f"Bearer {key}",
                "x-request-id": rid,
            }
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            assert resp.status == 200
            raw = resp.read().decode()
        finally:
            conn.close()
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "budget_exceeded" and "11 completion tokens" in err["message"], err
    words = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2]).split()
    assert len(words) == 11  # the token that passed the limit was sent (and is charged)
    wait_event(triton.events_path, rid, "cancel", model="tensorrt_llm_bls")


def test_grpcs_to_a_tls_tritonserver_with_a_private_ca(tmp_path: Path) -> None:
    """`grpcs://` + `tls_ca_file` reaches a tritonserver serving gRPC over TLS, on both gRPC
    transports (streamed and unary answers equal the plain-text reference); without the CA (system
    roots) the certificate is refused with a clear 503, and `grpc://` to the TLS port is a 503 too."""
    ca, cert, key = private_ca(tmp_path)
    tls_args = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
    server = LocalTriton(
        REPO / "triton_models",
        models=["testllm_core"],
        log_path=tmp_path / "tritonserver.log",
        extra_args=tls_args,
    )
    with server:
        port = server.grpc_port
        providers = [
            f"  - {{name: tls-h2, kind: triton, base_url: 'grpcs://localhost:{port}', tls_ca_file: '{ca}'}}",
            f"  - {{name: tls-grpcio, kind: triton, base_url: 'grpcs://127.0.0.1:{port}', "
            f"tls_ca_file: '{ca}', transport: grpcio}}",
            f"  - {{name: no-ca, kind: triton, base_url: 'grpcs://localhost:{port}'}}",
            f"  - {{name: plain, kind: triton, base_url: 'grpc://localhost:{port}', "
            "first_byte_timeout_ms: 3000, total_timeout_ms: 3000}",
        ]
        models = [f"  - {{name: {n}, provider: {n}, upstream_model: testllm_core}}" for n in
                  ("tls-h2", "tls-grpcio", "no-ca", "plain")]  # fmt: skip
        config = "\n".join(["server: {host: 127.0.0.1}", "providers:", *providers, "models:", *models]) + "\n"
        with run_gateway(tmp_path, None, config_text=config) as gw:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=30)
            answers = set()
            for model in ("tls-h2", "tls-grpcio"):
                unary = client.chat.completions.create(model=model, messages=MESSAGES)
                streamed = "".join(
                    c.choices[0].delta.content or ""
                    for c in client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
                    if c.choices
                )
                assert unary.choices[0].message.content == streamed
                answers.add(streamed)
            assert len(answers) == 1 and next(iter(answers))

            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="no-ca", messages=MESSAGES)
            assert info.value.status_code == 503
            assert "certificate" in str(info.value.body).lower(), info.value.body
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="plain", messages=MESSAGES)
            assert info.value.status_code == 503 and "unreachable" in str(info.value.body), info.value.body


def test_a_response_stage_ends_a_triton_stream(triton: TritonServer, tmp_path: Path) -> None:
    """The response-stage contract on the Triton adapter (the HTTP side: test_pipeline_contract):
    a stage ends the stream after 3 reads with its error event, the call is cancelled, and a
    unary body passes through the stage's body hook."""
    config = triton_config(triton.grpc_address) + (
        "extensions:\n"
        "  - {kind: response_stage, factory: 'contract_parts:stop_after',\n"
        "     options: {model: llm-bls, reads: 3}}\n"
    )
    rid = f"stop-{uuid.uuid4().hex[:10]}"
    with run_gateway(tmp_path, None, config_text=config) as gw:
        body = _stream_body("llm-bls", "[[testllm delay_ms=20]] a long answer please", 40)
        with _sse_post(gw.port, body, rid) as resp:
            assert resp.status == 200
            raw = resp.read().decode()
        unary = {"model": "llm-bls", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            conn.request(
                "POST", "/v1/chat/completions", json.dumps(unary), {"content-type": "application/json"}
            )
            reply = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "test_stop" and err["message"].startswith("stopped after 3 reads"), err
    words = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2]).split()
    assert 0 < len(words) < 40
    wait_event(triton.events_path, rid, "cancel", model="tensorrt_llm_bls")
    assert reply["stage"] == "stop_after" and reply["choices"][0]["message"]["content"]


def test_a_silent_triton_model_gets_ping_comments(gw: Gateway) -> None:
    """The relay's keep-alive pings (`stream_ping_interval_ms: 200` here) on a Triton stream
    whose tokens come 600 ms apart; the content is unchanged."""
    body = _stream_body("llm-core", "[[testllm delay_ms=600]] slow please", 3)
    with _sse_post(gw.port, body, f"ping-{uuid.uuid4().hex[:8]}") as resp:
        assert resp.status == 200
        raw = resp.read().decode()
    assert ": ping" in raw
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in e for e in events)
