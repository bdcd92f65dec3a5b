"""The Redis cache backend against a throwaway redis-server of its own, which the tests kill and restart.

The shared Redis on 6379 is never touched: these tests start a private server on a free port.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from structlog.testing import capture_logs

from embedgate.cache import CachedItem, VectorCache, item_key
from tests.redis_util import PASSWORD, ThrowawayRedis, require_programs

WARNING = "cache store unavailable; serving misses"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    require_programs("redis-server")
    server = ThrowawayRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(text: str) -> str:
    return item_key(workspace="outage", model="openai/m", dimensions=None, input_type=None, item=text)


ITEM = CachedItem(vector=b"\x00\x00\x80\x3f" * 4, tokens=3)


def warnings_of(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == WARNING]


async def command_counts(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


@pytest.mark.anyio
async def test_get_many_is_one_mget_and_set_many_one_set_with_expiry_per_item(server: ThrowawayRedis) -> None:
    cache = VectorCache.from_config(server.url, 0)
    try:
        await cache.set_many([(key("a"), ITEM), (key("b"), ITEM), (key("c"), ITEM)], ttl=60)
        assert await cache.get_many([key("a"), key("x"), key("c")]) == [ITEM, None, ITEM]
    finally:
        await cache.close()

    counts = await command_counts(server.url)
    assert counts.get("mget") == 1 and "get" not in counts
    assert counts.get("set") == 3 and not {"mset", "setex", "expire", "exec"} & set(counts)
    client = redis.Redis.from_url(server.url)
    try:
        assert [await client.ttl(key(k)) for k in "abc"] == [60, 60, 60]  # SET .. EX: stored and expiring at once
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_outage_is_a_silent_miss_logged_once_and_caching_resumes(server: ThrowawayRedis) -> None:
    # retry_interval=0: every call really tries the dead server, so only the log rate limit keeps it quiet.
    cache = VectorCache.from_config(server.url, 0, retry_interval=0, warn_interval=60)
    try:
        await cache.set_many([(key("before"), ITEM)], ttl=60)
        assert await cache.get_many([key("before")]) == [ITEM]

        server.stop()
        with capture_logs() as logs:
            for _ in range(10):
                assert await cache.get_many([key("before"), key("other")]) == [None, None]
                await cache.set_many([(key("during"), ITEM)], ttl=60)
            assert await cache.ping() is False

        warnings = warnings_of(logs)
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["backend"] == "redis" and warnings[0]["error"] == "ConnectionError"
        assert PASSWORD not in repr(logs)

        server.start()  # same port, empty: nothing was persisted
        with capture_logs() as logs:
            assert await cache.get_many([key("before"), key("during")]) == [None, None]
            await cache.set_many([(key("after"), ITEM)], ttl=60)
            assert await cache.get_many([key("after")]) == [ITEM]
            assert await cache.ping() is True
        assert [entry["event"] for entry in logs] == ["cache store recovered"]
    finally:
        await cache.close()


@pytest.mark.anyio
async def test_after_a_failure_the_store_rests_then_is_retried(server: ThrowawayRedis) -> None:
    clock = FakeClock()
    cache = VectorCache.from_config(server.url, 0, retry_interval=5, warn_interval=10, clock=clock)
    try:
        server.stop()
        with capture_logs() as logs:
            assert await cache.get_many([key("k")]) == [None]  # tries, fails, warns
            clock.now += 6
            assert await cache.get_many([key("k")]) == [None]  # tries again, fails, within warn_interval
            clock.now += 6
            assert await cache.get_many([key("k")]) == [None]  # fails, 12 s after the warning: warns again
        warnings = warnings_of(logs)
        assert [w["suppressed"] for w in warnings] == [0, 1]

        server.start()
        await cache.set_many([(key("k"), ITEM)], ttl=60)  # still resting: not even tried
        clock.now += 6
        assert await cache.get_many([key("k")]) == [None]  # the write above really was skipped
        await cache.set_many([(key("k"), ITEM)], ttl=60)
        assert await cache.get_many([key("k")]) == [ITEM]
    finally:
        await cache.close()
