"""Budgets (SPEC section 7): every applicable budget is a hard gate, the most restrictive wins per dimension.

A request is reserved before its upstream call and settled after it:

    engine.reserve(subject, tokens=estimate, cost_usd=cost)  -> Reservation  (or BudgetExceeded / Unavailable)
    engine.settle(reservation, tokens=real, cost_usd=real)   after the upstream answered
    engine.release(reservation)                              when it failed (the request stays rate-counted)

The reservation checks and increments every applicable counter in one atomic step of the store (all or
nothing), so no interleaving of requests, in one process or many sharing Redis, admits more than a budget's
worth. Counters: tokens and cost per UTC calendar period (the period start is part of the key, so a new
period starts at zero), and a rolling window of request timestamps per ``requests_per_minute`` budget.
Cost is counted in integer nano-dollars: embedding prices are tiny (a 30-token request to a $0.02/M model
costs 0.6 micro-dollars), so micro-dollars would round most requests away, and integers keep the sums exact
(Lua numbers are doubles: exact up to 2**53 nano-dollars, about 9 million USD per counter and period).

Stores, behind the small ``BudgetStore`` protocol and one contract test: ``MemoryBudgetStore`` (one process;
atomic because nothing awaits between check and increment) and ``RedisBudgetStore`` (one Lua script per
operation, run with EVALSHA, so the check-and-reserve is atomic across any number of processes).
"""

from __future__ import annotations

import bisect
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from embedgate.config import BudgetConfig, Deployment, ModelConfig
from embedgate.errors import BudgetExceeded, Unavailable

__all__ = [
    "BUILTIN_PRICES",
    "IMAGE_TOKEN_ALLOWANCE",
    "BudgetEngine",
    "BudgetStore",
    "BudgetStoreError",
    "CounterSpec",
    "MemoryBudgetStore",
    "ReadResult",
    "RedisBudgetStore",
    "Reservation",
    "ReserveResult",
    "Subject",
    "WindowSpec",
    "budget_store",
    "cost_usd",
    "estimate_tokens",
    "model_price",
    "period_bounds",
]

log = structlog.get_logger("embedgate.budgets")

NANO = 1_000_000_000  # nano-dollars per USD
# Counters outlive their period by this much, so a request spanning the rollover still settles.
PERIOD_GRACE_S = 3600
# BOS/EOS, or a leading-space piece, that some tokenizers add on top of the text's bytes.
SPECIAL_TOKENS_PER_ITEM = 2
# Tokens reserved per image of a multimodal input; settle corrects to the real count.
IMAGE_TOKEN_ALLOWANCE = 1024

# List prices, USD per million input tokens, used when the config sets no price for a model.
BUILTIN_PRICES: dict[str, float] = {
    "openai/text-embedding-3-small": 0.02,
    "openai/text-embedding-3-large": 0.13,
    "openai/text-embedding-ada-002": 0.10,
    "cohere/embed-english-v3.0": 0.10,
    "cohere/embed-multilingual-v3.0": 0.10,
    "mistral/mistral-embed": 0.10,
    "google/text-embedding-004": 0.0,
}


# --- estimates and prices --------------------------------------------------------------------------------


def estimate_tokens(items: str | Iterable[Any], *, image_tokens: int = IMAGE_TOKEN_ALLOWANCE) -> int:
    """An upper bound of the tokens an input costs, to reserve before the upstream call.

    - a string: its UTF-8 byte length, plus ``SPECIAL_TOKENS_PER_ITEM``. Every BPE/SentencePiece token
      covers at least one byte (byte-level BPE merges bytes; byte fallback splits unknown characters into
      bytes), so the byte length bounds the text's tokens; the allowance covers BOS/EOS some models add.
    - a token-id list: its exact length.
    - a multimodal item (``{"content": [{"type": "text", ...} | {"type": "image_url", ...}]}``): the text
      parts as strings, plus ``image_tokens`` per image (an allowance, not a bound: settle charges the real
      count).

    ``items`` is a request's input: one string, one token-id list, or a sequence of items.
    """
    if isinstance(items, str):
        return len(items.encode()) + SPECIAL_TOKENS_PER_ITEM
    seq = list(items)
    if seq and all(isinstance(t, int) for t in seq):
        return len(seq)  # one token-id list
    return sum(_item_tokens(item, image_tokens) for item in seq)


def _item_tokens(item: Any, image_tokens: int) -> int:
    if isinstance(item, str):
        return len(item.encode()) + SPECIAL_TOKENS_PER_ITEM
    if isinstance(item, Mapping):
        content = item.get("content", [item])
        if isinstance(content, str):
            return _item_tokens(content, image_tokens)
        total = 0
        for part in content if isinstance(content, list | tuple) else ():
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                total += len(part["text"].encode()) + SPECIAL_TOKENS_PER_ITEM
            elif part.get("type") == "image_url":
                total += image_tokens
        return total
    if isinstance(item, list | tuple):
        return len(item)
    return 0


def cost_usd(tokens: int, price_per_million: float) -> float:
    """The spend of ``tokens`` input tokens at ``price_per_million`` USD per million tokens."""
    return tokens * price_per_million / 1_000_000


def model_price(
    model_id: str, models: Mapping[str, ModelConfig], deployment: Deployment | None = None
) -> float | None:
    """USD per million tokens: the deployment's, else the model's configured, else the built-in list price.

    None when nothing is known: the caller decides (counting such a model as free is the usual choice).
    """
    if deployment is not None and deployment.price_per_million_tokens is not None:
        return deployment.price_per_million_tokens
    cfg = models.get(model_id)
    if cfg is not None and cfg.price_per_million_tokens is not None:
        return cfg.price_per_million_tokens
    return BUILTIN_PRICES.get(model_id)


def period_bounds(period: str, now: float) -> tuple[str, float | None]:
    """The UTC calendar period holding ``now``: its stamp (part of counter keys) and its end (None: never)."""
    dt = datetime.fromtimestamp(now, UTC)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day.strftime("%Y-%m-%d"), (day + timedelta(days=1)).timestamp()
    if period == "weekly":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        return start.strftime("%G-W%V"), (start + timedelta(days=7)).timestamp()
    if period == "monthly":
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start.strftime("%Y-%m"), end.timestamp()
    if period == "yearly":
        start = day.replace(month=1, day=1)
        return start.strftime("%Y"), start.replace(year=start.year + 1).timestamp()
    if period == "one_time":
        return "all", None
    raise ValueError(f"unknown budget period {period!r}")


# --- the store seam --------------------------------------------------------------------------------


class BudgetStoreError(Exception):
    """The budget store could not be reached or answered an error (foreign errors are translated to this)."""


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """A period counter to check and increment: admitted when ``value + amount <= limit``."""

    key: str
    amount: int
    limit: int
    ttl_s: int  # expiry set on every write; 0: never expires (one_time budgets)


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A rolling request window: admitted when fewer than ``limit`` requests are in the last ``window_ms``."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What a reserve saw. ``failed``: the first refusing spec (counters, then windows), -1 if admitted.

    ``values``/``counts`` are after the reservation when admitted, unchanged when refused. ``marks[i]`` is the
    timestamp (ms) of the request whose leaving lets window ``i`` admit one more (None: the window is empty).
    """

    failed: int
    values: tuple[int, ...]
    counts: tuple[int, ...]
    marks: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Current counter values, window counts and oldest timestamps (ms) in each window."""

    values: tuple[int, ...]
    counts: tuple[int, ...]
    oldest: tuple[int | None, ...]


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
        index: Sequence[tuple[str, str]] = (),
    ) -> ReserveResult:
        """Atomically: check every spec; if all fit, add the amounts, add ``member`` at ``now_ms`` to every
        window and each ``(set, id)`` of ``index`` to its set; else change nothing."""
        ...

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int) -> None:
        """Add each delta to its counter if the counter still exists, never going below zero."""
        ...

    async def read(
        self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int
    ) -> ReadResult:
        """Read counters and windows without changing them."""
        ...

    async def members(self, key: str) -> list[str]:
        """The ids recorded in one index set (the concrete ids seen by a ``*`` budget)."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers (for ``/readyz``)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class MemoryBudgetStore:
    """In-process counters. Atomic by construction: no ``await`` between a check and its increment."""

    SWEEP_EVERY = 1024  # reserves between sweeps of expired counters and empty windows

    def __init__(self) -> None:
        self._counters: dict[str, tuple[int, int | None]] = {}  # key -> (value, expires at ms or None)
        self._windows: dict[str, list[int]] = {}  # key -> sorted request timestamps (ms)
        self._sets: dict[str, set[str]] = {}
        self._ops = 0

    def _value(self, key: str, now_ms: int) -> int:
        entry = self._counters.get(key)
        if entry is None or (entry[1] is not None and entry[1] <= now_ms):
            return 0
        return entry[0]

    def _window(self, key: str, now_ms: int, window_ms: int) -> list[int]:
        log_ = self._windows.get(key)
        if log_ is None:
            return []
        # the same bound as the Redis script's ZREMRANGEBYSCORE -inf cutoff (inclusive)
        del log_[: bisect.bisect_right(log_, now_ms - window_ms)]
        return log_

    def _sweep(self, now_ms: int) -> None:
        self._counters = {k: v for k, v in self._counters.items() if v[1] is None or v[1] > now_ms}
        self._windows = {k: v for k, v in self._windows.items() if v}

    async def reserve(
        self,
        counters: Sequence[CounterSpec],
        windows: Sequence[WindowSpec],
        *,
        now_ms: int,
        window_ms: int,
        member: str,
        index: Sequence[tuple[str, str]] = (),
    ) -> ReserveResult:
        """See ``BudgetStore.reserve``."""
        self._ops += 1
        if self._ops % self.SWEEP_EVERY == 0:
            self._sweep(now_ms)
        values = [self._value(c.key, now_ms) for c in counters]
        logs = [self._window(w.key, now_ms, window_ms) for w in windows]
        failed = next(
            (i for i, (c, v) in enumerate(zip(counters, values, strict=True)) if v + c.amount > c.limit), -1
        )
        if failed < 0:
            failed = next(
                (
                    len(counters) + j
                    for j, (w, lg) in enumerate(zip(windows, logs, strict=True))
                    if len(lg) + 1 > w.limit
                ),
                -1,
            )
        if failed < 0:
            for i, c in enumerate(counters):
                values[i] += c.amount
                self._counters[c.key] = (values[i], now_ms + c.ttl_s * 1000 if c.ttl_s > 0 else None)
            for w, lg in zip(windows, logs, strict=True):
                bisect.insort(lg, now_ms)
                self._windows[w.key] = lg
            for set_key, member_id in index:
                self._sets.setdefault(set_key, set()).add(member_id)
        counts = tuple(len(lg) for lg in logs)
        marks = tuple(_mark(lg, w.limit) for w, lg in zip(windows, logs, strict=True))
        return ReserveResult(failed, tuple(values), counts, marks)

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int) -> None:
        """See ``BudgetStore.adjust``."""
        for key, delta in deltas:
            entry = self._counters.get(key)
            if entry is not None and (entry[1] is None or entry[1] > now_ms):
                self._counters[key] = (max(0, entry[0] + delta), entry[1])

    async def read(
        self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int
    ) -> ReadResult:
        """See ``BudgetStore.read``."""
        logs = [self._window(w, now_ms, window_ms) for w in windows]
        return ReadResult(
            tuple(self._value(k, now_ms) for k in counters),
            tuple(len(lg) for lg in logs),
            tuple(lg[0] if lg else None for lg in logs),
        )

    async def members(self, key: str) -> list[str]:
        """See ``BudgetStore.members``."""
        return sorted(self._sets.get(key, ()))

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    async def aclose(self) -> None:
        """Nothing to release."""


def _mark(log_: Sequence[int], limit: int) -> int | None:
    # The window admits one more once count < limit, i.e. once the entry at rank count - limit has left.
    rank = max(0, len(log_) - limit)
    return log_[rank] if rank < len(log_) else None


# KEYS: n counters, m windows, k index sets. ARGV: n, m, k, now_ms, window_ms, member,
# then amount, limit, ttl per counter, limit per window, id per index set.
_RESERVE = """
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
  for s = 1, k do redis.call('SADD', KEYS[n + m + s], ARGV[wa + m + s - 1]) end
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
return out
"""

# KEYS: counters; ARGV: one delta per counter. A missing (expired) counter is left alone; none goes below 0.
_ADJUST = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], ARGV[i]) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
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

    def __init__(
        self,
        redis_url: str,
        *,
        prefix: str = "eg:b:",
        socket_timeout: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=socket_timeout,  # waiting for a free connection is bounded too
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,  # a connection idle this long is pinged before use (Redis restarts)
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE)  # EVALSHA, loading the script on NOSCRIPT
        self._adjust = self._redis.register_script(_ADJUST)
        self._read = self._redis.register_script(_READ)

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[int]:
        try:
            result = await script(keys=keys, args=args)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise BudgetStoreError(f"{type(exc).__name__}: {exc}") from exc
        return [int(v) for v in result]

    async def reserve(
        self,
        counters: Sequence[CounterSpec],
        windows: Sequence[WindowSpec],
        *,
        now_ms: int,
        window_ms: int,
        member: str,
        index: Sequence[tuple[str, str]] = (),
    ) -> ReserveResult:
        """See ``BudgetStore.reserve``."""
        p = self._prefix
        keys = [p + c.key for c in counters] + [p + w.key for w in windows] + [p + s for s, _ in index]
        args: list[Any] = [len(counters), len(windows), len(index), now_ms, window_ms, member]
        for c in counters:
            args += [c.amount, c.limit, c.ttl_s]
        args += [w.limit for w in windows]
        args += [m for _, m in index]
        out = await self._call(self._reserve, keys, args)
        n, m = len(counters), len(windows)
        marks = tuple(None if v < 0 else v for v in out[1 + n + m : 1 + n + 2 * m])
        return ReserveResult(out[0] - 1, tuple(out[1 : 1 + n]), tuple(out[1 + n : 1 + n + m]), marks)

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int) -> None:
        """See ``BudgetStore.adjust``."""
        deltas = [(k, d) for k, d in deltas if d]
        if deltas:
            await self._call(self._adjust, [self._prefix + k for k, _ in deltas], [d for _, d in deltas])

    async def read(
        self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int
    ) -> ReadResult:
        """See ``BudgetStore.read``."""
        keys = [self._prefix + k for k in (*counters, *windows)]
        out = await self._call(self._read, keys, [len(counters), now_ms, window_ms])
        n, m = len(counters), len(windows)
        oldest = tuple(None if v < 0 else v for v in out[n + m :])
        return ReadResult(tuple(out[:n]), tuple(out[n : n + m]), oldest)

    async def members(self, key: str) -> list[str]:
        """See ``BudgetStore.members``."""
        try:
            raw = await self._redis.smembers(self._prefix + key)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise BudgetStoreError(f"{type(exc).__name__}: {exc}") from exc
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)

    async def ping(self) -> bool:
        """Whether Redis answers a PING."""
        try:
            return bool(await self._redis.ping())
        except (aioredis.RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def budget_store(redis_url: str = "") -> MemoryBudgetStore | RedisBudgetStore:
    """The budget store for a config's ``redis_url`` (empty: in process memory, for one process only)."""
    return RedisBudgetStore(redis_url) if redis_url else MemoryBudgetStore()


# --- the engine --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a request is charged to: its scope ids (``model`` is a ``<provider>/<name>`` model id)."""

    workspace: str
    project: str
    api_key: str
    provider: str
    model: str
    identity: str | None


@dataclass(slots=True)
class _Gate:
    """One deduplicated counter or window, with the budget whose limit is the tightest on it."""

    key: str
    dimension: str  # tokens | cost | requests
    limit: int
    scope: str
    scope_id: str
    period: str
    reset_at: float | None  # end of the period (None: one_time); unused for windows


@dataclass(slots=True, eq=False)
class Reservation:
    """What one request holds on its budgets, until settled or released.

    ``decision``: ``none`` (no budget applies), ``reserved``, or ``fail_open`` (store down, admitted anyway).
    """

    id: str
    decision: str
    tokens: int = 0
    cost_nano: int = 0
    counters: tuple[_Gate, ...] = ()
    _headers: dict[str, str] = field(default_factory=dict)
    _open: bool = True

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens,cost}`` of the most restrictive budget per
        dimension, as of the reservation."""
        return dict(self._headers)


def _usd(nano: int) -> str:
    whole, frac = divmod(nano, NANO)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def _project_id(subject: Subject) -> str:
    # Projects are named per workspace: qualified, two workspaces' "default" projects never share a counter.
    return f"{subject.workspace}/{subject.project}"


class BudgetEngine:
    """Applies the configured budgets to requests; see the module docstring for the protocol."""

    WARN_INTERVAL_S = 60.0  # fail-open warnings are logged at most this often

    def __init__(
        self,
        budgets: tuple[BudgetConfig, ...],
        store: BudgetStore,
        *,
        fail_open: bool = False,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._budgets = budgets
        self._store = store
        self._fail_open = fail_open
        self._window_ms = int(window_s * 1000)
        self._clock = clock
        self._last_warn = -math.inf
        self._memo: dict[tuple[Subject, bool, int], tuple[list[_Gate], list[_Gate], list[tuple[str, str]]]] = {}
        # Applicable-budget lookup, precomputed: (scope, target) -> budgets, and scope -> its "*" budgets.
        self._exact: dict[tuple[str, str], list[BudgetConfig]] = {}
        self._wild: dict[str, list[BudgetConfig]] = {}
        for b in budgets:
            if b.target == "*":
                self._wild.setdefault(b.scope, []).append(b)
            else:
                self._exact.setdefault((b.scope, b.target), []).append(b)

    @property
    def store(self) -> BudgetStore:
        """The store the engine counts in (the integrator closes it, and pings it for ``/readyz``)."""
        return self._store

    def applicable(self, subject: Subject) -> list[tuple[BudgetConfig, str]]:
        """Every budget that applies to ``subject``, with the concrete id it counts under.

        Project ids are qualified by their workspace (``acme/search``); a project budget's target may name the
        project alone (every workspace's project of that name, each counted on its own) or qualified.
        Identity budgets apply only when the request has an identity.
        """
        ids: list[tuple[str, str, tuple[str, ...]]] = [
            ("workspace", subject.workspace, (subject.workspace,)),
            # a project target may name the project alone or qualified, "workspace/project"
            ("project", _project_id(subject), (subject.project, _project_id(subject))),
            ("api_key", subject.api_key, (subject.api_key,)),
            ("provider", subject.provider, (subject.provider,)),
            ("model", subject.model, (subject.model,)),
        ]
        if subject.identity is not None:
            ids.append(("identity", subject.identity, (subject.identity,)))
        out: list[tuple[BudgetConfig, str]] = []
        for scope, concrete, targets in ids:
            for target in dict.fromkeys(targets):
                out += [(b, concrete) for b in self._exact.get((scope, target), ())]
            out += [(b, concrete) for b in self._wild.get(scope, ())]
        return out

    def _gates(
        self, subject: Subject, now: float, cached: bool
    ) -> tuple[list[_Gate], list[_Gate], list[tuple[str, str]]]:
        # The gates of a subject change only with the UTC day (every period starts at midnight): computed once
        # per subject and day, not per request.
        memo_key = (subject, cached, int(now // 86400))
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        if len(self._memo) >= 10_000:
            self._memo.clear()
        found = self._memo[memo_key] = self._compute_gates(subject, now, cached)
        return found

    def _compute_gates(
        self, subject: Subject, now: float, cached: bool
    ) -> tuple[list[_Gate], list[_Gate], list[tuple[str, str]]]:
        counters: dict[str, _Gate] = {}
        windows: dict[str, _Gate] = {}
        index: dict[tuple[str, str], None] = {}  # ids seen by "*" budgets, for the operator's usage view
        for b, sid in self.applicable(subject):
            if b.target == "*":
                index[(f"ids:{b.scope}", sid)] = None
            dims: list[tuple[str, int | None]] = [("requests", b.requests_per_minute)]
            if not cached:  # a cache hit costs no tokens and no spend (SPEC 6)
                dims.append(("tokens", b.token_limit))
                dims.append(("cost", None if b.amount_usd is None else round(b.amount_usd * NANO)))
            stamp, end = period_bounds(b.period, now)
            for dim, limit in dims:
                if limit is None:
                    continue
                if dim == "requests":
                    table, key = windows, f"rpm:{b.scope}:{sid}"
                else:
                    table, key = counters, f"{b.scope}:{sid}:{b.period}:{stamp}:{dim}"
                # Budgets counting the same thing share one counter; the smallest limit is the one that gates.
                gate = table.get(key)
                if gate is None or limit < gate.limit:
                    table[key] = _Gate(key, dim, limit, b.scope, sid, b.period, end)
        return list(counters.values()), list(windows.values()), list(index)

    async def reserve(
        self, subject: Subject, *, tokens: int, cost_usd: float, cached: bool = False
    ) -> Reservation:
        """Reserve ``tokens`` and ``cost_usd`` on every applicable budget; count one request; all or nothing.

        Raises ``BudgetExceeded`` (429) naming the refusing budget, or ``Unavailable`` (503) when the store is
        unreachable and the engine is not ``fail_open``.
        """
        rid = uuid.uuid4().hex
        now = self._clock()
        counters, windows, index = self._gates(subject, now, cached)
        if not counters and not windows:
            return Reservation(rid, "none")
        cost_nano = 0 if cached else max(0, round(cost_usd * NANO))
        tokens = 0 if cached else max(0, tokens)
        specs = [
            CounterSpec(
                g.key,
                tokens if g.dimension == "tokens" else cost_nano,
                g.limit,
                0 if g.reset_at is None else math.ceil(g.reset_at - now) + PERIOD_GRACE_S,
            )
            for g in counters
        ]
        now_ms = int(now * 1000)
        try:
            res = await self._store.reserve(
                specs,
                [WindowSpec(g.key, g.limit) for g in windows],
                now_ms=now_ms,
                window_ms=self._window_ms,
                member=rid,
                index=index,
            )
        except BudgetStoreError as exc:
            if not self._fail_open:
                raise Unavailable(
                    "budget store unavailable; the request was not admitted", code="store_unavailable"
                ) from exc
            if time.monotonic() - self._last_warn >= self.WARN_INTERVAL_S:
                self._last_warn = time.monotonic()
                log.warning("budget store unavailable, admitting without budgets (fail_open)", error=str(exc))
            return Reservation(rid, "fail_open")
        headers = self._headers(counters, windows, res, now_ms)
        if res.failed >= 0:
            raise self._refusal(counters, windows, res, now_ms, headers)
        return Reservation(rid, "reserved", tokens, cost_nano, tuple(counters), headers)

    def _headers(
        self, counters: list[_Gate], windows: list[_Gate], res: ReserveResult, now_ms: int
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        now = now_ms / 1000
        for dim in ("tokens", "cost"):
            best: tuple[int, float, _Gate] | None = None
            for g, value in zip(counters, res.values, strict=True):
                if g.dimension != dim:
                    continue
                remaining = max(0, g.limit - value)
                reset = math.inf if g.reset_at is None else g.reset_at - now
                # smallest remaining wins; on a tie, the one that frees up later
                if best is None or (remaining, -reset) < (best[0], -best[1]):
                    best = (remaining, reset, g)
            if best is not None:
                fmt = _usd if dim == "cost" else str
                headers[f"x-ratelimit-limit-{dim}"] = fmt(best[2].limit)
                headers[f"x-ratelimit-remaining-{dim}"] = fmt(best[0])
                if best[1] != math.inf:  # one_time budgets never reset: no reset header
                    headers[f"x-ratelimit-reset-{dim}"] = str(max(0, math.ceil(best[1])))
        best_w: tuple[int, int, _Gate] | None = None
        for g, count, mark in zip(windows, res.counts, res.marks, strict=True):
            remaining = max(0, g.limit - count)
            reset_ms = 0 if mark is None else max(0, mark + self._window_ms - now_ms)
            if best_w is None or (remaining, -reset_ms) < (best_w[0], -best_w[1]):
                best_w = (remaining, reset_ms, g)
        if best_w is not None:
            headers["x-ratelimit-limit-requests"] = str(best_w[2].limit)
            headers["x-ratelimit-remaining-requests"] = str(best_w[0])
            headers["x-ratelimit-reset-requests"] = str(math.ceil(best_w[1] / 1000))
        return headers

    def _refusal(
        self,
        counters: list[_Gate],
        windows: list[_Gate],
        res: ReserveResult,
        now_ms: int,
        headers: dict[str, str],
    ) -> BudgetExceeded:
        if res.failed < len(counters):
            g, used = counters[res.failed], res.values[res.failed]
            shown = _usd if g.dimension == "cost" else str
            what = "cost budget" if g.dimension == "cost" else "token budget"
            unit = "USD" if g.dimension == "cost" else "tokens"
            message = (
                f"{what} exceeded for {g.scope} '{g.scope_id}' ({g.period}): "
                f"{shown(used)} of {shown(g.limit)} {unit} used"
            )
            code = "cost_budget_exceeded" if g.dimension == "cost" else "token_budget_exceeded"
            # a period budget will not recover within a retry loop: tell SDKs not to retry
            extra = {"x-should-retry": "false"}
        else:
            j = res.failed - len(counters)
            g, mark = windows[j], res.marks[j]
            wait_ms = self._window_ms if mark is None else mark + self._window_ms - now_ms
            message = f"requests per minute exceeded for {g.scope} '{g.scope_id}': limit {g.limit}"
            code = "requests_per_minute_exceeded"
            extra = {"retry-after": str(max(1, math.ceil(wait_ms / 1000)))}
        return BudgetExceeded(
            message,
            code=code,
            scope_kind=g.scope,
            scope_target_id=g.scope_id,
            dimension=g.dimension,
            headers={**headers, **extra},
        )

    async def settle(self, reservation: Reservation, *, tokens: int, cost_usd: float) -> None:
        """Adjust the reserved counters to the real usage. Idempotent; a store failure is only logged."""
        cost_nano = round(cost_usd * NANO)
        await self._adjust(
            reservation, tokens - reservation.tokens, cost_nano - reservation.cost_nano, "settle"
        )

    async def release(self, reservation: Reservation) -> None:
        """Undo the token and cost reservation (the upstream failed); the request stays counted per minute."""
        await self._adjust(reservation, -reservation.tokens, -reservation.cost_nano, "release")

    async def _adjust(self, reservation: Reservation, d_tokens: int, d_cost: int, what: str) -> None:
        if not reservation._open:
            return
        reservation._open = False  # before awaiting, so a concurrent second call is a no-op too
        deltas = [(g.key, d_tokens if g.dimension == "tokens" else d_cost) for g in reservation.counters]
        deltas = [(k, d) for k, d in deltas if d]
        if not deltas:
            return
        try:
            await self._store.adjust(deltas, now_ms=int(self._clock() * 1000))
        except BudgetStoreError as exc:
            log.warning(f"budget {what} failed; counters keep the reserved amounts", error=str(exc))

    async def usage(self, *, scope: str | None = None, limit_ids: int = 1000) -> list[dict[str, Any]]:
        """An operator's view: per budget (and per id seen by a ``*`` budget), the current period's usage.

        Each entry: ``budget`` (config index), ``scope``, ``target``, ``id``, ``period``, ``period_stamp``,
        ``resets_in_s`` (None for one_time), and per limited dimension ``tokens`` / ``cost_usd`` /
        ``requests_per_minute``: ``{"used", "limit", "remaining"}``. ``Unavailable`` if the store is down.
        """
        now = self._clock()
        rows: list[tuple[BudgetConfig, str]] = []
        try:
            for b in self._budgets:
                if scope is not None and b.scope != scope:
                    continue
                if b.target != "*":
                    rows.append((b, b.target))
                    continue
                seen = await self._store.members(f"ids:{b.scope}")
                rows += [(b, sid) for sid in seen[:limit_ids]]
            counter_keys: list[str] = []
            window_keys: list[str] = []
            for b, sid in rows:
                stamp, _ = period_bounds(b.period, now)
                counter_keys += [f"{b.scope}:{sid}:{b.period}:{stamp}:{d}" for d in ("tokens", "cost")]
                window_keys.append(f"rpm:{b.scope}:{sid}")
            got = await self._store.read(
                counter_keys, window_keys, now_ms=int(now * 1000), window_ms=self._window_ms
            )
        except BudgetStoreError as exc:
            raise Unavailable("budget store unavailable", code="store_unavailable") from exc
        out: list[dict[str, Any]] = []
        for i, (b, sid) in enumerate(rows):
            stamp, end = period_bounds(b.period, now)
            entry: dict[str, Any] = {
                "budget": b.index,
                "scope": b.scope,
                "target": b.target,
                "id": sid,
                "period": b.period,
                "period_stamp": stamp,
                "resets_in_s": None if end is None else max(0, math.ceil(end - now)),
            }
            if b.token_limit is not None:
                used = got.values[2 * i]
                entry["tokens"] = {
                    "used": used,
                    "limit": b.token_limit,
                    "remaining": max(0, b.token_limit - used),
                }
            if b.amount_usd is not None:
                used_nano, limit_nano = got.values[2 * i + 1], round(b.amount_usd * NANO)
                entry["cost_usd"] = {
                    "used": used_nano / NANO,
                    "limit": b.amount_usd,
                    "remaining": max(0, limit_nano - used_nano) / NANO,
                }
            if b.requests_per_minute is not None:
                used = got.counts[i]
                entry["requests_per_minute"] = {
                    "used": used,
                    "limit": b.requests_per_minute,
                    "remaining": max(0, b.requests_per_minute - used),
                }
            out.append(entry)
        return out
