"""The adapter seam, the answer type adapters return, and the aiohttp-backed transport embedgate used before.

Upstream calls use httpx's API (``httpx.Request`` in, ``httpx.Response`` out, any ``httpx.AsyncBaseTransport``
underneath, so ``httpx.MockTransport`` makes every upstream behaviour testable). The transport is chosen by
measurement (``python -m tests.benchmarks.transports``): at 16 concurrent calls on this 2-core machine, an
``httpx.AsyncClient`` over httpx's own transport costs ~1,900 us of CPU per call, the httpx-aiohttp transport ~360,
:class:`AiohttpTransport` ~300, aiohttp's own client with no httpx objects ~160, and
:class:`~embedgate.providers.http1.Http1Transport` ~130: embedgate uses the last. Adapters send through the
transport directly (the client's per-request machinery, cookies, auth, redirects, hooks, is nothing an embedding
call needs), and transports read the whole (JSON) answer in one go. With ``Http1Transport`` itself (the default)
the adapter hands it the request's bytes (``Http1Transport.exchange``) and builds no httpx objects at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
import httpx

__all__ = ["Adapter", "AiohttpTransport", "Embeddings", "Sender", "gen_ai_provider_name", "sender_for"]

Sender = Callable[[httpx.Request], Awaitable[httpx.Response]]
_OWN_HEADERS = frozenset({"host", "content-length"})
_DECODED_HEADERS = frozenset({b"content-encoding", b"content-length"})


@dataclass(slots=True)
class Embeddings:
    """A validated upstream answer: one float32 vector per input item, in input order; read, never changed but for
    its token counts, which the router settles (not ``frozen``: a frozen dataclass sets each field through
    ``object.__setattr__``, ~1 us more per answer)."""

    vectors: list[bytes]
    dimensions: int
    prompt_tokens: int  # -1 from an adapter when the upstream gave no usable count; the router then puts its own
    total_tokens: int
    #: Per item, the upstream's own base64 text of the vector when it sent one that decoded as is (ASCII, to be
    #: passed on to a base64 client without encoding it again); None where it did not.
    b64: list[bytes | memoryview | None] | None = None
    #: The model the answer says produced it (e.g. a dated snapshot of the one asked for), if it names one.
    model: str | None = None


class Adapter(Protocol):
    """One upstream provider API. Raises only ``embedgate.errors`` types (translated at this boundary)."""

    name: str
    #: The upstream's host and port (``server.address``, ``server.port`` of its attempt spans).
    server_address: str
    server_port: int | None
    #: Its ``gen_ai.provider.name``: a well-known value of the GenAI conventions (``openai``, ``azure.ai.openai``)
    #: where its host is one of theirs, else the provider's name in the config.
    gen_ai_provider: str

    async def embed(
        self,
        *,
        upstream_model: str,
        input: Any,
        n_items: int,
        dimensions: int | None,
        user: str | None,
        input_type: str | None,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> Embeddings: ...


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one pooled ``aiohttp.ClientSession``, reading each answer whole.

    Errors keep httpx's types (``httpx.TimeoutException``, ``httpx.ConnectError``, ``httpx.ReadError``), so the
    adapters translate the same exceptions whichever transport is underneath. It arms no timeout of its own (nor
    reads httpx's timeout extension): the caller bounds each request, as the adapters do with ``deadline``.
    """

    def __init__(self, *, max_connections: int = 512, keepalive_s: float = 30.0) -> None:
        self._limit = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop that will own it.
        # per upstream host, as Http1Transport's pool: one slow provider does not take the others' connections
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit, keepalive_timeout=self._keepalive_s,
                                         ttl_dns_cache=300)  # fmt: skip
        # No aiohttp timers: every adapter call runs under its own deadline (the attempt's timeout, capped
        # by the request's deadline), so aiohttp's default 300 s total and 30 s connect timers, armed and
        # cancelled on every request, would only cost time (~8% of a call, measured).
        no_timers = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=None)
        # Decoded here (bounded, see http1.decoded), not by aiohttp, which inflates a gzip bomb whole.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                              timeout=no_timers)  # fmt: skip
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the answer with its body read."""
        session = self._session or self._open()
        try:
            async with session.request(
                request.method,
                str(request.url),
                # aiohttp derives Host and Content-Length itself
                headers=[(k, v) for k, v in request.headers.multi_items() if k not in _OWN_HEADERS],
                data=request.content,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                if resp.headers.get("content-encoding"):
                    from .http1 import decoded_answer  # here, as in sender_for

                    body = decoded_answer(resp.status, list(resp.raw_headers), body)
                # Decoded: without Content-Encoding (and the length of the encoded body), httpx does not try to
                # decode it a second time.
                headers = [(k, v) for k, v in resp.raw_headers if k.lower() not in _DECODED_HEADERS]
                # A ByteStream, not content=: httpx would re-derive Content-Length and copy the body. Read here,
                # synchronously (cheaper than the async iteration of aread, which then has nothing left to do).
                response = httpx.Response(resp.status, headers=headers, stream=httpx.ByteStream(body), request=request)
                response.read()
                return response
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc), request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:  # dropped connection, payload cut short, ...
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read(response: httpx.Response) -> httpx.Response:
    """``response`` with its body read, and decoded within ``MAX_DECODED`` bytes; an error answer whose body does
    not decode keeps its status (a 429 its ``Retry-After``), with an empty body: it is the status that counts."""
    from .http1 import MAX_BODY, decoded  # here, as below

    if response.is_stream_consumed:  # Http1Transport's answers come read, and decoded
        return response
    status = response.status_code
    if "content-encoding" not in response.headers:
        await response.aread()
        return response
    pieces: list[bytes] = []
    size = 0
    try:  # undecoded (httpx's decoders would inflate a few KB of gzip to gigabytes), then decoded bounded
        async for piece in response.aiter_raw():
            size += len(piece)
            if size > MAX_BODY:
                raise httpx.DecodingError(f"a body of more than {MAX_BODY} bytes")
            pieces.append(piece)
        body = decoded(status, response.headers.raw, b"".join(pieces))
    except httpx.DecodingError:
        if 200 <= status < 300:
            raise
        body = b""  # an error answer whose body does not decode: its status counts
    finally:
        await response.aclose()
    headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _DECODED_HEADERS]
    return httpx.Response(status, headers=headers, content=body, request=response.request)


def sender_for(upstream: httpx.AsyncClient | httpx.AsyncBaseTransport) -> Sender:
    """How adapters send a request: through a transport directly, or an injected client's ``send``."""
    if isinstance(upstream, httpx.AsyncClient):
        client = upstream

        async def send_through(request: httpx.Request) -> httpx.Response:
            return await _read(await client.send(request, stream=True))

        return send_through
    from .http1 import Http1Transport  # here: http1 is compiled with the package, base is not

    if type(upstream) is Http1Transport:
        # Its answers come with their body read: no coroutine of this (interpreted) module around each call.
        return upstream.handle_async_request

    async def send(request: httpx.Request) -> httpx.Response:
        return await _read(await upstream.handle_async_request(request))

    return send


#: The GenAI conventions' well-known ``gen_ai.provider.name`` values, by the upstream's host: that host, or one of
#: its subdomains (a region's, an Azure resource's).
_GEN_AI_PROVIDERS: Final = (
    ("api.openai.com", "openai"),
    ("openai.azure.com", "azure.ai.openai"),
    ("services.ai.azure.com", "azure.ai.inference"),
    ("models.ai.azure.com", "azure.ai.inference"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.cohere.ai", "cohere"),
    ("api.cohere.com", "cohere"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("api.deepseek.com", "deepseek"),
    ("api.groq.com", "groq"),
    ("api.x.ai", "x_ai"),
    ("api.perplexity.ai", "perplexity"),
)


def gen_ai_provider_name(host: str) -> str | None:
    """The well-known ``gen_ai.provider.name`` of an upstream host (``api.openai.com``: ``openai``), if any."""
    host = host.lower().rstrip(".")
    for known, name in _GEN_AI_PROVIDERS:
        if host == known or host.endswith("." + known):
            return name
    # Vertex AI's regional hosts: us-central1-aiplatform.googleapis.com
    return "gcp.vertex_ai" if host.endswith("-aiplatform.googleapis.com") else None
