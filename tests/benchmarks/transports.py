"""Which httpx transport should carry upstream calls? Each candidate, side by side, against the fake upstream.

For every transport: N concurrent callers (16 by default) send embedding requests built as embedgate's adapter
builds them (``httpx.Request`` with raw headers and a ``ByteStream`` body) and read each answer whole, for a
fixed time. Reported per transport: requests/s, and CPU microseconds per request of this process (the caller
side: the fake upstream runs in its own process). One process, one transport at a time, all on 127.0.0.1.

    python -m tests.benchmarks.transports                 # single input and a batch of 256, 3 s each
    python -m tests.benchmarks.transports --seconds 5 --connections 16

Candidates: ``httpx`` (an ``httpx.AsyncClient`` over httpx's own transport, through ``client.send``),
``httpx-aiohttp`` (the httpx-aiohttp package's transport), ``aiohttp`` (embedgate's previous
``AiohttpTransport``), ``http1`` (embedgate's ``Http1Transport``, the one it uses), and ``aiohttp-raw``
(aiohttp's own client with no httpx objects at all: the floor of an aiohttp-based transport).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from embedgate.providers import AiohttpTransport, Http1Transport
from tests.benchmarks.run import Service, free_port

MODEL = "bench-embed"

Call = Callable[[], Awaitable[int]]


def _request(url: str, body: bytes) -> httpx.Request:
    headers = [
        (b"Host", httpx.URL(url).netloc),
        (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    request = httpx.Request("POST", url, headers=headers, stream=httpx.ByteStream(body))
    request.read()
    return request


def _size(status: int, content: bytes) -> int:
    """The answer's size; a failed call stops the run (a transport that fails measures nothing)."""
    if status != 200 or not content.startswith(b"{"):
        raise RuntimeError(f"upstream answered {status}: {content[:200]!r}")
    return len(content)


async def _candidates(url: str, body: bytes) -> dict[str, tuple[Call, Callable[[], Awaitable[None]]]]:
    """name -> (one call returning the answer's size, close)."""
    out: dict[str, tuple[Call, Callable[[], Awaitable[None]]]] = {}

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    async def via_client() -> int:
        response = await client.send(_request(url, body))
        return _size(response.status_code, response.content)

    out["httpx"] = (via_client, client.aclose)

    try:
        from httpx_aiohttp import AiohttpTransport as PackageTransport  # type: ignore[import-untyped]
    except ImportError:  # not installed: skipped
        pass
    else:
        package = PackageTransport()

        async def via_package() -> int:
            response = await package.handle_async_request(_request(url, body))
            return _size(response.status_code, await response.aread())

        out["httpx-aiohttp"] = (via_package, package.aclose)

    for name, transport in (("aiohttp", AiohttpTransport()), ("http1", Http1Transport())):

        def bind(t: httpx.AsyncBaseTransport) -> Call:
            async def call() -> int:
                response = await t.handle_async_request(_request(url, body))
                return _size(response.status_code, await response.aread())

            return call

        out[name] = (bind(transport), transport.aclose)

    session: aiohttp.ClientSession | None = None

    async def via_aiohttp() -> int:
        nonlocal session
        session = session or aiohttp.ClientSession()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            return _size(resp.status, await resp.read())

    async def close_session() -> None:
        if session is not None:
            await session.close()

    out["aiohttp-raw"] = (via_aiohttp, close_session)
    return out


async def _drive(call: Call, connections: int, seconds: float) -> dict[str, Any]:
    for _ in range(connections):  # warm the pool
        await call()
    stop = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await call()
            done += 1

    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    return {"rps": round(done / wall, 1), "cpu_us_per_request": round(cpu / done * 1e6, 1), "requests": done}


async def _run(url: str, inputs: int, connections: int, seconds: float) -> dict[str, Any]:
    text = "the quick brown fox jumps over the lazy dog"
    payload: dict[str, Any] = {"model": MODEL, "input": text if inputs == 1 else [text] * inputs}
    body = orjson.dumps({**payload, "encoding_format": "base64", "dimensions": 1536})
    results: dict[str, Any] = {}
    for name, (call, close) in (await _candidates(url, body)).items():
        try:
            results[name] = await _drive(call, connections, seconds)
        finally:
            await close()
        print(f"  inputs={inputs:<4} {name:<14} {results[name]}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    """Start the fake upstream, measure every transport, print the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="embedgate-transports-")) / "fake_upstream.log"
    argv = [sys.executable, "-m", "tests.benchmarks.fake_upstream", "--port", str(port)]
    with Service("fake upstream", argv, port=port, health="/healthz", log=log) as upstream:
        upstream.wait_ready(30)
        url = upstream.url + "/v1/embeddings"
        try:  # the event loop embedgate serve runs on
            from uvloop import run as run_loop
        except ImportError:
            run_loop = asyncio.run
        report = {f"inputs_{n}": run_loop(_run(url, n, args.connections, args.seconds)) for n in (1, 256)}
    print(json.dumps({"connections": args.connections, "seconds": args.seconds, **report}))


if __name__ == "__main__":
    main()
