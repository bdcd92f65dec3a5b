"""``embedgate.current_span``: the direct ContextVar path reads and sets exactly what the OTel API does."""

from __future__ import annotations

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

from embedgate import current_span as cs


def span(n: int) -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(n, n, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))


@pytest.fixture(params=["direct", "api"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "api":
        monkeypatch.setattr(cs._RUNTIME, "fast", None)
    else:
        assert cs._RUNTIME.fast is not None  # the default runtime context: the direct path is the one in use
    return str(request.param)


def test_attach_read_and_detach_agree_with_the_api(path: str) -> None:
    outer = otel_context.attach(baggage.set_baggage("tenant", "acme"))  # a host's entry beside the span
    try:
        assert cs.current_span() is trace.get_current_span() is INVALID_SPAN
        first, second = span(1), span(2)
        token_1 = cs.attach_span(first)
        assert cs.current_span() is trace.get_current_span() is first
        token_2 = cs.attach_span(second)
        assert cs.current_span() is trace.get_current_span() is second
        assert baggage.get_baggage("tenant") == "acme"  # the rest of the context is kept
        explicit = trace.set_span_in_context(first)
        assert cs.current_span(explicit) is first  # an explicit context wins over the current one
        cs.detach(token_2)
        assert cs.current_span() is first
        cs.detach(token_1)
        assert cs.current_span() is INVALID_SPAN
        assert baggage.get_baggage("tenant") == "acme"
    finally:
        otel_context.detach(outer)


def test_a_foreign_value_under_the_span_key_reads_as_no_span(path: str) -> None:
    assert cs.current_span(otel_context.Context({_SPAN_KEY: "not a span"})) is INVALID_SPAN
