"""A lean OpenTelemetry tracer for the standalone gateway: spans that cost microseconds.

The SDK's ``Span`` does more per span than a gateway needs: a lock per attribute write, a sampler call,
span limits, processor fan-out, then a second copy for export. Measured on the 2-core benchmark machine, six
SDK spans (one request's trace) cost ~370 us of CPU, more than the whole request of a bare aiohttp proxy. This
tracer implements the OpenTelemetry *API* (so context propagation, ``traceparent`` and any instrumentation
that uses the global provider keep working) and records a span as a few fields; on ``end`` it packs them into
the list format of :mod:`embedgate.span_export` and queues it. Every 64 spans, the thread that ends the 64th
writes them to the export helper process's pipe without blocking; there the SDK's own exporters (OTLP over HTTP
or gRPC, console, entry points) send them. A thread writes what is left in quiet moments.

Semantics kept from the SDK:

- Sampling: the sampler of ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (as the SDK reads them)
  decides at a trace's local root (no parent, or a remote one from ``traceparent``); the spans below it follow
  that decision, as ``parentbased_*`` samplers do. Sampled-out spans are non-recording and cost next to nothing.
- Batching: ``OTEL_BSP_SCHEDULE_DELAY`` (ms, default 5000), ``OTEL_BSP_MAX_QUEUE_SIZE`` (2048: spans beyond it
  are dropped and counted) and ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (512, the most spans in one export request).
  Spans go to the helper in frames of 64 as soon as that many are queued; the helper gathers the frames waiting
  in the pipe into one export, up to the batch size. When the helper falls behind, frames wait in a bounded
  backlog (16 MiB), then are dropped and counted: the request path never waits for the helper.
- Attribute values: str, bool, int, float and sequences of them; anything else is dropped, never raised, and so is
  an int outside int64 (OTLP has no wider int). Subclasses (an IntEnum) are kept as their plain type. A NaN or
  infinite float is exported as it is, as the SDK's encoder does.

Links are not recorded, and ``record_exception`` records the exception's type only (its message may quote a
client's input or an upstream's answer).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Final, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Decision, Sampler
from opentelemetry.trace import (
    INVALID_SPAN,
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue

from .current_span import current_span
from .span_export import SpanPipe

__all__ = ["LeanSpan", "LeanTracer", "LeanTracerProvider"]

_log = structlog.get_logger("embedgate.telemetry")
# Final: the compiled build keeps these in C variables (a plain module global is a dict lookup on every use).
_LOW: Final = (1 << 64) - 1
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_INT64_MIN: Final = -(1 << 63)  # OTLP's int64: an int attribute outside it is dropped
_INT64_END: Final = 1 << 63
# The SDK's span limits, as OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT / OTEL_ATTRIBUTE_COUNT_LIMIT and
# OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT set them (read by the SDK's SpanLimits when a provider is made): attributes a
# span keeps, and the length its str values are cut to (None: as they are).
_max_attributes = 128
_max_length: int | None = None
# An event's: OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT (128), and OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT alone (not the span's).
_max_event_attributes = 128
_max_event_length: int | None = None
_UNSET: Final = StatusCode.UNSET.value
_NO_STATUS: Final[list[Any]] = [_UNSET, None]  # shared by every span whose status is never set (only read)
_NO_EVENTS: Final[list[list[Any]]] = []  # shared likewise until a span's first event
_FRAME_SPANS: Final = 64  # spans per frame handed to the helper (measured: 64 vs 512 cut the p99 by half under load)
_time_ns: Final = time.time_ns
getrandbits: Final = random.getrandbits
_DEFAULT_ON: Final = DEFAULT_ON
_NO_TRACE_STATE: Final = TraceState()  # immutable: shared by the root spans without a caller's trace state
_INVALID_SPAN: Final = INVALID_SPAN
_INVALID_CONTEXT: Final = INVALID_SPAN_CONTEXT


def _plain(value: object) -> bool:
    """Whether ``value`` is kept as it is: a str, bool or float, or an int within int64."""
    kind = type(value)
    if kind is str or kind is bool or kind is float:
        return True
    if type(value) is int:
        return _INT64_MIN <= value < _INT64_END
    return False


def _clean(value: Any) -> Any:
    """The value as an OTel attribute value of plain types (what the hand-off carries), or None to drop it."""
    kind = type(value)
    if kind is int:
        return value if _INT64_MIN <= value < _INT64_END else None  # OTLP has no wider int
    if kind is str or kind is bool or kind is float:
        return value
    if isinstance(value, int):  # an IntEnum, another int subclass (bool cannot be subclassed)
        return _clean(int(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = tuple(_clean(v) for v in value if not isinstance(v, (list, tuple, dict)))
        return items if len(items) == len(value) and None not in items else None
    return None


def _cut(value: Any, limit: int | None) -> Any:
    """``value`` with its str parts cut to ``limit`` characters, as the SDK cuts them."""
    if limit is None or value is None:
        return value
    if type(value) is str:
        return value[:limit]
    if type(value) is tuple:
        return tuple([v[:limit] if type(v) is str else v for v in value])
    return value


def _put(attrs: dict[str, Any], key: str, value: Any, most: int) -> None:
    """Set an attribute as the SDK's bounded attributes do: on a full span, a new key evicts the oldest."""
    if key not in attrs and len(attrs) >= most:
        if most <= 0:
            return
        del attrs[next(iter(attrs))]
    attrs[key] = value


def _clean_all(attributes: Attributes, most: int, limit: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if attributes:
        for key, value in attributes.items():
            v = _cut(value if _plain(value) else _clean(value), limit)
            if v is not None:
                _put(out, key, v, most)
    return out


def _span_attributes(attributes: Attributes) -> dict[str, Any]:
    if type(attributes) is dict and _max_length is None and len(attributes) <= _max_attributes:
        for value in attributes.values():
            if not _plain(value):
                break
        else:
            return attributes.copy()  # the usual: a few plain values, as they are
    return _clean_all(attributes, _max_attributes, _max_length)


class LeanSpan(Span):
    """A recording span: its fields, packed once on ``end`` and queued for export."""

    __slots__ = ("_attrs", "_ctx", "_end", "_events", "_head", "_span_id", "_start", "_status", "_trace_id",
                 "_trace_state", "_tracer")  # fmt: skip

    def __init__(self, tracer: LeanTracer, name: str, trace_id: int, span_id: int, trace_state: TraceState,
                 parent: list[Any] | None, kind: SpanKind, attrs: dict[str, Any], start: int) -> None:  # fmt: skip
        self._tracer = tracer
        self._trace_id = trace_id
        self._span_id = span_id
        self._trace_state = trace_state
        self._ctx: SpanContext | None = None  # built when asked for: child spans read the ints above
        # name, trace id halves, span id, flags, [parent span id, parent is remote], kind: see span_export
        name = name if type(name) is str else str(name)  # a str subclass would not pass the hand-off
        # kind._value_: the member's value, without Enum's Python-level property (or its __hash__ for a dict lookup)
        self._head = [name, trace_id >> 64, trace_id & _LOW, span_id, 1, parent, kind._value_]
        self._attrs = attrs
        self._start = start
        self._end: int | None = None
        self._status = _NO_STATUS
        self._events = _NO_EVENTS

    def get_span_context(self) -> SpanContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = SpanContext(self._trace_id, self._span_id, False, _SAMPLED, self._trace_state)
        return ctx

    def w3c_headers(self) -> dict[str, str]:
        """What OTel's W3C trace-context propagator writes for this span (sampled, its ids valid), without
        building its ``SpanContext``."""
        tid, sid = self._trace_id.to_bytes(16, "big").hex(), self._span_id.to_bytes(8, "big").hex()  # no format specs
        carrier = {"traceparent": f"00-{tid}-{sid}-01"}
        if self._trace_state:
            carrier["tracestate"] = self._trace_state.to_header()
        return carrier

    def is_recording(self) -> bool:
        return self._end is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end is None:
            v = _cut(value if _plain(value) else _clean(value), _max_length)
            if v is not None:
                _put(self._attrs, key, v, _max_attributes)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._end is None:
            attrs = self._attrs
            most, limit = _max_attributes, _max_length
            for key, value in attributes.items():
                v = _cut(value if _plain(value) else _clean(value), limit)
                if v is not None:
                    _put(attrs, key, v, most)

    def set_plain(self, attributes: dict[str, Any]) -> None:
        """``set_attributes`` for a dict: a value of a plain type (str, bool, float, an int within int64) is stored
        as it is, in one update when all are plain and the span has room; the rest go through ``set_attribute``."""
        if self._end is not None:
            return
        attrs = self._attrs
        if _max_length is None and len(attrs) + len(attributes) <= _max_attributes:
            for value in attributes.values():
                if not _plain(value):
                    break
            else:
                attrs.update(attributes)  # (in order: a full span evicts its oldest, as the SDK's)
                return
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self._end is None:
            if self._events is _NO_EVENTS:
                self._events = []
            self._events.append([name, timestamp or _time_ns(),
                                 _clean_all(attributes, _max_event_attributes, _max_event_length)])  # fmt: skip

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Links are not recorded (see the module docstring)."""

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._head[0] = name if type(name) is str else str(name)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end is None and self._status[0] != StatusCode.OK.value:  # OK is final, as in the SDK
            code = status.status_code if isinstance(status, Status) else status
            if isinstance(status, Status):
                description = status.description
            if code is not StatusCode.UNSET:
                self._status = [code.value, description if code is StatusCode.ERROR else None]

    def record_exception(self, exception: BaseException, attributes: Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:  # fmt: skip
        """An ``exception`` event with the exception's type only."""
        self.add_event("exception", {"exception.type": type(exception).__name__, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        end = self._end = end_time or _time_ns()
        tracer = self._tracer
        packed = [*self._head, self._start, end, self._attrs, self._status, self._events, tracer.scope]
        provider = tracer.provider
        if type(provider) is LeanTracerProvider:
            provider.enqueue(packed)  # typed here: a direct call in the compiled build, not a Python method call
        else:
            provider.enqueue(packed)

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None:  # fmt: skip
        if exc_val is not None and self._end is None:
            self.record_exception(exc_val)
            self.set_status(Status(StatusCode.ERROR))
        self.end()


class SpanSink(Protocol):
    """Where a tracer's ended spans go: :class:`LeanTracerProvider`, or a test's stand-in."""

    sampler: Sampler

    def enqueue(self, packed: list[Any]) -> None: ...


class LeanTracer(trace.Tracer):
    """Starts :class:`LeanSpan`\\ s for one instrumentation scope."""

    def __init__(self, provider: SpanSink, scope: list[str | None]) -> None:
        self.provider = provider
        self.scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        current = current_span(context)
        if type(current) is LeanSpan:  # the common case, a child of one of ours: sampled, ids at hand
            attrs = _span_attributes(attributes) if attributes else {}
            return LeanSpan(self, name, current._trace_id, getrandbits(64) or 1, current._trace_state,
                            [current._span_id, False], kind, attrs, start_time or _time_ns())  # fmt: skip
        # No span in the context at all (a request without traceparent): no parent, without asking the API's
        # INVALID_SPAN for its context and that context's is_valid (Python, four times a root span).
        parent = _INVALID_CONTEXT if current is _INVALID_SPAN else current.get_span_context()
        valid = parent is not _INVALID_CONTEXT and parent.is_valid
        if valid and not parent.is_remote:
            # Another local parent (a non-recording span, a host's span): its trace's decision stands.
            if not parent.trace_flags.sampled:
                return NonRecordingSpan(SpanContext(parent.trace_id, getrandbits(64) or 1, False, _NOT_SAMPLED,
                                                    parent.trace_state))  # fmt: skip
            attrs = _span_attributes(attributes) if attributes else {}
            return LeanSpan(self, name, parent.trace_id, getrandbits(64) or 1, parent.trace_state,
                            [parent.span_id, False], kind, attrs, start_time or _time_ns())  # fmt: skip
        trace_id = parent.trace_id if valid else (getrandbits(128) or 1)
        if self.provider.sampler is _DEFAULT_ON:
            # The SDK's default sampler, ParentBased(ALWAYS_ON), decided here as it decides (its Python costs
            # ~1 us a root span): a remote parent's flag, else sampled; the parent's trace state; the attributes.
            if valid and not parent.trace_flags.sampled:
                return NonRecordingSpan(SpanContext(trace_id, getrandbits(64) or 1, False, _NOT_SAMPLED,
                                                    parent.trace_state))  # fmt: skip
            return LeanSpan(self, name, trace_id, getrandbits(64) or 1,
                            parent.trace_state if valid else _NO_TRACE_STATE,
                            [parent.span_id, True] if valid else None,  # here a valid parent is remote
                            kind, _span_attributes(attributes), start_time or _time_ns())  # fmt: skip
        result = self.provider.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        trace_state = result.trace_state if result.trace_state is not None else TraceState()
        if result.decision is not Decision.RECORD_AND_SAMPLE:
            return NonRecordingSpan(SpanContext(trace_id, getrandbits(64) or 1, False, _NOT_SAMPLED, trace_state))
        attrs = _span_attributes(result.attributes or attributes)
        packed_parent = [parent.span_id, True] if valid else None  # here a valid parent is remote
        return LeanSpan(self, name, trace_id, getrandbits(64) or 1, trace_state, packed_parent, kind, attrs,
                        start_time or _time_ns())  # fmt: skip

    # The API declares its own (private) context-manager type; contextlib's behaves the same.
    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        except BaseException as exc:
            if span.is_recording():
                # The type only, also in the status: trace.use_span would put the message there.
                if record_exception:
                    span.record_exception(exc)
                if set_status_on_exception:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            otel_context.detach(token)
            if end_on_exit:
                span.end()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {raw!r}")
    return value


class LeanTracerProvider(trace.TracerProvider):
    """The standalone gateway's tracer provider: lean spans, batched to the export helper process.

    ``exporters`` are the names of ``OTEL_TRACES_EXPORTER``; the helper builds them from the same environment.
    """

    def __init__(self, exporters: Sequence[str], service_name: str) -> None:
        #: The sampler the SDK would use, read from OTEL_TRACES_SAMPLER[_ARG] by the SDK itself, and its span limits.
        self.sampler: Sampler = SdkTracerProvider(shutdown_on_exit=False).sampler
        global _max_attributes, _max_length, _max_event_attributes, _max_event_length
        limits = SpanLimits()
        most = limits.max_span_attributes
        _max_attributes = most if most is not None else 1 << 62
        _max_length = limits.max_span_attribute_length
        most = limits.max_event_attributes
        _max_event_attributes = most if most is not None else 1 << 62
        _max_event_length = limits.max_attribute_length
        self._delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)  # validated here; the helper process batches its exports
        # Frames to the helper stay small: serializing one holds the GIL, and a long hold stalls requests.
        self._batch = min(_FRAME_SPANS, self._max_queue)
        self._queue: deque[list[Any]] = deque()
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        self._closed = False
        self.dropped = 0
        self._reported_drops = 0  # spans dropped (here and in the pipe) already told in a warning
        self._pipe = SpanPipe(exporters, service_name)
        self._worker = threading.Thread(target=self._run, name="embedgate-span-export", daemon=True)
        self._worker.start()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        return LeanTracer(self, [instrumenting_module_name, instrumenting_library_version])

    def enqueue(self, packed: list[Any]) -> None:
        """Queue one ended span (called by ``LeanSpan.end``); a full queue drops it.

        A full frame is handed to the helper right here, by the thread that ended the span (the event loop's,
        in the gateway): the pipe write does not block, and waking a thread for it cost more than the write
        (measured: ~50 us per request of CPU, most of it from the two threads passing the GIL back and forth).
        The thread only writes the partial frame of a quiet moment (every schedule delay) and, when the helper
        falls behind, waits for the pipe to take the backlog."""
        queue = self._queue
        if len(queue) >= self._max_queue or self._closed:
            self.dropped += 1
            return
        queue.append(packed)
        if len(queue) >= self._batch and self._flush_lock.acquire(blocking=False):
            try:
                self._write_frames()
            finally:
                self._flush_lock.release()
            if self._pipe.backlog and not self._wake.is_set():
                self._wake.set()

    def _write_frames(self) -> bool:
        # with self._flush_lock held
        queue, batch = self._queue, self._batch
        while queue:
            spans = [queue.popleft() for _ in range(min(batch, len(queue)))]
            if not self._pipe.write(spans):
                self.dropped += len(spans) + len(queue)
                queue.clear()  # the helper is gone (logged once): keep the queue from filling for nothing
                return False
        return True

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            try:
                self.force_flush(int(self._delay_s * 1000))
            except Exception:  # never let the export thread die: later spans would only pile up and drop
                _log.exception("exporting spans failed")
            self._report_drops()

    def _report_drops(self) -> None:
        """Warn of the spans dropped since the last warning, while it happens (at most once a schedule delay)."""
        dropped = self.dropped + self._pipe.dropped
        if dropped > self._reported_drops and self._pipe.broken:  # told once, when it went: not each delay
            self._reported_drops = dropped
        elif dropped > self._reported_drops:
            _log.warning("spans dropped: the export queue was full or the helper fell behind",
                         dropped=dropped - self._reported_drops, dropped_total=dropped)  # fmt: skip
            self._reported_drops = dropped

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Hand every queued span to the helper, waiting up to ``timeout_millis`` for the pipe to take them."""
        with self._flush_lock:
            if not self._write_frames():
                return False
        return self._pipe.drain(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Flush, stop the thread and let the helper export what it holds and exit."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._worker.join(timeout=10)
        # Bounded, as a server's shutdown is (an orchestrator's grace period): 5 s to hand the queue over, then
        # up to 10 s for the helper's last exports (SpanPipe.close); past that they are lost, and the log says so.
        self.force_flush(5000)
        dropped = self.dropped + self._pipe.dropped
        if dropped:
            _log.warning("spans dropped: the export queue was full or the helper fell behind", dropped=dropped)
        self._pipe.close()
