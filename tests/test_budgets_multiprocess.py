"""Budgets across processes: two ``embedgate serve`` processes sharing one real Redis admit one budget's worth.

Hundreds of concurrent requests, spread over both processes, against a requests-per-minute budget: exactly the
limit gets through. Against a token budget: the recorded usage (read through ``/admin/usage`` while the requests
run) never exceeds the limit, and afterwards equals the sum of the tokens of the answered requests.

Each run uses fresh workspace ids, so counters left in Redis by earlier runs never interfere; its keys are
deleted at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
import yaml

from tests.conftest import config_dict, wait_serving
from tests.fake_upstream import FakeUpstream, free_port
from tests.redis_util import require_redis

ADMIN_KEY = "adm-multiprocess-0123456789"
RATE_KEY = "sk-test-rate-0123456789"
TOKEN_KEY = "sk-test-tokens-0123456789"
RPM = 40
TOKEN_LIMIT = 300
PRICE = 0.02  # USD per million tokens of local/embed-small in the shared test config: 20 nano-dollars a token


@dataclass(frozen=True)
class Cluster:
    """Two proxies sharing one Redis, and the workspaces this run's budgets count."""

    urls: tuple[str, str]
    rate_workspace: str
    token_workspace: str


def _start(config_path: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedgate.cli", "serve", "--config", str(config_path), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_url = require_redis()
    run = uuid.uuid4().hex[:12]
    rate_ws, token_ws = f"ws-rate-{run}", f"ws-tokens-{run}"
    data = config_dict(upstream_server.url, redis_url=redis_url, admin={"key": ADMIN_KEY})
    data["keys"] = [
        {"id": f"rate-{run}", "key": RATE_KEY, "workspace": rate_ws, "project": "p"},
        {"id": f"tokens-{run}", "key": TOKEN_KEY, "workspace": token_ws, "project": "p"},
    ]
    data["budgets"] = [
        {"scope": "workspace", "target": rate_ws, "requests_per_minute": RPM},
        {"scope": "workspace", "target": token_ws, "token_limit": TOKEN_LIMIT, "amount_usd": 1.0},
    ]
    directory = tmp_path_factory.mktemp("budgets")
    path = directory / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    # start both, then wait: the two start-ups overlap. Their output (access lines, uvicorn's log) stays in the
    # run's temporary directory, for a failure to be looked into.
    started = [_start(path, directory / "proxy-a.log"), _start(path, directory / "proxy-b.log")]
    try:
        for proc, url in started:
            wait_serving(proc, url, "/readyz")
        yield Cluster((started[0][1], started[1][1]), rate_ws, token_ws)
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            proc.wait(20)
        client = redis.Redis.from_url(redis_url)
        try:
            for ws in (rate_ws, token_ws):
                keys = list(client.scan_iter(match=f"eg:b:*{ws}*", count=1000))
                if keys:
                    client.delete(*keys)
        finally:
            client.close()


async def _storm(urls: tuple[str, str], key: str, texts: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """POST every text at once, alternating between the proxies; (status, body) in order."""
    out: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(texts)
    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one(i: int, text: str) -> None:
            r = await client.post(
                f"{urls[i % 2]}/v1/embeddings",
                json={"model": "local/embed-small", "input": text},
                headers={"authorization": f"Bearer {key}"},
            )
            out[i] = (r.status_code, r.json())

        async with anyio.create_task_group() as tg:
            for i, text in enumerate(texts):
                tg.start_soon(one, i, text)
    return out


async def _usage(client: httpx.AsyncClient, url: str, workspace: str) -> dict[str, Any]:
    r = await client.get(
        f"{url}/admin/usage", params={"scope": "workspace"}, headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = [row for row in r.json()["data"] if row["id"] == workspace]
    assert len(rows) == 1
    return rows[0]


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_processes_admit_exactly_the_requests_per_minute(cluster: Cluster, upstream: FakeUpstream) -> None:
    results = await _storm(cluster.urls, RATE_KEY, [f"text {i}" for i in range(300)])
    statuses = [status for status, _ in results]
    assert statuses.count(200) == RPM, sorted(set(statuses))
    assert statuses.count(429) == 300 - RPM
    assert {body["error"]["code"] for status, body in results if status == 429} == {"requests_per_minute_exceeded"}
    assert len(upstream.calls) == RPM  # a refused request never reaches the upstream
    async with httpx.AsyncClient(timeout=10) as client:
        for url in cluster.urls:  # both processes read the same shared counters
            row = await _usage(client, url, cluster.rate_workspace)
            assert row["requests_per_minute"] == {"used": RPM, "limit": RPM, "remaining": 0}


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_processes_never_spend_more_than_the_token_budget(cluster: Cluster, upstream: FakeUpstream) -> None:
    # k words: reserved at 2k + 1 tokens (bytes + 2), billed at k by the fake upstream
    texts = [" ".join(["w"] * (1 + i % 5)) for i in range(300)]
    readings: list[int] = []
    done = anyio.Event()

    async def watch() -> None:
        # the counter, reservations in flight included, read while the requests run. A new connection for each
        # reading: the storms starve this loop for seconds, and a kept-alive connection idle past the server's
        # keep-alive timeout (uvicorn's 5 s) can be closed just as the next reading goes out on it.
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not done.is_set():
                readings.append((await _usage(client, cluster.urls[1], cluster.token_workspace))["tokens"]["used"])
                await anyio.sleep(0.005)

    results: list[tuple[int, dict[str, Any]]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        # a first wave holds many estimates at once; a second one spends what the settlements gave back
        results += await _storm(cluster.urls, TOKEN_KEY, texts)
        results += await _storm(cluster.urls, TOKEN_KEY, texts[:100])
        done.set()
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429}
    assert {body["error"]["code"] for status, body in results if status == 429} == {"token_budget_exceeded"}
    billed = sum(body["usage"]["prompt_tokens"] for status, body in results if status == 200)
    async with httpx.AsyncClient(timeout=10) as client:
        # Each request settles right after its answer is sent: the last settlements may land a moment later.
        with anyio.move_on_after(2):
            while (row := await _usage(client, cluster.urls[0], cluster.token_workspace))["tokens"]["used"] != billed:
                await anyio.sleep(0.01)
    assert row["tokens"]["used"] == billed
    assert billed <= TOKEN_LIMIT
    assert billed > TOKEN_LIMIT // 2  # the budget was actually contended for, not trivially unspent
    assert row["cost_usd"]["used"] == pytest.approx(billed * PRICE / 1_000_000, abs=1e-12)
    assert readings and max(readings) <= TOKEN_LIMIT
    assert sum(len(c.body["input"].split()) for c in upstream.calls) == billed
