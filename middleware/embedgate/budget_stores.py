"""Budget stores: the counters behind the budget engine, in process memory or in Redis.

Both implement the small ``BudgetStore`` protocol and pass one contract test (``tests/test_budget_store.py``).
``MemoryBudgetStore`` serves one process and is atomic because nothing awaits between check and increment;
``RedisBudgetStore`` runs one Lua script per operation (EVALSHA), so a check-and-reserve across every applicable
counter is atomic across any number of processes sharing the server.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Final, Protocol

from .resp import LeanRedis, RespError, Script

__all__ = [
    "NEVER_MS",
    "BudgetStore",
    "BudgetStoreError",
    "CounterSpec",
    "MemoryBudgetStore",
    "ReadResult",
    "RedisBudgetStore",
    "ReserveResult",
    "WindowSpec",
    "budget_store",
]


# "Listed until" of an index id whose budget never resets (one_time): 2**53 ms, exact as a Redis score (a double).
NEVER_MS: Final = 2**53


class BudgetStoreError(Exception):
    """The budget store could not be reached or answered an error (foreign errors are translated to this).

    ``maybe_ran``: whether the operation may have changed the store all the same (its command went out, and its
    answer was lost); False when it never reached the store, or the store said it changed nothing."""

    def __init__(self, message: str, *, maybe_ran: bool = True) -> None:
        super().__init__(message)
        self.maybe_ran = maybe_ran


class _Record:
    """Equality and repr over ``_fields`` (as a NamedTuple names them), for the small value classes below.

    They were NamedTuples, whose ``__new__`` runs as Python (four calls on every budgeted request); as plain
    classes they compile with the module and keep their fields, positional construction, equality and repr (not
    tuple unpacking)."""

    _fields: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({fields})"


class CounterSpec(_Record):
    """A period counter to check and increment: admitted when ``value + amount <= limit``.

    ``ttl_s``: the expiry set on every write; 0: never expires (one_time budgets)."""

    _fields = ("key", "amount", "limit", "ttl_s")

    def __init__(self, key: str, amount: int, limit: int, ttl_s: int) -> None:
        self.key = key
        self.amount = amount
        self.limit = limit
        self.ttl_s = ttl_s


class WindowSpec(_Record):
    """A rolling request window: admitted when fewer than ``limit`` requests are in the last ``window_ms``."""

    _fields = ("key", "limit")

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self.limit = limit


class ReserveResult(_Record):
    """What a reserve saw. ``failed``: the first refusing spec (counters, then windows), -1 if admitted.

    ``values``/``counts`` are after the reservation when admitted, unchanged when refused. ``marks[i]`` is the
    timestamp (ms) of the request whose leaving lets window ``i`` admit one more (None: the window is empty).

    ``epoch`` (optional): the store's own token for the counters' current life (see ``adjust``).
    """

    _fields = ("failed", "values", "counts", "marks")

    def __init__(self, failed: int, values: tuple[int, ...], counts: tuple[int, ...],
                 marks: tuple[int | None, ...], epoch: int | None = None) -> None:  # fmt: skip
        self.failed = failed
        self.values = values
        self.counts = counts
        self.marks = marks
        self.epoch = epoch


class ReadResult(_Record):
    """Current counter values, window counts and oldest timestamps (ms) in each window."""

    _fields = ("values", "counts", "oldest")

    def __init__(self, values: tuple[int, ...], counts: tuple[int, ...], oldest: tuple[int | None, ...]) -> None:
        self.values = values
        self.counts = counts
        self.oldest = oldest


class BudgetStore(Protocol):
    """Where budget counters live. Every method raises only ``BudgetStoreError`` for store failures."""

    async def reserve(
        self,
        counters: Sequence[CounterSpec],
        windows: Sequence[WindowSpec],
        *,
        now_ms: int,
        window_ms: int,
        member: str,
        index: Sequence[tuple[str, str, int]] = (),
    ) -> ReserveResult:
        """Atomically: check every spec; if all fit, add the amounts, add ``member`` at ``now_ms`` to every
        window and record each ``(set, id, until_ms)`` of ``index``: the id is listed in its set until that time
        (the later one, if recorded before; ``NEVER_MS`` for ids of budgets that never reset); else change
        nothing. Ids whose time has passed are dropped."""
        ...

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int, epoch: int | None = None) -> None:
        """Add each delta to its counter if the counter still exists, unless it would take it below zero.

        A settle or a release returns at most what its own reserve added, so a counter lower than that no longer
        holds the reserve: Redis lost its data (a restart) and the counter started again since. Taking the amount
        from the new counter would let the budget be overspent by it. ``epoch``, passed when the reserve returned
        one: the adjust changes nothing unless the counters are still in that life (a store that can lose its
        data tells it so: the Redis store)."""
        ...

    async def undo_lost(self, counters: Sequence[CounterSpec], windows: Sequence[WindowSpec], *, member: str) -> bool:
        """Undo the reserve of ``member`` whose answer was lost (its connection cut after the store ran it, say), if
        it ran and admitted: take each counter's amount back and ``member`` out of each window. Whether it undid one.
        Run once the store answers again; a store that always answers within the call (memory) has none to undo."""
        ...

    async def read(self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int) -> ReadResult:
        """Read counters and windows without changing them."""
        ...

    async def members(self, key: str, limit: int, *, now_ms: int) -> list[str]:
        """At most ``limit`` of the ids listed in one index set at ``now_ms`` (the concrete ids seen by a ``*``
        budget while their counters live), sorted."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers (for ``/readyz``)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class _Window:
    """A rolling window's sorted request timestamps (ms), trimmed from the front in amortized O(1).

    A plain list would shift every remaining entry on each trim: O(requests per window) per request, which at a
    100,000-requests-per-minute budget is the whole cost of a request.
    """

    __slots__ = ("stamps", "start")

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.start = 0  # stamps[:start] have left the window

    def __len__(self) -> int:
        return len(self.stamps) - self.start

    def __getitem__(self, rank: int) -> int:
        return self.stamps[self.start + rank]

    def trim(self, cutoff_ms: int) -> None:
        """Forget the timestamps at or before ``cutoff_ms``."""
        stamps = self.stamps
        if self.start < len(stamps) and stamps[self.start] <= cutoff_ms:
            self.start = bisect.bisect_right(stamps, cutoff_ms, lo=self.start)
            if self.start > 1024 and self.start * 2 > len(stamps):  # compact, rarely
                del stamps[: self.start]
                self.start = 0

    def clamp(self, now_ms: int) -> None:
        """Date the timestamps after ``now_ms`` at ``now_ms``: the clock stepped back (an NTP step), and they would
        count in the window (and refuse requests) for the size of the step on top of the window."""
        stamps = self.stamps
        i = len(stamps) - 1
        while i >= self.start and stamps[i] > now_ms:
            stamps[i] = now_ms
            i -= 1

    def add(self, now_ms: int) -> None:
        """Record one request at ``now_ms`` (clocks may step back a little: keep the order)."""
        if not self.stamps or now_ms >= self.stamps[-1]:
            self.stamps.append(now_ms)
        else:
            bisect.insort(self.stamps, now_ms, lo=self.start)


class MemoryBudgetStore:
    """In-process counters. Atomic by construction: no ``await`` between a check and its increment."""

    SWEEP_EVERY = 1024  # reserves between sweeps of expired counters and empty windows

    def __init__(self) -> None:
        self._counters: dict[str, tuple[int, int | None]] = {}  # key -> (value, expires at ms or None)
        self._windows: dict[str, _Window] = {}  # key -> the request timestamps in its rolling window
        self._sets: dict[str, dict[str, int]] = {}  # index set -> id -> listed until (ms)
        self._ops = 0

    def _value(self, key: str, now_ms: int) -> int:
        entry = self._counters.get(key)
        if entry is None or (entry[1] is not None and entry[1] <= now_ms):
            return 0
        return entry[0]

    def _window(self, key: str, now_ms: int, window_ms: int) -> _Window:
        log_ = self._windows.get(key)
        if log_ is None:
            return _Window()
        # the same bound as the Redis script's ZREMRANGEBYSCORE -inf cutoff (inclusive)
        log_.trim(now_ms - window_ms)
        if log_.stamps and log_.stamps[-1] > now_ms:
            log_.clamp(now_ms)
        return log_

    def _sweep(self, now_ms: int, window_ms: int) -> None:
        self._counters = {k: v for k, v in self._counters.items() if v[1] is None or v[1] > now_ms}
        # A window whose newest request has left it is empty (kept, ids clients make up would pile up for ever).
        cutoff = now_ms - window_ms
        self._windows = {k: v for k, v in self._windows.items() if v.stamps and v.stamps[-1] > cutoff}
        for key, ids in list(self._sets.items()):
            kept = {i: until for i, until in ids.items() if until > now_ms}
            if kept:
                self._sets[key] = kept
            else:
                del self._sets[key]

    async def reserve(
        self,
        counters: Sequence[CounterSpec],
        windows: Sequence[WindowSpec],
        *,
        now_ms: int,
        window_ms: int,
        member: str,
        index: Sequence[tuple[str, str, int]] = (),
    ) -> ReserveResult:
        """See ``BudgetStore.reserve``."""
        self._ops += 1
        if self._ops % self.SWEEP_EVERY == 0:
            self._sweep(now_ms, window_ms)
        # Plain index loops, no generators or zip(): this runs on every request (a few specs each).
        failed = -1
        n, m = len(counters), len(windows)
        values: list[int] = []
        for i in range(n):
            c = counters[i]
            value = self._value(c.key, now_ms)
            values.append(value)
            if failed < 0 and value + c.amount > c.limit:
                failed = i
        logs = [self._window(windows[j].key, now_ms, window_ms) for j in range(m)]
        if failed < 0:
            for j in range(m):
                if len(logs[j]) + 1 > windows[j].limit:
                    failed = n + j
                    break
        if failed < 0:
            for i in range(n):
                c = counters[i]
                values[i] += c.amount
                self._counters[c.key] = (values[i], now_ms + c.ttl_s * 1000 if c.ttl_s > 0 else None)
            for j in range(m):
                lg = logs[j]
                lg.add(now_ms)
                self._windows[windows[j].key] = lg
            for set_key, member_id, until in index:
                ids = self._sets.setdefault(set_key, {})
                if ids.get(member_id, 0) < until:
                    ids[member_id] = until
        counts: list[int] = []
        marks: list[int | None] = []
        for j in range(m):
            lg = logs[j]
            counts.append(len(lg))
            marks.append(_mark(lg, windows[j].limit))
        return ReserveResult(failed, tuple(values), tuple(counts), tuple(marks))

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int, epoch: int | None = None) -> None:
        """See ``BudgetStore.adjust`` (counters in this process's memory have one life: no epoch)."""
        for key, delta in deltas:
            entry = self._counters.get(key)
            if entry is not None and (entry[1] is None or entry[1] > now_ms) and entry[0] + delta >= 0:
                self._counters[key] = (entry[0] + delta, entry[1])

    async def undo_lost(self, counters: Sequence[CounterSpec], windows: Sequence[WindowSpec], *, member: str) -> bool:
        """See ``BudgetStore.undo_lost``: a reserve here answers within its call, never lost."""
        return False

    async def read(self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int) -> ReadResult:
        """See ``BudgetStore.read``."""
        logs = [self._window(w, now_ms, window_ms) for w in windows]
        return ReadResult(
            tuple(self._value(k, now_ms) for k in counters),
            tuple(len(lg) for lg in logs),
            tuple(lg[0] if lg else None for lg in logs),
        )

    async def members(self, key: str, limit: int, *, now_ms: int) -> list[str]:
        """See ``BudgetStore.members``."""
        return sorted(i for i, until in self._sets.get(key, {}).items() if until > now_ms)[:limit]

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    async def aclose(self) -> None:
        """Nothing to release."""


def _mark(log_: _Window, limit: int) -> int | None:
    # The window admits one more once count < limit, i.e. once the entry at rank count - limit has left.
    rank = max(0, len(log_) - limit)
    return log_[rank] if rank < len(log_) else None


_EPOCH: Final = "epoch"  # the key (under the prefix) of the counters' current life: see _RESERVE and _ADJUST
_MARK: Final = "r:"  # the key (under the prefix, before the member) of an admitted reserve's mark: see _UNDO_LOST
#: How long an admitted reserve's mark is kept: a reserve whose answer was lost is undone if Redis answers within it.
_UNDO_WINDOW_MS: Final = 30_000
_SCAN_COUNT: Final = 1000  # set members read per ZSCAN step (each step is one bounded Redis command)
_MAX_SCAN_STEPS: Final = 1000
_CLOCK_READ_MS: Final = 60_000  # how often Redis's clock is read again (for the reserve's deadline)
_CLOCK_READ_MAX_RTT_MS: Final = 20  # a TIME answer slower than this is not trusted for the offset (see _deadline)
_CLOCK_REREAD_SLOW_MS: Final = 5000  # after such an answer, the clock is read again this much later

# KEYS: n counters, m windows, k index sets (sorted sets: id -> listed until, ms). ARGV: n, m, k, now_ms, window_ms,
# member, then amount, limit, ttl per counter, limit per window, id and until per index set, NEVER_MS, and last the
# deadline: Redis's own time (ms) after which the caller has given up on this reserve, which then changes nothing
# and answers {-1}.
_RESERVE = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME, then writes: Redis < 5 needs it
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[#ARGV]) then return {-1} end
-- its mark says an undo came first (its answer lost, the caller gone): it must change nothing
if redis.call('GET', KEYS[#KEYS - 1]) == 'undone' then return {-1} end
local n, m, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, window, member = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local failed, values, counts = 0, {}, {}
for i = 1, n do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  values[i] = v
  if failed == 0 and v + tonumber(ARGV[4 + 3 * i]) > tonumber(ARGV[5 + 3 * i]) then failed = i end
end
local wa = 7 + 3 * n
for j = 1, m do
  local key = KEYS[n + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
  -- dated over 5 s after now (a clock stepped back): now, or they would hold the window shut that long; not within
  -- it, where replicas' clocks differ (re-dated by the one behind, the others' entries would leave early)
  local ahead = redis.call('ZRANGEBYSCORE', key, string.format('(%d', now + 5000), '+inf')
  for a = 1, #ahead do redis.call('ZADD', key, ARGV[4], ahead[a]) end
  counts[j] = redis.call('ZCARD', key)
  if failed == 0 and counts[j] + 1 > tonumber(ARGV[wa + j - 1]) then failed = n + j end
end
if failed == 0 then
  for i = 1, n do
    values[i] = redis.call('INCRBY', KEYS[i], ARGV[4 + 3 * i])
    local ttl = tonumber(ARGV[6 + 3 * i])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
  for j = 1, m do
    redis.call('ZADD', KEYS[n + j], ARGV[4], member)
    redis.call('PEXPIRE', KEYS[n + j], window + 1000)
    counts[j] = counts[j] + 1
  end
  for s = 1, k do
    local key, id, untl = KEYS[n + m + s], ARGV[wa + m + 2 * s - 2], tonumber(ARGV[wa + m + 2 * s - 1])
    local left = redis.call('PTTL', key)  -- < 0: a new set, or one kept for good by a one_time budget since removed
    local old = redis.call('ZSCORE', key, id)
    if not old or tonumber(old) < untl then redis.call('ZADD', key, string.format('%d', untl), id) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
    -- every id of a set is given the same time by the same budgets: the whole set ends with the newest id's
    -- only ever later: a replica whose clock is behind (or stepped back) would cut the listing of the others' ids
    if untl >= tonumber(ARGV[#ARGV - 1]) then redis.call('PERSIST', key)
    elseif left < untl - now then redis.call('PEXPIRE', key, untl - now) end
  end
end
local out = {failed}
for i = 1, n do out[#out + 1] = values[i] end
for j = 1, m do out[#out + 1] = counts[j] end
for j = 1, m do
  local rank = counts[j] - tonumber(ARGV[wa + j - 1])
  if rank < 0 then rank = 0 end
  local e = redis.call('ZRANGE', KEYS[n + j], rank, rank, 'WITHSCORES')
  if e[2] then out[#out + 1] = tonumber(e[2]) else out[#out + 1] = -1 end
end
-- the counters' life: set by the first reserve after Redis lost its data (or ever), read by the adjusts
local epoch = redis.call('GET', KEYS[#KEYS])
if not epoch then
  epoch = ARGV[#ARGV - 2]
  redis.call('SET', KEYS[#KEYS], epoch)
end
-- what an admitted reserve did, should its answer be lost: _UNDO_LOST takes it back (see RedisBudgetStore.undo_lost)
if failed == 0 then redis.call('SET', KEYS[#KEYS - 1], epoch, 'PX', UNDO_WINDOW_MS) end
out[#out + 1] = epoch
return out
""".replace("UNDO_WINDOW_MS", str(_UNDO_WINDOW_MS))

# KEYS: the reserve's mark, n counters, windows, the epoch key; ARGV: n, the amount per counter, the member. Only a
# reserve that admitted left its mark, in the counters' life it names: the amounts go back (not below 0, as _ADJUST)
# and the member leaves the windows, once. The mark then reads 'undone', as it does when the undo comes first (the
# reserve still on its way): the reserve, should it come later, changes nothing. Answers {1} if it undid one.
_UNDO_LOST = """
local epoch = redis.call('GET', KEYS[1])
if epoch == 'undone' then return {0} end
redis.call('SET', KEYS[1], 'undone', 'PX', UNDO_WINDOW_MS)
if not epoch or redis.call('GET', KEYS[#KEYS]) ~= epoch then return {0} end
local n = tonumber(ARGV[1])
for i = 1, n do
  local v = redis.call('GET', KEYS[1 + i])
  if v and tonumber(v) - tonumber(ARGV[1 + i]) >= 0 then redis.call('DECRBY', KEYS[1 + i], ARGV[1 + i]) end
end
for j = 2 + n, #KEYS - 1 do redis.call('ZREM', KEYS[j], ARGV[#ARGV]) end
return {1}
""".replace("UNDO_WINDOW_MS", str(_UNDO_WINDOW_MS))

# KEYS: counters, then the epoch key; ARGV: one delta per counter, then the reserve's epoch ('' for none). Nothing
# changes unless the counters are in that epoch (Redis lost its data since: the new ones never held the reserve);
# a missing (expired) counter is left alone, and so is one the delta would take below 0 (see BudgetStore.adjust).
_ADJUST = """
if ARGV[#ARGV] ~= '' and redis.call('GET', KEYS[#KEYS]) ~= ARGV[#ARGV] then return {} end
for i = 1, #KEYS - 1 do
  local v = redis.call('GET', KEYS[i])
  if v and tonumber(v) + tonumber(ARGV[i]) >= 0 then redis.call('INCRBY', KEYS[i], ARGV[i]) end
end
return {}
"""

# KEYS: n counters then windows; ARGV: n, now_ms, window_ms. Read-only.
_READ = """
local n, cutoff = tonumber(ARGV[1]), string.format('(%d', tonumber(ARGV[2]) - tonumber(ARGV[3]))
local out = {}
for i = 1, n do out[#out + 1] = tonumber(redis.call('GET', KEYS[i]) or '0') end
local oldest = {}
for j = n + 1, #KEYS do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[j], cutoff, '+inf')
  local e = redis.call('ZRANGEBYSCORE', KEYS[j], cutoff, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if e[2] then oldest[#oldest + 1] = tonumber(e[2]) else oldest[#oldest + 1] = -1 end
end
for _, v in ipairs(oldest) do out[#out + 1] = v end
return out
"""


class RedisBudgetStore:
    """Counters in Redis, shared by any number of proxy processes; one Lua script per operation.

    Keys are ``<prefix><engine key>`` (prefix ``eg:b:``). All keys of one operation must live on one server:
    a single Redis (or a primary with replicas), not a Redis Cluster. Commands are not retried: a retried
    reserve or adjust could apply twice; a failure is a ``BudgetStoreError`` and the engine decides.
    """

    def __init__(self, redis_url: str, *, prefix: str = "eg:b:", socket_timeout: float = 1.0) -> None:
        # One pipelined connection (embedgate.resp), not redis-py's pool: a reserve and a settle run on every
        # budgeted request, and through redis-py each cost ~80-110 us of CPU against ~10-17 us here. A command not
        # answered within socket_timeout fails (and drops the connection, reopened by the next command).
        self._redis = LeanRedis(redis_url, timeout=socket_timeout)
        self._timeout_ms = socket_timeout * 1000
        self._offset_ms = 0.0  # Redis's clock minus our monotonic clock, read with TIME (see _deadline)
        self._offset_read_at = -math.inf
        self._prefix = prefix
        self._reserve = Script(_RESERVE)  # EVALSHA, loading the script on NOSCRIPT
        self._adjust = Script(_ADJUST)
        self._undo_lost = Script(_UNDO_LOST)
        self._read = Script(_READ)
        #: Why the last ``ping`` failed (None after one that did not).
        self.last_error: str | None = None

    async def _call(self, script: Script, keys: list[str], args: list[Any]) -> list[int]:
        written = [False]
        try:
            result = await self._redis.evalsha(script, keys, args, written=written)
        except (RespError, OSError, TimeoutError) as exc:
            # An error reply: the script did not run (or stopped on an error of its own, before its last writes)
            ran = written[0] and not isinstance(exc, RespError)
            raise BudgetStoreError(f"{type(exc).__name__}: {exc}", maybe_ran=ran) from exc
        return [int(v) for v in result]

    async def reserve(
        self,
        counters: Sequence[CounterSpec],
        windows: Sequence[WindowSpec],
        *,
        now_ms: int,
        window_ms: int,
        member: str,
        index: Sequence[tuple[str, str, int]] = (),
    ) -> ReserveResult:
        """See ``BudgetStore.reserve``."""
        p = self._prefix
        keys = [p + c.key for c in counters] + [p + w.key for w in windows] + [p + s for s, _, _ in index]
        keys += (p + _MARK + member, p + _EPOCH)
        args: list[Any] = [len(counters), len(windows), len(index), now_ms, window_ms, member]
        for c in counters:
            args += [c.amount, c.limit, c.ttl_s]
        args += [w.limit for w in windows]
        for _, member_id, until in index:
            args += [member_id, until]
        # a new epoch, should this reserve be the first since Redis lost its data (below 2**53: exact in Lua)
        args += [random.getrandbits(52) + 1, NEVER_MS, await self._deadline()]
        out = await self._call(self._reserve, keys, args)
        if out[0] < 0:  # it reached Redis past its deadline (or after its undo) and changed nothing
            raise BudgetStoreError("Redis ran the reserve too late to answer it in time", maybe_ran=False)
        n, m = len(counters), len(windows)
        marks = tuple(None if v < 0 else v for v in out[1 + n + m : 1 + n + 2 * m])
        return ReserveResult(out[0] - 1, tuple(out[1 : 1 + n]), tuple(out[1 + n : 1 + n + m]), marks, out[-1])

    async def _deadline(self) -> int:
        """The time, on Redis's clock (ms), after which a reserve sent now must change nothing: before this store
        gives up waiting for its answer (80% of the timeout). A command unanswered in time fails here while still
        on its way (Redis stalled: a slow command, a fork); run later, it would keep a refused request's tokens
        reserved until the period's end. Redis's clock is read with TIME once a minute, against this process's
        monotonic clock: a step of the wall clock (NTP) made the offset wrong until its next reading, and every
        reserve meanwhile late, a 503 (stepped back by an hour: an hour of them)."""
        now = time.monotonic() * 1000
        if now - self._offset_read_at > _CLOCK_READ_MS:
            try:
                seconds, micros = await self._redis.execute("TIME")
            except (RespError, OSError, TimeoutError) as exc:  # (before the reserve went out)
                raise BudgetStoreError(f"{type(exc).__name__}: {exc}", maybe_ran=False) from exc
            after = time.monotonic() * 1000
            redis_ms = int(seconds) * 1000 + int(micros) / 1000
            if after - now <= _CLOCK_READ_MAX_RTT_MS:
                self._offset_ms = redis_ms - (now + after) / 2
                self._offset_read_at = after
            else:
                # A slow answer (Redis stalled, or far away): Redis read its clock anywhere within the wait, so the
                # offset lies between these two. One held that agrees (a fast reading's, whose own error is up to
                # the fast bound) is kept, and read again in a minute: replaced by the wait's end, a stall's whole
                # wait early, it made every reserve "late". One that does not (none yet, a clock stepped, an
                # earlier stall's) is replaced by the end: the deadline can then only come early (a late reserve
                # refused), never late (one the client was refused, still charged); read again in a few seconds,
                # not by every reserve (a distant Redis cost each request two round trips).
                low, high = redis_ms - after, redis_ms - now
                slack = _CLOCK_READ_MAX_RTT_MS
                if self._offset_read_at != -math.inf and low - slack <= self._offset_ms <= high + slack:
                    self._offset_read_at = after
                else:
                    self._offset_ms = low
                    self._offset_read_at = after - _CLOCK_READ_MS + _CLOCK_REREAD_SLOW_MS
            now = after
        return int(now + self._offset_ms + 0.8 * self._timeout_ms)

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int, epoch: int | None = None) -> None:
        """See ``BudgetStore.adjust``."""
        deltas = [(k, d) for k, d in deltas if d]
        if deltas:
            keys = [self._prefix + k for k, _ in deltas] + [self._prefix + _EPOCH]
            args: list[Any] = [d for _, d in deltas] + ["" if epoch is None else epoch]
            await self._call(self._adjust, keys, args)

    async def undo_lost(self, counters: Sequence[CounterSpec], windows: Sequence[WindowSpec], *, member: str) -> bool:
        """See ``BudgetStore.undo_lost``: through the mark an admitted reserve leaves for ``_UNDO_WINDOW_MS``."""
        p = self._prefix
        keys = [p + _MARK + member, *[p + c.key for c in counters], *[p + w.key for w in windows], p + _EPOCH]
        out = await self._call(self._undo_lost, keys, [len(counters), *[c.amount for c in counters], member])
        return out == [1]

    async def read(self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int) -> ReadResult:
        """See ``BudgetStore.read``."""
        keys = [self._prefix + k for k in (*counters, *windows)]
        out = await self._call(self._read, keys, [len(counters), now_ms, window_ms])
        n, m = len(counters), len(windows)
        oldest = tuple(None if v < 0 else v for v in out[n + m :])
        return ReadResult(tuple(out[:n]), tuple(out[n : n + m]), oldest)

    async def members(self, key: str, limit: int, *, now_ms: int) -> list[str]:
        """See ``BudgetStore.members``: read with ZSCAN, a bounded step at a time (reading a set of millions of
        identities at once held Redis for ~0.5 s, and every budget check with it), until ``limit`` are in hand."""
        found: set[bytes] = set()
        cursor = b"0"
        try:
            for _ in range(_MAX_SCAN_STEPS):
                cursor, page = await self._redis.execute("ZSCAN", self._prefix + key, cursor, "COUNT", _SCAN_COUNT)
                found.update(page[i] for i in range(0, len(page) - 1, 2) if float(page[i + 1]) > now_ms)
                if cursor == b"0" or len(found) >= limit:
                    break
        except (RespError, OSError, TimeoutError) as exc:
            raise BudgetStoreError(f"{type(exc).__name__}: {exc}") from exc
        return sorted(m.decode() for m in found)[:limit]

    async def ping(self) -> bool:
        """Whether Redis answers a PING; ``last_error`` says why not (``/readyz`` shows it)."""
        try:
            ok = bool(await self._redis.execute("PING") == b"PONG")
        except (RespError, OSError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"  # Redis's own words: no URL, no password
            return False
        self.last_error = None if ok else "Redis did not answer PONG"
        return ok

    async def aclose(self) -> None:
        """Close the connection."""
        await self._redis.aclose()


def budget_store(redis_url: str = "") -> MemoryBudgetStore | RedisBudgetStore:
    """The budget store for a config's ``redis_url`` (empty: in process memory, for one process only)."""
    return RedisBudgetStore(redis_url) if redis_url else MemoryBudgetStore()
