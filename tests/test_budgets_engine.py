"""The budget engine: scopes, dimensions, ``*`` targets, headers, failure modes, estimates and prices."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from embedgate import budgets as budgets_module
from embedgate.budgets import (
    BUILTIN_PRICES,
    IMAGE_TOKEN_ALLOWANCE,
    SPECIAL_TOKENS_PER_ITEM,
    BudgetEngine,
    BudgetStoreError,
    CounterSpec,
    MemoryBudgetStore,
    ReadResult,
    RedisBudgetStore,
    ReserveResult,
    Subject,
    WindowSpec,
    cost_usd,
    estimate_tokens,
    model_price,
    period_bounds,
)
from embedgate.config import BudgetConfig, Deployment, ModelConfig
from embedgate.errors import BudgetExceeded, Dialect, Unavailable, render_error
from embedgate.resp import parse_url
from tests.budget_util import T0, Clock
from tests.redis_util import redis_proxy, require_redis

CLOSED_REDIS = "redis://127.0.0.1:6391/0"  # nothing listens here
ALICE = Subject(
    workspace="acme",
    project="search",
    api_key="team-a",
    provider="openai",
    model="openai/text-embedding-3-small",
    identity="alice",
)


def budgets(*items: BudgetConfig) -> tuple[BudgetConfig, ...]:
    return tuple(replace(b, index=i) for i, b in enumerate(items))


def engine(*items: BudgetConfig, clock: Clock | None = None, **kw: Any) -> BudgetEngine:
    return BudgetEngine(budgets(*items), MemoryBudgetStore(), clock=clock or Clock(), **kw)


async def refusal(eng: BudgetEngine, subject: Subject = ALICE, **kw: Any) -> BudgetExceeded:
    with pytest.raises(BudgetExceeded) as exc:
        await eng.reserve(subject, **{"tokens": 1, "cost_usd": 0.0, **kw})
    return exc.value


# --- scopes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "target", "counted_as", "other"),
    [
        ("workspace", "acme", "acme", replace(ALICE, workspace="beta")),
        ("project", "search", "acme/search", replace(ALICE, project="ads")),
        # a qualified target: the same project name in another workspace is another project
        ("project", "acme/search", "acme/search", replace(ALICE, workspace="beta")),
        ("api_key", "team-a", "team-a", replace(ALICE, api_key="team-b")),
        (
            "provider",
            "openai",
            "openai",
            replace(ALICE, provider="cohere", model="cohere/embed-english-v3.0"),
        ),
        ("model", ALICE.model, ALICE.model, replace(ALICE, model="openai/text-embedding-3-large")),
        ("identity", "alice", "acme/alice", replace(ALICE, identity="bob")),
        ("identity", "acme/alice", "acme/alice", replace(ALICE, workspace="beta")),  # another workspace's alice
    ],
)
@pytest.mark.anyio
async def test_each_scope_gates_its_target_only(scope: str, target: str, counted_as: str, other: Subject) -> None:
    eng = engine(BudgetConfig(scope=scope, target=target, requests_per_minute=2), workspaces=("acme", "beta"))
    for _ in range(2):
        await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
    err = await refusal(eng)
    assert (err.scope_kind, err.scope_target_id, err.dimension) == (scope, counted_as, "requests")
    await eng.reserve(other, tokens=1, cost_usd=0.0)  # another target of the scope is not touched


@pytest.mark.anyio
async def test_a_qualified_identity_target_is_that_workspaces_identity_only() -> None:
    # A globex identity whose id is "acme/user-42" was gated (and counted, as globex/acme/user-42) by a budget
    # for acme's user-42.
    eng = engine(BudgetConfig(scope="identity", target="acme/user-42", requests_per_minute=1),
                 workspaces=("acme", "globex"))  # fmt: skip
    spoof = replace(ALICE, workspace="globex", identity="acme/user-42")
    for _ in range(3):
        assert (await eng.reserve(spoof, tokens=1, cost_usd=0.0)).decision == "none"
    acme = replace(ALICE, identity="user-42")
    await eng.reserve(acme, tokens=1, cost_usd=0.0)
    with pytest.raises(BudgetExceeded):
        await eng.reserve(acme, tokens=1, cost_usd=0.0)


@pytest.mark.anyio
async def test_identity_ids_in_a_workspace_whose_name_holds_a_slash() -> None:
    eng = engine(BudgetConfig(scope="identity", target="user-42", token_limit=100), workspaces=("team/a", "team"))
    await eng.reserve(replace(ALICE, workspace="team/a", identity="user-42"), tokens=2, cost_usd=0.0)
    assert eng.qualified_identity("team/a/user-42") == ("team/a", "user-42")  # the longest workspace
    rows = await eng.usage(only_id="team/a/user-42")
    assert [(r["id"], r["tokens"]["used"]) for r in rows] == [("team/a/user-42", 2)]
    rows = await eng.usage(only_id="user-42")
    assert [(r["id"], r["tokens"]["used"]) for r in rows] == [("team/a/user-42", 2), ("team/user-42", 0)]


@pytest.mark.anyio
async def test_a_project_budget_named_alone_lists_every_workspace_s_row_whose_name_holds_a_slash() -> None:
    # The usage view split "acme/team/search" at its first "/", so acme/team's row of project "search" was never
    # listed, though its budget was enforced.
    eng = engine(BudgetConfig(scope="project", target="search", token_limit=1000),
                 projects=[("acme", "search"), ("acme/team", "search")])  # fmt: skip
    for workspace in ("acme", "acme/team"):
        await eng.reserve(replace(ALICE, workspace=workspace), tokens=7, cost_usd=0.0)
    rows = await eng.usage(only_id="search")
    assert [(r["id"], r["tokens"]["used"]) for r in rows] == [("acme/search", 7), ("acme/team/search", 7)]


@pytest.mark.anyio
async def test_identity_budgets_apply_only_to_requests_with_an_identity() -> None:
    eng = engine(BudgetConfig(scope="identity", target="*", requests_per_minute=1))
    anonymous = replace(ALICE, identity=None)
    for _ in range(3):
        res = await eng.reserve(anonymous, tokens=1, cost_usd=0.0)
        assert res.decision == "none"
    await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
    assert (await refusal(eng)).scope_target_id == "acme/alice"  # an identity is its workspace's


@pytest.mark.anyio
async def test_star_target_is_a_separate_budget_per_id() -> None:
    eng = engine(BudgetConfig(scope="identity", target="*", token_limit=100))
    bob = replace(ALICE, identity="bob")
    await eng.reserve(ALICE, tokens=100, cost_usd=0.0)
    err = await refusal(eng, tokens=1)
    assert (err.scope_kind, err.scope_target_id) == ("identity", "acme/alice")
    res = await eng.reserve(bob, tokens=100, cost_usd=0.0)  # alice exhausting hers leaves bob's untouched
    assert res.headers()["x-ratelimit-remaining-tokens"] == "0"
    rows = await eng.usage()
    assert [(r["id"], r["tokens"]["used"]) for r in rows] == [("acme/alice", 100), ("acme/bob", 100)]
    orjson.dumps(rows)  # JSON-ready


@pytest.mark.anyio
async def test_star_ids_are_listed_while_their_period_lasts() -> None:
    # The ids a "*" budget has seen are made up by clients: listed (and stored) while their counters live, then gone.
    clock = Clock(datetime(2025, 3, 14, 23, 0, tzinfo=UTC).timestamp())
    daily = engine(BudgetConfig(scope="identity", target="*", token_limit=100), clock=clock)
    once = engine(BudgetConfig(scope="identity", target="*", period="one_time", token_limit=100), clock=clock)
    for eng in (daily, once):
        await eng.reserve(ALICE, tokens=5, cost_usd=0.0)
    clock.t = datetime(2025, 3, 15, 0, 59, tzinfo=UTC).timestamp()  # the next day, within the hour's grace
    assert [(r["id"], r["tokens"]["used"]) for r in await daily.usage()] == [("acme/alice", 0)]
    clock.t = datetime(2025, 3, 15, 1, 0, tzinfo=UTC).timestamp()
    assert await daily.usage() == []
    assert [(r["id"], r["tokens"]["used"]) for r in await once.usage()] == [("acme/alice", 5)]


@pytest.mark.anyio
async def test_every_applicable_budget_is_a_hard_gate() -> None:
    eng = engine(
        BudgetConfig(scope="workspace", target="acme", token_limit=1000),
        BudgetConfig(scope="api_key", target="team-a", token_limit=50),
        BudgetConfig(scope="model", target="*", token_limit=10_000),
    )
    await eng.reserve(ALICE, tokens=50, cost_usd=0.0)
    err = await refusal(eng, tokens=1)  # the workspace and model have room; the key does not
    assert (err.scope_kind, err.scope_target_id) == ("api_key", "team-a")
    teammate = replace(ALICE, api_key="team-b")
    await eng.reserve(teammate, tokens=900, cost_usd=0.0)
    err = await refusal(eng, teammate, tokens=51)
    assert (err.scope_kind, err.scope_target_id) == ("workspace", "acme")


# --- dimensions -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_token_budget_refusal() -> None:
    eng = engine(BudgetConfig(scope="api_key", target="team-a", period="monthly", token_limit=100))
    await eng.reserve(ALICE, tokens=60, cost_usd=0.0)
    err = await refusal(eng, tokens=60)
    assert (err.status, err.code, err.dimension) == (429, "token_budget_exceeded", "tokens")
    assert err.headers["x-should-retry"] == "false"  # a period budget does not recover within a retry loop
    assert "retry-after" not in err.headers
    assert err.headers["x-ratelimit-remaining-tokens"] == "40"
    assert "60 of 100 tokens used, this request needs up to 60" in err.message  # what was asked, not just used
    body = orjson.loads(render_error(err, Dialect.ORQ))["error"]
    assert (body["code"], body["scope_kind"], body["scope_target_id"], body["dimension"]) == (
        "token_budget_exceeded", "api_key", "team-a", "tokens",
    )  # fmt: skip
    await eng.reserve(ALICE, tokens=40, cost_usd=0.0)  # what fits is still admitted


@pytest.mark.anyio
async def test_cost_budget_refusal() -> None:
    eng = engine(BudgetConfig(scope="project", target="search", amount_usd=0.001))
    await eng.reserve(ALICE, tokens=1, cost_usd=0.0006)
    err = await refusal(eng, cost_usd=0.0006)
    assert (err.code, err.dimension, err.scope_target_id) == ("cost_budget_exceeded", "cost", "acme/search")
    assert err.headers["x-should-retry"] == "false"
    assert err.headers["x-ratelimit-remaining-cost"] == "0.0004"


@pytest.mark.anyio
async def test_rate_limit_refusal_says_when_to_retry() -> None:
    clock = Clock()
    eng = engine(BudgetConfig(scope="api_key", target="team-a", requests_per_minute=1), clock=clock)
    await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
    clock.t = T0 + 20.5
    err = await refusal(eng)
    assert (err.code, err.dimension) == ("requests_per_minute_exceeded", "requests")
    assert err.headers["retry-after"] == "40"  # ceil(39.5): the window admits one more at T0 + 60
    assert "x-should-retry" not in err.headers
    assert err.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.anyio
async def test_period_budget_refusal_is_reported_before_a_rate_limit() -> None:
    # both are full: telling the client to retry in a few seconds would be wrong
    eng = engine(BudgetConfig(scope="api_key", target="team-a", token_limit=5, requests_per_minute=1))
    await eng.reserve(ALICE, tokens=5, cost_usd=0.0)
    assert (await refusal(eng)).code == "token_budget_exceeded"


# --- headers --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_headers_count_down() -> None:
    eng = engine(
        BudgetConfig(scope="api_key", target="team-a", token_limit=1000, amount_usd=0.5, requests_per_minute=5)
    )
    seen = []
    for _ in range(5):
        res = await eng.reserve(ALICE, tokens=100, cost_usd=0.00002)
        h = res.headers()
        seen.append((h["x-ratelimit-remaining-requests"], h["x-ratelimit-remaining-tokens"],
                     h["x-ratelimit-remaining-cost"]))  # fmt: skip
    assert seen == [
        ("4", "900", "0.49998"),
        ("3", "800", "0.49996"),
        ("2", "700", "0.49994"),
        ("1", "600", "0.49992"),
        ("0", "500", "0.4999"),
    ]
    h = res.headers()
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-tokens"], h["x-ratelimit-limit-cost"]) == (
        "5", "1000", "0.5",
    )  # fmt: skip
    assert h["x-ratelimit-reset-requests"] == "60"  # the oldest request leaves the window in 60 s
    assert h["x-ratelimit-reset-tokens"] == h["x-ratelimit-reset-cost"] == str(12 * 3600)  # to UTC midnight


@pytest.mark.anyio
async def test_headers_show_the_most_restrictive_budget_per_dimension() -> None:
    eng = engine(
        BudgetConfig(scope="workspace", target="acme", token_limit=1000, requests_per_minute=100),
        BudgetConfig(scope="api_key", target="team-a", token_limit=500, requests_per_minute=3),
    )
    h = (await eng.reserve(ALICE, tokens=10, cost_usd=0.0)).headers()
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("500", "490")
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("3", "2")
    # another key of the workspace spends most of it: now the workspace has the least left, and wins
    await eng.reserve(replace(ALICE, api_key="team-b"), tokens=900, cost_usd=0.0)
    h = (await eng.reserve(ALICE, tokens=10, cost_usd=0.0)).headers()
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("1000", "80")
    assert "x-ratelimit-limit-cost" not in h  # no budget limits spend


@pytest.mark.anyio
async def test_budgets_counting_the_same_thing_share_one_counter() -> None:
    eng = engine(
        BudgetConfig(scope="api_key", target="team-a", token_limit=1000),
        BudgetConfig(scope="api_key", target="*", token_limit=300),
    )
    h = (await eng.reserve(ALICE, tokens=100, cost_usd=0.0)).headers()
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("300", "200")
    rows = await eng.usage(scope="api_key")
    assert [r["tokens"]["used"] for r in rows] == [100, 100]  # charged once, seen by both


# --- settle, release, cache hits ------------------------------------------------------------------


@pytest.mark.anyio
async def test_release_after_a_failed_upstream_leaves_the_budget_usable() -> None:
    eng = engine(BudgetConfig(scope="api_key", target="team-a", token_limit=100, requests_per_minute=3))
    res = await eng.reserve(ALICE, tokens=80, cost_usd=0.0)
    assert (await refusal(eng, tokens=30)).code == "token_budget_exceeded"
    await eng.release(res)
    res2 = await eng.reserve(ALICE, tokens=80, cost_usd=0.0)
    # the released request still counts against the rate limit: 2 of 3 used
    assert res2.headers()["x-ratelimit-remaining-requests"] == "1"
    await eng.reserve(ALICE, tokens=20, cost_usd=0.0)
    assert (await refusal(eng, tokens=0)).code == "requests_per_minute_exceeded"


@pytest.mark.anyio
async def test_settle_charges_the_real_usage_once() -> None:
    eng = engine(BudgetConfig(scope="api_key", target="team-a", token_limit=1000, amount_usd=1.0))
    res = await eng.reserve(ALICE, tokens=400, cost_usd=0.4)
    await eng.settle(res, tokens=250, cost_usd=0.25)
    await eng.settle(res, tokens=250, cost_usd=0.25)
    await eng.release(res)  # after a settle, a release is a no-op too
    (row,) = await eng.usage()
    assert (row["tokens"]["used"], row["cost_usd"]["used"]) == (250, 0.25)
    assert row["cost_usd"]["remaining"] == 0.75


@pytest.mark.anyio
async def test_cache_hits_charge_only_requests() -> None:
    eng = engine(
        BudgetConfig(scope="api_key", target="team-a", token_limit=100, amount_usd=0.01, requests_per_minute=3)
    )
    await eng.reserve(ALICE, tokens=100, cost_usd=0.01)  # tokens and spend exhausted
    hit = await eng.reserve(ALICE, tokens=100, cost_usd=0.01, cached=True)
    assert hit.decision == "reserved"
    assert hit.headers()["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-remaining-tokens" not in hit.headers()
    (row,) = await eng.usage()
    assert (row["tokens"]["used"], row["cost_usd"]["used"], row["requests_per_minute"]["used"]) == (
        100,
        0.01,
        2,
    )
    await eng.reserve(ALICE, tokens=5, cost_usd=0.0, cached=True)
    assert (await refusal(eng, cached=True)).code == "requests_per_minute_exceeded"


@pytest.mark.anyio
async def test_cache_hit_without_rate_limits_needs_no_budget() -> None:
    eng = engine(BudgetConfig(scope="api_key", target="team-a", token_limit=1))
    await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
    assert (await eng.reserve(ALICE, tokens=10, cost_usd=0.0, cached=True)).decision == "none"


# --- store failures -------------------------------------------------------------------------------


class CountingStore:
    """A memory store that counts the calls made to it (a wrapper: the compiled store takes no subclasses)."""

    def __init__(self) -> None:
        self.inner = MemoryBudgetStore()
        self.calls = 0

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
        self.calls += 1
        return await self.inner.reserve(
            counters, windows, now_ms=now_ms, window_ms=window_ms, member=member, index=index
        )

    async def adjust(self, deltas: Sequence[tuple[str, int]], *, now_ms: int) -> None:
        self.calls += 1
        await self.inner.adjust(deltas, now_ms=now_ms)

    async def read(self, counters: Sequence[str], windows: Sequence[str], *, now_ms: int, window_ms: int) -> ReadResult:
        self.calls += 1
        return await self.inner.read(counters, windows, now_ms=now_ms, window_ms=window_ms)

    async def members(self, key: str, limit: int, *, now_ms: int) -> list[str]:
        self.calls += 1
        return await self.inner.members(key, limit, now_ms=now_ms)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_no_store_call_when_no_budget_applies() -> None:
    store = CountingStore()
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-b", token_limit=10)), store)
    res = await eng.reserve(ALICE, tokens=100, cost_usd=1.0)
    await eng.settle(res, tokens=90, cost_usd=0.9)
    assert (res.decision, res.headers(), store.calls) == ("none", {}, 0)
    await eng.reserve(replace(ALICE, api_key="team-b"), tokens=1, cost_usd=0.0)
    assert store.calls == 1


@pytest.mark.anyio
async def test_a_wrapper_written_before_epochs_still_settles() -> None:
    # The engine passed the Redis store's epoch to every adjust: a wrapper of that store whose adjust took no epoch
    # (as the store's methods were) raised TypeError on every settle, and the reservation kept its estimate.
    class Wrapper:
        def __init__(self, inner: RedisBudgetStore) -> None:
            self.inner = inner

        async def reserve(self, *args: Any, **kwargs: Any) -> Any:
            return await self.inner.reserve(*args, **kwargs)

        async def adjust(self, deltas: Any, *, now_ms: int) -> None:
            await self.inner.adjust(deltas, now_ms=now_ms)

        async def read(self, *args: Any, **kwargs: Any) -> Any:
            return await self.inner.read(*args, **kwargs)

        async def members(self, *args: Any, **kwargs: Any) -> Any:
            return await self.inner.members(*args, **kwargs)

        async def ping(self) -> bool:
            return await self.inner.ping()

        async def aclose(self) -> None:
            await self.inner.aclose()

    store = RedisBudgetStore(require_redis(), prefix=f"eg:test:{uuid.uuid4().hex}:")
    target = f"wrapped-{uuid.uuid4().hex}"
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target=target, token_limit=1000)), Wrapper(store))
    try:
        held = await eng.reserve(replace(ALICE, api_key=target), tokens=100, cost_usd=0.0)
        assert held.epoch is not None
        await eng.settle(held, tokens=10, cost_usd=0.0)
        assert (await eng.usage())[0]["tokens"]["used"] == 10
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_fail_closed_when_redis_is_unreachable() -> None:
    store = RedisBudgetStore(CLOSED_REDIS, socket_timeout=0.5)
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=10)), store)
    try:
        with pytest.raises(Unavailable) as exc:
            await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
        assert (exc.value.status, exc.value.code) == (503, "store_unavailable")
        assert "budget store unavailable" in exc.value.message
        assert not await store.ping()
        with pytest.raises(Unavailable):
            await eng.usage()
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_fail_closed_says_why_once_per_interval() -> None:
    # Failing closed, the 503s were all an operator saw: nothing logged said the store was down, nor why.
    store = RedisBudgetStore(CLOSED_REDIS, socket_timeout=0.5)
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=10)), store)
    try:
        with capture_logs() as logs:
            for _ in range(2):
                with pytest.raises(Unavailable):
                    await eng.reserve(ALICE, tokens=1, cost_usd=0.0)
        assert [(e["log_level"], e["event"]) for e in logs] == [
            ("warning", "budget store unavailable, refusing budgeted requests (503)")
        ]
        assert "Connect" in logs[0]["error"] or "connect" in logs[0]["error"], logs[0]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_fail_open_admits_and_warns_once_per_interval() -> None:
    store = RedisBudgetStore(CLOSED_REDIS, socket_timeout=0.5)
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=10)), store, fail_open=True)
    try:
        with capture_logs() as logs:
            first = await eng.reserve(ALICE, tokens=100, cost_usd=0.0)
            second = await eng.reserve(ALICE, tokens=100, cost_usd=0.0)
        assert (first.decision, second.decision) == ("fail_open", "fail_open")
        assert first.headers() == {}
        assert [e["log_level"] for e in logs] == ["warning"]
        await eng.settle(first, tokens=5, cost_usd=0.0)
        await eng.release(second)
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_settle_and_release_never_raise_when_the_store_fails() -> None:
    the_budgets = budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=1000))
    healthy = BudgetEngine(the_budgets, MemoryBudgetStore())
    res1 = await healthy.reserve(ALICE, tokens=100, cost_usd=0.0)
    res2 = await healthy.reserve(ALICE, tokens=100, cost_usd=0.0)
    store = RedisBudgetStore(CLOSED_REDIS, socket_timeout=0.5)
    broken = BudgetEngine(the_budgets, store)  # as if the store went down after the reservation
    try:
        with capture_logs() as logs:
            await broken.settle(res1, tokens=50, cost_usd=0.0)
            await broken.release(res2)
        assert [e["log_level"] for e in logs] == ["warning", "warning"]
    finally:
        await store.aclose()


# --- estimates, prices, periods -------------------------------------------------------------------


def test_estimate_tokens_bounds_text_by_its_utf8_bytes() -> None:
    extra = SPECIAL_TOKENS_PER_ITEM
    assert estimate_tokens("hello") == 5 + extra
    assert estimate_tokens(["hello", "héllo", "日本"]) == (5 + extra) + (6 + extra) + (6 + extra)
    assert estimate_tokens([1, 2, 3]) == 3  # one token-id list: exact
    assert estimate_tokens([(1, 2, 3), [4, 5]]) == 5
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    item = {"content": [{"type": "text", "text": "a cat"}, image, image]}
    assert estimate_tokens([item]) == 5 + extra + 2 * IMAGE_TOKEN_ALLOWANCE
    assert estimate_tokens([item], image_tokens=10) == 5 + extra + 20


def test_cost_and_prices() -> None:
    assert cost_usd(1_000_000, 0.02) == pytest.approx(0.02)
    assert cost_usd(1500, 0.13) == pytest.approx(0.000195)
    assert BUILTIN_PRICES["openai/text-embedding-3-small"] == 0.02
    models = {
        "openai/text-embedding-3-small": ModelConfig(
            id="openai/text-embedding-3-small", deployments=(), price_per_million_tokens=0.5
        )
    }
    assert model_price("openai/text-embedding-3-small", models) == 0.5  # configured beats built-in
    assert model_price("openai/text-embedding-3-large", models) == 0.13
    local = Deployment(provider="local", upstream_model="te3s", price_per_million_tokens=0.0)
    assert model_price("openai/text-embedding-3-small", models, local) == 0.0
    assert model_price("local/unknown", models) is None


@pytest.mark.parametrize(
    ("period", "at", "stamp", "end"),
    [
        ("daily", datetime(2025, 3, 14, 23, 59, tzinfo=UTC), "2025-03-14", datetime(2025, 3, 15, tzinfo=UTC)),
        ("weekly", datetime(2025, 3, 16, 23, 0, tzinfo=UTC), "2025-W11", datetime(2025, 3, 17, tzinfo=UTC)),
        ("weekly", datetime(2025, 3, 17, 0, 0, tzinfo=UTC), "2025-W12", datetime(2025, 3, 24, tzinfo=UTC)),
        (
            "weekly",
            datetime(2024, 12, 31, tzinfo=UTC),
            "2025-W01",
            datetime(2025, 1, 6, tzinfo=UTC),
        ),  # ISO year
        ("monthly", datetime(2024, 12, 31, 5, tzinfo=UTC), "2024-12", datetime(2025, 1, 1, tzinfo=UTC)),
        ("monthly", datetime(2024, 2, 29, tzinfo=UTC), "2024-02", datetime(2024, 3, 1, tzinfo=UTC)),
        ("yearly", datetime(2025, 7, 1, tzinfo=UTC), "2025", datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_period_bounds_are_utc_calendar_periods(period: str, at: datetime, stamp: str, end: datetime) -> None:
    assert period_bounds(period, at.timestamp()) == (stamp, end.timestamp())


def test_one_time_period_never_ends() -> None:
    assert period_bounds("one_time", T0) == ("all", None)


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0"),
        (40, "0.00000004"),
        (1_000_000_000, "1"),
        (1_500_000_000, "1.5"),
        (999_999_999, "0.999999999"),
        (123_000_000_050, "123.00000005"),
        (10**16 + 5, "10000000.000000005"),  # past 2**53: exact, never through a float
    ],
)
def test_usd_text_of_nano_dollars(nano: int, text: str) -> None:
    """The x-ratelimit-*-cost headers' USD text: no trailing zeros, no float rounding."""
    assert budgets_module._usd(nano) == text


@pytest.mark.anyio
@pytest.mark.parametrize("step", ["reserve", "extend", "reserve, then shut down"])
async def test_a_reserve_cancelled_while_redis_is_slow_is_undone_when_it_lands(step: str) -> None:
    # A host's timeout (or the server's graceful shutdown) cancelled the reserve while Redis was slow: Redis ran it
    # all the same, and with no reservation in the request's hands nothing released it. The tokens of a request
    # that was answered 503 stayed counted until the period's end. The gateway's shutdown, closing the store right
    # after, cut the late answer off (and the undo with it), unless it waits for them (drain).
    slow = asyncio.Event()

    async def slow_scripts(data: bytes) -> None:
        if slow.is_set() and b"EVAL" in data:
            await asyncio.sleep(0.3)

    prefix = f"eg:test:{uuid.uuid4().hex}:"
    target = f"slow-{uuid.uuid4().hex}"
    config = budgets(BudgetConfig(scope="api_key", target=target, token_limit=1000))
    subject = replace(ALICE, api_key=target)
    async with redis_proxy(require_redis(), to_redis=slow_scripts) as proxied:
        store = RedisBudgetStore(proxied, prefix=prefix)
        eng = BudgetEngine(config, store)
        try:
            held = await eng.reserve(subject, tokens=10, cost_usd=0.0)
            slow.set()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    if step == "extend":
                        await eng.extend(held, tokens=100, cost_usd=0.0)
                    else:
                        await eng.reserve(subject, tokens=100, cost_usd=0.0)
            if step == "reserve, then shut down":
                await eng.drain(5.0)  # as the gateway's shutdown does, before it closes the store
            else:  # Redis runs it meanwhile; its answer comes, and the undo (polled: a loaded machine is slow)
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if not eng._undoing:
                        break
        finally:
            await store.aclose()
    store = RedisBudgetStore(require_redis(), prefix=prefix)
    try:
        assert (await BudgetEngine(config, store).usage())[0]["tokens"]["used"] == 10
    finally:
        await store.aclose()


async def _usage_row(config: tuple[BudgetConfig, ...], prefix: str) -> dict[str, Any]:
    """The one budget's usage row, read from the test Redis under ``prefix``."""
    store = RedisBudgetStore(require_redis(), prefix=prefix)
    try:
        (row,) = await BudgetEngine(config, store).usage()
        return row
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("step", ["reserve", "extend", "reserve, fail_open", "reserve, cancelled"])
async def test_a_reserve_whose_answer_is_lost_is_undone_if_redis_ran_it(step: str) -> None:
    # The connection cut after Redis ran the reserve (a failover, a proxy's reset, CLIENT KILL): the client was
    # answered 503 store_unavailable ("never charged"), and its reserve stayed counted until the period's end (a
    # one_time budget's, for ever), its request in the minute's window too.
    cut = asyncio.Event()
    slow = asyncio.Event()

    async def cut_the_answer(data: bytes) -> None:
        if cut.is_set():
            cut.clear()
            raise ConnectionResetError("cut")  # the proxy drops Redis's answer and both connections

    async def slow_scripts(data: bytes) -> None:
        if slow.is_set() and b"EVAL" in data:
            slow.clear()
            cut.set()  # its answer is lost too, after the caller gave up on it
            await asyncio.sleep(0.3)

    prefix = f"eg:test:{uuid.uuid4().hex}:"
    target = f"cut-{uuid.uuid4().hex}"
    config = budgets(BudgetConfig(scope="api_key", target=target, token_limit=1000, requests_per_minute=100))
    subject = replace(ALICE, api_key=target)
    async with redis_proxy(require_redis(), to_redis=slow_scripts, to_client=cut_the_answer) as proxied:
        store = RedisBudgetStore(proxied, prefix=prefix)
        eng = BudgetEngine(config, store, fail_open=step == "reserve, fail_open")
        try:
            held = await eng.reserve(subject, tokens=10, cost_usd=0.0)
            if step == "reserve, cancelled":
                slow.set()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await eng.reserve(subject, tokens=100, cost_usd=0.0)
            else:
                cut.set()
                if step == "extend":
                    with pytest.raises(Unavailable):
                        await eng.extend(held, tokens=100, cost_usd=0.0)
                elif step == "reserve":
                    with pytest.raises(Unavailable):
                        await eng.reserve(subject, tokens=100, cost_usd=0.0)
                else:
                    assert (await eng.reserve(subject, tokens=100, cost_usd=0.0)).decision == "fail_open"
            await eng.drain(5.0)  # the undo, once Redis answers again (the next command reconnects)
        finally:
            await store.aclose()
    row = await _usage_row(config, prefix)
    assert row["tokens"]["used"] == 10, row
    # a request refused with a 503 leaves the minute's window too; one cancelled by its client stays counted
    assert row["requests_per_minute"]["used"] == (2 if step == "reserve, cancelled" else 1), row


@pytest.mark.anyio
async def test_a_lost_reserve_that_reaches_redis_after_its_undo_changes_nothing() -> None:
    # The connection cut while the reserve was still on its way (a proxy's reset): its undo came first, found no
    # mark, and the reserve, run after it within its deadline, stayed counted for a request refused with a 503.
    address = parse_url(require_redis())
    held: list[bytes] = []
    late_ran = asyncio.Event()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(address.host, address.port)

        async def back() -> None:
            while data := await redis_reader.read(65536):
                writer.write(data)

        answers = asyncio.ensure_future(back())
        try:
            while data := await reader.read(65536):
                if held == [b"hold"] and b"EVALSHA" in data and b"EVALSHA" in data[:40]:
                    held[0] = data
                    writer.transport.abort()  # the client's connection cut: its reserve still on its way
                    await asyncio.sleep(0.3)  # (its deadline is 0.8 s away: it runs when it arrives)
                    redis_writer.write(data)
                    await redis_writer.drain()
                    await asyncio.sleep(0.1)
                    late_ran.set()
                    break
                redis_writer.write(data)
                await redis_writer.drain()
        finally:
            answers.cancel()
            redis_writer.close()
            writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    proxied = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/{address.db}"
    prefix = f"eg:test:{uuid.uuid4().hex}:"
    target = f"late-{uuid.uuid4().hex}"
    config = budgets(BudgetConfig(scope="api_key", target=target, token_limit=1000, requests_per_minute=100))
    subject = replace(ALICE, api_key=target)
    store = RedisBudgetStore(proxied, prefix=prefix)
    eng = BudgetEngine(config, store)
    try:
        await eng.reserve(subject, tokens=10, cost_usd=0.0)
        held.append(b"hold")
        with pytest.raises(Unavailable):
            await eng.reserve(subject, tokens=100, cost_usd=0.0)
        await eng.drain(5.0)  # the undo ran before the reserve reached Redis
        await asyncio.wait_for(late_ran.wait(), 5.0)
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()
    row = await _usage_row(config, prefix)
    assert (row["tokens"]["used"], row["requests_per_minute"]["used"]) == (10, 1), row


@pytest.mark.anyio
async def test_only_a_reserve_that_went_out_is_undone() -> None:
    # A reserve refused at connect never reached Redis: it was queued to be undone all the same, 10,000 of them
    # filling the queue (pushing out the ones lost on their way) and sent to Redis in a burst when it came back.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    store = RedisBudgetStore(f"redis://127.0.0.1:{port}/0")
    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=1000)), store,
                       fail_open=True)  # fmt: skip
    try:
        for _ in range(3):
            assert (await eng.reserve(ALICE, tokens=10, cost_usd=0.0)).decision == "fail_open"
        assert not eng._undoing and not eng._lost
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_store_of_ones_own_without_undo_lost_still_serves() -> None:
    # The undo task called store.undo_lost on a wrapper written before it: an AttributeError, a traceback a request.
    class Failing(CountingStore):
        async def reserve(self, *args: Any, **kwargs: Any) -> ReserveResult:
            raise BudgetStoreError("cut")

    eng = BudgetEngine(budgets(BudgetConfig(scope="api_key", target="team-a", token_limit=1000)), Failing(),
                       fail_open=True)  # fmt: skip
    eng._immediate = False  # (as a wrapper of the Redis store is: it may lose an answer)
    assert (await eng.reserve(ALICE, tokens=10, cost_usd=0.0)).decision == "fail_open"
    assert not eng._undoing and not eng._lost


@pytest.mark.anyio
async def test_reserves_lost_together_are_undone_by_one_task_once_redis_answers_again() -> None:
    # Each lost reserve had a task of its own retrying it: with Redis away, thousands of them at once.
    cut_until = 0.0

    async def cut_answers(data: bytes) -> None:
        if asyncio.get_running_loop().time() < cut_until:
            raise ConnectionResetError("cut")

    prefix = f"eg:test:{uuid.uuid4().hex}:"
    target = f"cut-{uuid.uuid4().hex}"
    config = budgets(BudgetConfig(scope="api_key", target=target, token_limit=10_000, requests_per_minute=100))
    subject = replace(ALICE, api_key=target)
    async with redis_proxy(require_redis(), to_client=cut_answers) as proxied:
        store = RedisBudgetStore(proxied, prefix=prefix)
        eng = BudgetEngine(config, store)
        try:
            await eng.reserve(subject, tokens=10, cost_usd=0.0)  # (and Redis's clock read)
            cut_until = asyncio.get_running_loop().time() + 3600.0
            results = await asyncio.gather(*[eng.reserve(subject, tokens=10, cost_usd=0.0) for _ in range(20)],
                                           return_exceptions=True)  # fmt: skip
            assert all(isinstance(r, Unavailable) for r in results), results
            assert len(eng._undoing) == 1  # one task for all twenty
            await asyncio.sleep(0.3)  # its first attempts fail too (their answers cut)
            cut_until = 0.0
            await eng.drain(10.0)
        finally:
            await store.aclose()
    row = await _usage_row(config, prefix)
    assert (row["tokens"]["used"], row["requests_per_minute"]["used"]) == (10, 1), row


def test_a_fallbacks_charge_is_its_answer_and_the_chunks_it_spent() -> None:
    # What settles a fallback's own budgets: the answer's usage if it served (all billed but other models' chunks),
    # plus the chunks it embedded before it failed.
    from embedgate.errors import Dialect
    from embedgate.pipeline import Call, _charged_by

    call = Call(dialect=Dialect.OPENAI, body=b"", request_id="r")
    call.billed_tokens, call.cost_usd = 10, 1.0
    call.spent = [("a/one", 3, 0.25), ("b/two", 2, 0.5)]
    call.served_model = "b/two"
    assert _charged_by(call, "b/two") == (7, 0.75)  # 10 - 5 of the answer, and its own 2
    assert _charged_by(call, "a/one") == (3, 0.25)
    assert _charged_by(call, "c/three") == (0, 0.0)
    call.served_model = ""  # none served: only what each spent
    assert _charged_by(call, "b/two") == (2, 0.5)


def test_tighter_headers_take_the_budget_with_less_left_per_dimension() -> None:
    from embedgate.budgets import tighter_headers

    headers = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900",
               "x-ratelimit-reset-tokens": "60", "x-ratelimit-limit-cost": "50", "x-ratelimit-remaining-cost": "9",
               "x-ratelimit-reset-cost": "60", "x-ratelimit-limit-requests": "10"}  # fmt: skip
    # tokens: less left, of a one_time budget (no reset); cost: more left (10 > 9 as numbers, not as text)
    other = {"x-ratelimit-limit-tokens": "8", "x-ratelimit-remaining-tokens": "5", "x-ratelimit-limit-cost": "90",
             "x-ratelimit-remaining-cost": "10", "x-ratelimit-reset-cost": "1"}  # fmt: skip
    tighter_headers(headers, other)
    assert headers == {"x-ratelimit-limit-tokens": "8", "x-ratelimit-remaining-tokens": "5",
                       "x-ratelimit-limit-cost": "50", "x-ratelimit-remaining-cost": "9",
                       "x-ratelimit-reset-cost": "60", "x-ratelimit-limit-requests": "10"}  # fmt: skip
    tighter_headers(headers, {"x-ratelimit-limit-cost": "1", "x-ratelimit-remaining-cost": "0.125",
                              "x-ratelimit-reset-cost": "9"})  # fmt: skip
    assert (headers["x-ratelimit-remaining-cost"], headers["x-ratelimit-reset-cost"]) == ("0.125", "9")
    # a tie: the budget that frees up later, a one_time one (no reset) latest of all
    tighter_headers(headers, {"x-ratelimit-limit-cost": "2", "x-ratelimit-remaining-cost": "0.125",
                              "x-ratelimit-reset-cost": "30"})  # fmt: skip
    assert (headers["x-ratelimit-limit-cost"], headers["x-ratelimit-reset-cost"]) == ("2", "30")
    tighter_headers(headers, {"x-ratelimit-limit-cost": "3", "x-ratelimit-remaining-cost": "0.125"})
    assert (headers["x-ratelimit-limit-cost"], "x-ratelimit-reset-cost" in headers) == ("3", False)
    tighter_headers(headers, {"x-ratelimit-limit-cost": "4", "x-ratelimit-remaining-cost": "0.125",
                              "x-ratelimit-reset-cost": "99"})  # fmt: skip
    assert headers["x-ratelimit-limit-cost"] == "3"
