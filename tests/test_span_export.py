"""The standalone tracer (``embedgate.lean_trace``) and its export helper process (``embedgate.span_export``):
spans keep every field through the hand-off, reach a real OTLP receiver, follow the sampler, and a full queue
or a dead helper drops spans without failing anything."""

from __future__ import annotations

import enum
import marshal
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import structlog.testing
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from embedgate import lean_trace
from embedgate.lean_trace import LeanTracer, LeanTracerProvider
from embedgate.span_export import SpanPipe, unpack
from tests.otlp_receiver import OtlpReceiver


class Captured:
    """Stands in for the provider behind a tracer: keeps what ``LeanSpan.end`` queues."""

    def __init__(self, sampler: Any = None) -> None:
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        self.sampler = sampler or ParentBased(ALWAYS_ON)
        self.packed: list[list[Any]] = []

    def enqueue(self, packed: list[Any]) -> None:
        self.packed.append(packed)


def record(tracer: trace.Tracer) -> None:
    with tracer.start_as_current_span("root-name", kind=SpanKind.SERVER, attributes={"embedgate.cache": "hit"}):
        with tracer.start_as_current_span("embeddings m", kind=SpanKind.CLIENT) as attempt:
            attempt.set_attributes({"gen_ai.request.encoding_formats": ["base64"], "embedgate.attempt": 2,
                                    "embedgate.cost_usd": 1.5e-7, "flag": True})  # fmt: skip
            attempt.set_attribute("not.a.value", {"a": 1})  # type: ignore[arg-type]  # dropped, never raised
            attempt.add_event("retry", {"why": "503"})
            attempt.set_status(Status(StatusCode.ERROR, "upstream 503"))


def test_spans_keep_every_field_through_the_hand_off() -> None:
    sink = Captured()
    record(LeanTracer(sink, ["embedgate", "1.2.3"]))  # type: ignore[arg-type]
    resource = Resource.create({"service.name": "t"})
    spans = {s.name: s for s in (unpack(marshal.loads(marshal.dumps(p)), resource) for p in sink.packed)}
    root, attempt = spans["root-name"], spans["embeddings m"]
    assert root.parent is None and attempt.parent is not None
    assert attempt.parent.span_id == root.context.span_id
    assert attempt.context.trace_id == root.context.trace_id > 2**64  # all 128 bits survive
    assert (root.kind, attempt.kind) == (SpanKind.SERVER, SpanKind.CLIENT)
    assert dict(root.attributes or {}) == {"embedgate.cache": "hit"}
    assert dict(attempt.attributes or {}) == {"gen_ai.request.encoding_formats": ("base64",), "embedgate.attempt": 2,
                                              "embedgate.cost_usd": 1.5e-7, "flag": True}  # fmt: skip
    assert (attempt.status.status_code, attempt.status.description) == (StatusCode.ERROR, "upstream 503")
    assert [(e.name, dict(e.attributes or {})) for e in attempt.events] == [("retry", {"why": "503"})]
    # the other span's event and status stay its own (spans without any share their empty defaults)
    assert not root.events and root.status.status_code is StatusCode.UNSET
    assert root.start_time is not None and root.end_time is not None
    assert root.start_time <= attempt.start_time <= attempt.end_time <= root.end_time  # type: ignore[operator]
    assert attempt.instrumentation_scope is not None
    assert (attempt.instrumentation_scope.name, attempt.instrumentation_scope.version) == ("embedgate", "1.2.3")
    assert attempt.context.trace_flags.sampled


def test_an_exception_leaves_its_type_never_its_message() -> None:
    sink = Captured()
    tracer = LeanTracer(sink, ["embedgate", None])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        with tracer.start_as_current_span("failing"):
            raise RuntimeError("sk-secret-in-a-message")
    span = unpack(sink.packed[0], Resource.create({}))
    assert span.status.status_code is StatusCode.ERROR
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("exception", {"exception.type": "RuntimeError"})
    ]
    assert "sk-secret" not in orjson.dumps(sink.packed).decode()


def test_sampling_decides_at_the_root_and_children_follow() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

    off = Captured(ParentBased(ALWAYS_OFF))
    tracer = LeanTracer(off, ["embedgate", None])  # type: ignore[arg-type]
    with tracer.start_as_current_span("root") as root:
        with tracer.start_as_current_span("child") as child:
            assert not root.is_recording() and not child.is_recording()
            assert child.get_span_context().trace_id == root.get_span_context().trace_id  # ids still propagate
    assert off.packed == []

    # A remote parent's sampled flag wins under a parent-based sampler, whatever the root sampler says.
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with tracer.start_as_current_span("continued", context=trace.set_span_in_context(NonRecordingSpan(remote))):
        pass
    assert [p[0] for p in off.packed] == ["continued"]
    assert off.packed[0][5] == [0xDEF, True]  # parent span id, remote

    half = Captured(TraceIdRatioBased(0.5))
    tracer = LeanTracer(half, ["embedgate", None])  # type: ignore[arg-type]
    for _ in range(200):
        with tracer.start_as_current_span("root"):
            with tracer.start_as_current_span("child"):
                pass
    names = [p[0] for p in half.packed]
    assert names.count("root") == names.count("child")  # never a child without its root
    assert 40 < names.count("root") < 160


def test_the_default_sampler_decides_as_the_sdk_does() -> None:
    """The SDK's default sampler (``DEFAULT_ON``, ParentBased(ALWAYS_ON)) is decided by the tracer itself: the same
    outcome as asking it, for a root, a sampled remote parent and an unsampled one, trace state included."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, DEFAULT_ON, ParentBased
    from opentelemetry.trace.span import TraceState

    state = TraceState([("vendor", "v1")])
    parents = [
        None,
        SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=state),
        SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT), trace_state=state),
    ]

    def outcome(sampler: Any, parent: SpanContext | None) -> tuple[Any, ...]:
        sink = Captured(sampler)
        context = None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
        span = LeanTracer(sink, ["embedgate", None]).start_span(  # type: ignore[arg-type]
            "root", context=context, kind=SpanKind.SERVER, attributes={"embedgate.cache": "hit"}
        )
        ctx = span.get_span_context()
        span.end()
        packed = [(p[0], p[5], p[6], p[9]) for p in sink.packed]
        return type(span).__name__, ctx.trace_id if parent else None, ctx.trace_state, packed

    for parent in parents:
        assert outcome(DEFAULT_ON, parent) == outcome(ParentBased(ALWAYS_ON), parent)
    assert outcome(DEFAULT_ON, parents[1])[2] == state  # a caller's trace state carries on
    assert outcome(DEFAULT_ON, parents[2])[3] == []  # an unsampled caller: nothing recorded
    assert outcome(DEFAULT_ON, None)[3] == [("root", None, SpanKind.SERVER.value, {"embedgate.cache": "hit"})]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_the_helper_process_exports_to_a_real_receiver(monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    # The OTLP/HTTP exporter sends the bytes the helper encoded (no message object in between): compressed too.
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", compression)
        provider = LeanTracerProvider(["otlp"], "span-export-test")
        record(provider.get_tracer("embedgate", "1.2.3"))
        provider.shutdown()  # flushes; the helper exports before it exits
        got = {s.name: s for s in receiver.wait_for_spans(2)}
    root, attempt = got["root-name"], got["embeddings m"]
    assert root.trace_id == attempt.trace_id and len(root.trace_id) == 32
    assert attempt.parent_span_id == root.span_id and root.parent_span_id == ""
    assert (root.kind, attempt.kind, attempt.status) == ("SERVER", "CLIENT", "ERROR")
    assert attempt.attributes["embedgate.attempt"] == 2
    assert list(attempt.attributes["gen_ai.request.encoding_formats"]) == ["base64"]
    assert root.resource["service.name"] == "span-export-test"
    assert attempt.scope == "embedgate"


def test_the_sdk_s_span_limits_apply_as_the_sdk_applies_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT and OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT were ignored by the standalone tracer
    # (128 attributes, values whole), where the SDK's tracer (mounted) applies them: a client's 256-character
    # identity id went out whole past a backend's limit. A full span keeps the newest attributes, as the SDK's;
    # an event has limits of its own.
    for name in ("_max_attributes", "_max_length", "_max_event_attributes", "_max_event_length"):
        monkeypatch.setattr(lean_trace, name, getattr(lean_trace, name))  # put back after the test
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "6")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    monkeypatch.setenv("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "2")
    provider = LeanTracerProvider(["otlp"], "limits")
    provider.shutdown()

    def drive(span: trace.Span) -> None:
        span.set_attribute("b", ["abcdef", "xy"])
        span.set_attributes({"c": 7, "d": "the span is full: the oldest goes"})
        span.set_attribute("a", "overwritten in place")
        span.set_attribute("e", 1.5)
        span.add_event("ev", {"e2": 1, "e3": 2, "e1": "x" * 30})
        span.end()

    sink = Captured()
    lean = LeanTracer(sink, ["embedgate", None]).start_span("s", attributes={"a": "u" * 200})  # type: ignore[arg-type]
    drive(lean)
    sdk = SdkTracerProvider().get_tracer("t").start_span("s", attributes={"a": "u" * 200})
    drive(sdk)
    (packed,) = sink.packed
    assert packed[9] == dict(sdk.attributes or {}) == {"d": "the ", "a": "over", "e": 1.5}
    assert packed[11][0][2] == dict(sdk.events[0].attributes or {}) == {"e3": 2, "e1": "xxxxxx"}


def test_the_helper_gathers_small_frames_into_full_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway hands spans over in frames of 64; posting each one alone cost the helper half its CPU.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "256")
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        pipe = SpanPipe(["otlp"], "gather")
        packed = [["s", 0, i + 1, i + 1, 1, None, 0, 1, 2, {}, [0, None], [], None] for i in range(64)]
        for _ in range(10):  # 640 spans, a frame every 20 ms (as under load)
            assert pipe.write(packed)
            time.sleep(0.02)
        pipe.close()  # the helper exports what it holds, then exits
        assert len(receiver.wait_for_spans(640)) == 640
        assert receiver.requests == 3  # 256 + 256 + 128, not one request per frame


def test_a_full_queue_drops_and_counts_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    provider = LeanTracerProvider(["otlp"], "full")
    tracer = provider.get_tracer("embedgate")
    with provider._flush_lock:  # the export thread is busy writing: the request path does not wait for it
        for _ in range(10):
            tracer.start_span("s").end()
    assert provider.dropped == 6
    provider.shutdown()


def test_dropped_spans_are_told_while_it_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only at shutdown: an operator sees spans go missing while the gateway runs (at most once a schedule delay).
    import embedgate.lean_trace as lean_trace

    told: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            told.append((event, fields))

        def exception(self, event: str, **fields: Any) -> None:
            raise AssertionError(event)

    monkeypatch.setattr(lean_trace, "_log", Log())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # the helper's exports to nowhere give up fast
    provider = LeanTracerProvider(["otlp"], "told")
    try:
        tracer = provider.get_tracer("embedgate")
        with provider._flush_lock:
            for _ in range(10):
                tracer.start_span("s").end()
        deadline = time.monotonic() + 5
        while not told and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a few more schedule delays: nothing new was dropped, nothing more is told
        assert told == [("spans dropped: the export queue was full or the helper fell behind",
                         {"dropped": 6, "dropped_total": 6})]  # fmt: skip
    finally:
        provider.shutdown()


def test_spans_a_dead_helper_cannot_take_are_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    provider = LeanTracerProvider(["otlp"], "dead")
    provider._pipe._child.kill()
    provider._pipe._child.wait(10)
    tracer = provider.get_tracer("embedgate")
    for _ in range(10):
        tracer.start_span("s").end()  # every 4th hands a frame over, to a closed pipe
    assert provider.dropped == 8 and len(provider._queue) == 2
    with structlog.testing.capture_logs() as logged:
        provider._report_drops()  # the export thread's turn: the death was told once, not again each delay
    assert logged == []  # it read "the export queue was full or the helper fell behind" each schedule delay
    provider.shutdown()
    assert provider.dropped == 10


def test_a_stalled_helper_never_blocks_the_request_path(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
        provider = LeanTracerProvider(["otlp"], "stalled")
        provider._pipe.max_backlog = 512 * 1024
        tracer = provider.get_tracer("embedgate")
        child = provider._pipe._child
        os.kill(child.pid, signal.SIGSTOP)  # reads nothing: the pipe fills, then the backlog
        try:
            started = time.monotonic()
            for i in range(20_000):
                tracer.start_span("s", attributes={"embedgate.request_id": f"{i:064d}"}).end()
            elapsed = time.monotonic() - started
            assert provider._pipe.dropped > 0  # the backlog filled: later frames were dropped, and counted
            assert provider._pipe.backlog <= 512 * 1024
        finally:
            os.kill(child.pid, signal.SIGCONT)
        provider.shutdown()  # hands the backlog over; the helper exports it and exits
        kept = 20_000 - provider._pipe.dropped - provider.dropped
        assert len(receiver.wait_for_spans(kept)) == kept
    assert elapsed < 5  # a blocking write to the stopped reader would have waited for ever


def test_bad_batching_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "lots")
    with pytest.raises(ValueError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        LeanTracerProvider(["otlp"], "bad")


def test_a_dead_helper_drops_spans_without_failing_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    pipe = SpanPipe(["otlp"], "dead")
    os.kill(pipe._child.pid, signal.SIGKILL)  # not waited for here: the pipe reaps it when it finds it gone
    time.sleep(0.3)
    packed = [["s", 0, 1, 2, 1, None, 0, 1, 2, {}, [0, None], [], None]]
    assert [pipe.write(packed) for _ in range(3)] == [False] * 3
    assert pipe.broken and pipe._child.returncode is not None  # no zombie until shutdown
    pipe.close()


def test_direct_otlp_encoding_is_what_the_sdk_encoder_writes() -> None:
    """The helper encodes packed spans itself; every span must come out byte for byte as the SDK's encoder
    writes it from the same span (ids, kinds, times, every attribute type, events, status, remote flags)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from embedgate.otlp_encode import encode_request

    attrs = {"s": "ünïcode", "i": 7, "neg": -5, "big": 2**63 - 1, "f": 0.25, "t": True, "no": False,
             "arr": ["base64", "float"], "ints": [1, 2]}  # fmt: skip
    packed = [
        ["embeddings x", 2**63 + 123, 456, 789 + i, 1, None if i % 3 == 0 else [5, i % 2 == 0], i % 5,
         10**18 + i, 10**18 + 1000 + i, attrs if i % 4 == 0 else {"a": i % 3 if i % 2 else i % 3 == 1},
         [2, "boom"] if i % 4 == 0 else [1, None] if i % 4 == 1 else [0, None],
         [["exception", 10**18 + 5, {"exception.type": "X"}]] if i % 7 == 0 else [],
         ["embedgate", "1.0"] if i % 2 else ["other", None]]
        for i in range(40)
    ]  # fmt: skip
    packed = marshal.loads(marshal.dumps(packed))  # as the helper reads them
    resource = Resource.create({"service.name": "svc", "deployment.environment": "test"})
    first = encode_request(packed, resource.attributes)
    # again, with the encoder's cache of attribute fields warm: 1 and True, 0 and False must not be taken for
    # each other (they are equal as dict keys)
    assert encode_request(packed, resource.attributes) == first
    ours = ExportTraceServiceRequest.FromString(first)
    sdk = encode_spans([unpack(p, resource) for p in packed])

    def by_span(message: Any) -> dict[bytes, tuple[bytes, bytes, bytes]]:
        return {
            span.span_id: (rs.resource.SerializeToString(deterministic=True),
                           ss.scope.SerializeToString(deterministic=True), span.SerializeToString(deterministic=True))
            for rs in message.resource_spans for ss in rs.scope_spans for span in ss.spans
        }  # fmt: skip

    assert by_span(ours) == by_span(sdk)
    assert len(by_span(ours)) == 40


def test_the_encoder_pauses_between_spans_and_writes_the_same_bytes() -> None:
    # The helper passes os.sched_yield: a process waiting for the helper's core gets it between spans.
    from embedgate.otlp_encode import PAUSE_EVERY, encode_request

    packed = [["s", 0, 1, 2 + i, 1, None, 0, 1, 2, {"i": i}, [0, None], [], ["embedgate", None]] for i in range(100)]
    pauses: list[int] = []
    paused = encode_request(packed, {"service.name": "svc"}, lambda: pauses.append(1))
    assert paused == encode_request(packed, {"service.name": "svc"})
    assert len(pauses) == 100 // PAUSE_EVERY >= 3


def test_the_helper_runs_below_the_gateway_s_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its exports wait for the requests: a process woken on its core is not kept waiting for an export to end.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    pipe = SpanPipe(["otlp"], "priority")
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pipe._child.pid) == min(19, mine + 10)
    finally:
        pipe.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the helper's mappings from /proc")
def test_the_helper_loads_only_what_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # The helper lives as long as the gateway: the gateway's own modules (numpy, the HTTP client, the ASGI stack)
    # would only take its memory. Its native libraries tell what it imported, once it is ready to export.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    pipe = SpanPipe(["otlp"], "imports")
    try:
        assert pipe._child.poll() is None  # ready (SpanPipe waited for it), its exporter built
        with open(f"/proc/{pipe._child.pid}/maps") as maps:
            loaded = maps.read()
    finally:
        pipe.close()
    for gateway_only in ("numpy", "orjson", "httptools", "uvloop"):
        assert gateway_only not in loaded, gateway_only


def test_an_encoded_batch_is_what_each_otlp_exporter_expects() -> None:
    """The OTLP/HTTP exporter is handed the encoded bytes as they are; gRPC's stub, a real message of them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from embedgate.otlp_encode import encode_request
    from embedgate.span_export import _Encoded, _Wire

    packed = [["s", 0, 1, 2, 1, None, 0, 1, 2, {"embedgate.cache": "miss"}, [0, None], [], ["embedgate", None]]]
    data = encode_request(packed, {"service.name": "svc"})
    encoded = _Encoded(packed, data)
    wire = _Wire(encoded)
    assert wire.SerializePartialToString() is data and wire.SerializeToString() is data
    assert wire.ByteSize() == len(data)  # anything else asked of it is the parsed message's
    message = encoded.message
    assert isinstance(message, ExportTraceServiceRequest) and message.SerializeToString() == data
    assert message.resource_spans[0].scope_spans[0].spans[0].name == "s"
    assert list(encoded) == packed


class Level(enum.IntEnum):
    HIGH = 2


class Name(str):
    pass


def test_values_otlp_cannot_carry_are_dropped_and_the_span_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        provider = LeanTracerProvider(["otlp"], "odd-values")
        tracer = provider.get_tracer("embedgate")
        with tracer.start_as_current_span("too-big") as span:
            span.set_attributes({"n": 2**63, "m": -(2**63) - 1, "ok": 2**63 - 1, "seq": (1, 2**64)})  # beyond int64
            span.set_attribute("level", Level.HIGH)  # an IntEnum: kept as a plain int
        with tracer.start_as_current_span(Name("fine")) as span:  # a str subclass as the name: kept as a str
            span.set_attribute("nan", float("nan"))
        provider.force_flush()
        with tracer.start_as_current_span("after"):
            pass
        provider.shutdown()
        spans = {s.name: s for s in receiver.wait_for_spans(3)}
    assert set(spans) == {"too-big", "fine", "after"}  # no span lost for one value
    assert spans["too-big"].attributes == {"ok": 2**63 - 1, "level": 2}  # the values OTLP cannot carry are left out
    assert math.isnan(spans["fine"].attributes["nan"])  # as the SDK's encoder writes it


def test_a_lean_span_s_w3c_headers_are_what_the_propagators_write() -> None:
    from opentelemetry import baggage, propagate
    from opentelemetry import context as otel_context
    from opentelemetry.trace.span import TraceState

    from embedgate.current_span import has_baggage
    from embedgate.telemetry import AttemptSpan

    tracer = LeanTracer(Captured(), ["embedgate", None])  # type: ignore[arg-type]
    state = TraceState([("vendor", "abc"), ("other", "x-1")])
    remote = SpanContext(0xABC << 64 | 0x123, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=state)
    for parent in (None, trace.set_span_in_context(NonRecordingSpan(remote))):
        with tracer.start_as_current_span("root", context=parent):
            with tracer.start_as_current_span("embeddings m", kind=SpanKind.CLIENT) as span:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                assert not has_baggage()
                assert span.w3c_headers() == carrier  # type: ignore[attr-defined]
                assert AttemptSpan(span).trace_headers() == carrier
                assert ("tracestate" in carrier) == (parent is not None)
                token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
                try:
                    assert has_baggage()
                    assert AttemptSpan(span).trace_headers()["baggage"] == "tenant=acme"  # left to the propagators
                finally:
                    otel_context.detach(token)


def test_a_request_span_s_attributes_set_as_a_dict_are_what_the_api_calls_keep() -> None:
    """``RequestSpan.set_many`` hands a dict of plain values to a lean span in one update: the span keeps exactly
    what ``set_attributes`` (the API's way) keeps, odd values included, and never more than 128 attributes."""
    from embedgate.telemetry import ALLOWED_ATTRIBUTES, RequestSpan

    allowed = sorted(ALLOWED_ATTRIBUTES)
    plain = {"embedgate.model": "m", "embedgate.input_count": 3, "embedgate.cost_usd": 1.5e-7, "embedgate.cache": "hit"}
    odd = {"embedgate.model": None, "embedgate.input_count": 2**63, "embedgate.attempts": Level.HIGH,
           "embedgate.route": Name("openai"), "gen_ai.request.encoding_formats": ["base64"]}  # fmt: skip
    every = {key: i for i, key in enumerate(allowed)}  # every allowed name, on a span that already has 100
    hundred = {f"preset.{i}": i for i in range(100)}
    # many onto a few (the root's outcome onto its HTTP attributes, merged the other way round), one of them again
    few = {"url.path": "/v1/embeddings", "embedgate.model": "old"}
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [(hundred, plain), (hundred, odd), (hundred, every),
                                                           (few, plain), (few, every)]  # fmt: skip
    for presets, attributes in cases:
        kept = []
        for via_set_many in (True, False):
            sink = Captured()
            span = LeanTracer(sink, ["embedgate", None]).start_span(  # type: ignore[arg-type]
                "root", attributes=presets
            )
            if via_set_many:
                RequestSpan(span).set_many(attributes)
            else:
                span.set_attributes(attributes)
            span.end()
            kept.append(sink.packed[0][9])
        assert kept[0] == kept[1]
        assert list(kept[0]) == list(kept[1])  # in the same order: a full span evicts its oldest first
        assert all(type(v) in (str, int, float, bool, tuple) for v in kept[0].values())
        kept_also = [key for key in presets if key not in attributes]
        assert len(kept[0]) == min(128, len(kept_also) + len(attributes) - list(attributes.values()).count(None)
                                   - (2**63 in attributes.values()))  # fmt: skip
        if presets is few:
            assert kept[0]["url.path"] == attributes.get("url.path", "/v1/embeddings")
            assert kept[0]["embedgate.model"] == attributes["embedgate.model"]  # the later value


def _entry_point_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, export_body: str) -> None:
    """An exporter installed as the entry point ``name`` (for this process and the helper it starts)."""
    (tmp_path / f"{name}_exporter.py").write_text(
        f"class Exporter:\n    def export(self, spans):\n        {export_body}\n    def shutdown(self):\n        pass\n"
    )
    info = tmp_path / f"{name}_exporter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-exporter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[opentelemetry_traces_exporter]\n{name} = {name}_exporter:Exporter\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the check at start-up, here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


_PACKED = [["s", 0, i + 1, i + 1, 1, None, 0, 1, 2, {}, [0, None], [], None] for i in range(64)]


def test_an_exporter_that_raises_loses_only_its_own_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An entry-point exporter's exception ended the helper: every later span was lost, the OTLP exporter's too.
    _entry_point_exporter(tmp_path, monkeypatch, "flaky", "raise RuntimeError('flaky')")
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        pipe = SpanPipe(["otlp", "flaky"], "flaky")
        assert pipe.write(_PACKED)
        time.sleep(1.0)  # past the helper's linger: a batch of its own, exported (and failed) before the next
        assert pipe.write(_PACKED)
        pipe.close()
        assert len(receiver.wait_for_spans(128)) == 128


def test_a_helper_stuck_exporting_is_stopped_at_shutdown_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A slow collector held the gateway's exit for up to a minute (30 s + 15 s + 15 s), the spans lost unsaid.
    _entry_point_exporter(tmp_path, monkeypatch, "stuck", "__import__('time').sleep(60)")
    pipe = SpanPipe(["stuck"], "stuck")
    assert pipe.write(_PACKED)
    with structlog.testing.capture_logs() as logged:
        started = time.monotonic()
        pipe.close(timeout_s=1.5)
        took = time.monotonic() - started
    assert took < 5, took
    assert any("had not finished exporting" in e["event"] for e in logged), logged
