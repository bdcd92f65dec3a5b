"""Identities (SPEC section 7): the end users a request is made for, created on first sight.

A request's ``identity`` (``{id, display_name, email, metadata, logo_url, tags}``) is touched on every
request: the record is created with its profile the first time, its profile fields updated when a request
carries them, and ``last_seen`` moved forward. Touching never fails a request: a store error is logged.

An identity belongs to the workspace of the key that named it, as orq's contacts do: two workspaces' ``user-42``
are two identities (stored, listed and budgeted apart), named ``<workspace>/<id>`` where one name must hold both.

Two stores with one interface: ``MemoryIdentityStore`` (bounded in count and bytes, least recently seen evicted
first) and ``RedisIdentityStore`` (hash ``eg:id:<workspace>/<id>``, plus a sorted set of those names by last-seen
time for listing).
"""

from __future__ import annotations

import builtins
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["Identity", "IdentityStore", "MemoryIdentityStore", "RedisIdentityStore", "identity_store"]

log = structlog.get_logger("embedgate.identities")

PROFILE_FIELDS = ("display_name", "email", "metadata", "logo_url", "tags")


@dataclass(frozen=True, kw_only=True, slots=True)
class Identity:
    """One identity record; ``first_seen``/``last_seen`` are Unix timestamps (seconds)."""

    id: str
    workspace: str = ""
    display_name: str | None = None
    email: str | None = None
    metadata: Any = None  # JSON: orq sends a list of objects, others a mapping
    logo_url: str | None = None
    tags: tuple[str, ...] = ()
    first_seen: float = 0.0
    last_seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the admin endpoint and CLI)."""
        return {
            "id": self.id,
            "workspace": self.workspace,
            "display_name": self.display_name,
            "email": self.email,
            "metadata": self.metadata,
            "logo_url": self.logo_url,
            "tags": list(self.tags),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


class IdentityStore(Protocol):
    """Where identities live."""

    async def touch(self, identity: Mapping[str, Any], workspace: str) -> None:
        """Create the workspace's identity on first sight, else update its given profile and last_seen; never
        raises."""
        ...

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        """One identity of a workspace, or None."""
        ...

    async def list(self, limit: int = 100) -> builtins.list[Identity]:
        """Up to ``limit`` identities, most recently seen first."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def _profile(identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The given profile fields of a request's identity, with its id; None when it has no usable id."""
    iid = identity.get("id")
    if not isinstance(iid, str) or not iid:
        return None
    out: dict[str, Any] = {"id": iid}
    for key in PROFILE_FIELDS:
        if identity.get(key) is not None:
            out[key] = tuple(identity[key]) if key == "tags" else identity[key]
    return out


class MemoryIdentityStore:
    """In-process identities, bounded: beyond ``max_entries`` identities, or ``max_bytes`` of profiles, the least
    recently seen is forgotten. Profiles are kept as their JSON text, field by field, not as Python objects: 8 KiB of
    JSON (``[{}, {}, ...]``) took ~192 KiB as objects, and 100,000 such identities ~20 GB."""

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # (workspace, id) -> (profile fields as JSON, first_seen, last_seen, bytes counted); least recently seen first
        self._items: OrderedDict[tuple[str, str], tuple[dict[str, bytes], float, float, int]] = OrderedDict()
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    async def touch(self, identity: Mapping[str, Any], workspace: str) -> None:
        """See ``IdentityStore.touch``."""
        profile = _profile(identity)
        if profile is None:
            log.warning("identity without a usable id ignored")
            return
        iid = profile.pop("id")
        now = self._clock()
        # Copied to their size: orjson's bytes keep the buffer they were written in (~520 KB for 8 KB of "{},").
        fields = {k: memoryview(orjson.dumps(v)).tobytes() for k, v in profile.items()}
        old = self._items.pop((workspace, iid), None)
        first = now
        if old is not None:
            self._bytes -= old[3]
            fields = {**old[0], **fields}
            first = old[1]
        size = _ENTRY_OVERHEAD + len(workspace) + len(iid) + sum(len(v) for v in fields.values())
        self._items[workspace, iid] = (fields, first, now, size)
        self._bytes += size
        while len(self._items) > self._max or self._bytes > self._max_bytes:
            self._bytes -= self._items.popitem(last=False)[1][3]

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        """See ``IdentityStore.get``."""
        kept = self._items.get((workspace, identity_id))
        return None if kept is None else _record(workspace, identity_id, kept[0], kept[1], kept[2])

    async def list(self, limit: int = 100) -> builtins.list[Identity]:
        """See ``IdentityStore.list``."""
        out: builtins.list[Identity] = []
        for (workspace, iid), kept in reversed(self._items.items()):
            if len(out) >= limit:
                break
            out.append(_record(workspace, iid, kept[0], kept[1], kept[2]))
        return out

    async def aclose(self) -> None:
        """Nothing to release."""


_RETRY_AFTER_S = 1.0  # touches skipped after a failed write
_WARN_EVERY_S = 10.0  # at most one warning of a failed write this often
_ENTRY_OVERHEAD = 400  # bytes an identity takes in memory besides its id and profile text (dicts, tuple, floats)


def _record(
    workspace: str, identity_id: str, fields: Mapping[str, Any], first_seen: float, last_seen: float
) -> Identity:
    """An identity from its profile fields' JSON."""
    profile = {k: orjson.loads(fields[k]) for k in PROFILE_FIELDS if k in fields}
    if "tags" in profile:
        profile["tags"] = tuple(profile["tags"])
    return Identity(id=identity_id, workspace=workspace, **profile, first_seen=first_seen, last_seen=last_seen)


class RedisIdentityStore:
    """Identities in Redis: hash ``<prefix><workspace>/<id>`` and a sorted set ``<index_key>`` of those names by
    last-seen time.

    ``touch`` writes at most once per ``touch_interval_s`` per identity from this process while its profile stays
    the one last written, so a busy identity costs one write per interval, not one per request (``last_seen`` is
    that accurate); a changed profile is written at once.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "eg:id:",
        index_key: str = "eg:idx:last_seen",
        touch_interval_s: float = 30.0,
        socket_timeout: float = 1.0,
        max_connections: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # A pool that makes a touch wait (up to the socket timeout) for a free connection: redis-py's default one
        # failed every touch past its 100 connections at once (150 new identities at once: 50 not recorded).
        self._pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),  # a lost touch is harmless; a request waiting on retries is not
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._prefix = prefix
        self._index = index_key
        self._interval = touch_interval_s
        self._clock = clock
        self._recent: dict[str, tuple[int, float]] = {}  # id -> the hash of the profile it last wrote, and when
        # After a failed write, touches are skipped for a second (as the cache's store is): with Redis stalled, each
        # request with an identity waited its own timeout (1 s) before the budget's, and logged a warning.
        self._down_until = -math.inf
        self._warned_at = -math.inf

    async def touch(self, identity: Mapping[str, Any], workspace: str) -> None:
        """See ``IdentityStore.touch``."""
        profile = _profile(identity)
        if profile is None:
            log.warning("identity without a usable id ignored")
            return
        if time.monotonic() < self._down_until:
            return
        bare = profile.pop("id")
        iid = f"{workspace}/{bare}"
        now = self._clock()
        # Its hash, not the text: orjson's bytes keep the buffer they were written in (~520 KB for 8 KB of JSON).
        written = hash(orjson.dumps(profile, option=orjson.OPT_SORT_KEYS))
        last = self._recent.get(iid)
        if last is not None and last[0] == written and now - last[1] < self._interval:
            return
        if len(self._recent) >= 10_000:  # a bounded memo: forget it all rather than grow without end
            self._recent.clear()
        fields: dict[Any, Any] = {k: orjson.dumps(v) for k, v in profile.items()}
        fields.update(id=bare, workspace=workspace, last_seen=repr(now))
        key = self._prefix + iid
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, "first_seen", repr(now))
                pipe.hset(key, mapping=fields)
                pipe.zadd(self._index, {iid: now})
                await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            failed_at = time.monotonic()
            # Redis unreachable or stalled: skip writes for a second. An error of this identity's own (a key of
            # another type under its name, say) stops no other identity's writes.
            unreachable = not isinstance(exc, aioredis.ResponseError)
            if unreachable:
                self._down_until = failed_at + _RETRY_AFTER_S
            if failed_at - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = failed_at
                what = ("identity store unavailable; identities not recorded (tried again after a second)"
                        if unreachable else "identity not recorded")  # fmt: skip
                log.warning(what, error=f"{type(exc).__name__}: {exc}")
            return
        self._recent[iid] = (written, now)

    async def get(self, workspace: str, identity_id: str) -> Identity | None:
        """See ``IdentityStore.get``; a store failure raises ``ConnectionError``."""
        try:
            raw: Any = await self._redis.hgetall(f"{self._prefix}{workspace}/{identity_id}")
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise ConnectionError(f"identity store unavailable: {type(exc).__name__}") from exc
        return _decode(raw) if raw else None

    async def list(self, limit: int = 100) -> builtins.list[Identity]:
        """See ``IdentityStore.list``; a store failure raises ``ConnectionError``."""
        if limit <= 0:
            return []
        try:
            ids = [_text(i) for i in await self._redis.zrevrange(self._index, 0, limit - 1)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for iid in ids:
                    pipe.hgetall(self._prefix + iid)
                rows: Any = await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise ConnectionError(f"identity store unavailable: {type(exc).__name__}") from exc
        # an id whose hash was deleted by hand is skipped
        return [_decode(raw) for raw in rows if raw]

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
        await self._pool.disconnect()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _decode(raw: Mapping[Any, Any]) -> Identity:
    fields = {_text(k): v for k, v in raw.items()}
    return _record(_text(fields.get("workspace", b"")), _text(fields.get("id", b"")), fields,
                   float(fields.get("first_seen", b"0")), float(fields.get("last_seen", b"0")))  # fmt: skip


def identity_store(redis_url: str = "") -> MemoryIdentityStore | RedisIdentityStore:
    """The identity store for a config's ``redis_url`` (empty: in process memory)."""
    return RedisIdentityStore(redis_url) if redis_url else MemoryIdentityStore()
