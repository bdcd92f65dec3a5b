"""Shared fixtures: the fake upstream, gateway configs, and a real uvicorn-served proxy."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from embedgate import EmbeddingGateway
from embedgate.config import Config, parse_config
from tests.fake_upstream import FakeUpstream, free_port

KEY = "sk-test-team-a-0123456789"
OTHER_KEY = "sk-test-team-b-9876543210"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    upstream_server.reset()
    upstream_server.always_floats = False
    upstream_server.compress = False
    upstream_server.dims = 8
    yield upstream_server
    upstream_server.reset()
    upstream_server.dims = 8


def config_dict(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A gateway config for tests: providers ``local`` and ``backup`` at the fake upstream, two keys."""
    data: dict[str, Any] = {
        "providers": {
            "local": {"type": "openai_compatible", "base_url": upstream_url, "api_key": "provider-secret-local",
                      "timeout_ms": 5000},
            "backup": {"type": "openai", "base_url": upstream_url, "api_key": "provider-secret-backup",
                       "timeout_ms": 5000},
        },
        "models": {
            "local/embed-small": {"price_per_million_tokens": 0.02},
            "local/multi": {"deployments": [{"provider": "local", "upstream_model": "multi-a"},
                                            {"provider": "backup", "upstream_model": "multi-b"}]},
        },
        "keys": [
            {"id": "team-a", "key": KEY, "workspace": "acme", "project": "search"},
            {"id": "team-b", "key": OTHER_KEY, "workspace": "globex", "project": "rag", "models": ["backup/*"]},
        ],
        "routing": {"backoff_base_ms": 10},
    }  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture
def make_config(upstream: FakeUpstream) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        return parse_config(config_dict(upstream.url, **overrides), env={})

    return make


@contextmanager
def serve(app: Any, port: int | None = None, http: Any = "auto") -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", loop="asyncio", http=http)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_serving(proc: subprocess.Popen[bytes], url: str, path: str = "/healthz", timeout: float = 30) -> None:
    """Wait until an ``embedgate serve`` subprocess answers 200 on ``path``; fail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "embedgate serve exited"
        assert time.monotonic() < deadline, "embedgate serve did not come up"
        time.sleep(0.1)


@pytest.fixture
def proxy(make_config: Callable[..., Config]) -> Iterator[str]:
    """A real running proxy (uvicorn, with ``embedgate serve``'s HTTP protocol) in front of the fake upstream."""
    from embedgate.app import create_app
    from embedgate.serve_protocol import GatewayHttpProtocol

    with serve(create_app(make_config()), http=GatewayHttpProtocol) as url:
        yield url


def gateway(config: Config) -> EmbeddingGateway:
    """The gateway as a standalone app, for httpx's ASGITransport."""
    from embedgate.app import create_app

    return create_app(config)
