"""OpenTelemetry tracing for the request pipeline: one trace per request (SPEC section 8).

    Telemetry        owns the tracer (injected provider, the host's global one, or one built from OTEL_* env)
    RequestSpan      the SERVER root span: continues the caller's W3C traceparent; ``with`` makes it current
    StageSpan        an INTERNAL child span per pipeline stage (auth, budget, cache, routing)
    AttemptSpan      a CLIENT span per upstream attempt: the OTel GenAI attributes, the headers to inject

The helpers take only the values listed in their signatures, and ``set`` accepts only the attribute names in
``ALLOWED_ATTRIBUTES``: a span never carries an API key, a provider key or the input text.
Everything on the hot path is a few attribute writes: the tracer is fetched once, and nothing is built
for a span that is not recording.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from contextvars import Token
from importlib.metadata import entry_points
from random import getrandbits
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from .current_span import attach_root, attach_span, current_span, detach, has_baggage, is_inherited_root
from .lean_trace import LeanSpan, LeanTracer

if TYPE_CHECKING:
    from .lean_trace import LeanTracerProvider

__all__ = [
    "ALLOWED_ATTRIBUTES",
    "AttemptSpan",
    "RequestSpan",
    "StageSpan",
    "Telemetry",
    "build_tracer_provider",
]

_log = logging.getLogger(__name__)

#: Every attribute name ``RequestSpan.set``, ``StageSpan.set`` and ``start_request(attributes=...)`` accept, and
#: the names the attempt span sets (fixed in code: set without the check, which would cost each attempt).
#: An allow-list rather than a deny-list, so that a secret or the input text cannot slip in under a new name.
ALLOWED_ATTRIBUTES: Final = frozenset(
    {
        # HTTP server semantic conventions (no url.query: a client may put a key there)
        "http.request.method",
        "http.route",
        "http.response.status_code",
        "url.path",
        "url.scheme",
        "server.address",
        "server.port",
        "client.address",
        "user_agent.original",
        "error.type",
        # GenAI conventions, for the request as a whole
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.request.encoding_formats",
        "gen_ai.embeddings.dimension.count",
        "gen_ai.provider.name",  # the attempt span's
        # embedgate's own
        "embedgate.request_id",
        "embedgate.route",
        "embedgate.model",
        "embedgate.served_model",
        "embedgate.provider",
        "embedgate.deployment",
        "embedgate.cache",
        "embedgate.cache.hits",
        "embedgate.cache.misses",
        "embedgate.key_id",
        "embedgate.workspace",
        "embedgate.project",
        "embedgate.identity_id",
        "embedgate.budget.decision",
        "embedgate.budget.scope",
        "embedgate.budget.target",
        "embedgate.budget.dimension",
        "embedgate.input_count",
        "embedgate.dimensions",
        "embedgate.encoding_format",
        "embedgate.usage.input_tokens",
        "embedgate.cost_usd",
        "embedgate.billed_tokens",
        "embedgate.attempts",
        "embedgate.fallback_index",
        "embedgate.error.code",
        "embedgate.attempt",  # the attempt span's
        "embedgate.outcome",
    }
)

_TRACER_NAME = "embedgate"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class _Propagation:
    """The global propagator last checked, and whether it was OTel's default."""

    __slots__ = ("checked", "is_w3c")

    def __init__(self) -> None:
        self.checked: object = None
        self.is_w3c = False


# Final: the compiled build keeps these in C variables (a plain module global is a dict lookup on every use).
_PROPAGATION: Final = _Propagation()
_get_global_textmap: Final = propagate.get_global_textmap
_SERVER: Final = SpanKind.SERVER
_INTERNAL: Final = SpanKind.INTERNAL
_CLIENT: Final = SpanKind.CLIENT
_INVALID_SPAN: Final = trace.INVALID_SPAN
_NO_CONTEXT: Final = Context()  # an empty context: a span started in it has no parent


def _default_propagation() -> bool:
    """Whether the global propagator is OTel's default: W3C trace context, then W3C baggage (checked once per
    propagator object: a host may install its own at any time)."""
    propagator = _get_global_textmap()
    seen = _PROPAGATION
    if propagator is not seen.checked:
        parts = getattr(propagator, "_propagators", None) if type(propagator) is CompositePropagator else None
        seen.is_w3c = parts is not None and [type(p) for p in parts] == [
            TraceContextTextMapPropagator,
            W3CBaggagePropagator,
        ]
        seen.checked = propagator
    return seen.is_w3c


def _check(key: str) -> None:
    if key not in ALLOWED_ATTRIBUTES:
        raise ValueError(f"span attribute {key!r} is not in embedgate.telemetry.ALLOWED_ATTRIBUTES")


def _error_type(exc: BaseException) -> str:
    """A low-cardinality name for an exception: a GatewayError's code, else its class (never its message)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__name__


def _is_server_fault(exc: BaseException) -> bool:
    # A GatewayError below 500 (a 4xx such as a budget refusal) is the client's doing, not a span error.
    status = getattr(exc, "status", 500)
    return not isinstance(status, int) or status >= 500


class _Scoped:
    """Shared by the span wrappers: ``with`` makes the span current so later spans parent to it."""

    __slots__ = ("_ended", "_recording", "_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        # A lean span is asked directly: through the API's Span type the call is a Python method call.
        self._recording = span._end is None if type(span) is LeanSpan else span.is_recording()
        self._token: Token[Context] | None = None
        self._ended = False

    @property
    def context(self) -> Context:
        """A context holding this span, to parent spans explicitly (e.g. from another task)."""
        return trace.set_span_in_context(self._span)

    @property
    def is_recording(self) -> bool:
        """Whether attributes set on this span are kept (false with a no-op provider or when sampled out)."""
        return self._recording

    def set(self, key: str, value: AttributeValue) -> None:
        """Set one attribute; ``key`` must be in ``ALLOWED_ATTRIBUTES`` (ValueError otherwise)."""
        _check(key)
        if self._recording:
            self._span.set_attribute(key, value)

    def set_many(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Set several attributes in one call (one lock round in the SDK); keys as for :meth:`set`."""
        if not ALLOWED_ATTRIBUTES.issuperset(attributes):
            for key in attributes:
                _check(key)
        if self._recording:
            span = self._span
            if type(span) is LeanSpan and type(attributes) is dict:
                span.set_plain(attributes)  # one dict update, not the API's call per attribute
            else:
                span.set_attributes(attributes)

    def __enter__(self) -> Self:
        self._attach()
        return self

    def _attach(self) -> None:
        self._token = attach_span(self._span)

    def _detach(self) -> None:
        if self._token is not None:
            detach(self._token)
            self._token = None


class RequestSpan(_Scoped):
    """The SERVER root span of one request; use it as ``with span:`` around the pipeline, then ``end``."""

    __slots__ = ("span_id_hex", "trace_id_hex")

    def __init__(self, span: Span) -> None:
        super().__init__(span)
        if type(span) is LeanSpan:  # its ids at hand, without building its SpanContext (Python in the OTel API)
            trace_id, span_id = span._trace_id, span._span_id
        else:
            ctx = span.get_span_context()
            trace_id, span_id = ctx.trace_id, ctx.span_id
        #: 32 lowercase hex chars, for ``x-embedgate-trace-id`` and the logs.
        self.trace_id_hex = trace_id.to_bytes(16, "big").hex()  # as format(trace_id, "032x"), at half its cost
        #: 16 lowercase hex chars, for the logs.
        self.span_id_hex = span_id.to_bytes(8, "big").hex()

    def _attach(self) -> None:
        self._token = attach_root(self._span)

    def rename(self, name: str) -> None:
        """Name the span anew (before it ends)."""
        if self._recording:
            self._span.update_name(name)

    def end(self, status_code: int, *, error_type: str | None = None) -> None:
        """End the span with the HTTP status answered; a 5xx (or an ``error_type``) marks it as an error."""
        if self._ended:
            return
        self._ended = True
        if self._recording:
            span = self._span
            span.set_attribute("http.response.status_code", status_code)
            if error_type is not None or status_code >= 500:
                span.set_attribute("error.type", error_type or str(status_code))
            if status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
        self._span.end()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        if not self._ended:
            # The pipeline escaped without answering: what the client sees is a 500.
            self.end(500, error_type=_error_type(exc) if exc is not None else None)


class StageSpan(_Scoped):
    """An INTERNAL span around one pipeline stage; made current for its duration, unless it was started with
    ``current=False`` (a stage that starts no span of its own needs no context of its own)."""

    __slots__ = ("_current",)

    def __init__(self, span: Span, current: bool = True) -> None:
        super().__init__(span)
        self._current = current

    def __enter__(self) -> Self:
        if self._current:
            self._attach()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        span = self._span
        if exc is not None and self._recording:
            # Only the error's code or class: its message may quote the input or an upstream's reply.
            span.set_attribute("error.type", _error_type(exc))
            if _is_server_fault(exc):
                span.set_status(Status(StatusCode.ERROR))
        if type(span) is LeanSpan:
            span.end()  # typed LeanSpan here: a direct call in the compiled build
        else:
            span.end()


class AttemptSpan(_Scoped):
    """A CLIENT span for one upstream call; ``succeed`` or ``fail`` it, then ``end`` (or use ``with``)."""

    __slots__ = ("_settled",)

    def __init__(self, span: Span) -> None:
        super().__init__(span)
        self._settled = False

    def trace_headers(self) -> dict[str, str]:
        """The propagation headers (``traceparent``, ...) carrying this attempt's context, for upstream."""
        if _default_propagation() and not has_baggage():
            # What the default propagators write (W3C trace context; baggage, here empty), without their layers.
            if type(self._span) is LeanSpan:
                return self._span.w3c_headers()
            ctx = self._span.get_span_context()
            if ctx == trace.INVALID_SPAN_CONTEXT:
                return {}
            carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
            if ctx.trace_state:
                carrier["tracestate"] = ctx.trace_state.to_header()
            return carrier
        carrier = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier

    def asked_for(self, encoding_format: str) -> None:
        """The format the call asked of the upstream in the end (one that refused base64 was asked for floats)."""
        if self._recording:
            self._span.set_attribute("gen_ai.request.encoding_formats", (encoding_format,))

    def succeed(
        self,
        *,
        response_model: str | None = None,
        input_tokens: int | None = None,
        dimension_count: int | None = None,
        status_code: int = 200,
    ) -> None:
        """Record a successful upstream answer: the model it names, its token usage, the vector length."""
        self._settled = True
        if not self._recording:
            return
        attributes: dict[str, AttributeValue] = {
            "embedgate.outcome": "success",
            "http.response.status_code": status_code,
        }
        if response_model is not None:
            attributes["gen_ai.response.model"] = response_model
        if input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = input_tokens
        if dimension_count is not None:
            attributes["gen_ai.embeddings.dimension.count"] = dimension_count
        self._span.set_attributes(attributes)

    def fail(self, error_type: str, *, status_code: int | None = None, outcome: str = "error") -> None:
        """Record a failed attempt.

        ``error_type`` is low-cardinality: the upstream status as a string (``"503"``) or a short name
        (``"timeout"``, ``"connect_error"``), never a message. ``outcome`` says what the router does next:
        ``"retry"``, ``"fallback"`` or ``"error"`` (given up).
        """
        self._settled = True
        if not self._recording:
            return
        span = self._span
        span.set_attribute("error.type", error_type)
        span.set_attribute("embedgate.outcome", outcome)
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        span.set_status(Status(StatusCode.ERROR))

    def end(self) -> None:
        """End the span (idempotent)."""
        if not self._ended:
            self._ended = True
            self._span.end()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        if exc is not None and not self._settled:
            self.fail(_error_type(exc))
        self.end()


class Telemetry:
    """The gateway's tracer, and the factory of its request, stage and attempt spans.

    ``tracer_provider`` wins when given. Otherwise, mounted (``standalone=False``), the global provider is
    used, through OTel's proxy, so a provider the host app installs even after this object exists is picked
    up; and when the OTel environment names an exporter (``build_tracer_provider``), a provider is built from it
    here (a bad variable fails here, at start-up) and kept for :meth:`settle`, which uses it (owned, not
    installed as the global one: the host's is left alone) if the host has set none by then. Standalone, when
    nobody installed a global provider yet, one is built from the OTel environment variables, installed as the
    global provider and owned: ``shutdown`` flushes only that one.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        service_name: str = "embedgate",
        standalone: bool = False,
        export_process: bool = False,
    ) -> None:
        self._owned: SdkTracerProvider | LeanTracerProvider | None = None
        self._pending: SdkTracerProvider | LeanTracerProvider | None = None
        unset = tracer_provider is None and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        if unset and not standalone:
            self._pending = build_tracer_provider(service_name)
        elif unset:
            built = build_tracer_provider(service_name, export_process=export_process)
            if built is not None:
                trace.set_tracer_provider(built)
                if trace.get_tracer_provider() is built:
                    self._owned = built
                else:  # another thread installed one first: use it, drop ours
                    built.shutdown()
        if tracer_provider is not None:
            self._tracer = tracer_provider.get_tracer(_TRACER_NAME)
        else:
            self._tracer = trace.get_tracer(_TRACER_NAME)
        # The lean tracer, when it is ours: its start_span called directly (through the API's Tracer type it is a
        # Python call with keyword arguments). Not so for a proxy tracer, which must follow a later provider.
        self._lean: LeanTracer | None = self._tracer if type(self._tracer) is LeanTracer else None
        self._propagator: object | None = None
        self._fields: frozenset[bytes] = frozenset()

    def settle(self) -> None:
        """Mounted, once the host app has started (its lifespan's startup, or the first request without one): the
        provider built from the environment is used if the host has set no global provider, else dropped."""
        built = self._pending
        if built is None:
            return
        self._pending = None
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            self._owned = built
            self._tracer = built.get_tracer(_TRACER_NAME)
            self._lean = None
        else:
            built.shutdown()

    @property
    def owns_provider(self) -> bool:
        """Whether this object built (and so will shut down) its tracer provider."""
        return self._owned is not None

    def start_request(
        self,
        name: str,
        *,
        headers: Iterable[tuple[bytes, bytes]],
        attributes: Mapping[str, AttributeValue] | None = None,
        start_time: int | None = None,
    ) -> RequestSpan:
        """Start the SERVER root span ``name``, continuing a W3C ``traceparent`` in the ASGI ``headers``; from
        ``start_time`` (ns since the epoch, the request's arrival) if given, else now.

        When a span is already current (a host's own OTel ASGI middleware), it is the parent instead: it has
        already continued the caller's trace. ``attributes`` keys must be in ``ALLOWED_ATTRIBUTES``.
        """
        if attributes and not ALLOWED_ATTRIBUTES.issuperset(attributes):
            for key in attributes:
                _check(key)
        parent: Context | None = None
        current = current_span()
        if current is _INVALID_SPAN or not current.get_span_context().is_valid:  # the first: no Python to ask it
            parent = self._extract(headers)
        elif is_inherited_root(current):
            # A root span of the gateway's own, current where uvicorn's protocols start a pipelined request (in its
            # predecessor's context): no parent, each request is a trace of its own (the caller's, if it sent one).
            parent = self._extract(headers, _NO_CONTEXT) or _NO_CONTEXT
        lean = self._lean
        if lean is not None:
            span: Span = lean.start_span(name, parent, _SERVER, attributes, None, start_time)
        else:
            span = self._tracer.start_span(name, context=parent, kind=_SERVER, attributes=attributes,
                                           start_time=start_time)  # fmt: skip
        if type(span) is not LeanSpan and not span.get_span_context().is_valid:  # a LeanSpan's ids are valid
            # No SDK anywhere and no caller trace: a random, unsampled context still gives the response
            # header, the logs and the upstream traceparent one shared trace id.
            span = NonRecordingSpan(
                SpanContext(
                    trace_id=getrandbits(128) or 1,
                    span_id=getrandbits(64) or 1,
                    is_remote=False,
                    trace_flags=TraceFlags(TraceFlags.DEFAULT),
                )
            )
        return RequestSpan(span)

    def stage(self, name: str, *, current: bool = True) -> StageSpan:
        """An INTERNAL child span of the current span, for ``with telemetry.stage("budget") as s: ...``.

        With ``current=False`` the span is not made current: a span started within the stage would be its sibling,
        not its child. For stages that start none: attaching a span to the context and detaching it cost nearly as
        much as the span itself."""
        lean = self._lean
        span = (
            lean.start_span(name, None, _INTERNAL)
            if lean is not None
            else self._tracer.start_span(name, kind=_INTERNAL)
        )
        return StageSpan(span, current)

    def attempt(
        self,
        *,
        provider: str,
        request_model: str,
        server_address: str,
        attempt: int,
        fallback_index: int,
        deployment: str,
        encoding_format: str,
        server_port: int | None = None,
    ) -> AttemptSpan:
        """Start the CLIENT span of one upstream attempt, child of the current span, with GenAI attributes.

        ``provider`` is the provider's ``gen_ai.provider.name``, ``request_model`` the model id sent upstream,
        ``server_address`` the upstream host (``server_port`` its port), ``attempt`` counts from 1 within a model,
        ``fallback_index`` is 0 for the requested model and n for the n-th fallback, ``encoding_format`` the
        format asked of the upstream.
        """
        lean = self._lean
        name = f"embeddings {request_model}"
        span = lean.start_span(name, None, _CLIENT) if lean is not None else self._tracer.start_span(name, kind=_CLIENT)
        if span.is_recording():
            if "@" in server_address:  # never let userinfo from a base URL through
                server_address = server_address.rsplit("@", 1)[1]
            attributes: dict[str, AttributeValue] = {
                "gen_ai.operation.name": "embeddings",
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": request_model,
                "gen_ai.request.encoding_formats": (encoding_format,),
                "server.address": server_address,
                "embedgate.attempt": attempt,
                "embedgate.fallback_index": fallback_index,
                "embedgate.deployment": deployment,
            }
            if server_port is not None:
                attributes["server.port"] = server_port
            span.set_attributes(attributes)  # one call
        return AttemptSpan(span)

    def shutdown(self) -> None:
        """Flush and shut down the tracer provider, only if this object built it."""
        if self._pending is not None:
            self._pending.shutdown()
            self._pending = None
        if self._owned is not None:
            self._owned.shutdown()
            self._owned = None

    def _extract(self, headers: Iterable[tuple[bytes, bytes]], base: Context | None = None) -> Context | None:
        """The caller's trace context in ``headers`` (on ``base``, else the current context), None if none."""
        propagator = _get_global_textmap()
        if propagator is not self._propagator:
            # The host may install its own propagator (B3, ...) after us: follow it, computing fields once.
            self._fields = frozenset(field.lower().encode("latin-1") for field in propagator.fields)
            self._propagator = propagator
        fields = self._fields
        carrier: dict[str, str] = {}
        for key, value in headers:
            key = key.lower()
            if key in fields:
                carrier[key.decode("latin-1")] = value.decode("latin-1")
        if not carrier:
            return None
        return propagator.extract(carrier, context=base)


def build_tracer_provider(
    service_name: str = "embedgate", *, export_process: bool = False
) -> SdkTracerProvider | LeanTracerProvider | None:
    """A TracerProvider configured from the standard OTel environment variables, or None for no tracing.

    ``OTEL_TRACES_EXPORTER``: comma-separated ``otlp``, ``console``, ``none`` or an installed exporter's
    entry point name. When it is unset and no ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` is set either, the
    default is ``none`` (unlike the SDK's ``otlp``), so a gateway with no collector does not log an export
    failure every few seconds. ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf`` (default) or
    ``grpc``; endpoints, headers, timeouts and compression are read by the exporters themselves.
    ``OTEL_SERVICE_NAME`` and a ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` win over ``service_name``.
    ``OTEL_SDK_DISABLED=true`` and exporter ``none`` return None. Raises ValueError for an unknown exporter or
    protocol. Sampling (``OTEL_TRACES_SAMPLER``) and batching (``OTEL_BSP_*``) are read by the SDK.
    With ``export_process`` the provider is embedgate's lean one (``embedgate.lean_trace``: same sampling and
    batching variables, spans that cost microseconds) and the exporters run in a helper process
    (``embedgate.span_export``), off this GIL; without it, the SDK's provider with a ``BatchSpanProcessor``.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        names = "otlp" if any(env.get(var, "").strip() for var in _ENDPOINT_VARS) else "none"
    chosen = [name for name in (n.strip().lower() for n in names.split(",")) if name != "none"]
    if not chosen:
        return None
    if export_process:
        from .lean_trace import LeanTracerProvider

        for name in chosen:
            _check_exporter(name)  # fail at start-up, here, not in the helper
        return LeanTracerProvider(chosen, service_name)  # the helper builds the resource from the same environment
    provider = SdkTracerProvider(resource=_resource(service_name))
    for exporter in [_exporter(name) for name in chosen]:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _check_exporter(name: str) -> None:
    if name == "console":
        return
    if name == "otlp":
        _otlp_protocol()
        return
    if not entry_points(group="opentelemetry_traces_exporter", name=name):
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")


def _otlp_protocol() -> str:
    env = os.environ
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported {protocol!r} (http/protobuf or grpc)")
    return protocol


def _resource(service_name: str) -> Resource:
    env = os.environ
    items = env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    named = bool(env.get("OTEL_SERVICE_NAME", "").strip()) or any(
        item.split("=", 1)[0].strip() == SERVICE_NAME for item in items
    )
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes passed to it would win.
    return Resource.create({} if named else {SERVICE_NAME: service_name})


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = _otlp_protocol()
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter()
    for entry_point in entry_points(group="opentelemetry_traces_exporter", name=name):
        exporter: SpanExporter = entry_point.load()()
        return exporter
    raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
