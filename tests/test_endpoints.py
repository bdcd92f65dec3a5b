"""The GET endpoints: /healthz, /readyz (stores reachable), /v1/models (filtered by the key's grants)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from embedgate.config import Config
from tests.conftest import KEY, OTHER_KEY, gateway
from tests.fake_upstream import free_port


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


@pytest.mark.anyio
async def test_readiness_fails_when_redis_is_unreachable(make_config: Callable[..., Config]) -> None:
    app = gateway(make_config(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        assert (await c.get("/healthz")).status_code == 200  # alive, but
        r = await c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["cache"] == {"backend": "redis", "ok": False}
        assert body["checks"]["budgets"] == {"backend": "redis", "ok": False}
    await app.shutdown()


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
