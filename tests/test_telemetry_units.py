"""Unit tests of the observability modules: span helpers, standalone OTLP export, metrics, JSON logs.

In-process tests pass their own TracerProvider (OTel lets the global one be set only once per process);
the standalone set-up from OTEL_* variables runs in subprocesses exporting to a real local OTLP receiver.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from structlog.typing import Processor

from embedgate import logs
from embedgate.errors import BudgetExceeded, UpstreamTimeout
from embedgate.metrics import LATENCY_BUCKETS, Metrics
from embedgate.telemetry import Telemetry, build_tracer_provider
from tests.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parents[1]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01".encode()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Iterator[Telemetry]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Telemetry(provider)
    provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def span_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def attempt_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "provider": "openai",
        "request_model": "text-embedding-3-small",
        "server_address": "api.openai.com",
        "attempt": 1,
        "fallback_index": 0,
        "deployment": "openai/text-embedding-3-small#0",
        "encoding_format": "base64",
    }
    kwargs.update(overrides)
    return kwargs


# --- spans ---


def test_root_span_is_named_by_caller_and_continues_traceparent(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    headers = [(b"host", b"gw"), (b"traceparent", TRACEPARENT), (b"content-type", b"application/json")]
    with telemetry.start_request(
        "nightly-reindex", headers=headers, attributes={"embedgate.route": "/v1/embeddings"}
    ) as root:
        root.set("embedgate.key_id", "team-a")
        root.end(200)

    (span,) = exporter.get_finished_spans()
    assert span.name == "nightly-reindex"
    assert span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == CALLER_TRACE == root.trace_id_hex
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER_SPAN
    assert root.span_id_hex == format(span.context.span_id, "016x")
    assert span.attributes is not None
    assert span.attributes["embedgate.key_id"] == "team-a"
    assert span.attributes["embedgate.route"] == "/v1/embeddings"
    assert span.attributes["http.response.status_code"] == 200
    assert span.status.status_code is StatusCode.UNSET


def test_without_traceparent_the_request_starts_a_new_trace(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with telemetry.start_request("embeddings openai/te3", headers=[]) as root:
        root.end(200)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert root.trace_id_hex == format(span.context.trace_id, "032x") != CALLER_TRACE
    assert len(root.trace_id_hex) == 32


def test_stage_and_attempt_spans_are_children_with_genai_attributes(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with telemetry.start_request("req", headers=[(b"traceparent", TRACEPARENT)]) as root:
        with telemetry.stage("auth") as auth:
            auth.set("embedgate.key_id", "team-a")
        with telemetry.stage("routing"):
            with telemetry.attempt(**attempt_kwargs()) as attempt:
                injected = attempt.trace_headers()
                attempt.succeed(response_model="text-embedding-3-small-v2", input_tokens=12, dimension_count=1536)
        root.end(200)

    spans = by_name(exporter)
    root_span, auth_span, routing_span = spans["req"], spans["auth"], spans["routing"]
    attempt_span = spans["embeddings text-embedding-3-small"]
    assert {s.context.trace_id for s in spans.values()} == {int(CALLER_TRACE, 16)}
    assert parent_id(auth_span) == parent_id(routing_span) == span_id(root_span)
    assert auth_span.kind is routing_span.kind is SpanKind.INTERNAL
    assert parent_id(attempt_span) == span_id(routing_span)
    assert attempt_span.kind is SpanKind.CLIENT
    assert attempt_span.attributes == {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "text-embedding-3-small",
        "gen_ai.request.encoding_formats": ("base64",),
        "server.address": "api.openai.com",
        "embedgate.attempt": 1,
        "embedgate.fallback_index": 0,
        "embedgate.deployment": "openai/text-embedding-3-small#0",
        "embedgate.outcome": "success",
        "http.response.status_code": 200,
        "gen_ai.response.model": "text-embedding-3-small-v2",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.embeddings.dimension.count": 1536,
    }
    # The upstream sees the attempt's own span as its parent, in the caller's trace.
    assert injected["traceparent"] == f"00-{CALLER_TRACE}-{span_id(attempt_span):016x}-01"


def test_a_stage_not_made_current_is_still_the_roots_child_and_leaves_the_context_alone(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    """The pipeline's stages that start no span of their own (auth, cache, budget) are not made current."""
    with telemetry.start_request("req", headers=[]) as root:
        outside = trace.get_current_span()
        with telemetry.stage("budget", current=False):
            assert trace.get_current_span() is outside
            sibling = telemetry.attempt(**attempt_kwargs())  # started within it: its sibling, not its child
            sibling.end()
        with pytest.raises(BudgetExceeded), telemetry.stage("auth", current=False):
            raise BudgetExceeded("over", code="token_limit_exceeded", scope_kind="api_key", scope_target_id="k",
                                 dimension="tokens")  # fmt: skip
        assert trace.get_current_span() is outside
        root.end(200)
    spans = by_name(exporter)
    assert parent_id(spans["budget"]) == parent_id(spans["embeddings text-embedding-3-small"]) == span_id(spans["req"])
    assert spans["budget"].kind is SpanKind.INTERNAL
    assert spans["auth"].attributes == {"error.type": "token_limit_exceeded"}  # a 4xx: no error status
    assert spans["auth"].status.status_code is StatusCode.UNSET


def test_attempt_outside_a_stage_parents_to_the_root(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with telemetry.start_request("req", headers=[]) as root:
        attempt = telemetry.attempt(**attempt_kwargs())
        attempt.end()
        root.end(200)
    spans = by_name(exporter)
    assert parent_id(spans["embeddings text-embedding-3-small"]) == span_id(spans["req"])


def test_failed_attempts_carry_error_type(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with telemetry.start_request("req", headers=[]) as root:
        with telemetry.attempt(**attempt_kwargs(attempt=1)) as first:
            first.fail("503", status_code=503, outcome="fallback")
        with pytest.raises(UpstreamTimeout), telemetry.attempt(**attempt_kwargs(attempt=2, fallback_index=1)):
            raise UpstreamTimeout("the upstream took too long")
        root.end(504, error_type="upstream_timeout")

    first_span, second_span = (s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT)
    assert first_span.attributes is not None and second_span.attributes is not None
    assert first_span.attributes["error.type"] == "503"
    assert first_span.attributes["embedgate.outcome"] == "fallback"
    assert first_span.attributes["http.response.status_code"] == 503
    assert first_span.status.status_code is StatusCode.ERROR
    assert second_span.attributes["error.type"] == "upstream_timeout"
    assert second_span.attributes["embedgate.outcome"] == "error"
    assert second_span.attributes["embedgate.fallback_index"] == 1
    assert second_span.status.status_code is StatusCode.ERROR
    root_span = by_name(exporter)["req"]
    assert root_span.attributes is not None and root_span.attributes["error.type"] == "upstream_timeout"
    assert root_span.status.status_code is StatusCode.ERROR


def test_client_errors_do_not_mark_spans_as_errors(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    refusal = BudgetExceeded(
        "over budget",
        code="token_budget_exceeded",
        scope_kind="api_key",
        scope_target_id="team-a",
        dimension="tokens",
    )
    with telemetry.start_request("req", headers=[]) as root:
        with pytest.raises(BudgetExceeded), telemetry.stage("budget"):
            raise refusal
        root.end(429)
    spans = by_name(exporter)
    assert spans["budget"].attributes == {"error.type": "token_budget_exceeded"}
    assert spans["budget"].status.status_code is StatusCode.UNSET
    assert spans["req"].status.status_code is StatusCode.UNSET
    assert spans["req"].attributes == {"http.response.status_code": 429}


def test_request_span_escaping_exception_ends_as_500(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), telemetry.start_request("req", headers=[]):
        raise RuntimeError("secret-looking message sk-123")
    (span,) = exporter.get_finished_spans()
    assert span.attributes == {"http.response.status_code": 500, "error.type": "RuntimeError"}
    assert span.status.status_code is StatusCode.ERROR
    assert not span.events  # no exception event: its message could carry input text or a key
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context was restored


def test_only_allowed_attribute_names_are_accepted(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="api_key"):
        telemetry.start_request("req", headers=[], attributes={"api_key": "sk-live-123"})
    with telemetry.start_request("req", headers=[]) as root:
        with pytest.raises(ValueError, match="input"):
            root.set("input", "the text to embed")
        with telemetry.stage("cache") as stage, pytest.raises(ValueError):
            stage.set("authorization", "Bearer sk-live-123")
        root.end(200)
    for span in exporter.get_finished_spans():
        assert "sk-live-123" not in str(span.attributes)


def test_attempt_drops_userinfo_from_server_address(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    telemetry.attempt(**attempt_kwargs(server_address="user:sk-pw@llm.internal")).end()
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["server.address"] == "llm.internal"


def test_host_span_already_current_is_the_parent(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    host_tracer = TracerProvider().get_tracer("host")
    with host_tracer.start_as_current_span("host GET") as host_span:
        other = b"00-11111111111111111111111111111111-2222222222222222-01"
        with telemetry.start_request("req", headers=[(b"traceparent", other)]) as root:
            root.end(200)
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == host_span.get_span_context().span_id
    assert root.trace_id_hex == format(host_span.get_span_context().trace_id, "032x")


def test_without_an_sdk_the_trace_id_still_flows() -> None:
    telemetry = Telemetry(NoOpTracerProvider())
    with telemetry.start_request("req", headers=[(b"traceparent", TRACEPARENT)]) as root:
        attempt = telemetry.attempt(**attempt_kwargs())
        assert attempt.trace_headers()["traceparent"].split("-")[1] == CALLER_TRACE
        attempt.end()
    assert root.trace_id_hex == CALLER_TRACE and not root.is_recording

    with telemetry.start_request("req", headers=[]) as root:
        injected = telemetry.attempt(**attempt_kwargs()).trace_headers()
    assert len(root.trace_id_hex) == 32 and int(root.trace_id_hex, 16) != 0
    assert injected["traceparent"] == f"00-{root.trace_id_hex}-{root.span_id_hex}-00"


def test_sampled_out_requests_keep_the_callers_trace_id(exporter: InMemorySpanExporter) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider)
    with telemetry.start_request("req", headers=[(b"traceparent", TRACEPARENT)]) as root:
        root.set("embedgate.cache", "hit")
        root.end(200)
    assert root.trace_id_hex == CALLER_TRACE and not root.is_recording
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


@pytest.mark.anyio
async def test_concurrent_requests_do_not_cross_parent(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    async def request(name: str) -> None:
        with telemetry.start_request(name, headers=[]) as root:
            for _ in range(3):
                await anyio.sleep(0)  # interleave with the other request
                with telemetry.stage(f"{name}.stage"):
                    await anyio.sleep(0)
            root.end(200)

    async with anyio.create_task_group() as group:
        group.start_soon(request, "a")
        group.start_soon(request, "b")

    spans = exporter.get_finished_spans()
    roots = {s.name: s for s in spans if s.name in ("a", "b")}
    for span in spans:
        if span.name.endswith(".stage"):
            assert parent_id(span) == span_id(roots[span.name[0]])
    assert len(spans) == 8


# --- standalone set-up from the OTel environment variables ---

STANDALONE_SCRIPT = textwrap.dedent(
    """
    from embedgate.telemetry import Telemetry
    telemetry = Telemetry(service_name="from-config", standalone=True)
    assert telemetry.owns_provider
    with telemetry.start_request("standalone-req", headers=[]) as root:
        with telemetry.stage("auth"):
            pass
        root.end(200)
    print(root.trace_id_hex)
    telemetry.shutdown()
    """
)


def run_standalone(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT / "middleware"), base.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_SCRIPT],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_standalone_exports_over_otlp_http_from_env() -> None:
    with OtlpReceiver() as receiver:
        trace_id = run_standalone(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_SERVICE_NAME": "gw-env",
                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            }
        )
        spans = {s.name: s for s in receiver.wait_for_spans(2)}
    root, auth = spans["standalone-req"], spans["auth"]
    assert root.trace_id == auth.trace_id == trace_id
    assert root.kind == "SERVER" and root.parent_span_id == ""
    assert auth.parent_span_id == root.span_id
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource["service.name"] == "gw-env"  # the environment wins over the config
    assert root.resource["deployment.environment"] == "test"
    assert root.scope == "embedgate"


def test_standalone_traces_endpoint_and_configured_service_name() -> None:
    with OtlpReceiver() as receiver:
        run_standalone(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.traces_url,
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            }
        )
        spans = receiver.wait_for_spans(2)
    assert {s.name for s in spans} == {"standalone-req", "auth"}
    assert spans[0].resource["service.name"] == "from-config"


def test_standalone_exports_over_otlp_grpc_from_env() -> None:
    with OtlpReceiver(grpc=True) as receiver:
        run_standalone({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint})
        spans = {s.name: s for s in receiver.wait_for_spans(2)}
    assert spans["auth"].parent_span_id == spans["standalone-req"].span_id
    assert spans["auth"].resource["service.name"] == "from-config"


def test_standalone_without_otel_env_does_not_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert build_tracer_provider() is None
    telemetry = Telemetry(standalone=True)
    assert not telemetry.owns_provider
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # global left alone
    with telemetry.start_request("req", headers=[]) as root:
        root.end(200)
    assert len(root.trace_id_hex) == 32


def test_build_tracer_provider_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert build_tracer_provider() is None  # an explicit "none" wins over an endpoint

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = build_tracer_provider("svc")
    assert provider is not None and provider.resource.attributes["service.name"] == "svc"
    provider.shutdown()

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        build_tracer_provider()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger-thrift-nope")
    with pytest.raises(ValueError, match="jaeger-thrift-nope"):
        build_tracer_provider()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert build_tracer_provider() is None


def test_receiver_accepts_otlp_json() -> None:
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "lib"},
                        "spans": [
                            {
                                "traceId": CALLER_TRACE.upper(),
                                "spanId": CALLER_SPAN,
                                "name": "json-span",
                                "kind": 3,
                                "attributes": [
                                    {"key": "n", "value": {"intValue": "7"}},
                                    {"key": "l", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
                                ],
                                "status": {"code": 2},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    with OtlpReceiver() as receiver, httpx.Client() as client:
        assert client.post(receiver.traces_url, json=body).status_code == 200
        assert client.post(receiver.traces_url, content=b"\xff garbage").status_code == 400
        (span,) = receiver.spans
    assert span.trace_id == CALLER_TRACE and span.span_id == CALLER_SPAN and span.parent_span_id == ""
    assert (span.kind, span.status, span.scope) == ("CLIENT", "ERROR", "lib")
    assert span.attributes == {"n": 7, "l": ["a"]} and span.resource == {"service.name": "js"}
    assert receiver.rejected == 1


# --- metrics ---


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_metrics_move_and_render() -> None:
    metrics = Metrics()
    for _ in range(2):
        metrics.observe_request("/v1/embeddings", "openai/te3", 200, "miss")
    metrics.observe_request("/v1/embeddings", "openai/te3", 429, "bypass")
    metrics.observe_attempt("openai", "te3", 200, 0.012)
    metrics.observe_attempt("openai", "te3", "timeout", 30.0)
    metrics.observe_usage("team-a", "openai/te3", 120, 0.0024)
    metrics.observe_usage("team-a", "openai/te3", 0, 0.0)  # a cache hit: nothing billed
    metrics.observe_budget_rejection("api_key", "tokens")
    metrics.observe_cache_items(hits=3, misses=1)
    metrics.set_cache_bytes_source(lambda: 4096)

    got = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    route = {"route": "/v1/embeddings", "model": "openai/te3"}
    assert value("embedgate_requests_total", **route, status="200", cache="miss") == 2
    assert value("embedgate_requests_total", **route, status="429", cache="bypass") == 1
    assert value("embedgate_upstream_attempts_total", provider="openai", model="te3", status="timeout") == 1
    assert value("embedgate_upstream_latency_seconds_count", provider="openai", model="te3") == 2
    assert value("embedgate_upstream_latency_seconds_bucket", provider="openai", model="te3", le="0.025") == 1
    assert value("embedgate_upstream_latency_seconds_bucket", provider="openai", model="te3", le="30.0") == 2
    assert value("embedgate_tokens_total", key="team-a", model="openai/te3") == 120
    assert value("embedgate_spend_usd_total", key="team-a", model="openai/te3") == pytest.approx(0.0024)
    assert value("embedgate_budget_rejections_total", scope="api_key", dimension="tokens") == 1
    assert value("embedgate_cache_items_total", result="hit") == 3
    assert value("embedgate_cache_items_total", result="miss") == 1
    assert value("embedgate_cache_bytes") == 4096


FAST_SERIES = (
    "embedgate_requests",
    "embedgate_upstream",
    "embedgate_tokens",
    "embedgate_spend",
    "embedgate_cache_items",
)


def test_metrics_expose_what_prometheus_clients_own_metrics_would() -> None:
    """The request path's series are counted by embedgate (prometheus_client's inc/observe cost microseconds);
    the scrape must read as prometheus_client's own Counter and Histogram would write the same observations."""
    metrics = Metrics(max_series=3)
    reference = CollectorRegistry()
    requests = Counter("embedgate_requests_total", "r", ("route", "model", "status", "cache"), registry=reference)
    attempts = Counter("embedgate_upstream_attempts_total", "a", ("provider", "model", "status"), registry=reference)
    latency = Histogram("embedgate_upstream_latency_seconds", "l", ("provider", "model"), registry=reference,
                        buckets=LATENCY_BUCKETS)  # fmt: skip
    tokens = Counter("embedgate_tokens_total", "t", ("key", "model"), registry=reference)
    spend = Counter("embedgate_spend_usd_total", "s", ("key", "model"), registry=reference)
    items = Counter("embedgate_cache_items_total", "c", ("result",), registry=reference)
    for seconds in (0.0, 0.001, 0.0010001, 0.3, 29.9, 30.0, 31.0):  # bounds, between them, past the last
        metrics.observe_attempt("openai", "te3", 200, seconds)
        attempts.labels("openai", "te3", "200").inc()
        latency.labels("openai", "te3").observe(seconds)
    metrics.observe_attempt("voyage", "v3", "timeout", 2.0)
    attempts.labels("voyage", "v3", "timeout").inc()
    latency.labels("voyage", "v3").observe(2.0)
    for model, status in (("m1", 200), ("m1", "200"), ("m2", 404), ("m3", 200), ("m4", 200), ("m5", 500)):
        metrics.observe_request("/v1/embeddings", model, status, "miss")
    # 200 and "200" are one series; past max_series=3, new label sets fold into one "other" series
    requests.labels("/v1/embeddings", "m1", "200", "miss").inc(2)
    requests.labels("/v1/embeddings", "m2", "404", "miss").inc()
    requests.labels("/v1/embeddings", "m3", "200", "miss").inc()
    requests.labels("other", "other", "other", "other").inc(2)
    metrics.observe_usage("team-a", "openai/te3", 120, 0.0024)
    metrics.observe_usage("team-a", "openai/te3", 30, 0.0006)
    tokens.labels("team-a", "openai/te3").inc(150)
    spend.labels("team-a", "openai/te3").inc(0.0024)
    spend.labels("team-a", "openai/te3").inc(0.0006)
    metrics.observe_cache_items(hits=3, misses=1)
    items.labels("hit").inc(3)
    items.labels("miss").inc(1)

    def series(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in registry.collect()
            if family.name.startswith(FAST_SERIES)
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    ours, theirs = series(metrics.registry), series(reference)
    assert ours.keys() == theirs.keys()
    assert ours == pytest.approx(theirs)
    assert any(s.name.endswith("_created") for f in metrics.registry.collect() for s in f.samples)
    types = {f.name: f.type for f in metrics.registry.collect()}
    assert types["embedgate_requests"] == "counter" and types["embedgate_upstream_latency_seconds"] == "histogram"


def test_two_gateways_have_separate_registries() -> None:
    first, second = Metrics(), Metrics()
    first.observe_budget_rejection("workspace", "cost")
    assert (
        "embedgate_budget_rejections_total",
        frozenset({("scope", "workspace"), ("dimension", "cost")}),
    ) in (samples(first))
    assert not any(name == "embedgate_budget_rejections_total" for name, _ in samples(second))


def test_label_sets_beyond_the_limit_fold_into_other() -> None:
    metrics = Metrics(max_series=2)
    for model in ("m1", "m2", "m3", "m4"):
        metrics.observe_request("/v1/embeddings", model, 404, "bypass")
    got = samples(metrics)
    requests = {labels: v for (name, labels), v in got.items() if name == "embedgate_requests_total"}
    assert len(requests) == 3
    other = frozenset({("route", "other"), ("model", "other"), ("status", "other"), ("cache", "other")})
    assert requests[other] == 2


def test_failing_cache_bytes_callback_does_not_break_the_scrape() -> None:
    metrics = Metrics()

    def broken() -> float:
        raise RuntimeError("store gone")

    metrics.set_cache_bytes_source(broken)
    body, content_type = metrics.render()
    assert b"embedgate_cache_bytes NaN" in body and content_type.startswith("text/plain")
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


MULTIPROC_SCRIPT = textwrap.dedent(
    """
    import sys
    from embedgate.metrics import Metrics
    metrics = Metrics()
    for _ in range(int(sys.argv[1])):
        metrics.observe_request("/v1/embeddings", "openai/te3", 200, "hit")
    if sys.argv[2] == "render":
        sys.stdout.write(metrics.render()[0].decode())
    """
)


def test_metrics_aggregate_worker_processes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(ROOT / "middleware")
    outputs = []
    for count, action in ((3, "quiet"), (4, "render")):
        result = subprocess.run(
            [sys.executable, "-c", MULTIPROC_SCRIPT, str(count), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    line = 'embedgate_requests_total{cache="hit",model="openai/te3",route="/v1/embeddings",status="200"} 7.0'
    assert line in outputs[1].splitlines()


CACHE_BYTES_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from embedgate.metrics import Metrics
    metrics, size = Metrics(), [10]
    metrics.set_cache_bytes_source(lambda: size[0])

    async def main():
        metrics.observe_request("/v1/embeddings", "openai/te3", 200, "miss")
        size[0] = 25  # a second miss within the second: its refresh is put off, not dropped
        metrics.observe_request("/v1/embeddings", "openai/te3", 200, "miss")
        await asyncio.sleep(1.3)

    asyncio.run(main())
    if sys.argv[1] == "close":  # as the gateway's shutdown does
        metrics.close()
    print("ready", flush=True)
    if sys.argv[1] == "stay":
        sys.stdin.readline()
    """
)


def test_the_cache_size_of_worker_processes_is_current_and_the_dead_are_not_counted(tmp_path: Path) -> None:
    # A worker's size was refreshed by its requests only, at most once a second (a quiet worker kept its value
    # of a burst's start), and a killed worker's last size was summed for ever.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(ROOT / "middleware")
    gone = subprocess.run([sys.executable, "-c", CACHE_BYTES_WORKER, "exit"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert gone.stdout == "ready\n", gone.stderr  # exited without saying so, as a killed worker
    alive = subprocess.Popen([sys.executable, "-c", CACHE_BYTES_WORKER, "stay"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert alive.stdout is not None and alive.stdout.readline() == "ready\n"
        scrape = subprocess.run([sys.executable, "-c", MULTIPROC_SCRIPT, "0", "render"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert scrape.returncode == 0, scrape.stderr
    finally:
        alive.communicate("\n", timeout=30)
    assert "embedgate_cache_bytes 25.0" in scrape.stdout.splitlines()  # not 10 (stale) + 10 or 25 (the dead)


def test_a_worker_that_stops_takes_its_cache_size_out_of_the_sum_at_once(tmp_path: Path) -> None:
    # Metrics.close (the gateway's shutdown) removes its live gauge's file: a scrape before any cleanup of dead
    # workers, or prometheus_client's own reading of the directory, does not count it.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(ROOT / "middleware")
    for action, kept in (("exit", True), ("close", False)):
        run = subprocess.run([sys.executable, "-c", CACHE_BYTES_WORKER, action], env=env, capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
        assert run.stdout == "ready\n", run.stderr
        assert bool(list(tmp_path.glob("gauge_live*.db"))) is kept
        for leftover in tmp_path.glob("gauge_live*.db"):
            leftover.unlink()
    assert list(tmp_path.glob("counter_*.db"))  # its counters stay, as they should


# --- logs ---


@pytest.fixture
def fresh_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unconfigured structlog for the test; whatever configuration other tests made is put back after."""
    was_configured, saved = structlog.is_configured(), structlog.get_config()
    names = ("_installed", "_installed_args", "_access", "_direct", "_direct_chain", "_flush_delay", "_flush_loop")
    for name in names:  # embedgate.logs' own
        monkeypatch.setattr(logs, name, getattr(logs, name))
    structlog.reset_defaults()
    yield
    logs.clear_request()
    structlog.reset_defaults()
    if was_configured:
        structlog.configure(**saved)


@pytest.fixture
def log_output(fresh_structlog: None) -> io.BytesIO:
    out = io.BytesIO()
    assert logs.configure_logging(file=out)
    return out


def lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_access_log_is_one_json_line_with_bound_request_fields(log_output: io.BytesIO) -> None:
    logs.bind_request(request_id="req-1", trace_id=CALLER_TRACE, span_id=CALLER_SPAN)
    logs.bind_request(key_id="team-a")  # bound later, after authentication
    structlog.get_logger("host.app").info("host work", step=1)
    logs.access_log(
        status=200,
        latency_ms=12.34567,
        route="/v1/embeddings",
        identity="user-9",
        model="openai/te3",
        cache="partial",
        tokens=42,
        cost_usd=0.00084,
        attempts=2,
    )
    logs.clear_request()
    structlog.get_logger("host.app").info("after the request")

    host, access, after = lines(log_output)
    ids = {"request_id": "req-1", "trace_id": CALLER_TRACE, "span_id": CALLER_SPAN, "key_id": "team-a"}
    assert host["event"] == "host work" and host.items() >= ids.items()
    assert access == {
        **ids,
        "event": "request",
        "logger": "embedgate.access",
        "level": "info",
        "timestamp": access["timestamp"],
        "status": 200,
        "latency_ms": 12.346,
        "route": "/v1/embeddings",
        "identity": "user-9",
        "model": "openai/te3",
        "cache": "partial",
        "tokens": 42,
        "cost_usd": 0.00084,
        "attempts": 2,
    }
    assert access["timestamp"].endswith("Z") and "T" in access["timestamp"]
    assert "request_id" not in after


def test_the_direct_access_line_is_the_structlog_chains_line(
    log_output: io.BytesIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The access line skips structlog's machinery while embedgate's own JSON configuration is installed; it must
    come out as that configuration's chain writes it: same keys in the same order, same values."""
    logs.bind_request(request_id="req-1", trace_id=CALLER_TRACE, span_id=CALLER_SPAN)
    fields: dict[str, Any] = {"status": 200, "latency_ms": 1.5, "route": "openai", "model": "m", "cache": "hit",
                              "tokens": 3, "cost_usd": 1e-7, "attempts": 0, "error": None,
                              "extra": ("a", 1)}  # fmt: skip
    logs.access_log(**fields)
    logs.access_log(**{**fields, "status": 502})
    monkeypatch.setattr(logs, "_direct", None)  # through structlog's chain
    logs.access_log(**fields)
    logs.access_log(**{**fields, "status": 502})
    logs.clear_request()
    direct_ok, direct_err, chain_ok, chain_err = (orjson.loads(line) for line in log_output.getvalue().splitlines())
    for direct, chain in ((direct_ok, chain_ok), (direct_err, chain_err)):
        assert list(direct) == list(chain)
        assert {k: v for k, v in direct.items() if k != "timestamp"} == {
            k: v for k, v in chain.items() if k != "timestamp"
        }
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", direct["timestamp"])
    assert direct_err["level"] == "warning" and direct_ok["level"] == "info"


def test_access_lines_written_in_one_loop_pass_are_flushed_together_right_after_it(
    fresh_structlog: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_flush_delay", 0.0)  # telemetry.access_log_flush_ms: 0
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    with open(write_fd, "wb") as out, open(read_fd, "rb", buffering=0) as pipe:
        assert logs.configure_logging(file=out)

        async def requests_ending_together() -> tuple[bytes | None, bytes | None]:
            for status in (200, 201, 202):
                logs.access_log(status=status, latency_ms=1.0)
            held = pipe.read()  # nothing written yet: the three lines wait for one flush
            await asyncio.sleep(0)  # the loop's next pass
            return held, pipe.read()

        held, written = asyncio.run(requests_ending_together())
        logs.access_log(status=203, latency_ms=1.0)  # outside an event loop: flushed at once
        last = pipe.read()

        # A loop that ends with its flush still pending does not hold back the next loop's lines.
        abandoned = asyncio.new_event_loop()

        def log_then_stop() -> None:
            logs.access_log(status=204, latency_ms=1.0)
            abandoned.stop()  # this pass is the loop's last: the flush it scheduled never runs

        abandoned.call_soon(log_then_stop)
        abandoned.run_forever()
        abandoned.close()

        async def next_request() -> None:
            logs.access_log(status=205, latency_ms=1.0)
            await asyncio.sleep(0)

        asyncio.run(next_request())
        after_abandoned = pipe.read()
    assert held is None
    assert [orjson.loads(line)["status"] for line in (written or b"").splitlines()] == [200, 201, 202]
    assert orjson.loads(last or b"{}")["status"] == 203
    assert [orjson.loads(line)["status"] for line in (after_abandoned or b"").splitlines()] == [204, 205]


def test_access_lines_wait_at_most_the_flush_delay_and_a_full_buffer_goes_out_whole_lines_at_once(
    fresh_structlog: None,
) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    logs.set_access_flush_delay(0.05)  # the default, telemetry.access_log_flush_ms: 50
    with open(write_fd, "wb") as out, open(read_fd, "rb", buffering=0) as pipe:
        assert logs.configure_logging(file=out)

        async def traffic() -> tuple[bytes | None, bytes | None, bytes, bytes | None, bytes | None]:
            for status in (200, 201):
                logs.access_log(status=status, latency_ms=1.0)
            await asyncio.sleep(0)
            after_a_pass = pipe.read()  # still waiting: no write call per pass either
            await asyncio.sleep(0.1)
            after_the_delay = pipe.read()
            # Under load the buffer (8 KiB) fills before the delay is up: it goes out by itself, in whole lines.
            for i in range(100):
                logs.access_log(status=200, latency_ms=1.0, attempts=i)
            full = pipe.read() or b""
            logs.access_log(status=299, latency_ms=1.0)
            logs.flush_access_lines()  # what the gateway's shutdown does
            at_shutdown = pipe.read()
            await asyncio.sleep(0.1)
            return after_a_pass, after_the_delay, full, at_shutdown, pipe.read()

        after_a_pass, after_the_delay, full, at_shutdown, left = asyncio.run(traffic())
        rest = pipe.read() or b""
    assert after_a_pass is None
    assert [orjson.loads(line)["status"] for line in (after_the_delay or b"").splitlines()] == [200, 201]
    assert full.endswith(b"\n") and 0 < len(full.splitlines()) < 100
    assert [orjson.loads(line)["attempts"] for line in full.splitlines()] == list(range(len(full.splitlines())))
    lines = (at_shutdown or b"").splitlines()
    assert [orjson.loads(line)["attempts"] for line in lines[:-1]] == list(range(len(full.splitlines()), 100))
    assert orjson.loads(lines[-1])["status"] == 299
    assert left is None and rest == b""


def test_access_lines_on_stdout_are_buffered_by_the_gateway_even_with_pythonunbuffered() -> None:
    # Docker images (ours included) set PYTHONUNBUFFERED: sys.stdout.buffer is then the raw file. The lines still
    # wait in the gateway's own buffer, and reach stdout at exit, in order, none lost.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from embedgate import logs
        logs.configure_logging()
        logs.set_access_flush_delay(30.0)
        async def main():
            for status in (200, 201, 202):
                logs.access_log(status=status, latency_ms=1.0)
            await asyncio.sleep(0.05)
            sys.stderr.write("logged\\n")
            sys.stderr.flush()
            sys.stdin.readline()  # until the test has looked at stdout
        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            # (a build older than the sources says so on stderr first)
            while (line := proc.stderr.readline()) != b"logged\n":
                assert line, "the script ended before logging"
            os.set_blocking(proc.stdout.fileno(), False)
            held = proc.stdout.read()
            os.set_blocking(proc.stdout.fileno(), True)
            proc.stdin.write(b"go\n")
            proc.stdin.close()
            rest = proc.stdout.read()
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
    assert held is None  # nothing written while the process ran: no write call per line
    assert [orjson.loads(line)["status"] for line in rest.splitlines()] == [200, 201, 202]


def test_access_lines_of_workers_sharing_a_stdout_pipe_stay_whole() -> None:
    # `embedgate serve --workers N`: N processes write to one stdout, often a pipe (a container's). Each writes at
    # most PIPE_BUF bytes of whole lines at a time, which the pipe keeps in one piece.
    script = textwrap.dedent(
        """
        import asyncio
        from embedgate import logs
        logs.configure_logging()
        logs.set_access_flush_delay(0.001)
        async def main():
            for i in range(15000):
                logs.access_log(status=200, latency_ms=1.0, route="x" * 300, attempts=i)
                if i % 50 == 0:
                    await asyncio.sleep(0)
        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_fd, write_fd = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=write_fd, env=env) for _ in range(3)]
    os.close(write_fd)
    chunks = []
    with open(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1024):  # a slow reader: the pipe is often full, and big writes are cut
            chunks.append(chunk)
    output = b"".join(chunks)
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0]
    lines = [orjson.loads(line) for line in output.splitlines()]  # a line cut by another's would not parse
    assert sorted(line["attempts"] for line in lines) == sorted(list(range(15000)) * 3)


def test_an_access_line_to_an_output_that_is_gone_is_lost_without_an_error(fresh_structlog: None) -> None:
    read_fd, write_fd = os.pipe()
    with open(write_fd, "wb", buffering=0) as out:
        assert logs.configure_logging(file=out)
        os.close(read_fd)  # the reader went away: a write is a BrokenPipeError
        logs.access_log(status=200, latency_ms=1.0)  # outside a loop: written and flushed at once
    logs.access_log(status=200, latency_ms=1.0)  # the file is closed now: a ValueError underneath


def test_a_log_output_nobody_reads_never_holds_up_the_writer() -> None:
    # A pipe nobody reads (a stalled log shipper) stopped the gateway's event loop in a blocking write, health
    # checks and all. Now the lines go to a thread of their own; past MAX_PENDING_BYTES waiting they are dropped,
    # and counted in a line of the thread's own once it catches up. Every line is either written whole or counted.
    read_fd, write_fd = os.pipe()
    sink = logs._Sink(write_fd)
    line = b'{"event":"request","pad":"' + b"x" * 1000 + b'"}\n'
    total = logs.MAX_PENDING_BYTES // len(line) + 3000
    started = time.monotonic()
    for _ in range(total):
        sink.write(line)
    sink.flush()
    assert time.monotonic() - started < 10  # the pipe holds 64 KiB: a blocking write would wait for ever
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 65536), b"")))
    reader.start()
    sink.close()
    os.close(write_fd)
    reader.join(30)
    os.close(read_fd)
    lines = b"".join(chunks).splitlines(keepends=True)
    written = sum(1 for x in lines if x == line)
    (note,) = [orjson.loads(x) for x in lines if x != line]
    assert note["event"].startswith("log lines dropped") and note["level"] == "warning"
    assert note["dropped"] > 0 and written + note["dropped"] == total


@pytest.mark.parametrize(
    "script",
    [
        # a line logged by an atexit handler that runs after the writer's own close was lost
        """
        import atexit, structlog
        log = structlog.get_logger("host")
        atexit.register(lambda: log.info("goodbye"))
        from embedgate import logs
        logs.configure_logging()
        log.info("hello")
        """,
        # a forked child wrote the parent's lines handed to the writer once more
        """
        import os, sys, structlog
        from embedgate import logs
        logs.configure_logging()
        log = structlog.get_logger("host")
        log.info("hello")
        pid = os.fork()
        if pid == 0:
            log.info("child")
            sys.exit(0)
        os.waitpid(pid, 0)
        log.info("goodbye")
        """,
    ],
    ids=["atexit", "fork"],
)
def test_every_line_reaches_stdout_once(script: str) -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    events = sorted(orjson.loads(line)["event"] for line in out.stdout.splitlines())
    assert events == sorted(["hello", "goodbye", *(["child"] if "fork" in script else [])])


def test_an_exit_with_a_log_pipe_nobody_reads_ends_in_its_wait() -> None:
    # A line logged after the writer's close (an atexit handler) was written where it was logged, in a blocking
    # write: a pipe nobody read held the process's exit for ever.
    script = """
import atexit, structlog
log = structlog.get_logger("host")
atexit.register(lambda: log.info("goodbye from atexit"))
from embedgate import logs
logs._exit_wait_s = 0.5
logs.configure_logging()
for i in range(3000):
    log.info("filler", n=i, pad="x" * 100)
"""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert proc.wait(timeout=20) == 0  # (nobody reads its stdout: the pipe is full)
        finally:
            proc.kill()


def test_a_child_forked_while_another_thread_logs_can_log() -> None:
    # structlog's write lock around the writer was inherited held by a child forked while a thread logged: the
    # child's first line waited for ever (about one fork in six).
    script = """
import os, sys, threading, time
import structlog
from embedgate import logs
logs.configure_logging()
log = structlog.get_logger("host")
def chatter():
    while True:
        log.info("parent chatter")
threading.Thread(target=chatter, daemon=True).start()
hung = 0
for _ in range(30):
    pid = os.fork()
    if pid == 0:
        log.info("child line")
        os._exit(0)
    deadline = time.monotonic() + 2
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
sys.stderr.write(f"hung {hung}\\n")
"""
    out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         timeout=120)  # fmt: skip
    assert out.stderr.decode().splitlines()[-1] == "hung 0", out.stderr.decode()[-2000:]


def test_lines_flushed_from_several_threads_keep_their_order(tmp_path: Path) -> None:
    # A chunk was queued after the sink's lock was let go: two flushers could queue theirs the other way round.
    out = tmp_path / "log"
    sink = logs._Sink(os.open(out, os.O_WRONLY | os.O_CREAT))
    order = threading.Lock()
    seq = [0]

    def worker() -> None:
        for _ in range(20000):
            with order:
                seq[0] += 1
                sink.write(b"%d\n" % seq[0])
            sink.flush()

    was = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(was)
    sink.close()
    numbers = [int(x) for x in out.read_bytes().split()]
    assert numbers == list(range(1, 80001))


def test_a_log_line_that_cannot_be_written_never_raises_into_what_logged_it(fresh_structlog: None) -> None:
    # A warning logged within a request (a model failing over to its fallback) raised BrokenPipeError or ENOSPC
    # into the request: a plain-text 500 instead of the fallback's answer, the budget left at its estimate.
    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    assert logs.configure_logging(file=Full())
    structlog.get_logger("embedgate.routing").warning("model failed, falling back", model="a/b")
    structlog.get_logger("embedgate").exception("unhandled error")


def test_the_access_line_goes_through_structlog_under_capture_logs(log_output: io.BytesIO) -> None:
    with structlog.testing.capture_logs() as captured:
        logs.access_log(status=200, latency_ms=1.0)
    assert [entry["event"] for entry in captured] == ["request"]
    assert log_output.getvalue() == b""


def test_clear_request_restores_the_hosts_own_bindings(log_output: io.BytesIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="host-rid", tenant="acme")
    try:
        logs.bind_request(request_id="gw-rid")
        logs.access_log(status=503, latency_ms=1.0)
        logs.clear_request()
        structlog.get_logger().info("host line")
    finally:
        structlog.contextvars.unbind_contextvars("request_id", "tenant")
    access, host = lines(log_output)
    assert access["request_id"] == "gw-rid" and access["level"] == "warning"
    assert host["request_id"] == "host-rid" and host["tenant"] == "acme"


def test_bound_fields_follow_structlogs_contextvars_through_unbinds_and_other_contexts(log_output: io.BytesIO) -> None:
    """The access line's bound fields are structlog's ``get_contextvars()``: a key the host unbound is left out,
    and bindings cleared from a context other than the one that made them are unbound, not left behind."""
    structlog.contextvars.bind_contextvars(tenant="acme", region="eu")
    structlog.contextvars.unbind_contextvars("region")
    try:
        logs.bind_request(request_id="gw-1", key_id="k")
        assert logs._bound_fields() == structlog.contextvars.get_contextvars()
        logs.access_log(status=200, latency_ms=1.0)
        other = contextvars.copy_context()
        other.run(logs.clear_request)  # its tokens cannot be reset there
        assert other.run(structlog.contextvars.get_contextvars) == {"tenant": "acme"}
        logs.clear_request()
        assert structlog.contextvars.get_contextvars() == {"tenant": "acme"}
    finally:
        structlog.contextvars.unbind_contextvars("tenant")
    (access,) = lines(log_output)
    assert (access["tenant"], access["request_id"], access["key_id"]) == ("acme", "gw-1", "k")
    assert "region" not in access


def test_configure_logging_is_idempotent_and_keeps_a_host_configuration(fresh_structlog: None) -> None:
    out = io.BytesIO()
    assert logs.configure_logging(file=out)
    assert not logs.configure_logging(file=out)  # same arguments: nothing to do

    host_processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(processors=host_processors)
    assert not logs.configure_logging(file=out)
    assert structlog.get_config()["processors"] is host_processors
    assert logs.configure_logging(file=out, replace_host_config=True)
    assert structlog.get_config()["processors"] is not host_processors


def test_attempt_trace_headers_are_what_the_global_propagators_write(telemetry: Telemetry) -> None:
    """trace_headers formats the W3C headers itself when the default propagators are installed; it must write
    exactly what they write, and leave baggage and other propagators to them."""
    from opentelemetry import baggage, propagate
    from opentelemetry import context as otel_context
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    def expected(attempt: Any) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(attempt._span))
        return carrier

    state = b"00-" + CALLER_TRACE.encode() + b"-" + CALLER_SPAN.encode() + b"-01"
    with telemetry.start_request("req", headers=[(b"traceparent", state), (b"tracestate", b"vendor=abc")]):
        with telemetry.attempt(**attempt_kwargs()) as attempt:
            got = attempt.trace_headers()
            assert got == expected(attempt) and got["tracestate"] == "vendor=abc"
            token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
            try:
                assert attempt.trace_headers() == expected(attempt)
                assert attempt.trace_headers()["baggage"] == "tenant=acme"
            finally:
                otel_context.detach(token)
            saved = propagate.get_global_textmap()
            propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
            try:
                assert attempt.trace_headers() == expected(attempt)
            finally:
                propagate.set_global_textmap(saved)


MOUNTED_SCRIPT = textwrap.dedent(
    """
    import sys
    from contextlib import asynccontextmanager
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.applications import Starlette
    from starlette.testclient import TestClient
    from embedgate import EmbeddingGateway
    from embedgate.config import Config

    mode = sys.argv[1]
    host_spans = InMemorySpanExporter()

    @asynccontextmanager
    async def lifespan(app):
        if mode == "host":  # the host sets its provider in its own startup, which runs after the gateway's
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(host_spans))
            trace.set_tracer_provider(provider)
        yield

    app = EmbeddingGateway(Starlette(lifespan=lifespan), config=Config())
    body = {"model": "local/x", "input": "hi", "name": "mounted-req"}
    if mode == "no-lifespan":
        response = TestClient(app).post("/v1/embeddings", json=body)  # no lifespan: opened by this request
        assert response.status_code == 401, response.text
        app.telemetry.shutdown()
    else:
        with TestClient(app) as client:
            assert client.post("/v1/embeddings", json=body).status_code == 401
    print(type(trace.get_tracer_provider()).__name__, [s.name for s in host_spans.get_finished_spans()])
    """
)


@pytest.mark.parametrize("lifespan", [True, False])
def test_mounted_without_a_host_provider_exports_as_the_environment_says(lifespan: bool) -> None:
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "mounted-gw"}
        result = subprocess.run(
            [sys.executable, "-c", MOUNTED_SCRIPT, "none" if lifespan else "no-lifespan"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        spans = receiver.wait_for_spans(1, where=lambda s: s.kind == "SERVER")
    assert [s.name for s in spans if s.kind == "SERVER"] == ["mounted-req"]
    assert spans[0].resource["service.name"] == "mounted-gw"
    # the host's global provider is left as it was: the host may still set its own
    printed = [line for line in result.stdout.splitlines() if not line.startswith("{")]  # not the access line
    assert printed == ["ProxyTracerProvider []"]


def test_mounted_uses_the_provider_the_host_sets_in_its_lifespan() -> None:
    with OtlpReceiver() as receiver:
        result = subprocess.run(
            [sys.executable, "-c", MOUNTED_SCRIPT, "host"],
            env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
                 "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        time.sleep(0.3)
        assert receiver.spans == []  # the environment's exporter was not used: the host set a provider
    printed = [line for line in result.stdout.splitlines() if not line.startswith("{")]  # not the access line
    assert printed == ["TracerProvider ['mounted-req']"]  # a 401: refused before the stages (no 'auth' span)


def test_a_logged_exception_shows_its_traceback_without_local_variables(log_output: io.BytesIO) -> None:
    # structlog's dict_tracebacks put every frame's locals in the line: the gateway's request headers, so the
    # client's API key, in clear on an internal error.
    def handle(authorization: str) -> None:
        headers = {"authorization": authorization}
        raise RuntimeError(f"failed with {len(headers)} headers")

    try:
        handle("Bearer sk-client-secret-0001")
    except RuntimeError:
        structlog.get_logger("embedgate.gateway").exception("unhandled error", request_id="r-1")
    (line,) = lines(log_output)
    assert "sk-client-secret" not in log_output.getvalue().decode()
    (exc,) = line["exception"]
    assert exc["exc_type"] == "RuntimeError" and exc["exc_value"] == "failed with 1 headers"
    assert [f["name"] for f in exc["frames"]][-1] == "handle" and all("locals" not in f for f in exc["frames"])


def test_a_key_id_bound_later_is_undone_with_the_request_and_the_hosts_value_comes_back(
    log_output: io.BytesIO,
) -> None:
    structlog.contextvars.bind_contextvars(key_id="host-value")
    try:
        logs.bind_request(request_id="r-1")
        logs.bind_more(key_id="team-a")
        structlog.get_logger("host.app").info("inside")
        logs.clear_request()
        structlog.get_logger("host.app").info("after")
        assert structlog.contextvars.get_contextvars() == {"key_id": "host-value"}
    finally:
        structlog.contextvars.unbind_contextvars("key_id")
    inside, after = lines(log_output)
    assert (inside["request_id"], inside["key_id"]) == ("r-1", "team-a")
    assert "request_id" not in after and after["key_id"] == "host-value"


@pytest.mark.parametrize(
    ("base_url", "provider_name", "port"),
    [
        ("https://api.openai.com/v1", "openai", 443),
        ("https://acme.openai.azure.com/openai/deployments/te3?api-version=2024-02-01", "azure.ai.openai", 443),
        ("https://api.mistral.ai/v1", "mistral_ai", 443),
        ("https://generativelanguage.googleapis.com/v1beta/openai", "gcp.gemini", 443),
        (
            "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/l/endpoints/openapi",
            "gcp.vertex_ai",
            443,
        ),
        ("http://10.0.0.7:8080/v1", "azure", 8080),  # any other host: the provider's name in the config
        ("http://tei.internal/v1", "azure", 80),
        ("https://api.openai.com.evil.example/v1", "azure", 443),
    ],
)
def test_an_attempt_span_names_a_well_known_provider_and_the_port(base_url: str, provider_name: str, port: int) -> None:
    # `gen_ai.provider.name` was the provider's name in the config ("azure" for the README's Azure example), where
    # the GenAI conventions say a well-known value MUST be used; `server.port` was never set.
    from embedgate.config import ProviderConfig
    from embedgate.providers.openai import OpenAIAdapter

    adapter = OpenAIAdapter(ProviderConfig(name="azure", type="openai", base_url=base_url, api_key="k"), send=None)  # type: ignore[arg-type]
    assert (adapter.gen_ai_provider, adapter.server_port) == (provider_name, port)
