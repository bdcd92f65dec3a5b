"""The reference "bare aiohttp ASGI proxy": the least an ASGI app can do to forward an embeddings call.

It reads the body, POSTs it unchanged to the upstream through one shared ``aiohttp.ClientSession`` and
returns the answer. No parsing, auth, budgets, cache or telemetry: the gap between this and embedgate is
what embedgate's features cost; the gap between this and a direct call is what ASGI + uvicorn + one more
hop cost.

Run: ``BENCH_UPSTREAM_URL=http://127.0.0.1:9000 uvicorn tests.benchmarks.bare_proxy:app --port 9001``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

__all__ = ["BareProxy", "app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_FORWARDED = ("authorization", "content-type")


class BareProxy:
    """Pure ASGI app forwarding every request to ``upstream`` (``/healthz`` answered locally)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point: lifespan opens and closes the shared session, http is forwarded."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await _respond(send, 200, b"ok", b"text/plain")
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k.decode("latin-1") in _FORWARDED
        }
        session = self._session or self._open()
        try:
            async with session.request(
                scope["method"], self.upstream + scope["path"], data=b"".join(chunks), headers=headers
            ) as resp:
                body = await resp.read()
                status = resp.status
                content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
        except (aiohttp.ClientError, TimeoutError) as exc:
            await _respond(
                send, 502, f'{{"error": {{"message": "{type(exc).__name__}"}}}}'.encode(), b"application/json"
            )
            return
        await _respond(send, status, body, content_type)

    def _open(self) -> aiohttp.ClientSession:
        # Keep-alive pool sized above the benchmark's connection count, so no request waits for a socket.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)
        return self._session

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                    self._session = None
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


app = BareProxy(os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:9000"))
