"""Upstream calls go through the proxy the environment names (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from embedgate.config import Config
from embedgate.providers import Http1Transport, ProxyRoutes, upstream_transport
from embedgate.providers.proxies import bypassed
from tests.conftest import KEY, gateway

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A plain HTTP forward proxy on 127.0.0.1: takes absolute-form requests, relays each to its origin, and
    records their request lines."""
    seen: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line, _, rest = head.partition(b"\r\n")
                seen.append(line)
                method, target, version = line.split(b" ")
                url = httpx.URL(target.decode())
                length = next((int(h.split(b":")[1]) for h in rest.split(b"\r\n")
                               if h.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
                up_writer.write(b" ".join((method, url.raw_path, version)) + b"\r\n" + rest + body)
                answer_head = await up_reader.readuntil(b"\r\n\r\n")
                size = next(int(h.split(b":")[1]) for h in answer_head.split(b"\r\n")
                            if h.lower().startswith(b"content-length:"))  # fmt: skip
                writer.write(answer_head + await up_reader.readexactly(size))
                up_writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def embed(config: Config) -> httpx.Response:
    """One embedding request through a standalone gateway started (and stopped) for it."""
    app = gateway(config)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            return await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hello"},
                                     headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    finally:
        await app.shutdown()


@pytest.mark.anyio
async def test_upstream_calls_go_through_the_proxy_the_environment_names(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with forward_proxy() as (proxy_url, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        r = await embed(make_config())
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    assert len(seen) == 1 and seen[0].startswith(b"POST http://127.0.0.1:") and b"/v1/embeddings" in seen[0]


@pytest.mark.parametrize("userinfo", ["egress:pr0xy-S3CRET-pw", "pr0xy-S3CRET-token", "pr0xy-S3CRET-token:"])
@pytest.mark.anyio
async def test_a_proxy_error_page_quoting_its_credentials_does_not_reach_the_client(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, userinfo: str
) -> None:
    # A proxy's (or an appliance's) error page quoting the request's head passed its Proxy-Authorization on, the
    # proxy's user and password in base64, to any client of the gateway; a token given as the user alone, too.
    secret = userinfo.partition(":")[2] or userinfo.rstrip(":")  # the password, else the user (a token)

    async def page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b"proxy refused: " + head + b" (credential: %s)" % secret.encode()
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(page, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://{userinfo}@127.0.0.1:{port}")  # (a token alone: as the user)
    try:
        r = await embed(make_config(routing={"default_retry": {"count": 0}}))
    finally:
        server.close()
    basic = base64.b64encode((userinfo if ":" in userinfo else userinfo + ":").encode()).decode()
    assert r.status_code == 502 and "proxy refused" in r.text, r.text
    assert "Proxy-Authorization: Basic [redacted]" in r.text, r.text
    assert basic not in r.text and "S3CRET" not in r.text


@pytest.mark.anyio
async def test_no_proxy_hosts_are_called_directly(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with forward_proxy() as (proxy_url, seen):
        monkeypatch.setenv("all_proxy", proxy_url)
        monkeypatch.setenv("NO_PROXY", "localhost, 127.0.0.1")
        r = await embed(make_config())
    assert r.status_code == 200, r.text
    assert seen == []


def test_without_proxy_variables_the_gateway_calls_upstreams_on_its_own_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert type(upstream_transport()) is Http1Transport
    monkeypatch.setenv("NO_PROXY", "*")  # a bypass list alone names no proxy
    assert type(upstream_transport()) is Http1Transport
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert type(upstream_transport()).__name__ == "ProxyRoutes"  # whose NO_PROXY=* sends every call direct
    assert isinstance(upstream_transport().transport_for(httpx.URL("https://api.example/v1")), Http1Transport)
    monkeypatch.delenv("NO_PROXY")
    routes = upstream_transport()
    assert isinstance(routes, ProxyRoutes)
    direct = routes.transport_for(httpx.URL("http://api.example/v1"))  # only https is proxied
    assert isinstance(direct, Http1Transport)
    assert routes.transport_for(httpx.URL("https://api.example/v1")) is not direct


def test_a_proxy_httpx_cannot_use_stops_the_start_without_showing_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "ftp://user:s3cret-pass@proxy.internal:2121")
    with pytest.raises(ValueError, match=r"https_proxy ftp://proxy.internal:2121: not an http, https or socks5") as e:
        upstream_transport()
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("proxy", ["http://user:s3cret-pass@[bad", "http://user:s3cret-pass@", "http://bad host:3128",
                                   "http://proxy.internal:99999", "http://proxy.internal:0"])  # fmt: skip
def test_a_proxy_url_without_a_usable_host_stops_the_start(monkeypatch: pytest.MonkeyPatch, proxy: str) -> None:
    # httpx took these, and every upstream call through them was a 502 (ConnectError) while the server ran on.
    monkeypatch.setenv("HTTP_PROXY", proxy)
    with pytest.raises(ValueError, match=r"http_proxy .*: not a URL with a valid host and port") as e:
        upstream_transport()
    assert "s3cret" not in str(e.value)
    for usable in ("http://[::1]:3128", "http://proxy.internal:3128 ", "http://user:p w@proxy.internal:3128",
                   "http://user:pa[ss@proxy.internal:3128"):  # fmt: skip
        monkeypatch.setenv("HTTP_PROXY", usable)  # an IPv6 proxy, blanks httpx strips or encodes: usable
        upstream_transport()


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("api.openai.com", 443, "", False),
        ("api.openai.com", 443, "*", True),
        ("api.openai.com", 443, "openai.com", True),
        ("api.openai.com", 443, ".openai.com", True),
        ("API.OpenAI.com", 443, "openai.COM", True),
        ("notopenai.com", 443, "openai.com", False),
        ("api.openai.com", 443, "api.openai.com:443", True),
        ("api.openai.com", 443, "api.openai.com:8443", False),
        ("10.0.0.5", 80, "localhost, 10.0.0.5", True),
    ],
)
def test_no_proxy_matching(host: str, port: int, no_proxy: str, direct: bool) -> None:
    assert bypassed(host, port, no_proxy) is direct


@pytest.mark.anyio
async def test_mounted_without_a_lifespan_a_gateway_that_cannot_start_answers_503_in_the_routes_shape(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedgate import EmbeddingGateway

    async def host(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the gateway's routes never reach the host app")

    monkeypatch.setenv("HTTPS_PROXY", "ftp://user:s3cret-pass@proxy.internal:2121")
    app = EmbeddingGateway(host, config=make_config())  # httpx's ASGITransport runs no lifespan
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
        auth = {"authorization": f"Bearer {KEY}"}
        body = {"model": "local/embed-small", "input": "hello"}
        openai = await client.post("/v1/embeddings", json=body, headers={**auth, "x-request-id": "req-not-started"})
        orq = await client.post("/v2/router/embeddings", json=body, headers=auth)
        models = await client.get("/v1/models", headers=auth)
    assert openai.status_code == orq.status_code == models.status_code == 503
    # answered as any request is: its ids in the headers, and counted (it had neither, nor an access line)
    assert openai.headers["x-request-id"] == "req-not-started" and len(openai.headers["x-embedgate-trace-id"]) == 32
    scraped = app.metrics.render()[0].decode()
    assert 'embedgate_requests_total{cache="bypass",model="",route="openai",status="503"} 1.0' in scraped
    assert openai.json()["error"]["code"] == "gateway_not_started"
    assert orq.json()["error"]["code"] == "gateway_not_started" and orq.json()["error"]["type"] == "service_unavailable"
    assert models.json()["error"]["code"] == "gateway_not_started"
    assert "s3cret" not in openai.text + orq.text + models.text
