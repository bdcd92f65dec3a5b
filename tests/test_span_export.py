"""Span export in a helper process: spans survive the hand-off intact and reach a real OTLP receiver."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from embedgate.span_export import ProcessSpanExporter, pack, unpack
from tests.otlp_receiver import OtlpReceiver


def make_spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("embedgate", "1.2.3")
    with tracer.start_as_current_span("root-name", kind=SpanKind.SERVER, attributes={"embedgate.cache": "hit"}):
        with tracer.start_as_current_span("embeddings m", kind=SpanKind.CLIENT) as attempt:
            attempt.set_attributes({"gen_ai.request.encoding_formats": ("base64",), "embedgate.attempt": 2,
                                    "embedgate.cost_usd": 1.5e-7, "flag": True})  # fmt: skip
            attempt.add_event("retry", {"why": "503"})
            attempt.set_status(Status(StatusCode.ERROR, "upstream 503"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_pack_and_unpack_keep_every_field() -> None:
    resource = Resource.create({"service.name": "t"})
    for span in make_spans():
        back = unpack(orjson.loads(orjson.dumps(pack(span))), resource)
        assert back.name == span.name
        assert back.context.trace_id == span.context.trace_id and back.context.span_id == span.context.span_id
        assert (back.parent.span_id if back.parent else None) == (span.parent.span_id if span.parent else None)
        assert back.kind == span.kind
        assert (back.start_time, back.end_time) == (span.start_time, span.end_time)
        assert dict(back.attributes or {}) == dict(span.attributes or {})  # tuples stay tuples
        assert (back.status.status_code, back.status.description) == (span.status.status_code,
                                                                       span.status.description)  # fmt: skip
        assert [(e.name, dict(e.attributes or {}), e.timestamp) for e in back.events] == [
            (e.name, dict(e.attributes or {}), e.timestamp) for e in span.events
        ]
        assert back.instrumentation_scope == span.instrumentation_scope


def test_the_helper_process_exports_to_a_real_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = make_spans()
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        exporter = ProcessSpanExporter(["otlp"], "span-export-test")
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()  # the helper flushes before it exits
        got = {s.name: s for s in receiver.wait_for_spans(2)}
    root, attempt = got["root-name"], got["embeddings m"]
    assert root.trace_id == attempt.trace_id == format(spans[0].context.trace_id, "032x")
    assert attempt.parent_span_id == root.span_id
    assert (root.kind, attempt.kind, attempt.status) == ("SERVER", "CLIENT", "ERROR")
    assert attempt.attributes["embedgate.attempt"] == 2
    assert list(attempt.attributes["gen_ai.request.encoding_formats"]) == ["base64"]
    assert root.resource["service.name"] == "span-export-test"


def test_a_dead_helper_drops_spans_without_failing_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporter = ProcessSpanExporter(["otlp"], "dead")
    exporter._child.kill()
    exporter._child.wait(10)
    results: list[Any] = [exporter.export(make_spans()) for _ in range(3)]
    assert results == [SpanExportResult.FAILURE] * 3
    exporter.shutdown()
