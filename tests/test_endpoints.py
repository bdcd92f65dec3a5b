"""The GET endpoints: /healthz, /readyz (stores reachable; not ready only when requests are refused), /v1/models
(filtered by the key's grants)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from embedgate.config import Config
from embedgate.gateway import READY_WAIT_S
from tests.conftest import KEY, OTHER_KEY, gateway
from tests.fake_upstream import FakeUpstream, free_port
from tests.redis_util import PASSWORD, ThrowawayRedis, require_programs


@pytest.mark.anyio
async def test_health_and_readiness_with_memory_stores(make_config: Callable[..., Config]) -> None:
    app = gateway(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        r = await c.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ready"
        assert body["checks"]["cache"] == {"backend": "memory", "ok": True}
        assert body["checks"]["budgets"]["ok"] is True
        assert {"local/multi-a", "backup/multi-b"} <= set(body["deployments"])
    await app.shutdown()


BUDGET = [{"scope": "api_key", "target": "team-a", "token_limit": 1000}]


@pytest.mark.anyio
async def test_readiness_fails_when_the_budget_store_is_unreachable(make_config: Callable[..., Config]) -> None:
    # budgets fail closed: every request they apply to is a 503, the replica is not ready
    app = gateway(make_config(redis_url=f"redis://127.0.0.1:{free_port()}/0", budgets=BUDGET))  # nothing there
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        assert (await c.get("/healthz")).status_code == 200  # alive, but
        r = await c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["cache"] == {"backend": "redis", "ok": False}
        assert body["checks"]["budgets"]["backend"] == "redis"
        assert body["checks"]["budgets"]["ok"] is False
        assert (
            "ConnectionRefusedError" in body["checks"]["budgets"]["error"]
            or "Errno" in body["checks"]["budgets"]["error"]
        )
    await app.shutdown()


@pytest.mark.anyio
async def test_readiness_says_why_the_budget_store_is_down_without_the_password(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    # A wrong password (or a db out of range) on the budgets' Redis: 503s, and /readyz said only "ok": false.
    require_programs("redis-server")
    server = ThrowawayRedis(tmp_path)
    server.start()
    try:
        url = server.url.replace(PASSWORD, "not-the-password-4921")
        app = gateway(make_config(redis_url=url, budgets=BUDGET, cache={"redis_url": server.url}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
            r = await c.get("/readyz")
            assert r.status_code == 503
            check = r.json()["checks"]["budgets"]
            assert check["ok"] is False and "WRONGPASS" in check["error"], check
            assert "not-the-password-4921" not in r.text and PASSWORD not in r.text
            assert r.json()["checks"]["cache"]["ok"] is True
        await app.shutdown()
    finally:
        server.stop()


@pytest.mark.parametrize("setting", ["no budget", "fail_open", "the cache's own Redis"])
@pytest.mark.anyio
async def test_a_store_down_that_refuses_no_request_leaves_the_gateway_ready(
    make_config: Callable[..., Config], upstream: FakeUpstream, setting: str
) -> None:
    # A cache down is a miss; a budget store down with fail_open, or with no budget, refuses nothing. Each was a
    # 503: one shared Redis down took every replica out of its load balancer, though each served every request.
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    overrides: dict[str, Any] = {
        "no budget": {"redis_url": closed},
        "fail_open": {"redis_url": closed, "budgets": BUDGET, "budget_options": {"fail_open": True}},
        "the cache's own Redis": {"cache": {"redis_url": closed}, "budgets": BUDGET},
    }[setting]
    app = gateway(make_config(**overrides))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "degraded"
        assert body["checks"]["cache"] == {"backend": "redis", "ok": False}
        assert body["checks"]["budgets"]["ok"] is (setting == "the cache's own Redis")
        served = await c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                              headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert served.status_code == 200, served.text
    await app.shutdown()


@pytest.mark.anyio
async def test_readiness_answers_within_a_probes_timeout_while_redis_does_not_answer(
    make_config: Callable[..., Config],
) -> None:
    # A Redis that takes connections but answers nothing (frozen, a network partition, or slow: a round trip of
    # 0.6 s, with which requests are still served): /readyz waited for each store's ping in turn, 1.25 s, past a
    # readiness probe's usual 1 s timeout, and every replica left its load balancer. A ping still out by 0.5 s is
    # reported, and the replica is degraded, not unavailable (with fail_open, or failing closed as here).
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frozen = f"redis://127.0.0.1:{port}/0"
    app = gateway(make_config(redis_url=frozen, budgets=BUDGET))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
            started = time.monotonic()
            r = await c.get("/readyz")
            took = time.monotonic() - started
        assert took < 0.9, took
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        checks = r.json()["checks"]
        assert checks["cache"]["ok"] is False  # (its own timeout is shorter: 0.25 s)
        assert checks["budgets"] == {"backend": "redis", "ok": False, "error": f"no answer within {READY_WAIT_S} s"}
    finally:
        await app.shutdown()
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_models_lists_what_the_key_may_use(make_config: Callable[..., Config]) -> None:
    app = gateway(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        assert (await c.get("/v1/models")).status_code == 401
        everything = (await c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})).json()
        assert everything["object"] == "list"
        ids = {m["id"] for m in everything["data"]}
        assert {"local/embed-small", "local/multi"} <= ids
        assert all(m["object"] == "model" for m in everything["data"])
        granted = (await c.get("/v1/models", headers={"authorization": f"Bearer {OTHER_KEY}"})).json()
        # team-b is granted backup/* only: no local model is listed for it
        assert not any(m["id"].startswith("local/") for m in granted["data"])
    await app.shutdown()


@pytest.mark.anyio
async def test_models_lists_a_provider_to_a_key_granted_some_of_its_models(
    make_config: Callable[..., Config],
) -> None:
    # backup has no model listed: it shows as backup/*, which a key granted "backup/embed-*" did not match (the
    # list was empty, though that key embeds with backup/embed-small).
    keys = [
        {"id": "narrow", "key": KEY, "workspace": "acme", "project": "search", "models": ["backup/embed-*"]},
        {"id": "sets", "key": OTHER_KEY, "workspace": "acme", "project": "search", "models": ["[!b]ocal/x", "?ack*"]},
    ]
    app = gateway(make_config(keys=keys))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        narrow = (await c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})).json()
        assert [m["id"] for m in narrow["data"]] == ["backup/*"]
        r = await c.post("/v1/embeddings", json={"model": "backup/embed-small", "input": "hi"},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code != 403
        sets = (await c.get("/v1/models", headers={"authorization": f"Bearer {OTHER_KEY}"})).json()
        assert [m["id"] for m in sets["data"]] == ["backup/*"]  # "[!b]ocal/x" grants local/x, not listed
    await app.shutdown()


@pytest.mark.anyio
async def test_openrouter_models_are_priced_as_a_request_routed_by_default_pays(
    make_config: Callable[..., Config],
) -> None:
    # A model priced only on its deployments was listed as free ("0"), though its requests were billed.
    first = {"provider": "local", "upstream_model": "a", "price_per_million_tokens": 0.5}
    models = {"local/priced": {"deployments": [first, {"provider": "backup", "upstream_model": "b"}]},
              "local/both": {"price_per_million_tokens": 0.13,
                             "deployments": [{"provider": "local", "upstream_model": "c"}]}}  # fmt: skip
    app = gateway(make_config(models=models))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.get("/api/v1/embeddings/models", headers={"authorization": f"Bearer {KEY}"})
        prices = {m["id"]: m["pricing"]["prompt"] for m in r.json()["data"]}
        assert (prices["local/priced"], prices["local/both"]) == ("0.0000005", "0.00000013")
        refused = await c.get("/api/v1/embeddings/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == 401  # OpenRouter's shape
    await app.shutdown()


@pytest.mark.anyio
async def test_standalone_startup_freezes_its_objects_out_of_the_gc_and_mounted_does_not(
    make_config: Callable[..., Config],
) -> None:
    """Standalone, the objects built at start-up leave the cyclic GC's full passes (a p99 measure, README
    Performance); mounted, the host app's GC is left alone."""
    import gc

    from embedgate import EmbeddingGateway

    async def host(scope: Any, receive: Any, send: Any) -> None:
        pass

    gc.unfreeze()
    mounted = EmbeddingGateway(host, config=make_config())
    await mounted.startup()
    assert gc.get_freeze_count() == 0
    await mounted.shutdown()
    app = gateway(make_config())
    try:
        await app.startup()
        assert gc.get_freeze_count() > 0
    finally:
        await app.shutdown()
        gc.unfreeze()


@pytest.mark.anyio
async def test_head_answers_a_get_endpoint_with_its_status_and_length_and_no_body(
    make_config: Callable[..., Config],
) -> None:
    """Load balancers probe with HEAD: the GET endpoints answer it (RFC 9110) instead of a 404."""
    app = gateway(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        got, head = await c.get("/healthz"), await c.head("/healthz")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == "application/json"
        refused = await c.head("/v1/models")  # no key: GET's 401, its body left out
        assert refused.status_code == 401 and refused.content == b""
        assert int(refused.headers["content-length"]) == len((await c.get("/v1/models")).content) > 0
    await app.shutdown()


def test_head_through_embedgate_serve_protocol(proxy: str) -> None:
    with httpx.Client(base_url=proxy) as c:
        head = c.head("/readyz")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0
        assert c.get("/healthz").json() == {"status": "ok"}  # the connection still serves what follows


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/embeddings", "POST"),
        ("PUT", "/v2/router/embeddings", "POST"),
        ("DELETE", "/api/v1/embeddings", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/v1/models", "GET, HEAD"),
        ("POST", "/api/v1/embeddings/models", "GET, HEAD"),
    ],
)
async def test_standalone_a_wrong_method_is_405_with_allow_in_the_route_shape(
    make_config: Callable[..., Config], method: str, path: str, allow: str
) -> None:
    app = gateway(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.request(method, path)
        assert r.status_code == 405
        assert r.headers["allow"] == allow
        error = r.json()["error"]
        message = f"{method} is not allowed on {path}; allowed: {allow}"
        if path.startswith("/api/v1/embeddings"):  # OpenRouter's shape: the status as code, the rest in metadata
            assert error == {"code": 405, "message": message,
                             "metadata": {"type": "invalid_request_error", "code": "method_not_allowed"}}  # fmt: skip
        else:  # OpenAI's, and orq's (the same four keys, code a string)
            assert error == {"message": message, "type": "invalid_request_error", "param": None,
                             "code": "method_not_allowed"}  # fmt: skip
        head = await c.head("/v1/embeddings")
        assert head.status_code == 405 and head.content == b"" and head.headers["allow"] == "POST"
        unknown = await c.get("/v1/nothing")  # not a path of the gateway: still 404, with its length
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        assert unknown.headers["content-length"] == str(len(unknown.content))
    await app.shutdown()


@pytest.mark.anyio
async def test_past_max_in_flight_a_request_is_shed_with_a_503(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # No cap: each request in flight holds its body, its upstream calls and its answer, as many as came.
    import anyio

    from tests.fake_upstream import Fault

    app = gateway(make_config(server={"max_in_flight": 1}))
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"model": "local/embed-small", "input": "hello"}
    scope = {"type": "http", "method": "POST", "path": "/api/v1/embeddings", "raw_path": b"/api/v1/embeddings",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}  # fmt: skip
    upstream.script.append(Fault("slow", delay=0.5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        async with anyio.create_task_group() as tg:
            first: list[httpx.Response] = []

            async def slow() -> None:
                first.append(await c.post("/v1/embeddings", json=body, headers=auth))

            tg.start_soon(slow)
            await anyio.sleep(0.2)  # the first is waiting on the upstream
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b'{"model": "not json'}  # shed before it is parsed

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            assert sent[0]["status"] == 503
            assert dict(sent[0]["headers"])[b"retry-after"] == b"1"
            error = httpx.Response(503, content=sent[1]["body"]).json()["error"]  # OpenRouter's shape
            assert (error["code"], error["metadata"]["code"]) == (503, "gateway_overloaded")

            # nor parsed for its access line or its trace (an 8 MB body took ~34 ms to read its name and model)
            async def receive_named() -> dict[str, Any]:
                return {"type": "http.request", "body": b'{"model": "local/embed-small", "input": "x", "name": "n"}'}

            with capture_logs() as logs:
                await app(scope, receive_named, send)
            (line,) = [e for e in logs if e["event"] == "request"]
            assert line["status"] == 503 and "model" not in line
        assert first[0].status_code == 200
        assert (await c.post("/v1/embeddings", json=body, headers=auth)).status_code == 200  # room again

        # A request still sending its body (slowly, with no key: a client could hold every place so) holds none.
        stalled = anyio.Event()

        async def never() -> dict[str, Any]:
            await stalled.wait()
            return {"type": "http.disconnect"}

        async def discard(message: dict[str, Any]) -> None:
            pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(app, {**scope, "headers": []}, never, discard)
            await anyio.sleep(0.05)
            assert (await c.post("/v1/embeddings", json=body, headers=auth)).status_code == 200
            stalled.set()
    await app.shutdown()


@pytest.mark.anyio
async def test_a_request_s_place_is_free_once_its_answer_is_sent_not_once_its_budget_settles(
    make_config: Callable[..., Config],
) -> None:
    # Held through the budget's settle (a Redis round trip after the answer): a client sending its requests one after
    # another, never two at once, was answered 503 gateway_overloaded.
    import anyio

    from tests.redis_util import redis_proxy, require_redis

    async def slowly(chunk: bytes) -> None:
        await anyio.sleep(0.1)  # a distant Redis: each answer comes 100 ms late

    budget = [{"scope": "api_key", "target": "team-a", "token_limit": 1_000_000}]
    async with redis_proxy(require_redis(), to_client=slowly) as url:
        app = gateway(make_config(server={"max_in_flight": 1}, redis_url=url, budgets=budget))
        body = {"model": "local/embed-small", "input": "hello"}
        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
                 "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
                 "headers": [(b"authorization", f"Bearer {KEY}".encode())]}  # fmt: skip
        statuses: list[int] = []
        answered = anyio.Event()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": orjson.dumps(body)}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif message["type"] == "http.response.body":
                answered.set()  # the client has its answer: it sends the next at once

        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)  # answered, then settles for ~100 ms
            await answered.wait()
            await app(scope, receive, send)
        await app.shutdown()
    assert statuses == [200, 200]
