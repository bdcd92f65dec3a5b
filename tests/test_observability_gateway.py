"""Tracing, metrics and request-bound logs as the running gateway produces them (SPEC section 8), in process.

The gateway is built with an injected SDK TracerProvider whose spans go to an InMemorySpanExporter, in front of
the real fake upstream (so retries, fallbacks and the injected ``traceparent`` are real HTTP). The standalone
``embedgate serve`` process, its OTLP export, its log lines and the absence of secrets are covered in
``test_observability_served.py``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pytest
import redis
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from embedgate import EmbeddingGateway, logs
from embedgate.config import Config, parse_config
from embedgate.telemetry import ALLOWED_ATTRIBUTES
from tests.conftest import KEY, OTHER_KEY, config_dict
from tests.fake_upstream import FakeUpstream, Fault, tokens_of
from tests.redis_util import redis_proxy, require_redis

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
AUTH = {"authorization": f"Bearer {KEY}"}
STAGES = ("auth", "cache", "budget", "routing")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    # SimpleSpanProcessor: a span is in the exporter as soon as it ends, no flush to wait for.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def host_404(scope: Scope, receive: Receive, send: Send) -> None:
    """The host app behind the gateway: answers 404 to what the gateway passes through."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"host: not found"})


def make_config(upstream: FakeUpstream, **overrides: Any) -> Config:
    return parse_config(config_dict(upstream.url, **overrides), env={})


@asynccontextmanager
async def client_for(gateway: EmbeddingGateway) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of ``gateway``; the gateway is shut down (its upstream client closed) after."""
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gateway), base_url="http://gw") as client:
            yield client
    finally:
        await gateway.shutdown()


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def hex_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def hex_parent(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


def roots(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def trace_of(exporter: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if hex_trace(s) == hex_trace(root)]


def attempts_of(spans: Iterable[ReadableSpan]) -> list[ReadableSpan]:
    """The CLIENT spans, in the order they started."""
    return sorted((s for s in spans if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time or 0)


def stage(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name and s.kind is SpanKind.INTERNAL]
    return found


def parse_traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00"
    return trace_id, parent_id, flags


# --- traces -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_root_span_is_named_after_name_then_orq_name_then_model(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    requests: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/embeddings", {"name": "search-query"}, "search-query"),
        ("/v2/router/embeddings", {"orq": {"name": "legacy-orq-name"}}, "legacy-orq-name"),
        ("/v2/router/embeddings", {"name": "top-level", "orq": {"name": "nested"}}, "top-level"),  # top level wins
        ("/api/v1/embeddings", {}, "embeddings local/embed-small"),
        # load balanced: its pick, not the request's model, which it ignores (the span was named "embeddings x/y")
        (
            "/v2/router/embeddings",
            {
                "model": "x/y",
                "load_balancer": {"type": "weight_based", "models": [{"model": "local/embed-b", "weight": 1}]},
            },
            "embeddings local/embed-b",
        ),
    ]
    trace_ids = []
    async with client_for(gw) as client:
        for path, extra, _ in requests:
            r = await client.post(path, json={"model": "local/embed-small", "input": "hello", **extra}, headers=AUTH)
            assert r.status_code == 200, r.text
            trace_ids.append(r.headers["x-embedgate-trace-id"])
    found = roots(exporter)
    assert [s.name for s in found] == [name for _, _, name in requests]
    # one trace per request, and the response header names it
    assert [hex_trace(s) for s in found] == trace_ids
    assert len(set(trace_ids)) == len(requests)
    assert all(s.parent is None for s in found)  # no caller traceparent: each request starts its own trace
    assert [s.attributes["embedgate.route"] for s in found if s.attributes] == ["openai", "orq", "orq", "openrouter",
                                                                                "orq"]  # fmt: skip
    assert found[-1].attributes is not None and found[-1].attributes["gen_ai.request.model"] == "local/embed-b"
    # the HTTP server conventions' required attributes (the root span had none of them)
    http = ("http.request.method", "http.route", "url.path", "url.scheme")
    assert [{k: v for k, v in (s.attributes or {}).items() if k in http} for s in found] == [
        {"http.request.method": "POST", "http.route": path, "url.path": path, "url.scheme": "http"}
        for path, _, _ in requests
    ]


@pytest.mark.anyio
async def test_a_request_refused_as_invalid_is_named_as_its_body_names_it(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # A 400 from validation was a root span named plain "embeddings", without its model, and an access line without
    # one: the requests a user most needs to find by their name were the ones not findable.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    bodies: list[tuple[dict[str, Any], str, str | None]] = [
        ({"name": "bad-retry", "retry": {"count": 9}}, "bad-retry", "local/embed-small"),
        ({"orq": {"name": "legacy"}, "dimensions": 0}, "legacy", "local/embed-small"),
        ({"dimensions": 0}, "embeddings local/embed-small", "local/embed-small"),
        ({"name": 5, "model": ["not", "a", "string"]}, "embeddings", None),  # nothing valid to name it by
    ]
    async with client_for(gw) as client:
        with capture_logs() as logs:
            for extra, _, _ in bodies:
                r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x", **extra},
                                      headers=AUTH)  # fmt: skip
                assert r.status_code == 400, r.text
    found = roots(exporter)
    assert [s.name for s in found] == [name for _, name, _ in bodies]
    assert [(s.attributes or {}).get("gen_ai.request.model") for s in found] == [m for _, _, m in bodies]
    lines = [e for e in logs if e["event"] == "request"]
    assert [line.get("model") for line in lines] == [m for _, _, m in bodies]
    assert all(line["status"] == 400 for line in lines)


@pytest.mark.anyio
async def test_the_root_span_spans_the_reading_of_the_body(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # It started once the body was read and parsed: a body that took 1.5 s to arrive made a 1 ms root span, where
    # the access line said 1,500 ms.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)

    async def slow_body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.3)
        yield orjson.dumps({"model": "local/embed-small", "input": "hello"})

    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", content=slow_body(), headers=AUTH)
    assert r.status_code == 200, r.text
    (root,) = roots(exporter)
    assert root.start_time is not None and root.end_time is not None
    assert root.end_time - root.start_time >= 300_000_000
    children = [span for span in trace_of(exporter, root) if span is not root]
    assert children and all(c.start_time is not None and c.start_time >= root.start_time for c in children)


@pytest.mark.anyio
async def test_retries_and_a_fallback_give_one_client_span_per_attempt(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    budgets = [{"scope": "api_key", "target": "team-a", "amount_usd": 10.0, "requests_per_minute": 100}]
    gw = EmbeddingGateway(host_404, config=make_config(upstream, budgets=budgets), tracer_provider=provider)
    upstream.script.extend([Fault("status", 503, model="embed-small"), Fault("status", 503, model="embed-small")])
    inputs = ["alpha beta gamma", "delta"]
    body = {
        "model": "local/embed-small",
        "input": inputs,
        "name": "retry-then-fallback",
        "retry": {"count": 1, "on_codes": [503]},
        "fallbacks": [{"model": "backup/fb-model"}],
        "identity": {"id": "user-42"},
        "cache": {"type": "exact_match"},
    }
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "backup/fb-model"

    (root,) = roots(exporter)
    spans = trace_of(exporter, root)
    assert root.name == "retry-then-fallback"
    assert hex_trace(root) == r.headers["x-embedgate-trace-id"]
    assert root.status.status_code is StatusCode.UNSET  # the client got a 200
    # the pipeline's stages are children of the root, the attempts children of the routing stage
    for name in STAGES:
        assert hex_parent(stage(spans, name)) == hex_id(root)
    routing = stage(spans, "routing")
    attempts = attempts_of(spans)
    assert len(spans) == 1 + len(STAGES) + len(attempts)
    assert [hex_parent(a) for a in attempts] == [hex_id(routing)] * 3

    def attrs(span: ReadableSpan) -> dict[str, Any]:
        return dict(span.attributes or {})

    first, second, served = (attrs(a) for a in attempts)
    assert [(a["gen_ai.provider.name"], a["embedgate.attempt"], a["embedgate.fallback_index"]) for a in
            (first, second, served)] == [("local", 1, 0), ("local", 2, 0), ("backup", 1, 1)]  # fmt: skip
    for failed, span in ((first, attempts[0]), (second, attempts[1])):
        assert failed["error.type"] == "503"
        assert failed["http.response.status_code"] == 503
        assert failed["gen_ai.request.model"] == "embed-small"
        assert failed["embedgate.outcome"] != "success"
        assert "gen_ai.usage.input_tokens" not in failed
        assert span.status.status_code is StatusCode.ERROR
    assert attempts[2].status.status_code is not StatusCode.ERROR
    assert "error.type" not in served
    sent = upstream.calls_for("fb-model")[0].body
    assert served == {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": "backup",
        "gen_ai.request.model": "fb-model",
        "gen_ai.response.model": "fb-model",
        "gen_ai.usage.input_tokens": sum(tokens_of(i) for i in inputs),
        "gen_ai.embeddings.dimension.count": upstream.dims,
        "gen_ai.request.encoding_formats": (sent["encoding_format"],),  # what was asked of the upstream
        "server.address": "127.0.0.1",
        "server.port": upstream.port,
        "embedgate.attempt": 1,
        "embedgate.fallback_index": 1,
        "embedgate.deployment": "backup/fb-model",
        "embedgate.outcome": "success",
        "http.response.status_code": 200,
    }
    assert all(attrs(a)["gen_ai.operation.name"] == "embeddings" for a in attempts)
    assert [a.name for a in attempts] == ["embeddings embed-small", "embeddings embed-small", "embeddings fb-model"]
    # every name on every span of the trace is in the allow-list the README names (three of the attempt span's,
    # set without its check, were not)
    assert {key for span in trace_of(exporter, root) for key in attrs(span)} <= ALLOWED_ATTRIBUTES

    top = attrs(root)
    assert top["embedgate.cache"] == "miss" == r.headers["x-embedgate-cache"]
    assert top["embedgate.key_id"] == "team-a"
    assert top["embedgate.workspace"] == "acme"
    assert top["embedgate.identity_id"] == "user-42"
    assert top["embedgate.budget.decision"] == "reserved"
    assert top["embedgate.request_id"] == r.headers["x-request-id"]
    assert top["gen_ai.request.model"] == "local/embed-small"
    assert top["gen_ai.response.model"] == "backup/fb-model"
    assert top["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert top["embedgate.billed_tokens"] == r.json()["usage"]["prompt_tokens"]  # what the budgets counted
    assert top["embedgate.attempts"] == 3
    assert top["http.response.status_code"] == 200


@pytest.mark.anyio
async def test_failed_attempts_say_whether_the_router_retries_or_falls_back(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # telemetry.AttemptSpan.fail documents the outcome as what the router does next: retry | fallback | error
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    upstream.script.extend([Fault("status", 503, model="embed-small"), Fault("status", 503, model="embed-small")])
    body = {"model": "local/embed-small", "input": "x", "retry": {"count": 1, "on_codes": [503]},
            "fallbacks": [{"model": "backup/fb-model"}]}  # fmt: skip
    async with client_for(gw) as client:
        assert (await client.post("/v1/embeddings", json=body, headers=AUTH)).status_code == 200
    outcomes = [dict(a.attributes or {})["embedgate.outcome"] for a in attempts_of(exporter.get_finished_spans())]
    assert outcomes == ["retry", "fallback", "success"]


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["key-refused-in-on-codes", "deadline-spent"])
async def test_a_failed_attempt_s_outcome_is_what_the_router_then_does(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter, case: str
) -> None:
    # Both said "retry": a 401 listed in on_codes (never retried: the deployment is dropped, the fallback served),
    # and a timeout at the request's deadline (nothing follows it: the request is a 504).
    routing = {"deadline_ms": 300} if case == "deadline-spent" else {}
    gw = EmbeddingGateway(host_404, config=make_config(upstream, routing=routing), tracer_provider=provider)
    fault = Fault("status", 401) if case == "key-refused-in-on-codes" else Fault("slow", delay=1.0)
    upstream.script.append(fault)
    body = {"model": "local/embed-small", "input": "x", "retry": {"count": 2, "on_codes": [401, 503]},
            "fallbacks": [{"model": "backup/fb-model"}]}  # fmt: skip
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
    outcomes = [dict(a.attributes or {})["embedgate.outcome"] for a in attempts_of(exporter.get_finished_spans())]
    if case == "key-refused-in-on-codes":
        assert (r.status_code, outcomes) == (200, ["fallback", "success"])
    else:
        assert (r.status_code, outcomes) == (504, ["error"])


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["breaker-opens", "backoff-past-the-deadline", "retry-after-past-the-deadline"])
@pytest.mark.parametrize("fallback", [False, True])
async def test_the_last_attempt_says_no_retry_where_none_could_follow(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter, case: str, fallback: bool
) -> None:
    # Both said "retry" with no retry after them: an attempt whose failure opened its deployment's circuit breaker
    # (no deployment left), and one whose backoff (or the upstream's Retry-After) would outlast the deadline.
    routing: dict[str, Any] = {
        "breaker-opens": {"breaker_failures": 2},
        "backoff-past-the-deadline": {"backoff_base_ms": 2000, "deadline_ms": 1500},
        "retry-after-past-the-deadline": {"deadline_ms": 1500},
    }[case]
    gw = EmbeddingGateway(host_404, config=make_config(upstream, routing=routing), tracer_provider=provider)
    retry_after = 5.0 if case == "retry-after-past-the-deadline" else None
    upstream.script.extend([Fault("status", 500, retry_after=retry_after, model="embed-small")] * 3)
    body: dict[str, Any] = {"model": "local/embed-small", "input": "x", "retry": {"count": 2, "on_codes": [500]}}
    if fallback:
        body["fallbacks"] = [{"model": "backup/fb-model"}]
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
    outcomes = [dict(a.attributes or {})["embedgate.outcome"] for a in attempts_of(exporter.get_finished_spans())]
    last = "fallback" if fallback else "error"
    expected = ["retry", last] if case == "breaker-opens" else [last]
    assert (r.status_code, outcomes) == ((200, [*expected, "success"]) if fallback else (502, expected)), r.text


@pytest.mark.anyio
async def test_a_probe_cut_by_the_clients_call_timeout_says_retry_when_it_is_retried(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # A half-open breaker's probe that timed out under the client's own short call_timeout (not counted against the
    # deployment) still held its probe when its span was told: "error", and a retry followed all the same.
    routing = {"breaker_failures": 1, "breaker_cooldown_ms": 200}
    gw = EmbeddingGateway(host_404, config=make_config(upstream, routing=routing), tracer_provider=provider)
    async with client_for(gw) as client:
        upstream.script.append(Fault("status", 500, model="embed-small"))
        body: dict[str, Any] = {"model": "local/embed-small", "input": "x", "retry": {"count": 0}}
        assert (await client.post("/v1/embeddings", json=body, headers=AUTH)).status_code == 502
        await asyncio.sleep(0.3)  # the breaker is half-open: the next attempt is its probe
        exporter.clear()
        upstream.script.append(Fault("slow", delay=1.0, model="embed-small"))
        body = {"model": "local/embed-small", "input": "y", "retry": {"count": 1}, "timeout": {"call_timeout": 100}}
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
    outcomes = [dict(a.attributes or {})["embedgate.outcome"] for a in attempts_of(exporter.get_finished_spans())]
    assert (r.status_code, outcomes) == (200, ["retry", "success"]), r.text


@pytest.mark.anyio
async def test_a_request_without_a_valid_key_is_refused_before_its_body_is_parsed(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # A client with no valid key had its body parsed first: 8 MiB of small values took ~0.5 s of the event loop and
    # ~30x its size in memory, and a body that was not even valid got a 400 where OpenAI's API answers 401. A small
    # body is still read for its trace's name (which tells whose client sends the wrong key); a large one is not.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    wrong = {"authorization": "Bearer sk-not-a-key", "content-type": "application/json"}
    large = orjson.dumps({"model": "local/embed-small", "input": ["x"] * 40_000, "name": "the-large-one"})
    small = orjson.dumps({"model": "local/embed-small", "input": "x", "name": "the-small-one"})
    async with client_for(gw) as client:
        answers = [await client.post("/v1/embeddings", content=b, headers=wrong) for b in (b"{nope", large, small)]
    assert [r.status_code for r in answers] == [401, 401, 401]
    assert [s.name for s in roots(exporter)] == ["embeddings", "embeddings", "the-small-one"]
    assert len(upstream.calls) == 0


@pytest.mark.anyio
async def test_an_attempt_out_while_another_is_asked_for_floats_says_what_it_asked(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # One call's refusal (of base64, for another model of the provider) switched the provider to floats while a
    # call that asked only for base64 was out, answered in base64: its span said float.
    refusal = orjson.dumps({"error": {"message": "encoding_format must be 'float'", "param": "encoding_format"}})
    upstream.script.append(Fault("ok", delay=0.3, model="embed-small"))
    upstream.script.append(Fault("raw", 400, headers={"Content-Type": "application/json"}, body=refusal, model="other"))
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    async with client_for(gw) as client:
        first = asyncio.ensure_future(
            client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "X"}, headers=AUTH)
        )
        await asyncio.sleep(0.05)
        second = await client.post("/v1/embeddings", json={"model": "local/other", "input": "Y"}, headers=AUTH)
        assert ((await first).status_code, second.status_code) == (200, 200)
    spans = [dict(a.attributes or {}) for a in attempts_of(exporter.get_finished_spans())]
    asked = {a["gen_ai.request.model"]: a["gen_ai.request.encoding_formats"] for a in spans}
    assert asked == {"embed-small": ("base64",), "other": ("float",)}


@pytest.mark.anyio
async def test_an_upstream_refusing_base64_is_told_once_and_its_attempts_say_floats(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Its attempt spans kept saying base64 once floats were asked for; and each call in flight when it refused
    # logged the warning the README says comes once.
    refusal = orjson.dumps({"error": {"message": "encoding_format must be 'float'", "param": "encoding_format"}})
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    upstream.script.extend([Fault("raw", 400, headers={"Content-Type": "application/json"}, body=refusal,
                                  delay=0.2)] * 3)  # fmt: skip
    with capture_logs() as logs:
        async with client_for(gw) as client:
            body = {"model": "local/embed-small", "input": "x"}
            answers = await asyncio.gather(*[client.post("/v1/embeddings", json=body, headers=AUTH) for _ in range(3)])
            assert [r.status_code for r in answers] == [200] * 3
            assert (await client.post("/v1/embeddings", json=body, headers=AUTH)).status_code == 200
    assert [line["event"] for line in logs].count("upstream refuses base64 answers: asking it for floats") == 1
    # the three that were refused, then asked again for floats, say so too (they said base64)
    attempts = attempts_of(exporter.get_finished_spans())
    assert [dict(a.attributes or {})["gen_ai.request.encoding_formats"] for a in attempts] == [("float",)] * 4


@pytest.mark.anyio
async def test_a_fallback_re_embedding_a_partial_hit_s_cached_items_keeps_its_fallback_index(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # The cached item, embedded again by the fallback that served the rest, was an attempt of fallback_index 0.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    cache = {"type": "exact_match"}
    async with client_for(gw) as client:
        await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": ["a"], "cache": cache},
                          headers=AUTH)  # fmt: skip
        exporter.clear()
        upstream.script.append(Fault("status", 503, model="embed-small"))
        body = {"model": "local/embed-small", "input": ["a", "b"], "cache": cache, "retry": {"count": 0},
                "fallbacks": [{"model": "backup/fb-model"}]}  # fmt: skip
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] == "backup/fb-model"
    attempts = [dict(a.attributes or {}) for a in attempts_of(exporter.get_finished_spans())]
    assert [(a["gen_ai.request.model"], a["embedgate.fallback_index"]) for a in attempts] == [
        ("embed-small", 0), ("fb-model", 1), ("fb-model", 1)]  # fmt: skip


@pytest.mark.anyio
async def test_cache_hit_and_budget_rejection_are_root_attributes(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    budgets = [{"scope": "api_key", "target": "team-b", "requests_per_minute": 1}]
    gw = EmbeddingGateway(host_404, config=make_config(upstream, budgets=budgets), tracer_provider=provider)
    cached = {"model": "local/embed-small", "input": ["same text"], "cache": {"type": "exact_match"}}
    other = {"model": "backup/embed-b", "input": "b", "identity": {"id": "user-b"}}
    b_auth = {"authorization": f"Bearer {OTHER_KEY}"}
    async with client_for(gw) as client:
        statuses = [
            (await client.post("/v1/embeddings", json=cached, headers=AUTH)).status_code,
            (await client.post("/v1/embeddings", json=cached, headers=AUTH)).status_code,
            (await client.post("/v1/embeddings", json=other, headers=b_auth)).status_code,
            (await client.post("/v1/embeddings", json=other, headers=b_auth)).status_code,
        ]
    assert statuses == [200, 200, 200, 429]
    miss, hit, admitted, rejected = roots(exporter)
    assert [dict(s.attributes or {})["embedgate.cache"] for s in (miss, hit)] == ["miss", "hit"]
    assert len(attempts_of(trace_of(exporter, miss))) == 1
    assert attempts_of(trace_of(exporter, hit)) == []  # answered from the cache: nothing upstream
    # ... and nothing routed: no empty routing span in the hit's trace, while the miss's has one
    assert {s.name for s in trace_of(exporter, hit)} >= {"auth", "cache", "budget"}
    assert "routing" not in {s.name for s in trace_of(exporter, hit)}
    assert "routing" in {s.name for s in trace_of(exporter, miss)}
    assert dict(hit.attributes or {})["embedgate.budget.decision"] == "none"  # no budget applies to team-a

    assert dict(admitted.attributes or {})["embedgate.budget.decision"] == "reserved"
    top = dict(rejected.attributes or {})
    assert top["embedgate.budget.decision"] == "rejected"
    assert top["embedgate.budget.scope"] == "api_key"
    assert top["embedgate.budget.dimension"] == "requests"
    assert top["embedgate.error.code"] == "requests_per_minute_exceeded"
    assert top["embedgate.key_id"] == "team-b"
    assert top["embedgate.workspace"] == "globex"
    assert top["embedgate.identity_id"] == "user-b"
    assert top["http.response.status_code"] == 429
    assert rejected.status.status_code is StatusCode.UNSET  # a refusal is the client's doing, not a fault
    assert attempts_of(trace_of(exporter, rejected)) == []
    assert "routing" not in {s.name for s in trace_of(exporter, rejected)}  # the budget stage ended it


@pytest.mark.anyio
@pytest.mark.parametrize("enabled_by_default", [False, True])
async def test_a_request_that_bypasses_the_cache_has_no_cache_span(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter, enabled_by_default: bool
) -> None:
    # Nothing looked up, nothing to show: the stage is skipped, span and all, as routing is on a full hit.
    config = make_config(upstream, cache={"enabled_by_default": enabled_by_default})
    gw = EmbeddingGateway(host_404, config=config, tracer_provider=provider)
    async with client_for(gw) as client:
        answer = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "x"}, headers=AUTH)
    assert answer.headers["x-embedgate-cache"] == ("miss" if enabled_by_default else "bypass")
    (root,) = roots(exporter)
    stages = {s.name for s in trace_of(exporter, root) if s.kind is SpanKind.INTERNAL}
    assert stages == ({"auth", "cache", "budget", "routing"} if enabled_by_default else {"auth", "budget", "routing"})


@pytest.mark.anyio
async def test_caller_traceparent_is_continued_and_each_attempt_injects_its_own(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    upstream.script.append(Fault("status", 503))
    body = {"model": "local/embed-small", "input": "continue me", "name": "continued",
            "retry": {"count": 2, "on_codes": [503]}}  # fmt: skip
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json=body, headers={**AUTH, "traceparent": CALLER_TRACEPARENT})
        assert r.status_code == 200, r.text
        fresh = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "new trace"},
                                  headers=AUTH)  # fmt: skip
    assert r.headers["x-embedgate-trace-id"] == CALLER_TRACE

    continued, new = roots(exporter)
    assert continued.name == "continued"
    assert hex_trace(continued) == CALLER_TRACE
    assert continued.parent is not None and continued.parent.is_remote
    assert hex_parent(continued) == CALLER_SPAN
    spans = trace_of(exporter, continued)
    assert all(hex_trace(s) == CALLER_TRACE for s in spans)
    attempts = attempts_of(spans)
    assert len(attempts) == 2

    # every upstream call carries a traceparent whose parent is the attempt span that made it
    calls = upstream.calls
    assert len(calls) == 3
    injected = [parse_traceparent(c.headers["traceparent"]) for c in calls]
    assert [(t, p) for t, p, _ in injected[:2]] == [(CALLER_TRACE, hex_id(a)) for a in attempts]
    assert all(int(flags, 16) & 1 for _, _, flags in injected)  # sampled, as the caller's was
    # the next request, without a traceparent, is a new trace, and its upstream call is in that trace
    assert hex_trace(new) == fresh.headers["x-embedgate-trace-id"] != CALLER_TRACE
    assert new.parent is None
    (new_attempt,) = attempts_of(trace_of(exporter, new))
    assert injected[2][:2] == (hex_trace(new), hex_id(new_attempt))


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_pipelined_requests_under_uvicorns_protocols_are_one_trace_each(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter, http: str
) -> None:
    # uvicorn's protocols start a pipelined request in its predecessor's context, its root span current: the
    # requests of a connection were one trace, each root the child of the one before, and a caller's traceparent
    # was passed over for that leftover span.
    from starlette.applications import Starlette

    from tests.conftest import serve
    from tests.test_serve_protocol import exchange

    # a host that speaks the lifespan protocol: the gateway is closed with the server, on the server's loop
    gw = EmbeddingGateway(Starlette(), config=make_config(upstream), tracer_provider=provider)
    payload = orjson.dumps({"model": "local/embed-small", "input": "piped"})

    def post(extra: bytes = b"") -> bytes:
        return (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\n"
            + extra
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload
        )

    with serve(gw, http=http) as url:
        port = int(url.rsplit(":", 1)[1])
        answers, _ = exchange(port, post() + post(b"traceparent: " + CALLER_TRACEPARENT.encode() + b"\r\n") + post(), 3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    ids = [dict(headers)["x-embedgate-trace-id"] for _, headers, _ in answers]
    assert len(set(ids)) == 3 and ids[1] == CALLER_TRACE
    found = {hex_trace(r): r for r in roots(exporter)}
    assert set(found) == set(ids)
    assert found[ids[0]].parent is None and found[ids[2]].parent is None  # each its own trace
    assert hex_parent(found[ids[1]]) == CALLER_SPAN  # the caller's span, not the request before


# --- metrics ------------------------------------------------------------------------------------------------


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text body, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.anyio
async def test_a_model_that_resolves_to_nothing_is_no_metric_label(
    upstream: FakeUpstream, provider: TracerProvider
) -> None:
    """A client's made-up names would use up the label sets (capped at 10,000, then folded into ``other``)."""
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    async with client_for(gw) as client:
        for i in range(3):
            r = await client.post("/v1/embeddings", json={"model": f"nowhere/made-up-{i}", "input": "x"}, headers=AUTH)
            assert r.status_code == 404
        samples = scrape((await client.get("/metrics")).text)
    assert value(samples, "embedgate_requests_total", route="openai", model="", status="404", cache="bypass") == 3
    assert not any("made-up" in label for _, labels in samples for _, label in labels)
    assert not upstream.calls


@pytest.mark.anyio
async def test_metrics_move_with_traffic(upstream: FakeUpstream, provider: TracerProvider) -> None:
    budgets = [{"scope": "api_key", "target": "team-b", "requests_per_minute": 1}]
    gw = EmbeddingGateway(host_404, config=make_config(upstream, budgets=budgets), tracer_provider=provider)
    cached = {"model": "local/embed-small", "input": ["one two", "three"], "cache": {"type": "exact_match"}}
    b_auth = {"authorization": f"Bearer {OTHER_KEY}"}
    async with client_for(gw) as client:
        before = scrape((await client.get("/metrics")).text)
        miss = await client.post("/v1/embeddings", json=cached, headers=AUTH)
        hit = await client.post("/v1/embeddings", json=cached, headers=AUTH)
        statuses = [miss.status_code, hit.status_code]
        upstream.script.append(Fault("status", 503))
        retried = {"model": "local/embed-small", "input": "four", "retry": {"count": 1, "on_codes": [503]}}
        statuses.append((await client.post("/v1/embeddings", json=retried, headers=AUTH)).status_code)
        upstream.script.append(Fault("status", 500))
        failing = {"model": "local/embed-small", "input": "five", "retry": {"count": 0}}
        statuses.append((await client.post("/v1/embeddings", json=failing, headers=AUTH)).status_code)
        other = {"model": "backup/embed-b", "input": "six seven"}
        for _ in range(2):  # team-b may send one request per minute: the second is refused
            statuses.append((await client.post("/api/v1/embeddings", json=other, headers=b_auth)).status_code)
        response = await client.get("/metrics")
    assert statuses == [200, 200, 200, 502, 200, 429]
    assert response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "embedgate_requests_total"
    small = "local/embed-small"
    assert moved(requests, route="openai", model=small, status="200", cache="miss") == 1
    assert moved(requests, route="openai", model=small, status="200", cache="hit") == 1
    assert moved(requests, route="openai", model=small, status="200", cache="bypass") == 1
    assert moved(requests, route="openai", model=small, status="502", cache="bypass") == 1
    # backup/embed-b is no configured model: it routes by its prefix, and is labelled so (names are the client's)
    assert moved(requests, route="openrouter", model="backup/*", status="200", cache="bypass") == 1
    assert moved(requests, route="openrouter", model="backup/*", status="429", cache="bypass") == 1

    attempts = "embedgate_upstream_attempts_total"
    assert moved(attempts, provider="local", model=small, status="200") == 2  # the miss and the retried one
    assert moved(attempts, provider="local", model=small, status="503") == 1
    assert moved(attempts, provider="local", model=small, status="500") == 1
    assert moved(attempts, provider="backup", model="backup/*", status="200") == 1
    assert moved("embedgate_upstream_latency_seconds_count", provider="local", model=small) == 4

    # tokens as the fake upstream counts them (words); spend at the configured 0.02 USD per million tokens
    tokens_a = tokens_of("one two") + tokens_of("three") + tokens_of("four")
    assert moved("embedgate_tokens_total", key="team-a", model=small) == tokens_a
    assert moved("embedgate_spend_usd_total", key="team-a", model=small) == pytest.approx(tokens_a * 0.02 / 1e6)
    assert moved("embedgate_tokens_total", key="team-b", model="backup/*") == tokens_of("six seven")

    assert moved("embedgate_budget_rejections_total", scope="api_key", dimension="requests") == 1
    assert moved("embedgate_cache_items_total", result="hit") == 2
    assert moved("embedgate_cache_items_total", result="miss") == 2
    assert value(before, "embedgate_cache_bytes") == 0
    assert value(after, "embedgate_cache_bytes") > 0


# --- logs ---------------------------------------------------------------------------------------------------


@pytest.fixture
def host_log(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """structlog configured by the host app (JSON lines with contextvars, unless the test's ``merge`` parameter
    is False), put back as it was after the test."""
    was_configured, saved = structlog.is_configured(), structlog.get_config()
    for name in ("_installed", "_installed_args", "_access"):  # embedgate.logs' memory of its own config
        monkeypatch.setattr(logs, name, getattr(logs, name))
    out = io.StringIO()
    structlog.reset_defaults()
    merge = [structlog.contextvars.merge_contextvars] if getattr(request, "param", True) else []
    structlog.configure(
        processors=[*merge, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    yield out
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    if was_configured:
        structlog.configure(**saved)


@pytest.mark.anyio
async def test_host_log_lines_carry_the_request_ids_only_within_a_gateway_request(
    upstream: FakeUpstream, provider: TracerProvider, host_log: io.StringIO
) -> None:
    host_logger = structlog.get_logger("host.app")

    async def log_upstream_call(request: httpx.Request) -> None:
        # the host's own code running inside a gateway request: its upstream client's event hook
        host_logger.info("host hook: upstream call", url=str(request.url))

    async def host(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host_logger.info("host route", path=scope["path"])
        await host_404(scope, receive, send)

    upstream_client = httpx.AsyncClient(event_hooks={"request": [log_upstream_call]})
    try:
        gw = EmbeddingGateway(host, config=make_config(upstream), tracer_provider=provider,
                              http_client=upstream_client)  # fmt: skip
        async with client_for(gw) as client:
            # httpx's ASGITransport runs the app in this very task: anything the gateway leaves bound in the
            # contextvars would leak into the next request's lines
            r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert (await client.get("/host/page")).status_code == 404
    finally:
        await upstream_client.aclose()

    lines = [orjson.loads(line) for line in host_log.getvalue().splitlines()]
    (hook,) = [line for line in lines if line["event"] == "host hook: upstream call"]
    (route,) = [line for line in lines if line["event"] == "host route"]
    assert hook["request_id"] == r.headers["x-request-id"]
    assert hook["trace_id"] == r.headers["x-embedgate-trace-id"]
    assert hook["key_id"] == "team-a"  # bound once the key is known (SPEC 8: host lines carry the key id too)
    assert route["path"] == "/host/page"
    assert "request_id" not in route and "trace_id" not in route and "span_id" not in route and "key_id" not in route
    assert "request_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.anyio
@pytest.mark.parametrize("host_log", [True, False], indirect=True, ids=["merging", "not-merging"])
async def test_the_access_line_names_its_request_and_trace_under_any_host_logging(
    upstream: FakeUpstream, provider: TracerProvider, host_log: io.StringIO
) -> None:
    # The line got its ids only from the bound contextvars: a host chain without merge_contextvars lost them (as
    # did a gateway that could not start, which binds none), though the README says it is found by request id.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"}, headers=AUTH)
    assert r.status_code == 200, r.text
    (line,) = [orjson.loads(x) for x in host_log.getvalue().splitlines() if '"event": "request"' in x]
    assert (line["request_id"], line["trace_id"]) == (r.headers["x-request-id"], r.headers["x-embedgate-trace-id"])
    assert len(line["span_id"]) == 16


@pytest.mark.anyio
async def test_a_failed_load_balanced_request_s_access_line_names_the_model_it_picked(
    upstream: FakeUpstream, provider: TracerProvider, host_log: io.StringIO
) -> None:
    # The request's `model` is ignored under a load balancer: its access line named it all the same when nothing
    # served, where the metrics, the root span and a budget's refusal name the pick.
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    upstream.script.append(Fault("status", 500, model="embed-b"))
    body = {"model": "local/embed-small", "input": "hi", "retry": {"count": 0},
            "load_balancer": {"type": "weight_based", "models": [{"model": "local/embed-b", "weight": 1}]}}  # fmt: skip
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json=body, headers=AUTH)
        unknown = await client.post("/v1/embeddings", json={"model": "nope/x", "input": "hi"}, headers=AUTH)
    assert r.status_code == 502 and unknown.status_code == 404
    failed, missing = [orjson.loads(x) for x in host_log.getvalue().splitlines() if '"event": "request"' in x]
    assert failed["model"] == "local/embed-b" and failed["status"] == 502
    assert missing["model"] == "nope/x"  # resolved to none: the model as sent


@pytest.mark.anyio
async def test_a_request_cut_by_a_hosts_anyio_timeout_still_has_its_access_line_and_metrics(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter, host_log: io.StringIO
) -> None:
    # An anyio cancel scope (a host's timeout middleware) cancels every await of the task once it fires, where
    # asyncio's cancellation comes once: the settle's Redis round trip was cancelled again, which skipped the access
    # line, the metrics and the root span's end (closed as a 500 where the client got a 503).
    workspace = f"ws-anyio-{uuid.uuid4().hex[:12]}"
    keys = [{"id": "team-a", "key": KEY, "workspace": workspace, "project": "search"}]
    budgets = [{"scope": "workspace", "target": workspace, "token_limit": 1_000_000}]
    config = make_config(upstream, redis_url=require_redis(), keys=keys, budgets=budgets)
    gw = EmbeddingGateway(host_404, config=config, tracer_provider=provider)

    async def timeout_middleware(scope: Any, receive: Any, send: Any) -> None:
        with anyio.fail_after(0.3):
            await gw(scope, receive, send)

    upstream.script.append(Fault("slow", delay=1.5))
    transport = httpx.ASGITransport(timeout_middleware, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"}, headers=AUTH)
            metrics = (await client.get("/metrics")).text
    finally:
        await gw.shutdown()
    # Mounted, a cancellation is the host's as often as the server's: the answer says so, not that the gateway stopped.
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_cancelled"
    (line,) = [orjson.loads(x) for x in host_log.getvalue().splitlines() if '"event": "request"' in x]
    assert line["status"] == 503 and line["request_id"] == r.headers["x-request-id"]
    assert line["error"] == "request_cancelled"
    requests = 'embedgate_requests_total{cache="bypass",model="local/embed-small",route="openai",status="503"} 1.0'
    assert requests in metrics
    (root,) = roots(exporter)
    assert root.attributes is not None and root.attributes["http.response.status_code"] == 503


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["asyncio", "anyio"])
async def test_a_hosts_timeout_during_the_settle_keeps_the_access_line_and_lets_the_settle_finish(
    upstream: FakeUpstream, provider: TracerProvider, host_log: io.StringIO, host: str
) -> None:
    # The answer sent, the settle (a Redis round trip) was cut by the host's timeout: no access line, no count in
    # /metrics, and the settle itself cut off, leaving the reservation's estimate counted.
    workspace = f"ws-settle-{uuid.uuid4().hex[:12]}"
    keys = [{"id": "team-a", "key": KEY, "workspace": workspace, "project": "search"}]
    budgets = [{"scope": "workspace", "target": workspace, "token_limit": 1_000_000}]
    slow = asyncio.Event()

    async def slow_scripts(data: bytes) -> None:
        if slow.is_set() and b"EVAL" in data:
            await asyncio.sleep(0.5)

    body = orjson.dumps({"model": "local/embed-small", "input": "a few words to settle"})
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                         (b"content-type", b"application/json")]}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async with redis_proxy(require_redis(), to_redis=slow_scripts) as proxied:
        config = make_config(upstream, redis_url=proxied, keys=keys, budgets=budgets)
        gw = EmbeddingGateway(host_404, config=config, tracer_provider=provider)
        await gw.startup()
        try:
            if host == "asyncio":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(None) as bound:

                        async def send(message: dict[str, Any]) -> None:
                            sent.append(message)
                            if message["type"] == "http.response.body":  # the settle now: slow, and cut at 0.1 s
                                slow.set()
                                bound.reschedule(asyncio.get_running_loop().time() + 0.1)

                        await gw(scope, receive, send)
            else:
                with anyio.CancelScope() as cancel_scope:

                    async def send(message: dict[str, Any]) -> None:
                        sent.append(message)
                        if message["type"] == "http.response.body":
                            slow.set()
                            cancel_scope.deadline = anyio.current_time() + 0.1

                    await gw(scope, receive, send)
                assert cancel_scope.cancelled_caught
            metrics = gw.metrics.render()[0].decode()
            await asyncio.sleep(0.6)  # the settle goes on meanwhile
            slow.clear()
            usage = await gw.budgets.usage() if gw.budgets is not None else []
        finally:
            await gw.shutdown()
    assert sent[0]["status"] == 200
    (line,) = [orjson.loads(x) for x in host_log.getvalue().splitlines() if '"event": "request"' in x]
    assert line["status"] == 200 and line["tokens"] == tokens_of("a few words to settle")
    assert (
        'embedgate_requests_total{cache="bypass",model="local/embed-small",route="openai",status="200"} 1.0' in metrics
    )
    assert usage[0]["tokens"]["used"] == tokens_of("a few words to settle")  # settled: not the estimate


@pytest.mark.anyio
async def test_the_access_lines_latency_ends_when_the_answer_is_sent_not_after_the_settle(
    upstream: FakeUpstream, provider: TracerProvider, host_log: io.StringIO
) -> None:
    # The settle (a Redis round trip) runs after the answer is sent, but the latency was taken after it: a stalled
    # Redis (up to the store's timeout, on every request) showed in the access line as latency no client saw.
    redis_url = require_redis()
    workspace = f"ws-latency-{uuid.uuid4().hex[:12]}"
    keys = [{"id": "team-a", "key": KEY, "workspace": workspace, "project": "search"}]
    budgets = [{"scope": "workspace", "target": workspace, "token_limit": 1_000_000}]
    config = make_config(upstream, redis_url=redis_url, keys=keys, budgets=budgets)
    redis_client = redis.Redis.from_url(redis_url)
    upstream.script.append(Fault("slow", delay=0.4))
    # While the upstream call runs (the reserve made), Redis holds every write (the settle's script) for 0.8 s.
    pause = threading.Timer(0.2, redis_client.execute_command, ("CLIENT", "PAUSE", 800, "WRITE"))
    try:
        async with client_for(EmbeddingGateway(host_404, config=config, tracer_provider=provider)) as client:
            started = time.perf_counter()
            pause.start()
            r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"}, headers=AUTH)
            whole = time.perf_counter() - started  # in process, the app returns after its settle
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-tokens"]  # the budget applied
    finally:
        pause.join()
        for key in redis_client.scan_iter(match=f"eg:b:*{workspace}*", count=1000):
            redis_client.delete(key)
        redis_client.close()
    lines = [orjson.loads(line) for line in host_log.getvalue().splitlines()]
    (line,) = [line for line in lines if line["event"] == "request"]
    assert whole > 0.9
    assert 400 <= line["latency_ms"] < 800


@pytest.mark.anyio
async def test_the_attempt_span_names_the_model_the_upstream_says_answered(
    upstream: FakeUpstream, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # gen_ai.response.model was always the model asked for; OTel's GenAI conventions: the model that generated it.
    vector = base64.b64encode(np.arange(8, dtype="<f4").tobytes()).decode()
    answer = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}],
              "model": "embed-small-2024-07-snapshot", "usage": {"prompt_tokens": 1, "total_tokens": 1}}  # fmt: skip
    upstream.script.append(Fault("raw", 200, headers={"Content-Type": "application/json"}, body=orjson.dumps(answer)))
    gw = EmbeddingGateway(host_404, config=make_config(upstream), tracer_provider=provider)
    async with client_for(gw) as client:
        r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hello"}, headers=AUTH)
        assert r.status_code == 200, r.text
        r = await client.post("/v1/embeddings", json={"model": "local/embed-small", "input": "bye"}, headers=AUTH)
    first, second = attempts_of(exporter.get_finished_spans())
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.request.model"] == "embed-small"
    assert first.attributes["gen_ai.response.model"] == "embed-small-2024-07-snapshot"
    assert second.attributes["gen_ai.response.model"] == "embed-small"  # the fake upstream names the model asked
