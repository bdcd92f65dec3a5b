"""Access to the real Redis server the Redis tests use (never a mock).

Under CI (``CI=true``) a missing server fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from embedgate.resp import parse_url

REDIS_URL = os.environ.get("EMBEDGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_available(host: str = "127.0.0.1", port: int = 6379) -> bool:
    """Whether something accepts connections on the Redis port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_redis() -> str:
    """The test Redis URL; fails under CI and skips elsewhere when no server runs."""
    if not redis_available():
        message = "Redis is not running on 127.0.0.1:6379 (start it with redis-server --daemonize yes ...)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_URL


def require_programs(*names: str) -> None:
    """Programs a test runs itself (a private ``redis-server``, ``openssl``): under CI a missing one fails the
    test; elsewhere it skips it."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = f"not installed: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


PASSWORD = "s3cret-cache-pw"


class ThrowawayRedis:
    """A redis-server subprocess on a fixed port, with no persistence, that can be killed and restarted."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.extra = list(extra)  # more redis-server options
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += [
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--requirepass",
            PASSWORD,
            "--dir",
            str(self.directory),
            *self.extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"throwaway redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Kill it abruptly, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


Relay = Callable[[bytes], Awaitable[None]]


@asynccontextmanager
async def redis_proxy(url: str, *, to_redis: Relay | None = None, to_client: Relay | None = None) -> AsyncIterator[str]:
    """A TCP proxy on 127.0.0.1 to the Redis of ``url``; yields the proxy's URL (same db). ``to_redis`` and
    ``to_client`` are awaited with each chunk before it is passed on (to hold it: a stalled or distant Redis).
    Every connection it made is closed when it ends."""
    address = parse_url(url)
    handlers: list[asyncio.Task[Any]] = []

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter, hook: Relay | None) -> None:
        while data := await source.read(65536):
            if hook is not None:
                await hook(data)
            sink.write(data)
            await sink.drain()
        sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        redis_reader, redis_writer = await asyncio.open_connection(address.host, address.port)
        await asyncio.gather(relay(reader, redis_writer, to_redis), relay(redis_reader, writer, to_client),
                             return_exceptions=True)  # fmt: skip
        for w in (writer, redis_writer):
            w.close()
            await w.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/{address.db}"
    finally:
        server.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)  # its clients gone, each connection ends
