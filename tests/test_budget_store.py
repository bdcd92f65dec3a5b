"""Contract tests of the budget stores (and identity stores): one module, run against memory and a real Redis.

Clocks are injected (``Clock``) so rolling windows and calendar periods are exercised without waiting.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from embedgate.budget_stores import NEVER_MS, BudgetStoreError, ReadResult, ReserveResult
from embedgate.budgets import (
    BudgetEngine,
    BudgetStore,
    CounterSpec,
    MemoryBudgetStore,
    RedisBudgetStore,
    Subject,
    WindowSpec,
)
from embedgate.config import BudgetConfig
from embedgate.errors import BudgetExceeded
from embedgate.identities import IdentityStore, MemoryIdentityStore, RedisIdentityStore
from tests.budget_util import T0, Clock
from tests.redis_util import ThrowawayRedis, redis_proxy, require_programs, require_redis

WINDOW_MS = 60_000
SUBJECT = Subject(
    workspace="acme",
    project="search",
    api_key="team-a",
    provider="openai",
    model="openai/text-embedding-3-small",
    identity=None,
)


async def _delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore()
        return
    url = require_redis()
    prefix = f"eg:b:test:{uuid.uuid4().hex}:"
    s = RedisBudgetStore(url, prefix=prefix)
    try:
        yield s
    finally:
        await s.aclose()
        await _delete_prefix(url, prefix)


@pytest.fixture
async def redis_store(anyio_backend: str) -> AsyncIterator[tuple[RedisBudgetStore, aioredis.Redis, str]]:
    """A Redis store under a prefix of its own, a client to look at its keys, and the prefix; removed after."""
    url = require_redis()
    prefix = f"eg:b:test:{uuid.uuid4().hex}:"
    store = RedisBudgetStore(url, prefix=prefix)
    client = aioredis.Redis.from_url(url)
    try:
        yield store, client, prefix
    finally:
        await client.aclose()
        await store.aclose()
        await _delete_prefix(url, prefix)


def engine(store: BudgetStore, *budgets: BudgetConfig, clock: Clock | None = None) -> BudgetEngine:
    indexed = tuple(
        BudgetConfig(
            scope=b.scope,
            target=b.target,
            period=b.period,
            amount_usd=b.amount_usd,
            token_limit=b.token_limit,
            requests_per_minute=b.requests_per_minute,
            index=i,
        )
        for i, b in enumerate(budgets)
    )
    return BudgetEngine(indexed, store, clock=clock or Clock())


async def admitted(eng: BudgetEngine, *, tokens: int = 1, cost_usd: float = 0.0) -> bool:
    try:
        await eng.reserve(SUBJECT, tokens=tokens, cost_usd=cost_usd)
    except BudgetExceeded:
        return False
    return True


async def token_usage(eng: BudgetEngine) -> int:
    (row,) = [r for r in await eng.usage() if "tokens" in r]
    used: int = row["tokens"]["used"]
    return used


# --- the store protocol ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_all_or_nothing_when_one_counter_is_full(store: BudgetStore) -> None:
    t = int(T0 * 1000)
    first = await store.reserve(
        [CounterSpec("c:a", 5, 100, 3600), CounterSpec("c:b", 5, 10, 3600)],
        [WindowSpec("w:a", 10)],
        now_ms=t,
        window_ms=WINDOW_MS,
        member="r1",
    )
    assert (first.failed, first.values, first.counts) == (-1, (5, 5), (1,))

    # c:b has 5 left of 10: asking 6 on both must move neither counter, nor the window
    second = await store.reserve(
        [CounterSpec("c:a", 6, 100, 3600), CounterSpec("c:b", 6, 10, 3600)],
        [WindowSpec("w:a", 10)],
        now_ms=t + 1,
        window_ms=WINDOW_MS,
        member="r2",
        index=[("seen:x", "someone", t + 60_000)],
    )
    assert second.failed == 1
    assert second.values == (5, 5)
    got = await store.read(["c:a", "c:b"], ["w:a"], now_ms=t + 2, window_ms=WINDOW_MS)
    assert (got.values, got.counts) == ((5, 5), (1,))
    assert await store.members("seen:x", 10, now_ms=t + 2) == []


@pytest.mark.anyio
async def test_all_or_nothing_when_the_window_is_full(store: BudgetStore) -> None:
    t = int(T0 * 1000)
    ok = await store.reserve(
        [CounterSpec("c:a", 1, 100, 0)], [WindowSpec("w:a", 1)], now_ms=t, window_ms=WINDOW_MS, member="r1"
    )
    assert ok.failed == -1
    refused = await store.reserve(
        [CounterSpec("c:a", 1, 100, 0)],
        [WindowSpec("w:a", 1)],
        now_ms=t + 5,
        window_ms=WINDOW_MS,
        member="r2",
    )
    assert refused.failed == 1  # the window's index, after the one counter
    assert refused.marks == (t,)  # the request whose leaving frees a slot
    got = await store.read(["c:a"], ["w:a"], now_ms=t + 6, window_ms=WINDOW_MS)
    assert (got.values, got.counts, got.oldest) == ((1,), (1,), (t,))


@pytest.mark.anyio
async def test_index_sets_record_ids_of_admitted_requests(store: BudgetStore) -> None:
    t = int(T0 * 1000)
    for who in ("bob", "alice", "bob"):
        await store.reserve(
            [CounterSpec(f"c:{who}", 1, 10, 60)], [], now_ms=t, window_ms=WINDOW_MS, member=who,
            index=[("seen:identity", who, t + 60_000)],
        )  # fmt: skip
    assert await store.members("seen:identity", 10, now_ms=t) == ["alice", "bob"]


@pytest.mark.anyio
async def test_index_sets_are_read_up_to_a_limit(store: BudgetStore) -> None:
    # Redis: ZSCAN steps of 1000 (reading millions at once blocked Redis, and every budget check behind it).
    t = int(T0 * 1000)
    ids = [f"id-{i:05d}" for i in range(2500)]
    for who in ids:
        await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member=who, index=[("seen:many", who, NEVER_MS)])
    some = await store.members("seen:many", 1200, now_ms=t)
    assert len(some) == 1200 and some == sorted(some) and set(some) <= set(ids)
    assert await store.members("seen:many", 10_000, now_ms=t) == ids


@pytest.mark.anyio
async def test_index_ids_are_listed_until_their_time(store: BudgetStore) -> None:
    t = int(T0 * 1000)
    seen = [("seen:x", "brief", t + 1000), ("seen:x", "lasting", NEVER_MS)]
    await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member="r1", index=seen)
    # seen again with an earlier time (another budget's): the later time stays
    await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member="r2", index=[("seen:x", "brief", t + 10)])
    assert await store.members("seen:x", 10, now_ms=t + 999) == ["brief", "lasting"]
    assert await store.members("seen:x", 10, now_ms=t + 1000) == ["lasting"]


@pytest.mark.anyio
async def test_index_ids_past_their_time_leave_the_memory_store(anyio_backend: str) -> None:
    # Ids are made up by clients (identities, <provider>/<name> models): a set that only grew held every one of them.
    store = MemoryBudgetStore()
    t = int(T0 * 1000)
    for i in range(3000):
        who = f"contact-{i}"
        await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member=who, index=[("seen:identity", who, t + 1000)])
    assert len(await store.members("seen:identity", 10_000, now_ms=t)) == 3000
    for i in range(store.SWEEP_EVERY):
        await store.reserve([], [], now_ms=t + 2000, window_ms=WINDOW_MS, member=f"later-{i}")
    assert store._sets == {}


@pytest.mark.anyio
async def test_rolling_windows_of_ids_gone_quiet_leave_the_memory_store(anyio_backend: str) -> None:
    # The sweep kept every window that held any timestamp, stale ones too: with a `*` rpm budget, each identity a
    # client made up kept a window for ever.
    store = MemoryBudgetStore()
    t = int(T0 * 1000)
    for i in range(3000):
        await store.reserve([], [WindowSpec(f"rpm:identity:contact-{i}", 10)], now_ms=t, window_ms=WINDOW_MS,
                            member=f"r{i}")  # fmt: skip
    for i in range(store.SWEEP_EVERY):
        await store.reserve([], [WindowSpec("rpm:identity:regular", 100_000)], now_ms=t + WINDOW_MS + 1 + i,
                            window_ms=WINDOW_MS, member=f"later-{i}")  # fmt: skip
    assert list(store._windows) == ["rpm:identity:regular"]


@pytest.mark.anyio
async def test_a_clock_stepped_back_does_not_hold_the_window_shut(store: BudgetStore) -> None:
    # Requests dated before an NTP step back of an hour counted in the window until the clock caught up: the
    # memory store refused for the hour and a minute (retry-after: 3660); Redis until the window key expired.
    clock = Clock()
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", requests_per_minute=3), clock=clock)
    for dt in (0, 1, 2):
        clock.t = T0 + dt
        assert await admitted(eng)
    clock.t = T0 + 2 - 3600  # stepped back an hour
    with pytest.raises(BudgetExceeded) as exc:
        await eng.reserve(SUBJECT, tokens=1, cost_usd=0)
    assert 0 < int(exc.value.headers["retry-after"]) <= 60
    clock.t += 60
    assert await admitted(eng)


@pytest.mark.anyio
async def test_replicas_clocks_a_little_apart_do_not_let_requests_leave_the_window_early(
    redis_store: tuple[RedisBudgetStore, aioredis.Redis, str],
) -> None:
    # Entries dated after a replica's now were re-dated to it: one 1.5 s behind re-dated the others' requests, which
    # then left the window 1.5 s early for everyone (20 admitted in a minute at a limit of 10, three replicas).
    store, _, _ = redis_store
    t = int(T0 * 1000)
    rpm = [WindowSpec("rpm:api_key:team-a", 2)]
    for i in range(2):  # a replica on time fills the window
        assert (await store.reserve([], rpm, now_ms=t, window_ms=WINDOW_MS, member=f"a{i}")).failed == -1
    behind = t - 1500  # another, 1.5 s behind
    assert (await store.reserve([], rpm, now_ms=behind, window_ms=WINDOW_MS, member="b0")).failed == 0
    # a minute later by its clock: still 1.5 s before the first two leave
    assert (await store.reserve([], rpm, now_ms=behind + WINDOW_MS, window_ms=WINDOW_MS, member="b1")).failed == 0
    assert (await store.reserve([], rpm, now_ms=t + WINDOW_MS, window_ms=WINDOW_MS, member="a2")).failed == -1


@pytest.mark.anyio
async def test_a_replica_whose_clock_is_behind_does_not_shorten_the_listing_in_redis(
    redis_store: tuple[RedisBudgetStore, aioredis.Redis, str],
) -> None:
    # Each reserve set the index set's expiry from its own clock: one from a replica 2 s behind, just before the
    # day's end, cut the set's life from a day and an hour to an hour, and ids listed by the others vanished.
    store, client, prefix = redis_store
    t = int(T0 * 1000)
    await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member="a",
                        index=[("seen:identity", "alice", t + 90_000_000)])  # fmt: skip
    await store.reserve([], [], now_ms=t - 2000, window_ms=WINDOW_MS, member="b",
                        index=[("seen:identity", "bob", t + 3_600_000)])  # fmt: skip
    assert await client.pttl(prefix + "seen:identity") > 89_000_000
    assert await client.zcard(prefix + "seen:identity") == 2


@pytest.mark.anyio
async def test_a_wall_clock_stepped_back_does_not_fail_redis_reserves(
    redis_store: tuple[RedisBudgetStore, aioredis.Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reserve's deadline (Redis's time after which it changes nothing) came from the wall clock and an offset
    # read once a minute: stepped back by a minute, every reserve reached Redis "late" and failed (a 503), until
    # the offset was read again, a minute after the clock had caught up.
    store, _, _ = redis_store
    t = int(T0 * 1000)
    real = time.time
    await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="1")
    monkeypatch.setattr(time, "time", lambda: real() - 60)
    got = await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="2")
    monkeypatch.undo()
    assert got.values == (2,)


@asynccontextmanager
async def proxied_store(url: str, **hooks: Any) -> AsyncIterator[RedisBudgetStore]:
    """A Redis budget store of a prefix of its own, talking to ``url`` through a proxy with ``hooks`` (``to_redis``,
    ``to_client``: see ``redis_proxy``); closed afterwards."""
    async with redis_proxy(url, **hooks) as proxied:
        store = RedisBudgetStore(proxied, prefix=f"eg:b:test:{uuid.uuid4().hex}:")
        try:
            yield store
        finally:
            await store.aclose()


@pytest.mark.anyio
async def test_a_slow_read_of_redis_s_clock_never_makes_the_reserve_deadline_late(anyio_backend: str) -> None:
    # Redis stalled, then answered TIME as it resumed: the offset, taken at the middle of the wait, was half the
    # wait too large, and for a minute a reserve the client had been refused (503) still counted when it ran.
    # And read again by every reserve while its answers stayed slow (a distant Redis, > 20 ms away): two round trips
    # for each budgeted request, not one a minute.
    url = require_redis()
    times = 0

    async def stall_time(data: bytes) -> None:
        nonlocal times
        if b"TIME" in data:
            times += 1
            await asyncio.sleep(0.4)  # Redis reads its clock at the end of the wait

    async with proxied_store(url, to_redis=stall_time) as store:
        client = aioredis.Redis.from_url(url)
        try:
            deadline = await store._deadline()
            seconds, micros = await client.time()
            await store._deadline()
        finally:
            await client.aclose()
    assert deadline <= seconds * 1000 + micros / 1000 + 0.8 * 1000 + 20  # the store's wait: 0.8 of its 1 s timeout
    assert times == 1


@pytest.mark.anyio
async def test_one_slow_answer_to_time_does_not_replace_a_trusted_offset(anyio_backend: str) -> None:
    # TIME read at the start of a long wait (its answer held on the way back) and taken as read at its end: the
    # offset came out the whole wait early, every reserve's deadline passed before it reached Redis, and for a
    # minute every budgeted request was a 503.
    hold = {"replies": False, "next": False}

    async def mark_time(data: bytes) -> None:
        if hold["replies"] and b"TIME" in data:
            hold["next"] = True

    async def hold_reply(data: bytes) -> None:
        if hold["next"]:
            hold["next"] = False
            await asyncio.sleep(0.85)

    t = int(T0 * 1000)
    async with proxied_store(require_redis(), to_redis=mark_time, to_client=hold_reply) as store:
        await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="0")
        store._offset_read_at -= 61_000  # a minute on: the clock is read again, and its answer is held
        hold["replies"] = True
        got = [await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS,
                                   member=str(i)) for i in range(1, 4)]  # fmt: skip
    assert [r.values for r in got] == [(2,), (3,), (4,)]


@pytest.mark.anyio
async def test_a_distant_redis_replaces_a_wrong_clock_offset_at_its_next_reading(anyio_backend: str) -> None:
    # Every answer of a Redis over 20 ms away is "slow": the first reading, held 0.9 s by a stall, stayed the
    # offset for the process's life (a later slow reading never replaced it), and every reserve was "late": a 503.
    times = {"asked": 0, "held": False}

    async def ask(data: bytes) -> None:
        times["asked"] += data.count(b"TIME")

    async def distant(data: bytes) -> None:
        await asyncio.sleep(0.025)
        if times["asked"] == 1 and not times["held"]:  # the first TIME's answer, held by a stall
            times["held"] = True
            await asyncio.sleep(0.9)

    t = int(T0 * 1000)
    async with proxied_store(require_redis(), to_redis=ask, to_client=distant) as store:
        with pytest.raises(BudgetStoreError, match="too late"):  # its deadline a whole stall early
            await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="0")
        store._offset_read_at -= 61_000  # the next reading is due
        got = await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="1")
    assert got.values == (1,)


@pytest.mark.anyio
async def test_index_ids_past_their_time_leave_redis(anyio_backend: str) -> None:
    url = require_redis()
    prefix = f"eg:b:test:{uuid.uuid4().hex}:"
    store = RedisBudgetStore(url, prefix=prefix)
    client = aioredis.Redis.from_url(url)
    t = int(T0 * 1000)
    try:
        for i in range(50):
            await store.reserve([], [], now_ms=t, window_ms=WINDOW_MS, member=f"r{i}",
                                index=[("seen:identity", f"contact-{i}", t + 1000)])  # fmt: skip
        assert await client.zcard(prefix + "seen:identity") == 50
        assert 0 < await client.pttl(prefix + "seen:identity") <= 1000  # the set ends with its ids
        await store.reserve([], [], now_ms=t + 2000, window_ms=WINDOW_MS, member="later",
                            index=[("seen:identity", "newcomer", t + 5000)])  # fmt: skip
        assert await client.zrange(prefix + "seen:identity", 0, -1) == [b"newcomer"]
        assert 2000 < await client.pttl(prefix + "seen:identity") <= 3000
        await store.reserve([], [], now_ms=t + 2000, window_ms=WINDOW_MS, member="once",
                            index=[("seen:identity", "forever", NEVER_MS)])  # fmt: skip
        assert await client.pttl(prefix + "seen:identity") == -1  # a one_time budget's ids never end
    finally:
        await client.aclose()
        await store.aclose()
        await _delete_prefix(url, prefix)


@pytest.mark.anyio
async def test_adjust_moves_existing_counters_only_and_never_below_zero(store: BudgetStore) -> None:
    t = int(T0 * 1000)
    await store.reserve([CounterSpec("c:a", 10, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="r")
    await store.adjust([("c:a", -3)], now_ms=t)
    assert (await store.read(["c:a"], [], now_ms=t, window_ms=WINDOW_MS)).values == (7,)
    await store.adjust([("c:a", -50), ("c:missing", 5)], now_ms=t)
    got = await store.read(["c:a", "c:missing"], [], now_ms=t, window_ms=WINDOW_MS)
    # not applied: more than the counter holds is a return of a reserve it no longer holds (clamped to 0, it
    # took what later reserves had counted); a counter that does not exist (expired) is not recreated
    assert got.values == (7, 0)
    await store.adjust([("c:a", -7)], now_ms=t)
    assert (await store.read(["c:a"], [], now_ms=t, window_ms=WINDOW_MS)).values == (0,)


@pytest.mark.anyio
async def test_undo_lost_takes_back_only_an_admitted_reserve_once(store: BudgetStore) -> None:
    # The mark an admitted reserve leaves lets a store that may lose its answer (Redis) take it back, once.
    t = int(T0 * 1000)
    counters = [CounterSpec("k:tokens", 10, 100, 0)]
    windows = [WindowSpec("k:rpm", 5)]
    assert (await store.reserve(counters, windows, now_ms=t, window_ms=WINDOW_MS, member="a")).failed == -1
    over = [CounterSpec("k:tokens", 1000, 100, 0)]  # refused: nothing to take back
    assert (await store.reserve(over, windows, now_ms=t, window_ms=WINDOW_MS, member="b")).failed == 0
    assert await store.undo_lost(over, windows, member="b") is False
    if isinstance(store, MemoryBudgetStore):  # its reserves answer within their call: never lost
        assert await store.undo_lost(counters, windows, member="a") is False
        return
    assert await store.undo_lost(counters, windows, member="a") is True
    assert await store.undo_lost(counters, windows, member="a") is False  # once
    read = await store.read(["k:tokens"], ["k:rpm"], now_ms=t, window_ms=WINDOW_MS)
    assert (read.values, read.counts) == ((0,), (0,))
    # an undo that comes before its reserve (still on its way): the reserve then changes nothing
    assert await store.undo_lost(counters, windows, member="c") is False
    with pytest.raises(BudgetStoreError, match="too late") as late:
        await store.reserve(counters, windows, now_ms=t, window_ms=WINDOW_MS, member="c")
    assert late.value.maybe_ran is False
    read = await store.read(["k:tokens"], ["k:rpm"], now_ms=t, window_ms=WINDOW_MS)
    assert (read.values, read.counts) == ((0,), (0,))


# --- the engine on each store ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_settle_adjusts_to_real_usage_and_release_undoes(store: BudgetStore) -> None:
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", token_limit=1000, amount_usd=1.0))
    res = await eng.reserve(SUBJECT, tokens=300, cost_usd=0.3)
    assert await token_usage(eng) == 300
    await eng.settle(res, tokens=120, cost_usd=0.12)
    await eng.settle(res, tokens=999, cost_usd=0.9)  # a second settle is a no-op
    (row,) = await eng.usage()
    assert row["tokens"]["used"] == 120
    assert row["cost_usd"]["used"] == pytest.approx(0.12)

    res2 = await eng.reserve(SUBJECT, tokens=500, cost_usd=0.5)
    assert await token_usage(eng) == 620
    await eng.release(res2)
    await eng.release(res2)  # idempotent
    assert await token_usage(eng) == 120


@pytest.mark.anyio
async def test_cost_counters_stay_exact_over_many_small_charges(store: BudgetStore) -> None:
    # 1000 requests of 7 tokens at $0.02/M: 0.14 micro-dollars each, which micro-dollar counters would lose
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", amount_usd=1.0))
    for _ in range(1000):
        await eng.reserve(SUBJECT, tokens=7, cost_usd=7 * 0.02 / 1e6)
    (row,) = await eng.usage()
    assert row["cost_usd"]["used"] == pytest.approx(1000 * 7 * 0.02 / 1e6, rel=1e-9)


@pytest.mark.anyio
async def test_rolling_window_admits_again_once_the_oldest_request_leaves(store: BudgetStore) -> None:
    clock = Clock()
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", requests_per_minute=3), clock=clock)
    for dt in (0, 10, 20):
        clock.t = T0 + dt
        assert await admitted(eng)
    clock.t = T0 + 30
    with pytest.raises(BudgetExceeded) as exc:
        await eng.reserve(SUBJECT, tokens=1, cost_usd=0)
    assert exc.value.headers["retry-after"] == "30"  # the request of T0 leaves at T0 + 60
    clock.t = T0 + 59.9
    assert not await admitted(eng)
    clock.t = T0 + 60  # T0's request is out of the window (T0 + 60 - 60, T0 + 60]
    assert await admitted(eng)
    clock.t = T0 + 65
    with pytest.raises(BudgetExceeded) as exc:
        await eng.reserve(SUBJECT, tokens=1, cost_usd=0)
    assert exc.value.headers["retry-after"] == "5"  # the request of T0 + 10 leaves at T0 + 70


@pytest.mark.anyio
async def test_retry_after_waits_for_every_full_window(store: BudgetStore) -> None:
    # Two rate limits full: retry-after was the first one's wait (38 s), and a client that waited that long was
    # refused again by the second (the key's, full until T0 + 80).
    clock = Clock()
    eng = engine(store, BudgetConfig(scope="workspace", target="acme", requests_per_minute=2),
                 BudgetConfig(scope="api_key", target="team-a", requests_per_minute=1), clock=clock)  # fmt: skip
    await eng.reserve(replace(SUBJECT, api_key="team-b"), tokens=1, cost_usd=0)
    clock.t = T0 + 20
    assert await admitted(eng)
    clock.t = T0 + 22
    with pytest.raises(BudgetExceeded) as exc:
        await eng.reserve(SUBJECT, tokens=1, cost_usd=0)
    assert exc.value.headers["retry-after"] == "58"
    clock.t = T0 + 22 + 58
    assert await admitted(eng)


@pytest.mark.anyio
async def test_window_length_is_injectable(store: BudgetStore) -> None:
    clock = Clock()
    budget = BudgetConfig(scope="api_key", target="team-a", requests_per_minute=1, index=0)
    eng = BudgetEngine((budget,), store, window_s=2.0, clock=clock)
    assert await admitted(eng)
    clock.t = T0 + 1.5
    assert not await admitted(eng)
    clock.t = T0 + 2.0
    assert await admitted(eng)


@pytest.mark.parametrize(
    ("period", "last_moment", "next_period"),
    [
        ("daily", datetime(2025, 3, 14, 23, 59, 59, tzinfo=UTC), datetime(2025, 3, 15, tzinfo=UTC)),
        # ISO weeks: Sunday night -> Monday
        ("weekly", datetime(2025, 3, 16, 23, 59, 59, tzinfo=UTC), datetime(2025, 3, 17, tzinfo=UTC)),
        ("monthly", datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)),
        ("yearly", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
@pytest.mark.anyio
async def test_period_counters_roll_over_with_the_clock(
    store: BudgetStore, period: str, last_moment: datetime, next_period: datetime
) -> None:
    clock = Clock(last_moment.timestamp() - 3600)
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", period=period, token_limit=100), clock=clock)
    assert await admitted(eng, tokens=100)
    clock.t = last_moment.timestamp()
    assert not await admitted(eng, tokens=1)  # same period: still full
    clock.t = next_period.timestamp()
    assert await token_usage(eng) == 0  # a new period starts at zero
    assert await admitted(eng, tokens=100)


@pytest.mark.anyio
async def test_weekly_period_does_not_roll_over_on_sunday(store: BudgetStore) -> None:
    clock = Clock(datetime(2025, 3, 10, 8, tzinfo=UTC).timestamp())  # Monday
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", period="weekly", token_limit=10), clock=clock)
    assert await admitted(eng, tokens=10)
    clock.t = datetime(2025, 3, 16, 8, tzinfo=UTC).timestamp()  # Sunday of the same ISO week
    assert not await admitted(eng, tokens=1)


@pytest.mark.anyio
async def test_one_time_budget_never_resets(store: BudgetStore) -> None:
    clock = Clock()
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", period="one_time", token_limit=10), clock=clock)
    assert await admitted(eng, tokens=10)
    clock.t = T0 + 400 * 86400
    assert not await admitted(eng, tokens=1)


@pytest.mark.anyio
async def test_concurrent_reserves_admit_exactly_the_rate_limit(store: BudgetStore) -> None:
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", requests_per_minute=40))
    outcomes: list[bool] = []

    async def one() -> None:
        outcomes.append(await admitted(eng))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert outcomes.count(True) == 40
    assert outcomes.count(False) == 160


@pytest.mark.anyio
async def test_concurrent_reserves_never_exceed_a_token_budget(store: BudgetStore) -> None:
    eng = engine(store, BudgetConfig(scope="api_key", target="team-a", token_limit=1000))
    rng = random.Random(7)
    sizes = [rng.randint(5, 40) for _ in range(200)]
    admitted_sizes: list[int] = []
    refused_sizes: list[int] = []

    async def one(n: int) -> None:
        (admitted_sizes if await admitted(eng, tokens=n) else refused_sizes).append(n)

    async with anyio.create_task_group() as tg:
        for n in sizes:
            tg.start_soon(one, n)
    used = await token_usage(eng)
    assert used == sum(admitted_sizes) <= 1000
    # usage only grows, so every refusal was needed: it would not fit even now
    assert refused_sizes and all(used + n > 1000 for n in refused_sizes)


@pytest.mark.anyio
async def test_redis_counter_keys_expire_after_their_period(anyio_backend: str) -> None:
    url = require_redis()
    prefix = f"eg:b:test:{uuid.uuid4().hex}:"
    store = RedisBudgetStore(url, prefix=prefix)
    now = datetime.now(UTC)
    clock = Clock(now.timestamp())
    eng = engine(
        store,
        BudgetConfig(scope="api_key", target="team-a", period="daily", token_limit=100, requests_per_minute=5),
        BudgetConfig(scope="workspace", target="acme", period="one_time", token_limit=100),
        clock=clock,
    )
    client = aioredis.Redis.from_url(url)
    try:
        await eng.reserve(SUBJECT, tokens=1, cost_usd=0)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        until_midnight = (midnight - now).total_seconds()
        daily = [k async for k in client.scan_iter(match=prefix + "api_key:team-a:daily:*")]
        assert len(daily) == 1
        ttl = await client.ttl(daily[0])
        assert until_midnight < ttl <= until_midnight + 3600 + 2
        (one_time,) = [k async for k in client.scan_iter(match=prefix + "workspace:acme:one_time:*")]
        assert await client.ttl(one_time) == -1  # never resets, never expires
        (window,) = [k async for k in client.scan_iter(match=prefix + "rpm:*")]
        assert 0 < await client.pttl(window) <= WINDOW_MS + 1000
    finally:
        await client.aclose()
        await store.aclose()
        await _delete_prefix(url, prefix)


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    import redis
    from embedgate.budgets import BudgetEngine, RedisBudgetStore, Subject
    from embedgate.config import BudgetConfig
    from embedgate.errors import BudgetExceeded, Unavailable

    url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main() -> None:
        store = RedisBudgetStore(url, prefix=prefix, socket_timeout=5.0)
        engine = BudgetEngine(
            (BudgetConfig(scope="api_key", target="team-a", requests_per_minute=40),), store
        )
        subject = Subject(workspace="acme", project="search", api_key="team-a", provider="openai",
                          model="openai/text-embedding-3-small", identity=None)
        counts = {"admitted": 0, "refused": 0, "unavailable": 0}

        async def one() -> None:
            try:
                await engine.reserve(subject, tokens=1, cost_usd=0.0)
                counts["admitted"] += 1
            except BudgetExceeded:
                counts["refused"] += 1
            except Unavailable:
                counts["unavailable"] += 1

        await store.ping()  # connect before the start signal
        print("ready", flush=True)
        sync = redis.Redis.from_url(url)
        for _ in range(2000):  # wait (bounded) for the parent's start signal
            if sync.exists(prefix + "go"):
                break
            time.sleep(0.005)
        sync.close()
        await asyncio.gather(*(one() for _ in range(n)))
        await store.aclose()
        print(counts["admitted"], counts["refused"], counts["unavailable"], flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_processes_sharing_redis_admit_exactly_the_rate_limit(anyio_backend: str) -> None:
    url = require_redis()
    prefix = f"eg:b:test:{uuid.uuid4().hex}:"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, prefix, "250"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    client = aioredis.Redis.from_url(url)
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        await client.set(prefix + "go", "1")
        totals = [0, 0, 0]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            for i, v in enumerate(out.split()):
                totals[i] += int(v)
        assert totals == [40, 460, 0]  # admitted, refused, store errors
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        await client.aclose()
        await _delete_prefix(url, prefix)


# --- identities -----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def identities(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[tuple[IdentityStore, Clock]]:
    clock = Clock()
    if request.param == "memory":
        yield MemoryIdentityStore(clock=clock), clock
        return
    url = require_redis()
    tag = uuid.uuid4().hex
    s = RedisIdentityStore(
        url, prefix=f"eg:i:test:{tag}:", index_key=f"eg:ix:test:{tag}", touch_interval_s=0.0, clock=clock
    )
    try:
        yield s, clock
    finally:
        await s.aclose()
        await _delete_prefix(url, f"eg:i:test:{tag}:")
        await _delete_prefix(url, f"eg:ix:test:{tag}")


@pytest.mark.anyio
async def test_many_new_identities_at_once_are_all_recorded(identities: tuple[IdentityStore, Clock]) -> None:
    # redis-py's default pool refused connections past 100 at once: the touches beyond it were lost (logged only).
    store, _ = identities
    await asyncio.gather(*(store.touch({"id": f"burst-{i}"}, "acme") for i in range(300)))
    assert len(await store.list(1000)) == 300


@pytest.mark.anyio
async def test_identities_in_memory_take_about_their_profiles_json(anyio_backend: str) -> None:
    # An 8 KiB profile of 2,700 empty objects was kept as objects, ~192 KiB each: 100,000 identities, ~20 GB.
    import tracemalloc

    store = MemoryIdentityStore()
    text = b"[" + b",".join([b"{}"] * 2700) + b"]"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):  # each parsed from its own request, as the gateway does
            await store.touch({"id": f"heavy-{i}", "metadata": orjson.loads(text)}, "acme")
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert taken < 200 * 16 * 1024, taken  # the JSON (~8 KiB) and bookkeeping, not 192 KiB each
    kept = await store.get("acme", "heavy-0")
    assert kept is not None and kept.metadata == orjson.loads(text)


@pytest.mark.anyio
async def test_identities_in_memory_are_bounded_by_their_bytes(anyio_backend: str) -> None:
    store = MemoryIdentityStore(max_bytes=100_000)
    for i in range(100):
        await store.touch({"id": f"big-{i}", "display_name": "x" * 5000}, "acme")
    kept = await store.list(1000)
    assert 10 <= len(kept) < 20  # ~5.4 KB each: the least recently seen were forgotten
    assert kept[0].id == "big-99"


@pytest.mark.anyio
async def test_identity_created_on_first_sight_then_updated(identities: tuple[IdentityStore, Clock]) -> None:
    store, clock = identities
    profile: dict[str, Any] = {
        "id": "alice",
        "display_name": "Alice",
        "email": "alice@example.com",
        "metadata": [{"plan": "pro"}],
        "tags": ["beta"],
    }
    await store.touch(profile, "acme")
    first = await store.get("acme", "alice")
    assert first is not None
    assert (first.display_name, first.email, first.metadata, first.tags) == (
        "Alice", "alice@example.com", [{"plan": "pro"}], ("beta",),
    )  # fmt: skip
    assert first.first_seen == first.last_seen == T0

    clock.t = T0 + 100
    await store.touch({"id": "alice", "display_name": "Alice B."}, "acme")
    later = await store.get("acme", "alice")
    assert later is not None
    assert (later.display_name, later.email, later.tags) == ("Alice B.", "alice@example.com", ("beta",))
    assert (later.first_seen, later.last_seen) == (T0, T0 + 100)
    assert await store.get("acme", "nobody") is None


@pytest.mark.anyio
async def test_two_workspaces_identities_of_one_id_are_two(identities: tuple[IdentityStore, Clock]) -> None:
    # Kept by id alone, another workspace's key overwrote acme's user-42 (its e-mail shown to acme's operator).
    store, clock = identities
    await store.touch({"id": "user-42", "email": "jane@acme.example"}, "acme")
    clock.t = T0 + 1
    await store.touch({"id": "user-42", "email": "someone@globex.example"}, "globex")
    acme, globex = await store.get("acme", "user-42"), await store.get("globex", "user-42")
    assert acme is not None and (acme.workspace, acme.email) == ("acme", "jane@acme.example")
    assert globex is not None and (globex.workspace, globex.email) == ("globex", "someone@globex.example")
    assert [(i.workspace, i.id) for i in await store.list(10)] == [("globex", "user-42"), ("acme", "user-42")]
    clock.t = T0 + 2
    await store.touch({"id": "x/y"}, "team/a")  # a "/" in either: read back as written
    (latest,) = await store.list(1)
    assert (latest.workspace, latest.id) == ("team/a", "x/y")


@pytest.mark.anyio
async def test_identities_list_most_recently_seen_first(identities: tuple[IdentityStore, Clock]) -> None:
    store, clock = identities
    for i, who in enumerate(("a", "b", "c")):
        clock.t = T0 + i
        await store.touch({"id": who}, "acme")
    clock.t = T0 + 10
    await store.touch({"id": "a"}, "acme")
    assert [i.id for i in await store.list(10)] == ["a", "c", "b"]
    assert [i.id for i in await store.list(2)] == ["a", "c"]
    await store.touch({"id": ""}, "acme")  # no usable id: ignored, not raised
    assert len(await store.list(10)) == 3


@pytest.mark.anyio
async def test_a_changed_profile_is_written_within_the_touch_interval(anyio_backend: str) -> None:
    # The interval was kept per (id, profile): Jane, Bob, Jane within 30 s left Bob in Redis (Jane in memory).
    url = require_redis()
    tag = uuid.uuid4().hex
    clock = Clock()
    store = RedisIdentityStore(url, prefix=f"eg:i:test:{tag}:", index_key=f"eg:ix:test:{tag}", clock=clock)
    try:
        for i, name in enumerate(("Jane", "Bob", "Jane")):
            clock.t = T0 + i
            await store.touch({"id": "u1", "display_name": name}, "acme")
        got = await store.get("acme", "u1")
        assert got is not None and (got.display_name, got.last_seen) == ("Jane", T0 + 2)
        clock.t = T0 + 10
        await store.touch({"id": "u1", "display_name": "Jane"}, "acme")  # unchanged within 30 s: not written again
        got = await store.get("acme", "u1")
        assert got is not None and got.last_seen == T0 + 2
    finally:
        await store.aclose()
        await _delete_prefix(url, f"eg:i:test:{tag}:")
        await _delete_prefix(url, f"eg:ix:test:{tag}")


@pytest.mark.anyio
async def test_identity_touch_never_raises_when_redis_is_down(anyio_backend: str) -> None:
    store = RedisIdentityStore("redis://127.0.0.1:6391/0", socket_timeout=0.5)
    try:
        await store.touch({"id": "alice"}, "acme")  # logged, not raised
        with pytest.raises(ConnectionError):
            await store.get("acme", "alice")
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_identity_writes_to_a_stalled_redis_are_skipped_for_a_second(anyio_backend: str) -> None:
    # Each request with an identity waited for its own write to time out (before its budget's reserve did: 2 s
    # to a 503), and logged a warning each: 780 lines in 21 s of outage.
    import socket

    from structlog.testing import capture_logs

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (in the kernel), never answers
    store = RedisIdentityStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.3)
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            await store.touch({"id": "first"}, "acme")
            assert time.monotonic() - started >= 0.25  # this one waited for Redis
            started = time.monotonic()
            for i in range(20):
                await store.touch({"id": f"then-{i}"}, "acme")
            assert time.monotonic() - started < 0.25  # the others, within the second, did not
        assert len([e for e in logs if "identity store unavailable" in e["event"]]) == 1
    finally:
        await store.aclose()
        silent.close()


@pytest.mark.anyio
async def test_one_identitys_own_write_error_stops_no_other(anyio_backend: str) -> None:
    # WRONGTYPE on one identity's key tripped the store-wide pause: no other identity was recorded meanwhile.
    url = require_redis()
    tag = uuid.uuid4().hex
    store = RedisIdentityStore(url, prefix=f"eg:i:test:{tag}:", index_key=f"eg:ix:test:{tag}")
    client = aioredis.Redis.from_url(url)
    try:
        await client.set(f"eg:i:test:{tag}:acme/bad", "a string, not a hash")
        await store.touch({"id": "bad"}, "acme")  # logged, not raised
        await store.touch({"id": "good"}, "acme")
        assert await store.get("acme", "good") is not None
    finally:
        await client.aclose()
        await store.aclose()
        await _delete_prefix(url, f"eg:i:test:{tag}:")
        await _delete_prefix(url, f"eg:ix:test:{tag}")


def test_memory_window_trims_compacts_and_keeps_order() -> None:
    from embedgate.budget_stores import _mark, _Window

    w = _Window()
    for t in range(5000):
        w.add(t)
    w.trim(2999)  # forgets 0..2999, and compacts (more than half left)
    assert len(w) == 2000 and w[0] == 3000 and w.start == 0
    w.add(4998)  # a clock stepping back a little: still in order
    assert [w[i] for i in range(len(w) - 3, len(w))] == [4998, 4998, 4999]
    assert _mark(w, 2000) == 3001  # one more is admitted once the entry at rank count - limit leaves
    w.trim(10_000)
    assert len(w) == 0 and _mark(w, 5) is None


@asynccontextmanager
async def private_store(
    tmp_path: Path, *options: str, timeout: float = 0.5
) -> AsyncIterator[tuple[ThrowawayRedis, RedisBudgetStore]]:
    """A store on a redis-server of the test's own (``options`` for it), which the test may stop and start."""
    require_programs("redis-server")
    server = ThrowawayRedis(tmp_path, *options)
    server.start()
    store = RedisBudgetStore(server.url, socket_timeout=timeout)
    try:
        yield server, store
    finally:
        await store.aclose()
        server.stop()


@pytest.mark.anyio
async def test_redis_store_fails_while_redis_is_down_and_recovers_after_a_restart(tmp_path: Any) -> None:
    # A private redis-server with a password, killed and started again empty (no persistence): the store's
    # connection is lost, commands fail as BudgetStoreError meanwhile, and after the restart the next reserve
    # reconnects, authenticates and loads its script again (Redis forgot it: NOSCRIPT).
    from embedgate.budget_stores import BudgetStoreError

    async with private_store(tmp_path) as (server, store):
        counter = [CounterSpec("c:tokens", 5, 100, 60)]
        assert (await store.reserve(counter, [], now_ms=1, window_ms=WINDOW_MS, member="r1")).failed == -1
        server.stop()
        with pytest.raises(BudgetStoreError):
            await store.reserve(counter, [], now_ms=2, window_ms=WINDOW_MS, member="r2")
        assert await store.ping() is False
        server.start()
        result = await store.reserve(counter, [], now_ms=3, window_ms=WINDOW_MS, member="r3")
        assert result.failed == -1 and result.values == (5,)  # the restarted server starts from nothing
        assert await store.ping() is True


@pytest.mark.anyio
@pytest.mark.parametrize("held", [902, 400])
async def test_a_settle_from_before_redis_lost_its_data_takes_nothing_from_the_new_counters(
    tmp_path: Any, held: int
) -> None:
    # A request reserved 902 tokens, Redis restarted empty, 600 were reserved since; the request then settled at
    # 1 token: its -901 took the new counter to 0 (clamped), and 1,600 tokens went through a 1,000 budget. A
    # smaller one (400) still took 399 from counters that never held it: the counters' epoch tells them apart.
    async with private_store(tmp_path) as (server, store):
        engine_ = engine(store, BudgetConfig(scope="api_key", target="team-a", token_limit=1000))
        before = await engine_.reserve(SUBJECT, tokens=held, cost_usd=0.0)
        server.stop()
        server.start()
        await store.ping()  # the old connection's loss, found (the next command connects again)
        after = [await engine_.reserve(SUBJECT, tokens=100, cost_usd=0.0) for _ in range(6)]
        await engine_.settle(before, tokens=1, cost_usd=0.0)
        assert (await engine_.usage())[0]["tokens"]["used"] == 600
        await engine_.settle(after[0], tokens=40, cost_usd=0.0)  # a settle of this life still applies
        assert (await engine_.usage())[0]["tokens"]["used"] == 540


def test_store_records_compare_by_their_fields() -> None:
    """What a store of one's own builds and returns: constructed positionally, equal by value, readable in a
    failed assertion."""
    assert CounterSpec("c:a", 1, 10, 60) == CounterSpec("c:a", 1, 10, 60)
    assert CounterSpec("c:a", 1, 10, 60) != CounterSpec("c:a", 2, 10, 60)
    assert WindowSpec("w:a", 5) != CounterSpec("w:a", 5, 0, 0)
    assert ReserveResult(-1, (1,), (2,), (None,)) == ReserveResult(-1, (1,), (2,), (None,))
    assert repr(WindowSpec("w:a", 5)) == "WindowSpec(key='w:a', limit=5)"
    assert ReadResult((1,), (0,), (None,)).oldest == (None,)


@pytest.mark.anyio
async def test_a_reserve_that_reaches_redis_after_the_caller_gave_up_changes_nothing(
    anyio_backend: str, tmp_path: Path
) -> None:
    # Redis stalled (a slow command, a fork): the reserve timed out and the request was refused as 503, but the
    # script was already sent, ran when Redis woke, and kept the refused request's tokens until the period's end.
    async with private_store(tmp_path, "--enable-debug-command", "yes", timeout=0.3) as (server, store):
        t = int(time.time() * 1000)
        first = await store.reserve([CounterSpec("c", 5, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="1")
        assert first.failed == -1 and first.values == (5,)
        stalled = aioredis.Redis.from_url(server.url)
        await stalled.ping()  # connected beforehand: the DEBUG SLEEP goes out at once, in one write
        sleeping = asyncio.ensure_future(stalled.execute_command("DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.2)  # Redis is asleep: what comes now waits (the reserve gives up at 0.3 s, before 1 s)
        with pytest.raises(BudgetStoreError):
            await store.reserve([CounterSpec("c", 7, 100, 3600)], [], now_ms=t + 60, window_ms=WINDOW_MS,
                                member="2")  # fmt: skip
        await sleeping
        await stalled.aclose()
        got = await store.read(["c"], [], now_ms=t + 2000, window_ms=WINDOW_MS)
        assert got.values == (5,)  # the late reserve did nothing
        third = await store.reserve([CounterSpec("c", 1, 100, 3600)], [], now_ms=t + 2100, window_ms=WINDOW_MS,
                                    member="3")  # fmt: skip
        assert third.values == (6,)  # and the store goes on


@pytest.mark.anyio
async def test_a_reserve_sent_behind_a_late_one_keeps_its_own_deadline(anyio_backend: str, tmp_path: Path) -> None:
    # Redis stalled with two reserves on the connection: when the first one's deadline passed, the second failed
    # with it (a 503 for its request), though Redis then woke within its deadline and ran its script: the refused
    # request was charged. It now waits for its own deadline, and gets Redis's answer.
    async with private_store(tmp_path, "--enable-debug-command", "yes", timeout=2.0) as (server, store):
        t = int(time.time() * 1000)
        await store.reserve([CounterSpec("c", 5, 100, 3600)], [], now_ms=t, window_ms=WINDOW_MS, member="1")
        stalled = aioredis.Redis.from_url(server.url)
        await stalled.ping()
        sleeping = asyncio.ensure_future(stalled.execute_command("DEBUG", "SLEEP", "2.2"))
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(
            store.reserve([CounterSpec("c", 7, 100, 3600)], [], now_ms=t + 1, window_ms=WINDOW_MS, member="2")
        )
        await asyncio.sleep(0.9)  # sent 1 s later: its deadline (3 s) is after Redis wakes (2.2 s), the first's not
        second = await store.reserve([CounterSpec("c", 11, 100, 3600)], [], now_ms=t + 2, window_ms=WINDOW_MS,
                                     member="3")  # fmt: skip
        with pytest.raises(BudgetStoreError):
            await late
        assert second.failed == -1 and second.values == (16,)  # the late one's script came too late to apply
        await sleeping
        await stalled.aclose()
        got = await store.read(["c"], [], now_ms=t + 3000, window_ms=WINDOW_MS)
        assert got.values == (16,)
