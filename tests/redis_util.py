"""Access to the real Redis server the Redis tests use (never a mock).

Under CI (``CI=true``) a missing server fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

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
