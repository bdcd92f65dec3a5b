"""``EmbeddingGateway``: the pure-ASGI middleware that serves the embedding routes in front of a host app.

Embedding POSTs on the three routes, ``GET /v1/models`` (and OpenRouter's ``/api/v1/embeddings/models``),
``/healthz``, ``/readyz`` and ``/metrics`` (under ``server.path_prefix``) are answered here; every other request,
websockets included, goes to the host app untouched. The gateway's resources (upstream client, stores) open with
the lifespan's startup, also when mounted, or on the first request when the server runs no lifespan, and close
with its shutdown.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import hmac
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from decimal import Decimal
from typing import Any, Final

import anyio
import httpx
import orjson
import structlog
from mypy_extensions import mypyc_attr
from opentelemetry.trace import TracerProvider
from opentelemetry.util.types import AttributeValue

from .budgets import BUILTIN_PRICES, BudgetEngine, budget_store, model_price
from .cache import VectorCache
from .config import BUDGET_SCOPES, Config, hash_key, load_config
from .errors import (
    BudgetExceeded,
    ClientDisconnected,
    Dialect,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    render_error,
)
from .identities import IdentityStore, identity_store
from .logs import (
    BODY_PARTS,
    REQUEST_TASK,
    bind_request,
    bind_task,
    clear_request,
    configure_logging,
    flush_access_lines,
    set_access_flush_delay,
)
from .memory import keep_freed_memory
from .metrics import Metrics
from .observe import ObservedAttempts
from .outcome import JSON_CONTENT_TYPE, account, annotate, embed_headers, response_headers
from .pipeline import TWO_AUTHORIZATIONS, Call, Pipeline, one_authorization
from .providers import build_adapter, sender_for, upstream_transport
from .request import names_of
from .routing import Router
from .telemetry import Telemetry
from .vectors import bytes_to_b64, bytes_to_floats

__all__ = ["EmbeddingGateway"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("embedgate")

_ROUTES: Final = {
    "/v1/embeddings": Dialect.OPENAI,
    "/v2/router/embeddings": Dialect.ORQ,
    "/api/v1/embeddings": Dialect.OPENROUTER,
}
_getrandbits: Final = random.getrandbits
#: The host's words that end its lifespan's use of the gateway.
_HOST_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"})
_DRAIN_S: Final = 2.0  # the most shutdown waits for requests still finishing
#: The most ``/readyz`` waits for a store's PING (each at once): a frozen Redis held it 1.25 s, past a readiness
#: probe's usual 1 s timeout, and took every replica out of service where the stores refuse no request.
READY_WAIT_S: Final = 0.5
#: The largest body of a request refused for its key (401) read for the name and model its trace and access line
#: give: a larger one is not parsed at all.
NAMED_UNAUTHORIZED_BYTES: Final = 64 * 1024
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_FIRST_ITEM_HEAD: Final = b'{"object":"embedding","index":0,"embedding":"'
_ITEM_HEAD: Final = b'"},{"object":"embedding","index":%d,"embedding":"'


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled by the build; a host may still extend it
class EmbeddingGateway:
    """Pure ASGI middleware serving embedding requests; everything else passes through to ``app``.

    ``app.add_middleware(EmbeddingGateway, config=load_config("embedgate.yaml"))``
    """

    def __init__(
        self,
        app: ASGIApp,
        config: Config | str | os.PathLike[str] | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: Metrics | None = None,
        standalone: bool = False,
    ) -> None:
        self.app = app
        if config is None:
            config = Config()
        self.config = config if isinstance(config, Config) else load_config(config)  # a path: str or PathLike
        prefix = self.config.server.path_prefix
        self._embed_paths = {prefix + path: dialect for path, dialect in _ROUTES.items()}
        self._get_paths = {
            prefix + "/v1/models": self._models,
            prefix + "/api/v1/embeddings/models": self._openrouter_models,
            prefix + "/healthz": self._healthz,
            prefix + "/readyz": self._readyz,
            prefix + "/metrics": self._metrics_endpoint,
        }
        if self.config.admin.sha256 is not None or standalone:  # mounted with admin off: the host's paths
            self._get_paths[prefix + "/admin/usage"] = self._admin_usage
            self._get_paths[prefix + "/admin/identities"] = self._admin_identities
        self._max_body = self.config.server.max_body_bytes
        self._max_in_flight = self.config.server.max_in_flight
        self._admitted = 0  # embedding requests holding a place of max_in_flight (from their body read to their answer)
        self._workspaces: tuple[str, ...] = tuple(dict.fromkeys(k.workspace for k in self.config.keys))
        self._standalone = standalone
        self._given_client = http_client
        self._tracer_provider = tracer_provider
        self.metrics = metrics or Metrics()
        self.telemetry: Telemetry | None = None
        self.budgets: BudgetEngine | None = None
        self.identities: IdentityStore | None = None
        self._access_log = self.config.telemetry.access_log
        self._transport: httpx.AsyncBaseTransport | None = None
        self._open = False
        self._opening = asyncio.Lock()
        self._in_flight = 0  # embedding requests between their trace's start and their end
        self._finishing: set[asyncio.Future[None]] = set()  # settles a host's timeout left running (see _embed)
        self._pinging: set[asyncio.Future[bool]] = set()  # /readyz's pings still waiting for their store
        self._server_attrs: dict[tuple[str, str], dict[str, AttributeValue]] = {}  # the root span's HTTP ones
        self.router: Router | None = None
        self.cache: VectorCache | None = None
        self.pipeline: Pipeline | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open the upstream client and the stores (idempotent). Standalone (``create_app``), the server's own app
        starting: the process is the gateway's, and it sets the process's tracer provider, GC and allocator."""
        await self._start(self._standalone)

    def lifespan(self, app: object = None) -> GatewayLifespan:
        """Open and close the gateway with a host's lifespan, where the server's lifespan does not reach it (under a
        Starlette ``Mount``, which runs none): ``Starlette(routes=[Mount("/gw", app=gateway)],
        lifespan=gateway.lifespan)``, or ``async with gateway.lifespan(app):`` inside the host's own. Without it,
        the gateway opens on its first request and is never closed: its last access lines and spans are lost when
        the server stops. The process stays the host's (its tracer provider, GC and allocator are left alone)."""
        return GatewayLifespan(self)

    async def _start(self, process: bool) -> None:
        """Open the resources; ``process``: the process is the gateway's own (see :meth:`startup`)."""
        async with self._opening:
            if self._open:
                return
            # First: a start that fails below is told in JSON lines, as everything else (and so is the 503 access
            # line of a request that found the gateway unable to start). Mounted, everything passes (the host's
            # debug lines too): a host that configures structlog after this (in its own lifespan, which runs inside
            # ours) keeps what it does not set.
            # (not the process's: a configuration of ours already there, a standalone gateway's, is left as it is)
            configure_logging(level=logging.INFO if process else logging.NOTSET, keep_installed=not process)
            if self._given_client is not None:
                send = sender_for(self._given_client)
            else:
                self._transport = upstream_transport()  # through the proxies HTTPS_PROXY etc. name, if any
                send = sender_for(self._transport)
            providers = self.config.providers
            adapters = {name: build_adapter(p, send, [o for o in providers.values() if o is not p])
                        for name, p in providers.items()}  # fmt: skip
            set_access_flush_delay(self.config.telemetry.access_log_flush_ms / 1000)
            self.telemetry = Telemetry(
                self._tracer_provider,
                service_name=self.config.telemetry.service_name,
                standalone=process,
                export_process=self.config.telemetry.export_process,
            )
            self.router = Router(self.config, adapters, hook=ObservedAttempts(self.telemetry, self.metrics))
            cache_url = self.config.cache.redis_url or self.config.redis_url
            self.cache = VectorCache.from_config(cache_url, self.config.cache.max_bytes)
            self.metrics.set_known_models([*self.config.models, *BUILTIN_PRICES])
            # The memory backend's size; with Redis 0 (its memory is Redis's own: -1 there summed to -N over workers)
            self.metrics.set_cache_bytes_source(self.cache.bytes_used if self.cache.backend == "memory" else None)
            self.budgets = BudgetEngine(self.config.budgets, budget_store(self.config.redis_url),
                                        fail_open=self.config.budget_options.fail_open,
                                        projects=[(k.workspace, k.project) for k in self.config.keys],
                                        workspaces=self._workspaces)  # fmt: skip
            self.identities = identity_store(self.config.redis_url)
            self.pipeline = Pipeline(self.config, self.router, self.cache, self.budgets, self.identities,
                                     self.telemetry, bind_key_id=not self._standalone)  # fmt: skip
            self._open = True
            if process:
                # Everything built so far (modules, config, clients) lives as long as the process: moved out of
                # the cyclic GC's reach, its full passes no longer rescan it in the middle of requests (measured:
                # p99 of a cache miss at 16 connections ~55 ms -> ~31 ms). Mounted, the host's GC is its own.
                gc.collect()
                gc.freeze()
                # A batch's answers (MBs each) reuse freed heap memory instead of fresh pages from the kernel
                # (see embedgate.memory). Mounted, the host's allocator settings are its own.
                keep_freed_memory()

    async def shutdown(self) -> None:
        """Close what :meth:`startup` opened (an injected client stays the caller's to close)."""
        async with self._opening:
            if not self._open:
                return
            # Requests still finishing (those a server's graceful shutdown just cancelled answer and release their
            # budget reservations) get a moment before the stores close under them.
            loop = asyncio.get_running_loop()
            until = loop.time() + _DRAIN_S
            while self._in_flight and loop.time() < until:
                await asyncio.sleep(0.01)
            if self._finishing:  # the settles a host's timeout left running
                await asyncio.wait(list(self._finishing), timeout=max(0.0, until - loop.time()))
            if self.budgets is not None:  # and the reserves they left on their way
                await self.budgets.drain(max(0.0, until - loop.time()))
            self._open = False
            if self._transport is not None:
                await self._transport.aclose()
                self._transport = None
            if self.cache is not None:
                await self.cache.close()
            if self.budgets is not None:
                await self.budgets.store.aclose()
            if self.identities is not None:
                await self.identities.aclose()
            if self.telemetry is not None:
                self.telemetry.shutdown()
            self.metrics.close()
            flush_access_lines()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                failure: Exception | None = None
                try:
                    await self.startup()
                except Exception as exc:
                    failure = exc
                if failure is not None:
                    # Said to the server before raising: an exception alone, under uvicorn's default --lifespan
                    # auto, read as "lifespan unsupported", and it served on without the host's startup.
                    log.error("the gateway could not start", exc_info=failure)
                    await send(
                        {
                            "type": "lifespan.startup.failed",
                            "message": f"embedgate could not start ({type(failure).__name__}); its log says why",
                        }
                    )
                    raise failure
            elif message["type"] == "lifespan.shutdown":
                stopping.append(True)
            return message

        async def wrapped_send(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                if self.telemetry is not None:
                    self.telemetry.settle()  # the host's startup has run: has it set a TracerProvider?
            elif kind in _HOST_DONE:
                # Opened before the host's startup, closed after its shutdown (or its failed startup, after which
                # no shutdown comes): the host's own startup and shutdown code may use the gateway.
                await self.shutdown()
            await send(message)

        stopping: list[bool] = []
        raised: BaseException | None = None
        try:
            await self.app(scope, wrapped_receive, wrapped_send)
        except GeneratorExit:  # the coroutine closed (its task collected): nothing may be awaited
            raise
        except BaseException as exc:  # a host without lifespan support raises here, after our startup: its startup
            raised = exc  # is all there is (acted on below, outside the handler: see embedgate._native)
        if self.telemetry is not None:
            self.telemetry.settle()
        if stopping and self._open:  # the host's lifespan ended, or raised, without a word on its shutdown
            with anyio.CancelScope(shield=True):  # (a cancelled lifespan's close runs whole, as a cancelled request's)
                await self.shutdown()
        if raised is not None:
            raise raised

    # --- ASGI ------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            root = scope.get("root_path")
            # Mounted under a Mount or --root-path: routes are below it, cut off at a "/" only (as Starlette does: a
            # root path "/v" is no part of "/v1/embeddings")
            if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
                path = path[len(root) :]
            method = scope["method"]
            if method == "POST":
                dialect = self._embed_paths.get(path)
                if dialect is not None:
                    await self._embed(scope, receive, send, dialect)
                    return
            elif method == "GET" or method == "HEAD":  # HEAD: GET's status and headers, no body (RFC 9110)
                handler = self._get_paths.get(path)
                if handler is not None:
                    if not self._open and not await self._opened(send, Dialect.OPENAI):
                        return
                    status, body, headers = await handler(scope)
                    await _send(send, status, body, headers, head=method == "HEAD")
                    return
            if self._standalone and await self._wrong_method(send, method, path):
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _wrong_method(self, send: Send, method: str, path: str) -> bool:
        """Standalone, a path of the gateway asked with a method it does not serve: 405 with ``allow``, in the
        route's error shape. False for any other path (mounted, the host app answers all of these)."""
        dialect = self.dialect_for(path)
        if dialect is None:
            return False
        allow = "POST" if path in self._embed_paths else "GET, HEAD"
        err = MethodNotAllowed(f"{method} is not allowed on {path}; allowed: {allow}")
        await _send(send, err.status, render_error(err, dialect), {"allow": allow}, head=method == "HEAD")
        return True

    def dialect_for(self, path: str) -> Dialect | None:
        """Which API the gateway's route at ``path`` (below any root path) speaks, for its error shape; None for a
        path that is no route of the gateway's (``embedgate serve``'s protocol asks it for the requests it refuses
        before the gateway sees them)."""
        dialect = self._embed_paths.get(path)
        if dialect is None and path in self._get_paths:
            dialect = Dialect.OPENROUTER if path.endswith("/api/v1/embeddings/models") else Dialect.OPENAI
        return dialect

    async def _opened(self, send: Send, dialect: Dialect, scope: Scope | None = None) -> bool:
        """Open the resources on first use (no lifespan ran); if that fails, answer 503 in the route's shape and
        log why (a lifespan startup raises instead, so the server stops). An embedding request (``scope``) gets its
        request and trace ids, its access line and its count in the metrics as any other answer."""
        try:
            # Not the server's lifespan: a mount, or a server run without one. The process may be a host's (a
            # Starlette Mount of create_app()'s app): its GC, allocator and tracer provider are left alone.
            await self._start(False)
        except Exception:
            log.exception("the gateway could not start")
            started = False
        else:
            started = True
            if self.telemetry is not None:
                self.telemetry.settle()
        if not started:  # answered after the handler: compiled, an await inside it loses the exception (mypyc)
            err = Unavailable("The gateway could not start; its log says why", code="gateway_not_started")
            body = render_error(err, dialect)
            if scope is None:
                await _send(send, err.status, body, {})
                return False
            call = Call(dialect=dialect, body=b"", request_id=_request_id(embed_headers(scope["headers"])))
            trace_id = (_getrandbits(128) or 1).to_bytes(16, "big").hex()  # no tracer: a trace id all the same
            out = response_headers(call, len(body), trace_id)
            await send({"type": "http.response.start", "status": err.status, "headers": out})
            await send({"type": "http.response.body", "body": body})
            account(self.metrics, self._access_log, call, err.status, err, time.perf_counter(), trace_id)
        return started

    async def _embed(self, scope: Scope, receive: Receive, send: Send, dialect: Dialect) -> None:
        arrived = time.time_ns()  # the root span starts here: it spans the body's reading too, as the access line
        if not self._open and not await self._opened(send, dialect, scope):
            return
        assert self.pipeline is not None and self.telemetry is not None
        headers = embed_headers(scope["headers"])
        request_id = _request_id(headers)
        identity_id = headers.get("x-orq-identity-id")
        call = Call(
            dialect=dialect,
            body=b"",
            request_id=request_id,
            authorization=headers.get("authorization"),
            identity_header=identity_id or headers.get("x-orq-contact-id"),
            identity_header_name="x-orq-identity-id" if identity_id else "x-orq-contact-id",
            cache_control=headers.get("cache-control"),
        )
        error: GatewayError | None = None
        cancelled: asyncio.CancelledError | None = None
        admitted = False  # holds one of server.max_in_flight's places, until its answer is sent
        limit = self._max_in_flight
        try:
            call.body = await self._read_body(headers, receive)
            if limit:
                if self._admitted >= limit:
                    # Shed once its body is read (a client still sending one, slowly say, holds no place), before
                    # it is parsed: each request admitted holds its body, its upstream calls and its answer. SDKs
                    # retry a 503 after its Retry-After.
                    raise Unavailable(f"The gateway is serving its limit of {limit} requests at once; retry the "
                                      "request", code="gateway_overloaded", headers={"retry-after": "1"})  # fmt: skip
                self._admitted += 1
                admitted = True
            self.pipeline.check_key(call)
            await self.pipeline.normalize(call)
        except GatewayError as err:
            error = err
        except asyncio.CancelledError as exc:  # the server stopping while the body still came: as below
            cancelled = exc
            error = self._cut_short("the request was read")
        except Exception as exc:  # a bug in reading the body: still one answer in the route's shape, and an access line
            if getattr(exc, "status_code", None) == 413:
                # The host's own body limit (FastAPI's max_body_size, Starlette's), raised by its receive(): the
                # client's 413, in the route's shape (it was a 500 "internal error", with a traceback logged).
                error = PayloadTooLarge("The request body is larger than the host app accepts")
            else:
                log.exception("unhandled error", request_id=request_id)
                error = GatewayError("Internal error in the gateway; see its logs for this request id")
        req = call.request
        sent_model: str | None = None
        if req is not None:
            name = req.name or f"embeddings {req.model}"
        else:  # refused as invalid (a 400): named as its body names it, where it does (not so a shed 503's: unparsed)
            if type(error) is InvalidRequest:
                sent_name, sent_model = error.names
            elif type(error) is Unauthorized and len(call.body) <= NAMED_UNAUTHORIZED_BYTES:
                # (refused before its body was parsed: a small one is read for them, which tells whose client
                # sends the wrong key; a large one is not, or a client without a key would cost the parse after all)
                sent_name, sent_model = names_of(call.body)
            else:
                sent_name, sent_model = None, None
            name = sent_name or (f"embeddings {sent_model}" if sent_model is not None else "embeddings")
        with self.telemetry.start_request(name, headers=scope["headers"], attributes=self._http_attributes(scope),
                                          start_time=arrived) as root:  # fmt: skip
            extensions = scope.get("extensions")
            # Standalone, the request's task is the gateway's alone; mounted, the host's middlewares run on in it
            # after the gateway, with their own bindings, which clear_request restores.
            own_task = self._standalone and extensions is not None and REQUEST_TASK in extensions
            # In pieces only to the server's own send: a host middleware around the app (Starlette's GZipMiddleware,
            # say) knows no such message, and dropped it (a 500), or would pass on a body it never saw.
            owner = getattr(send, "__self__", None)
            servers_own = getattr(owner, "scope", None) is scope and type(owner).__name__ == "RequestCycle"
            in_pieces = own_task and extensions is not None and BODY_PARTS in extensions and servers_own
            if own_task:  # the bindings end with the request's task: nothing to undo
                bind_task(request_id=request_id, trace_id=root.trace_id_hex, span_id=root.span_id_hex)
            else:
                bind_request(request_id=request_id, trace_id=root.trace_id_hex, span_id=root.span_id_hex)
            self._in_flight += 1
            try:
                rendered: list[bytes | memoryview] = []
                if error is None:
                    try:
                        await self.pipeline.run(call)
                        rendered = self._render(call)
                    except GatewayError as err:
                        error = err
                    except asyncio.CancelledError as exc:
                        # The server stopping (its graceful shutdown timed out) or the host cancelling: answered in
                        # the route's shape and finished (its reservation released), then cancelled all the same.
                        cancelled = exc
                        error = self._cut_short("the upstream answered")
                    except Exception:  # a bug: still one answer in the route's shape, and the request finished
                        log.exception("unhandled error", request_id=request_id)
                        error = GatewayError("Internal error in the gateway; see its logs for this request id")
                if error is None:
                    status, parts = 200, rendered
                else:
                    status, parts = error.status, [render_error(error, dialect)]
                    call.headers.update(error.headers)
                    if isinstance(error, BudgetExceeded):
                        self.metrics.observe_budget_rejection(error.scope_kind, error.dimension)
                # With its length, the answer goes out as one body (no chunked framing: uvicorn would copy it
                # into chunks, ~2 MB for a 256 batch, and every client would parse the framing); in pieces to a
                # server that takes them (embedgate serve), else joined.
                size = len(parts[0]) if len(parts) == 1 else sum([len(p) for p in parts])
                out = response_headers(call, size, root.trace_id_hex)
                message: dict[str, Any]
                if len(parts) == 1:
                    message = {"type": "http.response.body", "body": parts[0]}
                elif in_pieces:
                    message = {"type": BODY_PARTS, "parts": parts}
                else:
                    message = {"type": "http.response.body", "body": b"".join(parts)}
                send_failed: BaseException | None = None
                try:
                    await send({"type": "http.response.start", "status": status, "headers": out})
                    await send(message)
                except BaseException as exc:  # the client went away: finished all the same, then raised
                    send_failed = exc
                answered = time.perf_counter()  # the access line's latency: the settle below is not the client's
                if admitted:  # (the settle below is no reason to turn the client's next request away)
                    self._admitted -= 1
                    admitted = False
                # After the answer is on its way (none of this changes it): the budget settle (a store round
                # trip), the root span's end (it spans the send, as OTel's ASGI middleware's does), metrics and
                # the access line. Not in a finally block: the build compiles this module, and mypyc's coroutines
                # lose the exception being handled across an await there (see embedgate._native).
                if cancelled is None and not isinstance(send_failed, asyncio.CancelledError):
                    if not call.finish or self.budgets is None or self.budgets.immediate:
                        await self._finish(call, error, request_id)  # (nothing in it waits: nothing to cancel)
                    else:
                        # A host's timeout firing during the settle (a Redis round trip) skipped the access line and
                        # the metrics, and cut the settle off: it runs on, and the request is accounted, then raised.
                        finishing = asyncio.ensure_future(self._finish(call, error, request_id))
                        try:
                            await asyncio.shield(finishing)
                        except asyncio.CancelledError as exc:
                            cancelled = exc
                            self._finishing.add(finishing)  # (the shutdown waits for it)
                            finishing.add_done_callback(self._finishing.discard)
                else:
                    # A host's anyio cancel scope (a timeout middleware's fail_after, Starlette's task groups)
                    # cancels every await of the task from then on, where asyncio's own cancellation came once: the
                    # settle's store round trip was cancelled too, and the request had no access line, no metrics.
                    with anyio.CancelScope(shield=True):
                        await self._finish(call, error, request_id)
                if isinstance(send_failed, OSError) and not isinstance(error, ClientDisconnected):
                    # The client left before its answer went out (a server on ASGI 2.4 says so: embedgate serve's
                    # protocol; uvicorn's says nothing): logged, traced and counted as nginx's 499, with what the
                    # request was billed (its settle above counted the upstream's usage), not as the 200 or the
                    # error (a 502 the upstream's failure made, the 503 of a shutdown) no client received.
                    gone = ClientDisconnected("The client disconnected before its answer was sent")
                    gone.unsent = error  # (its budget refusal stays on the span; its cache lookups are not counted)
                    error = gone
                    status = error.status
                annotate(root, call, error)
                if sent_model is not None:
                    root.set("gen_ai.request.model", sent_model)
                root.end(status, error_type=error.code if error is not None and status >= 500 else None)
                account(self.metrics, self._access_log, call, status, error, answered, root.trace_id_hex,
                        root.span_id_hex, sent_model)  # fmt: skip
                if cancelled is not None:
                    raise cancelled
                if send_failed is not None:
                    raise send_failed
            finally:
                self._in_flight -= 1
                if admitted:
                    self._admitted -= 1
                if not own_task:
                    clear_request()

    def _cut_short(self, before: str) -> Unavailable:
        """The answer of a request whose task was cancelled ``before`` ...: standalone, only the server stopping (its
        graceful shutdown timed out) cancels it; mounted, the host's own timeout or task group may too (its access
        line said the gateway was stopping whenever a host's timeout fired)."""
        if self._standalone:
            return Unavailable(
                f"The gateway stopped before {before}; retry the request",
                code="gateway_stopping",
                headers={"retry-after": "1"},
            )
        return Unavailable(f"The request was cancelled before {before} (the host app's timeout, or the server "
                           "stopping); retry the request", code="request_cancelled")  # fmt: skip

    def _http_attributes(self, scope: Scope) -> dict[str, AttributeValue]:
        """The HTTP server conventions' attributes of an embedding POST's root span (its path is a route's)."""
        path, scheme = scope["path"], scope.get("scheme", "http")
        attrs = self._server_attrs.get((path, scheme))
        if attrs is None:
            attrs = {"http.request.method": "POST", "http.route": path, "url.path": path, "url.scheme": scheme}
            if len(self._server_attrs) < 64:  # a few routes, each under a root path or two: bounded all the same
                self._server_attrs[(path, scheme)] = attrs
        return attrs

    async def _finish(self, call: Call, error: GatewayError | None, request_id: str) -> None:
        """Run the request's finishing steps (its budget settle), each whatever the others do."""
        for finish in call.finish:
            try:
                await finish(call, error)
            except Exception:
                log.exception("finishing the request failed", request_id=request_id)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        ctype = headers.get("content-type")
        if ctype is not None and not _is_json(ctype):
            raise UnsupportedMediaType(
                f"The body must be JSON ('Content-Type: application/json'), got '{ctype[:100]}'",
                param="content-type",
            )
        coding = headers.get("content-encoding")
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            # A compressed body would otherwise fail as "not valid JSON", which does not say what to change.
            raise UnsupportedMediaType(
                f"The body must not be compressed (no Content-Encoding), got '{coding[:100]}'",
                param="content-encoding",
            )
        length = headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > self._max_body:
            raise PayloadTooLarge(f"The body is larger than {self._max_body} bytes", param="body")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("The client disconnected before its request was read")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge(f"The body is larger than {self._max_body} bytes", param="body")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _render(self, call: Call) -> list[bytes | memoryview]:
        """The answer's body, in pieces to be sent in order (one for a float answer, two per vector for base64)."""
        req = call.request
        assert req is not None
        base64 = req.encoding_format == "base64"
        data: Any = None if base64 else [
            {"object": "embedding", "index": i, "embedding": bytes_to_floats(v)}  # type: ignore[arg-type]
            for i, v in enumerate(call.vectors)]  # fmt: skip
        usage: dict[str, Any] = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
        body: dict[str, Any] = {"object": "list", "data": data, "model": call.served_model, "usage": usage}
        if call.dialect is Dialect.OPENROUTER:
            body = {"id": f"emb-{call.request_id}", **body}
            usage["cost"] = round(call.cost_usd, 12)
        out = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        if not base64:
            return [out]
        # The base64 items go in as bytes where orjson wrote "data":null (its first occurrence: only "id", of a
        # request id's safe characters, comes before it): the upstream's own base64 text when it sent one (no
        # second encoding, and no str of ~8 KB per vector for orjson to copy), else the vector encoded here.
        head, tail = out.split(b'"data":null', 1)
        parts: list[bytes | memoryview] = [head, b'"data":[']
        for i, (vector, text) in enumerate(zip(call.vectors, call.b64, strict=True)):
            parts.append(_ITEM_HEAD % i if i else _FIRST_ITEM_HEAD)
            parts.append(text if text is not None else bytes_to_b64(vector))  # type: ignore[arg-type]
        parts.append(b'"}]' if call.vectors else b"]")
        parts.append(tail)
        return parts

    # --- GET endpoints ---------------------------------------------------------------------------------------

    async def _models(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        try:
            ids = self._granted_models(scope)
        except GatewayError as err:
            return err.status, render_error(err, Dialect.OPENAI), err.headers
        data = [{"id": mid, "object": "model", "created": 0, "owned_by": mid.partition("/")[0]} for mid in ids]
        return 200, orjson.dumps({"object": "list", "data": data}), {}

    async def _openrouter_models(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        """``GET /api/v1/embeddings/models``, OpenRouter's list of embedding models (its SDK's
        ``embeddings.list_models()``): the models of ``/v1/models`` in OpenRouter's model shape, priced per token."""
        try:
            ids = self._granted_models(scope)
            # Its pages, as the SDK asks for them (it pages on its own: a page as long as `limit` asks for the next)
            query = _query(scope)
            start = _query_int(query, "offset", 0, 0, 999_999_999)
            limit = _query_int(query, "limit", 0, 1, 1000) if "limit" in query else None
        except GatewayError as err:
            return err.status, render_error(err, Dialect.OPENROUTER), err.headers
        total = len(ids)
        end = total if limit is None else start + limit
        following = f"{scope['path']}?offset={end}&limit={limit}" if limit is not None and end < total else None
        providers = self.config.providers
        data = []
        for mid in ids[start:end]:
            cfg = self.config.models.get(mid)
            deployments = cfg.deployments if cfg is not None else ()
            named = [d.provider for d in deployments] or [mid.partition("/")[0]]
            multimodal = any(providers[p].multimodal for p in named if p in providers)
            # as a request routed by default pays: its first deployment's own price, else the model's
            price = model_price(mid, self.config.models, deployments[0] if deployments else None)
            data.append({
                "id": mid, "canonical_slug": mid, "name": mid, "created": 0, "description": "",
                "context_length": None,
                "architecture": {"modality": "text+image->embeddings" if multimodal else "text->embeddings",
                                 "input_modalities": ["text", "image"] if multimodal else ["text"],
                                 "output_modalities": ["embeddings"]},
                # USD per token, as OpenRouter writes it: a decimal string ("0" when no price is known)
                "pricing": {"prompt": _per_token(price), "completion": "0"},
                "top_provider": {"is_moderated": False, "context_length": None, "max_completion_tokens": None},
                "per_request_limits": None, "supported_parameters": [], "default_parameters": None,
                "supported_voices": None, "links": {"details": ""},
            })  # fmt: skip
        return 200, orjson.dumps({"data": data, "total_count": total, "links": {"next": following}}), {}

    def _granted_models(self, scope: Scope) -> list[str]:
        """The configured models the request's key may use (401 without a valid key): listed ones, and
        ``<provider>/*`` for a provider without any."""
        assert self.pipeline is not None
        keys = self.pipeline.keys
        key = keys.authenticate(_authorization(scope))
        ids = list(self.config.models)
        ids += [f"{p}/*" for p in self.config.providers if not any(m.startswith(f"{p}/") for m in ids)]
        # A provider without listed models: shown to a key granted any model of it ("openai/te-3-*" too)
        return [m for m in ids if keys.allows(key, m) or (m.endswith("/*") and _reaches_some(key.models, m[:-1]))]

    async def _healthz(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        return 200, b'{"status":"ok"}', {}

    async def _metrics_endpoint(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        body, ctype = self.metrics.render(_headers(scope).get("accept"))
        return 200, body, {"content-type": ctype}

    def _admin(self, scope: Scope) -> None:
        digest = self.config.admin.sha256
        if digest is None:
            raise NotFound("The admin endpoints are off: set admin.key (or admin.sha256) in the config",
                           code="not_found")  # fmt: skip
        auth = _authorization(scope) or ""
        if auth == TWO_AUTHORIZATIONS:
            raise Unauthorized("Two different Authorization headers: send one, 'Bearer <admin key>'",
                               param="authorization")  # fmt: skip
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        # No token is no key (as for a client): an admin sha256 of "" (an unset variable hashed) opens nothing.
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(hash_key(token), digest):
            raise Unauthorized("The admin endpoints need 'Authorization: Bearer <admin key>'", param="authorization")

    def _admin_id(self, query: dict[str, str]) -> str | None:
        """The ``id`` asked for: an identity id (up to 256 characters) may come qualified by its workspace."""
        name = query.get("id")
        longest = 256 + 1 + max((len(ws) for ws in self._workspaces), default=0)
        if name is not None and not 0 < len(name) <= longest:
            raise InvalidRequest(f"Invalid 'id': expected 1 to {longest} characters", param="id")
        return name

    async def _admin_usage(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        assert self.budgets is not None
        try:
            self._admin(scope)
            query = _query(scope, ("scope", "id"))
            scope_filter = query.get("scope")
            if scope_filter is not None and scope_filter not in BUDGET_SCOPES:
                # A misspelt scope would otherwise answer an empty list, as if nothing were spent.
                raise InvalidRequest(f"Invalid 'scope': expected one of {', '.join(BUDGET_SCOPES)}, "
                                     f"got {scope_filter[:100]!r}", param="scope")  # fmt: skip
            only_id = self._admin_id(query)
            rows = await self.budgets.usage(scope=scope_filter, only_id=only_id)
        except GatewayError as err:
            return err.status, render_error(err, Dialect.OPENAI), err.headers
        return 200, orjson.dumps({"object": "list", "data": rows}), {}

    async def _admin_identities(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        assert self.identities is not None
        try:
            self._admin(scope)
            query = _query(scope, ("limit", "id"))
            limit = _query_int(query, "limit", 100, 1, 10000)
            name = self._admin_id(query)
            if name is not None:  # "<workspace>/<id>", or an id alone: each workspace's identity of that id
                qualified = self.budgets.qualified_identity(name) if self.budgets is not None else None
                candidates = [qualified] if qualified is not None else [(ws, name) for ws in self._workspaces]
                found_all = [await self.identities.get(ws, iid) for ws, iid in candidates]
                items = [i for i in found_all if i is not None]
            else:
                items = await self.identities.list(limit)
        except GatewayError as err:
            return err.status, render_error(err, Dialect.OPENAI), err.headers
        except ConnectionError:
            down = Unavailable("The identity store is unavailable", code="store_unavailable")
            return down.status, render_error(down, Dialect.OPENAI), {"retry-after": "1"}
        return 200, orjson.dumps({"object": "list", "data": [i.to_dict() for i in items]}), {}

    async def _readyz(self, scope: Scope) -> tuple[int, bytes, dict[str, str]]:
        checks: dict[str, Any] = {}
        # The stores' pings at once, each given READY_WAIT_S: one not answered by then is reported, as slow (it
        # finishes on its own, within its store's timeout, and is not awaited).
        cache_ping = asyncio.ensure_future(self.cache.ping()) if self.cache is not None else None
        store = self.budgets.store if self.budgets is not None else None
        budget_ping = asyncio.ensure_future(store.ping()) if store is not None else None
        pings = [p for p in (cache_ping, budget_ping) if p is not None]
        if pings:
            await asyncio.wait(pings, timeout=READY_WAIT_S)
            for ping in pings:
                if not ping.done():
                    self._pinging.add(ping)
                    ping.add_done_callback(self._pinging.discard)
        if self.cache is not None and cache_ping is not None:
            checks["cache"] = cache_check = {"backend": self.cache.backend, "ok": _answered(cache_ping)}
            if not cache_ping.done():
                cache_check["error"] = f"no answer within {READY_WAIT_S} s"
        if store is not None and budget_ping is not None:
            checks["budgets"] = budget_check = {"backend": "redis" if self.config.redis_url else "memory",
                                                "ok": _answered(budget_ping)}  # fmt: skip
            error = getattr(store, "last_error", None)  # why it is down, where the store says (Redis's reply)
            if not budget_ping.done():
                budget_check["error"] = f"no answer within {READY_WAIT_S} s"
            elif not budget_check["ok"] and isinstance(error, str):
                budget_check["error"] = error
        # Not ready only when requests would be refused: budgets configured, their store down and failing closed. A
        # cache down is a miss, and a budget store down with fail_open (or no budget) refuses nothing: degraded,
        # still served (every replica taken out of its load balancer by one shared Redis would be an outage).
        budgets = checks.get("budgets")
        refusing = budgets is not None and not budgets["ok"] and bool(self.config.budgets)
        refusing = refusing and not self.config.budget_options.fail_open
        # (a ping still out is slow, not known to be down: requests may be served, at a round trip of 0.6 s say)
        refusing = refusing and budget_ping is not None and budget_ping.done()
        status = "unavailable" if refusing else "ready" if all(c["ok"] for c in checks.values()) else "degraded"
        body = {"status": status, "checks": checks, "deployments": self.router.status() if self.router else {}}
        return (503 if refusing else 200), orjson.dumps(body), {}


def _answered(ping: asyncio.Future[bool]) -> bool:
    """Whether a store's ping came back, and said it is up."""
    return ping.done() and not ping.cancelled() and ping.exception() is None and ping.result()


def _query_int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as an integer from ``low`` to ``high`` (``default`` when absent), else a 400
    naming it: blank, "²" (a digit to ``str.isdigit``, not to ``int``), or more digits than ``int`` reads."""
    text = query.get(name)
    if text is None:
        return default
    if text.isascii() and text.isdigit() and len(text) <= len(str(high)) and low <= int(text) <= high:
        return int(text)
    raise InvalidRequest(f"Invalid '{name}': an integer from {low} to {high}", param=name)


def _per_token(price_per_million: float | None) -> str:
    """A price per million tokens as OpenRouter's per-token decimal string (no exponent: "0.00000002")."""
    if not price_per_million:
        return "0"
    return format(Decimal(repr(price_per_million)).scaleb(-6).normalize(), "f")


def _reaches_some(globs: tuple[str, ...] | None, prefix: str) -> bool:
    """Whether one of ``globs`` (fnmatch's) matches some name that starts with ``prefix``: whether the glob cut
    after one of its parts (a character, ``?``, ``*`` or a ``[...]`` set) matches ``prefix`` itself."""
    if globs is None:
        return True
    for glob in globs:
        parts: list[str] = []
        i = 0
        while i < len(glob):
            end = i + 1
            if glob[i] == "[":  # a set, to its "]" (one right after "[" or "[!" is a member), else a plain "["
                j = i + 1 + (glob[i + 1 : i + 2] == "!")
                close = glob.find("]", j + 1)
                if close != -1:
                    end = close + 1
            parts.append(glob[i:end])
            i = end
        if any(fnmatch.fnmatchcase(prefix, "".join(parts[:k])) for k in range(1, len(parts) + 1)):
            return True
    return False


def _query(scope: Scope, known: tuple[str, ...] | None = None) -> dict[str, str]:
    """The query's parameters (the last of a repeated one); with ``known``, any other is a 400: a misspelt filter
    (``?ID=``, ``?workspace=``) would otherwise answer the whole listing as if it were the one asked for."""
    from urllib.parse import parse_qsl

    # Blank values kept: "?id=" (an operator's script with an empty variable) is refused, not the whole listing.
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    if known is not None:
        for name in query:
            if name not in known:
                raise InvalidRequest(f"Unknown query parameter {name[:100]!r}: expected {' or '.join(known)}",
                                     param=name[:100])  # fmt: skip
    return query


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _authorization(scope: Scope) -> str | None:
    """The request's ``Authorization``; :data:`TWO_AUTHORIZATIONS` when it sent two different ones."""
    found: str | None = None
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            text = value.decode("latin-1")
            found = text if found is None else one_authorization(found, text)
    return found


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
    """A whole answer; ``head``: the body's length announced, no body sent (a HEAD request's answer)."""
    ctype = headers.pop("content-type", None)
    out = [
        (b"content-type", ctype.encode()) if ctype else JSON_CONTENT_TYPE,
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json`` or a ``+json`` type, any parameters (a charset)."""
    if content_type == "application/json":  # what every SDK sends: no parsing
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _request_id(headers: dict[str, str]) -> str:
    """The client's ``x-request-id`` if it is a sane one, else a new one."""
    rid = headers.get("x-request-id")
    return rid if rid and _REQUEST_ID.fullmatch(rid) else _getrandbits(128).to_bytes(16, "big").hex()


class GatewayLifespan:
    """What :meth:`EmbeddingGateway.lifespan` returns: an async context manager that opens the gateway on entry
    (its tracer then follows the host's provider, if set by then) and closes it on exit (access lines written,
    spans exported)."""

    def __init__(self, gateway: EmbeddingGateway) -> None:
        self._gateway = gateway

    async def __aenter__(self) -> None:
        await self._gateway._start(False)
        if self._gateway.telemetry is not None:
            self._gateway.telemetry.settle()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._gateway.shutdown()
