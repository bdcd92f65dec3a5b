"""Http1Transport, the pooled HTTP/1.1 transport upstream calls go through, against real local servers.

Each test runs a small asyncio server on 127.0.0.1 that answers with exactly the bytes a scenario needs (keep-alive,
chunks, gzip, a body until close, a connection cut mid-answer, garbage), and counts connections.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from embedgate.config import ProviderConfig
from embedgate.errors import UpstreamError
from embedgate.providers import AiohttpTransport, Embeddings, Http1Transport, OpenAIAdapter, sender_for
from embedgate.providers.http1 import MAX_DECODED, MAX_HEAD, RESEND_WITHIN_S, decoded

pytestmark = pytest.mark.anyio

# An answer: the bytes to write, then whether to close the connection; None closes without answering.
Answer = tuple[bytes, bool] | None


@dataclass
class Server:
    """Records every request's head and body; answers with ``answer(request_number)``."""

    answer: Callable[[int], Answer]
    delay_s: float = 0.0
    port: int = 0
    connections: int = 0
    open_now: int = 0
    peak_open: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                else:  # chunked (what the transport sends for a stream of unknown length)
                    body = b""
                    while size := int((await reader.readline()).strip(), 16):
                        body += await reader.readexactly(size)
                        await reader.readline()
                    await reader.readline()
                self.requests.append((head, body))
                number = len(self.requests)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                answer = self.answer(number)
                if answer is None:
                    return
                data, close = answer
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            self.open_now -= 1
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/embeddings?x=1"


@asynccontextmanager
async def serve(answer: Callable[[int], Answer], delay_s: float = 0.0) -> AsyncIterator[Server]:
    server = Server(answer, delay_s)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        srv.close()


def ok(body: bytes = b'{"ok":true}', *extra: bytes, close: bool = False) -> Answer:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), b"".join(h + b"\r\n" for h in extra))
    return head + body, close


async def post(transport: Http1Transport, url: str, body: bytes = b'{"input":"hi"}') -> httpx.Response:
    return await transport.handle_async_request(httpx.Request("POST", url, content=body))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_keeps_the_connection_alive_and_sends_the_request_as_given() -> None:
    async with serve(lambda n: ok(b'{"n":%d}' % n)) as server:
        transport = Http1Transport()
        first = await post(transport, server.url, b'{"input":"a"}')
        second = await post(transport, server.url, b'{"input":"b"}')
        await transport.aclose()
    assert (first.status_code, first.json(), second.json()) == (200, {"n": 1}, {"n": 2})
    assert first.is_closed and await first.aread() == first.content == b'{"n":1}'  # read whole, as httpx would
    assert first.headers["content-length"] == "7" and first.http_version == "HTTP/1.1"
    assert server.connections == 1
    head, body = server.requests[0]
    assert head.startswith(b"POST /v1/embeddings?x=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in head
    assert body == b'{"input":"a"}'


async def test_decodes_chunked_and_gzip_answers() -> None:
    packed = gzip.compress(b'{"data":[1,2,3]}')
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(packed[i : i + 5]), packed[i : i + 5]) for i in range(0, len(packed), 5))
    chunked += b"0\r\n\r\n"
    async with serve(lambda n: (chunked, False)) as server:
        transport = Http1Transport()
        response = await post(transport, server.url)
        again = await post(transport, server.url)
        await transport.aclose()
    assert response.json() == again.json() == {"data": [1, 2, 3]}
    assert server.connections == 1


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async with serve(lambda n: (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 70_000, True)) as server:
        transport = Http1Transport()
        response = await post(transport, server.url)
        second = await post(transport, server.url)  # on a new connection
        await transport.aclose()
    assert response.content == second.content == b"x" * 70_000
    assert server.connections == 2


async def test_connection_close_is_honoured() -> None:
    async with serve(lambda n: ok(b"{}", b"Connection: close")) as server:
        transport = Http1Transport()
        for _ in range(3):
            assert (await post(transport, server.url)).status_code == 200
        await transport.aclose()
    assert server.connections == 3


async def test_an_answer_cut_short_is_a_read_error() -> None:
    async with serve(lambda n: (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"da', True)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.ReadError, match="middle of its answer") as raised:
            await post(transport, server.url)
        assert raised.value.request.url == server.url  # as httpx's own transports set it
        await transport.aclose()


async def test_a_connection_closed_without_an_answer_is_a_read_error_and_the_pool_recovers() -> None:
    async with serve(lambda n: None if n == 1 else ok()) as server:
        transport = Http1Transport(max_connections=1)
        with pytest.raises(httpx.ReadError, match="without answering"):
            await post(transport, server.url)
        assert (await post(transport, server.url)).status_code == 200  # the broken connection freed its slot
        await transport.aclose()


async def test_garbage_is_a_protocol_error() -> None:
    async with serve(lambda n: (b"SPDY/9 banana\r\n\r\n", False)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport, server.url)
        await transport.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with serve(lambda n: ok()) as server:
        url = server.url
    transport = Http1Transport()
    with pytest.raises(httpx.ConnectError):
        await post(transport, url)
    await transport.aclose()


async def test_an_interim_answer_is_skipped() -> None:
    async with serve(lambda n: (b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"final":1}')[0], False)) as server:  # type: ignore[index]
        transport = Http1Transport()
        response = await post(transport, server.url)
        await transport.aclose()
    assert (response.status_code, response.json()) == (200, {"final": 1})


async def test_an_interim_answer_then_a_dropped_connection_is_a_read_error() -> None:
    # The interim answer's lack of a length was taken for a body read until the close: the drop became an empty
    # answer of status 0 (a 502 "answered 0", not retried as a dropped connection is).
    async with serve(lambda n: (b"HTTP/1.1 100 Continue\r\n\r\n", True)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.ReadError, match="without answering"):
            await post(transport, server.url)
        await transport.aclose()


async def test_at_most_max_connections_are_open_and_waiting_callers_are_served() -> None:
    async with serve(lambda n: ok(b'{"n":%d}' % n), delay_s=0.02) as server:
        transport = Http1Transport(max_connections=2)
        answers = await asyncio.gather(*(post(transport, server.url) for _ in range(7)))
        await transport.aclose()
    assert sorted(a.json()["n"] for a in answers) == list(range(1, 8))
    assert server.peak_open == 2


async def test_a_full_pool_to_one_upstream_does_not_hold_up_calls_to_another() -> None:
    # The connection limit was one count over all origins: a slow provider's calls in flight took every slot, and
    # a healthy provider's calls waited behind them, timed out and opened its breaker.
    async with serve(lambda n: ok(), delay_s=1.0) as slow, serve(lambda n: ok(b'{"fast":true}')) as fast:
        transport = Http1Transport(max_connections=2)
        stuck = [asyncio.ensure_future(post(transport, slow.url)) for _ in range(3)]
        await asyncio.sleep(0.1)
        async with asyncio.timeout(0.5):
            answer = await post(transport, fast.url)
        assert answer.json() == {"fast": True}
        assert [r.status_code for r in await asyncio.gather(*stuck)] == [200] * 3
        await transport.aclose()
    assert slow.peak_open == 2


async def test_a_cancelled_call_closes_its_connection_and_frees_its_slot() -> None:
    async with serve(lambda n: ok(b'{"n":%d}' % n), delay_s=0.2) as server:
        transport = Http1Transport(max_connections=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await post(transport, server.url)
        # The late answer to the cancelled call must not be taken for this call's answer.
        response = await post(transport, server.url)
        await transport.aclose()
    assert response.json() == {"n": 2}
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    # The server closes each connection after answering, without saying so (as servers do when their keep-alive
    # timeout ends): the pooled connection is dead by the next call, which must get a new one, not an error.
    async with serve(lambda n: ok(b'{"n":%d}' % n, close=True)) as server:
        transport = Http1Transport()
        await post(transport, server.url)
        await asyncio.sleep(0.05)
        response = await post(transport, server.url)
        await transport.aclose()
    assert response.json() == {"n": 2}
    assert server.connections == 2


async def test_idle_connections_expire_after_keepalive() -> None:
    async with serve(lambda n: ok()) as server:
        transport = Http1Transport(keepalive_s=0.05)
        await post(transport, server.url)
        await asyncio.sleep(0.1)
        await post(transport, server.url)
        await transport.aclose()
    assert server.connections == 2


async def test_idle_connections_left_by_a_burst_close_while_traffic_goes_on() -> None:
    # Calls take the most recently used connection: the burst's others, idle under it, were never looked at
    # again, and the pool stayed at its peak for as long as any traffic came (or none did).
    async with serve(lambda n: ok(), delay_s=0.02) as server:
        transport = Http1Transport(keepalive_s=0.3)
        await asyncio.gather(*(post(transport, server.url) for _ in range(20)))
        assert server.open_now == 20
        for _ in range(8):  # a trickle, one call at a time: it keeps one connection busy
            await post(transport, server.url)
            await asyncio.sleep(0.06)
        open_under_trickle = server.open_now
        await asyncio.sleep(0.5)  # then no traffic at all
        open_when_quiet = server.open_now
        await transport.aclose()
    assert open_under_trickle == 1
    assert open_when_quiet == 0


async def test_a_streamed_body_of_unknown_length_is_sent_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b'{"input":'
        yield b'"streamed"}'

    async with serve(lambda n: ok()) as server:
        transport = Http1Transport()
        response = await transport.handle_async_request(httpx.Request("POST", server.url, content=parts()))
        await transport.aclose()
    assert response.status_code == 200
    assert server.requests[0][1] == b'{"input":"streamed"}'


async def test_https_verifies_the_server_certificate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = Server(lambda n: ok(b'{"tls":true}'))
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1/embeddings"
    try:
        trusting = Http1Transport(ssl_context=client_ctx)
        answers = [await post(trusting, url) for _ in range(2)]
        await trusting.aclose()
        default = Http1Transport()  # the system's CAs: this test CA is not one of them
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(default, url)
        await default.aclose()
        # A company CA, the standard way: SSL_CERT_FILE (as httpx itself honours it).
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        from_env = Http1Transport()
        answers.append(await post(from_env, url))
        await from_env.aclose()
    finally:
        srv.close()
    assert [a.json() for a in answers] == [{"tls": True}] * 3
    assert server.connections == 2  # one kept-alive connection per transport (a failed handshake never counts)


async def test_a_reused_connection_closed_as_the_request_goes_out_is_resent_once_on_a_new_one() -> None:
    # The server reads the second request and closes without answering, as when its keep-alive timeout ends just
    # as the request arrives: the call must not fail for it, and the request goes out once more, intact.
    async with serve(lambda n: None if n == 2 else ok(b'{"n":%d}' % n)) as server:
        transport = Http1Transport()
        assert (await post(transport, server.url)).json() == {"n": 1}
        response = await post(transport, server.url, b'{"input":"again"}')
        await transport.aclose()
    assert response.json() == {"n": 3}
    assert server.connections == 2
    assert [body for _, body in server.requests[1:]] == [b'{"input":"again"}'] * 2


async def test_a_request_is_resent_at_most_once() -> None:
    async with serve(lambda n: ok() if n == 1 else None) as server:
        transport = Http1Transport()
        await post(transport, server.url)
        with pytest.raises(httpx.ReadError, match="without answering") as raised:
            await post(transport, server.url)
        await transport.aclose()
    assert raised.value.request.url == server.url
    assert (len(server.requests), server.connections) == (3, 2)


async def test_a_request_the_server_held_before_closing_is_not_resent() -> None:
    # The server read the request, held it a while (a worker that crashed on it, a proxy's timeout), then closed
    # without answering: it may have run the request, and charged for it. It was sent again all the same, so a
    # POST with retry.count 0 went out twice, and the upstream billed two where the gateway counted one.
    async with serve(lambda n: ok() if n == 1 else None) as server:
        transport = Http1Transport()
        await post(transport, server.url)
        server.delay_s = RESEND_WITHIN_S + 0.15
        with pytest.raises(httpx.ReadError, match="without answering"):
            await post(transport, server.url)
        await transport.aclose()
    assert (len(server.requests), server.connections) == (2, 1)


async def test_a_reused_connection_cut_mid_answer_is_not_resent() -> None:
    # Part of an answer came: the server did take the request, so sending it again could run it twice.
    cut = (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"da', True)
    async with serve(lambda n: ok() if n == 1 else cut) as server:
        transport = Http1Transport()
        await post(transport, server.url)
        with pytest.raises(httpx.ReadError, match="middle of its answer"):
            await post(transport, server.url)
        await transport.aclose()
    assert len(server.requests) == 2


# --- the adapter on this transport: the request as bytes, no httpx objects -------------------------------------

_VECTOR = b"AACAPwAAAEA="  # float32 [1.0, 2.0], base64
_ANSWER = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"%s"}],"model":"m",' % _VECTOR
_ANSWER += b'"usage":{"prompt_tokens":1,"total_tokens":1}}'
_TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def _adapters(server: Server, transport: Http1Transport) -> dict[str, OpenAIAdapter]:
    """The same provider behind the transport itself (as the gateway wires it) and behind a plain function that
    hands it httpx objects (as any other transport or client gets them)."""

    async def through_httpx(request: httpx.Request) -> httpx.Response:
        return await transport.handle_async_request(request)

    provider = ProviderConfig(name="up", type="openai", base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-up")
    return {"direct": OpenAIAdapter(provider, sender_for(transport)), "httpx": OpenAIAdapter(provider, through_httpx)}


async def _embed(adapter: OpenAIAdapter) -> Embeddings:
    return await adapter.embed(upstream_model="m", input=["hi"], n_items=1, dimensions=2, user="u", input_type=None,
                               timeout_s=5, headers=_TRACE)  # fmt: skip


async def test_the_adapter_writes_the_same_request_without_httpx_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(lambda n: ok(_ANSWER)) as server:
        transport = Http1Transport()
        adapters = _adapters(server, transport)
        through_httpx = await _embed(adapters["httpx"])
        for name in ("Request", "Response"):  # the direct path must build neither

            def refuse(*args: object, _name: str = name, **kwargs: object) -> None:
                raise AssertionError(f"httpx.{_name} built on the direct path")

            monkeypatch.setattr(httpx, name, refuse)
        direct = await _embed(adapters["direct"])
        monkeypatch.undo()
        await transport.aclose()
    assert direct == through_httpx and direct.vectors == [struct.pack("<2f", 1.0, 2.0)]
    (head_httpx, body_httpx), (head_direct, body_direct) = server.requests
    assert head_direct == head_httpx  # request line, headers, their order and case: byte for byte
    sent = b'{"model":"m","input":["hi"],"encoding_format":"base64","dimensions":2,"user":"u"}'
    assert body_direct == body_httpx == sent
    assert head_direct.startswith(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert b"\r\nAuthorization: Bearer sk-up\r\n" in head_direct
    assert b"\r\ntraceparent: %s\r\n" % _TRACE["traceparent"].encode() in head_direct
    assert b"\r\nContent-Length: %d\r\n" % len(body_direct) in head_direct
    assert server.connections == 1  # both paths share the transport's pool


@pytest.mark.parametrize("path", ["direct", "httpx"])
async def test_the_adapter_reads_gzip_retry_after_and_bad_gzip_alike_on_both_paths(path: str) -> None:
    limited_head = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\nContent-Length: 30\r\n\r\n"
    answers = [
        ok(gzip.compress(_ANSWER), b"Content-Encoding: gzip"),
        (limited_head + b'{"error":{"message":"slow!!"}}', False),
        ok(b"this is not gzip", b"Content-Encoding: gzip"),
    ]
    async with serve(lambda n: answers[n - 1]) as server:
        transport = Http1Transport()
        adapter = _adapters(server, transport)[path]
        decoded = await _embed(adapter)
        with pytest.raises(UpstreamError) as limited:
            await _embed(adapter)
        with pytest.raises(UpstreamError) as corrupt:
            await _embed(adapter)
        await transport.aclose()
    assert decoded.vectors == [struct.pack("<2f", 1.0, 2.0)]
    assert (limited.value.upstream_status, limited.value.retry_after_s) == (429, 2.0)
    assert "answered 429: slow!!" in str(limited.value)
    assert corrupt.value.code == "upstream_malformed"  # an upstream error, not a 500
    assert str(corrupt.value).startswith("up sent a malformed answer: its body could not be decoded (")


@pytest.mark.parametrize("path", ["direct", "httpx", "client", "aiohttp"])
async def test_every_path_bounds_a_decompressed_answer_and_takes_any_2xx(path: str) -> None:
    # Through a proxy (the httpx path: ProxyRoutes hands the transport httpx requests) or an injected client, httpx's
    # own decoders inflated a gzip bomb whole (1 GiB from 1 MB: 2.2 GB of memory); the direct path stopped at
    # 256 MiB. And a 201 (NestJS's default answer to a POST) with a valid body was a 502 on every path.
    bomb = gzip.compress(b"\0" * (MAX_DECODED + 1), compresslevel=1)
    answers = [ok(bomb, b"Content-Encoding: gzip"), (b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s"
                                                     % (len(_ANSWER), _ANSWER), False)]  # fmt: skip
    async with serve(lambda n: answers[n - 1]) as server:
        transport = Http1Transport()
        client = httpx.AsyncClient(transport=AiohttpTransport()) if path == "aiohttp" else httpx.AsyncClient()
        if path in ("client", "aiohttp"):
            provider = ProviderConfig(
                name="up", type="openai", base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-up"
            )
            adapter = OpenAIAdapter(provider, sender_for(client))
        else:
            adapter = _adapters(server, transport)[path]
        with pytest.raises(UpstreamError) as bombed:
            await _embed(adapter)
        created = await _embed(adapter)
        await transport.aclose()
        await client.aclose()
    assert bombed.value.code == "upstream_malformed"
    assert f"more than {MAX_DECODED} bytes once decompressed" in str(bombed.value)
    assert created.vectors == [struct.pack("<2f", 1.0, 2.0)]


async def test_a_base_url_with_a_query_keeps_it_after_the_path() -> None:
    # Azure's style: "/embeddings" was appended to the query (POST /openai/deployments/dep?api-version=1/embeddings).
    async with serve(lambda n: ok(_ANSWER)) as server:
        transport = Http1Transport()
        base = f"http://127.0.0.1:{server.port}/openai/deployments/dep?api-version=2024-02-01"
        adapter = OpenAIAdapter(ProviderConfig(name="up", type="openai", base_url=base, api_key="k"),
                                sender_for(transport))  # fmt: skip
        await _embed(adapter)
        await transport.aclose()
    ((head, _),) = server.requests
    assert head.startswith(b"POST /openai/deployments/dep/embeddings?api-version=2024-02-01 HTTP/1.1\r\n")


@pytest.mark.parametrize("path", ["direct", "httpx"])
async def test_a_key_echoed_at_the_cut_of_a_long_error_is_redacted_whole(path: str) -> None:
    # The first 500 characters were cut before the key was looked for: 30 of its 35 characters went to the client.
    secret = "sk-upstream-SECRET-1234567890abcdef"
    text = b"y" * 470 + secret.encode() + b" trailing"
    answer = b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        provider = ProviderConfig(name="up", type="openai", base_url=f"http://127.0.0.1:{server.port}/v1",
                                  api_key=secret)  # fmt: skip
        adapter = {"direct": OpenAIAdapter(provider, sender_for(transport)),
                   "httpx": OpenAIAdapter(provider, transport.handle_async_request)}[path]  # fmt: skip
        with pytest.raises(UpstreamError) as failed:
            await _embed(adapter)
        await transport.aclose()
    message = str(failed.value)
    assert "[redacted]" in message and secret[:8] not in message
    assert len(message) <= len("up answered 500: ") + 500


_SECRET = "sk-upstream-SECRET-1234567890abcdef"


@pytest.mark.parametrize(
    "text",
    [
        # copies taken out before the cut shorten the text: a key the cut split came within 500 characters
        f"{_SECRET} {_SECRET} " + "y" * (501 - 2 * (len(_SECRET) + 1)) + _SECRET + " tail",
        (_SECRET + " ") * 40,
        # a byte is not a character: 520 bytes of emoji are 130 characters
        "\N{GRINNING FACE}" * 130 + _SECRET + " tail",
    ],
    ids=["three-copies", "forty-copies", "multibyte"],
)
async def test_no_piece_of_an_echoed_key_reaches_the_message(text: str) -> None:
    body = text.encode()
    answer = b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        provider = ProviderConfig(name="up", type="openai", base_url=f"http://127.0.0.1:{server.port}/v1",
                                  api_key=_SECRET)  # fmt: skip
        with pytest.raises(UpstreamError) as failed:
            await _embed(OpenAIAdapter(provider, sender_for(transport)))
        await transport.aclose()
    message = str(failed.value).removeprefix("up answered 500: ")
    assert len(message) <= 500 and "[redacted]" in message
    assert not any(_SECRET[:k] in message for k in range(4, len(_SECRET) + 1))


_ODD_SECRET = "sk-PROV/SECRET+zzzz9999"


async def _answered(secret: str, status: bytes, body: bytes) -> tuple[str, Embeddings | None]:
    """The adapter's error message for an answer, or its embeddings when it succeeded."""
    answer = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        provider = ProviderConfig(name="up", type="openai", base_url=f"http://127.0.0.1:{server.port}/v1",
                                  api_key=secret)  # fmt: skip
        try:
            return "", await _embed(OpenAIAdapter(provider, sender_for(transport)))
        except UpstreamError as exc:
            return str(exc), None
        finally:
            await transport.aclose()


@pytest.mark.parametrize(
    "body",
    [
        b'{"detail": "bad key sk-PROV\\/SECRET+zzzz9999"}',  # JSON's escaped "/", as PHP's json_encode writes
        b'{"detail": "bad key \\u0073k-PROV/SECRET+zzzz9999"}',
        b"bad key sk-PROV%2FSECRET%2Bzzzz9999 (url-encoded)",
        b"bad key sk-PROV/SECRET%2Bzzzz9999 (path-encoded)",
        b"bad key sk-PROV\\/SECRET+zzzz9999 (escaped, not JSON)",
    ],
    ids=["json-escaped-slash", "json-unicode-escape", "url-encoded", "path-encoded", "escaped-text"],
)
async def test_an_error_echoing_the_key_escaped_or_encoded_is_redacted(body: bytes) -> None:
    message, _ = await _answered(_ODD_SECRET, b"401 Unauthorized", body)
    assert "[redacted]" in message and "SECRET" not in message and "zzzz9999" not in message


@pytest.mark.parametrize("echo", ["key", "authorization"])
async def test_an_error_echoing_the_key_in_base64_is_redacted(echo: str) -> None:
    # A proxy's or appliance's page quoting the request's head in base64 passed the key on.
    quoted = _ODD_SECRET if echo == "key" else f"Bearer {_ODD_SECRET}"
    body = b"rejected request, head: " + base64.b64encode(quoted.encode())
    message, _ = await _answered(_ODD_SECRET, b"403 Forbidden", body)
    assert "[redacted]" in message and base64.b64encode(quoted.encode()).decode()[:12] not in message, message


@pytest.mark.parametrize("cut", [2, 10])
async def test_an_error_echoing_the_key_cut_short_has_the_piece_taken_out(cut: int) -> None:
    # An upstream that cut its own message mid-key passed the rest of the key on: only the whole key was found.
    secret = "sk-prov3-0123456789abcdefSECRETKEY-cc"
    message, _ = await _answered(secret, b"500 Internal Server Error",
                                 b'{"error": {"message": "bad key %s"}}' % secret[:-cut].encode())  # fmt: skip
    assert message.endswith("bad key [redacted]") and "0123" not in message, message
    # the kind of key alone (its first characters, fewer than 16) is no secret: left as sent
    message, _ = await _answered(secret, b"401 Unauthorized", b'{"error": {"message": "a key sk-prov3-01 ..."}}')
    assert "a key sk-prov3-01 ..." in message


async def test_an_answers_model_and_a_bad_index_never_carry_the_key() -> None:
    # the answer's model became a span attribute as sent; a bad index was quoted with repr into the 502's message
    vector = base64.b64encode(struct.pack("<2f", 1.0, 2.0)).decode()
    answer = {"data": [{"index": 0, "embedding": vector}], "model": f"m echoing Bearer {_ODD_SECRET}",
              "usage": {"prompt_tokens": 1, "total_tokens": 1}}  # fmt: skip
    _, got = await _answered(_ODD_SECRET, b"200 OK", orjson.dumps(answer))
    assert got is not None and got.model == "m echoing Bearer [redacted]"
    # where the 256 characters kept of it end mid-key: the key scrubbed first, then the name cut (the cut left the
    # key's first characters, which no longer matched it whole)
    answer["model"] = "m" * (256 - 30) + f" Bearer {_ODD_SECRET}"
    _, got = await _answered(_ODD_SECRET, b"200 OK", orjson.dumps(answer))
    assert got is not None and got.model is not None and len(got.model) <= 256
    assert _ODD_SECRET[:12] not in got.model and got.model.endswith(" Bearer [redacted]"), got.model
    answer["data"] = [{"index": f"key {_ODD_SECRET}", "embedding": vector}]
    message, _ = await _answered(_ODD_SECRET, b"200 OK", orjson.dumps(answer))
    assert message == "up sent a malformed answer: index of type str is not one of 0 to 0"


async def test_a_protocol_upgrade_is_a_protocol_error_not_a_transport_crash() -> None:
    # httptools raises HttpParserUpgrade, no HttpParserError: it escaped the protocol's callback (asyncio logged a
    # fatal transport error with a traceback) and the call failed as "answered 0".
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    crashes: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: crashes.append(context))
    async with serve(lambda n: (upgrade, False) if n == 1 else ok()) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.RemoteProtocolError, match="protocol upgrade"):
            await post(transport, server.url)
        assert (await post(transport, server.url)).status_code == 200  # the pool goes on
        await transport.aclose()
    assert crashes == []


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate", "gzip, gzip", "identity"])
def test_a_compressed_answer_is_decoded_up_to_a_bound(coding: str) -> None:
    compress = {
        "gzip": gzip.compress,
        "deflate": zlib.compress,
        "raw-deflate": lambda d: zlib.compress(d, wbits=-zlib.MAX_WBITS),
        "gzip, gzip": lambda d: gzip.compress(gzip.compress(d)),
        "identity": lambda d: d,
    }[coding]
    name = b"deflate" if coding == "raw-deflate" else coding.encode()
    data = b"0" * 3_000_000  # 3 MB that gzip makes ~3 KB of
    headers = [(b"Content-Encoding", name)]
    assert decoded(200, headers, compress(data), limit=3_000_000) == data
    if coding != "identity":  # the bound holds before the whole is made
        with pytest.raises(httpx.DecodingError, match="more than 2999999 bytes"):
            decoded(200, headers, compress(data), limit=2_999_999)


def test_every_gzip_member_and_every_content_encoding_line_is_decoded_and_a_cut_stream_refused() -> None:
    # Two gzip members decoded to the first one's bytes; a gzip stream cut short was taken as a shorter answer;
    # "Content-Encoding: deflate" and "Content-Encoding: gzip" on two lines (one list, RFC 9110) failed to decode.
    data = orjson.dumps({"data": [{"embedding": "AAAA"}] * 50})
    members = gzip.compress(data[:100]) + gzip.compress(data[100:])
    assert decoded(200, [(b"Content-Encoding", b"gzip")], members) == data
    for after in (
        b"\n",
        b"\0" * 8,
        gzip.compress(b""),
    ):  # what gzip and httpx take too: trailing bytes, an empty member
        assert decoded(200, [(b"Content-Encoding", b"gzip")], gzip.compress(data) + after) == data
    with pytest.raises(httpx.DecodingError, match="stops before its end"):
        decoded(200, [(b"Content-Encoding", b"gzip")], gzip.compress(data)[:-10])
    with pytest.raises(httpx.DecodingError):
        decoded(200, [(b"Content-Encoding", b"gzip")], gzip.compress(data)[:30])
    two_lines = [(b"Content-Encoding", b"deflate"), (b"content-encoding", b"gzip")]
    assert decoded(200, two_lines, gzip.compress(zlib.compress(data))) == data
    assert decoded(502, [(b"Content-Encoding", b"gzip")], b"") == b""  # an empty error answer stays empty
    big = b"0" * (3 * 4 * 1024 * 1024)  # decoded in several steps: each step's output is not a stop
    assert decoded(200, [(b"Content-Encoding", b"gzip")], gzip.compress(big)) == big


# --- bodies read by their length ---------------------------------------------------------------------------------


@asynccontextmanager
async def serve_in_pieces(data: bytes, piece: int, pause_s: float = 0.001) -> AsyncIterator[Server]:
    """Answers every request with ``data`` written ``piece`` bytes at a time, each piece sent on its own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                for at in range(0, len(data), piece):
                    writer.write(data[at : at + piece])
                    await writer.drain()
                    await asyncio.sleep(pause_s)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = Server(lambda n: None)
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        srv.close()


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"", True),  # no body, whatever the length says
        (b"HTTP/1.1 200 OK\r\nX-A:  spaced  \r\nContent-Length: 02\r\n\r\nhi", b"hi", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi", False),  # HTTP/1.0: closed after the answer
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nhi", b"hi", False),
    ],
)
async def test_heads_are_read_by_llhttp_and_bodies_by_their_length(answer: bytes, body: bytes, reused: bool) -> None:
    async with serve_in_pieces(answer, 3) as server:  # the head first, the body in later reads
        transport = Http1Transport()
        first = await post(transport, server.url)
        second = await post(transport, server.url)
        await transport.aclose()
    assert first.content == second.content == body
    assert server.connections == (1 if reused else 2)
    if b"X-A" in answer:
        assert first.headers.raw[0] == (b"X-A", b"spaced  ")  # as llhttp gives it: leading blanks only dropped


async def test_an_invalid_head_is_a_protocol_error_whatever_its_length() -> None:
    async with serve(lambda n: (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi", False)) as s:
        transport = Http1Transport()
        with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
            await post(transport, s.url)
        await transport.aclose()


@pytest.mark.parametrize("piece", [1, 7, 65_536])
async def test_an_answer_in_many_reads_arrives_whole_and_the_connection_is_reused(piece: int) -> None:
    body = bytes(range(256)) * (8200 if piece > 1000 else 1)  # 2.1 MB (a 256 batch), or 256 B a few bytes at a time
    answer = b"HTTP/1.1 200 OK\r\nX-Big: 1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    async with serve_in_pieces(answer, piece, pause_s=0.001 if len(answer) // piece < 1000 else 0) as server:
        transport = Http1Transport()
        origin = (b"http", b"127.0.0.1", server.port)
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        first = await transport.exchange(origin, request)
        second = await transport.exchange(origin, request)
        over_httpx = await post(transport, server.url, b"{}")
        await transport.aclose()
    for status, headers, content in (first, second):
        assert (status, headers) == (200, [(b"X-Big", b"1"), (b"Content-Length", b"%d" % len(body))])
        assert content == body
    assert type(first[2]) is bytearray  # the buffer the socket filled, not a copy of it
    assert over_httpx.content == body and type(over_httpx.content) is bytes
    assert server.connections == 1


@pytest.mark.parametrize("beyond", [b"HTTP/1.1 200 OK\r\n", ok(b"{}")[0]], ids=["a part", "a whole answer"])  # type: ignore[index]
async def test_bytes_beyond_an_answer_keep_its_connection_from_being_reused(beyond: bytes) -> None:
    # A body longer than its Content-Length: read on the same connection, the next answer would start with the rest.
    async with serve(lambda n: (ok(b'{"n":%d}' % n)[0] + beyond, False)) as server:  # type: ignore[index]
        transport = Http1Transport()
        first = await post(transport, server.url)
        second = await post(transport, server.url)
        await transport.aclose()
    assert (first.json(), second.json()) == ({"n": 1}, {"n": 2})
    assert server.connections == 2


async def test_an_announced_length_beyond_the_buffered_bound_is_read_as_it_comes() -> None:
    # No buffer of that size (100 MB, beyond the 64 MiB read into a buffer of its length, within max_body) is
    # allocated up front: the bytes that come are read, then the cut is a read error.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 100_000_000 + b"x" * 50_000
    async with serve(lambda n: (answer, True)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.ReadError, match="middle of its answer"):
            await post(transport, server.url)
        await transport.aclose()


def _beyond_300_kb(framing: str) -> bytes:
    """An answer of 500 KB of body, framed as ``framing`` says, its connection kept open."""
    piece = b"x" * 100_000
    if framing == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40) + piece * 5
    if framing == "length within the buffered bound":  # was read whole into a buffer of its length
        return b"HTTP/1.1 200 OK\r\nContent-Length: 500000\r\n\r\n" + piece * 5
    if framing == "chunked":
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(piece), piece) * 5
    return b"HTTP/1.1 200 OK\r\n\r\n" + piece * 5


@pytest.mark.parametrize("framing", ["length", "length within the buffered bound", "chunked", "until close"])
async def test_a_body_beyond_max_body_is_a_protocol_error(framing: str) -> None:
    # Read as it came without a bound: an upstream that did not stop filled the gateway's memory.
    answer = _beyond_300_kb(framing)
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport(max_body=300_000)
        with pytest.raises(httpx.RemoteProtocolError, match="more than 300000 bytes"):
            await post(transport, server.url)
        await transport.aclose()


@pytest.mark.parametrize("framing", ["chunked", "until close"])
async def test_a_refused_answer_is_not_kept_by_its_error(framing: str) -> None:
    # The error's traceback holds the failed connection, which held the body read so far (up to max_body, 256 MiB):
    # through the router's retries, a request to an upstream that did not stop held (1 + retry.count) x 256 MiB.
    from embedgate.providers.http1 import _Connection

    answer = _beyond_300_kb(framing)
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport(max_body=300_000)
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            await post(transport, server.url)
        await transport.aclose()
    import gc

    import embedgate

    assert raised.value is not None  # the error kept, as the router keeps it through its retries
    held = [o for o in gc.get_objects() if type(o) is _Connection]
    assert all(conn._body == [] and conn._into is None for conn in held)
    if embedgate.NATIVE != "compiled":  # (a compiled function's traceback entry holds no frame, nor its locals)
        assert held  # the error's traceback holds the connection: only its body is let go of


@pytest.mark.parametrize(
    ("status", "size"),
    [(200, 8_000_000), (429, 8_000_000), (429, 100_000)],
    ids=["unsent, a 200", "unsent, a 429", "in the kernel's buffers, a 429"],
)
async def test_a_connection_whose_request_is_still_going_out_is_not_reused(status: int, size: int) -> None:
    # An upstream that answered before reading the whole request (a rate limiter's early 429, say) had its
    # connection pooled with the request's body still unsent: the next request went out behind it, never read,
    # and waited for the attempt's whole timeout (a 504, held against the deployment's breaker). A body the kernel
    # took whole is unread all the same: an error answer to a large request leaves its connection closed too.
    done = asyncio.Event()
    answer = b'HTTP/1.1 %d X\r\nContent-Length: 14\r\n\r\n{"early":true}' % status

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body is never read
        writer.write(answer)
        await writer.drain()
        await done.wait()  # the connection kept open, unread
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1/embeddings"
    transport = Http1Transport()
    try:
        first = await post(transport, url, b"x" * size)
        assert (first.status_code, first.json()) == (status, {"early": True})
        second = await asyncio.wait_for(post(transport, url), 3)  # on a new connection, answered at once
        assert second.json() == {"early": True}
    finally:
        await transport.aclose()
        done.set()
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("head", ["endless header lines", "one endless header value"])
async def test_a_head_beyond_max_head_is_a_protocol_error(head: str) -> None:
    # Only the body was bounded: an upstream sending header lines without end grew the gateway's memory by
    # gigabytes until the attempt's timeout (llhttp keeps a head's headers, and a value until it is whole).
    pad = b"X-Pad: " + b"a" * 1000 + b"\r\n" if head == "endless header lines" else b"a" * 1000
    start = b"HTTP/1.1 200 OK\r\n" + (b"" if head == "endless header lines" else b"X-Pad: ")
    answer = start + pad * (3 * MAX_HEAD // len(pad))  # 3 MiB of it, and the connection kept open
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.RemoteProtocolError, match=f"a head of more than {MAX_HEAD} bytes"):
            await asyncio.wait_for(post(transport, server.url), 10)
        # a head of many headers within the bound is read
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))  # ~220 KB
        async with serve(lambda n: ok(b'{"ok":true}', many.rstrip(b"\r\n"))) as fine:
            response = await post(transport, fine.url)
            assert response.status_code == 200 and response.headers["x-h1999"] == "v" * 100
        await transport.aclose()


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"


@pytest.mark.parametrize("framing", ["endless trailer lines", "one endless trailer value", "an endless chunk line"])
async def test_chunk_framing_beyond_max_head_is_a_protocol_error(framing: str) -> None:
    # The trailers after the last chunk were kept, as the head's lines were, without a bound: 1.4 GB for one
    # request of an upstream sending trailer lines without end, until its timeout.
    start = CHUNKED_HEAD + b"2\r\n{}\r\n"
    if framing == "endless trailer lines":
        start, pad = start + b"0\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n"
    elif framing == "one endless trailer value":
        start, pad = start + b"0\r\nX-Pad: ", b"a" * 1000
    else:  # a chunk's extension without end
        start, pad = start + b"2;ext=", b"a" * 1000
    answer = start + pad * (3 * MAX_HEAD // len(pad))  # 3 MiB of it, and the connection kept open
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.RemoteProtocolError, match=f"more than {MAX_HEAD} bytes of chunk framing"):
            await asyncio.wait_for(post(transport, server.url), 10)
        await transport.aclose()


async def test_trailers_are_not_taken_for_headers() -> None:
    # A trailer is no header (RFC 9110, 6.5.1): merged in, a trailer "Content-Encoding: gzip" made a plain JSON
    # answer undecodable, a 502 after every retry.
    answer = CHUNKED_HEAD + b'b\r\n{"ok":true}\r\n0\r\nContent-Encoding: gzip\r\nX-Trailer: 1\r\n\r\n'
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        response = await post(transport, server.url)
        await transport.aclose()
    assert response.json() == {"ok": True}
    assert "content-encoding" not in response.headers and "x-trailer" not in response.headers


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc (Linux)")
async def test_a_body_of_tiny_chunks_takes_about_its_size_in_memory() -> None:
    # Each chunk's data was an object of its own (~40 bytes for 2): 8 MB sent as 2-byte chunks took ~250 MB.
    size = 8 * 1024 * 1024
    answer = CHUNKED_HEAD + b"2\r\n  \r\n" * (size // 2) + b"0\r\n\r\n"
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        gc.collect()
        before = _resident_bytes()
        call = asyncio.ensure_future(post(transport, server.url))
        grown = 0
        while not call.done():
            grown = max(grown, _resident_bytes() - before)
            await asyncio.sleep(0.005)
        response = call.result()
        await transport.aclose()
    assert len(response.content) == size
    # the body and its join, and the server's write buffer of the answer (3.5x the body, in this process): was ~31x
    assert grown < 8 * size


async def test_an_answer_cut_in_a_body_read_by_its_length_is_a_read_error() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 50_000
    async with serve(lambda n: (answer, True)) as server:
        transport = Http1Transport()
        with pytest.raises(httpx.ReadError, match="middle of its answer"):
            await post(transport, server.url)
        await transport.aclose()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident memory from /proc (Linux)")
async def test_an_announced_body_takes_no_memory_until_it_comes() -> None:
    # The body's buffer was zeroed when the head announced it: a pass over 2.1 MB for every 256-input answer, and an
    # upstream announcing 60 MB and sending nothing more made the gateway's memory 60 MB larger at once.
    announced = 60 * 1024 * 1024
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % announced + b"x" * 70_000  # more than one read
    async with serve(lambda n: (answer, False)) as server:
        transport = Http1Transport()
        before = _resident_bytes()
        call = asyncio.ensure_future(post(transport, server.url))
        while not server.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the head and the body's start read: the buffer is allocated
        grown = _resident_bytes() - before
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await transport.aclose()
    assert grown < 16 * 1024 * 1024


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the transport, collected, says it was not closed
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_connection_left_by_a_closed_event_loop_is_closed_not_left_to_the_collector(scheme: str) -> None:
    # Under the next loop, the pool drops a connection the closed loop left open; its socket stayed open until the
    # cyclic collector came by (with the collector off, two sockets more for every loop). Over TLS the socket is
    # the transport's beneath the TLS one.
    import ssl

    import trustme

    ended: list[int] = []
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    def answer(conn: socket.socket, number: int) -> None:
        if scheme == "https":
            conn = server_ctx.wrap_socket(conn, server_side=True)
        with conn:
            conn.settimeout(3)
            conn.recv(65536)
            conn.sendall(ok()[0])
            try:
                if not conn.recv(65536):  # the client closed the connection
                    ended.append(number)
            except TimeoutError:
                pass

    def serve(listener: socket.socket) -> None:
        for number in range(2):
            conn, _ = listener.accept()
            threading.Thread(target=answer, args=(conn, number), daemon=True).start()

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/v1/embeddings"
    transport = Http1Transport(ssl_context=client_ctx)
    gc.disable()
    try:
        assert asyncio.run(post(transport, url)).status_code == 200
        assert asyncio.run(post(transport, url)).status_code == 200  # a new connection: the first is dropped
        deadline = time.monotonic() + 2
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gc.enable()
        listener.close()
    assert ended == [0]
    asyncio.run(transport.aclose())  # the second connection, of a closed loop too
    del transport
    gc.collect()  # here, where the transports' warning is ignored


async def test_a_call_says_whether_it_went_out_or_still_waits_for_a_connection() -> None:
    # The router bills a call that went out and got no usable answer at its estimate, and one that sent nothing not
    # at all: a call cancelled while it waited for a pooled connection was billed as one the upstream had taken.
    from embedgate.providers.http1 import SENDING, SENT, UNKNOWN, WAITING

    async def call(transport: Http1Transport, url: str, state: list[int]) -> None:
        SENDING.set(state)  # (in this task's own context)
        await post(transport, url)

    async with serve(lambda n: ok(), delay_s=0.3) as server:
        transport = Http1Transport(max_connections=1)
        first, second = [UNKNOWN], [UNKNOWN]
        holding = asyncio.ensure_future(call(transport, server.url, first))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(call(transport, server.url, second))
        await asyncio.sleep(0.05)
        assert (first, second) == ([SENT], [WAITING])
        waiting.cancel()
        await asyncio.gather(holding, waiting, return_exceptions=True)
        await transport.aclose()
    assert second == [WAITING] and len(server.requests) == 1
