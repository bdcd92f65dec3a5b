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

import asyncio
import inspect
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import structlog

from embedgate.config import BudgetConfig, Deployment, ModelConfig
from embedgate.errors import BudgetExceeded, Unavailable

from .budget_stores import (
    NEVER_MS,
    BudgetStore,
    BudgetStoreError,
    CounterSpec,
    MemoryBudgetStore,
    ReadResult,
    RedisBudgetStore,
    ReserveResult,
    WindowSpec,
    budget_store,
)

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
    "is_bounded",
    "model_price",
    "period_bounds",
    "tighter_headers",
]

_UNDO_FOR_S: Final = 25.0  # (the Redis store's mark lasts 30 s)
_MAX_LOST: Final = 10_000  # reserves waiting to be undone, at most (the oldest go first)

log = structlog.get_logger("embedgate.budgets")

_getrandbits: Final = random.getrandbits
NANO: Final = 1_000_000_000  # nano-dollars per USD
# Counters outlive their period by this much, so a request spanning the rollover still settles.
PERIOD_GRACE_S: Final = 3600
# BOS/EOS, or a leading-space piece, that some tokenizers add on top of the text's bytes.
SPECIAL_TOKENS_PER_ITEM: Final = 2
# Tokens reserved per image of a multimodal input; settle corrects to the real count.
IMAGE_TOKEN_ALLOWANCE: Final = 1024

# List prices, USD per million input tokens, used when the config sets no price for a model.
BUILTIN_PRICES: Final[dict[str, float]] = {
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
      parts as strings, plus ``image_tokens`` per image (or audio, video or file part; an allowance, not a bound:
      settle charges the real count).

    ``items`` is a request's input: one string, one token-id list, or a sequence of items.
    """
    if isinstance(items, str):
        return len(items.encode()) + SPECIAL_TOKENS_PER_ITEM
    seq = list(items)
    if seq and all(isinstance(t, int) for t in seq):
        return len(seq)  # one token-id list
    if all(type(item) is str for item in seq):  # the usual batch of texts, without a call per item
        return sum(len(item.encode()) for item in seq) + SPECIAL_TOKENS_PER_ITEM * len(seq)
    return sum(_item_tokens(item, image_tokens) for item in seq)


def is_bounded(items: str | Iterable[Any]) -> bool:
    """Whether :func:`estimate_tokens` of ``items`` is a bound, not an allowance: no multimodal item in them."""
    return isinstance(items, str) or not any(isinstance(item, Mapping) for item in items)


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
            elif part.get("type") in ("image_url", "input_audio", "input_video", "input_file"):
                total += image_tokens  # an allowance per media part
        return total
    if isinstance(item, list | tuple):
        return len(item)
    return 0


def cost_usd(tokens: int, price_per_million: float) -> float:
    """The spend of ``tokens`` input tokens at ``price_per_million`` USD per million tokens."""
    return tokens * price_per_million / 1_000_000


def nano_up(usd: float) -> int:
    """A cost in whole nano-dollars, as cost budgets count it: rounded up, so that a budget is never overshot by
    rounding (rounded to the nearest, a request under half a nano-dollar, one token at $0.0004 per million, was
    counted as nothing). A product's own float error (60.00000000000001) is not taken for a fraction."""
    nano = usd * NANO
    whole = int(nano)
    if nano - whole > 1e-6 + 1e-12 * whole:
        whole += 1
    return max(0, whole)


def model_price(model_id: str, models: Mapping[str, ModelConfig], deployment: Deployment | None = None) -> float | None:
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
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start.strftime("%Y-%m"), end.timestamp()
    if period == "yearly":
        start = day.replace(month=1, day=1)
        return start.strftime("%Y"), start.replace(year=start.year + 1).timestamp()
    if period == "one_time":
        return "all", None
    raise ValueError(f"unknown budget period {period!r}")


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
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        # Hashed once: a subject keys the engine's memo of its gates on every request.
        fields = (self.workspace, self.project, self.api_key, self.provider, self.model, self.identity)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


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
    limit_text: str = ""  # the limit as its x-ratelimit-limit-* header shows it

    def __post_init__(self) -> None:
        self.limit_text = _usd(self.limit) if self.dimension == "cost" else str(self.limit)


@dataclass(init=False, slots=True, eq=False)
class Reservation:
    """What one request holds on its budgets, until settled or released (``__init__`` written out: a
    dataclass's generated ``__init__`` stays interpreted in the compiled build).

    ``decision``: ``none`` (no budget applies), ``reserved``, or ``fail_open`` (store down, admitted anyway).
    """

    id: str
    decision: str
    tokens: int = 0
    cost_nano: int = 0
    counters: tuple[_Gate, ...] = ()
    _headers: dict[str, str] = field(default_factory=dict)
    _open: bool = True
    epoch: int | None = None  # the store's epoch of the counters it reserved on (see BudgetStore.adjust)

    def __init__(
        self,
        id: str,
        decision: str,
        tokens: int = 0,
        cost_nano: int = 0,
        counters: tuple[_Gate, ...] = (),
        _headers: dict[str, str] | None = None,
        epoch: int | None = None,
    ) -> None:
        self.id = id
        self.decision = decision
        self.tokens = tokens
        self.cost_nano = cost_nano
        self.counters = counters
        self._headers = {} if _headers is None else _headers
        self._open = True
        self.epoch = epoch

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens,cost}`` of the most restrictive budget per
        dimension, as of the reservation."""
        return dict(self._headers)


def tighter_headers(headers: dict[str, str], other: Mapping[str, str]) -> None:
    """Fold ``other``'s ``x-ratelimit-{limit,remaining,reset}-{requests,tokens,cost}`` into ``headers`` for each
    dimension where its budget has less left (both reservations gate one request): the headers name the most
    restrictive, on a tie the one that frees up later (a ``one_time`` budget, without a reset, never does), as a
    reservation's own."""
    for dim, read in (("requests", int), ("tokens", int), ("cost", Decimal)):
        left = other.get(f"x-ratelimit-remaining-{dim}")
        mine = headers.get(f"x-ratelimit-remaining-{dim}")
        if left is None:
            continue
        if mine is not None:
            if read(mine) < read(left):
                continue
            if read(mine) == read(left):
                reset, its = headers.get(f"x-ratelimit-reset-{dim}"), other.get(f"x-ratelimit-reset-{dim}")
                if reset is None or (its is not None and int(its) <= int(reset)):
                    continue
        for part in ("limit", "remaining", "reset"):
            name = f"x-ratelimit-{part}-{dim}"
            if name in other:
                headers[name] = other[name]
            else:
                headers.pop(name, None)  # (a one_time budget's: no reset)


def _takes_epoch(store: BudgetStore) -> bool:
    """Whether ``store.adjust`` takes ``epoch=`` (a store of one's own, or a wrapper of the Redis one, written before
    it had one does not: settles through it raised TypeError)."""
    if type(store) is RedisBudgetStore or type(store) is MemoryBudgetStore:
        return True
    try:
        parameters = inspect.signature(store.adjust).parameters
    except (TypeError, ValueError):  # no signature to read: called as before epochs
        return False
    return "epoch" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _usd(nano: int) -> str:
    """Nano-dollars as USD text, without trailing zeros: ``1500000000`` is ``1.5``."""
    whole = nano // NANO  # floor division and modulo, as divmod: frac is in [0, NANO)
    frac = nano % NANO
    if frac == 0:
        return str(whole)
    # frac + NANO is "1" and frac's nine digits, leading zeros included (what f"{frac:09d}" wrote, in int ops)
    return f"{whole}.{str(frac + NANO)[1:].rstrip('0')}"


def _project_id(subject: Subject) -> str:
    # Projects are named per workspace: qualified, two workspaces' "default" projects never share a counter.
    return f"{subject.workspace}/{subject.project}"


def _specs(counters: Sequence[_Gate], tokens: int, cost_nano: int, now: float) -> list[CounterSpec]:
    """What a reserve adds to each of ``counters``: the tokens or the cost, by its dimension; its expiry the end of
    its period (and a grace), or none."""
    return [
        CounterSpec(
            g.key,
            tokens if g.dimension == "tokens" else cost_nano,
            g.limit,
            0 if g.reset_at is None else math.ceil(g.reset_at - now) + PERIOD_GRACE_S,
        )
        for g in counters
    ]


class BudgetEngine:
    """Applies the configured budgets to requests; see the module docstring for the protocol."""

    WARN_INTERVAL_S = 60.0  # a store that is down is logged at most this often

    def __init__(
        self,
        budgets: tuple[BudgetConfig, ...],
        store: BudgetStore,
        *,
        fail_open: bool = False,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        projects: Iterable[tuple[str, str]] = (),
        workspaces: Iterable[str] = (),
    ) -> None:
        self._budgets = budgets
        # The qualified ids ("acme/search") a project budget named by the project alone ("search") counts under,
        # for the usage view: ``projects`` are the keys' (workspace, project) pairs (a workspace may hold a '/').
        pairs = list(dict.fromkeys(projects))
        self._qualified: dict[str, list[str]] = {}
        for workspace, project in pairs:
            self._qualified.setdefault(project, []).append(f"{workspace}/{project}")
        # The workspaces of the keys: an identity budget's target, or a usage view's id, "<workspace>/<id>" when it
        # starts with one of them and "/", else an identity id alone (every workspace's identity of that id).
        self._workspaces: tuple[str, ...] = tuple(dict.fromkeys(workspaces or (w for w, _ in pairs)))
        self._store = store
        self._adjust_takes_epoch = _takes_epoch(store)
        self._immediate = type(store) is MemoryBudgetStore  # its reserve never waits: nothing can cancel it midway
        self._undoing: set[asyncio.Future[Any]] = set()  # reserves cancelled on their way, and their undoing
        # reserves whose answers were lost (until when each may be undone, what it reserved, its member), and the
        # task undoing them
        self._lost: deque[tuple[float, list[CounterSpec], list[WindowSpec], str]] = deque(maxlen=_MAX_LOST)
        self._lost_dropped = 0
        self._undo_task: asyncio.Future[None] | None = None
        self._can_undo = callable(getattr(store, "undo_lost", None))
        self._fail_open = fail_open
        self._window_ms = int(window_s * 1000)
        self._clock = clock
        self._last_warn = -math.inf
        self._memo: dict[tuple[Subject, bool, int], tuple[list[_Gate], list[_Gate], list[tuple[str, str, int]]]] = {}
        self._beside_memo: dict[
            tuple[tuple[str, str], int], tuple[list[_Gate], list[_Gate], list[tuple[str, str, int]]]
        ] = {}
        # Applicable-budget lookup, precomputed: (scope, target) -> budgets, and scope -> its "*" budgets.
        self._exact: dict[tuple[str, str], list[BudgetConfig]] = {}
        self._wild: dict[str, list[BudgetConfig]] = {}
        for b in budgets:
            if b.target == "*":
                self._wild.setdefault(b.scope, []).append(b)
            elif b.scope == "identity" and self.qualified_identity(b.target) is None:
                # an identity id alone: matched against the request's identity id, not its qualified name (a
                # globex identity whose id is "acme/user-42" is not acme's user-42)
                self._exact.setdefault(("identity:id", b.target), []).append(b)
            else:
                self._exact.setdefault((b.scope, b.target), []).append(b)

    @property
    def store(self) -> BudgetStore:
        """The store the engine counts in (the integrator closes it, and pings it for ``/readyz``)."""
        return self._store

    def applicable(self, subject: Subject) -> list[tuple[BudgetConfig, str]]:
        """Every budget that applies to ``subject``, with the concrete id it counts under.

        Project and identity ids are qualified by their workspace (``acme/search``, ``acme/user-42``: two workspaces'
        projects or identities of one name are counted apart); a budget's target may name them alone (each
        workspace's of that name, counted on its own) or qualified. Identity budgets apply only when the request
        has an identity.
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
            # a target "<workspace>/<id>" names the qualified id; an id alone, the request's identity id
            qualified = f"{subject.workspace}/{subject.identity}"
            ids.append(("identity", qualified, (qualified,)))
        return self._matching(ids, subject.identity)

    def _matching(
        self, ids: list[tuple[str, str, tuple[str, ...]]], identity: str | None
    ) -> list[tuple[BudgetConfig, str]]:
        """The budgets of each ``(scope, concrete id, targets that name it)``, with the concrete id."""
        out: list[tuple[BudgetConfig, str]] = []
        for scope, concrete, targets in ids:
            for target in dict.fromkeys(targets):
                out += [(b, concrete) for b in self._exact.get((scope, target), ())]
            if scope == "identity":
                out += [(b, concrete) for b in self._exact.get(("identity:id", identity or ""), ())]
            out += [(b, concrete) for b in self._wild.get(scope, ())]
        return out

    def _gates(
        self, subject: Subject, now: float, cached: bool
    ) -> tuple[list[_Gate], list[_Gate], list[tuple[str, str, int]]]:
        # The gates of a subject change only with the UTC day (every period starts at midnight): computed once
        # per subject and day, not per request.
        memo_key = (subject, cached, int(now // 86400))
        found = self._memo.get(memo_key)
        if found is not None:
            return found
        if len(self._memo) >= 10_000:
            self._memo.clear()
        found = self._memo[memo_key] = self._compute_gates(self.applicable(subject), now, cached)
        return found

    def _compute_gates(
        self, applicable: list[tuple[BudgetConfig, str]], now: float, cached: bool
    ) -> tuple[list[_Gate], list[_Gate], list[tuple[str, str, int]]]:
        counters: dict[str, _Gate] = {}
        windows: dict[str, _Gate] = {}
        # Ids seen by "*" budgets, for the operator's usage view: each listed as long as its counters live (the
        # period's end and its grace; a one_time budget's never end), so that ids made up by clients (identities,
        # <provider>/<name> models) do not pile up in the store for ever.
        index: dict[tuple[str, str], int] = {}
        for b, sid in applicable:
            stamp, end = period_bounds(b.period, now)
            if b.target == "*":
                until = NEVER_MS if end is None else math.ceil((end + PERIOD_GRACE_S) * 1000)
                at = (f"seen:{b.scope}", sid)
                index[at] = max(until, index.get(at, 0))
            dims: list[tuple[str, int | None]] = [("requests", b.requests_per_minute)]
            if not cached:  # a cache hit costs no tokens and no spend (SPEC 6)
                dims.append(("tokens", b.token_limit))
                dims.append(("cost", None if b.amount_usd is None else round(b.amount_usd * NANO)))
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
        return list(counters.values()), list(windows.values()), [(s, i, until) for (s, i), until in index.items()]

    async def reserve(self, subject: Subject, *, tokens: int, cost_usd: float, cached: bool = False) -> Reservation:
        """Reserve ``tokens`` and ``cost_usd`` on every applicable budget; count one request; all or nothing.

        Raises ``BudgetExceeded`` (429) naming the refusing budget, or ``Unavailable`` (503) when the store is
        unreachable and the engine is not ``fail_open``.
        """
        # Unique per reservation (a member of the Redis request windows). Python's random is seeded from the OS
        # and reseeded in a forked child; os.urandom would be a system call per request.
        rid = _getrandbits(128).to_bytes(16, "big").hex()  # as f"{n:032x}", at half its cost
        now = self._clock()
        counters, windows, index = self._gates(subject, now, cached)
        if not counters and not windows:
            return Reservation(rid, "none")
        cost_nano = 0 if cached else nano_up(cost_usd)
        tokens = 0 if cached else max(0, tokens)
        specs = _specs(counters, tokens, cost_nano, now)
        now_ms = int(now * 1000)
        res = await self._reserve_or_fail(specs, [WindowSpec(g.key, g.limit) for g in windows], now_ms, rid, index)
        return self._reservation(rid, res, counters, windows, now_ms, tokens, cost_nano)

    async def reserve_fallback(self, model: str, held: Reservation, *, tokens: int, cost_usd: float) -> Reservation:
        """Reserve ``tokens`` and ``cost_usd`` on the ``model`` and ``provider`` budgets of a fallback ``model`` (a
        ``<provider>/<name>`` id) that the request's own reservation ``held`` does not hold already, all or nothing:
        a client naming a model as its fallback must not spend it past its budget. Counts no request (the request is
        counted once, on its own budgets); decision ``none`` when no such budget applies. Raises as :meth:`reserve`
        does; settle it with what that model charged, else release it."""
        provider = model.partition("/")[0]
        ids: list[tuple[str, str, tuple[str, ...]]] = [("provider", provider, (provider,)), ("model", model, (model,))]
        return await self._reserve_beside(("model", model), ids, held, tokens, cost_usd)

    async def reserve_provider(self, provider: str, held: Reservation, *, tokens: int, cost_usd: float,
                               request: bool = False) -> Reservation:  # fmt: skip
        """As :meth:`reserve_fallback`, on the ``provider`` budgets of a provider that serves a model of the
        request's chain under another model id (a deployment of ``acme/embed`` on ``azure``): what the request
        spends at that provider counts on its budgets, whichever model id it asked for. With ``request``, the
        request counts against their ``requests_per_minute`` too (the provider alone serves the requested model)."""
        ids: list[tuple[str, str, tuple[str, ...]]] = [("provider", provider, (provider,))]
        return await self._reserve_beside(("provider", provider), ids, held, tokens, cost_usd, request)

    def counts_provider(self, provider: str) -> bool:
        """Whether any budget counts ``provider`` (``scope: provider``, its name or ``*``)."""
        return ("provider", provider) in self._exact or "provider" in self._wild

    async def _reserve_beside(self, what: tuple[str, str], ids: list[tuple[str, str, tuple[str, ...]]],
                              held: Reservation, tokens: int, cost_usd: float, request: bool = False
                              ) -> Reservation:  # fmt: skip
        """Reserve on the token and cost counters of the budgets ``ids`` name, but those ``held`` holds already;
        with ``request``, count one request on their request windows too."""
        rid = _getrandbits(128).to_bytes(16, "big").hex()
        now = self._clock()
        memo_key = (what, int(now // 86400))  # as _gates: per model (or provider) and UTC day
        found = self._beside_memo.get(memo_key)
        if found is None:
            if len(self._beside_memo) >= 10_000:
                self._beside_memo.clear()
            found = self._beside_memo[memo_key] = self._compute_gates(self._matching(ids, None), now, False)
        held_keys = {g.key for g in held.counters}
        counters = [g for g in found[0] if g.key not in held_keys]
        # (the held reservation's windows are its subject's: rpm of the requested model's own provider prefix)
        windows = found[1] if request else []
        if not counters and not windows:
            return Reservation(rid, "none")
        cost_nano = nano_up(cost_usd)
        tokens = max(0, tokens)
        now_ms = int(now * 1000)
        specs, spans = _specs(counters, tokens, cost_nano, now), [WindowSpec(g.key, g.limit) for g in windows]
        res = await self._reserve_or_fail(specs, spans, now_ms, rid, found[2])
        return self._reservation(rid, res, counters, windows, now_ms, tokens, cost_nano)

    def _reservation(self, rid: str, res: ReserveResult | None, counters: list[_Gate], windows: list[_Gate],
                     now_ms: int, tokens: int, cost_nano: int) -> Reservation:  # fmt: skip
        """What a store's reserve answered, as a reservation (``fail_open`` without an answer), or its refusal."""
        if res is None:
            return Reservation(rid, "fail_open")
        headers = self._headers(counters, windows, res, now_ms)
        if res.failed >= 0:
            raise self._refusal(counters, windows, res, now_ms, headers, {"tokens": tokens, "cost": cost_nano})
        return Reservation(rid, "reserved", tokens, cost_nano, tuple(counters), headers, res.epoch)

    async def _reserve_or_fail(self, specs: list[CounterSpec], windows: list[WindowSpec], now_ms: int, member: str,
                               index: Sequence[tuple[str, str, int]]) -> ReserveResult | None:  # fmt: skip
        """The store's reserve; None when the store is unreachable and the engine is ``fail_open``, else
        ``Unavailable`` (503)."""
        try:
            return await self._reserved(specs, windows, now_ms, member, index)
        except BudgetStoreError as exc:
            # Told in both modes (at most once a WARN_INTERVAL_S): failing closed, the 503s alone did not say why (a
            # wrong password, a db out of range, Redis down).
            if time.monotonic() - self._last_warn >= self.WARN_INTERVAL_S:
                self._last_warn = time.monotonic()
                if self._fail_open:
                    log.warning("budget store unavailable, admitting without budgets (fail_open)", error=str(exc))
                else:
                    log.warning("budget store unavailable, refusing budgeted requests (503)", error=str(exc))
            if not self._fail_open:
                raise Unavailable(
                    "budget store unavailable; the request was not admitted",
                    code="store_unavailable",
                    headers={"retry-after": "1"},
                ) from exc
            return None

    async def _reserved(self, specs: list[CounterSpec], windows: list[WindowSpec], now_ms: int, member: str,
                        index: Sequence[tuple[str, str, int]]) -> ReserveResult:  # fmt: skip
        """The store's reserve. On a store that answers later (Redis), a reserve cancelled on its way (a host's
        timeout, the server's graceful shutdown, while Redis is slow) still runs there, and nothing released it: its
        tokens and cost stayed counted until the period's end (a one_time budget's, for ever). Run apart from the
        request's task, it is undone when its answer comes, as a released reservation is (the request counted)."""
        reserving = self._store.reserve(specs, windows, now_ms=now_ms, window_ms=self._window_ms, member=member,
                                        index=index)  # fmt: skip
        if self._immediate:  # the memory store: all done within the call
            return await reserving
        task = asyncio.ensure_future(reserving)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._undoing.add(task)  # (drain waits for its answer, and the undo it makes)
            task.add_done_callback(self._undoing.discard)
            task.add_done_callback(lambda done: self._undo_late(done, specs, member))
            raise
        except BudgetStoreError as exc:
            # Its answer lost (the connection cut, or no answer in time) may be a reserve that Redis ran: the
            # request refused with a 503 (or admitted unbudgeted, fail_open) stayed charged. Undone if it ran.
            if exc.maybe_ran:
                self._undo_lost(specs, windows, member)
            raise

    @property
    def immediate(self) -> bool:
        """Whether the store answers within each call (the memory store): nothing of a reserve or a settle waits."""
        return self._immediate

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the reserves cancelled on their way and the undoing of those that landed:
        before the store closes (the gateway's shutdown), which would cut their answers off, and the undo with them."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while self._undoing and loop.time() < until:
            await asyncio.wait(list(self._undoing), timeout=until - loop.time())

    def _undo_late(self, done: asyncio.Future[Any], specs: list[CounterSpec], member: str) -> None:
        if done.cancelled():
            return
        lost = done.exception()
        if lost is not None:
            if isinstance(lost, BudgetStoreError) and lost.maybe_ran:  # lost on its way back: undone if it ran
                self._undo_lost(specs, [], member)  # (the request counted, as a cancelled one is)
            return
        res = done.result()
        deltas = [(c.key, -c.amount) for c in specs if c.amount]
        if res.failed < 0 and deltas:
            undo = asyncio.ensure_future(self._apply(deltas, res.epoch, "release"))
            self._undoing.add(undo)  # (a task only the loop holds may be collected before it runs)
            undo.add_done_callback(self._undoing.discard)

    def _undo_lost(self, specs: list[CounterSpec], windows: list[WindowSpec], member: str) -> None:
        """Undo, in the background, the reserve of ``member`` whose answer was lost, should it have run and admitted
        (the store keeps what it needs for a while: ``_UNDO_FOR_S`` here). Queued, bounded, for one task that undoes
        them in turn and, while the store does not answer, waits longer each time (one attempt, not one a request)."""
        if not self._can_undo:  # a store of its own written before undo_lost: it stays counted
            return
        if len(self._lost) == self._lost.maxlen:
            self._lost_dropped += 1  # (the oldest goes)
        self._lost.append((time.monotonic() + _UNDO_FOR_S, specs, windows, member))
        if self._undo_task is None or self._undo_task.done():
            self._undo_task = task = asyncio.ensure_future(self._undo_queued())
            self._undoing.add(task)  # (drain waits for it; a task only the loop holds may be collected)
            task.add_done_callback(self._undoing.discard)

    async def _undo_queued(self) -> None:
        # The waits before each try, in turn (the last again) while the store does not answer. A local, not a
        # module's Final: compiled, a coroutine read that tuple as never set (a NameError, the task dead).
        delays = (0.05, 0.5, 1.0, 2.0, 4.0)
        failures = undone = 0
        lost = self._lost
        while lost:
            await asyncio.sleep(delays[min(failures, len(delays) - 1)])
            while lost:
                until, specs, windows, member = lost[0]
                if time.monotonic() > until:  # its mark is gone: it stays counted
                    lost.popleft()
                    self._lost_dropped += 1
                    continue
                try:
                    undone += await self._store.undo_lost(specs, windows, member=member)
                except BudgetStoreError:
                    failures += 1
                    break
                lost.popleft()
                failures = 0
        if undone:
            log.info("budget reserves undone: their answers were lost, their requests not admitted", count=undone)
        if self._lost_dropped:
            log.warning("budget reserves whose answers were lost could not be undone (the store did not answer in "
                        "time): they may stay counted", count=self._lost_dropped)  # fmt: skip
            self._lost_dropped = 0

    def _headers(self, counters: list[_Gate], windows: list[_Gate], res: ReserveResult, now_ms: int) -> dict[str, str]:
        # Per dimension, the gate with the smallest remaining amount wins; on a tie, the one that frees up later.
        # Plain loops and one slot per dimension: this runs on every request.
        headers: dict[str, str] = {}
        now = now_ms / 1000
        tokens: _Gate | None = None
        tokens_left = cost_left = 0  # ints: nano-dollar amounts can pass 2**53
        tokens_reset = cost_reset = 0.0
        cost: _Gate | None = None
        values = res.values
        for i in range(len(counters)):
            g = counters[i]
            value = values[i]
            remaining = g.limit - value if value < g.limit else 0
            reset = math.inf if g.reset_at is None else g.reset_at - now
            if g.dimension == "tokens":
                if tokens is None or remaining < tokens_left or (remaining == tokens_left and reset > tokens_reset):
                    tokens, tokens_left, tokens_reset = g, remaining, reset
            elif cost is None or remaining < cost_left or (remaining == cost_left and reset > cost_reset):
                cost, cost_left, cost_reset = g, remaining, reset
        if tokens is not None:
            headers["x-ratelimit-limit-tokens"] = tokens.limit_text
            headers["x-ratelimit-remaining-tokens"] = str(tokens_left)
            if tokens_reset != math.inf:  # one_time budgets never reset: no reset header
                headers["x-ratelimit-reset-tokens"] = str(max(0, math.ceil(tokens_reset)))
        if cost is not None:
            headers["x-ratelimit-limit-cost"] = cost.limit_text
            headers["x-ratelimit-remaining-cost"] = _usd(cost_left)
            if cost_reset != math.inf:
                headers["x-ratelimit-reset-cost"] = str(max(0, math.ceil(cost_reset)))
        best: _Gate | None = None
        best_left = best_reset_ms = 0
        counts, marks = res.counts, res.marks
        for i in range(len(windows)):
            g = windows[i]
            count = counts[i]
            mark = marks[i]
            remaining_requests = g.limit - count if count < g.limit else 0
            reset_ms = 0 if mark is None else max(0, mark + self._window_ms - now_ms)
            if (
                best is None
                or remaining_requests < best_left
                or (remaining_requests == best_left and reset_ms > best_reset_ms)
            ):
                best, best_left, best_reset_ms = g, remaining_requests, reset_ms
        if best is not None:
            headers["x-ratelimit-limit-requests"] = best.limit_text
            headers["x-ratelimit-remaining-requests"] = str(best_left)
            headers["x-ratelimit-reset-requests"] = str(math.ceil(best_reset_ms / 1000))
        return headers

    def _refusal(
        self,
        counters: list[_Gate],
        windows: list[_Gate],
        res: ReserveResult,
        now_ms: int,
        headers: dict[str, str],
        asked: dict[str, int],
    ) -> BudgetExceeded:
        if res.failed < len(counters):
            g, used = counters[res.failed], res.values[res.failed]
            need = asked[g.dimension]
            shown = _usd if g.dimension == "cost" else str
            what = "cost budget" if g.dimension == "cost" else "token budget"
            unit = "USD" if g.dimension == "cost" else "tokens"
            message = (
                f"{what} exceeded for {g.scope} '{g.scope_id}' ({g.period}): "
                f"{shown(used)} of {shown(g.limit)} {unit} used, this request needs up to {shown(need)}"
            )
            code = "cost_budget_exceeded" if g.dimension == "cost" else "token_budget_exceeded"
            # a period budget will not recover within a retry loop: tell SDKs not to retry
            extra = {"x-should-retry": "false"}
        else:
            g = windows[res.failed - len(counters)]
            # Until every full window admits one more, not only the first found full: a client waiting less is
            # refused again by the next one.
            wait_ms = 0
            for j in range(len(windows)):
                if res.counts[j] + 1 > windows[j].limit:
                    mark = res.marks[j]
                    wait_ms = max(wait_ms, self._window_ms if mark is None else mark + self._window_ms - now_ms)
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

    async def extend(self, reservation: Reservation, *, tokens: int, cost_usd: float) -> None:
        """Reserve ``tokens`` and ``cost_usd`` more on the counters ``reservation`` holds, all or nothing: work its
        estimate did not cover (cached items embedded again). Raises as :meth:`reserve` does (no request is counted
        again); the settle then corrects the whole amount. (Were the store's counters lost in between, the
        extension lands on the new ones and the settle, of the older epoch, leaves it: counted in full.)"""
        if reservation.decision != "reserved" or not reservation._open or not reservation.counters:
            return
        cost_nano = nano_up(cost_usd)
        tokens = max(0, tokens)
        now = self._clock()
        counters = list(reservation.counters)
        specs = _specs(counters, tokens, cost_nano, now)
        now_ms = int(now * 1000)
        try:  # (a member of its own: the store marks each admitted reserve by it, see BudgetStore.undo_lost)
            res = await self._reserved(specs, [], now_ms, _getrandbits(128).to_bytes(16, "big").hex(), ())
        except BudgetStoreError as exc:
            if not self._fail_open:
                raise Unavailable(
                    "budget store unavailable; the request was not admitted",
                    code="store_unavailable",
                    headers={"retry-after": "1"},
                ) from exc
            return
        if res.failed >= 0:
            raise self._refusal(counters, [], res, now_ms, {}, {"tokens": tokens, "cost": cost_nano})
        reservation.tokens += tokens
        reservation.cost_nano += cost_nano

    async def settle(self, reservation: Reservation, *, tokens: int, cost_usd: float) -> None:
        """Adjust the reserved counters to the real usage. Idempotent; a store failure is only logged."""
        cost_nano = nano_up(cost_usd)
        await self._adjust(reservation, tokens - reservation.tokens, cost_nano - reservation.cost_nano, "settle")

    async def release(self, reservation: Reservation) -> None:
        """Undo the token and cost reservation (the upstream failed); the request stays counted per minute."""
        await self._adjust(reservation, -reservation.tokens, -reservation.cost_nano, "release")

    async def _adjust(self, reservation: Reservation, d_tokens: int, d_cost: int, what: str) -> None:
        if not reservation._open:
            return
        reservation._open = False  # before awaiting, so a concurrent second call is a no-op too
        deltas = [(g.key, d_tokens if g.dimension == "tokens" else d_cost) for g in reservation.counters]
        deltas = [(k, d) for k, d in deltas if d]
        if deltas:
            await self._apply(deltas, reservation.epoch, what)

    async def _apply(self, deltas: list[tuple[str, int]], epoch: int | None, what: str) -> None:
        try:
            now_ms = int(self._clock() * 1000)
            if epoch is None or not self._adjust_takes_epoch:  # a store (a wrapper) of one's own may not
                await self._store.adjust(deltas, now_ms=now_ms)
            else:
                await self._store.adjust(deltas, now_ms=now_ms, epoch=epoch)
        except BudgetStoreError as exc:
            # A command that timed out may still reach Redis and apply: it is not sent again (it could apply twice).
            log.warning(
                f"budget {what} failed; unless it reached the store late, the counters keep the reserved amounts",
                error=str(exc),
            )

    def _counted(self, scope: str, name: str) -> list[str]:
        """The ids a project or identity named alone is counted under (one per workspace); others as they are."""
        if scope == "project" and "/" not in name:
            return self._qualified.get(name, [name])
        if scope == "identity" and self.qualified_identity(name) is None:
            return [f"{ws}/{name}" for ws in self._workspaces] or [name]
        return [name]

    def qualified_identity(self, name: str) -> tuple[str, str] | None:
        """``(workspace, id)`` when ``name`` is ``<workspace>/<id>`` for a workspace of the keys (the longest, as a
        workspace's name may hold a "/"), else None: an identity id alone."""
        found: tuple[str, str] | None = None
        for ws in self._workspaces:
            if name.startswith(ws + "/") and (found is None or len(ws) > len(found[0])):
                found = (ws, name[len(ws) + 1 :])
        return found

    async def usage(
        self, *, scope: str | None = None, only_id: str | None = None, limit_ids: int = 1000
    ) -> list[dict[str, Any]]:
        """An operator's view: per budget (and per id seen by a ``*`` budget, at most ``limit_ids`` of them, or
        only ``only_id``), the current period's usage.

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
                    counted = self._counted(b.scope, b.target)
                    # an id asked alone ("vip") finds a budget that names it qualified ("acme/vip") too
                    if only_id is not None and only_id != b.target:
                        wanted = {only_id, *self._counted(b.scope, only_id)}
                        counted = [sid for sid in counted if sid in wanted]
                    rows += [(b, sid) for sid in counted]
                    continue
                if only_id is not None:  # one id's usage: no listing of the ids seen
                    rows += [(b, sid) for sid in self._counted(b.scope, only_id)]
                    continue
                listed = await self._store.members(f"seen:{b.scope}", limit_ids, now_ms=int(now * 1000))
                rows += [(b, sid) for sid in listed]
            counter_keys: list[str] = []
            window_keys: list[str] = []
            for b, sid in rows:
                stamp, _ = period_bounds(b.period, now)
                counter_keys += [f"{b.scope}:{sid}:{b.period}:{stamp}:{d}" for d in ("tokens", "cost")]
                window_keys.append(f"rpm:{b.scope}:{sid}")
            got = await self._store.read(counter_keys, window_keys, now_ms=int(now * 1000), window_ms=self._window_ms)
        except BudgetStoreError as exc:
            raise Unavailable(
                "budget store unavailable", code="store_unavailable", headers={"retry-after": "1"}
            ) from exc
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
