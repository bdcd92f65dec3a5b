"""The exact-match vector cache (SPEC section 6): per-item keys, two aiocache backends, miss coalescing.

    item_keys(...)    -> ["eg:c:<sha256>"] one key per input item (from the compiled `cache_keys`)
    CachedItem        a vector as little-endian float32 bytes plus the tokens it cost when first embedded
    VectorCache       get_many / set_many over a bounded in-memory LRU or Redis; a store failure is a miss
    Coalescer[T]      N concurrent misses of the same key make one upstream call

Both backends are aiocache caches. Redis stores a compact binary form (a 4-byte token count, then the vector
bytes); the in-memory LRU keeps the :class:`CachedItem` itself (same bytes counted). One entry serves float and
base64 responses alike and nothing is kept as Python floats.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import structlog
from aiocache import BaseCache  # type: ignore[import-untyped]
from aiocache.serializers import BaseSerializer  # type: ignore[import-untyped]

from .cache_keys import KEY_PREFIX, item_keys
from .resp import LeanRedis

__all__ = ["CachedItem", "Coalescer", "VectorCache", "item_key", "item_keys"]

T = TypeVar("T")

_log = structlog.get_logger("embedgate.cache")

_HEADER = struct.Struct("<I")  # tokens, uint32 little-endian
#: The most dimensions a vector read from a shared store may have (the largest embedding models answer ~16k).
MAX_STORED_DIMS: Final = 65536
#: The most tokens an item read from a shared store may have cost (a long-context model's whole input: ~32k).
MAX_STORED_TOKENS: Final = 1_000_000
_MAX_ROUNDS = 3


@dataclass(init=False, slots=True)
class CachedItem:
    """One cached embedding: little-endian float32 ``vector`` bytes and the ``tokens`` it cost upstream; read,
    never changed (not ``frozen``: one is made per item of every cache hit, and a frozen dataclass sets its fields
    through ``object.__setattr__``)."""

    vector: bytes
    tokens: int

    def __init__(self, vector: bytes, tokens: int) -> None:
        if len(vector) % 4:
            raise ValueError(f"vector must be float32 bytes, got {len(vector)} bytes")
        if not 0 <= tokens <= 0xFFFFFFFF:
            raise ValueError(f"tokens out of range: {tokens}")
        self.vector = vector
        self.tokens = tokens

    def array(self) -> npt.NDArray[np.float32]:
        """The vector as a read-only float32 array (no copy)."""
        return np.frombuffer(self.vector, dtype="<f4")

    def dumps(self) -> bytes:
        """The stored form: a 4-byte token count, then the vector bytes."""
        return _HEADER.pack(self.tokens) + self.vector

    @classmethod
    def loads(cls, data: bytes) -> CachedItem | None:
        """Parse the stored form; None for a malformed value (treated as a miss, not an error)."""
        if len(data) <= _HEADER.size or (len(data) - _HEADER.size) % 4:
            return None  # no vector at all (a 0-dimension embedding), or not float32 bytes
        (tokens,) = _HEADER.unpack_from(data)
        return cls(vector=bytes(data[_HEADER.size :]), tokens=tokens)

    @classmethod
    def from_store(cls, data: bytes, *, check_values: bool = True) -> CachedItem | None:
        """:meth:`loads` for a value read from a shared store (Redis), which anyone may have written: None also
        for a vector no embedding is (NaN or infinity in it, more than ``MAX_STORED_DIMS`` dimensions) and a token
        count no item costs, as the answer of an upstream is refused for them (a cached NaN went out as ``null``).
        ``check_values=False`` leaves the values to :func:`only_finite`, which checks many items at once."""
        if len(data) > _HEADER.size + 4 * MAX_STORED_DIMS:
            return None
        item = cls.loads(data)
        if item is None or item.tokens > MAX_STORED_TOKENS:
            return None
        return item if not check_values or _finite(item.vector) else None


def _finite(vector: bytes) -> bool:
    """Whether a float32 vector holds no NaN nor infinity (nor a value beyond ~1e19: no embedding's): one dot
    product is finite exactly then."""
    values = np.frombuffer(vector, dtype="<f4")
    return math.isfinite(float(values.dot(values)))


def only_finite(items: list[CachedItem | None]) -> list[CachedItem | None]:
    """``items`` with those holding NaN or infinity taken out (None): one check over all of them together (a call
    per item cost ~4 us, 9 ms for a 2048 batch), item by item only when that one fails."""
    found = [item.vector for item in items if item is not None]
    if not found or _finite(found[0] if len(found) == 1 else b"".join(found)):
        return items
    return [item if item is not None and _finite(item.vector) else None for item in items]


def item_key(
    *,
    workspace: str,
    model: str,
    dimensions: int | None,
    input_type: str | None,
    item: str | list[int] | tuple[int, ...] | dict[str, Any] | list[Any],
) -> str:
    """The cache key of one input item: :func:`item_keys` of ``[item]``."""
    return item_keys(workspace=workspace, model=model, dimensions=dimensions, input_type=input_type, items=[item])[0]


class _ItemSerializer(BaseSerializer):  # type: ignore[misc]
    """aiocache serializer between :class:`CachedItem` and its raw stored bytes (no text encoding)."""

    DEFAULT_ENCODING = None  # tells aiocache's Redis backend to hand back bytes undecoded

    def dumps(self, value: CachedItem) -> bytes:
        return value.dumps()

    def loads(self, value: bytes | None) -> CachedItem | None:
        return None if value is None else CachedItem.from_store(value)


class _BoundedMemoryCache(BaseCache):  # type: ignore[misc]
    """An aiocache backend over an ``OrderedDict``: LRU-evicted to ``max_bytes`` (key + stored-form bytes).

    aiocache's SimpleMemoryCache has no size bound and arms one timer per key; here TTLs are checked lazily
    when an entry is read, and expired entries that are never read again leave through LRU eviction. Entries
    are the :class:`CachedItem`\\ s themselves (read, never changed), so a hit neither parses nor copies a vector;
    aiocache's own API (``get``, ``set``) still sees the stored bytes form.
    """

    NAME = "memory"

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        # timeout=None: the dict cannot hang, so skip aiocache's per-call wait_for task.
        super().__init__(serializer=_ItemSerializer(), timeout=None, **kwargs)
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[str, tuple[CachedItem, float | None]] = OrderedDict()

    def read_items(self, keys: Sequence[str]) -> list[CachedItem | None]:
        """The live items of ``keys`` (None for a miss or an expired entry), each made the most recently used."""
        entries, now = self._entries, time.monotonic()
        get, touch = entries.get, entries.move_to_end
        found: list[CachedItem | None] = []
        for key in keys:
            entry = get(key)
            if entry is not None and (entry[1] is None or now < entry[1]):
                touch(key)
                found.append(entry[0])
            else:
                if entry is not None:
                    self._remove(key)
                found.append(None)
        return found

    def write_item(self, key: str, item: CachedItem, ttl: float | None) -> None:
        self._remove(key)
        size = _entry_size(key, item)
        if size > self.max_bytes:
            return
        self._entries[key] = (item, time.monotonic() + ttl if ttl else None)
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes_used -= _entry_size(key, entry[0])
        return True

    def _write_raw(self, key: str, value: bytes, ttl: float | None) -> None:
        item = CachedItem.loads(value)
        if item is None:
            raise ValueError(f"not a stored cache item: {len(value)} bytes")
        self.write_item(key, item, ttl)

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> bytes | None:
        item = self.read_items([key])[0]
        return None if item is None else item.dumps()

    async def _multi_get(self, keys: list[str], encoding: str | None = None, _conn: Any = None) -> list[bytes | None]:
        return [None if item is None else item.dumps() for item in self.read_items(keys)]

    async def _set(
        self, key: str, value: bytes, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> bool:
        if _cas_token is not None:
            raise NotImplementedError("compare-and-set is not supported")
        self._write_raw(key, value, ttl)
        return True

    async def _multi_set(self, pairs: list[tuple[str, bytes]], ttl: float | None = None, _conn: Any = None) -> bool:
        for key, value in pairs:
            self._write_raw(key, value, ttl)
        return True

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return self.read_items([key])[0] is not None

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(self._remove(key))

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        for key in [k for k in self._entries if not namespace or k.startswith(namespace)]:
            self._remove(key)
        return True


#: What an entry takes besides its key's and vector's bytes: the key's str and the vector's bytes headers, the
#: CachedItem, its (item, expiry) tuple and float, the OrderedDict's slot and link (~280 bytes by tracemalloc; ~360
#: in the process's RSS, allocator rounding included). Uncounted, a cache of 64-dimension vectors took 2.2x its
#: max_bytes of memory, of 8 dimensions 4.7x.
_ENTRY_OVERHEAD: Final = 360


def _entry_size(key: str, item: CachedItem) -> int:
    """What an entry counts against ``max_bytes``: its key's bytes, the stored form's, and the objects holding them."""
    return _ENTRY_OVERHEAD + len(key.encode()) + _HEADER.size + len(item.vector)


class _RedisItemCache(BaseCache):  # type: ignore[misc]
    """An aiocache backend storing raw item bytes in Redis over ``embedgate.resp``'s pipelined connection.

    aiocache's own RedisCache goes through redis-py's pool, whose per-command cost (~80-110 us of CPU here) was
    paid on every cache lookup and store; here ``multi_get`` is one MGET and ``multi_set`` one write of SET .. EX
    commands, on the connection every caller shares. A command not answered within ``socket_timeout`` fails.
    """

    NAME = "redis"

    def __init__(self, url: str, *, socket_timeout: float, timeout: float) -> None:
        super().__init__(serializer=_ItemSerializer(), timeout=timeout)
        self.client = LeanRedis(url, timeout=socket_timeout)

    async def _get(self, key: str, encoding: str | None = None, _conn: Any = None) -> bytes | None:
        value: bytes | None = await self.client.execute("GET", key)
        return value

    async def _multi_get(self, keys: list[str], encoding: str | None = None, _conn: Any = None) -> list[bytes | None]:
        values: list[bytes | None] = await self.client.execute("MGET", *keys)
        return values

    async def _set(
        self, key: str, value: bytes, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> bool:
        if _cas_token is not None:
            raise NotImplementedError("compare-and-set is not supported")
        await self.client.execute(*_set_command(key, value, ttl))
        return True

    async def _multi_set(self, pairs: list[tuple[str, bytes]], ttl: float | None = None, _conn: Any = None) -> bool:
        await self.client.execute_many([_set_command(key, value, ttl) for key, value in pairs])
        return True

    async def _exists(self, key: str, _conn: Any = None) -> bool:
        return bool(await self.client.execute("EXISTS", key))

    async def _delete(self, key: str, _conn: Any = None) -> int:
        return int(await self.client.execute("DEL", key))

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        # Only this cache's entries (never FLUSHDB: the database may hold budgets and identities too).
        cursor, pattern = b"0", f"{namespace or KEY_PREFIX}*"
        while True:
            cursor, keys = await self.client.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            if keys:
                await self.client.execute("DEL", *keys)
            if cursor == b"0":
                return True

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        await self.client.aclose()


def _set_command(key: str, value: bytes, ttl: float | None) -> tuple[str | bytes | int, ...]:
    if not ttl:
        return ("SET", key, value)
    if isinstance(ttl, float) and not ttl.is_integer():
        return ("SET", key, value, "PX", int(ttl * 1000))
    return ("SET", key, value, "EX", int(ttl))


class VectorCache:
    """get_many / set_many of :class:`CachedItem` over the in-memory LRU or Redis, through aiocache.

    A store failure (refused connection, timeout, a bad reply) is never raised: ``get_many`` answers misses
    and ``set_many`` does nothing. It is logged as a warning at most once per ``warn_interval``, and for
    ``retry_interval`` after a failure the store is not tried at all, so a black-holed Redis costs one
    request a socket timeout, not every request. After that the next call tries again (redis-py reconnects).
    Build it with :meth:`from_config`; the constructor takes an already-built aiocache store.
    """

    def __init__(
        self,
        store: Any,
        *,
        backend: str,
        describe: str = "",
        secret: str | None = None,
        warn_interval: float = 10.0,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.backend = backend
        self._describe = describe
        self._secret = secret
        self._warn_interval = warn_interval
        self._retry_interval = retry_interval
        self._clock = clock
        self._down_until = 0.0
        # The in-memory LRU is our own dict: read and written directly, without aiocache's per-call wrappers
        # (enabled check, timeout, plugin hooks, key building), which cost more than the dict lookups.
        self._memory = store if isinstance(store, _BoundedMemoryCache) else None
        # Redis the same way: commands straight to its connection, without aiocache's per-call timeout task.
        self._redis = store.client if isinstance(store, _RedisItemCache) else None
        self._failing = False
        self._last_warning: float | None = None
        self._suppressed = 0

    @classmethod
    def from_config(
        cls,
        redis_url: str,
        max_bytes: int,
        *,
        socket_timeout: float = 0.25,
        op_timeout: float = 1.0,
        warn_interval: float = 10.0,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> VectorCache:
        """Redis at ``redis_url``, or when it is empty the in-memory LRU bounded by ``max_bytes``."""
        options: dict[str, Any] = {
            "warn_interval": warn_interval,
            "retry_interval": retry_interval,
            "clock": clock,
        }
        if not redis_url:
            return cls(_BoundedMemoryCache(max_bytes), backend="memory", **options)
        parts = urlsplit(redis_url)
        store = _RedisItemCache(redis_url, socket_timeout=socket_timeout, timeout=op_timeout)
        # The log names the server by scheme, host and path only: never the URL, which may hold a password.
        where = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"
        return cls(store, backend="redis", describe=where, secret=parts.password, **options)

    async def get_many(self, keys: list[str]) -> list[CachedItem | None]:
        """The items of ``keys`` in order, None for each miss; all misses when the store fails."""
        if not keys:
            return []
        memory = self._memory
        if memory is not None:
            return memory.read_items(keys)
        if self._clock() < self._down_until:
            return [None] * len(keys)
        try:
            if self._redis is not None:
                loads = CachedItem.from_store
                raws = await self._redis.execute("MGET", *keys)
                values = only_finite([None if raw is None else loads(raw, check_values=False) for raw in raws])
            else:
                values = await self._store.multi_get(keys)
        except Exception as exc:  # any store failure is a miss by contract (SPEC 6)
            self._failed("get", exc)
            return [None] * len(keys)
        self._succeeded()
        return values

    async def set_many(self, items: list[tuple[str, CachedItem]], ttl: int) -> None:
        """Store ``items`` for ``ttl`` seconds (> 0); silently does nothing when the store fails."""
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")  # 0 would store forever in both backends
        if not items or self._clock() < self._down_until:
            return
        memory = self._memory
        if memory is not None:
            for key, item in items:
                memory.write_item(key, item, ttl)
            return
        try:
            if self._redis is not None:
                await self._redis.execute_many([_set_command(key, item.dumps(), ttl) for key, item in items])
            else:
                await self._store.multi_set(items, ttl=ttl)
        except Exception as exc:  # a lost write only costs a later miss
            self._failed("set", exc)
            return
        self._succeeded()

    async def ping(self) -> bool:
        """Whether the store answers now (for ``/readyz``); always tries, even right after a failure."""
        if self.backend == "memory":
            return True
        try:
            await self._store.client.execute("PING")
        except Exception as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    def bytes_used(self) -> int:
        """Key + value bytes held by the memory backend; -1 for Redis (its memory is Redis's own)."""
        return int(self._store.bytes_used) if self.backend == "memory" else -1

    async def close(self) -> None:
        """Release the store's connections."""
        await self._store.close()

    def _failed(self, operation: str, exc: Exception) -> None:
        now = self._clock()
        self._failing = True
        self._down_until = now + self._retry_interval
        if self._last_warning is not None and now - self._last_warning < self._warn_interval:
            self._suppressed += 1
            return
        detail = str(exc)
        if self._secret:
            detail = detail.replace(self._secret, "***")
        _log.warning(
            "cache store unavailable; serving misses",
            backend=self.backend,
            store=self._describe,
            operation=operation,
            error=type(exc).__name__,
            detail=detail,
            suppressed=self._suppressed,
        )
        self._last_warning = now
        self._suppressed = 0

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            _log.info("cache store recovered", backend=self.backend, store=self._describe)


class _Abandoned(Exception):
    """The owner of an in-flight key was cancelled before it had a result: its waiters fetch it again."""


class _Private(Exception):
    """An owner's own error (see ``Coalescer``), with the keys its failed fetch held."""

    def __init__(self, error: Exception, keys: frozenset[str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.keys = keys


class Coalescer(Generic[T]):
    """Coalesces identical concurrent misses so N simultaneous requests for a new item make one upstream call.

    ``run`` registers the keys nobody is fetching as in flight, calls ``fetch`` once with their positions,
    and for the other positions awaits the in-flight call that owns them. An owner's exception reaches its
    waiters as the same exception, unless it is one of ``private`` (the upstream rejecting the owner's own batch:
    another item of it may be at fault) and the owner's batch held a key the waiter does not want; then, as when an
    owner is cancelled (its client went away), the owner hands its keys back and its waiters fetch them
    themselves. ``shared`` (if given) makes, from an owner's exception, the one each of its waiters raises (an
    upstream's own words may quote the owner's batch: its other items are not the waiters' to read). Per process:
    replicas do not coalesce with each other.
    """

    def __init__(self, private: tuple[type[Exception], ...] = (),
                 shared: Callable[[Exception], Exception] | None = None) -> None:  # fmt: skip
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self._private = private
        self._shared = shared
        #: The calls inside ``run`` (their owner gives up, they fetch again, in this coalescer: whoever drops it from
        #: a registry waits until none is, or a request coming meanwhile made a second call for the same items).
        self.users = 0

    def in_flight(self) -> int:
        """How many keys are being fetched right now."""
        return len(self._inflight)

    async def run(
        self,
        keys: Sequence[str],
        fetch: Callable[[list[int]], Awaitable[list[T]]],
        held: list[tuple[str, asyncio.Future[T]]] | None = None,
        left: Callable[[], float] | None = None,
    ) -> list[T]:
        """The results for ``keys`` in order; ``fetch(positions)`` returns one result per given position.

        With ``held``, the keys this call fetched stay in flight, answered, until ``release(held)``: the caller
        releases them once their results are in the cache, so that a request whose lookup missed before that
        write does not fetch them again. With ``left`` (the seconds this call has left), a wait on another's fetch
        ends then, in ``TimeoutError`` (after an owner gave up, the next may have started later: its deadline is
        not this call's)."""
        results: dict[int, T] = {}
        pending = list(range(len(keys)))
        for _ in range(_MAX_ROUNDS):
            pending = await self._round(keys, pending, fetch, results, held, left)
            if not pending:
                return [results[i] for i in range(len(keys))]
        # Owner after owner was cancelled: stop depending on others and fetch the rest uncoalesced (an item repeated
        # in the batch once, as a round fetches it: it is estimated and billed once).
        first: dict[str, int] = {}
        for i in pending:
            first.setdefault(keys[i], i)
        once = list(first.values())
        values = await fetch(once)
        _check_count(values, once)
        results.update(zip(once, values, strict=True))
        for i in pending:
            results[i] = results[first[keys[i]]]
        return [results[i] for i in range(len(keys))]

    async def _round(
        self,
        keys: Sequence[str],
        positions: list[int],
        fetch: Callable[[list[int]], Awaitable[list[T]]],
        results: dict[int, T],
        held: list[tuple[str, asyncio.Future[T]]] | None,
        left: Callable[[], float] | None = None,
    ) -> list[int]:
        """One pass: fetch what nobody fetches, await the rest; returns positions whose owner gave up."""
        loop = asyncio.get_running_loop()
        owned: dict[str, asyncio.Future[T]] = {}
        mine: list[int] = []
        waits: list[tuple[int, asyncio.Future[T]]] = []
        for i in positions:
            future = self._inflight.get(keys[i])
            if future is None:
                future = owned[keys[i]] = self._inflight[keys[i]] = loop.create_future()
                mine.append(i)
            else:
                waits.append((i, future))  # includes repeats of a key this call itself owns
        if mine:
            # Ours resolve before we await anyone else's: two calls owning each other's keys cannot deadlock.
            results.update(zip(mine, await self._fetch_owned(keys, mine, owned, fetch, held), strict=True))
        retry: list[int] = []
        wanted: frozenset[str] | None = None
        for i, future in waits:
            try:
                # shield: a waiter being cancelled must not cancel the future the owner and others share.
                if left is None or future.done():
                    results[i] = await asyncio.shield(future)
                else:  # (not wait_for: on 3.11 it drops a cancel that comes as the future is answered)
                    async with asyncio.timeout(max(0.0, left())):
                        results[i] = await asyncio.shield(future)
            except _Abandoned:
                retry.append(i)
            except _Private as private:
                if wanted is None:
                    wanted = frozenset(keys)
                if not private.keys <= wanted:
                    retry.append(i)  # another item of the owner's batch may be the one at fault
                else:
                    raise private.error from None  # the batch held only items this call wants: its error too
            except Exception as exc:
                if self._shared is None:
                    raise
                raise self._shared(exc) from None
        return retry

    async def _fetch_owned(
        self,
        keys: Sequence[str],
        mine: list[int],
        owned: dict[str, asyncio.Future[T]],
        fetch: Callable[[list[int]], Awaitable[list[T]]],
        held: list[tuple[str, asyncio.Future[T]]] | None,
    ) -> list[T]:
        answered = False
        try:
            values = await fetch(mine)
            _check_count(values, mine)
        except Exception as exc:
            _settle(owned.values(), _Private(exc, frozenset(owned)) if isinstance(exc, self._private) else exc)
            raise
        except BaseException:
            _settle(owned.values(), _Abandoned())
            raise
        else:
            for i, value in zip(mine, values, strict=True):
                future = owned[keys[i]]
                if not future.done():
                    future.set_result(value)
            answered = True
            return values
        finally:
            if answered and held is not None:
                held.extend(owned.items())
            else:
                self.release(owned.items())

    def release(self, held: Iterable[tuple[str, asyncio.Future[T]]]) -> None:
        """Take keys a call fetched out of flight (see ``run``)."""
        for key, future in held:
            if self._inflight.get(key) is future:
                del self._inflight[key]


def _settle(futures: Any, exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
            # Marks the exception retrieved: with no waiter, asyncio would otherwise log it at collection.
            future.exception()


def _check_count(values: list[Any], positions: list[int]) -> None:
    if len(values) != len(positions):
        raise ValueError(f"fetch returned {len(values)} results for {len(positions)} positions")
