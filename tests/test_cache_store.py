"""Contract tests of the vector cache against both backends (memory, and the real Redis); the coalescer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import orjson
import pytest
import redis.asyncio as redis

from embedgate.cache import CachedItem, Coalescer, VectorCache, item_key, item_keys
from tests.redis_util import require_redis


@dataclass
class Harness:
    """A cache under test, with a workspace of its own so tests never read each other's entries."""

    cache: VectorCache
    workspace: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex}")
    keys: list[str] = field(default_factory=list)

    def key(self, item: Any, *, model: str = "openai/m", workspace: str | None = None) -> str:
        key = item_key(workspace=workspace or self.workspace, model=model, dimensions=None, input_type=None, item=item)
        self.keys.append(key)
        return key


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    url = require_redis() if request.param == "redis" else ""
    harness = Harness(VectorCache.from_config(url, 1 << 20))
    assert harness.cache.backend == request.param
    try:
        yield harness
    finally:
        await harness.cache.close()
        if url and harness.keys:
            client = redis.Redis.from_url(url)
            try:
                await client.delete(*harness.keys)
            finally:
                await client.aclose()


def random_item(rng: np.random.Generator, dims: int, tokens: int = 7) -> CachedItem:
    # Random bit patterns, so -0.0, subnormals and every mantissa are exercised; the exponent's top bit cleared, as
    # no embedding holds NaN or infinity (a value read from Redis holding one is a miss: see below).
    bits = rng.integers(0, 2**32, size=dims, dtype=np.uint32) & np.uint32(0xBFFFFFFF)
    return CachedItem(vector=bits.view("<f4").tobytes(), tokens=tokens)


@pytest.mark.anyio
async def test_round_trip_is_bit_exact(store: Harness) -> None:
    rng = np.random.default_rng(1)
    items = [(store.key(f"text {dims}"), random_item(rng, dims, tokens=dims + 1)) for dims in (1, 256, 1536, 3072)]
    await store.cache.set_many(items, ttl=60)

    got = await store.cache.get_many([k for k, _ in items])

    assert got == [item for _, item in items]
    for (_, item), back in zip(items, got, strict=True):
        assert back is not None
        assert back.vector == item.vector and back.tokens == item.tokens
        assert back.array().tobytes() == item.vector


@pytest.mark.anyio
async def test_get_many_mixes_hits_and_misses_in_key_order(store: Harness) -> None:
    rng = np.random.default_rng(2)
    a, b = random_item(rng, 8), random_item(rng, 8)
    await store.cache.set_many([(store.key("a"), a), (store.key("b"), b)], ttl=60)

    got = await store.cache.get_many([store.key("x"), store.key("b"), store.key("y"), store.key("a")])

    assert got == [None, b, None, a]
    assert await store.cache.get_many([]) == []


@pytest.mark.anyio
async def test_entries_expire_after_their_ttl(store: Harness) -> None:
    rng = np.random.default_rng(3)
    short, long = random_item(rng, 4), random_item(rng, 4)
    await store.cache.set_many([(store.key("short"), short)], ttl=1)
    await store.cache.set_many([(store.key("long"), long)], ttl=60)
    assert await store.cache.get_many([store.key("short")]) == [short]

    await anyio.sleep(1.3)

    assert await store.cache.get_many([store.key("short"), store.key("long")]) == [None, long]


@pytest.mark.anyio
async def test_workspaces_never_share_entries(store: Harness) -> None:
    item = random_item(np.random.default_rng(4), 4)
    await store.cache.set_many([(store.key("same text"), item)], ttl=60)
    other = store.key("same text", workspace=f"other-{uuid.uuid4().hex}")

    assert await store.cache.get_many([other, store.key("same text")]) == [None, item]


@pytest.mark.anyio
async def test_ping_and_non_positive_ttl(store: Harness) -> None:
    assert await store.cache.ping() is True
    with pytest.raises(ValueError, match="ttl"):
        await store.cache.set_many([(store.key("t"), random_item(np.random.default_rng(5), 2))], ttl=0)


def test_item_key_covers_exactly_the_keyed_fields() -> None:
    base: dict[str, Any] = {
        "workspace": "acme",
        "model": "openai/text-embedding-3-small",
        "dimensions": 256,
        "input_type": "search_query",
        "item": "hello",
    }
    key = item_key(**base)
    assert key.startswith("eg:c:") and len(key) <= 64
    assert item_key(**base) == key
    for field_name, other in [
        ("workspace", "acme2"),
        ("model", "openai/text-embedding-3-large"),
        ("dimensions", 512),
        ("dimensions", None),
        ("input_type", "search_document"),
        ("input_type", None),
        ("item", "hello "),
        ("item", [15339]),
    ]:
        assert item_key(**{**base, field_name: other}) != key, field_name
    # Field boundaries are unambiguous: shifting text between workspace and model changes the key.
    shifted_left = item_key(**{**base, "workspace": "a", "model": "bc"})
    assert shifted_left != item_key(**{**base, "workspace": "ab", "model": "c"})
    # A token array is not its text rendering; tuple and list forms of it are the same input.
    assert item_key(**{**base, "item": "[1, 2]"}) != item_key(**{**base, "item": [1, 2]})
    assert item_key(**{**base, "item": (1, 2)}) == item_key(**{**base, "item": [1, 2]})
    # Multimodal dicts key by content, not by the order their keys were written in.
    part1 = {"content": [{"type": "text", "text": "x"}]}
    part2 = {"content": [{"text": "x", "type": "text"}]}
    assert item_key(**{**base, "item": part1}) == item_key(**{**base, "item": part2})


def test_item_keys_are_stable_and_match_one_by_one() -> None:
    # Keys already in a shared Redis must keep matching across upgrades: these were computed by the first
    # release's item_key (sha256 of the JSON tuple, urlsafe base64 without padding).
    assert item_key(workspace="w", model="openai/m", dimensions=None, input_type=None, item="hello") == (
        "eg:c:Ssn7SlxxH5HmplyHlO59MwfoD0DKn8z9shueL_mRkzI"
    )
    items: list[Any] = ["hello", "", 'quote " and \\ and ü', [1, 2, 3], {"b": 1, "a": [{"z": 2, "y": "x"}]}, "x" * 5000]
    fields: dict[str, Any] = {"workspace": 'é"', "model": "o/m", "dimensions": 256, "input_type": "search_query"}
    keys = item_keys(**fields, items=items)
    assert keys == [item_key(**fields, item=item) for item in items]
    assert len(set(keys)) == len(items) and all(k.startswith("eg:c:") and len(k) == 48 for k in keys)
    assert item_keys(**fields, items=[]) == []


def test_item_keys_of_a_batch_are_each_items_own_digest() -> None:
    # A batch's keys are hashed from a shared head state and base64-encoded in one pass: each must still be the
    # documented key of its item alone, whatever the batch's size (a misaligned pass would shift the characters).
    def reference(item: Any) -> str:
        material = orjson.dumps(["v1", "w", "o/m", None, None, item], option=orjson.OPT_SORT_KEYS)
        return "eg:c:" + base64.urlsafe_b64encode(hashlib.sha256(material).digest()).rstrip(b"=").decode()

    for size in (1, 2, 3, 4, 257):
        items: list[Any] = [f"item {i}" if i % 3 else [i, i + 1] for i in range(size)]
        assert item_keys(workspace="w", model="o/m", dimensions=None, input_type=None, items=items) == [
            reference(item) for item in items
        ]


@pytest.mark.anyio
async def test_memory_backend_through_aiocache_api() -> None:
    # The memory LRU keeps items, not bytes; aiocache's own get/set on it still speak the stored form.
    cache = VectorCache.from_config("", 1 << 20)
    store = cache._store
    item = CachedItem(vector=np.arange(4, dtype="<f4").tobytes(), tokens=9)
    await store.set("k1", item, ttl=60)
    assert await store.get("k1") == item
    assert await store.multi_get(["k1", "k2"]) == [item, None]
    assert await cache.get_many(["k1"]) == [item]
    assert await store.exists("k1") and not await store.exists("k2")
    assert cache.bytes_used() == _entry_size("k1", item)
    assert await store.delete("k1") == 1 and cache.bytes_used() == 0
    await cache.close()


@pytest.mark.anyio
async def test_redis_backend_through_aiocache_api() -> None:
    cache = VectorCache.from_config(require_redis(), 1 << 20)
    store = cache._store
    prefix = f"eg:test:aiocache:{uuid.uuid4().hex}:"
    item = CachedItem(vector=np.arange(4, dtype="<f4").tobytes(), tokens=9)
    try:
        await store.set(prefix + "k1", item, ttl=60)
        await store.multi_set([(prefix + "k2", item)], ttl=1.5)
        assert await store.get(prefix + "k1") == item
        assert await store.multi_get([prefix + "k1", prefix + "k2", prefix + "k3"]) == [item, item, None]
        assert await store.exists(prefix + "k1") and not await store.exists(prefix + "k3")
        assert await store.delete(prefix + "k1") == 1
        assert await store.clear(namespace=prefix) is True
        assert await store.multi_get([prefix + "k2"]) == [None]
    finally:
        await cache.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "stored",
    [
        struct.pack("<I", 3) + np.array([0.5, np.nan, 0.25], "<f4").tobytes(),
        struct.pack("<I", 3) + np.array([0.5, np.inf, 0.25], "<f4").tobytes(),
        struct.pack("<I", 2**32 - 1) + np.array([0.5, 0.5], "<f4").tobytes(),  # tokens no item costs
        struct.pack("<I", 3) + bytes(4 * 65537),  # more dimensions than any embedding has
    ],
    ids=["nan", "infinity", "tokens", "dimensions"],
)
async def test_a_value_in_redis_no_embedding_is_is_a_miss(stored: bytes) -> None:
    # Redis is shared: a value written there by anything else was served as a hit, a NaN going out as null (the
    # same vector from an upstream is refused, and never cached), a 64 MB one as a 16M-dimension vector.
    url = require_redis()
    cache = VectorCache.from_config(url, 1 << 20)
    key = item_key(workspace="acme", model="openai/m", dimensions=None, input_type=None, item=f"foreign {uuid.uuid4()}")
    client = redis.Redis.from_url(url)
    try:
        await client.set(key, stored, ex=60)
        assert await cache.get_many([key]) == [None]
    finally:
        await client.delete(key)
        await client.aclose()
        await cache.close()


@pytest.mark.anyio
async def test_in_a_batch_read_from_redis_only_the_foreign_value_is_a_miss() -> None:
    # The values of a lookup are checked together (one dot product), then one by one only when that fails.
    url = require_redis()
    cache = VectorCache.from_config(url, 1 << 20)
    keys = [item_key(workspace="acme", model="openai/m", dimensions=None, input_type=None, item=f"b{i} {uuid.uuid4()}")
            for i in range(3)]  # fmt: skip
    good = CachedItem(vector=np.array([0.5, -0.25], "<f4").tobytes(), tokens=2)
    bad = struct.pack("<I", 2) + np.array([0.5, np.nan], "<f4").tobytes()
    client = redis.Redis.from_url(url)
    try:
        await client.mset({keys[0]: good.dumps(), keys[1]: bad, keys[2]: good.dumps()})
        assert await cache.get_many(keys) == [good, None, good]
        assert await cache.get_many([keys[0], keys[2]]) == [good, good]
    finally:
        await client.delete(*keys)
        await client.aclose()
        await cache.close()


def test_cached_item_validation_and_malformed_values() -> None:
    item = CachedItem(vector=np.arange(3, dtype="<f4").tobytes(), tokens=5)
    assert CachedItem.loads(item.dumps()) == item
    assert len(item.dumps()) == 4 + 12
    assert CachedItem.loads(b"\x01\x00") is None
    assert CachedItem.loads(item.dumps() + b"\x00") is None
    assert CachedItem.loads(b"abcd") is None  # a token count and no vector: was served as a 0-dimension embedding
    with pytest.raises(ValueError):
        CachedItem(vector=b"\x00" * 5, tokens=1)
    with pytest.raises(ValueError):
        CachedItem(vector=b"", tokens=-1)


def _entry_size(key: str, item: CachedItem) -> int:
    # the bytes, and the ~360 bytes of Python objects that hold them (without which a cache of small vectors took
    # several times its max_bytes of memory)
    return 360 + len(key) + len(item.dumps())


@pytest.mark.anyio
async def test_memory_backend_stays_within_max_bytes_evicting_lru_first() -> None:
    max_bytes = 64 * 1024
    harness = Harness(VectorCache.from_config("", max_bytes))
    rng = np.random.default_rng(6)
    item = random_item(rng, 256)
    keys = [harness.key(f"item {i}") for i in range(10 * max_bytes // _entry_size(harness.key("x"), item))]
    size = _entry_size(keys[0], item)
    capacity = max_bytes // size
    try:
        for key in keys:
            await harness.cache.set_many([(key, item)], ttl=60)
            assert harness.cache.bytes_used() <= max_bytes

        got = await harness.cache.get_many(keys)
        present = [k for k, v in zip(keys, got, strict=True) if v is not None]
        # Exactly the most recent entries that fit remain, and the byte count matches them.
        assert present == keys[-capacity:]
        assert harness.cache.bytes_used() == capacity * size
    finally:
        await harness.cache.close()


@pytest.mark.parametrize("dims", [8, 64, 1536])
@pytest.mark.anyio
async def test_memory_backend_holds_no_more_memory_than_max_bytes_whatever_the_vector_size(dims: int) -> None:
    # Only the key's and vector's bytes were counted: a full cache of 8-dimension vectors held 4.7x its max_bytes.
    max_bytes = 4 * 1024 * 1024
    cache = VectorCache.from_config("", max_bytes)
    items = [(f"eg:c:acme:local/m:0::{i:064x}", CachedItem(vector=np.full(dims, i, "<f4").tobytes(), tokens=1))
             for i in range(2 * max_bytes // (dims * 4))]  # fmt: skip
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(items), 1000):
            await cache.set_many(items[start : start + 1000], ttl=60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    got = await cache.get_many([key for key, _ in items])
    kept = [(key, item) for (key, _), item in zip(items, got, strict=True) if item is not None]
    await cache.close()
    assert 0 < len(kept) < len(items)  # full: evicting
    # what the cache's own objects take, and the keys and items it holds (made by the test, so not in ``held``)
    own = held + sum(sys.getsizeof(key) + sys.getsizeof(item) + sys.getsizeof(item.vector) for key, item in kept)
    assert own <= max_bytes * 1.1


@pytest.mark.anyio
async def test_memory_backend_reading_an_entry_refreshes_it() -> None:
    item = random_item(np.random.default_rng(7), 64)
    harness = Harness(VectorCache.from_config("", 10_000))
    capacity = 10_000 // _entry_size(harness.key("probe"), item)
    keys = [harness.key(f"k{i}") for i in range(capacity + 2)]
    try:
        await harness.cache.set_many([(k, item) for k in keys[:capacity]], ttl=60)
        assert await harness.cache.get_many([keys[0]]) == [item]  # now the most recent

        await harness.cache.set_many([(keys[capacity], item), (keys[capacity + 1], item)], ttl=60)

        got = await harness.cache.get_many([keys[0], keys[1], keys[2], keys[3]])
        assert got == [item, None, None, item]
    finally:
        await harness.cache.close()


@pytest.mark.anyio
async def test_memory_backend_skips_an_item_larger_than_the_bound() -> None:
    harness = Harness(VectorCache.from_config("", 1000))
    big = CachedItem(vector=b"\x00" * 2000, tokens=1)
    small = CachedItem(vector=b"\x00" * 16, tokens=1)
    try:
        await harness.cache.set_many([(harness.key("small"), small), (harness.key("big"), big)], ttl=60)
        assert await harness.cache.get_many([harness.key("small"), harness.key("big")]) == [small, None]
        assert harness.cache.bytes_used() == _entry_size(harness.key("small"), small)
    finally:
        await harness.cache.close()


class Upstream:
    """A fake upstream fetch: records each call's keys and holds it until released."""

    def __init__(self, keys: list[str], fail: BaseException | None = None) -> None:
        self.keys = keys
        self.calls: list[list[str]] = []
        self.release = anyio.Event()
        self.fail = fail

    async def fetch(self, positions: list[int]) -> list[str]:
        self.calls.append([self.keys[i] for i in positions])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [f"vec:{self.keys[i]}" for i in positions]


@pytest.mark.anyio
async def test_coalescer_fifty_identical_misses_make_one_call() -> None:
    coalescer: Coalescer[str] = Coalescer()
    upstream = Upstream(["k"])
    results: list[list[str]] = []

    async def one() -> None:
        results.append(await coalescer.run(["k"], upstream.fetch))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        upstream.release.set()

    assert upstream.calls == [["k"]]
    assert results == [["vec:k"]] * 50
    assert coalescer.in_flight() == 0


@pytest.mark.anyio
async def test_coalescer_fetches_only_keys_not_in_flight() -> None:
    coalescer: Coalescer[str] = Coalescer()
    first = Upstream(["a", "b"])
    second = Upstream(["b", "c", "a", "d", "c"])
    results: dict[str, list[str]] = {}

    async def run(name: str, upstream: Upstream) -> None:
        results[name] = await coalescer.run(upstream.keys, upstream.fetch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "first", first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(run, "second", second)
        await anyio.wait_all_tasks_blocked()
        assert coalescer.in_flight() == 4
        second.release.set()
        await anyio.wait_all_tasks_blocked()
        assert "second" not in results  # still waiting for first's "a" and "b"
        first.release.set()

    assert first.calls == [["a", "b"]]
    assert second.calls == [["c", "d"]]  # the repeated "c" is fetched once
    assert results["first"] == ["vec:a", "vec:b"]
    assert results["second"] == ["vec:b", "vec:c", "vec:a", "vec:d", "vec:c"]
    assert coalescer.in_flight() == 0


@pytest.mark.anyio
async def test_coalescer_owner_failure_reaches_waiters_and_clears_in_flight() -> None:
    coalescer: Coalescer[str] = Coalescer()
    boom = RuntimeError("upstream exploded")
    upstream = Upstream(["k", "j"], fail=boom)
    errors: list[BaseException] = []

    async def one(keys: list[str]) -> None:
        try:
            await coalescer.run(keys, upstream.fetch)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, ["k", "j"])
        await anyio.wait_all_tasks_blocked()
        for _ in range(5):
            tg.start_soon(one, ["j"])
        await anyio.wait_all_tasks_blocked()
        upstream.release.set()

    assert len(upstream.calls) == 1
    assert len(errors) == 6 and all(e is boom for e in errors)
    assert coalescer.in_flight() == 0
    # Nothing is stuck: the next request for the key fetches afresh.
    retry = Upstream(["k"])
    retry.release.set()
    assert await coalescer.run(["k"], retry.fetch) == ["vec:k"]


@pytest.mark.anyio
async def test_coalescer_cancelled_owner_hands_keys_to_waiters() -> None:
    coalescer: Coalescer[str] = Coalescer()
    owner = Upstream(["k"])
    takeover = Upstream(["k"])
    results: list[list[str]] = []

    async def wait_for_k() -> None:
        results.append(await coalescer.run(["k"], takeover.fetch))

    async with anyio.create_task_group() as tg:
        owner_scope = anyio.CancelScope()
        tg.start_soon(_in_scope, owner_scope, coalescer, owner)
        await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            tg.start_soon(wait_for_k)
        await anyio.wait_all_tasks_blocked()
        owner_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        takeover.release.set()

    assert owner.calls == [["k"]]
    assert takeover.calls == [["k"]]  # one waiter took over; the others waited on it
    assert results == [["vec:k"]] * 3
    assert coalescer.in_flight() == 0


async def _in_scope(scope: anyio.CancelScope, coalescer: Coalescer[str], upstream: Upstream) -> None:
    with scope:
        await coalescer.run(upstream.keys, upstream.fetch)


@pytest.mark.anyio
async def test_coalescer_cancelled_waiter_does_not_disturb_the_others() -> None:
    coalescer: Coalescer[str] = Coalescer()
    upstream = Upstream(["k"])
    results: list[list[str]] = []

    async def one() -> None:
        results.append(await coalescer.run(["k"], upstream.fetch))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        waiter_scope = anyio.CancelScope()
        tg.start_soon(_in_scope, waiter_scope, coalescer, upstream)
        await anyio.wait_all_tasks_blocked()
        waiter_scope.cancel()
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        upstream.release.set()

    assert upstream.calls == [["k"]]
    assert results == [["vec:k"]] * 2
    assert coalescer.in_flight() == 0


@pytest.mark.anyio
async def test_coalescer_rejects_a_fetch_with_the_wrong_result_count() -> None:
    coalescer: Coalescer[str] = Coalescer()

    async def short(positions: list[int]) -> list[str]:
        return ["only one"]

    with pytest.raises(ValueError, match="2 positions"):
        await coalescer.run(["a", "b"], short)
    assert coalescer.in_flight() == 0


@pytest.mark.anyio
async def test_coalescer_waiter_with_a_deadline_is_cancelled_as_its_answer_comes() -> None:
    # A cancel coming in the loop turn the shared answer does was dropped by asyncio.wait_for (Python 3.11): the
    # waiting request went on to its answer, and a host's timeout raised nothing.
    coalescer: Coalescer[str] = Coalescer()
    loop = asyncio.get_running_loop()
    other = coalescer._inflight["x"] = loop.create_future()  # another call's fetch of "x", in flight

    async def fetch(positions: list[int]) -> list[str]:
        raise AssertionError("x is another call's")

    waiter = asyncio.ensure_future(coalescer.run(["x"], fetch, [], lambda: 60.0))
    await asyncio.sleep(0.01)
    other.add_done_callback(lambda _: waiter.cancel())  # after the waiter's own callback, in the same turn
    other.set_result("vector-x")
    with pytest.raises(asyncio.CancelledError):
        await waiter


@pytest.mark.anyio
async def test_coalescer_waiter_with_a_deadline_gives_up_then() -> None:
    coalescer: Coalescer[str] = Coalescer()
    coalescer._inflight["x"] = asyncio.get_running_loop().create_future()  # never answered

    async def fetch(positions: list[int]) -> list[str]:
        raise AssertionError("x is another call's")

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await coalescer.run(["x"], fetch, [], lambda: 0.2 - (time.monotonic() - started))
    assert 0.15 < time.monotonic() - started < 1.0
