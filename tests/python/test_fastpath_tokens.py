"""Token counts against the reference `tiktoken` package, fed the vocabulary files the Rust crate
embeds (crates/fastpath/assets): tiktoken checks their official sha256, so equal counts also prove
the vocabularies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_rss_bounded
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _fastpath

REPO = Path(__file__).resolve().parents[2]
ENCODINGS = ["o200k_base", "cl100k_base"]
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def _bundled_assets() -> Path:
    """The vocabularies the extension embeds (crates/fastpath/assets)."""
    return REPO / "crates" / "fastpath" / "assets"


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`tiktoken` encodings loaded offline from the extension's embedded `.tiktoken` files.

    They go into a private TIKTOKEN_CACHE_DIR under the names tiktoken derives from the blob URL
    (`read_file_cached`), which accepts a cached file only if it matches the official sha256 that
    `tiktoken_ext.openai_public` pins. A spy on that call checks that the hash was really
    requested and that the bundled files match it.
    """
    tiktoken = pytest.importorskip("tiktoken")
    load = pytest.importorskip("tiktoken.load")
    assets = _bundled_assets()
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ENCODINGS:
        key = hashlib.sha1(BLOB_URL.format(name).encode()).hexdigest()
        shutil.copyfile(assets / f"{name}.tiktoken", cache / key)

    pinned: dict[str, str | None] = {}
    real_read = load.read_file_cached

    def spy(blobpath: str, expected_hash: str | None = None) -> bytes:
        pinned[blobpath] = expected_hash
        return real_read(blobpath, expected_hash)

    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    load.read_file_cached = spy
    try:
        encodings = {name: tiktoken.get_encoding(name) for name in ENCODINGS}
    finally:
        load.read_file_cached = real_read
        if saved is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    for name in ENCODINGS:
        official = pinned.get(BLOB_URL.format(name))
        assert official is not None and len(official) == 64, f"tiktoken did not pin a sha256 for {name}"
        bundled = hashlib.sha256((assets / f"{name}.tiktoken").read_bytes()).hexdigest()
        assert bundled == official, f"the embedded {name} vocabulary is not the official one"
    yield encodings


def test_tiktoken_refuses_a_file_with_the_wrong_hash(tmp_path: Path) -> None:
    """What the fixture relies on: tiktoken verifies `expected_hash`."""
    load = pytest.importorskip("tiktoken.load")
    blob = tmp_path / "vocab.tiktoken"
    blob.write_bytes(b"YQ== 0\n")
    with pytest.raises(ValueError, match="Hash mismatch"):
        load.read_file_cached(str(blob), expected_hash="0" * 64)


CORPUS = [
    "",
    " ",
    "Hello, world! How's it going? I'm fine; we'll see—they've left.",
    "def f(x: int) -> int:\n    return {'a': [x ** 2 for x in range(10)]}\n\n\n# done\r\n",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%o\\'brien%';",
    "中华人民共和国成立于1949年。我们在学习自然语言处理。",
    "日本語のテキスト、カタカナとひらがなと漢字。ｶﾀｶﾅ",
    "한국어 텍스트입니다. 안녕하세요!",
    "العربية نص تجريبي مع أرقام ١٢٣٤٥",
    "हिन्दी पाठ का एक उदाहरण है।",
    "Русский текст: съешь же ещё этих мягких французских булок.",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🇫🇷 keycap 1️⃣ rainbow 🏳️\u200d🌈",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0335\u0321\u0336a\u0337\u0322l\u0334g\u0338o\u0335",
    "whitespace   runs\t\t\t\n\n\n\n    \u00a0\u2003\u3000end   ",
    "numbers 1234567890 3.14159 -2e10 0x1F 1,000,000 ১২৩",
    "a" * 5000,
    "ab" * 3000 + "!" * 777,
    "<|endoftext|> <|fim_prefix|> <|endofprompt|> special tokens as text",
    "mixed: Hello 世界 مرحبا мир 🌍 नमस्ते 안녕 こんにちは\u200b zero-width",
    "\ufeffBOM and \ufffd replacement and \U0010ffff max",
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_corpus_matches_tiktoken(reference: dict[str, Any], encoding: str, text: str) -> None:
    want = reference[encoding].encode_ordinary(text)
    assert _fastpath.encode(text, encoding) == want
    assert _fastpath.count_tokens(text, encoding) == len(want)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_large_input_detached_path_matches(reference: dict[str, Any], encoding: str) -> None:
    text = "\n".join(CORPUS) * 20  # well past the GIL-release threshold
    assert _fastpath.count_tokens(text, encoding) == len(reference[encoding].encode_ordinary(text))


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(ENCODINGS))
def test_any_text_matches_tiktoken(reference: dict[str, Any], text: str, encoding: str) -> None:
    assert _fastpath.encode(text, encoding) == reference[encoding].encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(
    st.text(st.sampled_from("ab 1\n\t'sé日😀\u0301.,"), min_size=0, max_size=300), st.sampled_from(ENCODINGS)
)
def test_boundary_heavy_text_matches_tiktoken(reference: dict[str, Any], text: str, encoding: str) -> None:
    assert _fastpath.count_tokens(text, encoding) == len(reference[encoding].encode_ordinary(text))


def test_unknown_encoding() -> None:
    with pytest.raises(_fastpath.UnknownEncodingError, match="p50k_base"):
        _fastpath.count_tokens("x", "p50k_base")
    assert issubclass(_fastpath.UnknownEncodingError, _fastpath.FastpathError)
    assert issubclass(_fastpath.FastpathError, ValueError)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("llama-3-70b", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert _fastpath.encoding_for_model(model) == encoding


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1))
def test_estimate_is_never_zero_for_text(text: str) -> None:
    assert _fastpath.estimate_tokens(text) >= 1


def test_estimate_values() -> None:
    assert _fastpath.estimate_tokens("") == 0
    assert _fastpath.estimate_tokens("abcdefghi") == 3
    assert _fastpath.estimate_tokens("日本語") == 3


# ---- chat requests: the OpenAI cookbook's num_tokens_from_messages --------------------------


def cookbook_count(enc: Any, messages: list[dict[str, Any]]) -> int:
    """OpenAI cookbook formula, extended to content parts and tool calls as the .pyi documents."""
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for m in messages:
        total += 3
        for key, value in m.items():
            if key in ("role", "name", "tool_call_id") and isinstance(value, str):
                total += len(enc.encode_ordinary(value)) + (1 if key == "name" else 0)
            elif key == "content" and isinstance(value, str):
                total += len(enc.encode_ordinary(value))
            elif key == "content" and isinstance(value, list):
                total += sum(len(enc.encode_ordinary(p["text"])) for p in value if "text" in p)
            elif key == "tool_calls":
                for call in value:
                    fn = call["function"]
                    total += len(enc.encode_ordinary(fn["name"])) + len(enc.encode_ordinary(fn["arguments"]))
    return total


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful, pattern-following assistant."},
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean."},
    ],
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What's in this image? 日本語"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                {"type": "text", "text": 'Be "brief".\n'},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy 🌥️"},
        {"role": "assistant", "content": "It is 18°C."},
    ],
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "names", "parts-and-tools"])
def test_chat_tokens_follow_the_cookbook(
    reference: dict[str, Any], encoding: str, messages: list[Any]
) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": messages, "temperature": 0.2, "stream": True}).encode()
    assert _fastpath.count_chat_tokens(body, encoding) == cookbook_count(reference[encoding], messages)


def test_chat_tokens_of_a_large_body(reference: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "\n".join(CORPUS)}] * 5  # over the GIL-release threshold
    body = json.dumps({"messages": messages}, ensure_ascii=True).encode()
    assert _fastpath.count_chat_tokens(body) == cookbook_count(reference["o200k_base"], messages)


def test_completions_prompt_is_plain_text(reference: dict[str, Any]) -> None:
    enc = reference["cl100k_base"]
    n = len(enc.encode_ordinary("Say this is a test"))
    assert _fastpath.count_chat_tokens(b'{"prompt": "Say this is a test"}', "cl100k_base") == n
    both = b'{"prompt": ["Say this is a test", "Say this is a test"]}'
    assert _fastpath.count_chat_tokens(both, "cl100k_base") == 2 * n


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"[]", b"{}", b'{"messages": "hi"}', b"\xff"])
def test_chat_tokens_of_invalid_bodies_raise(body: bytes) -> None:
    with pytest.raises(_fastpath.FastpathError):
        _fastpath.count_chat_tokens(body)


# ---- native hygiene ---------------------------------------------------------------------------


def test_threads_count_concurrently_and_agree() -> None:
    """Large inputs run with the GIL released; hanging here means a deadlock."""
    text = "\n".join(CORPUS) * 10
    want = _fastpath.count_tokens(text)
    results: list[int] = []

    def work() -> None:
        results.extend(_fastpath.count_tokens(text) for _ in range(5))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 40


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_count_tokens_memory_is_bounded() -> None:
    texts = [*CORPUS[1:10], "x" * 5000]  # the last one takes the detached path

    def run(calls: int) -> None:
        for n in range(calls):
            text = texts[n % len(texts)]
            _fastpath.count_tokens(text, ENCODINGS[n % 2])
            if n % 10 == 0:
                _fastpath.count_chat_tokens(b'{"messages":[{"role":"user","content":"hi"}]}')

    assert_rss_bounded(run)
