"""Span export in a helper process: the gateway hands finished spans over a pipe, the helper encodes and sends.

Encoding spans for OTLP is the largest single cost of tracing in Python, and it would run under the gateway's
GIL. A standalone gateway therefore runs its exporters (the ones ``OTEL_TRACES_EXPORTER`` names, configured by the
same environment) in a child process:

    LeanTracerProvider --packed spans--> SpanPipe --frames on stdin--> python -m embedgate.span_export
    (embedgate.lean_trace)                                              (OTLP exporters: the request encoded
                                                                         directly, embedgate.otlp_encode; others:
                                                                         rebuilt ReadableSpans)

A frame is a 4-byte little-endian length and a ``marshal``-ed list of packed spans (the helper runs the same
interpreter; marshal writes such a frame ~2x faster than orjson, reads it ~9x faster, and in a tenth of the bytes,
as repeated strings go once); a packed span is the list

    [name, trace_id >> 64, trace_id & (2**64 - 1), span_id, trace_flags, [parent_span_id, parent_is_remote] | None,
     kind, start_ns, end_ns, {attributes}, [status_code, description], [[event name, ns, {attributes}], ...],
     [scope name, scope version] | None]

of plain str, int, float, bool, None, lists, tuples and dicts (the lean tracer keeps attribute ints within int64).
The child exits when its stdin closes, after flushing; if it dies, spans are dropped (logged once), never the
gateway's requests.
"""

from __future__ import annotations

import gc
import logging
import marshal
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Final

import structlog
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

__all__ = ["SpanPipe", "unpack"]

_log = structlog.get_logger("embedgate.telemetry")
_LENGTH = struct.Struct("<I")
_LINGER_S = 0.5  # how long an export waits for more frames to fill its batch
_MAX_BACKLOG = 16 << 20  # bytes of frames waiting for a full pipe (~40k spans) before new ones are dropped


def _tuples(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}


def unpack(data: list[Any], resource: Any) -> ReadableSpan:
    """The ReadableSpan that :func:`pack` packed, under ``resource``."""
    name, high, low, span_id, flags, parent, kind, start, end, attrs, status, events, scope = data
    trace_id = (high << 64) | low
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags)),
        parent=None
        if parent is None
        else SpanContext(trace_id, parent[0], is_remote=parent[1], trace_flags=TraceFlags(flags)),
        resource=resource,
        attributes=_tuples(attrs),
        events=[Event(n, _tuples(a), ts) for n, ts, a in events],
        kind=SpanKind(kind),
        status=Status(StatusCode(status[0]), status[1]),
        start_time=start,
        end_time=end,
        instrumentation_scope=None if scope is None else InstrumentationScope(scope[0], scope[1]),
    )


def _encodable(span: list[Any]) -> bool:
    try:
        marshal.dumps(span)
    except ValueError:
        return False
    return True


class SpanPipe:
    """The helper process running the exporters named as in ``OTEL_TRACES_EXPORTER``, and the pipe to it."""

    def __init__(self, exporters: Sequence[str], service_name: str, *, ready_timeout_s: float = 15.0) -> None:
        ready_read, ready_write = os.pipe()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "embedgate.span_export", ",".join(exporters), service_name, str(ready_write)],
                stdin=subprocess.PIPE,
                env=os.environ.copy(),
                pass_fds=(ready_write,),
            )
        finally:
            os.close(ready_write)
        self._pipe: IO[bytes] = self._child.stdin  # type: ignore[assignment]
        # Written without blocking: a frame is handed over from the request path itself (the event loop's
        # thread), which must never wait for the helper. What the pipe does not take at once waits in
        # ``_backlog`` (always whole frames after a partly written one), drained by ``drain``.
        self._fd = self._pipe.fileno()
        os.set_blocking(self._fd, False)
        self._backlog = bytearray()
        self.max_backlog = _MAX_BACKLOG
        #: Spans dropped because the backlog was full (the helper fell behind).
        self.dropped = 0
        self._lock = threading.Lock()
        self._broken = False
        # Wait for the exporters to be built (imports take a second or two): spans of the first requests would
        # otherwise pile up in a pipe nobody reads yet, and overflow the queue under load.
        try:
            ready, _, _ = select.select([ready_read], [], [], ready_timeout_s)
            if not ready or os.read(ready_read, 1) != b"R":
                _log.warning("the span export process is not ready; spans wait for it", timeout_s=ready_timeout_s)
        finally:
            os.close(ready_read)

    @property
    def backlog(self) -> int:
        """Bytes handed over but not yet taken by the pipe."""
        return len(self._backlog)

    def write(self, spans: list[list[Any]]) -> bool:
        """Hand one frame of packed spans to the helper without blocking; False once the helper is gone.

        When the pipe is full the frame waits in the backlog; beyond ``max_backlog`` bytes it is dropped and
        counted in ``dropped`` (the helper fell behind: spans, never requests, pay for it)."""
        if self._broken:
            return False
        try:
            payload = marshal.dumps(spans)
        except ValueError:  # an object marshal does not know (a span name of a str subclass, say): drop those spans
            kept = [span for span in spans if _encodable(span)]
            _log.warning("spans dropped: a value cannot be encoded", dropped=len(spans) - len(kept))
            payload = marshal.dumps(kept)
        frame = _LENGTH.pack(len(payload)) + payload
        with self._lock:
            if len(self._backlog) + len(frame) > self.max_backlog:
                self.dropped += len(spans)
                return True
            self._backlog += frame  # then written at once, as far as the pipe takes it
            self._send_backlog()
            return not self._broken

    def _send_backlog(self) -> None:
        # with self._lock held
        try:
            sent = os.write(self._fd, self._backlog)
        except BlockingIOError:
            return
        except (BrokenPipeError, OSError, ValueError):
            self._gone()
            return
        del self._backlog[:sent]

    @property
    def broken(self) -> bool:
        """Whether the helper is gone (its pipe closed): spans are dropped from then on, as logged once."""
        return self._broken

    def _gone(self) -> None:
        if not self._broken:
            self._broken = True
            self._backlog.clear()
            self._child.poll()  # reaped, if it has exited: no zombie until shutdown
            _log.warning("the span export process is gone; spans are dropped from now on")

    def drain(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until the pipe has taken the backlog; True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._backlog and not self._broken:
                    self._send_backlog()
                if not self._backlog or self._broken:
                    return not self._backlog
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                select.select([], [self._fd], [], left)
            except (OSError, ValueError):
                return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Hand over the backlog, close the pipe: the helper exports what it holds and exits, within ``timeout_s``
        in all; past that it is stopped, and a warning says its spans are lost (a slow or unreachable collector)."""
        deadline = time.monotonic() + timeout_s
        handed = self.drain(timeout_s)
        with self._lock:
            try:
                self._pipe.close()
            except OSError:
                pass
        try:
            self._child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
            _log.warning("the span export helper had not finished exporting at shutdown (a slow or unreachable "
                         "collector?): stopped; the spans it still held are lost", timeout_s=timeout_s)  # fmt: skip
        if not handed:
            _log.warning("spans not handed to the export helper by shutdown are lost")


class _Encoded(list[Any]):
    """Packed spans, with the OTLP request already encoded from them (see :func:`_encode_directly`): its wire
    bytes, and the exporter's message object parsed from them when an exporter needs one (gRPC's does)."""

    __slots__ = ("_message", "data")

    def __init__(self, spans: list[Any], data: bytes) -> None:
        super().__init__(spans)
        self.data = data
        self._message: Any = None

    @property
    def message(self) -> Any:
        """The ``ExportTraceServiceRequest`` of :attr:`data` (parsed once, when first asked for)."""
        if self._message is None:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            self._message = ExportTraceServiceRequest.FromString(self.data)
        return self._message


class _Wire:
    """What the OTLP/HTTP exporter gets from ``encode_spans`` for an :class:`_Encoded` batch: it only serializes
    the message, and these are its bytes, with no parse and second serialization (~9% of this process's CPU).
    Anything else asked of it is the parsed message's."""

    __slots__ = ("_encoded",)

    def __init__(self, encoded: _Encoded) -> None:
        self._encoded = encoded

    def SerializePartialToString(self, **_options: Any) -> bytes:  # protobuf's names, as the exporter calls them
        return self._encoded.data

    def SerializeToString(self, **_options: Any) -> bytes:
        return self._encoded.data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoded.message, name)


_HTTP_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_GRPC_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"


def _encode_directly() -> set[str]:
    """Make the OTLP exporters (HTTP and gRPC) take :class:`_Encoded` batches as they are.

    Their ``export`` hands the spans to the module's ``encode_spans`` and sends what it returns; wrapping that
    function lets an ``_Encoded`` batch through with its ready bytes (HTTP, which only serializes what it gets)
    or message (gRPC, whose stub serializes a real message), and any other batch is encoded as before.
    Returns the modules wrapped (only in this helper process: nothing else runs here).
    """
    wrapped = set()
    for name in (_HTTP_EXPORTER, _GRPC_EXPORTER):
        module = sys.modules.get(name)  # imported by the exporters built, if they are OTLP ones
        original = getattr(module, "encode_spans", None)
        if original is None:
            continue

        if name == _HTTP_EXPORTER:

            def encode_spans(spans: Any, _original: Any = original) -> Any:
                return _Wire(spans) if isinstance(spans, _Encoded) else _original(spans)

        else:

            def encode_spans(spans: Any, _original: Any = original) -> Any:
                return spans.message if isinstance(spans, _Encoded) else _original(spans)

        module.encode_spans = encode_spans  # type: ignore[union-attr]
        wrapped.add(name)
    return wrapped


def _yield_to_requests() -> Callable[[], object] | None:
    """Lower this process's priority (nice +10), and return the call that hands the CPU to a waiting process
    (``os.sched_yield``), for the encoder to make between spans and the export before it posts.

    The gateway's requests come first. An export is a few milliseconds of CPU (512 spans encoded, then the POST):
    on a kernel that does not preempt a running process's user code at once (``PREEMPT_NONE``, as on the benchmark
    machine), a process woken on the helper's core (the gateway's client, its upstream, the gateway itself) waited
    for the export to end. Measured on 2 cores, a miss at 1 connection: p99 2.2-2.6 ms -> 0.7-0.8 ms; at 16
    connections 4,670-4,770 -> 4,900-5,010 req/s. At nice +10 the helper still gets ~10% of a core a busy
    process leaves it (an idle-priority helper would get next to nothing on a saturated machine, and drop spans)."""
    nice = getattr(os, "nice", None)  # POSIX, as sched_yield
    if nice is not None:
        try:
            nice(10)
        except OSError:  # not permitted (a sandbox's policy, say): the yields still help
            pass
    return getattr(os, "sched_yield", None)


def _serve(exporter_names: str, service_name: str, ready_fd: int) -> None:
    import signal

    from opentelemetry.sdk.trace.export import SpanExporter as _SpanExporter

    from .lean_trace import _env_int
    from .otlp_encode import encode_request
    from .telemetry import _exporter, _resource

    # A signal to the whole process group (Ctrl-C, a service manager's SIGTERM) must not kill this process
    # before the gateway's last flush: it ends when the gateway closes the pipe (or dies), after exporting.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pause = _yield_to_requests()
    resource = _resource(service_name)
    exporters: list[_SpanExporter] = [_exporter(n) for n in exporter_names.split(",") if n]
    direct = _encode_directly()
    # What this process allocates from now on is the packed spans of a batch or two, acyclic, freed by reference
    # counting once exported: the cyclic collector only walked them, again and again (~12% of its CPU under load).
    # The start-up objects are frozen out of it and it runs 70x less often; a rare cycle (an exporter's error, say)
    # is still collected.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    batch_size = max(1, int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "") or 512))
    linger_s = min(_LINGER_S, max(0, _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000)) / 1000)
    stdin = sys.stdin.fileno()

    def read_exact(n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = os.read(stdin, n - got)
            if not chunk:
                return None  # the gateway closed the pipe (or died)
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read_frame() -> list[Any] | None:
        head = read_exact(_LENGTH.size)
        payload = None if head is None else read_exact(_LENGTH.unpack(head)[0])
        return None if payload is None else marshal.loads(payload)

    def export(packed: list[Any]) -> None:
        encoded: _Encoded | None = None
        spans: list[ReadableSpan] | None = None
        for exporter in exporters:
            if type(exporter).__module__ in direct:
                if encoded is None:
                    encoded = _Encoded(packed, encode_request(packed, resource.attributes, pause))
                batch: list[Any] = encoded  # a list of packed spans, with what the wrapped encoder returns
            else:
                if spans is None:
                    spans = [unpack(item, resource) for item in packed]
                batch = spans
            if pause is not None:
                pause()
            try:
                exporter.export(batch)
            except Exception:  # as the SDK's processor does: one exporter's failure loses its batch, nothing more
                logging.getLogger("embedgate.span_export").exception("an exporter failed; its spans are lost")

    try:
        # The gateway writes small frames (short bursts under its GIL). An export gathers frames for up to
        # _LINGER_S (never longer than the schedule delay) until it holds OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans:
        # posting each 64-span frame on its own cost ~half of this process's CPU in the exporter's HTTP client.
        open_ = True
        while open_:
            frame = read_frame()
            if frame is None:
                break
            pending = frame
            deadline = time.monotonic() + linger_s
            while len(pending) < batch_size:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([stdin], [], [], wait)[0]:
                    break
                frame = read_frame()
                if frame is None:
                    open_ = False
                    break
                pending.extend(frame)
            for start in range(0, len(pending), batch_size):
                export(pending[start : start + batch_size])
    finally:
        for exporter in exporters:
            exporter.shutdown()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
