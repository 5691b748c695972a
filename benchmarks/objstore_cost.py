"""What an S3 client costs the gateway: put and get of small (1 KiB) and large (8 MiB) objects
against a real S3-compatible server (moto in server mode, started here on a free port, or
`--endpoint`), for each candidate library that imports:

- obstore (Rust `object_store` under Python, natively async: the call is a future on its Tokio
  runtime) - what `gateway.objstore.s3` uses;
- boto3 in a thread (`asyncio.to_thread`, the usual way to call it from a loop);
- aiobotocore (botocore on aiohttp, natively async). It pins its own botocore, usually not the
  one boto3 / moto want: run it from a separate venv (`python -m venv /tmp/aiobc &&
  /tmp/aiobc/bin/pip install aiobotocore msgspec`) with `--endpoint` of a running server and
  `--candidates aiobotocore`.

Per cell: sequential ops on one loop; CPU is this process's user+sys (every thread: the loop,
obstore's runtime, boto3's thread pool) per op, latency p50 / p99 per op; moto's own CPU is not
counted (it runs in another process). Then 64 concurrent small puts (ops/s). /proc/loadavg is
printed with each table: the machine is shared, numbers are noisy.

    .venv/bin/python benchmarks/objstore_cost.py [--small-ops 200] [--large-ops 10]

Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

BUCKET = "objstore-bench"
KIB = 1024
MIB = 1024 * KIB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def make_bucket(url: str) -> None:
    req = urllib.request.Request(f"{url}/{BUCKET}", method="PUT")
    with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=10):
        pass


class Client:
    name = ""

    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def close(self) -> None: ...


class Obstore(Client):
    name = "obstore (async, Rust)"

    def __init__(self, url: str) -> None:
        from obstore.store import S3Store

        self.obstore = __import__("obstore")
        self.store = S3Store(
            BUCKET,
            config={"endpoint": url, "region": "us-east-1", "virtual_hosted_style_request": False},
            client_options={"allow_http": True},
        )

    async def put(self, key: str, data: bytes) -> None:
        await self.obstore.put_async(self.store, key, data)

    async def get(self, key: str) -> bytes:
        result = await self.obstore.get_async(self.store, key)
        return bytes((await result.bytes_async()).to_bytes())


class Boto3Thread(Client):
    name = "boto3 in a thread"

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, max_pool_connections=64)
        self.s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=cfg)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.s3.put_object, Bucket=BUCKET, Key=key, Body=data)

    async def get(self, key: str) -> bytes:
        def get() -> bytes:
            return bytes(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

        return await asyncio.to_thread(get)


class AioBotocore(Client):
    name = "aiobotocore (async)"

    def __init__(self, url: str) -> None:
        self.url = url
        self.s3: Any = None
        self._ctx: Any = None

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        cfg = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=64)
        self._ctx = get_session().create_client(
            "s3", endpoint_url=self.url, region_name="us-east-1", config=cfg
        )
        self.s3 = await self._ctx.__aenter__()

    async def put(self, key: str, data: bytes) -> None:
        await self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def get(self, key: str) -> bytes:
        resp = await self.s3.get_object(Bucket=BUCKET, Key=key)
        async with resp["Body"] as body:
            return bytes(await body.read())

    async def close(self) -> None:
        await self._ctx.__aexit__(None, None, None)


CANDIDATES: dict[str, type[Client]] = {"obstore": Obstore, "boto3": Boto3Thread, "aiobotocore": AioBotocore}


async def measure(ops: int, op: Callable[[int], Awaitable[Any]]) -> tuple[float, float, float]:
    """(CPU ms per op, p50 ms, p99 ms) of `ops` sequential calls (after 3 warm-up calls)."""
    for i in range(3):
        await op(i)
    lat: list[float] = []
    cpu0 = time.process_time()
    for i in range(ops):
        t0 = time.perf_counter()
        await op(i)
        lat.append((time.perf_counter() - t0) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / ops
    lat.sort()
    return cpu, statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]


async def run_candidate(name: str, url: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
    client = CANDIDATES[name](url)
    if isinstance(client, AioBotocore):
        await client.open()
    small, large = os.urandom(KIB), os.urandom(8 * MIB)
    rows: list[tuple[str, ...]] = []
    try:
        for label, data, ops in (("1 KiB", small, args.small_ops), ("8 MiB", large, args.large_ops)):
            prefix = f"{name}/{label.replace(' ', '')}"
            put = await measure(ops, lambda i, p=prefix, d=data: client.put(f"{p}/{i}", d))
            get = await measure(ops, lambda i, p=prefix: client.get(f"{p}/{i}"))
            for verb, (cpu, p50, p99) in (("put", put), ("get", get)):
                rows.append((client.name, f"{verb} {label}", f"{cpu:.3f}", f"{p50:.2f}", f"{p99:.2f}"))
        n = 64 * 4
        t0, cpu0 = time.perf_counter(), time.process_time()
        for r in range(4):
            await asyncio.gather(*(client.put(f"{name}/conc/{r}-{i}", small) for i in range(64)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append(
            (client.name, "64 concurrent put 1 KiB", f"{cpu * 1000 / n:.3f}", f"{n / wall:.0f} ops/s", "")
        )
    finally:
        await client.close()
    return rows


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="a running S3-compatible server (default: start moto here)")
    p.add_argument("--candidates", default="obstore,boto3,aiobotocore")
    p.add_argument("--small-ops", type=int, default=200)
    p.add_argument("--large-ops", type=int, default=10)
    args = p.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with contextlib.ExitStack() as stack:
        url = args.endpoint or stack.enter_context(moto_server())
        make_bucket(url)
        print(f"server {url}; loadavg before: {loadavg()}")
        print(f"| {'client':24} | {'op':24} | CPU ms/op | p50 ms | p99 ms |")
        print(f"|{'-' * 26}|{'-' * 26}|-----------|--------|--------|")
        for name in args.candidates.split(","):
            try:
                rows = asyncio.run(run_candidate(name, url, args))
            except ImportError as exc:
                print(f"| {name:24} | not installed ({exc.name}) | | | |")
                continue
            for r in rows:
                print(f"| {r[0]:24} | {r[1]:24} | {r[2]:>9} | {r[3]:>6} | {r[4]:>6} |")
        print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
