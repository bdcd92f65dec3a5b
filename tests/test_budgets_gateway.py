"""Budgets, keys and identities as clients see them, through the real gateway (SPEC sections 4, 6 and 7).

Every scope and dimension refuses with 429 once spent; ``*`` targets keep one budget per id, wherever the
identity came from; the ``x-ratelimit-*`` headers name the most restrictive budget and count down; each route
renders a refusal in its own shape; cache hits charge requests per minute only; failed upstream calls leak no
reservation; OpenRouter's ``usage.cost`` is tokens x price; an unreachable store fails closed (or open when
configured); the admin endpoints and CLI show usage and identities.

Token-id inputs keep the arithmetic exact: their estimate is their length, and the fake upstream reports
their length as usage. A string is estimated at its UTF-8 byte length + 2 and billed by the fake upstream at
its word count, which shows the settlement correcting a reservation to the real usage.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from embedgate.cli import main as cli_main
from embedgate.config import Config, parse_config
from embedgate.gateway import EmbeddingGateway
from tests.conftest import KEY, OTHER_KEY, config_dict, gateway, serve
from tests.fake_upstream import FakeUpstream, Fault, expected_vector, free_port, tokens_of
from tests.redis_util import redis_proxy, require_redis

SAME_WORKSPACE_KEY = "sk-test-team-a2-5555555555"  # team-a2: workspace acme, project other
ADMIN_KEY = "adm-test-0123456789abcdef"
# One US dollar per token: cost limits then read as token counts, and the spend arithmetic is exact.
DOLLAR_A_TOKEN = 1_000_000.0
ROUTES = {"openai": "/v1/embeddings", "orq": "/v2/router/embeddings", "openrouter": "/api/v1/embeddings"}


def budget_config(upstream_url: str, budgets: list[dict[str, Any]], **overrides: Any) -> Config:
    """The shared test config with ``budgets``, a third key in workspace acme, priced models and an admin key."""
    data = config_dict(upstream_url, budgets=budgets, **overrides)
    data["keys"] = [
        *data["keys"],
        {"id": "team-a2", "key": SAME_WORKSPACE_KEY, "workspace": "acme", "project": "other"},
    ]
    if "models" not in overrides:
        data["models"] = {
            **data["models"],
            "local/embed-small": {"price_per_million_tokens": DOLLAR_A_TOKEN},
            "backup/embed-small": {"price_per_million_tokens": DOLLAR_A_TOKEN},
        }
    # Failing requests must reach the upstream every time, not be cut short by an open circuit breaker.
    data["routing"] = {**data["routing"], "breaker_failures": 1000}
    data.setdefault("admin", {"key": ADMIN_KEY})
    return parse_config(data, env={})


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[EmbeddingGateway, httpx.AsyncClient]]:
    """The gateway in process behind an httpx client; its stores are closed afterwards."""
    app = gateway(config)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            yield app, client
    finally:
        await app.shutdown()


async def embed(
    client: httpx.AsyncClient,
    inputs: Any,
    *,
    key: str = KEY,
    route: str = "openai",
    model: str = "local/embed-small",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> httpx.Response:
    """One embedding POST on ``route`` (openai | orq | openrouter)."""
    body = {"model": model, "input": inputs, **extra}
    return await client.post(ROUTES[route], json=body, headers={"authorization": f"Bearer {key}", **(headers or {})})


async def admin_usage(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    """``GET /admin/usage`` rows."""
    r = await client.get("/admin/usage", params=params, headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return rows


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of a response body."""
    err: dict[str, Any] = r.json()["error"]
    return err


# --- every scope x every dimension -----------------------------------------------------------------------

# (scope, configured target, id the refusal names)
SCOPES = [
    ("workspace", "acme", "acme"),
    ("project", "search", "acme/search"),
    ("identity", "alice", "acme/alice"),
    ("api_key", "team-a", "team-a"),
    ("provider", "local", "local"),
    ("model", "local/embed-small", "local/embed-small"),
]
# (config field, limit admitting exactly two requests of 3 tokens / $3, code, dimension)
DIMENSIONS = [
    ("requests_per_minute", 2, "requests_per_minute_exceeded", "requests"),
    ("token_limit", 6, "token_budget_exceeded", "tokens"),
    ("amount_usd", 6.0, "cost_budget_exceeded", "cost"),
]


@pytest.mark.parametrize(("field", "limit", "code", "dimension"), DIMENSIONS, ids=[d[0] for d in DIMENSIONS])
@pytest.mark.parametrize(("scope", "target", "counted_as"), SCOPES, ids=[s[0] for s in SCOPES])
@pytest.mark.anyio
async def test_each_scope_and_dimension_refuses_once_spent(
    upstream: FakeUpstream, scope: str, target: str, counted_as: str, field: str, limit: float, code: str,
    dimension: str,
) -> None:  # fmt: skip
    config = budget_config(upstream.url, [{"scope": scope, "target": target, field: limit}])
    alice: dict[str, Any] = {"identity": {"id": "alice"}}
    async with running(config) as (_, c):
        for _ in range(2):
            r = await embed(c, [1, 2, 3], route="orq", **alice)
            assert r.status_code == 200, r.text
        r = await embed(c, [1, 2, 3], route="orq", **alice)
        assert r.status_code == 429, r.text
        err = error_of(r)
        assert (err["code"], err["scope_kind"], err["scope_target_id"], err["dimension"]) == (
            code, scope, counted_as, dimension,
        )  # fmt: skip
        assert len(upstream.calls) == 2  # the refused request never reached the upstream
        # another workspace, project, key, provider, model and identity: not touched by this budget
        r = await embed(c, [1, 2, 3], key=OTHER_KEY, model="backup/embed-small", route="orq",
                        identity={"id": "bob"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert len(upstream.calls) == 3


@pytest.mark.parametrize(
    ("scope", "first", "second"),
    [
        # each case: (request kwargs, id counted) for two different targets of the scope
        ("workspace", ({"key": KEY}, "acme"), ({"key": OTHER_KEY, "model": "backup/embed-small"}, "globex")),
        ("project", ({"key": KEY}, "acme/search"), ({"key": SAME_WORKSPACE_KEY}, "acme/other")),
        ("api_key", ({"key": KEY}, "team-a"), ({"key": SAME_WORKSPACE_KEY}, "team-a2")),
        ("provider", ({}, "local"), ({"model": "backup/embed-small"}, "backup")),
        ("model", ({}, "local/embed-small"), ({"model": "local/embed-large"}, "local/embed-large")),
        ("identity", ({"identity": {"id": "alice"}}, "acme/alice"), ({"identity": {"id": "bob"}}, "acme/bob")),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.anyio
async def test_star_target_is_one_budget_per_id(
    upstream: FakeUpstream, scope: str, first: tuple[dict[str, Any], str], second: tuple[dict[str, Any], str]
) -> None:
    config = budget_config(upstream.url, [{"scope": scope, "target": "*", "requests_per_minute": 1}])
    async with running(config) as (_, c):
        (kw_a, id_a), (kw_b, id_b) = first, second
        assert (await embed(c, "x", route="orq", **kw_a)).status_code == 200
        r = await embed(c, "x", route="orq", **kw_a)
        assert r.status_code == 429
        assert (error_of(r)["scope_kind"], error_of(r)["scope_target_id"]) == (scope, id_a)
        # the other id has its own, untouched budget
        assert (await embed(c, "x", route="orq", **kw_b)).status_code == 200
        r = await embed(c, "x", route="orq", **kw_b)
        assert (r.status_code, error_of(r)["scope_target_id"]) == (429, id_b)


@pytest.mark.anyio
async def test_identity_from_body_deprecated_orq_fields_and_header(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "identity", "target": "*", "requests_per_minute": 1}])
    sources: list[tuple[str, dict[str, Any]]] = [
        ("alice", {"identity": {"id": "alice"}}),
        ("bob", {"orq": {"contact": {"id": "bob", "display_name": "Bob"}}}),
        ("carol", {"orq": {"identity": {"id": "carol"}}}),
        ("dave", {"headers": {"X-ORQ-IDENTITY-ID": "dave"}}),
        ("erin", {"headers": {"X-ORQ-CONTACT-ID": "erin"}}),
        # the body wins over the header
        ("frank", {"identity": {"id": "frank"}, "headers": {"X-ORQ-IDENTITY-ID": "gina"}}),
    ]
    async with running(config) as (_, c):
        for ident, kw in sources:
            r = await embed(c, "x", route="orq", **kw)
            assert r.status_code == 200, (ident, r.text)
            r = await embed(c, "x", route="orq", **kw)
            assert r.status_code == 429, ident
            assert error_of(r)["scope_target_id"] == f"acme/{ident}"
        # gina was never charged: the header lost to frank's body identity
        r = await embed(c, "x", route="orq", headers={"X-ORQ-IDENTITY-ID": "gina"})
        assert r.status_code == 200
        # a request without an identity is not subject to identity budgets at all
        for _ in range(3):
            assert (await embed(c, "x", route="orq")).status_code == 200


# --- headers -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_headers_show_the_most_restrictive_budget_and_count_down(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [
        {"scope": "workspace", "target": "acme", "requests_per_minute": 10},
        {"scope": "api_key", "target": "team-a", "requests_per_minute": 3},
        {"scope": "project", "target": "search", "token_limit": 1000},
        {"scope": "api_key", "target": "team-a", "token_limit": 100},
        {"scope": "workspace", "target": "acme", "amount_usd": 50},
        {"scope": "model", "target": "local/embed-small", "amount_usd": 80},
    ])  # fmt: skip
    async with running(config) as (_, c):
        seen = []
        for _ in range(3):
            # "one two": reserved at 7 bytes + 2 = 9 tokens, billed at 2 (two words)
            r = await embed(c, "one two")
            assert r.status_code == 200, r.text
            h = r.headers
            assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-tokens"], h["x-ratelimit-limit-cost"]) == (
                "3", "100", "50",
            )  # fmt: skip
            assert 0 < int(h["x-ratelimit-reset-requests"]) <= 60
            assert 0 < int(h["x-ratelimit-reset-tokens"]) <= 86400  # daily: the next UTC midnight
            assert 0 < int(h["x-ratelimit-reset-cost"]) <= 86400
            seen.append((h["x-ratelimit-remaining-requests"], h["x-ratelimit-remaining-tokens"],
                         h["x-ratelimit-remaining-cost"]))  # fmt: skip
        # remaining as of each reservation: earlier requests settled to their real 2 tokens ($2), this one
        # holds its estimate of 9
        assert seen == [("2", "91", "41"), ("1", "89", "39"), ("0", "87", "37")]
        r = await embed(c, "one two")
        assert r.status_code == 429
        err = error_of(r)
        assert err["code"] == "requests_per_minute_exceeded"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        usage = {row["budget"]: row for row in await admin_usage(c)}  # one row per configured budget
        assert usage[1]["requests_per_minute"] == {"used": 3, "limit": 3, "remaining": 0}
        assert usage[0]["requests_per_minute"] == {"used": 3, "limit": 10, "remaining": 7}
        assert usage[3]["tokens"] == {"used": 6, "limit": 100, "remaining": 94}
        assert usage[4]["cost_usd"] == {"used": 6.0, "limit": 50, "remaining": 44.0}


@pytest.mark.anyio
async def test_most_restrictive_is_the_least_remaining_not_the_smallest_limit(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [
        {"scope": "api_key", "target": "team-a", "token_limit": 40},
        {"scope": "workspace", "target": "acme", "token_limit": 1000},
    ])  # fmt: skip
    async with running(config) as (_, c):
        # another key of the same workspace spends most of the workspace's budget
        r = await embed(c, [1] * 970, key=SAME_WORKSPACE_KEY)
        assert r.status_code == 200, r.text
        r = await embed(c, [1, 2])
        assert r.status_code == 200
        assert (r.headers["x-ratelimit-limit-tokens"], r.headers["x-ratelimit-remaining-tokens"]) == ("1000", "28")
        r = await embed(c, [1] * 30)  # within team-a's 40, beyond the workspace's remaining 28
        assert r.status_code == 429
        assert (error_of(r)["code"], r.headers["x-ratelimit-remaining-tokens"]) == ("token_budget_exceeded", "28")


@pytest.mark.anyio
async def test_a_cost_budget_counts_requests_under_half_a_nano_dollar(upstream: FakeUpstream) -> None:
    # Rounded to the nearest nano-dollar, a one-token request at $0.0004 per million (0.4 nano-dollars) was counted
    # as nothing: every request was admitted, the budget overshot, and its counter disagreed with the spend metric.
    cheap = {"local/embed-small": {"price_per_million_tokens": 0.0004}}
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "amount_usd": 3e-9}], models=cheap)
    async with running(config) as (gw, c):
        statuses = [(await embed(c, "one")).status_code for _ in range(4)]
        (row,) = await gw.budgets.usage()  # type: ignore[union-attr]
    # Each reserves its estimate (5 tokens: 2 nano-dollars) and is counted as a whole nano-dollar, rounded up: the
    # third would pass the budget, so it is refused.
    assert statuses == [200, 200, 429, 429]
    assert row["cost_usd"]["used"] == 2e-9


# --- error shapes per route ----------------------------------------------------------------------------

REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    # dimension: (the limits of a budget refusing a 3-token, $3 request (the second one per minute), code)
    "requests": ({"requests_per_minute": 1}, "requests_per_minute_exceeded"),
    "tokens": ({"token_limit": 2}, "token_budget_exceeded"),
    "cost": ({"amount_usd": 2.0}, "cost_budget_exceeded"),
}


@pytest.mark.parametrize("dimension", list(REFUSALS))
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.anyio
async def test_refusal_shape_per_route(upstream: FakeUpstream, route: str, dimension: str) -> None:
    limits, code = REFUSALS[dimension]
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", **limits}])
    async with running(config) as (_, c):
        if dimension == "requests":
            assert (await embed(c, [1, 2, 3], route=route)).status_code == 200
        r = await embed(c, [1, 2, 3], route=route)  # 3 tokens, $3: above 2 tokens, $2
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/json"
    err = error_of(r)
    if route == "openai":
        assert set(err) == {"message", "type", "param", "code"}
        assert (err["code"], err["type"], err["param"]) == (code, "rate_limit_error", None)
    elif route == "orq":
        assert set(err) == {"message", "type", "param", "code", "scope_kind", "scope_target_id", "dimension"}
        assert (err["code"], err["scope_kind"], err["scope_target_id"], err["dimension"]) == (
            code, "api_key", "team-a", dimension,
        )  # fmt: skip
    else:
        assert set(err) == {"code", "message", "metadata"}
        assert err["code"] == 429
        assert err["metadata"]["code"] == code
        assert (err["metadata"]["scope_kind"], err["metadata"]["dimension"]) == ("api_key", dimension)
    assert "team-a" in err["message"]
    if dimension == "requests":
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "x-should-retry" not in r.headers
    else:
        # a period budget does not recover within an SDK's retry loop
        assert r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers
        assert r.headers[f"x-ratelimit-limit-{dimension}"] == "2"


@pytest.mark.parametrize("dimension", list(REFUSALS))
def test_openai_python_raises_rate_limit_error_with_the_code(upstream: FakeUpstream, dimension: str) -> None:
    limits, code = REFUSALS[dimension]
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", **limits}])
    with serve(gateway(config)) as url, openai.OpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0) as client:
        if dimension == "requests":
            client.embeddings.create(model="local/embed-small", input=[1, 2, 3])
        with pytest.raises(openai.RateLimitError) as exc:
            client.embeddings.create(model="local/embed-small", input=[1, 2, 3])
    assert exc.value.status_code == 429
    assert exc.value.code == code
    assert exc.value.type == "rate_limit_error"
    assert len(upstream.calls) == (1 if dimension == "requests" else 0)


def test_orq_and_openrouter_sdks_see_the_refusal(upstream: FakeUpstream) -> None:
    from openrouter import OpenRouter, errors
    from orq_ai_sdk import Orq
    from orq_ai_sdk.models import OrqError

    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 2}])
    with serve(gateway(config)) as url:
        # the orq SDK models no 429 for embeddings: it raises its generic API error, carrying our body
        with Orq(api_key=KEY, server_url=url) as orq, pytest.raises(OrqError) as orq_info:
            orq.router.embeddings.create(input="one two three", model="local/embed-small")
        with (
            OpenRouter(api_key=KEY, server_url=f"{url}/api/v1") as client,
            pytest.raises(errors.TooManyRequestsResponseError) as or_info,
        ):
            client.embeddings.generate(input="one two three", model="local/embed-small")
    assert orq_info.value.status_code == 429
    err = json.loads(orq_info.value.body)["error"]
    assert (err["code"], err["scope_kind"], err["dimension"]) == ("token_budget_exceeded", "api_key", "tokens")
    assert or_info.value.data.error.code == 429
    metadata = or_info.value.data.error.metadata
    assert isinstance(metadata, dict) and metadata["code"] == "token_budget_exceeded"
    assert not upstream.calls


# --- cache hits ------------------------------------------------------------------------------------------

CACHE = {"type": "exact_match"}


@pytest.mark.anyio
async def test_cache_hits_are_served_with_the_token_budget_spent(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 5,
                                           "amount_usd": 5.0}])  # fmt: skip
    async with running(config) as (_, c):
        r = await embed(c, [[1, 2, 3]], cache=CACHE)
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "miss")
        r = await embed(c, [[4, 5, 6]], cache=CACHE)  # 3 + 3 > 5: spent
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded")
        # Observed: a full cache hit is served even though the token budget cannot fit it: it costs nothing
        for _ in range(3):
            r = await embed(c, [[1, 2, 3]], cache=CACHE)
            assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "hit")
            assert r.json()["usage"]["prompt_tokens"] == 3  # the recorded usage is still reported
        # a partial hit reserves only what goes upstream: [4, 5] fits (3 + 2 <= 5), the cached item is free
        r = await embed(c, [[1, 2, 3], [4, 5]], cache=CACHE)
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "partial")
        assert upstream.calls[-1].body["input"] == [[4, 5]]
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 5
        assert row["cost_usd"]["used"] == 5.0
        assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_cache_hits_count_against_requests_per_minute(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "requests_per_minute": 3}])
    async with running(config) as (_, c):
        statuses = []
        for _ in range(4):
            r = await embed(c, "cached text", cache=CACHE)
            statuses.append(
                (r.status_code, r.headers["x-embedgate-cache"], r.headers.get("x-ratelimit-remaining-requests"))
            )
        assert statuses[:3] == [(200, "miss", "2"), (200, "hit", "1"), (200, "hit", "0")]
        assert statuses[3][:2] == (429, "hit")  # what the lookup found, as the README says: not served from it
        assert len(upstream.calls) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [18, 100])
@pytest.mark.parametrize("counted", ["api_key", "provider-serving-an-alias"])
async def test_cached_items_embedded_again_are_reserved_before_they_go(upstream: FakeUpstream, limit: int,
                                                                      counted: str) -> None:  # fmt: skip
    # A partial hit whose cached item is of the model's old vector size embeds that item again. Only the missing
    # item was reserved: the request was admitted with 1 token of room and billed 11 (12 + 11 of a limit of 18).
    # (And on the budget of a provider serving the model under another id.)
    if counted == "api_key":
        model, budget = "local/embed-small", {"scope": "api_key", "target": "team-a", "token_limit": limit}
        config = budget_config(upstream.url, [budget])
    else:
        model, budget = "acme/embed", {"scope": "provider", "target": "backup", "token_limit": limit}
        alias = {"acme/embed": {"deployments": [{"provider": "backup", "upstream_model": "alias-b"}]}}
        config = budget_config(upstream.url, [budget], models={**config_dict(upstream.url)["models"], **alias})
    cached, new = list(range(1, 11)), [7]  # token ids: estimated and billed at their length
    async with running(config) as (app, c):
        assert (await embed(c, [cached], cache=CACHE, model=model)).status_code == 200
        upstream.dims = 9
        assert (await embed(c, [[1, 2]], cache=CACHE, retry={"count": 2}, model=model)).status_code == 200  # adopted
        # As a replica that has seen no answer of the model yet would (the old-size item is a miss up front where
        # the model's size is known: reserved with the rest before anything goes)
        app.router._dims.clear()  # type: ignore[union-attr]
        (row,) = await app.budgets.usage()  # type: ignore[union-attr]
        before = row["tokens"]["used"]
        if limit == 18:
            assert 1 <= limit - before <= len(cached)  # room for the new item, not for both
        r = await embed(c, [cached, new], cache=CACHE, model=model)
        (row,) = await app.budgets.usage()  # type: ignore[union-attr]
        calls = len(upstream.calls)
        # What was fetched (and paid for) is cached even when refused: another key of the workspace finds it.
        again = await embed(c, [new], cache=CACHE, key=SAME_WORKSPACE_KEY, model=model)
    assert (again.status_code, again.headers["x-embedgate-cache"], len(upstream.calls)) == (200, "hit", calls)
    if limit == 18:
        assert r.status_code == 429 and r.json()["error"]["code"] == "token_budget_exceeded"
        assert row["tokens"]["used"] == before + len(new) <= limit  # the new item was paid for upstream, no more
    else:
        assert r.status_code == 200 and [len(v["embedding"]) for v in r.json()["data"]] == [9, 9]
        assert row["tokens"]["used"] == before + len(cached) + len(new)


@pytest.mark.anyio
async def test_a_cached_item_of_the_models_old_size_is_reserved_up_front(upstream: FakeUpstream) -> None:
    # Where this process knows the model's new size, the old-size item is a miss from the start: reserved with the
    # rest, and a request that does not fit is refused before anything goes upstream (nothing paid for in vain).
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 18}])
    cached, new = list(range(1, 11)), [7]
    async with running(config) as (app, c):
        assert (await embed(c, [cached], cache=CACHE)).status_code == 200
        upstream.dims = 9
        assert (await embed(c, [[1, 2]], cache=CACHE, retry={"count": 2})).status_code == 200  # adopted
        (row,) = await app.budgets.usage()  # type: ignore[union-attr]
        before, calls = row["tokens"]["used"], len(upstream.calls)
        r = await embed(c, [cached, new], cache=CACHE)
        (row,) = await app.budgets.usage()  # type: ignore[union-attr]
    assert r.status_code == 429 and r.json()["error"]["code"] == "token_budget_exceeded"
    assert (row["tokens"]["used"], len(upstream.calls)) == (before, calls)


# --- failed upstream calls -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_failed_upstream_calls_leave_no_reservation(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10,
                                           "amount_usd": 10.0}])  # fmt: skip
    async with running(config) as (_, c):
        upstream.script.extend(Fault("status", 500) for _ in range(20))
        for _ in range(20):  # each reserves 4 tokens ($4): three leaked reservations would spend the budget
            r = await embed(c, [1, 2, 3, 4], retry={"count": 0, "on_codes": [500]})
            assert r.status_code == 502, r.text
        assert len(upstream.calls) == 20
        (row,) = await admin_usage(c)
        assert (row["tokens"]["used"], row["cost_usd"]["used"]) == (0, 0.0)
        # the whole budget is still there: 4 + 4 fit, a third 4 does not
        for _ in range(2):
            assert (await embed(c, [1, 2, 3, 4])).status_code == 200
        r = await embed(c, [1, 2, 3, 4])
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded")
        (row,) = await admin_usage(c)
        assert row["tokens"] == {"used": 8, "limit": 10, "remaining": 2}


@pytest.mark.anyio
async def test_a_fallback_bills_the_tokens_of_the_model_that_served(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 100}])
    async with running(config) as (_, c):
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "local/embed-b"}], retry={"count": 0, "on_codes": [503]})
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-b")
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 3  # once, for the call that served; nothing for the failed one


@pytest.mark.anyio
@pytest.mark.parametrize("scope", ["model", "provider"])
async def test_a_fallback_is_not_spent_past_its_own_model_or_provider_budget(upstream: FakeUpstream,
                                                                             scope: str) -> None:  # fmt: skip
    # Only the requested model's budgets applied: a client reached a spent model (or provider) by naming it as the
    # fallback of a model that fails (or with its own fallback_on_codes: any 404), as often as it liked.
    target = "backup/embed-small" if scope == "model" else "backup"
    multimodal = {"type": "openai", "base_url": upstream.url, "api_key": "provider-secret-backup", "multimodal": True}
    config = budget_config(upstream.url, [{"scope": scope, "target": target, "token_limit": 6}],
                           providers={"backup": multimodal})  # fmt: skip
    via = {"retry": {"count": 0, "on_codes": [503]}, "fallbacks": [{"model": "backup/embed-small"}]}

    async def usage() -> int:
        rows = {(row["scope"], row["id"]): row for row in await admin_usage(c)}
        used: int = rows[scope, target]["tokens"]["used"]
        return used

    async with running(config) as (_, c):
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [1, 2, 3], **via)
        assert (r.status_code, r.json()["model"]) == (200, "backup/embed-small")
        assert await usage() == 3  # the fallback served: its budget counts it
        r = await embed(c, [1, 2, 3], **via)
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-small")
        assert "x-embedgate-fallbacks-skipped" not in r.headers
        assert await usage() == 3  # held while the request ran, then released: the primary served
        assert (await embed(c, [1, 2, 3], model="backup/embed-small")).status_code == 200
        assert await usage() == 6
        # spent: as a fallback it is not tried; the primary still serves, and its failure is the answer
        r = await embed(c, [1, 2, 3], **via)
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-small")
        assert r.headers["x-embedgate-fallbacks-skipped"] == "backup/embed-small"
        calls = len(upstream.calls)
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [1, 2, 3], **via)
        assert (r.status_code, error_of(r)["code"]) == (502, "upstream_error")
        assert r.headers["x-embedgate-fallbacks-skipped"] == "backup/embed-small"
        assert len(upstream.calls) == calls + 1  # the primary's one attempt, no fallback call
        assert await usage() == 6
        # named twice, it is skipped twice (the second was tried, and served past the budget)
        twice = {**via, "fallbacks": [{"model": "backup/embed-small"}] * 2}
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [1, 2, 3], **twice)
        assert (r.status_code, r.headers["x-embedgate-fallbacks-skipped"]) == (502, "backup/embed-small")
        assert len(upstream.calls) == calls + 2
        # the fallbacks after a skipped one keep their places: a 404 for the next names fallbacks[1]
        answer = b'{"error":{"message":"no such model","type":"invalid_request_error","code":"model_not_found"}}'
        upstream.script.append(Fault("status", 503, model="embed-small"))
        upstream.script.append(Fault("raw", 404, headers={"Content-Type": "application/json"}, body=answer))
        after = {**via, "fallbacks": [{"model": "backup/embed-small"}, {"model": "local/no-such"}],
                 "fallback_on_codes": [404, 503]}  # fmt: skip
        r = await embed(c, [1, 2, 3], **after)
        assert (r.status_code, error_of(r)["code"], error_of(r)["param"]) == (404, "model_not_found",
                                                                               "fallbacks[1].model")  # fmt: skip
        # a client's id that a header cannot hold is percent-encoded there (it was a 500, or no answer at all)
        odd = "backup/x\r\nSet-Cookie: a=b, c"
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": odd}, {"model": "backup/embed-small"}])
        assert r.status_code == 200, r.text
        skipped = "backup/x%0D%0ASet-Cookie:%20a=b%2C%20c, " if scope == "provider" else ""
        assert r.headers["x-embedgate-fallbacks-skipped"] == skipped + "backup/embed-small"
        assert await usage() == 6
        # the provider preferences leaving no model but the skipped fallback: its budget's 429, not a 404 saying
        # no retry could help
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "backup/embed-small"}], provider={"only": ["backup"]})
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded"), r.text
        assert target in error_of(r)["message"]
        # nor when no model but the skipped fallback takes a multimodal input (a 400 blamed the input)
        image = [{"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
        r = await embed(c, image, fallbacks=[{"model": "backup/embed-small"}])
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded"), r.text
        # but a skipped fallback that could not have taken it either leaves the request's own error
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "backup/embed-small"}], provider={"only": ["nowhere"]})
        assert (r.status_code, error_of(r)["code"]) == (404, "no_allowed_providers"), r.text
        assert r.headers["x-embedgate-fallbacks-skipped"] == "backup/embed-small"


@pytest.mark.anyio
async def test_a_fallback_named_twice_holds_its_budget_for_each_turn(upstream: FakeUpstream) -> None:
    # Reserved once and tried twice: its first turn embedded a chunk of the split batch and failed, its second served
    # the whole batch, and the budget ended at 6 tokens of 4.
    models = {"backup/split": {"deployments": [{"provider": "backup", "upstream_model": "embed-f"}], "max_inputs": 2}}
    config = budget_config(upstream.url, [{"scope": "model", "target": "backup/split", "token_limit": 4}],
                           models=models, routing={"split_concurrency": 1, "breaker_failures": 1000})  # fmt: skip
    async with running(config) as (_, c):
        upstream.script.append(Fault("status", 503, model="embed-small"))
        upstream.script.append(Fault("ok", model="embed-f"))
        upstream.script.append(Fault("status", 503, model="embed-f"))
        r = await embed(c, [[1], [2], [3], [4]], retry={"count": 0, "on_codes": [503]},
                        fallbacks=[{"model": "backup/split"}, {"model": "backup/split"}])  # fmt: skip
        assert (r.status_code, r.headers["x-embedgate-fallbacks-skipped"]) == (502, "backup/split"), r.text
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 2  # the chunk its first turn embedded, and no second turn
        # with room for both turns, both are tried: the second serves
        upstream.script.clear()
        r = await embed(c, [[1]], retry={"count": 0, "on_codes": [503]},
                        fallbacks=[{"model": "backup/split"}, {"model": "backup/split"}])  # fmt: skip
        assert r.status_code == 200 and "x-embedgate-fallbacks-skipped" not in r.headers, r.text


@pytest.mark.anyio
async def test_a_fallback_of_the_requested_provider_is_not_reserved_twice_on_its_budget(upstream: FakeUpstream) -> None:
    # The request's own reservation holds the provider's counter: the fallback's reserves only what it does not.
    config = budget_config(upstream.url, [{"scope": "provider", "target": "local", "token_limit": 3}])
    async with running(config) as (_, c):
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "local/embed-b"}])
        assert r.status_code == 200, r.text
        assert "x-embedgate-fallbacks-skipped" not in r.headers
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 3


@pytest.mark.anyio
async def test_a_provider_budget_counts_what_its_deployments_serve_under_another_model_id(upstream: FakeUpstream
                                                                                          ) -> None:  # fmt: skip
    # A provider budget counted only requests whose model id named the provider: local/multi's deployment on backup,
    # or an alias whose deployments are all on backup, spent at backup without its budget seeing it.
    models = {
        "acme/embed": {"deployments": [{"provider": "backup", "upstream_model": "embed-small"}]},
        "local/split": {
            "deployments": [
                {"provider": "local", "upstream_model": "multi-a"},
                {"provider": "backup", "upstream_model": "multi-b"},
            ],
            "max_inputs": 2,
        },
    }
    budgets = [{"scope": "provider", "target": "backup", "token_limit": 8},
               {"scope": "api_key", "target": "team-a", "token_limit": 1000}]  # fmt: skip
    config = budget_config(upstream.url, budgets, models={**config_dict(upstream.url)["models"], **models},
                           routing={"split_concurrency": 1, "breaker_failures": 1000})  # fmt: skip

    async def used() -> int:
        rows = {(row["scope"], row["id"]): row for row in await admin_usage(c)}
        n: int = rows["provider", "backup"]["tokens"]["used"]
        return n

    async with running(config) as (_, c):
        upstream.script.append(Fault("status", 503, model="multi-a"))
        r = await embed(c, [1, 2, 3], model="local/multi", retry={"count": 0, "on_codes": [503]})
        assert (r.status_code, upstream.calls[-1].body["model"]) == (200, "multi-b"), r.text
        # local may serve it when backup's budget is spent: the key's budget is the one that gates it
        assert r.headers["x-ratelimit-limit-tokens"] == "1000"
        assert await used() == 3  # served by backup's deployment: counted there
        r = await embed(c, [1, 2, 3], model="local/multi")
        assert (r.status_code, upstream.calls[-1].body["model"]) == (200, "multi-a"), r.text
        assert await used() == 3  # held while it ran, released: local served
        # a split batch: each chunk counts where it was embedded (the second chunk's retry went to backup)
        upstream.script.append(Fault("ok", model="multi-a"))
        upstream.script.append(Fault("status", 503, model="multi-a"))
        r = await embed(c, [[1], [2], [3], [4]], model="local/split", retry={"count": 1, "on_codes": [503]})
        assert r.status_code == 200, r.text
        assert await used() == 5
        r = await embed(c, [1, 2, 3], model="acme/embed")
        assert r.status_code == 200, r.text
        # served by backup alone: its budget gates the request, tighter than the key's, and its headers say so
        assert (r.headers["x-ratelimit-limit-tokens"], r.headers["x-ratelimit-remaining-tokens"]) == ("8", "0")
        assert await used() == 8
        # spent: backup's deployments are not used; local's still serve, and its failure is the answer
        r = await embed(c, [1, 2, 3], model="local/multi")
        assert (r.status_code, upstream.calls[-1].body["model"]) == (200, "multi-a"), r.text
        calls = len(upstream.calls)
        upstream.script.extend([Fault("status", 503, model="multi-a")] * 2)
        r = await embed(c, [1, 2, 3], model="local/multi", retry={"count": 1, "on_codes": [503]})
        assert (r.status_code, error_of(r)["code"]) == (502, "upstream_error"), r.text
        assert [call.body["model"] for call in upstream.calls[calls:]] == ["multi-a", "multi-a"]
        # a model served only there: the provider budget's 429, named; as a fallback, skipped and named so
        r = await embed(c, [1, 2, 3], model="acme/embed")
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded"), r.text
        assert "backup" in error_of(r)["message"]
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "acme/embed"}])
        assert (r.status_code, r.headers["x-embedgate-fallbacks-skipped"]) == (200, "acme/embed"), r.text
        calls = len(upstream.calls)
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [1, 2, 3], fallbacks=[{"model": "acme/embed"}], retry={"count": 0, "on_codes": [503]})
        assert (r.status_code, error_of(r)["code"]) == (502, "upstream_error"), r.text
        assert len(upstream.calls) == calls + 1
        assert await used() == 8


@pytest.mark.anyio
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_provider_budgets_requests_per_minute_counts_a_model_it_alone_serves_under_another_id(
    upstream: FakeUpstream, store: str
) -> None:
    # A provider's requests_per_minute counted only requests whose model id started with its name: an alias served
    # by that provider alone went there without end (its tokens and cost were counted, its requests not).
    name = f"bk{uuid.uuid4().hex[:10]}"  # (provider budgets are not per workspace: one of its own in the shared Redis)
    provider = {"type": "openai", "base_url": upstream.url, "api_key": "provider-secret-bk", "timeout_ms": 5000}
    models = {
        "acme/embed": {"deployments": [{"provider": name, "upstream_model": "embed-small"}]},
        "local/multi": {"deployments": [{"provider": "local", "upstream_model": "multi-a"},
                                        {"provider": name, "upstream_model": "multi-b"}]},
    }  # fmt: skip
    stores: dict[str, Any] = {"redis_url": require_redis()} if store == "redis" else {}
    config = budget_config(upstream.url, [{"scope": "provider", "target": name, "requests_per_minute": 2}],
                           providers={name: provider}, models={**config_dict(upstream.url)["models"], **models},
                           **stores)  # fmt: skip
    text = f"cached text {name}"  # (and the cache too, in Redis)
    async with running(config) as (_, c):
        r = await embed(c, text, model="acme/embed", cache=CACHE)
        assert (r.status_code, r.headers["x-ratelimit-remaining-requests"]) == (200, "1"), r.text
        # a cache hit goes to no provider: not counted there (the request's own budgets count it, as SPEC says)
        r = await embed(c, text, model="acme/embed", cache=CACHE)
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "hit"), r.text
        assert "x-ratelimit-remaining-requests" not in r.headers  # (none of its own budgets counts requests)
        r = await embed(c, "another text", model="acme/embed")
        assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-remaining-requests"]) == ("2", "0")
        r = await embed(c, "a third text", model="acme/embed")
        assert (r.status_code, error_of(r)["code"]) == (429, "requests_per_minute_exceeded"), r.text
        assert name in error_of(r)["message"] and "retry-after" in r.headers
        assert len(upstream.calls) == 2
        rows = {(row["scope"], row["id"]): row for row in await admin_usage(c, scope="provider", id=name)}
        assert rows["provider", name]["requests_per_minute"]["used"] == 2
        r = await embed(c, text, model="acme/embed", cache=CACHE)  # its minute spent, a hit is still served
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "hit"), r.text
        # A model served there among others is not counted there (where it goes is the balancer's), and the spent
        # minute does not turn it away; nor its fallbacks, counted on the requested model's budgets alone.
        r = await embed(c, "other text", model="local/multi")
        assert r.status_code == 200, r.text
        r = await embed(c, "other text", fallbacks=[{"model": "acme/embed"}])
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-small"), r.text
        # A model it alone serves, with a fallback: the spent provider is passed over for it.
        r = await embed(c, "a fresh text", model="acme/embed", fallbacks=[{"model": "local/embed-small"}])
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-small"), r.text


@pytest.mark.anyio
async def test_provider_budgets_are_taken_in_the_chains_order_for_the_items_that_go_upstream(
    upstream: FakeUpstream,
) -> None:
    # The fallback's reservation was made first and took the budget the requested model's own provider needed: another
    # model answered a request its own model fitted. And a partial hit reserved every item on the provider: a 429 for
    # one item that fitted.
    models = {"acme/embed": {"deployments": [{"provider": "backup", "upstream_model": "alias-b"}]}}
    config = budget_config(upstream.url, [{"scope": "provider", "target": "backup", "token_limit": 14}],
                           models={**config_dict(upstream.url)["models"], **models})  # fmt: skip
    async with running(config) as (_, c):
        r = await embed(c, [list(range(1, 11))], model="acme/embed", cache={"type": "exact_match"})
        assert r.status_code == 200, r.text  # 10 of 14
        r = await embed(c, [list(range(1, 11)), [7]], model="acme/embed", cache={"type": "exact_match"})
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "partial"), r.text  # 11 of 14
        r = await embed(c, [1, 2, 3], model="acme/embed", fallbacks=[{"model": "backup/embed-small"}])
        assert (r.status_code, r.json()["model"]) == (200, "acme/embed"), r.text  # 14 of 14
        assert r.headers["x-embedgate-fallbacks-skipped"] == "backup/embed-small"
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 14


@pytest.mark.anyio
async def test_a_provider_budget_refusal_leaves_an_upstreams_own_404_and_the_requests_preferences(
    upstream: FakeUpstream,
) -> None:
    # A fallback whose usable deployment's provider was spent answered the budget's 429 in place of the upstream's
    # 404 for the client's typo; and a provider the request excluded was reserved on, and named its fallback skipped.
    third = {"type": "openai_compatible", "base_url": upstream.url, "api_key": "provider-secret-third"}
    models = {"acme/two": {"deployments": [{"provider": "third", "upstream_model": "two-t"},
                                           {"provider": "backup", "upstream_model": "two-b"}]}}  # fmt: skip
    models = {**config_dict(upstream.url)["models"], **models}
    config = budget_config(upstream.url, [{"scope": "provider", "target": "backup", "token_limit": 3}],
                           providers={"third": third}, models=models)  # fmt: skip
    async with running(config) as (_, c):
        r = await embed(
            c, [1, 2, 3], model="acme/two", fallbacks=[{"model": "acme/two"}], provider={"ignore": ["backup"]}
        )
        assert r.status_code == 200 and "x-embedgate-fallbacks-skipped" not in r.headers, r.text
        assert (await embed(c, [1, 2, 3], model="acme/two", provider={"only": ["backup"]})).status_code == 200
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 3  # spent
        answer = b'{"error":{"message":"no such model","type":"invalid_request_error","code":"model_not_found"}}'
        upstream.script.append(Fault("raw", 404, headers={"Content-Type": "application/json"}, body=answer))
        r = await embed(c, [1, 2, 3], model="local/typo", fallbacks=[{"model": "acme/two"}], fallback_on_codes=[404],
                        provider={"ignore": ["third"]}, retry={"count": 0})  # fmt: skip
        assert (r.status_code, error_of(r)["code"], error_of(r)["param"]) == (404, "model_not_found", "model"), r.text
        assert r.headers["x-embedgate-fallbacks-skipped"] == "acme/two"  # its one usable deployment's provider spent
        # with no earlier answer, the budget's refusal is why nothing served
        r = await embed(c, [1, 2, 3], model="acme/two", provider={"ignore": ["third"]})
        assert (r.status_code, error_of(r)["code"]) == (429, "token_budget_exceeded"), r.text


@pytest.mark.anyio
@pytest.mark.parametrize("spent", [False, True])
async def test_a_skipped_fallback_leaves_the_requests_reservation_as_it_was(upstream: FakeUpstream,
                                                                            spent: bool) -> None:  # fmt: skip
    # The request with fallbacks reserved every item; its skipped fallback once cut the chain to one model, and a
    # cached item of the model's old vector size was then reserved a second time: a 429 for a request that fit.
    budgets = [{"scope": "api_key", "target": "team-a", "token_limit": 28},
               {"scope": "model", "target": "backup/embed-small", "token_limit": 14}]  # fmt: skip
    cached = list(range(1, 11))
    async with running(budget_config(upstream.url, budgets)) as (_, c):
        assert (await embed(c, [cached], cache={"type": "exact_match"})).status_code == 200  # 10 of 28
        upstream.dims = 9  # the model's vectors change size: three agreeing answers replace the count
        r = await embed(c, [[1, 2]], cache={"type": "exact_match"}, retry={"count": 2})
        assert r.status_code == 200, r.text  # 16 of 28: the two answers at the new size before it was adopted, paid
        # for upstream, count at their estimate (2 + 2)
        if spent:
            r = await embed(c, [[1, 2, 3, 4]], model="backup/embed-small", key=OTHER_KEY)
            assert r.status_code == 200, r.text  # 4 of the fallback's 14: 11 more do not fit
        r = await embed(c, [cached, [7]], cache={"type": "exact_match"}, fallbacks=[{"model": "backup/embed-small"}])
        assert r.status_code == 200, r.text
        assert r.headers.get("x-embedgate-fallbacks-skipped") == ("backup/embed-small" if spent else None)
        rows = {(row["scope"], row["id"]): row for row in await admin_usage(c)}
        assert rows["api_key", "team-a"]["tokens"]["used"] == 27


@pytest.mark.anyio
async def test_a_request_whose_fallback_is_skipped_shares_no_upstream_call_with_one_whose_is_not(
    upstream: FakeUpstream,
) -> None:
    # Two like requests in flight share one upstream call: the second, its fallback skipped (the first held the
    # fallback's last tokens), was answered by that fallback all the same, its header saying it was skipped.
    budgets = [{"scope": "model", "target": "backup/embed-small", "token_limit": 3}]
    via = {"cache": {"type": "exact_match"}, "retry": {"count": 0, "on_codes": [503]},
           "fallbacks": [{"model": "backup/embed-small"}]}  # fmt: skip
    async with running(budget_config(upstream.url, budgets)) as (_, c):
        upstream.script.append(Fault("status", 503, delay=0.3, model="embed-small"))
        first = asyncio.ensure_future(embed(c, [1, 2, 3], **via))
        await asyncio.sleep(0.1)
        second = await embed(c, [1, 2, 3], **via)
        assert (second.status_code, second.headers["x-embedgate-fallbacks-skipped"]) == (200, "backup/embed-small")
        assert second.json()["model"] == "local/embed-small"  # its own call, the primary's
        r = await first
        assert (r.status_code, r.json()["model"]) == (200, "backup/embed-small")
        # nor with one that names its models at other places: an error's param is each request's own
        answer = b'{"error":{"message":"no such model","type":"invalid_request_error","code":"model_not_found"}}'
        on = {**via, "fallback_on_codes": [404, 503]}
        skipping = {**on, "fallbacks": [{"model": "backup/embed-small"}, {"model": "local/no-such"}]}
        plain = {**on, "fallbacks": [{"model": "local/no-such"}]}
        for owner, joiner in ((plain, skipping), (skipping, plain)):
            for _ in range(2):
                upstream.script.append(Fault("status", 503, delay=0.3, model="embed-small"))
                upstream.script.append(Fault("raw", 404, headers={"Content-Type": "application/json"}, body=answer,
                                             model="no-such"))  # fmt: skip
            owned = asyncio.ensure_future(embed(c, [4, 5, 6], **owner))
            await asyncio.sleep(0.1)
            joined = await embed(c, [4, 5, 6], **joiner)
            for r, sent in ((await owned, owner), (joined, joiner)):
                param = "fallbacks[1].model" if sent is skipping else "fallbacks[0].model"
                assert (r.status_code, error_of(r)["param"]) == (404, param)
            upstream.script.clear()


@pytest.mark.anyio
async def test_the_cost_estimate_uses_a_deployments_own_price(upstream: FakeUpstream) -> None:
    # Only the deployment had a price: the estimate was $0, so every request was admitted and the budget overrun.
    models = {"local/dep": {"deployments": [{"provider": "local", "upstream_model": "dep",
                                             "price_per_million_tokens": DOLLAR_A_TOKEN}]}}  # fmt: skip
    config = budget_config(upstream.url, [{"scope": "model", "target": "local/dep", "amount_usd": 5.0}],
                           models=models)  # fmt: skip
    async with running(config) as (_, c):
        r = await embed(c, [1, 2, 3], model="local/dep", route="openrouter")
        assert r.status_code == 200 and r.json()["usage"]["cost"] == 3.0
        r = await embed(c, [1, 2, 3], model="local/dep")
        assert r.status_code == 429 and error_of(r)["code"] == "cost_budget_exceeded"
        (row,) = await admin_usage(c)
        assert row["cost_usd"]["used"] == 3.0


@pytest.mark.anyio
async def test_a_partial_hit_with_fallbacks_reserves_every_item(upstream: FakeUpstream) -> None:
    # A fallback serving a partial hit embeds the cached items again: only the new ones were reserved, and the
    # budget ended at 12 tokens of 10.
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}])
    cache = {"type": "exact_match"}
    async with running(config) as (_, c):
        assert (await embed(c, [[1, 2, 3]], cache=cache)).status_code == 200
        upstream.script.append(Fault("status", 503, model="embed-small"))
        r = await embed(c, [[1, 2, 3], [4, 5, 6], [7, 8, 9]], cache=cache, fallbacks=[{"model": "local/embed-b"}],
                        retry={"count": 0, "on_codes": [503]})  # fmt: skip
        assert r.status_code == 429 and error_of(r)["code"] == "token_budget_exceeded"
        # without fallbacks only the new items are reserved: 3 + 6 <= 10
        r = await embed(c, [[1, 2, 3], [4, 5, 6], [7, 8, 9]], cache=cache)
        assert (r.status_code, r.headers["x-embedgate-cache"]) == (200, "partial")
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == 9


# --- OpenRouter usage.cost -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_openrouter_usage_cost_is_tokens_times_price(upstream: FakeUpstream) -> None:
    providers = {"openai": {"type": "openai", "base_url": upstream.url, "api_key": "provider-secret-openai"}}
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "amount_usd": 1.0}],
                           providers=providers,
                           models={"local/embed-small": {"price_per_million_tokens": 0.5}})  # fmt: skip
    text = "one two three four five"  # five tokens at the fake upstream
    async with running(config) as (_, c):
        cases = [
            ("local/embed-small", 0.5),  # the configured price
            ("openai/text-embedding-3-small", 0.02),  # built-in list prices
            ("openai/text-embedding-3-large", 0.13),
            ("local/unpriced", 0.0),  # no price known: free
        ]
        spent = 0.0
        for model, price in cases:
            r = await embed(c, text, route="openrouter", model=model)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == 5
            assert body["usage"]["cost"] == pytest.approx(5 * price / 1_000_000, rel=1e-9, abs=1e-15)
            assert body["id"]
            spent += 5 * price / 1_000_000
            r = await embed(c, text, route="openai", model=model)
            assert "cost" not in r.json()["usage"]  # only the OpenRouter route reports a cost
            spent += 5 * price / 1_000_000
        assert upstream.calls[2].body["model"] == "text-embedding-3-small"
        (row,) = await admin_usage(c)
        assert row["cost_usd"]["used"] == pytest.approx(spent, abs=1e-9)


# --- store unreachable -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unreachable_store_fails_closed_in_each_route_shape(upstream: FakeUpstream) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    config = budget_config(upstream.url, [{"scope": "workspace", "target": "acme", "requests_per_minute": 100}],
                           redis_url=closed)  # fmt: skip
    async with running(config) as (_, c):
        for route in ROUTES:
            r = await embed(c, "x", route=route)
            assert r.status_code == 503, r.text
            err = error_of(r)
            message = err["message"]
            assert "budget store unavailable" in message
            if route == "openrouter":
                assert (err["code"], err["metadata"]["code"]) == (503, "store_unavailable")
            else:
                assert err["code"] == "store_unavailable"
                assert "param" in err and "type" in err
            assert "redis://" not in r.text and "Traceback" not in r.text
            assert r.headers["retry-after"] == "1"  # a hint for clients and HTTP libraries that wait on a 503
        # a request no budget applies to does not need the store
        r = await embed(c, "x", key=OTHER_KEY, model="backup/embed-small")
        assert r.status_code == 200, r.text
        assert len(upstream.calls) == 1
        for path in ("/admin/usage", "/admin/identities"):  # the identities live in that Redis too
            r = await c.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", path


@pytest.mark.anyio
async def test_unreachable_store_with_fail_open_admits(upstream: FakeUpstream) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    config = budget_config(upstream.url, [{"scope": "workspace", "target": "acme", "requests_per_minute": 1}],
                           redis_url=closed, budget_options={"fail_open": True})  # fmt: skip
    async with running(config) as (_, c):
        for route in ROUTES:
            r = await embed(c, "x", route=route, identity={"id": "alice"})
            assert r.status_code == 200, r.text
            assert "x-ratelimit-limit-requests" not in r.headers  # nothing was counted
        assert len(upstream.calls) == 3


@pytest.mark.anyio
async def test_a_stalled_store_with_fail_open_costs_one_wait_not_one_per_fallback(upstream: FakeUpstream) -> None:
    # Each fallback's own reserve waited out the store's timeout after the request's had: (1 + N) seconds.
    release = asyncio.Event()
    stalled: list[bytes] = []

    async def stall(data: bytes) -> None:
        if b"EVAL" in data and not release.is_set():
            stalled.append(data)
            await asyncio.wait_for(release.wait(), 10)

    async with redis_proxy(require_redis(), to_redis=stall) as proxied:
        config = budget_config(upstream.url, [{"scope": "model", "target": "*", "token_limit": 100}],
                               redis_url=proxied, budget_options={"fail_open": True})  # fmt: skip
        async with running(config) as (_, c):
            fallbacks = [{"model": m} for m in ("backup/embed-small", "local/embed-b", "local/embed-c")]
            started = asyncio.get_running_loop().time()
            r = await embed(c, [1, 2, 3], fallbacks=fallbacks)
            elapsed = asyncio.get_running_loop().time() - started
            release.set()
    assert r.status_code == 200, r.text
    assert elapsed < 2.5  # one store timeout (1 s): not four
    assert len(stalled) == 1


# --- admin endpoints and CLI -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_admin_usage_refuses_an_unknown_scope(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}])
    async with running(config) as (_, c):
        assert [row["scope"] for row in await admin_usage(c, scope="api_key")] == ["api_key"]
        assert await admin_usage(c, scope="identity") == []  # a known scope without budgets: nothing to show
        r = await c.get("/admin/usage", params={"scope": "apikey"}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 400  # not an empty list, as if nothing were spent
        assert error_of(r)["param"] == "scope" and "api_key" in error_of(r)["message"]


@pytest.mark.anyio
async def test_admin_usage_of_one_id(upstream: FakeUpstream) -> None:
    # A "*" identity budget listed every identity ever seen (the first 1000, alphabetically), read from Redis in
    # one SMEMBERS: one id's usage is asked for by id.
    budgets = [{"scope": "identity", "target": "*", "token_limit": 1000},
               {"scope": "identity", "target": "bob", "token_limit": 50},
               {"scope": "api_key", "target": "team-a", "token_limit": 1000}]  # fmt: skip
    async with running(budget_config(upstream.url, budgets)) as (_, c):
        for who in ("alice", "bob", "carol"):
            assert (await embed(c, "one two", identity={"id": who})).status_code == 200
        rows = await admin_usage(c, id="acme/bob")
        assert [(r["target"], r["id"]) for r in rows] == [("*", "acme/bob"), ("bob", "acme/bob")]
        assert all(r["tokens"]["used"] == tokens_of("one two") for r in rows)
        # an id alone: each workspace's identity of that id (globex's bob spent nothing)
        rows = await admin_usage(c, id="bob")
        assert [(r["target"], r["id"], r["tokens"]["used"]) for r in rows] == [
            ("*", "acme/bob", 2), ("*", "globex/bob", 0), ("bob", "acme/bob", 2), ("bob", "globex/bob", 0)]  # fmt: skip
        assert [r["id"] for r in await admin_usage(c, scope="identity", id="acme/nobody")] == ["acme/nobody"]
        # the three seen by "*", and bob's own budget in each workspace
        assert len(await admin_usage(c, scope="identity")) == 5
        r = await c.get("/admin/usage", params={"id": "x" * 264}, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 400 and error_of(r)["param"] == "id"


@pytest.mark.anyio
async def test_admin_usage_of_a_project_budget_named_by_the_project_alone(upstream: FakeUpstream) -> None:
    # It is counted per workspace ("acme/search"); the view read "search" and showed 0 used while refusing.
    config = budget_config(upstream.url, [{"scope": "project", "target": "search", "token_limit": 5}])
    async with running(config) as (_, c):
        assert (await embed(c, [1, 2, 3])).status_code == 200
        assert (await embed(c, [1, 2, 3])).status_code == 429
        for params in ({}, {"scope": "project"}, {"id": "search"}, {"id": "acme/search"}):
            rows = await admin_usage(c, **params)
            assert [(r["id"], r["target"], r["tokens"]["used"]) for r in rows] == [("acme/search", "search", 3)]
        assert await admin_usage(c, id="globex/search") == []


@pytest.mark.anyio
async def test_admin_endpoints_are_off_without_an_admin_key(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}], admin={})
    async with running(config) as (_, c):
        for path in ("/admin/usage", "/admin/identities"):
            r = await c.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 404
            assert "admin" in error_of(r)["message"]


@pytest.mark.anyio
async def test_admin_endpoints_need_the_admin_key(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}])
    async with running(config) as (_, c):
        for path in ("/admin/usage", "/admin/identities"):
            for headers in ({}, {"authorization": f"Bearer {KEY}"}, {"authorization": ADMIN_KEY}):
                r = await c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert ADMIN_KEY not in r.text
            r = await c.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200


@pytest.mark.anyio
async def test_admin_usage_and_identities_show_what_was_spent_and_seen(upstream: FakeUpstream) -> None:
    config = budget_config(upstream.url, [
        {"scope": "api_key", "target": "team-a", "token_limit": 100, "amount_usd": 20, "requests_per_minute": 10},
        {"scope": "identity", "target": "*", "period": "monthly", "token_limit": 50},
        {"scope": "workspace", "target": "globex", "period": "one_time", "token_limit": 7},
    ])  # fmt: skip
    profile = {"id": "alice", "display_name": "Alice A.", "email": "alice@example.com",
               "metadata": [{"team": "search"}], "tags": ["beta", ""],
               "logo_url": "https://example.com/a.png"}  # fmt: skip
    async with running(config) as (_, c):
        assert (await embed(c, [1, 2, 3], route="orq", identity=profile)).status_code == 200
        first = await c.get("/admin/identities", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert (await embed(c, [1, 2], route="orq", orq={"contact": {"id": "bob"}})).status_code == 200
        assert (await embed(c, [9], route="orq", headers={"X-ORQ-IDENTITY-ID": "alice"})).status_code == 200
        rows = await admin_usage(c)
        by_id = {(row["scope"], row["id"]): row for row in rows}
        assert set(by_id) == {("api_key", "team-a"), ("identity", "acme/alice"), ("identity", "acme/bob"),
                              ("workspace", "globex")}  # fmt: skip
        team = by_id[("api_key", "team-a")]
        assert team["tokens"] == {"used": 6, "limit": 100, "remaining": 94}
        assert team["cost_usd"] == {"used": 6.0, "limit": 20, "remaining": 14.0}
        assert team["requests_per_minute"] == {"used": 3, "limit": 10, "remaining": 7}
        assert (team["period"], team["target"]) == ("daily", "team-a")
        assert 0 < team["resets_in_s"] <= 86400
        assert by_id[("identity", "acme/alice")]["tokens"]["used"] == 4
        assert by_id[("identity", "acme/bob")]["tokens"]["used"] == 2
        bob = by_id[("identity", "acme/bob")]
        assert (bob["target"], bob["period"]) == ("*", "monthly")
        globex = by_id[("workspace", "globex")]
        assert (globex["tokens"]["used"], globex["resets_in_s"], globex["period_stamp"]) == (0, None, "all")
        assert "cost_usd" not in globex
        assert [row["id"] for row in await admin_usage(c, scope="identity")] == ["acme/alice", "acme/bob"]

        r = await c.get("/admin/identities", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        idents = {i["id"]: i for i in r.json()["data"]}
        assert [i["id"] for i in r.json()["data"]] == ["alice", "bob"]  # most recently seen first
        alice = idents["alice"]
        for field in ("display_name", "email", "metadata", "logo_url"):
            assert alice[field] == profile[field]  # the profile survives a later header-only request
        assert alice["tags"] == ["beta", ""]  # orq types a tag as any string: an empty one was a 400
        (alice_before,) = [i for i in first.json()["data"] if i["id"] == "alice"]
        assert alice["first_seen"] == alice_before["first_seen"]
        assert alice["last_seen"] >= alice_before["last_seen"] and alice["last_seen"] > idents["bob"]["first_seen"]
        assert alice["workspace"] == "acme"
        for name in ("bob", "acme/bob"):  # an id alone (each workspace's), or qualified
            r = await c.get("/admin/identities", params={"id": name},
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
            assert [(i["workspace"], i["id"]) for i in r.json()["data"]] == [("acme", "bob")]


@pytest.mark.anyio
async def test_an_identity_is_its_workspaces(upstream: FakeUpstream) -> None:
    # Kept and budgeted by id alone: another workspace's key overwrote acme's user-42 and spent its budget.
    config = budget_config(upstream.url, [{"scope": "identity", "target": "*", "requests_per_minute": 1}],
                           models={"local/embed-small": {}, "backup/embed-small": {}})  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with running(config) as (_, c):
        jane = {"id": "user-42", "email": "jane@acme.example"}
        assert (await embed(c, "x", route="orq", identity=jane)).status_code == 200
        other = {"id": "user-42", "email": "someone@globex.example"}
        r = await embed(c, "x", key=OTHER_KEY, model="backup/embed-small", route="orq", identity=other)
        assert r.status_code == 200  # globex's user-42 has a budget of its own
        r = await embed(c, "x", route="orq", identity={"id": "user-42"})
        assert r.status_code == 429 and error_of(r)["scope_target_id"] == "acme/user-42"
        listed = (await c.get("/admin/identities", headers=admin)).json()["data"]
    assert [(i["workspace"], i["id"], i["email"]) for i in listed] == [
        ("acme", "user-42", "jane@acme.example"), ("globex", "user-42", "someone@globex.example")]  # fmt: skip


@pytest.mark.anyio
async def test_admin_identities_refuse_a_limit_that_is_no_ascii_number(upstream: FakeUpstream) -> None:
    # "²".isdigit() is true and int("²") raises: a 500 with a traceback.
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}])
    async with running(config) as (_, c):
        for limit in ("²", "abc", "0", "10001", "9" * 5000):  # the last was a 500 (int reads 4,300 digits at most)
            r = await c.get("/admin/identities", params={"limit": limit},
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
            assert r.status_code == 400, (limit, r.text)
            assert error_of(r)["param"] == "limit"


@pytest.mark.anyio
async def test_admin_views_refuse_a_blank_filter_rather_than_list_everything(upstream: FakeUpstream) -> None:
    # "?id=" (a script's empty variable) was read as no filter at all: every row, every identity.
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 10}])
    async with running(config) as (_, c):
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        for path, param in (("/admin/usage", "id"), ("/admin/usage", "scope"), ("/admin/identities", "id"),
                            ("/admin/identities", "limit")):  # fmt: skip
            r = await c.get(f"{path}?{param}=", headers=admin)
            assert r.status_code == 400, (path, param, r.text)
            assert error_of(r)["param"] == param
        r = await c.get("/admin/identities", params={"id": "x" * 264}, headers=admin)
        assert (r.status_code, error_of(r)["param"]) == (400, "id")


@pytest.mark.anyio
async def test_admin_views_find_what_their_listings_name(upstream: FakeUpstream) -> None:
    # An identity id of 256 characters was listed as "acme/<id>", and that name asked for was a 400 (ids were cut at
    # 256 characters); "?id=vip" missed the budget that names it "acme/vip"; a misspelt parameter answered it all.
    budgets = [{"scope": "identity", "target": "acme/vip", "token_limit": 100},
               {"scope": "identity", "target": "*", "token_limit": 1000}]  # fmt: skip
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    long_id = "u" * 256
    async with running(budget_config(upstream.url, budgets)) as (_, c):
        for who in ("vip", long_id):
            assert (await embed(c, "one two", identity={"id": who})).status_code == 200
        rows = await admin_usage(c, id="vip")
        assert [(r["target"], r["id"], r["tokens"]["used"]) for r in rows] == [
            ("acme/vip", "acme/vip", 2), ("*", "acme/vip", 2), ("*", "globex/vip", 0)]  # fmt: skip
        assert [(r["target"], r["id"]) for r in await admin_usage(c, id="globex/vip")] == [("*", "globex/vip")]
        rows = await admin_usage(c, id=f"acme/{long_id}")
        assert [(r["id"], r["tokens"]["used"]) for r in rows] == [(f"acme/{long_id}", 2)]
        r = await c.get("/admin/identities", params={"id": f"acme/{long_id}"}, headers=admin)
        assert r.status_code == 200 and [i["id"] for i in r.json()["data"]] == [long_id]
        for path, param in (("/admin/identities", "workspace"), ("/admin/identities", "ID"),
                            ("/admin/usage", "limit"), ("/admin/usage", "scopes")):  # fmt: skip
            r = await c.get(path, params={param: "acme"}, headers=admin)
            assert r.status_code == 400 and error_of(r)["param"] == param, (path, param, r.text)


@pytest.mark.anyio
async def test_an_admin_key_hashed_from_nothing_opens_nothing(upstream: FakeUpstream) -> None:
    # An admin sha256 made of an unset variable (`printf %s "$UNSET" | sha256sum`) let "Authorization: Bearer" in.
    config = budget_config(upstream.url, [], admin={"sha256": hashlib.sha256(b"").hexdigest()})
    async with running(config) as (_, c):
        for header in ("Bearer", "Bearer ", "Bearer   "):
            r = await c.get("/admin/identities", headers={"authorization": header})
            assert r.status_code == 401, (header, r.text)


@pytest.mark.anyio
async def test_an_identity_header_is_read_as_utf8_and_named_as_sent(upstream: FakeUpstream) -> None:
    # A UTF-8 header ("jöhn", as curl and the SDKs send it) was read as latin-1: "jÃ¶hn", another identity with
    # a budget of its own. A contact id too long was refused naming x-orq-identity-id.
    config = budget_config(upstream.url, [{"scope": "identity", "target": "*", "requests_per_minute": 1}])
    async with running(config) as (gw, c):
        assert (await embed(c, [1], headers={"X-ORQ-IDENTITY-ID": "jöhn".encode()})).status_code == 200  # type: ignore[dict-item]
        r = await embed(c, [1], route="orq", identity={"id": "jöhn"})
        assert r.status_code == 429  # the same identity: its one request of the minute is spent
        assert gw.identities is not None
        assert [i.id for i in await gw.identities.list()] == ["jöhn"]
        r = await embed(c, [1], headers={"X-ORQ-CONTACT-ID": "c" * 257})
        assert r.status_code == 400 and error_of(r)["param"] == "x-orq-contact-id"


@pytest.mark.anyio
async def test_an_item_repeated_in_a_cached_batch_is_estimated_once(upstream: FakeUpstream) -> None:
    # It goes upstream once and is billed once, but was reserved at each place: a 429 ("needs up to 42") for a
    # request that fits the budget (14 tokens estimated, 30 left).
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 30}])
    async with running(config) as (_, c):
        r = await embed(c, ["aaaaaaaaaaaa"] * 3, cache={"type": "exact_match"})
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-tokens"] == str(30 - 14)  # the estimate of one, before the settle
        assert [call.body["input"] for call in upstream.calls] == [["aaaaaaaaaaaa"]]
        r = await embed(c, ["aaaaaaaaaaaa"] * 3)  # without the cache, each place goes upstream: each is estimated
        assert r.status_code == 429, r.text


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [9, 20])
async def test_a_later_fallback_embedding_a_partial_hit_again_stays_within_the_budget(upstream: FakeUpstream,
                                                                                      limit: int) -> None:  # fmt: skip
    # The fallback that served the new item failed on the cached one, and the next embedded both again: the new
    # item was paid for twice, beyond the estimate (which counts each item once), and the budget overshot (12 of 9).
    per_model = [{"scope": "model", "target": f"local/{m}", "token_limit": 100} for m in ("embed-b", "embed-c")]
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": limit}, *per_model])
    cache = {"type": "exact_match"}
    async with running(config) as (_, c):
        assert (await embed(c, [[1, 2, 3]], cache=cache)).status_code == 200  # 3 tokens
        upstream.script.extend([Fault("status", 503, model="embed-small"), Fault("ok", model="embed-b"),
                                Fault("status", 500, model="embed-b")])  # fmt: skip
        r = await embed(c, [[1, 2, 3], [4, 5, 6]], cache=cache, retry={"count": 0, "on_codes": [503]},
                        fallbacks=[{"model": "local/embed-b"}, {"model": "local/embed-c"}])  # fmt: skip
        rows = {row["target"]: row["tokens"]["used"] for row in await admin_usage(c)}
    if limit == 9:  # 3 used, 6 reserved; embedding [4, 5, 6] again with embed-c needs 3 more: refused
        assert (r.status_code, r.json()["error"]["code"]) == (429, "token_budget_exceeded"), r.text
        assert rows["team-a"] == 9
    else:
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-c"), r.text
        assert rows["team-a"] == 3 + 3 + 6  # the first request, embed-b's [4, 5, 6], embed-c's both
    # what each fallback embedded is on its own budget: embed-b's [4, 5, 6] (it was released, and embed-c charged it)
    assert rows["local/embed-b"] == 3
    assert rows["local/embed-c"] == (3 if limit == 9 else 6)


X3, Y3, Z3 = [1, 2, 3], [4, 5, 6], [7, 8, 9]
B_THEN_C = [{"model": "local/embed-b"}, {"model": "local/embed-c"}]


@pytest.mark.anyio
async def test_a_later_fallback_taking_the_answer_over_reserves_no_provider_budget_it_does_not_use(
    upstream: FakeUpstream,
) -> None:
    # The extension for the items paid for twice went to every provider budget the request held: a fallback's
    # provider not used (backup, for embed-d) refused it, a 429 after the upstream work.
    models = {"local/embed-small": {"price_per_million_tokens": 0.02},
              "local/embed-d": {"deployments": [{"provider": "backup", "upstream_model": "embed-d"}]}}  # fmt: skip
    config = budget_config(upstream.url, [{"scope": "provider", "target": "backup", "token_limit": 6}], models=models)
    kw: dict[str, Any] = {"cache": {"type": "exact_match"}, "retry": {"count": 0},
                          "fallbacks": [*B_THEN_C, {"model": "local/embed-d"}]}  # fmt: skip
    async with running(config) as (_, c):
        assert (await embed(c, [Z3], **kw)).status_code == 200
        upstream.script.extend([Fault("status", 500, model="embed-small"), Fault("ok", model="embed-b"),
                                Fault("status", 500, model="embed-b")])  # fmt: skip
        r = await embed(c, [X3, Z3], **kw)
        assert (r.status_code, r.json().get("model")) == (200, "local/embed-c"), r.text
        assert {row["target"]: row["tokens"]["used"] for row in await admin_usage(c)} == {"backup": 0}


@pytest.mark.anyio
async def test_only_items_paid_for_twice_are_reserved_again(upstream: FakeUpstream) -> None:
    # When a fallback took the answer over, the whole rest of it was reserved again, cached and coalesced items
    # too (counted once by the estimate, not paid for yet): a 429 for a request that fits its budget exactly.
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 12}])
    kw: dict[str, Any] = {"cache": {"type": "exact_match"}, "retry": {"count": 0}, "fallbacks": B_THEN_C}
    async with running(config) as (_, c):
        assert (await embed(c, [Z3], key=SAME_WORKSPACE_KEY, **kw)).status_code == 200
        upstream.script.extend(
            [
                Fault("status", 500, model="embed-small"),
                Fault("slow", delay=0.5, model="embed-b"),
                Fault("ok", model="embed-small"),
                Fault("status", 500, model="embed-small"),
            ]
        )
        other = asyncio.ensure_future(embed(c, [X3], key=SAME_WORKSPACE_KEY, **kw))
        await asyncio.sleep(0.2)
        r = await embed(c, [X3, Y3, Z3], **kw)  # Y on embed-small, X from the other's call (embed-b's), ...
        await other
        rows = {row["target"]: row["tokens"]["used"] for row in await admin_usage(c)}
    assert (r.status_code, r.json().get("model")) == (200, "local/embed-b"), r.text
    assert rows["team-a"] == 12  # embed-small's Y, embed-b's X, then Y and Z


@pytest.mark.anyio
async def test_rounds_of_one_request_served_by_two_models_charge_and_cache_each_its_own(upstream: FakeUpstream) -> None:
    # Its first round (Y) was served by embed-small, the second (X, after the owner it waited on was cancelled) by
    # embed-b: everything was charged to embed-b, and Y, paid for, was never cached under embed-small.
    budgets = [{"scope": "model", "target": m, "token_limit": 1000} for m in ("local/embed-small", "local/embed-b")]
    config = budget_config(upstream.url, budgets)
    kw: dict[str, Any] = {"cache": {"type": "exact_match"}, "retry": {"count": 0}, "fallbacks": B_THEN_C}
    async with running(config) as (_, c):
        upstream.script.extend([Fault("slow", delay=1.0, model="embed-small"), Fault("ok", model="embed-small"),
                                Fault("status", 500, model="embed-small")])  # fmt: skip
        owner = asyncio.ensure_future(embed(c, [X3], key=SAME_WORKSPACE_KEY, **kw))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(embed(c, [X3, Y3], **kw))
        await asyncio.sleep(0.2)
        owner.cancel()
        r = await waiting
        assert (r.status_code, r.json()["model"]) == (200, "local/embed-b"), r.text
        assert [(x.body["model"], x.body["input"]) for x in upstream.calls[1:]] == [
            ("embed-small", [Y3]), ("embed-small", [X3]), ("embed-b", [X3]), ("embed-b", [Y3])]  # fmt: skip
        rows = {row["target"]: row["tokens"]["used"] for row in await admin_usage(c)}
        assert rows["local/embed-b"] == 6  # X and Y, its own (embed-small's Y too, it said)
        upstream.calls.clear()
        again = await embed(c, [Y3], key=SAME_WORKSPACE_KEY, cache={"type": "exact_match"})
        assert again.headers["x-embedgate-cache"] == "hit" and upstream.calls == []  # paid for: kept


@pytest.mark.anyio
async def test_rounds_served_by_a_model_then_another_then_the_first_again_say_miss(upstream: FakeUpstream) -> None:
    # Rounds A, B, A: the item of round one, embedded again with B's superseded, was counted as a hit ("partial")
    # where the request fetched every item itself.
    kw: dict[str, Any] = {"cache": {"type": "exact_match"}, "retry": {"count": 0}, "fallbacks": B_THEN_C[:1]}
    async with running(budget_config(upstream.url, [])) as (_, c):
        upstream.script.extend([Fault("slow", delay=1.0, model="embed-small"), Fault("slow", delay=1.5,
                                model="embed-small"), Fault("ok", model="embed-small"), Fault("slow", delay=1.0,
                                model="embed-small"), Fault("status", 500, model="embed-small")])  # fmt: skip
        owners = []
        for item in (X3, Z3, Z3):
            owners.append(asyncio.ensure_future(embed(c, [item], key=SAME_WORKSPACE_KEY, **kw)))
            await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(embed(c, [Y3, X3, Z3], **kw))
        for owner in owners:
            await asyncio.sleep(0.2)
            owner.cancel()
        r = await waiting
    assert (r.status_code, r.json()["model"]) == (200, "local/embed-small"), r.text
    assert r.headers["x-embedgate-cache"] == "miss"


@pytest.mark.anyio
async def test_a_request_whose_waited_item_fails_stores_no_fallback_vector_under_its_model(
    upstream: FakeUpstream,
) -> None:
    # Round one served by embed-b (Y), round two by embed-small (X), then an item it waited on failed: everything
    # it fetched was stored under embed-small, and Y answered embed-b's vector for embed-small's for its whole TTL.
    config = budget_config(upstream.url, [])
    kw: dict[str, Any] = {"cache": {"type": "exact_match"}, "retry": {"count": 0}, "fallbacks": B_THEN_C[:1]}
    async with running(config) as (_, c):
        upstream.script.extend(
            [
                Fault("slow", delay=1.0, model="embed-small"),
                Fault("slow", delay=1.5, model="embed-small"),
                Fault("status", 500, model="embed-small"),
                Fault("status", 400, delay=0.3, model="embed-small"),
                Fault("ok", model="embed-small"),
            ]
        )
        first = asyncio.ensure_future(embed(c, [X3], key=SAME_WORKSPACE_KEY, **kw))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(embed(c, [Z3], key=SAME_WORKSPACE_KEY, **kw))
        await asyncio.sleep(0.1)
        third = asyncio.ensure_future(embed(c, [Z3], key=SAME_WORKSPACE_KEY, **kw))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(embed(c, [Y3, X3, Z3], **kw))
        await asyncio.sleep(0.2)
        first.cancel()
        await asyncio.sleep(0.2)
        second.cancel()
        assert (await waiting).status_code == 400
        await third
        r = await embed(c, [Y3], key=SAME_WORKSPACE_KEY, cache={"type": "exact_match"})
    assert r.json()["model"] == "local/embed-small"
    vector = r.json()["data"][0]["embedding"]
    got = np.frombuffer(base64.b64decode(vector), "<f4") if isinstance(vector, str) else np.asarray(vector, "<f4")
    np.testing.assert_array_equal(got, expected_vector("embed-small", Y3))


@pytest.mark.anyio
async def test_two_different_identity_headers_are_a_400_naming_the_header(upstream: FakeUpstream) -> None:
    # The last one won: the first identity was dropped unseen, and the request counted against the other's budget.
    config = budget_config(upstream.url, [{"scope": "identity", "target": "*", "requests_per_minute": 5}])
    auth = ("authorization", f"Bearer {KEY}")
    body = {"model": "local/embed-small", "input": [1]}
    async with running(config) as (gw, c):
        for name in ("X-ORQ-IDENTITY-ID", "X-ORQ-CONTACT-ID"):
            r = await c.post(ROUTES["orq"], json=body, headers=[auth, (name, "ann"), (name, "bob")])
            assert r.status_code == 400, r.text
            assert (error_of(r)["param"], error_of(r)["code"]) == (name.lower(), "invalid_request"), r.text
        assert upstream.calls == []
        # the same one twice (a proxy that repeats it) is that one, so is one beside an empty one (no identity); a
        # body's identity wins over both
        r = await c.post(ROUTES["openai"], json=body, headers=[auth, *[("X-ORQ-IDENTITY-ID", "ann")] * 2])
        assert r.status_code == 200, r.text
        for pair in (["", "ann"], ["ann", ""]):
            r = await c.post(ROUTES["openai"], json=body, headers=[auth, *[("X-ORQ-IDENTITY-ID", v) for v in pair]])
            assert r.status_code == 200, r.text
        two = [auth, ("X-ORQ-IDENTITY-ID", "ann"), ("X-ORQ-IDENTITY-ID", "bob")]
        r = await c.post(ROUTES["openai"], json={**body, "identity": {"id": "cy"}}, headers=two)
        assert r.status_code == 200, r.text
        assert gw.identities is not None
        assert sorted(i.id for i in await gw.identities.list()) == ["ann", "cy"]


def test_cli_usage_and_identities_print_the_admin_views(
    upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 100}])
    with serve(gateway(config)) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "local/embed-small", "input": [1, 2, 3, 4],
                                                     "identity": {"id": "carol", "email": "c@example.com"}},
                       headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text
        auth = {"authorization": f"Bearer {ADMIN_KEY}"}
        http_usage = httpx.get(f"{url}/admin/usage", headers=auth).json()["data"]
        http_idents = httpx.get(f"{url}/admin/identities", headers=auth).json()["data"]
        capsys.readouterr()
        assert cli_main(["usage", "--url", url, "--admin-key", ADMIN_KEY]) == 0
        cli_usage = json.loads(capsys.readouterr().out)
        assert cli_main(["identities", "--url", url, "--admin-key", ADMIN_KEY]) == 0
        cli_idents = json.loads(capsys.readouterr().out)
        assert cli_main(["identities", "--url", url, "--admin-key", ADMIN_KEY, "--id", "carol"]) == 0
        one = json.loads(capsys.readouterr().out)
        assert cli_main(["identities", "--url", url, "--admin-key", ADMIN_KEY, "--id", "nobody"]) == 0
        none = json.loads(capsys.readouterr().out)
        assert cli_main(["usage", "--url", url, "--admin-key", "wrong"]) == 1
        assert "401" in capsys.readouterr().err

    # the reset countdown may have ticked between the two reads
    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "resets_in_s"} for row in rows]

    assert strip(cli_usage) == strip(http_usage)
    assert cli_usage[0]["tokens"]["used"] == 4
    assert cli_idents == http_idents
    assert [(i["id"], i["email"]) for i in cli_idents] == [("carol", "c@example.com")]
    assert one == cli_idents and none == []
    assert not math.isnan(cli_idents[0]["last_seen"])


def test_cli_admin_views_piped_to_a_reader_that_stops_end_without_a_traceback(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `embedgate identities | head -3`: head exits, and the print ended in a BrokenPipeError traceback.
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 100}])
    read, write = os.pipe()
    os.close(read)  # the reader is gone
    with serve(gateway(config)) as url, os.fdopen(write, "w") as gone:
        monkeypatch.setattr(sys, "stdout", gone)
        assert cli_main(["usage", "--url", url, "--admin-key", ADMIN_KEY]) == 1
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


@pytest.mark.anyio
async def test_the_shutdown_waits_for_a_reserve_a_cancelled_request_left_on_its_way(upstream: FakeUpstream) -> None:
    # A host's timeout cancelled a request while its reserve was on its way to a slow Redis, then the gateway shut
    # down: the store closed under the reserve's late answer, nothing undid it, and its tokens stayed counted.
    workspace = f"ws-drain-{uuid.uuid4().hex[:12]}"
    slow = asyncio.Event()

    async def slow_scripts(data: bytes) -> None:
        if slow.is_set() and b"EVAL" in data:
            await asyncio.sleep(0.6)

    budgets = [{"scope": "workspace", "target": workspace, "token_limit": 1_000_000}]
    keys = [{"id": "team-a", "key": KEY, "workspace": workspace, "project": "search"}]
    async with redis_proxy(require_redis(), to_redis=slow_scripts) as proxied:
        app = gateway(budget_config(upstream.url, budgets, redis_url=proxied, keys=keys))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
            assert (await embed(c, "warm the connection and the script")).status_code == 200
            slow.set()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):  # as a host bounding its requests
                    await embed(c, "cut while reserving")
        await app.shutdown()
    config = budget_config(upstream.url, budgets, redis_url=require_redis(), keys=keys)
    async with running(config) as (_, c):
        (row,) = await admin_usage(c)
    assert row["tokens"]["used"] == tokens_of("warm the connection and the script")


@pytest.mark.anyio
async def test_an_answer_of_another_vector_size_is_billed_the_usage_it_gives(upstream: FakeUpstream) -> None:
    # Served and charged upstream, of no use to the request: counted as nothing, a provider budget ended spent past
    # its limit upstream. Its own usage where it gives one (2 words), not its estimate (10 bytes + 2).
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "token_limit": 100}])
    async with running(config) as (_, c):
        assert (await embed(c, "alpha beta")).status_code == 200
        upstream.dims = 9  # the model's answers change size: one is of no use until three agree
        r = await embed(c, "alpha beta", retry={"count": 0})
        assert (r.status_code, error_of(r)["code"]) == (502, "upstream_malformed"), r.text
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == tokens_of("alpha beta") * 2
        # Of another size than the request's dimensions (a model that ignores them): its usage too, not the estimate.
        upstream.script.append(Fault("wrong_dims"))
        r = await embed(c, "alpha beta", dimensions=4, retry={"count": 0})
        assert (r.status_code, error_of(r)["code"]) == (502, "upstream_malformed"), r.text
        (row,) = await admin_usage(c)
        assert row["tokens"]["used"] == tokens_of("alpha beta") * 3


@pytest.mark.anyio
async def test_a_budget_refusal_whose_client_left_stays_a_refusal_on_its_span_and_counts_no_cache_hit(
    upstream: FakeUpstream,
) -> None:
    # Its client gone before the 429 went out, the request is a 499: but its span said budget decision "none" (no
    # scope, no dimension), and its cached items were counted as hits, for a request refused and never answered.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.test_routing_faults import leave_before_the_answer

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    config = budget_config(upstream.url, [{"scope": "api_key", "target": "team-a", "requests_per_minute": 1}])
    app = EmbeddingGateway(None, config=config, tracer_provider=provider)  # type: ignore[arg-type]
    body = {"model": "local/embed-small", "input": ["a", "b"], "cache": {"type": "exact_match"}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200  # the window's one request, and the items cached
    await leave_before_the_answer(app, body)  # a full hit, refused by the window: a 429 nobody received
    scraped = app.metrics.render()[0].decode()
    await app.shutdown()
    provider.shutdown()
    root = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER"][-1]
    attrs = dict(root.attributes or {})
    assert attrs["http.response.status_code"] == 499
    assert (attrs["embedgate.budget.decision"], attrs["embedgate.budget.scope"]) == ("rejected", "api_key")
    assert 'embedgate_cache_items_total{result="hit"}' not in scraped  # the first request's were misses
    assert 'embedgate_budget_rejections_total{dimension="requests",scope="api_key"} 1.0' in scraped
