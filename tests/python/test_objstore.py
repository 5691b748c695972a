"""The `ObjectStore` contract, the same tests on both backends: `LocalDirStore` (a directory) and
`S3Store` on a real S3-compatible server (moto in server mode, tests/python/s3_server.py). Plus
the S3 server unreachable (refused, silent) -> `ObjectStoreError` quickly, with a clear message
and no credential in it, and the `storage:` config."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_server import run_s3_server

from gateway import config as config_mod
from gateway.config_storage import S3StorageConfig, StorageBackend, StorageConfig
from gateway.objstore import LocalDirStore, ObjectNotFound, ObjectStore, ObjectStoreError, open_store

BASE = "providers: [{name: p, base_url: 'http://127.0.0.1:9/v1'}]\nmodels: [{name: m, provider: p}]\n"


@pytest.fixture(params=["local", "s3"])
def store_cfg(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    if request.param == "local":
        return StorageConfig(dir=str(tmp_path / "objects"))
    server = request.getfixturevalue("s3_server")
    cfg: StorageConfig = server.config()
    return cfg


def run(cfg: StorageConfig, body: Callable[[ObjectStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = open_store(cfg)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return [k async for k in store.list(prefix)]


def test_open_store_picks_the_backend(store_cfg: StorageConfig) -> None:
    store = open_store(store_cfg)
    if store_cfg.backend is StorageBackend.LOCAL:
        assert isinstance(store, LocalDirStore)
        assert store.root == Path(store_cfg.dir)
    else:
        assert type(store).__name__ == "S3Store"


def test_put_get_overwrite_delete(store_cfg: StorageConfig) -> None:
    async def body(store: ObjectStore) -> None:
        assert not await store.exists("batches/in/a.jsonl")
        await store.put("batches/in/a.jsonl", b'{"a": 1}\n', "application/jsonl")
        assert await store.exists("batches/in/a.jsonl")
        assert await store.get("batches/in/a.jsonl") == b'{"a": 1}\n'
        await store.put("batches/in/a.jsonl", b"second")  # overwrite, shorter
        assert await store.get("batches/in/a.jsonl") == b"second"
        await store.put("empty", b"")
        assert await store.get("empty") == b""
        assert await store.exists("empty")
        await store.delete("batches/in/a.jsonl")
        assert not await store.exists("batches/in/a.jsonl")
        with pytest.raises(ObjectNotFound):
            await store.get("batches/in/a.jsonl")
        await store.delete("batches/in/a.jsonl")  # a missing key: not an error
        await store.delete("never/there")

    run(store_cfg, body)


def test_missing_key_and_directory_are_not_found(store_cfg: StorageConfig) -> None:
    async def body(store: ObjectStore) -> None:
        await store.put("dir/file", b"x")
        for key in ("nope", "dir", "dir/file/deeper"):
            with pytest.raises(ObjectNotFound) as err:
                await store.get(key)
            assert isinstance(err.value, ObjectStoreError)  # callers may catch the base class
            assert not await store.exists(key)

    run(store_cfg, body)


def test_list_prefixes_in_order(store_cfg: StorageConfig) -> None:
    names = ["b/2", "a/x/1", "a/1", "ab/1", "a/x/0", "c", "a-b/1"]

    async def body(store: ObjectStore) -> None:
        assert await keys(store) == []  # nothing yet (a local dir not made yet either)
        for name in names:
            await store.put(name, name.encode())
        assert await keys(store) == sorted(names)
        assert await keys(store, "a/") == ["a/1", "a/x/0", "a/x/1"]
        # a string prefix, not a path segment: "a" covers a/..., a-b/... and ab/...
        assert await keys(store, "a") == ["a-b/1", "a/1", "a/x/0", "a/x/1", "ab/1"]
        assert await keys(store, "a/x") == ["a/x/0", "a/x/1"]
        assert await keys(store, "a/x/1") == ["a/x/1"]
        assert await keys(store, "zzz") == []
        assert await keys(store, "../") == [] == await keys(store, "a/../a/") == await keys(store, "/a")
        await store.delete("a/x/0")
        assert await keys(store, "a/x/") == ["a/x/1"]

    run(store_cfg, body)


def test_invalid_keys_are_refused_before_any_io(store_cfg: StorageConfig) -> None:
    bad = [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "..",
        "./a",
        "a/.",
        "a/",
        "nul\x00byte",
        "tab\tkey",
        "new\nline",
        "del\x7f",
    ]

    async def body(store: ObjectStore) -> None:
        for key in bad:
            for call in (store.put(key, b"x"), store.get(key), store.delete(key), store.exists(key)):
                with pytest.raises(ValueError, match="invalid object key"):
                    await call
        assert await keys(store) == []

    run(store_cfg, body)


def test_binary_and_large_objects_round_trip(store_cfg: StorageConfig) -> None:
    binary = bytes(range(256)) * 4 + b"\x00\r\n\xff"
    large = os.urandom(8 * 1024 * 1024)

    async def body(store: ObjectStore) -> None:
        await store.put("bin", binary)
        await store.put("big/8mib", large)
        assert await store.get("bin") == binary
        got = await store.get("big/8mib")
        assert len(got) == len(large) and got == large
        assert await keys(store, "big/") == ["big/8mib"]

    run(store_cfg, body)


def test_unusual_characters_in_keys(store_cfg: StorageConfig) -> None:
    names = ["résumé ünïcode.jsonl", "a b", "pct%20x", "hash#x", "q?x", "plus+x", "amp&x=1", "col:on",
             "back\\slash", "~tilde", "[br]{c}", "quote'\"", "emoji🙂", "star*"]  # fmt: skip

    async def body(store: ObjectStore) -> None:
        for name in names:
            await store.put(f"files/{name}", name.encode())
        for name in names:
            assert await store.get(f"files/{name}") == name.encode()
        assert await keys(store, "files/") == sorted(f"files/{n}" for n in names)

    run(store_cfg, body)


def test_concurrent_puts_and_gets(store_cfg: StorageConfig) -> None:
    async def body(store: ObjectStore) -> None:
        await asyncio.gather(*(store.put(f"c/{i:03d}", str(i).encode() * 100) for i in range(40)))
        got = await asyncio.gather(*(store.get(f"c/{i:03d}") for i in range(40)))
        assert got == [str(i).encode() * 100 for i in range(40)]
        assert await keys(store, "c/") == [f"c/{i:03d}" for i in range(40)]

    run(store_cfg, body)


# ---- S3 only ------------------------------------------------------------------------------------
def test_s3_prefix_isolates_two_stores(s3_server: Any) -> None:
    one, two = s3_server.config("iso/one"), s3_server.config("iso/two")

    async def main() -> None:
        a, b = open_store(one), open_store(two)
        await a.put("k", b"from a")
        assert not await b.exists("k")
        await b.put("k", b"from b")
        assert await a.get("k") == b"from a"
        assert await keys(a) == ["k"] == await keys(b)

    asyncio.run(main())


def test_s3_missing_bucket_is_a_clear_error(s3_server: Any) -> None:
    cfg = s3_server.config(bucket="no-such-bucket-here")

    async def main() -> None:
        store = open_store(cfg)
        with pytest.raises(ObjectStoreError) as err:
            await store.put("k", b"x")
        assert not isinstance(err.value, ObjectNotFound)
        assert "no-such-bucket-here" in str(err.value)

    asyncio.run(main())


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on exit: connections are refused


async def store_error(call: Awaitable[Any]) -> str:
    """The message of the ObjectStoreError (not ObjectNotFound) that `call` raises; it never
    carries the credentials' values."""
    with pytest.raises(ObjectStoreError) as err:
        # the store's own deadlines end it; this bound only keeps a regression from hanging
        await asyncio.wait_for(call, 20)
    message = str(err.value)
    assert not isinstance(err.value, ObjectNotFound)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message
    return message


@pytest.mark.parametrize("down", ["refused", "silent"])
def test_s3_server_down_fails_fast_and_clearly(
    s3_server: Any, down: str, request: pytest.FixtureRequest
) -> None:
    port = _closed_port() if down == "refused" else request.getfixturevalue("silent_port")
    cfg = s3_server.config(
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout_ms=300,
        timeout_ms=500,
        max_retries=1,
        retry_timeout_ms=1_000,
    )

    async def main() -> None:
        store = open_store(cfg)
        ops: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.put("k", b"x"),
            lambda: store.get("k"),
            lambda: store.exists("k"),
            lambda: store.delete("k"),
            lambda: keys(store),
        ]
        for op in ops if down == "refused" else ops[:2]:  # a silent server costs a timeout a call
            message = await store_error(op())
            assert f"127.0.0.1:{port}" in message and "fastpath-test" in message

    asyncio.run(main())


def test_s3_denied_names_the_credentials_not_their_values(s3_server: Any) -> None:
    """moto checking access keys (after the bucket is made): ours is unknown to it -> 403."""
    with run_s3_server(INITIAL_NO_AUTH_ACTION_COUNT="1") as strict:

        async def main() -> None:
            store = open_store(strict.config())
            for op, call in (
                ("put", store.put("k", b"x")),
                ("get", store.get("k")),
                ("head", store.exists("k")),
            ):
                message = await store_error(call)
                assert f"{op} 'k' failed:" in message and "check AWS_ACCESS_KEY_ID" in message

        asyncio.run(main())


def test_s3_server_stopped_mid_use(s3_server: Any) -> None:
    """A server that served this client (pooled connections) and then stopped."""
    with run_s3_server() as server:
        cfg = server.config(connect_timeout_ms=300, timeout_ms=1_000, max_retries=1, retry_timeout_ms=2_000)

        async def main() -> None:
            store = open_store(cfg)
            await store.put("k", b"x")
            assert await store.get("k") == b"x"
            await asyncio.to_thread(server.stop)
            for call in (store.get("k"), store.put("k", b"y"), keys(store)):
                with pytest.raises(ObjectStoreError, match="cannot reach the server") as err:
                    await asyncio.wait_for(call, 20)
                assert not isinstance(err.value, ObjectNotFound)

        asyncio.run(main())


# ---- config -------------------------------------------------------------------------------------
def test_storage_config_defaults_to_a_local_dir_in_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FASTPATH_GATEWAY_DATA_DIR", str(tmp_path))
    cfg = config_mod.parse(BASE)
    assert cfg.storage.backend is StorageBackend.LOCAL
    store = open_store(cfg)
    assert isinstance(store, LocalDirStore) and store.root == tmp_path / "objects"


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("{backend: s3}", "$.storage.s3.bucket: required with backend s3"),
        ("{backend: s3, s3: {bucket: Bad_Bucket}}", "$.storage.s3.bucket: 3-63 of a-z"),
        ("{backend: s3, s3: {bucket: b1b, prefix: 'a/../b'}}", "$.storage.s3.prefix"),
        ("{backend: s3, s3: {bucket: b1b, endpoint_url: 'ftp://h'}}", "an http(s)://host[:port] URL"),
        ("{backend: s3, s3: {bucket: b1b, endpoint_url: 'http://h:9/b1b'}}", "scheme, host and port only"),
        ("{backend: s3, s3: {bucket: b1b, timeout_ms: 0}}", "$.storage.s3.timeout_ms: must be > 0"),
        ("{backend: s3, s3: {bucket: b1b, max_retries: 11}}", "$.storage.s3.max_retries: 0 to 10"),
        ("{backend: s3, s3: {bucket: b1b, region: 'EU West'}}", "$.storage.s3.region"),
        ("{backend: s3, dir: /tmp/x, s3: {bucket: b1b}}", "$.storage.dir: only for backend local"),
        ("{s3: {bucket: b1b}}", "$.storage.s3: only for backend s3"),
        ("{backend: gcs}", "$.storage.backend"),
        ("{archive: {enabled: true, delay_s: 86400}}", "$.storage.archive.delay_s: 0 to 86399"),
        ("{archive: {retry_s: 0}}", "$.storage.archive.retry_s: must be > 0"),
    ],
)
def test_storage_config_errors(storage: str, message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(BASE + f"storage: {storage}\n")
    assert message in str(err.value)


def test_credentials_are_never_config(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI-not-a-real-secret"
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(
            BASE + f"storage: {{backend: s3, s3: {{bucket: b1b, secret_access_key: {secret}}}}}\n"
        )
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value) and secret not in str(err.value)
    # nor in an endpoint URL (and the URL is not echoed)
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(
            BASE
            + f"storage: {{backend: s3, s3: {{bucket: b1b, endpoint_url: 'http://AKIA:{secret}@h:9'}}}}\n"
        )
    assert "must not hold credentials" in str(err.value) and secret not in str(err.value)
    cfg = config_mod.parse(
        BASE + "storage: {backend: s3, s3: {bucket: b1b, endpoint_url: 'http://127.0.0.1:9000'}}\n"
    )
    assert cfg.storage.s3 == S3StorageConfig(bucket="b1b", endpoint_url="http://127.0.0.1:9000")
