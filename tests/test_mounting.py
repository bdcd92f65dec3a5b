"""The gateway mounted in a host app that has its own routes and lifespan: both work."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx
import orjson
import pytest
import structlog
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from embedgate import EmbeddingGateway
from embedgate.config import Config
from embedgate.logs import REQUEST_TASK
from tests.conftest import KEY, serve
from tests.fake_upstream import FakeUpstream


class RecordingGateway(EmbeddingGateway):
    events: ClassVar[list[str]] = []

    async def startup(self) -> None:
        await super().startup()
        self.events.append("gateway-startup")

    async def shutdown(self) -> None:
        self.events.append("gateway-shutdown")
        await super().shutdown()


def host_app(config: Config, events: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("host-startup")
        yield {"greeting": "hello from the host"}
        events.append("host-shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"message": "host route"}

    @app.post("/v1/other")
    async def other() -> dict[str, str]:
        return {"message": "host POST"}

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("echo:" + await socket.receive_text())
        await socket.close()

    app.add_middleware(RecordingGateway, config=config)
    return app


def test_mounted_gateway_and_host_app_both_work(make_config: Callable[..., Config], upstream: FakeUpstream) -> None:
    RecordingGateway.events = events = []
    app = host_app(make_config(), events)
    with serve(app) as url:
        assert events == ["host-startup", "gateway-startup"] or events == ["gateway-startup", "host-startup"]
        with httpx.Client(base_url=url) as c:
            assert c.get("/hello").json() == {"message": "host route"}
            assert c.post("/v1/other").json() == {"message": "host POST"}
            r = c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                       headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
            assert r.status_code == 200
            assert r.json()["model"] == "local/embed-small"
            assert c.get("/healthz").status_code == 200
            assert c.get("/nothing-here").status_code == 404  # the host's own 404
            # a GET on an embedding path is the host's business, not the gateway's
            assert c.get("/v1/embeddings").status_code in (404, 405)
    assert "gateway-shutdown" in events and "host-shutdown" in events
    assert len(upstream.calls) == 1


def test_websockets_pass_through(make_config: Callable[..., Config]) -> None:
    app = host_app(make_config(), [])
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("ping")
        assert ws.receive_text() == "echo:ping"


def test_path_prefix(make_config: Callable[..., Config], upstream: FakeUpstream) -> None:
    app = host_app(make_config(server={"path_prefix": "/ai"}), [])
    with serve(app) as url, httpx.Client(base_url=url) as c:
        r = c.post("/ai/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200
        r = c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code in (404, 405)  # not the gateway's path any more: the host answers
        models = c.get("/ai/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert {"local/embed-small", "local/multi"} <= {m["id"] for m in models.json()["data"]}


def test_the_fastapi_example_mounts(tmp_path: Any, upstream: FakeUpstream, monkeypatch: Any) -> None:
    import importlib.util
    from pathlib import Path

    import yaml

    from tests.conftest import config_dict

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(upstream.url)))
    monkeypatch.setenv("EMBEDGATE_CONFIG", str(cfg))
    path = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("fastapi_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with serve(module.app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/hello").json() == {"message": "hello from the host app"}
        r = c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                   headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_header_names_are_matched_whatever_their_case(make_config: Callable[..., Config]) -> None:
    # ASGI lets a server keep the client's header case ("should be lowercased, but it is not required").
    app = EmbeddingGateway(lambda scope, receive, send: None, config=make_config())  # type: ignore[arg-type,return-value]
    body = b'{"model": "local/embed-small", "input": "hello"}'
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"Authorization", f"Bearer {KEY}".encode()), (b"Content-Type", b"application/json"),
               (b"X-Request-Id", b"mixed-case-1"), (b"User-Agent", b"test")]  # fmt: skip
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": headers, "query_string": b""}
    try:
        await app(scope, receive, send)
    finally:
        await app.shutdown()
    start = sent[0]
    assert start["status"] == 200, sent[1]["body"]
    assert (b"x-request-id", b"mixed-case-1") in start["headers"]


def _embed_body() -> dict[str, Any]:
    return {"model": "local/embed-small", "input": "hi"}


@pytest.mark.anyio
async def test_a_gateway_under_a_mount_serves_below_its_root_path(make_config: Callable[..., Config],
                                                                 upstream: FakeUpstream) -> None:  # fmt: skip
    # Routes were looked up in scope["path"] whole: under Mount("/x") the host's own route got the embedding body
    # (and the client's key), and the gateway's GET routes were the host's 404s.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    async def host_route(request: Request) -> JSONResponse:
        return JSONResponse({"host": True})

    inner = Starlette(routes=[Route("/v1/embeddings", host_route, methods=["POST"]), Route("/hello", host_route)])
    gateway = EmbeddingGateway(inner, config=make_config())
    app = Starlette(routes=[Mount("/x", app=gateway)])  # a mount runs no lifespan: the gateway opens on first use
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://host") as c:
            r = await c.post("/x/v1/embeddings", json=_embed_body(), headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.json()["model"] == "local/embed-small"
            assert (await c.get("/x/healthz")).json() == {"status": "ok"}
            assert (await c.get("/x/hello")).json() == {"host": True}  # the rest still the host's
    finally:
        await gateway.shutdown()


@pytest.mark.anyio
async def test_a_root_path_is_taken_off_only_up_to_a_slash(make_config: Callable[..., Config],
                                                          upstream: FakeUpstream) -> None:  # fmt: skip
    # Under FastAPI(root_path="/v") (or --root-path /v) the root path was cut off any path that began with its
    # text: /v1/embeddings became "1/embeddings", and the request went to the host's 404. Starlette cuts only at a "/".
    from starlette.applications import Starlette

    gateway = EmbeddingGateway(Starlette(), config=make_config())  # a host that has no route at all
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway, root_path="/v"), base_url="http://h") as c:
            for path in ("/v1/embeddings", "/v/v1/embeddings"):  # the path as it came, or with the root path in it
                r = await c.post(path, json=_embed_body(), headers={"authorization": f"Bearer {KEY}"})
                assert r.status_code == 200 and r.json()["model"] == "local/embed-small", (path, r.text)
            assert (await c.get("/v/healthz")).json() == {"status": "ok"}
    finally:
        await gateway.shutdown()


def test_a_host_that_configures_structlog_in_its_lifespan_keeps_logging(make_config: Callable[..., Config],
                                                                        upstream: FakeUpstream) -> None:  # fmt: skip
    # The host's lifespan runs inside the gateway's, so after the gateway configured structlog: its partial
    # configure() (a console renderer, no logger factory) kept the gateway's bytes logger, and every host line
    # raised TypeError (a 500); its debug lines were filtered out at INFO.
    import structlog
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen: list[str] = []

    def remember(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        seen.append(f"{method}:{event['event']}")
        return event

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        structlog.configure(processors=[remember, structlog.dev.ConsoleRenderer(colors=False)])
        yield

    async def logs(request: Request) -> JSONResponse:
        structlog.get_logger("host").debug("host debug line")
        structlog.get_logger("host").info("host info line")
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/logs", logs)], lifespan=lifespan)
    app.add_middleware(EmbeddingGateway, config=make_config())
    saved = structlog.get_config()
    # a host process's own structlog, untouched by the tests before (a standalone gateway's start, in
    # test_sdk_clients, left its level filter as the wrapper class, which the host's partial configure keeps)
    structlog.reset_defaults()
    try:
        with serve(app) as url, httpx.Client(base_url=url) as c:
            assert c.get("/logs").status_code == 200
            r = c.post("/v1/embeddings", json=_embed_body(), headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
    assert "debug:host debug line" in seen and "info:host info line" in seen


@pytest.mark.anyio
async def test_a_failed_gateway_startup_is_told_to_the_server(make_config: Callable[..., Config]) -> None:
    # Raised from the host's receive alone, uvicorn's default --lifespan auto took it for "lifespan unsupported"
    # and served on, neither the gateway nor the host started.
    class Broken(EmbeddingGateway):
        async def startup(self) -> None:
            raise RuntimeError("no proxy here")

    host_started: list[bool] = []

    async def host(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        host_started.append(message["type"] == "lifespan.startup")

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError):
        await Broken(host, config=make_config())({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "RuntimeError" in sent[0]["message"] and host_started == []


@pytest.mark.anyio
async def test_the_gateway_opens_before_the_host_s_startup_and_closes_after_its_shutdown(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # A host's startup and shutdown code may embed through the gateway (a warm-up, a last flush); the gateway used
    # to close when the shutdown message came, before the host's own shutdown ran; and to stay open, its pool,
    # stores and export helper with it, when the host's startup failed.
    seen: list[int] = []

    async def embed(app: Any) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
            r = await c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                             headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
            seen.append(r.status_code)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await embed(gw)
        yield
        await embed(gw)

    host = FastAPI(lifespan=lifespan)
    gw = RecordingGateway(host, config=make_config())
    RecordingGateway.events = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await gw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen == [200, 200] and len(upstream.calls) == 2
    assert RecordingGateway.events == ["gateway-startup", "gateway-shutdown"] and not gw._open

    @asynccontextmanager
    async def failing(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("the host's database is down")
        yield

    gw = RecordingGateway(FastAPI(lifespan=failing), config=make_config())
    RecordingGateway.events, sent = [], []
    messages = iter([{"type": "lifespan.startup"}])
    with pytest.raises(RuntimeError):
        await gw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.failed"]
    assert RecordingGateway.events == ["gateway-startup", "gateway-shutdown"] and not gw._open


@pytest.mark.anyio
async def test_a_host_whose_shutdown_raises_still_has_the_gateway_closed(make_config: Callable[..., Config]) -> None:
    # A raw ASGI host that raises on its shutdown, without a lifespan.shutdown.failed, left the gateway open: its
    # pool, stores and export helper, and its last access lines unflushed.
    async def host(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("the host's shutdown failed")

    gw = RecordingGateway(host, config=make_config())
    RecordingGateway.events = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    with pytest.raises(RuntimeError, match="shutdown failed"):
        await gw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert RecordingGateway.events == ["gateway-startup", "gateway-shutdown"] and not gw._open


def test_a_lifespan_coroutine_closed_unfinished_closes_cleanly(make_config: Callable[..., Config]) -> None:
    # Its GeneratorExit was caught with the rest, and the gateway's close awaited: "no running event loop".
    async def host(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await asyncio.sleep(3600)  # the host's shutdown code, still running

    gw = RecordingGateway(host, config=make_config())
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    coro = gw({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(coro)
        loop.run_until_complete(asyncio.sleep(0.3))
        coro.close()  # as a collected task's coroutine is closed
        assert not task.done() or task.cancelled() or task.exception() is None
    finally:
        loop.run_until_complete(gw.shutdown())
        loop.close()


def test_mounted_with_admin_off_the_admin_paths_are_the_hosts(make_config: Callable[..., Config]) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def own(request: Request) -> JSONResponse:
        return JSONResponse({"host": "admin"})

    app = Starlette(routes=[Route("/admin/usage", own)])
    app.add_middleware(EmbeddingGateway, config=make_config())
    with TestClient(app) as client:
        assert client.get("/admin/usage").json() == {"host": "admin"}


@pytest.mark.anyio
async def test_a_host_s_own_body_limit_is_a_413_in_the_route_s_shape(make_config: Callable[..., Config]) -> None:
    # FastAPI's max_body_size (Starlette's body limit) raises from the host's receive(): the gateway answered a 500
    # "internal error" and logged a traceback.
    from starlette.exceptions import HTTPException

    gateway = EmbeddingGateway(FastAPI(), config=make_config())

    async def limited(scope: Any, receive: Any, send: Any) -> None:
        async def refusing() -> Any:
            raise HTTPException(status_code=413)

        await gateway(scope, refusing, send)

    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(limited), base_url="http://host") as client:
            r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x"},
                                  headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    await gateway.shutdown()
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert not [line for line in logs if line["event"] == "unhandled error"]


@pytest.mark.anyio
async def test_a_host_s_log_bindings_come_back_after_a_request_served_in_a_task_of_its_own(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # Under embedgate's HTTP protocol (a task per request, said by the scope), the mounted gateway bound its ids
    # for the rest of the task: the host's own request_id was replaced in its later lines.
    gateway = EmbeddingGateway(FastAPI(), config=make_config())
    body = orjson.dumps({"model": "local/embed-small", "input": "x"})
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")],
             "extensions": {REQUEST_TASK: {}}}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    structlog.contextvars.bind_contextvars(request_id="host-rid", tenant="t1")
    try:
        await gateway(scope, receive, send)
        assert structlog.contextvars.get_contextvars() == {"request_id": "host-rid", "tenant": "t1"}
    finally:
        structlog.contextvars.clear_contextvars()
        await gateway.shutdown()
    assert sent[0]["status"] == 200


# The connections pooled under a loop that closed with them open are dropped under the next one; their
# transports, which that loop can no longer close, close their sockets when collected, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_gateway_used_under_one_event_loop_after_another_serves_every_request(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # One app, one event loop per test (pytest's and anyio's default; a TestClient used without `with` runs each
    # request in a loop of its own), no lifespan: the upstream connection pooled under the first loop was reused
    # under the next. The request went out on it, then waiting for the answer failed: a 500, the upstream's call
    # made and billed, every other request.
    gateway = EmbeddingGateway(FastAPI(), config=make_config())
    body = {"model": "local/embed-small", "input": "hi"}
    headers = {"authorization": f"Bearer {KEY}"}
    client = TestClient(gateway)  # without `with`: a new event loop for every request
    statuses = [client.post("/v1/embeddings", json={**body, "input": f"test client {i}"}, headers=headers).status_code
                for i in range(3)]  # fmt: skip
    assert statuses == [200, 200, 200]

    async def one(i: int, last: bool) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway), base_url="http://host") as c:
            r = await c.post("/v1/embeddings", json={**body, "input": f"loop {i}"}, headers=headers)
        if last:
            await gateway.shutdown()  # under the loop its last connection is open in
        return r.status_code

    assert [asyncio.run(one(i, i == 2)) for i in range(3)] == [200, 200, 200]
    assert len(upstream.calls) == 6
    gc.collect()  # the transports of closed loops, here (where their warning is ignored), not in a later test


MOUNT_SCRIPT = """
import gc, sys
import uvicorn
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from embedgate import create_app
from embedgate.config import Config

gateway = create_app(Config())  # no keys: every embedding request is a 401, with its access line and its spans

async def state(request):
    return JSONResponse({"frozen": gc.get_freeze_count(), "provider": type(trace.get_tracer_provider()).__name__})

lifespan = gateway.lifespan if sys.argv[1] == "lifespan" else None
app = Starlette(routes=[Route("/state", state), Mount("/gw", app=gateway)], lifespan=lifespan)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@pytest.mark.parametrize("lifespan", ["lifespan", "none"])
def test_create_app_under_a_mount_leaves_the_host_process_alone_and_closes_with_the_host_lifespan(
    tmp_path: Any, lifespan: str
) -> None:
    # Mount("/gw", app=create_app(...)) opened the gateway on its first request as the process's own: it froze the
    # host's objects out of the GC, changed its allocator and installed its tracer provider as the global one. And a
    # mount runs no lifespan, so the gateway was never closed: uvicorn ends by raising the signal it caught again,
    # no atexit runs, and the last access lines and spans were lost. gateway.lifespan closes it with the host's.
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.fake_upstream import free_port

    script = tmp_path / "host.py"
    script.write_text(MOUNT_SCRIPT)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {"OTEL_TRACES_EXPORTER": "console"}
    proc = subprocess.Popen([sys.executable, str(script), lifespan, str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    before = c.get("/state").json()
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, "the host did not start"
                    time.sleep(0.05)
            r = c.post("/gw/v1/embeddings", json={"model": "local/x", "input": "hi", "name": "last-req"},
                       headers={"authorization": "Bearer sk-unknown-0123456789"})  # fmt: skip
            assert r.status_code == 401, r.text
            after = c.get("/state").json()
        assert after == {"frozen": before["frozen"], "provider": "ProxyTracerProvider"}
        proc.send_signal(signal.SIGTERM)  # at once: within the access line's flush delay and the spans' batch
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode(errors="replace")
    if lifespan == "lifespan":  # closed with the host: the line written and the spans exported before the exit
        assert text.count('"logger":"embedgate.access"') == 1, text[-3000:]
        assert '"name": "last-req"' in text, text[-3000:]
    assert "Traceback" not in text


@pytest.mark.anyio
async def test_a_gateway_opened_on_first_use_keeps_the_logging_a_standalone_one_configured(
    make_config: Callable[..., Config],
) -> None:
    # The process's standalone gateway configured JSON lines at INFO; a second one, opened by its first request (as
    # under a Mount), configured them again at NOTSET: the whole process's debug lines began to pass.
    import logging

    from embedgate import create_app
    from embedgate.logs import configure_logging

    info = structlog.make_filtering_bound_logger(logging.INFO)
    configure_logging(level=logging.INFO, replace_host_config=True)  # as the server's app's startup leaves it
    lazy = create_app(make_config())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(lazy), base_url="http://h") as c:
            assert (await c.get("/healthz")).status_code == 200  # opened by it
        assert structlog.get_config()["wrapper_class"] is info
    finally:
        await lazy.shutdown()
