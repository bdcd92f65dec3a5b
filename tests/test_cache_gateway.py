"""The exact-match cache as clients see it: hit, partial, miss, bit-exact across encodings, tenants, TTL,
fallbacks, coalescing, two processes sharing Redis, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pytest
import redis.asyncio
import yaml

from embedgate.config import ConfigError, parse_config
from tests.conftest import KEY, OTHER_KEY, config_dict, gateway, wait_serving
from tests.fake_upstream import FakeUpstream, Fault, expected_vector, free_port
from tests.redis_util import require_redis

SAME_WORKSPACE_KEY = "sk-test-team-a2-5555555555"
CACHE = {"type": "exact_match"}


def cache_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    data = config_dict(upstream_url, **overrides)
    data["keys"] = [
        *data["keys"],
        {"id": "team-a2", "key": SAME_WORKSPACE_KEY, "workspace": "acme", "project": "other"},
    ]
    return data


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway(parse_config(cache_config(upstream.url, cache={"max_ttl": 3600}), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        yield c
    await app.shutdown()


async def embed(c: httpx.AsyncClient, inputs: Any, key: str = KEY, **extra: Any) -> httpx.Response:
    body = {"model": "local/embed-small", "input": inputs, "cache": CACHE, **extra}
    r = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r


def floats(r: httpx.Response) -> list[np.ndarray[Any, Any]]:
    out = []
    for d in r.json()["data"]:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e, "<f4"))
    return out


@pytest.mark.anyio
async def test_miss_then_hit_then_partial(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    r = await embed(client, ["a", "b"])
    assert r.headers["x-embedgate-cache"] == "miss"
    assert len(upstream.calls) == 1
    r = await embed(client, ["a", "b"])
    assert r.headers["x-embedgate-cache"] == "hit"
    assert len(upstream.calls) == 1
    r = await embed(client, ["b", "c", "a", "d"])
    assert r.headers["x-embedgate-cache"] == "partial"
    assert len(upstream.calls) == 2
    assert upstream.calls[1].body["input"] == ["c", "d"]  # only the new items, in one call
    for vec, text in zip(floats(r), ["b", "c", "a", "d"], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-small", text))
    assert [d["index"] for d in r.json()["data"]] == [0, 1, 2, 3]
    # usage on a hit reports the tokens recorded when the item was first embedded
    r = await embed(client, ["a", "b"])
    assert r.json()["usage"]["prompt_tokens"] == 2


@pytest.mark.anyio
async def test_a_short_item_of_a_batch_reports_a_token_when_hit(client: httpx.AsyncClient) -> None:
    # The batch's 2 tokens were apportioned by length alone: 2 to the long item, 0 to "r", whose hit then
    # reported 0 tokens for a non-empty input (an upstream doing so is refused as malformed).
    r = await embed(client, ["q" * 200, "r"])
    assert r.json()["usage"]["prompt_tokens"] == 2
    assert [embed_r.json()["usage"]["prompt_tokens"] for embed_r in
            [await embed(client, ["r"]), await embed(client, ["q" * 200])]] == [1, 1]  # fmt: skip


@pytest.mark.anyio
async def test_without_cache_field_it_is_bypassed(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    for _ in range(2):
        r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x"},
                              headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.headers["x-embedgate-cache"] == "bypass"
    assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_deprecated_orq_cache_enables_it(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    for expected in ("miss", "hit"):
        r = await client.post("/v2/router/embeddings",
                              json={"model": "local/embed-small", "input": "x", "orq": {"cache": CACHE}},
                              headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.headers["x-embedgate-cache"] == expected
    assert len(upstream.calls) == 1


@pytest.mark.anyio
async def test_float_then_base64_bit_exact(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    first = await embed(client, ["alpha", "beta"], encoding_format="float")
    second = await embed(client, ["alpha", "beta"], encoding_format="base64")
    assert second.headers["x-embedgate-cache"] == "hit"
    for a, b in zip(floats(first), floats(second), strict=True):
        assert a.tobytes() == b.tobytes()
    assert isinstance(second.json()["data"][0]["embedding"], str)


@pytest.mark.anyio
async def test_workspaces_are_isolated_keys_of_one_workspace_share(client: httpx.AsyncClient,
                                                                   upstream: FakeUpstream) -> None:  # fmt: skip
    await embed(client, "shared text")
    r = await embed(client, "shared text", key=SAME_WORKSPACE_KEY)
    assert r.headers["x-embedgate-cache"] == "hit"
    r = await client.post("/v1/embeddings", json={"model": "backup/embed-small", "input": "shared text",
                                                  "cache": CACHE},
                          headers={"authorization": f"Bearer {OTHER_KEY}"})  # fmt: skip
    assert r.headers["x-embedgate-cache"] == "miss"  # another model, and another workspace
    assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_dimensions_and_input_type_are_in_the_key(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    await embed(client, "t")
    assert (await embed(client, "t", dimensions=4)).headers["x-embedgate-cache"] == "miss"
    assert (await embed(client, "t", input_type="query")).headers["x-embedgate-cache"] == "miss"
    assert (await embed(client, "t", user="someone", name="n")).headers["x-embedgate-cache"] == "hit"


@pytest.mark.anyio
async def test_ttl_expiry_and_max_ttl(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    await embed(client, "short-lived", cache={"type": "exact_match", "ttl": 1})
    assert (await embed(client, "short-lived")).headers["x-embedgate-cache"] == "hit"
    await anyio.sleep(1.2)
    assert (await embed(client, "short-lived")).headers["x-embedgate-cache"] == "miss"
    r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x",
                                                  "cache": {"type": "exact_match", "ttl": 3601}},
                          headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "cache.ttl"
    # the same with no-store (the cache stage, which checked it, is skipped): was a 200
    r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x",
                                                  "cache": {"type": "exact_match", "ttl": 3601}},
                          headers={"authorization": f"Bearer {KEY}", "cache-control": "no-store"})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "cache.ttl"


@pytest.mark.anyio
async def test_fallback_vectors_are_cached_under_the_fallback_model(client: httpx.AsyncClient,
                                                                    upstream: FakeUpstream) -> None:  # fmt: skip
    upstream.script.append(Fault("status", 503, model="embed-small"))
    body = {"fallbacks": [{"model": "local/embed-b"}], "retry": {"count": 0, "on_codes": [503]}}
    r = await embed(client, ["x", "y"], **body)
    assert r.json()["model"] == "local/embed-b"
    # never served as the primary model's
    r = await embed(client, ["x", "y"])
    assert r.headers["x-embedgate-cache"] == "miss"
    assert r.json()["model"] == "local/embed-small"
    np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-small", "x"))
    # but a request for the fallback model itself hits
    r = await client.post("/v1/embeddings", json={"model": "local/embed-b", "input": ["x", "y"], "cache": CACHE},
                          headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.headers["x-embedgate-cache"] == "hit"


@pytest.mark.anyio
async def test_a_partial_hit_never_mixes_models(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    await embed(client, ["cached"])
    upstream.script.append(Fault("status", 503, model="embed-small"))
    r = await embed(client, ["cached", "new"], fallbacks=[{"model": "local/embed-b"}],
                    retry={"count": 0, "on_codes": [503]})  # fmt: skip
    assert r.json()["model"] == "local/embed-b"
    for vec, text in zip(floats(r), ["cached", "new"], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-b", text))


def fail_the_cached_on_the_fallback(upstream: FakeUpstream) -> None:
    """embed-small fails the missing item; embed-b serves it, then fails the cached item embedded again."""
    upstream.script.extend([Fault("status", 503, model="embed-small"), Fault("ok", model="embed-b"),
                            Fault("status", 500, model="embed-b")])  # fmt: skip


@pytest.mark.anyio
async def test_what_a_fallback_fetched_is_kept_when_embedding_the_cached_items_again_fails(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # The fallback embedded the missing item (billed), then failed embedding the cached one again: the request
    # failed, and the item it paid for was not stored, so the next request paid for it again.
    await embed(client, ["cached"])
    fail_the_cached_on_the_fallback(upstream)
    body = {"model": "local/embed-small", "input": ["cached", "new"], "cache": CACHE,
            "fallbacks": [{"model": "local/embed-b"}], "retry": {"count": 0, "on_codes": [503]}}  # fmt: skip
    r = await client.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 502, r.text
    calls = len(upstream.calls)
    r = await client.post("/v1/embeddings", json={"model": "local/embed-b", "input": ["new"], "cache": CACHE},
                          headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.headers["x-embedgate-cache"] == "hit" and len(upstream.calls) == calls
    np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-b", "new"))
    r = await embed(client, ["cached"])  # the primary's own entry is still its own
    assert r.headers["x-embedgate-cache"] == "hit"
    np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-small", "cached"))


@pytest.mark.anyio
async def test_a_partial_hit_whose_cached_items_fail_on_the_fallback_goes_on_to_the_next_one(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # Embedding the cached items again went to the model that served alone: its failure was the request's 502,
    # where the next fallback would have served (as it does without the cache).
    await embed(client, ["hello"])
    fail_the_cached_on_the_fallback(upstream)
    fallbacks = [{"model": "local/embed-b"}, {"model": "local/embed-c"}]
    r = await embed(client, ["hello", "world"], fallbacks=fallbacks, retry={"count": 0, "on_codes": [503]})
    assert r.json()["model"] == "local/embed-c"
    for vec, text in zip(floats(r), ["hello", "world"], strict=True):  # one model's answer
        np.testing.assert_array_equal(vec, expected_vector("embed-c", text))
    assert [(c.body["model"], c.body["input"]) for c in upstream.calls[1:]] == [
        ("embed-small", ["world"]), ("embed-b", ["world"]), ("embed-b", ["hello"]), ("embed-c", ["hello"]),
        ("embed-c", ["world"])]  # fmt: skip
    calls = len(upstream.calls)
    for model in ("embed-b", "embed-c"):  # what each was paid for is kept under it
        r = await client.post("/v1/embeddings", json={"model": f"local/{model}", "input": ["world"], "cache": CACHE},
                              headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.headers["x-embedgate-cache"] == "hit", model
        np.testing.assert_array_equal(floats(r)[0], expected_vector(model, "world"))
    assert len(upstream.calls) == calls


@pytest.mark.anyio
async def test_a_model_named_twice_in_the_chain_is_gone_down_once(client: httpx.AsyncClient,
                                                                  upstream: FakeUpstream) -> None:  # fmt: skip
    # [A, B, A]: after A served at its second place, embedding the rest again started from A's first place, and
    # A and B could take turns for ever (41 calls for one request of 2 items, each round billed).
    await embed(client, ["hello"])
    fail_a, ok_a = Fault("status", 500, model="embed-small"), Fault("ok", model="embed-small")
    fail_b, ok_b = Fault("status", 500, model="embed-b"), Fault("ok", model="embed-b")
    upstream.script.extend([fail_a, ok_b, fail_b, ok_a] * 5)
    fallbacks = [{"model": "local/embed-b"}, {"model": "local/embed-small"}]
    body = {"model": "local/embed-small", "input": ["hello", "world"], "cache": CACHE, "fallbacks": fallbacks,
            "retry": {"count": 0}}  # fmt: skip
    r = await client.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
    # world: A fails, B serves; hello again from B on: B fails, A (its second place) serves; world again from
    # there: A only, which fails (the script's next turn)
    assert [(c.body["model"], c.body["input"]) for c in upstream.calls[1:]] == [
        ("embed-small", ["world"]), ("embed-b", ["world"]), ("embed-b", ["hello"]), ("embed-small", ["hello"]),
        ("embed-small", ["world"])]  # fmt: skip
    assert r.status_code == 502, r.text


@pytest.mark.anyio
async def test_an_item_repeated_in_a_batch_is_fetched_once_after_its_owners_were_cancelled(
    upstream: FakeUpstream,
) -> None:
    # Owner after owner cancelled: the batch fetched what was left itself, each repeat of an item in it (billed
    # twice, where its estimate counted it once).
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    body = {"model": "local/embed-small", "cache": CACHE}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(inputs: Any) -> httpx.Response:
            return await c.post("/v1/embeddings", json={**body, "input": inputs},
                                headers={"authorization": f"Bearer {KEY}"})  # fmt: skip

        upstream.script += [Fault("slow", delay=1.0)] * 3
        owners = []
        for _ in range(3):
            owners.append(asyncio.ensure_future(post([[1, 2, 3]])))
            await asyncio.sleep(0.05)
        repeated = asyncio.ensure_future(post([[1, 2, 3], [1, 2, 3]]))
        await asyncio.sleep(0.1)
        for owner in owners:
            owner.cancel()
            await asyncio.sleep(0.1)
        r = await repeated
    await app.shutdown()
    assert r.status_code == 200, r.text
    assert upstream.calls[-1].body["input"] == [[1, 2, 3]]
    assert floats(r)[0].tolist() == floats(r)[1].tolist()


@pytest.mark.anyio
async def test_a_partial_hit_never_mixes_vector_sizes(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    # The model changed its dimension count (8 -> 9, adopted after three agreeing answers): a partial hit merged a
    # vector cached at 8 floats with fresh ones of 9.
    await embed(client, ["old"])
    upstream.dims = 9
    await embed(client, ["new"], retry={"count": 2})  # refused twice as malformed, then adopted
    r = await embed(client, ["old", "fresh"])
    assert [len(v) for v in floats(r)] == [9, 9]
    assert (await embed(client, ["old"])).headers["x-embedgate-cache"] == "hit"
    assert [len(v) for v in floats(await embed(client, ["old"]))] == [9]  # cached again at the new size


@pytest.mark.anyio
async def test_a_full_hit_never_mixes_vector_sizes(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    # Items cached before and after the model changed its dimension count, asked for together: a full hit served
    # vectors of 8 and 9 floats in one answer.
    await embed(client, ["before"])
    upstream.dims = 9
    await embed(client, ["after"], retry={"count": 2})  # refused twice as malformed, then adopted
    calls = len(upstream.calls)
    r = await embed(client, ["before", "after"])
    assert [len(v) for v in floats(r)] == [9, 9]
    assert r.headers["x-embedgate-cache"] == "partial"  # the item of the old size is a miss, and only it
    assert [c.body["input"] for c in upstream.calls[calls:]] == [["before"]]
    assert (await embed(client, ["before", "after"])).headers["x-embedgate-cache"] == "hit"


@pytest.mark.anyio
async def test_an_item_cached_at_the_models_old_size_is_no_hit(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # Asked for alone (or with others of its size), an item cached before the model changed its dimension count was
    # a full hit: the same text got vectors of 8 and of 9 floats in requests one after the other, until its TTL.
    await embed(client, ["p", "q"])
    upstream.dims = 9
    await embed(client, ["new"], retry={"count": 2})  # refused twice as malformed, then adopted
    calls = len(upstream.calls)
    r = await embed(client, ["p", "q"])
    assert r.headers["x-embedgate-cache"] == "miss" and [len(v) for v in floats(r)] == [9, 9]
    assert [c.body["input"] for c in upstream.calls[calls:]] == [["p", "q"]]
    r = await embed(client, ["p"])
    assert r.headers["x-embedgate-cache"] == "hit" and [len(v) for v in floats(r)] == [9]  # cached anew at 9


@pytest.mark.anyio
async def test_a_model_the_request_s_provider_preferences_exclude_is_neither_looked_up_nor_answered(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # The cache was looked up under the chain's first model, which the router passes over: a hit answered the
    # excluded provider's vector (a 200 where routing says 404), and what the fallback served, stored under the
    # fallback, was never found again.
    await embed(client, "hello")  # cached under local/embed-small
    only_backup = {"only": ["backup"]}
    body = {"model": "local/embed-small", "input": "hello", "cache": CACHE, "provider": only_backup}
    r = await client.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "no_allowed_providers")
    calls = len(upstream.calls)
    fallbacks = [{"model": "backup/embed-small"}]
    answers = [await embed(client, ["hello", "fresh"], provider=only_backup, fallbacks=fallbacks) for _ in range(3)]
    assert [(a.json()["model"], a.headers["x-embedgate-cache"]) for a in answers] == [
        ("backup/embed-small", "miss"), ("backup/embed-small", "hit"), ("backup/embed-small", "hit")]  # fmt: skip
    sent = [(c.headers.get("authorization"), c.body["input"]) for c in upstream.calls[calls:]]
    assert sent == [("Bearer provider-secret-backup", ["hello", "fresh"])]  # backup's, once
    for vec, text in zip(floats(answers[2]), ["hello", "fresh"], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-small", text))


@pytest.mark.anyio
async def test_a_fresh_batch_repeating_an_item_is_a_miss(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    # The repeats waited on their first occurrence's fetch and were counted as cache hits: "partial".
    r = await embed(client, ["a b", "c", "a b", "a b", "d"])
    assert r.headers["x-embedgate-cache"] == "miss"
    assert [c.body["input"] for c in upstream.calls] == [["a b", "c", "d"]]
    r = await embed(client, ["a b", "e", "a b"])
    assert r.headers["x-embedgate-cache"] == "partial"


@pytest.mark.anyio
async def test_an_item_repeated_in_a_batch_goes_upstream_once_however_it_is_embedded(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # A fallback embedding a partial hit's cached items again sent each repeat (paid for twice, and the answer
    # said "partial" though every item was embedded again); a no-cache refresh sent every repeat too.
    await embed(client, ["x"])
    upstream.script.append(Fault("status", 503, model="embed-small"))
    r = await embed(client, ["x", "x", "n", "n"], fallbacks=[{"model": "local/embed-b"}],
                    retry={"count": 0, "on_codes": [503]})  # fmt: skip
    assert r.json()["model"] == "local/embed-b"
    assert r.headers["x-embedgate-cache"] == "miss"
    assert [(c.body["model"], c.body["input"]) for c in upstream.calls[1:]] == [
        ("embed-small", ["n"]), ("embed-b", ["n"]), ("embed-b", ["x"])]  # fmt: skip
    for vec, text in zip(floats(r), ["x", "x", "n", "n"], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-b", text))
    calls = len(upstream.calls)
    body = {"model": "local/embed-small", "input": ["z", "z", "z"], "cache": CACHE}
    r = await client.post("/v1/embeddings", json=body,
                          headers={"authorization": f"Bearer {KEY}", "cache-control": "no-cache"})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-embedgate-cache"] == "miss"
    assert [c.body["input"] for c in upstream.calls[calls:]] == [["z"]]
    assert [len(v) for v in floats(r)] == [upstream.dims] * 3


@pytest.mark.anyio
async def test_fifty_concurrent_identical_misses_make_one_upstream_call(client: httpx.AsyncClient,
                                                                       upstream: FakeUpstream) -> None:  # fmt: skip
    upstream.script.append(Fault("slow", delay=0.3))  # keep the first call in flight while the others arrive
    statuses: list[str] = []

    async def one() -> None:
        r = await embed(client, "a brand new text")
        statuses.append(r.headers["x-embedgate-cache"])
        np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-small", "a brand new text"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert len(upstream.calls) == 1
    assert sorted(statuses) == ["hit"] * 49 + ["miss"]


@pytest.mark.anyio
async def test_a_request_opts_out_with_cache_control(upstream: FakeUpstream) -> None:
    # enabled_by_default caches every request "unless it opts out": there was no way to.
    app = gateway(parse_config(cache_config(upstream.url, cache={"enabled_by_default": True}), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(text: str, cache_control: str | None = None) -> str:
            headers = {"authorization": f"Bearer {KEY}"}
            if cache_control is not None:
                headers["Cache-Control"] = cache_control
            r = await c.post("/v1/embeddings", json={"model": "local/embed-small", "input": text}, headers=headers)
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-small", text))
            return r.headers["x-embedgate-cache"]

        assert [await post("a"), await post("a")] == ["miss", "hit"]
        calls = len(upstream.calls)
        # no-store: neither read nor written
        assert [await post("a", "no-store"), await post("b", "No-Store, max-age=0")] == ["bypass", "bypass"]
        assert len(upstream.calls) == calls + 2
        assert await post("b") == "miss"
        # no-cache: embedded afresh and stored
        assert [await post("a", "no-cache"), await post("c", 'no-cache="x"')] == ["miss", "miss"]
        assert len(upstream.calls) == calls + 5
        assert [await post("a"), await post("c"), await post("d", "max-age=60")] == ["hit", "hit", "miss"]
        # the same directives on two lines are one list (RFC 9110): the second line alone was read, and stored
        headers = [("authorization", f"Bearer {KEY}"), ("cache-control", "no-store"), ("cache-control", "max-age=0")]
        r = await c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "e"}, headers=headers)
        assert r.headers["x-embedgate-cache"] == "bypass"
        assert await post("e") == "miss"
    await app.shutdown()


async def slowed_store(app: Any, seconds: float) -> None:
    """Make the gateway's cache writes take ``seconds`` longer (a Redis round trip, stretched)."""
    await app.startup()
    assert app.cache is not None
    store = app.cache.set_many

    async def slow_store(*args: Any, **kwargs: Any) -> None:
        await anyio.sleep(seconds)
        await store(*args, **kwargs)

    app.cache.set_many = slow_store


async def one_while_another_is_stored(
    upstream: FakeUpstream, first: Callable[[], Any], second: Callable[[], Any], calls: int = 1
) -> None:
    """Run ``first``, then ``second`` once the upstream has had ``calls`` calls and ``first``'s (slowed) cache
    write is under way."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        with anyio.fail_after(5):
            while len(upstream.calls) < calls:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # its answer is in, its cache write not yet
        tg.start_soon(second)


@pytest.mark.anyio
async def test_a_miss_arriving_while_the_first_answer_is_being_stored_takes_it(upstream: FakeUpstream) -> None:
    # The fetching request left the coalescer when its upstream call ended, before its cache write landed: one
    # whose lookup missed in between fetched the same item again (21 of 40 bursts of 10 made two upstream calls).
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        await slowed_store(app, 1.0)
        got: dict[str, httpx.Response] = {}

        async def post(name: str) -> None:
            got[name] = await embed(c, "the same text")

        await one_while_another_is_stored(upstream, lambda: post("first"), lambda: post("second"))
    await app.shutdown()
    assert len(upstream.calls) == 1
    assert (got["first"].headers["x-embedgate-cache"], got["second"].headers["x-embedgate-cache"]) == ("miss", "hit")
    assert got["second"].json()["data"] == got["first"].json()["data"]


@pytest.mark.anyio
async def test_a_coalesced_request_keeps_the_item_for_its_own_longer_ttl(upstream: FakeUpstream) -> None:
    # Coalesced onto a request asking for a 1 s TTL, one asking for an hour stored nothing: the item expired after
    # 1 s, and the upstream was paid for it again.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    upstream.script.append(Fault("slow", delay=0.5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        got: dict[str, httpx.Response] = {}

        async def post(name: str, ttl: int) -> None:
            got[name] = await embed(c, "kept for an hour", cache={"type": "exact_match", "ttl": ttl})

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "short", 1)
            with anyio.fail_after(5):
                while not upstream.calls:
                    await anyio.sleep(0.01)
            tg.start_soon(post, "long", 3600)
        assert [got[n].headers["x-embedgate-cache"] for n in ("short", "long")] == ["miss", "hit"]
        await anyio.sleep(1.3)
        assert (await embed(c, "kept for an hour")).headers["x-embedgate-cache"] == "hit"
    await app.shutdown()
    assert len(upstream.calls) == 1


@pytest.mark.parametrize("status", [500, 404])
@pytest.mark.anyio
async def test_a_request_sharing_another_s_failed_call_is_not_told_the_upstream_s_words(
    upstream: FakeUpstream, status: int
) -> None:
    # A 5xx (or a 404 model_not_found) quoting the batch it was sent reached every request waiting on that call:
    # another key's input (here a key of another project of the workspace) in its error. The owner reads its own;
    # the waiter, the status (and for the 404, that the model is not served).
    error: dict[str, Any] = {"message": 'failed on ["PRIVATE salary of Jane", "common text"]'}
    if status == 404:
        error["code"] = "model_not_found"
    quoted = orjson.dumps({"error": error})
    upstream.script.append(Fault("raw", status, headers={"Content-Type": "application/json"}, body=quoted, delay=0.3))
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(name: str, texts: list[str], key: str) -> None:
            model = "local/embed-small" if status == 500 else "local/unknown"  # (a model by its provider's name)
            body = {"model": model, "input": texts, "cache": CACHE, "retry": {"count": 0}}
            got[name] = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "owner", ["PRIVATE salary of Jane", "common text"], KEY)
            with anyio.fail_after(5):
                while not upstream.calls:
                    await anyio.sleep(0.01)
            tg.start_soon(post, "waiter", ["common text"], SAME_WORKSPACE_KEY)
    await app.shutdown()
    assert len(upstream.calls) == 1  # the waiter shared the owner's call
    owner, waiter = got["owner"], got["waiter"]
    assert owner.status_code == waiter.status_code == (502 if status == 500 else 404)
    assert "PRIVATE salary" in owner.json()["error"]["message"]  # its own input, in the upstream's words
    assert "PRIVATE" not in waiter.text and "common text" not in waiter.text
    expected = ("The upstream answered 500 to the call" if status == 500 else
                "The model 'local/unknown' is not served upstream (as the upstream answered the call")  # fmt: skip
    assert waiter.json()["error"]["message"].startswith(expected), waiter.text


def _no_retry(items: list[str]) -> dict[str, Any]:
    return {"model": "local/embed-small", "input": items, "cache": CACHE, "retry": {"count": 0}}


async def _post_at(c: httpx.AsyncClient, delay: float, items: list[str], key: str = KEY,
                   cancel_after: float | None = None) -> tuple[httpx.Response | None, float]:  # fmt: skip
    """POST ``items`` after ``delay`` s; None if cancelled ``cancel_after`` s after it went (its client left)."""
    await anyio.sleep(delay)
    started = time.monotonic()
    try:
        with anyio.fail_after(cancel_after if cancel_after is not None else 60):
            r = await c.post("/v1/embeddings", json=_no_retry(items), headers={"authorization": f"Bearer {key}"})
    except TimeoutError:
        return None, time.monotonic() - started
    return r, time.monotonic() - started


@pytest.mark.parametrize("owner_gives_up", ["its input refused", "its client gone"])
@pytest.mark.anyio
async def test_a_request_coming_while_a_waiter_fetches_again_takes_its_call(
    upstream: FakeUpstream, owner_gives_up: str
) -> None:
    # The owner gave up (its batch refused, or cancelled) and left the coalescer, which went with it: the request
    # that had waited on it fetched again in that orphan, and one coming meanwhile found none and paid a second call.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    if owner_gives_up == "its input refused":
        upstream.script.append(Fault("status", 400, delay=0.4))
        owner = ["x", "bad"]
    else:
        upstream.script.append(Fault("ok", delay=0.8))
        owner = ["x"]
    upstream.script.append(Fault("ok", delay=0.5))  # the waiter's own call for "x"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        async with anyio.create_task_group() as tg:
            got: list[Any] = []

            async def run(*args: Any, **kw: Any) -> None:
                got.append(await _post_at(c, *args, **kw))

            gone = owner_gives_up == "its client gone"
            tg.start_soon(functools.partial(run, 0, owner, cancel_after=0.4 if gone else None))
            tg.start_soon(run, 0.1, ["x"], SAME_WORKSPACE_KEY)
            tg.start_soon(run, 0.6, ["x"])
    await app.shutdown()
    calls = [call.body["input"] for call in upstream.calls]
    assert calls == [owner, ["x"]], calls  # one call for "x" after the owner's
    late = next(r for r, _ in got if r is not None and r.status_code == 200 and r.headers["x-embedgate-cache"] == "hit")
    assert late.json()["data"][0]["embedding"]


@pytest.mark.anyio
async def test_a_request_waiting_on_another_s_call_ends_at_its_own_deadline(upstream: FakeUpstream) -> None:
    # After the owner it waited on gave up, a request that had started its own calls waited on a newer request's
    # call, which runs on that request's later deadline: it answered ~0.9 s past its own.
    app = gateway(parse_config(cache_config(upstream.url, routing={"backoff_base_ms": 10, "deadline_ms": 1000}),
                               env={}))  # fmt: skip
    upstream.script.extend([Fault("status", 400, delay=0.9), Fault("ok", delay=0.7), Fault("ok", delay=2.5)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        async with anyio.create_task_group() as tg:
            took: dict[str, tuple[httpx.Response | None, float]] = {}

            async def run(name: str, delay: float, items: list[str], key: str) -> None:
                took[name] = await _post_at(c, delay, items, key)

            tg.start_soon(run, "owner", 0, ["x", "bad"], KEY)  # refused at 0.9 s: its waiters fetch again
            tg.start_soon(run, "waiter", 0.05, ["y", "x"], SAME_WORKSPACE_KEY)  # fetches "y", waits for "x"
            tg.start_soon(run, "newer", 0.3, ["x"], KEY)  # wakes first at 0.9 s, fetches "x" (2.5 s)
    await app.shutdown()
    answer, seconds = took["waiter"]
    assert answer is not None and answer.status_code == 504, answer
    assert answer.json()["error"]["message"] == "The overall deadline of 1000 ms was reached"
    assert seconds < 1.4, seconds  # its deadline (1 s), not the newer request's


@pytest.mark.anyio
async def test_a_request_cancelled_while_waiting_keeps_what_it_fetched(upstream: FakeUpstream) -> None:
    # Its own call embedded "y y" (billed), then it waited on another's call for "x" and its client left: "y y"
    # was never stored, and the client asking again paid for it twice.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    upstream.script.append(Fault("ok", delay=1.0))  # the other request's call for "x"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_post_at, c, 0, ["x"])
            tg.start_soon(functools.partial(_post_at, c, 0.1, ["x", "y y"], SAME_WORKSPACE_KEY, cancel_after=0.4))
        again, _ = await _post_at(c, 0, ["x", "y y"], SAME_WORKSPACE_KEY)
    await app.shutdown()
    assert again is not None and again.headers["x-embedgate-cache"] == "hit"
    assert [call.body["input"] for call in upstream.calls] == [["x"], ["y y"]]


@pytest.mark.anyio
async def test_a_longer_ttl_a_waiter_asked_holds_when_the_fetching_request_stores_last(upstream: FakeUpstream) -> None:
    # A (ttl 1) fetched x and waited on C for y; B (ttl 3600), waiting on A for x, stored x first: A's store, last,
    # cut it to 1 s again.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    upstream.script.extend([Fault("slow", delay=1.2), Fault("slow", delay=0.3)])  # C's y, then A's x
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(items: list[str], ttl: int) -> None:
            await embed(c, items, cache={"type": "exact_match", "ttl": ttl})

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, ["y"], 3600)
            await anyio.sleep(0.15)
            tg.start_soon(post, ["x", "y"], 1)
            await anyio.sleep(0.15)
            tg.start_soon(post, ["x"], 3600)
        assert len(upstream.calls) == 2
        await anyio.sleep(1.3)
        assert (await embed(c, "x")).headers["x-embedgate-cache"] == "hit"
    await app.shutdown()
    assert len(upstream.calls) == 2


@pytest.mark.anyio
async def test_a_refresh_takes_no_answer_another_request_is_storing(upstream: FakeUpstream) -> None:
    # Cache-Control: no-cache arriving while another request stored the same item got that answer (a "hit"), not a
    # fresh one.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        await slowed_store(app, 1.0)
        got: dict[str, httpx.Response] = {}

        async def post(name: str, **headers: str) -> None:
            body = {"model": "local/embed-small", "input": "the same text", "cache": CACHE}
            got[name] = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}", **headers})

        await one_while_another_is_stored(upstream, lambda: post("first"),
                                          lambda: post("refresh", **{"cache-control": "no-cache"}))  # fmt: skip
    await app.shutdown()
    assert len(upstream.calls) == 2
    assert got["refresh"].headers["x-embedgate-cache"] == "miss"


@pytest.mark.anyio
async def test_an_answer_taken_from_another_request_is_checked_for_its_width_too(upstream: FakeUpstream) -> None:
    # The model changed its dimension count: a request whose new item came from another request's fetch kept its
    # cached item of the old width, and answered vectors of two sizes.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        await embed(c, ["old item"])  # cached 8 wide
        upstream.dims = 12
        await slowed_store(app, 1.0)
        got: dict[str, httpx.Response] = {}

        async def post(name: str) -> None:
            got[name] = await embed(c, ["old item", "new item"])

        # the first fetches its new item, then its old one again at the new width (after the first call above)
        await one_while_another_is_stored(upstream, lambda: post("first"), lambda: post("second"), calls=3)
    await app.shutdown()
    for name in ("first", "second"):
        assert [len(v) for v in floats(got[name])] == [12, 12], name


@pytest.mark.anyio
async def test_a_miss_does_not_take_the_upstreams_rejection_of_another_requests_input(upstream: FakeUpstream) -> None:
    # Coalesced, a request for one valid item got the 400 the upstream gave another request's batch (for its other,
    # bad item), blaming an input it had not sent.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(name: str, key: str, inputs: list[str]) -> None:
            body = {"model": "local/embed-small", "input": inputs, "cache": CACHE}
            got[name] = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"})

        upstream.script.append(Fault("status", 400, delay=0.5))
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "bad batch", KEY, ["shared text", "a bad item"])
            with anyio.fail_after(5):
                while not upstream.calls:
                    await anyio.sleep(0.01)
            tg.start_soon(post, "good", SAME_WORKSPACE_KEY, ["shared text"])
    await app.shutdown()
    assert got["bad batch"].status_code == 400
    assert got["good"].status_code == 200, got["good"].text
    np.testing.assert_array_equal(floats(got["good"])[0], expected_vector("embed-small", "shared text"))
    assert [c.body["input"] for c in upstream.calls] == [["shared text", "a bad item"], ["shared text"]]


@pytest.mark.anyio
async def test_identical_requests_for_an_input_the_upstream_rejects_make_one_call(upstream: FakeUpstream) -> None:
    # The rejection of a batch holding only what the waiting requests asked for is theirs too: each asked again,
    # one after another (8 calls, the last answer after ~4x the upstream's time).
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post() -> None:
            body = {"model": "local/embed-small", "input": ["a bad item"], "cache": CACHE}
            r = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
            statuses.append(r.status_code)

        upstream.script.append(Fault("status", 400, delay=0.3))
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(post)
    await app.shutdown()
    assert statuses == [400] * 8
    assert len(upstream.calls) == 1


@pytest.mark.anyio
async def test_a_miss_waits_only_on_a_request_routed_alike(upstream: FakeUpstream) -> None:
    # Coalesced, a request got whatever the request it waited on got: that one's 502 though its own fallback was
    # healthy, or a fallback's vector (model embed-b) that its key was not granted and it did not ask for.
    narrow = "sk-test-only-small-77777777"
    data = cache_config(upstream.url)
    data["keys"].append({"id": "only-small", "key": narrow, "workspace": "acme", "project": "search",
                         "models": ["local/embed-small"]})  # fmt: skip
    app = gateway(parse_config(data, env={}))
    no_retry = {"count": 0, "on_codes": [503]}
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(name: str, key: str, after: float, extra: dict[str, Any]) -> None:
            await anyio.sleep(after)
            body = {"model": "local/embed-small", "input": "shared text", "cache": CACHE, "retry": no_retry, **extra}
            got[name] = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"})

        # A fails slowly and has no fallback; B, arriving meanwhile, has one (and embed-small fails it too)
        upstream.script += [Fault("status", 503, delay=0.3, model="embed-small")] * 2
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "a", KEY, 0.0, {})
            tg.start_soon(post, "b", KEY, 0.1, {"fallbacks": [{"model": "local/embed-b"}]})
        assert got["a"].status_code == 502
        assert got["b"].status_code == 200 and got["b"].json()["model"] == "local/embed-b"

        # A falls back to embed-b; B, whose key has embed-small only, must not get embed-b's vector
        upstream.script.append(Fault("status", 503, delay=0.3, model="embed-small"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "a", KEY, 0.0, {"input": "other text", "fallbacks": [{"model": "local/embed-b"}]})
            tg.start_soon(post, "b", narrow, 0.1, {"input": "other text"})
        assert got["a"].status_code == 200 and got["a"].json()["model"] == "local/embed-b"
        assert got["b"].status_code == 200, got["b"].text
        assert got["b"].json()["model"] == "local/embed-small"
        np.testing.assert_array_equal(floats(got["b"])[0], expected_vector("embed-small", "other text"))
    await app.shutdown()


@pytest.mark.anyio
async def test_a_request_sharing_a_fallback_s_item_falls_back_too_when_its_own_model_fails_it(
    upstream: FakeUpstream,
) -> None:
    # B took A's item from A's call (served by the fallback), embedded its own on the primary, then embedded A's
    # item again on the primary alone: that failed, and B got a 502 that it would not have got alone.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    body = {"model": "local/embed-small", "cache": CACHE, "fallbacks": [{"model": "local/embed-b"}],
            "retry": {"count": 0, "on_codes": [503]}}  # fmt: skip
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(name: str, after: float, inputs: list[str]) -> None:
            await anyio.sleep(after)
            got[name] = await c.post("/v1/embeddings", json={**body, "input": inputs},
                                     headers={"authorization": f"Bearer {KEY}"})  # fmt: skip

        upstream.script += [Fault("status", 500, model="embed-small"), Fault("slow", delay=0.4, model="embed-b"),
                            Fault("ok", model="embed-small"), Fault("status", 500, model="embed-small")]  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "a", 0.0, ["bad1"])
            tg.start_soon(post, "b", 0.15, ["bad1", "ok1"])
    await app.shutdown()
    assert got["a"].status_code == 200 and got["a"].json()["model"] == "local/embed-b"
    assert got["b"].status_code == 200, got["b"].text
    assert got["b"].json()["model"] == "local/embed-b"
    for vec, text in zip(floats(got["b"]), ["bad1", "ok1"], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-b", text))


@pytest.mark.anyio
async def test_memory_backend_stays_within_max_bytes(upstream: FakeUpstream) -> None:
    max_bytes = 64 * 1024
    app = gateway(parse_config(cache_config(upstream.url, cache={"max_bytes": max_bytes}), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        # 8 dims x 4 bytes + key: ~90 bytes an entry; 10x max_bytes of entries
        batch = 256
        total = 0
        n = 0
        while total < 10 * max_bytes:
            r = await embed(c, [f"fill {n + i}" for i in range(batch)])
            n += batch
            total += batch * (8 * 4 + 4 + 48)
        assert app.cache is not None
        used = app.cache.bytes_used()
        assert 0 < used <= max_bytes
        r = await embed(c, [f"fill {n - 1}"])
        assert r.headers["x-embedgate-cache"] == "hit"  # the newest stay
        r = await embed(c, ["fill 0"])
        assert r.headers["x-embedgate-cache"] == "miss"  # the oldest went
    await app.shutdown()


# --- Redis: shared across processes, and outages -------------------------------------------------------------


@pytest.mark.anyio
async def test_the_cache_may_have_a_redis_of_its_own(upstream: FakeUpstream) -> None:
    # So that a Redis bounded by maxmemory and an eviction policy holds only the cache, never budget counters.
    url = require_redis().rsplit("/", 1)[0] + "/7"
    store = redis.asyncio.Redis.from_url(url)
    before = set(await store.keys("eg:c:*"))
    app = gateway(parse_config(cache_config(upstream.url, cache={"redis_url": url}), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        await embed(c, [f"own redis {uuid.uuid4()}"])
        ready = (await c.get("/readyz")).json()["checks"]
    await app.shutdown()
    added = set(await store.keys("eg:c:*")) - before
    if added:
        await store.delete(*added)
    await store.aclose()
    assert len(added) == 1  # the item went to the cache's own Redis
    assert ready["cache"] == {"backend": "redis", "ok": True}
    assert ready["budgets"]["backend"] == "memory"  # no redis_url: the rest stays in process memory


def test_a_bad_cache_redis_url_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_config(cache_config("http://127.0.0.1:9/v1", cache={"redis_url": "http://secret@host"}), env={})
    assert any(e.startswith("cache.redis_url") for e in bad.value.errors)
    assert "secret" not in str(bad.value)


@pytest.mark.anyio
async def test_the_cache_size_metric_is_zero_with_the_redis_cache(upstream: FakeUpstream) -> None:
    # It was -1 ("not applicable"), which a multi-worker scrape summed to -N.
    app = gateway(parse_config(cache_config(upstream.url, redis_url=require_redis()), env={}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        await embed(c, ["metric probe"])
        scraped = (await c.get("/metrics")).text
    await app.shutdown()
    assert "\nembedgate_cache_bytes 0.0\n" in scraped


def write_config(tmp_path: Path, upstream_url: str, redis_url: str, workspace: str) -> Path:
    data = config_dict(upstream_url, redis_url=redis_url)
    data["keys"][0]["workspace"] = workspace
    path = tmp_path / f"gw-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config_path: Path) -> str:
        port = free_port()
        env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
        proc = subprocess.Popen([sys.executable, "-m", "embedgate.cli", "serve", "--config", str(config_path),
                                 "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url)
        return url

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def post(url: str, text: str) -> httpx.Response:
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "local/embed-small", "input": text, "cache": CACHE},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return r


def test_two_processes_share_one_redis(tmp_path: Path, upstream: FakeUpstream,
                                       start_proxy: Callable[[Path], str]) -> None:  # fmt: skip
    redis_url = require_redis()
    workspace = f"ws-{uuid.uuid4().hex}"
    cfg = write_config(tmp_path, upstream.url, redis_url, workspace)
    first, second = start_proxy(cfg), start_proxy(cfg)
    assert post(first, "embedded once").headers["x-embedgate-cache"] == "miss"
    assert post(second, "embedded once").headers["x-embedgate-cache"] == "hit"
    assert len(upstream.calls) == 1


def test_redis_outage_is_a_miss_and_caching_resumes(tmp_path: Path, upstream: FakeUpstream,
                                                    start_proxy: Callable[[Path], str]) -> None:  # fmt: skip
    require_redis()
    server = shutil.which("redis-server")
    assert server is not None
    port = free_port()
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    redis_proc = start_redis()
    try:
        url = start_proxy(write_config(tmp_path, upstream.url, f"redis://127.0.0.1:{port}/0", "ws-outage"))
        assert post(url, "before").headers["x-embedgate-cache"] == "miss"
        assert post(url, "before").headers["x-embedgate-cache"] == "hit"
        redis_proc.terminate()
        redis_proc.wait(10)
        for _ in range(3):  # Redis is gone: still served, as misses
            assert post(url, "during").headers["x-embedgate-cache"] == "miss"
        redis_proc = start_redis()
        time.sleep(1.1)  # the store rests for a second after a failure before it is tried again
        assert post(url, "after").headers["x-embedgate-cache"] == "miss"
        assert post(url, "after").headers["x-embedgate-cache"] == "hit"  # resumed, no restart
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/v1/embeddings", "/api/v1/embeddings"])
async def test_base64_answers_pass_the_upstreams_text_on_and_encode_only_cached_vectors(
    client: httpx.AsyncClient, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    import embedgate.gateway
    from embedgate.vectors import bytes_to_b64

    encoded: list[bytes] = []

    def counting_b64(vector: bytes) -> bytes:
        encoded.append(vector)
        return bytes_to_b64(vector)

    monkeypatch.setattr(embedgate.gateway, "bytes_to_b64", counting_b64)
    words = [f"{route} {w}" for w in ("a", "b", "c", "d")]

    async def ask(items: list[str]) -> httpx.Response:
        body = {"model": "local/embed-small", "input": items, "cache": CACHE, "encoding_format": "base64"}
        r = await client.post(route, json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        return r

    # Compiled (the build's default), the gateway calls the encoder directly and the spy sees nothing: the count is
    # checked on the sources (EMBEDGATE_PURE_PYTHON=1), the answers in both.
    spied = embedgate.NATIVE != "compiled"
    miss = await ask(words[:2])
    assert miss.headers["x-embedgate-cache"] == "miss"
    assert encoded == []  # the upstream's texts, as they came
    partial = await ask([words[1], words[2], words[0], words[3]])
    assert partial.headers["x-embedgate-cache"] == "partial"
    assert len(encoded) == (2 if spied else 0)  # the two cached vectors; the two fresh ones are the upstream's texts
    payload = partial.json()
    assert [d["index"] for d in payload["data"]] == [0, 1, 2, 3]
    assert all(d["object"] == "embedding" and isinstance(d["embedding"], str) for d in payload["data"])
    for vec, text in zip(floats(partial), [words[1], words[2], words[0], words[3]], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-small", text))
    if route == "/api/v1/embeddings":
        assert next(iter(payload)) == "id" and payload["usage"]["cost"] >= 0


@pytest.mark.anyio
async def test_what_a_request_paid_for_is_kept_when_an_item_it_waited_on_fails(upstream: FakeUpstream) -> None:
    # B fetches "y" itself and waits on A's "x", which fails: B answers A's 502, but its "y" was embedded and paid
    # for; it used to be thrown away, and the next request for "y" was embedded, and charged, once more.
    app = gateway(parse_config(cache_config(upstream.url), env={}))
    no_retry = {"count": 0}
    got: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(name: str, after: float, inputs: list[str]) -> None:
            await anyio.sleep(after)
            body = {"model": "local/embed-small", "input": inputs, "cache": CACHE, "retry": no_retry}
            got[name] = await c.post("/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})

        upstream.script.append(Fault("status", 500, delay=0.4))
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "a", 0.0, ["x"])
            tg.start_soon(post, "b", 0.1, ["x", "y"])
        assert got["a"].status_code == 502 and got["b"].status_code == 502
        assert sorted(str(call.body["input"]) for call in upstream.calls) == ["['x']", "['y']"]
        r = await embed(c, ["y"])
        assert r.status_code == 200 and r.headers["x-embedgate-cache"] == "hit"
        assert len(upstream.calls) == 2
        np.testing.assert_array_equal(floats(r)[0], expected_vector("embed-small", "y"))
    await app.shutdown()
