"""``EmbeddingGateway``: the pure-ASGI middleware that serves the embedding routes in front of a host app.

Embedding POSTs on the three routes, ``GET /v1/models``, ``/healthz``, ``/readyz`` and ``/metrics`` (under
``server.path_prefix``) are answered here; every other request, websockets included, goes to the host app
untouched. The gateway's resources (upstream client, stores) open with the lifespan's startup, also when
mounted, or on the first request when the server runs no lifespan, and close with its shutdown.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import orjson
import structlog

from .cache import VectorCache
from .config import Config, load_config
from .errors import (
    Dialect,
    GatewayError,
    PayloadTooLarge,
    UnsupportedMediaType,
    render_error,
)
from .pipeline import Call, Pipeline
from .providers import build_adapter, make_http_client
from .routing import Router
from .vectors import bytes_to_b64, bytes_to_floats

__all__ = ["EmbeddingGateway"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("embedgate")

_ROUTES = {
    "/v1/embeddings": Dialect.OPENAI,
    "/v2/router/embeddings": Dialect.ORQ,
    "/api/v1/embeddings": Dialect.OPENROUTER,
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = (b"content-type", b"application/json")


class EmbeddingGateway:
    """Pure ASGI middleware serving embedding requests; everything else passes through to ``app``.

    ``app.add_middleware(EmbeddingGateway, config=load_config("embedgate.yaml"))``
    """

    def __init__(
        self,
        app: ASGIApp,
        config: Config | str | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        standalone: bool = False,
    ) -> None:
        self.app = app
        if config is None:
            config = Config()
        self.config = load_config(config) if isinstance(config, str) else config
        prefix = self.config.server.path_prefix
        self._embed_paths = {prefix + path: dialect for path, dialect in _ROUTES.items()}
        self._get_paths = {
            prefix + "/v1/models": self._models,
            prefix + "/healthz": self._healthz,
            prefix + "/readyz": self._readyz,
        }
        self._max_body = self.config.server.max_body_bytes
        self._standalone = standalone
        self._given_client = http_client
        self._client: httpx.AsyncClient | None = None
        self._open = False
        self._opening = asyncio.Lock()
        self.router: Router | None = None
        self.cache: VectorCache | None = None
        self.pipeline: Pipeline | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open the upstream client and the stores (idempotent)."""
        async with self._opening:
            if self._open:
                return
            self._client = self._given_client or make_http_client()
            adapters = {name: build_adapter(p, self._client) for name, p in self.config.providers.items()}
            self.router = Router(self.config, adapters)
            self.cache = VectorCache.from_config(self.config.redis_url, self.config.cache.max_bytes)
            self.pipeline = Pipeline(self.config, self.router, self.cache)
            self._open = True

    async def shutdown(self) -> None:
        """Close what :meth:`startup` opened (an injected client stays the caller's to close)."""
        async with self._opening:
            if not self._open:
                return
            self._open = False
            if self._client is not None and self._given_client is None:
                await self._client.aclose()
            self._client = None
            if self.cache is not None:
                await self.cache.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, wrapped_receive, send)

    # --- ASGI ------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if method == "POST":
                dialect = self._embed_paths.get(path)
                if dialect is not None:
                    await self._embed(scope, receive, send, dialect)
                    return
            elif method == "GET":
                handler = self._get_paths.get(path)
                if handler is not None:
                    if not self._open:
                        await self.startup()
                    status, body, headers = await handler(scope)
                    await _send(send, status, body, headers)
                    return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _embed(self, scope: Scope, receive: Receive, send: Send, dialect: Dialect) -> None:
        if not self._open:
            await self.startup()
        headers = _headers(scope)
        rid = headers.get("x-request-id")
        request_id = rid if rid and _REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex
        call = Call(
            dialect=dialect,
            body=b"",
            request_id=request_id,
            authorization=headers.get("authorization"),
            identity_header=headers.get("x-orq-identity-id") or headers.get("x-orq-contact-id"),
        )
        error: GatewayError | None = None
        try:
            call.body = await self._read_body(headers, receive)
            assert self.pipeline is not None
            await self.pipeline.run(call)
            status, body = 200, self._render(call)
        except GatewayError as err:
            error = err
            status, body = err.status, render_error(err, dialect)
            call.headers.update(err.headers)
        except Exception:
            log.exception("unhandled error", request_id=request_id)
            error = GatewayError("Internal error in the gateway; see its logs for this request id")
            status, body = 500, render_error(error, dialect)
        for finish in call.finish:
            try:
                await finish(call, error)
            except Exception:
                log.exception("finishing the request failed", request_id=request_id)
        out = [_JSON, (b"x-request-id", request_id.encode())]
        out.append((b"x-embedgate-cache", call.cache_status.encode()))
        out.extend((k.encode(), v.encode()) for k, v in call.headers.items())
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        ctype = headers.get("content-type")
        if ctype is not None and "json" not in ctype.lower():
            raise UnsupportedMediaType(
                f"The body must be JSON ('Content-Type: application/json'), got '{ctype[:100]}'",
                param="content-type",
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise PayloadTooLarge(f"The body is larger than {self._max_body} bytes", param="body")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GatewayError("The client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"The body is larger than {self._max_body} bytes", param="body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _render(self, call: Call) -> bytes:
        req = call.request
        assert req is not None
        if req.encoding_format == "base64":
            data = [{"object": "embedding", "index": i, "embedding": bytes_to_b64(v)}  # type: ignore[arg-type]
                    for i, v in enumerate(call.vectors)]  # fmt: skip
        else:
            data = [{"object": "embedding", "index": i, "embedding": bytes_to_floats(v)}  # type: ignore[arg-type]
                    for i, v in enumerate(call.vectors)]  # fmt: skip
        usage: dict[str, Any] = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
        body: dict[str, Any] = {"object": "list", "data": data, "model": call.served_model, "usage": usage}
        if call.dialect is Dialect.OPENROUTER:
            body = {"id": f"emb-{call.request_id}", **body}
            usage["cost"] = round(call.cost_usd, 12)
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    # --- GET endpoints ---------------------------------------------------------------------------------------

    async def _models(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        assert self.pipeline is not None
        try:
            key = self.pipeline.keys.authenticate(_headers(scope).get("authorization"))
        except GatewayError as err:
            return err.status, render_error(err, Dialect.OPENAI), {}
        ids = list(self.config.models)
        ids += [f"{p}/*" for p in self.config.providers if not any(m.startswith(f"{p}/") for m in ids)]
        data = [
            {"id": mid, "object": "model", "created": 0, "owned_by": mid.partition("/")[0]}
            for mid in ids
            if mid.endswith("/*") or self.pipeline.keys.allows(key, mid)
        ]
        return 200, orjson.dumps({"object": "list", "data": data}), {}

    async def _healthz(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        return 200, b'{"status":"ok"}', {}

    async def _readyz(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        checks: dict[str, Any] = {}
        if self.cache is not None:
            checks["cache"] = {"backend": self.cache.backend, "ok": await self.cache.ping()}
        ok = all(c["ok"] for c in checks.values())
        body = {"status": "ready" if ok else "unavailable", "checks": checks,
                "deployments": self.router.status() if self.router else {}}  # fmt: skip
        return (200 if ok else 503), orjson.dumps(body), {}


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    out = [_JSON, *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def _now() -> float:
    return time.perf_counter()
