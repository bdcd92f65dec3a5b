"""Access to the real Redis server the Redis tests use (never a mock).

Under CI (``CI=true``) a missing server fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import os
import shutil
import socket

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
