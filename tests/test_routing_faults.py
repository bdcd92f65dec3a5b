"""Fault injection through the real gateway against the scripted local fake upstream.

Every test sends requests over httpx's ASGITransport to ``gateway(config)``, whose provider adapters call the
fake upstream over real HTTP. Each fault (429 with Retry-After, 500, 503, a connection dropped mid-response, a
reply slower than the attempt timeout, malformed JSON, the wrong number of vectors, the wrong dimensions) is
checked recovered by a retry, failing without a fallback, and served by a fallback: the HTTP status, the model
that served (``model`` in the body), the exact number of upstream calls, and an upper bound on the elapsed time.
Backoff is kept small (``backoff_base_ms: 10``) and attempts short (``timeout.call_timeout: 300``).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pytest
from structlog.testing import capture_logs

from embedgate.app import create_app
from embedgate.config import Config, parse_config
from embedgate.gateway import EmbeddingGateway
from embedgate.logs import BODY_PARTS, REQUEST_TASK
from tests.conftest import KEY, config_dict, gateway
from tests.fake_upstream import FakeUpstream, Fault, expected_vector, tokens_of
from tests.test_observability_gateway import scrape, value

AUTH = {"authorization": f"Bearer {KEY}"}
PRIMARY, PRIMARY_UP = "local/embed-small", "embed-small"  # a model id and its upstream model name
FALLBACK, FALLBACK_UP = "backup/fb", "fb"
TEXTS = ["alpha beta", "gamma"]
SECRETS = ("provider-secret-local", "provider-secret-backup", KEY)


def routing_config(upstream: FakeUpstream, *, routing: dict[str, Any] | None = None, **overrides: Any) -> Config:
    """The conftest test config with a small backoff, plus ``routing`` settings and other overrides."""
    data = config_dict(upstream.url, routing={"backoff_base_ms": 10, **(routing or {})}, **overrides)
    return parse_config(data, env={})


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, EmbeddingGateway]]:
    """A client bound to a fresh gateway (fresh breakers), shut down afterwards."""
    app = gateway(config)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", timeout=30) as c:
            yield c, app
    finally:
        await app.shutdown()


async def timed_post(c: httpx.AsyncClient, body: dict[str, Any], route: str = "/v1/embeddings"
                     ) -> tuple[httpx.Response, float]:  # fmt: skip
    """POST ``body`` with the test key; the response and the seconds it took."""
    started = time.monotonic()
    r = await c.post(route, json=body, headers=AUTH)
    return r, time.monotonic() - started


def body_for(*, fallbacks: Sequence[str] = (), retry: int | None = 1, **extra: Any) -> dict[str, Any]:
    """A request for PRIMARY with a 300 ms attempt timeout, ``retry.count``, and the given fallbacks."""
    body: dict[str, Any] = {"model": PRIMARY, "input": TEXTS, "timeout": {"call_timeout": 300}, **extra}
    if retry is not None:
        body["retry"] = {"count": retry}
    if fallbacks:
        body["fallbacks"] = [{"model": m} for m in fallbacks]
    return body


def vectors(r: httpx.Response) -> list[np.ndarray[Any, Any]]:
    """The response's vectors as float32 arrays, whatever the encoding."""
    out = []
    for d in r.json()["data"]:
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e, "<f4"))
    return out


def assert_served(r: httpx.Response, model: str, upstream_model: str, texts: list[Any] = TEXTS,
                  dims: int = 8) -> None:  # fmt: skip
    """200, ``model`` names the served model, and the vectors are that upstream model's, in input order."""
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    got = vectors(r)
    assert len(got) == len(texts)
    for vec, text in zip(got, texts, strict=True):
        np.testing.assert_array_equal(vec, expected_vector(upstream_model, text, dims))


# One factory per fault kind; ``model`` scopes the fault to one upstream model.
FAULTS: dict[str, Callable[[str], Fault]] = {
    "429_retry_after": lambda m: Fault("status", 429, retry_after=0.05, model=m),
    "500": lambda m: Fault("status", 500, model=m),
    "503": lambda m: Fault("status", 503, model=m),
    "drop": lambda m: Fault("drop", model=m),
    "slow": lambda m: Fault("slow", delay=1.5, model=m),
    "malformed_json": lambda m: Fault("malformed", model=m),
    "wrong_count": lambda m: Fault("wrong_count", model=m),
    "wrong_dims": lambda m: Fault("wrong_dims", model=m),
}
# The status the client gets once every attempt failed with this fault, and the error code.
FAILED = {kind: (502, "upstream_error") for kind in FAULTS} | {
    "slow": (504, "upstream_timeout"),
    "malformed_json": (502, "upstream_malformed"),
    "wrong_count": (502, "upstream_malformed"),
    "wrong_dims": (502, "upstream_malformed"),
}


def extra_for(kind: str) -> dict[str, Any]:
    # Asking for the dimensions lets the adapter see the wrong count; the learned check is tested separately.
    return {"dimensions": 8} if kind == "wrong_dims" else {}


def bound_for(kind: str, attempts: int) -> float:
    """An upper bound on the elapsed seconds: attempts of a slow fault end at the 300 ms timeout, far below
    the 1.5 s the upstream would take; other faults answer at once and the backoff is ~10-20 ms."""
    return 0.3 * attempts + 0.5 if kind == "slow" else 1.0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(FAULTS))
async def test_fault_recovered_by_a_retry(upstream: FakeUpstream, kind: str) -> None:
    upstream.script.append(FAULTS[kind](PRIMARY_UP))
    async with running(routing_config(upstream)) as (c, _):
        r, elapsed = await timed_post(c, body_for(fallbacks=[FALLBACK], **extra_for(kind)))
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert len(upstream.calls_for(PRIMARY_UP)) == 2
    assert upstream.calls_for(FALLBACK_UP) == []
    assert elapsed < bound_for(kind, 1)
    if kind == "429_retry_after":
        assert elapsed >= 0.05  # the upstream's Retry-After was waited before the retry


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(FAULTS))
async def test_fault_without_fallback_fails_after_the_retries(upstream: FakeUpstream, kind: str) -> None:
    upstream.script.extend([FAULTS[kind](PRIMARY_UP), FAULTS[kind](PRIMARY_UP)])
    async with running(routing_config(upstream)) as (c, _):
        r, elapsed = await timed_post(c, body_for(**extra_for(kind)))
    status, code = FAILED[kind]
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert not any(s in r.text for s in SECRETS)
    assert len(upstream.calls) == len(upstream.calls_for(PRIMARY_UP)) == 2  # 1 + retry.count, nothing else
    assert elapsed < bound_for(kind, 2)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(FAULTS))
async def test_fault_with_fallback_is_served_by_the_fallback(upstream: FakeUpstream, kind: str) -> None:
    upstream.script.extend([FAULTS[kind](PRIMARY_UP), FAULTS[kind](PRIMARY_UP)])
    async with running(routing_config(upstream)) as (c, _):
        r, elapsed = await timed_post(c, body_for(fallbacks=[FALLBACK], **extra_for(kind)))
    assert_served(r, FALLBACK, FALLBACK_UP)
    assert len(upstream.calls_for(PRIMARY_UP)) == 2
    assert len(upstream.calls_for(FALLBACK_UP)) == 1
    assert elapsed < bound_for(kind, 2)


@pytest.mark.anyio
async def test_wrong_dimensions_without_asking_for_dimensions(upstream: FakeUpstream) -> None:
    """Without ``dimensions`` in the request, the model's first answer fixes its dimension count: a 9-dim
    answer of an 8-dim model is malformed, retried, then fallen back from; it never reaches the client."""
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, body_for())
        assert_served(r, PRIMARY, PRIMARY_UP)

        upstream.script.append(FAULTS["wrong_dims"](PRIMARY_UP))
        r, _ = await timed_post(c, body_for())
        assert_served(r, PRIMARY, PRIMARY_UP)
        assert len(upstream.calls_for(PRIMARY_UP)) == 3  # warm-up, the 9-dim answer, its retry

        upstream.script.extend([FAULTS["wrong_dims"](PRIMARY_UP)] * 2)
        r, _ = await timed_post(c, body_for(fallbacks=[FALLBACK]))
        assert_served(r, FALLBACK, FALLBACK_UP)
        assert len(upstream.calls_for(PRIMARY_UP)) == 5
        assert len(upstream.calls_for(FALLBACK_UP)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 413, 422])
async def test_input_errors_are_neither_retried_nor_fallen_back_from(upstream: FakeUpstream, status: int) -> None:
    upstream.script.append(Fault("status", status, model=PRIMARY_UP, message="input too long for this model"))
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, body_for(fallbacks=[FALLBACK], retry=3))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "input too long for this model" in err["message"]
    assert err["param"] == "input"
    assert len(upstream.calls) == len(upstream.calls_for(PRIMARY_UP)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403])
async def test_key_errors_are_logged_and_fallen_back_from_without_retrying(upstream: FakeUpstream, status: int) -> None:
    upstream.script.append(Fault("status", status, model=PRIMARY_UP, message="bad key provider-secret-local"))
    async with running(routing_config(upstream)) as (c, _):
        with capture_logs() as logs:
            # Even listed in on_codes: retrying a refused key cannot help.
            retry = {"count": 3, "on_codes": [401, 403, 503]}
            r, _ = await timed_post(c, {**body_for(fallbacks=[FALLBACK]), "retry": retry})
        assert_served(r, FALLBACK, FALLBACK_UP)
        assert len(upstream.calls_for(PRIMARY_UP)) == 1
        errors = [e for e in logs if e["log_level"] == "error" and e.get("status") == status]
        assert len(errors) == 1 and errors[0]["provider"] == "local"
        assert not any(s in repr(logs) for s in SECRETS)

        upstream.reset()
        upstream.script.append(Fault("status", status, model=PRIMARY_UP))
        r, _ = await timed_post(c, body_for(retry=3))
        assert r.status_code == 502, r.text
        assert len(upstream.calls) == 1


@pytest.mark.anyio
async def test_a_provider_s_own_headers_go_with_every_call_and_are_never_echoed(upstream: FakeUpstream) -> None:
    # Azure OpenAI takes its key as "api-key", not as a bearer token: a provider without api_key and with that
    # header. An upstream error quoting it has it taken out, as the api_key would be.
    azure = {"type": "openai", "base_url": upstream.url, "api_key": "", "timeout_ms": 5000,
             "headers": {"api-key": "azure-secret-0123456789", "X-Title": "acme search"}}  # fmt: skip
    config = parse_config(config_dict(upstream.url, providers={"azure": azure}), env={})
    async with running(config) as (c, _):
        r = await c.post("/v1/embeddings", json={"model": "azure/embed-small", "input": "hi"},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200, r.text
        (call,) = upstream.calls
        assert call.headers["api-key"] == "azure-secret-0123456789" and call.headers["x-title"] == "acme search"
        assert "authorization" not in call.headers
        upstream.script.append(Fault("status", 400, message="key azure-secret-0123456789 is for another resource"))
        with capture_logs() as logs:
            r = await c.post("/v1/embeddings", json={"model": "azure/embed-small", "input": "hi"},
                             headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 400 and "[redacted]" in r.text
        assert "azure-secret" not in r.text and "azure-secret" not in repr(logs)

    # A credential in an Authorization header of a scheme of its own is quoted without the scheme
    token = {**azure, "headers": {"Authorization": "Token tok-0123456789abcdef"}}
    config = parse_config(config_dict(upstream.url, providers={"tok": token}), env={})
    upstream.script.append(Fault("status", 400, message="Incorrect API key provided: tok-0123456789abcdef"))
    async with running(config) as (c, _):
        r = await c.post("/v1/embeddings", json={"model": "tok/embed-small", "input": "hi"},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 400 and "[redacted]" in r.text and "tok-0123" not in r.text


@pytest.mark.anyio
async def test_an_upstream_error_quoting_another_provider_s_key_is_redacted(upstream: FakeUpstream) -> None:
    # Only the provider's own key was taken out: one behind a shared proxy (or given another's key by mistake)
    # quoting the other provider's key passed it to the client, the log and the span.
    other = {"type": "openai", "base_url": upstream.url, "api_key": "other-secret-0123456789", "timeout_ms": 5000}
    config = parse_config(config_dict(upstream.url, providers={"other": other}), env={})
    upstream.script.append(Fault("status", 400, message="key other-secret-0123456789 is not valid for local"))
    async with running(config) as (c, _):
        with capture_logs() as logs:
            r = await c.post("/v1/embeddings", json={"model": "local/embed-small", "input": "hi"},
                             headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400 and "[redacted]" in r.text, r.text
    assert "other-secret" not in r.text and "other-secret" not in repr(logs)


@pytest.mark.anyio
async def test_key_error_on_a_deployment_fails_over_to_the_next_one(upstream: FakeUpstream) -> None:
    upstream.script.append(Fault("status", 401, model="multi-a"))
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, {"model": "local/multi", "input": TEXTS, "retry": {"count": 3}})
    assert_served(r, "local/multi", "multi-b")
    assert len(upstream.calls_for("multi-a")) == 1  # dropped for the request, not cycled back to
    assert len(upstream.calls_for("multi-b")) == 1


@pytest.mark.anyio
async def test_retry_after_is_capped(upstream: FakeUpstream) -> None:
    upstream.script.append(Fault("status", 429, retry_after=30, model=PRIMARY_UP))
    async with running(routing_config(upstream, routing={"max_retry_after_ms": 100})) as (c, _):
        r, elapsed = await timed_post(c, body_for())
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert len(upstream.calls_for(PRIMARY_UP)) == 2
    assert 0.1 <= elapsed < 1.5  # waited the cap, not the 30 s asked


@pytest.mark.anyio
async def test_backoff_is_exponential(upstream: FakeUpstream) -> None:
    # base 100 ms: the waits are 100 and 200 ms, each +-25%: at least 225 ms in all.
    upstream.script.extend([Fault("status", 500, model=PRIMARY_UP)] * 2)
    async with running(routing_config(upstream, routing={"backoff_base_ms": 100})) as (c, _):
        r, elapsed = await timed_post(c, body_for(retry=2))
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert len(upstream.calls_for(PRIMARY_UP)) == 3
    assert 0.225 <= elapsed < 1.5


@pytest.mark.anyio
async def test_default_retry_applies_when_the_request_sets_none(upstream: FakeUpstream) -> None:
    config = routing_config(upstream, routing={"default_retry": {"count": 3}})
    upstream.script.extend([Fault("status", 503, model=PRIMARY_UP)] * 3)
    async with running(config) as (c, _):
        r, _ = await timed_post(c, body_for(retry=None))
        assert_served(r, PRIMARY, PRIMARY_UP)
        assert len(upstream.calls_for(PRIMARY_UP)) == 4

        upstream.reset()
        upstream.script.append(Fault("status", 503, model=PRIMARY_UP))
        r, _ = await timed_post(c, body_for(retry=0))  # the request's own policy wins
        assert r.status_code == 502
        assert len(upstream.calls) == 1


@pytest.mark.anyio
async def test_on_codes_and_fallback_on_codes(upstream: FakeUpstream) -> None:
    only_429 = {"count": 3, "on_codes": [429]}
    async with running(routing_config(upstream)) as (c, _):
        # 500 is not retried (not in on_codes) but is in the default fallback_on_codes: straight to the fallback.
        upstream.script.append(Fault("status", 500, model=PRIMARY_UP))
        r, _ = await timed_post(c, {**body_for(fallbacks=[FALLBACK]), "retry": only_429})
        assert_served(r, FALLBACK, FALLBACK_UP)
        assert len(upstream.calls_for(PRIMARY_UP)) == 1

        # ... and with fallback_on_codes [503], a 500 ends the request: no retry, no fallback.
        upstream.reset()
        upstream.script.append(Fault("status", 500, model=PRIMARY_UP))
        body = {**body_for(fallbacks=[FALLBACK]), "retry": only_429, "fallback_on_codes": [503]}
        r, _ = await timed_post(c, body)
        assert r.status_code == 502
        assert len(upstream.calls) == 1


@pytest.mark.anyio
async def test_deadline_bounds_a_chain_of_slow_models(upstream: FakeUpstream) -> None:
    """3 models x 3 attempts x 300 ms would take 2.7 s; ``deadline_ms: 500`` stops it at 0.5 s with a 504:
    attempt 1 times out at 300 ms, attempt 2 gets the 200 ms left, the fallbacks get nothing."""
    models = [(PRIMARY, PRIMARY_UP), ("backup/slow-a", "slow-a"), ("local/slow-b", "slow-b")]
    for _, up in models:
        upstream.script.extend([Fault("slow", delay=1.5, model=up)] * 3)
    async with running(routing_config(upstream, routing={"deadline_ms": 500})) as (c, _):
        r, elapsed = await timed_post(c, body_for(retry=2, fallbacks=[m for m, _ in models[1:]]))
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert len(upstream.calls_for(PRIMARY_UP)) == 2
    assert len(upstream.calls) == 2
    assert elapsed < 1.0


@pytest.mark.anyio
async def test_the_deadline_bounds_a_fallback_embedding_a_partial_hits_cached_items_again(
    upstream: FakeUpstream,
) -> None:
    # The fallback's second call (the cached item, embedded again by the model that served) had a deadline of
    # its own: 200 after 1.46 s with deadline_ms 1000.
    cached = {"cache": {"type": "exact_match"}, "retry": {"count": 0}, "fallbacks": [{"model": FALLBACK}],
              "timeout": {"call_timeout": 600}}  # fmt: skip
    async with running(routing_config(upstream, routing={"deadline_ms": 1000})) as (c, _):
        r, _ = await timed_post(c, {**cached, "model": PRIMARY, "input": ["cached item"]})
        assert r.status_code == 200
        upstream.script.extend([Fault("slow", delay=1.5, model=PRIMARY_UP),  # times out at 600 ms
                                Fault("slow", delay=0.3, model=FALLBACK_UP),  # serves the new item by 900 ms
                                Fault("slow", delay=0.55, model=FALLBACK_UP)])  # fmt: skip
        r, elapsed = await timed_post(c, {**cached, "model": PRIMARY, "input": ["cached item", "new item"]})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert [call.body["input"] for call in upstream.calls[1:]] == [["new item"], ["new item"], ["cached item"]]
    assert elapsed < 1.35


@pytest.mark.anyio
async def test_a_wait_longer_than_the_deadline_leaves_the_time_to_the_fallback(upstream: FakeUpstream) -> None:
    upstream.script.append(Fault("status", 429, retry_after=5, model=PRIMARY_UP))
    config = routing_config(upstream, routing={"deadline_ms": 1000, "max_retry_after_ms": 10000})
    async with running(config) as (c, _):
        r, elapsed = await timed_post(c, body_for(retry=2, fallbacks=[FALLBACK]))
    assert_served(r, FALLBACK, FALLBACK_UP)
    assert len(upstream.calls_for(PRIMARY_UP)) == 1
    assert elapsed < 0.8  # the 5 s Retry-After was not slept


@pytest.mark.anyio
async def test_every_model_failing_answers_the_last_error(upstream: FakeUpstream) -> None:
    upstream.script.extend([Fault("status", 503, model=PRIMARY_UP)] * 2 + [Fault("slow", delay=1.5,
                                                                                  model=FALLBACK_UP)] * 2)  # fmt: skip
    async with running(routing_config(upstream)) as (c, _):
        r, elapsed = await timed_post(c, body_for(fallbacks=[FALLBACK]))
    assert r.status_code == 504, r.text  # the fallback's timeout, the last error
    assert len(upstream.calls_for(PRIMARY_UP)) == 2
    assert len(upstream.calls_for(FALLBACK_UP)) == 2
    assert elapsed < 1.3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("route", "status_of"),
    [
        ("/v1/embeddings", lambda e: e["code"]),
        ("/v2/router/embeddings", lambda e: e["code"]),
        ("/api/v1/embeddings", lambda e: e["metadata"]["code"]),
    ],
)
async def test_failure_renders_in_each_dialect(
    upstream: FakeUpstream, route: str, status_of: Callable[[dict[str, Any]], str]
) -> None:
    upstream.script.append(Fault("drop", model=PRIMARY_UP))
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, body_for(retry=0), route)
    assert r.status_code == 502
    assert status_of(r.json()["error"]) == "upstream_error"
    assert len(upstream.calls) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("encoding_format", ["base64", "float"])
async def test_a_gzip_compressed_upstream_answer_is_decoded_once(upstream: FakeUpstream, encoding_format: str) -> None:
    """Public APIs gzip their answers when the client accepts it (aiohttp does by default): the vectors must
    come through, decoded once, on the first attempt."""
    upstream.compress = True
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, body_for(retry=0, encoding_format=encoding_format))
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert len(upstream.calls) == 1
    assert "gzip" in upstream.calls[0].headers.get("accept-encoding", "")


# --- the upstream's token counts ---------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["direct", "through httpx (a proxy configured)"])
async def test_an_error_answer_whose_body_cannot_be_decoded_keeps_its_status(
    upstream: FakeUpstream, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its undecodable gzip body made a 429 (Retry-After 0) an "upstream_malformed" answer without a status: the
    # Retry-After was ignored, and a 400 was retried and fallen back from like a broken answer.
    if path != "direct":  # the upstream exempt, but the calls then go through httpx's client machinery
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bad_gzip = {"Content-Encoding": "gzip", "Retry-After": "0"}
    upstream.script.append(Fault("raw", code=429, headers=bad_gzip, body=b"not gzip", model=PRIMARY_UP))
    async with running(routing_config(upstream, routing={"backoff_base_ms": 5000})) as (c, _):
        r, elapsed = await timed_post(c, body_for(retry=1))
        assert_served(r, PRIMARY, PRIMARY_UP)
        assert elapsed < 2.0  # the Retry-After, not a 5 s backoff
        upstream.script.append(Fault("raw", code=400, headers=bad_gzip, body=b"not gzip", model=PRIMARY_UP))
        r, _ = await timed_post(c, body_for(retry=1, fallbacks=[FALLBACK]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "upstream_rejected_input"
    assert len(upstream.calls) == 3


@pytest.mark.anyio
async def test_an_upstream_rejection_names_the_field_the_upstream_names(upstream: FakeUpstream) -> None:
    # Every rejection said param "input": a model that takes no `dimensions` (OpenAI's 400 names it) sent the client
    # looking for a fault in its input. A field the client did not send as such (the model name) stays "input".
    def rejection(param: str | None) -> Fault:
        error = {"message": "This model does not support specifying dimensions.", "type": "invalid_request_error",
                 "param": param, "code": None}  # fmt: skip
        return Fault("raw", code=400, body=orjson.dumps({"error": error}), model=PRIMARY_UP)

    async with running(routing_config(upstream)) as (c, _):
        cases = [("dimensions", "dimensions"), ("input_type", "input_type"), ("model", "input"), (None, "input"),
                 ("user", "input")]  # fmt: skip
        for param, named in cases:  # (no user sent: an upstream naming it names no field of the client's)
            upstream.script.append(rejection(param))
            sent = {**body_for(), "dimensions": 8, "input_type": "query"}
            r = await c.post("/v1/embeddings", json=sent, headers=AUTH)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("upstream_rejected_input", named)
            assert "does not support specifying dimensions" in error["message"]
        # FastAPI's validation errors name it in `detail[].loc` (TEI, Jina, DeepInfra; Mistral within `message`)
        extra = {"type": "extra_forbidden", "loc": ["body", "dimensions"], "msg": "Extra inputs are not permitted"}
        detailed = [
            {"detail": [extra]},
            {"object": "error", "message": {"detail": [extra]}, "type": "invalid_request_error", "param": None},
            {"error": {"message": "bad", "detail": [{"loc": ["body", "input", 0], "msg": "too long"}]}},
            {"detail": [{"loc": ["body", "model"], "msg": "unknown"}]},  # not a field of the client's
            {"detail": [{"loc": [], "msg": "?"}]},
            {"detail": "Not Found"},
        ]
        for answer, named in zip(detailed, ["dimensions", "dimensions", "input", "input", "input", "input"],
                                 strict=True):  # fmt: skip
            upstream.script.append(Fault("raw", code=422, body=orjson.dumps(answer), model=PRIMARY_UP))
            r = await c.post("/v1/embeddings", json={**body_for(), "dimensions": 8}, headers=AUTH)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("upstream_rejected_input", named), answer


ESTIMATE = sum(len(t.encode()) + 2 for t in TEXTS)  # the request's upper bound: UTF-8 bytes + 2 a string
TOKEN_BUDGET = {"scope": "api_key", "target": "team-a", "period": "daily", "token_limit": 1000}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": 5, "total_tokens": 5}, 5),  # what the upstream counted, within the bound
        ({"total_tokens": 5}, 5),  # the total alone: an embedding's tokens are all prompt tokens (was the estimate)
        (None, ESTIMATE),  # no usage: the estimate, not nothing
        ({"prompt_tokens": 0, "total_tokens": 0}, ESTIMATE),  # fewer than one token an input
        ({"prompt_tokens": "12"}, ESTIMATE),
        ({"prompt_tokens": 1e30, "total_tokens": 1e30}, ESTIMATE),  # was a 500, and the budget never settled
        ({"prompt_tokens": 10**15, "total_tokens": 10**15}, ESTIMATE),  # would have used up the day's budget
    ],
    ids=["counted", "total-only", "missing", "zero", "string", "float-1e30", "beyond-the-estimate"],
)
async def test_an_upstream_token_count_is_charged_only_within_the_estimate(
    upstream: FakeUpstream, usage: Any, charged: int
) -> None:
    upstream.script.append(Fault("usage", usage=usage, model=PRIMARY_UP))
    config = routing_config(upstream, budgets=[TOKEN_BUDGET])
    with capture_logs() as logs:
        async with running(config) as (c, _):
            r, _ = await timed_post(c, body_for())
            after, _ = await timed_post(c, body_for())  # answered with the upstream's own count (words: 3)
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert r.json()["usage"] == {"prompt_tokens": charged, "total_tokens": charged}
    # the second request's headers: the first one's settled tokens and its own reservation are taken
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - charged - ESTIMATE
    told = [e for e in logs if "token count" in e["event"]]
    assert len(told) == (0 if charged == 5 else 1) and all(e["provider"] == "local" for e in told)


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["-5", "nan", "soon", "past date"])
async def test_a_retry_after_that_is_no_wait_leaves_the_backoff_to_apply(upstream: FakeUpstream, value: str) -> None:
    # "-5" and "nan" were read as 0 s, and so was a date already past (a skewed clock, a date of this very second):
    # the retries went out at once, with no backoff.
    if value == "past date":
        value = email.utils.formatdate(time.time() - 5, usegmt=True)
    headers = {"Retry-After": value, "Content-Type": "application/json"}
    upstream.script.append(Fault("raw", 429, headers=headers, body=b'{"error":{"message":"slow down"}}',
                                 model=PRIMARY_UP))  # fmt: skip
    async with running(routing_config(upstream, routing={"backoff_base_ms": 300})) as (c, _):
        r, elapsed = await timed_post(c, body_for())
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert 0.225 <= elapsed < 1.5  # the 300 ms backoff, +-25%


@pytest.mark.anyio
async def test_a_fallback_cut_short_by_the_requests_deadline_keeps_its_breaker_closed(upstream: FakeUpstream) -> None:
    # The primary stalls past its 350 ms timeout; the fallback, answering in 150 ms, gets the ~50 ms left of the
    # request's 400 ms. Those timeouts were counted against the fallback: two such requests opened its breaker, and
    # a request for the fallback model itself was then refused as "cooling down", the upstream never called.
    config = routing_config(upstream, routing={"deadline_ms": 400, "breaker_failures": 2})
    body = {**body_for(fallbacks=[FALLBACK], retry=0), "timeout": {"call_timeout": 350}}
    async with running(config) as (c, _):
        for _ in range(2):
            upstream.script += [Fault("slow", delay=1.0, model=PRIMARY_UP), Fault("ok", delay=0.15, model=FALLBACK_UP)]
            r, _ = await timed_post(c, body)
            assert r.status_code == 504
        upstream.reset()
        r, _ = await timed_post(c, {"model": FALLBACK, "input": TEXTS})
        assert_served(r, FALLBACK, FALLBACK_UP)


@pytest.mark.anyio
async def test_a_model_that_ignores_dimensions_does_not_open_its_breaker_for_everyone(upstream: FakeUpstream) -> None:
    # An upstream answering its own size whatever `dimensions` asks (many OpenAI-compatible servers do): one client's
    # two requests (three attempts each) opened the deployment's breaker, and every other client got 503s.
    config = routing_config(upstream, routing={"breaker_failures": 2})
    async with running(config) as (c, _):
        for _ in range(2):
            upstream.script += [Fault("wrong_dims", model=PRIMARY_UP)] * 2
            r, _ = await timed_post(c, {**body_for(), "dimensions": 4})
            assert r.status_code == 502 and "dimensions" in r.json()["error"]["message"]
        upstream.reset()
        r, _ = await timed_post(c, body_for())
    assert_served(r, PRIMARY, PRIMARY_UP)


@pytest.mark.anyio
async def test_a_clients_own_short_call_timeout_does_not_open_the_breaker_for_everyone(upstream: FakeUpstream) -> None:
    # One client's `timeout.call_timeout` of a few ms, below what the deployment takes (~100 ms, measured): its
    # timeouts were held against the deployment, its breaker opened, and every other client and workspace got
    # 503s with a Retry-After for breaker_cooldown_ms, the upstream never called.
    config = routing_config(upstream, routing={"breaker_failures": 2})
    async with running(config) as (c, _):
        upstream.script.append(Fault("ok", delay=0.1, model=PRIMARY_UP))
        assert_served((await timed_post(c, body_for()))[0], PRIMARY, PRIMARY_UP)
        upstream.script += [Fault("slow", delay=0.1, model=PRIMARY_UP)] * 4
        r, _ = await timed_post(c, {**body_for(retry=3), "timeout": {"call_timeout": 5}})
        assert r.status_code == 504 and len(upstream.calls) == 5
        upstream.reset()
        r, _ = await timed_post(c, body_for())
    assert_served(r, PRIMARY, PRIMARY_UP)


@pytest.mark.anyio
async def test_a_deployment_that_hangs_opens_its_breaker_under_clients_short_call_timeouts(
    upstream: FakeUpstream,
) -> None:
    # The other side of the rule above: a 300 ms call timeout is ample for a deployment measured at a few ms, so
    # a deployment that stops answering still opens its breaker although no client gives it its own 30 s.
    config = routing_config(upstream, routing={"breaker_failures": 2})
    body = body_for(fallbacks=[FALLBACK], retry=0)
    async with running(config) as (c, _):
        assert_served((await timed_post(c, body))[0], PRIMARY, PRIMARY_UP)
        for _ in range(2):
            upstream.script += [Fault("slow", delay=1.0, model=PRIMARY_UP)]
            r, _ = await timed_post(c, body)
            assert_served(r, FALLBACK, FALLBACK_UP)
        r, elapsed = await timed_post(c, body)
    assert_served(r, FALLBACK, FALLBACK_UP)
    assert elapsed < 0.25  # the primary's breaker is open: skipped


@pytest.mark.anyio
@pytest.mark.parametrize("configured", [False, True])
async def test_a_model_the_upstream_does_not_know_is_the_clients_404(upstream: FakeUpstream, configured: bool) -> None:
    # A typo through "<provider>/<name>" was a 502, which SDKs retry (three calls for one typo); a model of the
    # config whose upstream_model is wrong stays a 502 (the operator's to mend, and logged as such).
    model = PRIMARY if configured else "local/embed-smal"
    answer = b'{"error":{"message":"The model does not exist","type":"invalid_request_error","code":"model_not_found"}}'
    upstream.script.append(Fault("raw", 404, headers={"Content-Type": "application/json"}, body=answer))
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, {**body_for(), "model": model})
    error = r.json()["error"]
    if configured:
        assert r.status_code == 502
    else:
        assert (r.status_code, error["code"], error["param"]) == (404, "model_not_found", "model")
        assert "local/embed-smal" in error["message"] and len(upstream.calls) == 1


@pytest.mark.anyio
async def test_a_hung_deployment_opens_its_breaker_under_a_deadline_shorter_than_its_timeout(
    upstream: FakeUpstream,
) -> None:
    # With deadline_ms below the call timeout every attempt's timeout was cut by the deadline, and no such timeout
    # counted against the breaker: a hung primary took each request's whole deadline (504), the fallback never ran.
    config = routing_config(upstream, routing={"deadline_ms": 300, "breaker_failures": 2})
    body = body_for(fallbacks=[FALLBACK], retry=0)
    del body["timeout"]  # the provider's own call timeout (30 s), above the deadline
    async with running(config) as (c, _):
        for _ in range(2):
            upstream.script.append(Fault("slow", delay=1.0, model=PRIMARY_UP))
            r, _ = await timed_post(c, body)
            assert r.status_code == 504
        r, elapsed = await timed_post(c, body)
    assert_served(r, FALLBACK, FALLBACK_UP)
    assert elapsed < 0.25  # the primary's breaker is open: skipped


@pytest.mark.anyio
async def test_an_upstream_s_retry_after_reaches_the_client_when_it_fails(upstream: FakeUpstream) -> None:
    # The upstream asked to wait 7 s; the client's 502 said nothing, and its SDK retried after 0.5 s and 1 s into
    # the same rate limit.
    upstream.script.append(Fault("status", 429, retry_after=7, model=PRIMARY_UP))
    async with running(routing_config(upstream)) as (c, _):
        r, _ = await timed_post(c, body_for(retry=0))
    assert r.status_code == 502
    assert r.headers["retry-after"] == "7"


@pytest.mark.anyio
async def test_a_retry_after_http_date_is_waited_for(upstream: FakeUpstream) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    upstream.script.append(Fault("raw", 429, headers={"Retry-After": when}, body=b"{}", model=PRIMARY_UP))
    async with running(routing_config(upstream, routing={"max_retry_after_ms": 5000})) as (c, _):
        r, elapsed = await timed_post(c, body_for())
    assert_served(r, PRIMARY, PRIMARY_UP)
    assert 0.9 <= elapsed < 3.5  # was ignored: the 10 ms backoff


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["/v1/embeddings", "/v2/router/embeddings", "/api/v1/embeddings"])
async def test_an_error_while_writing_the_answer_is_a_500_in_the_routes_shape(upstream: FakeUpstream,
                                                                              route: str) -> None:  # fmt: skip
    class Failing(EmbeddingGateway):
        def _render(self, call: Any) -> list[bytes]:
            raise TypeError("Integer exceeds 64-bit range")

    config = routing_config(upstream, budgets=[TOKEN_BUDGET])
    app = Failing(create_app(config).app, config=config, standalone=True)
    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
            r = await c.post(route, json=body_for(), headers=AUTH)
            usage = await app.budgets.usage(scope="api_key") if app.budgets else None
        await app.shutdown()
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert "error" in r.json() and "Integer" not in r.text  # the route's shape, no traceback
    assert any(e["event"] == "request" and e["status"] == 500 for e in logs)  # the access line was written
    assert usage is not None and usage[0]["tokens"]["used"] == 3  # the upstream's tokens settled, not left reserved


def embed_scope() -> dict[str, Any]:
    """The ASGI scope of an embedding POST with the test key, for an app called directly."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/embeddings",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")],
    }


async def leave_before_the_answer(app: EmbeddingGateway, body: dict[str, Any]) -> None:
    """Call ``app`` with ``body`` as a client that leaves before its answer: its server's ``send`` raises, as ASGI
    2.4 has it (embedgate serve's protocol), and so does the call."""
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if given:
            return {"type": "http.disconnect"}
        given = True
        return {"type": "http.request", "body": orjson.dumps(body)}

    async def send(message: dict[str, Any]) -> None:
        raise ConnectionResetError("the client left")

    with pytest.raises(ConnectionResetError):
        await app(embed_scope(), receive, send)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_client_gone_before_its_body_is_a_499_not_a_server_error(upstream: FakeUpstream) -> None:
    # It was a 500 internal_error in the access line, the root span (ERROR) and the requests metric.
    app = gateway(routing_config(upstream))
    scope = embed_scope()

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    with capture_logs() as logs:
        await app(scope, receive, send)  # type: ignore[arg-type]
    scraped = app.metrics.render()[0].decode()
    await app.shutdown()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    assert 'status="499"' in scraped and 'status="500"' not in scraped


@pytest.mark.anyio
@pytest.mark.parametrize("answer", ["200", "502"])
async def test_a_client_gone_before_its_answer_went_out_is_a_499_billed(upstream: FakeUpstream, answer: str) -> None:
    # Its server said so (send raised an OSError, as ASGI 2.4 has it and embedgate serve's protocol does): the
    # access line and the requests metric said 200, for an answer no client got (an SDK's timeout, say); and 502
    # where the upstream then failed (5xx rates counted answers nobody received).
    app = gateway(routing_config(upstream))
    if answer == "502":
        upstream.script.append(FAULTS["500"](PRIMARY_UP))
    with capture_logs() as logs:
        await leave_before_the_answer(app, {"model": PRIMARY, "input": "gone", "retry": {"count": 0}})
    scraped = app.metrics.render()[0].decode()
    await app.shutdown()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    # the upstream was paid: billed all the same (a failed call, nothing)
    assert line.get("billed_tokens", 0) == (tokens_of("gone") if answer == "200" else 0)
    requests = [row for row in scraped.splitlines() if row.startswith("embedgate_requests_total{")]
    assert len(requests) == 1 and 'status="499"' in requests[0]


@pytest.mark.anyio
async def test_a_client_gone_before_its_answer_still_counts_its_cache_lookups(upstream: FakeUpstream) -> None:
    # Its items were looked up, fetched, paid for and cached, but a 499 was left out of embedgate_cache_items_total
    # (hit ratios read from it left out every client that timed out). A failed request's are not counted.
    app = gateway(routing_config(upstream))
    bodies = [{"model": PRIMARY, "input": ["seen", "new"], "cache": {"type": "exact_match"}, "retry": {"count": 0}}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        warm = {**bodies[0], "input": ["seen"]}
        assert (await c.post("/v1/embeddings", json=warm, headers=AUTH)).status_code == 200  # 1 miss
    await leave_before_the_answer(app, bodies[0])
    upstream.script.append(FAULTS["500"](PRIMARY_UP))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        failed = {**bodies[0], "input": ["other"]}
        assert (await c.post("/v1/embeddings", json=failed, headers=AUTH)).status_code == 502
    scraped = app.metrics.render()[0].decode()
    await app.shutdown()
    items = {row.split("}")[0] + "}": float(row.split()[-1]) for row in scraped.splitlines()
             if row.startswith("embedgate_cache_items_total{")}  # fmt: skip
    # the warm-up's miss, then the 499's hit and miss; the 502's lookup is not counted (nothing was answered)
    assert items == {
        'embedgate_cache_items_total{result="hit"}': 1.0,
        'embedgate_cache_items_total{result="miss"}': 2.0,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["base64", "float"])
async def test_a_server_that_takes_the_body_in_pieces_gets_the_answer_unjoined(upstream: FakeUpstream,
                                                                               encoding: str) -> None:  # fmt: skip
    """Under a server with the ``embedgate.body_parts`` extension (embedgate serve), a base64 answer goes out as its
    pieces (a 256 batch's 2.1 MB is not copied once more to join it); they make the same bytes as a joined body."""
    app = gateway(routing_config(upstream))
    request = orjson.dumps({"model": PRIMARY, "input": TEXTS, "encoding_format": encoding})

    async def answer(extensions: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        scope = {**embed_scope(), "headers": [*embed_scope()["headers"], (b"x-request-id", b"same-id")]}
        if extensions is not None:
            scope["extensions"] = extensions
        messages: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": request}

        class RequestCycle:  # the server's own send (serve_protocol's), which the extension's pieces go to
            def __init__(self, scope: dict[str, Any]) -> None:
                self.scope = scope

            async def send(self, message: dict[str, Any]) -> None:
                messages.append(message)

        await app(scope, receive, RequestCycle(scope).send)  # type: ignore[arg-type]
        return messages[:1], messages[1:]

    (start,), body = await answer({REQUEST_TASK: {}, BODY_PARTS: {}})
    (plain_start,), plain = await answer(None)
    await app.shutdown()
    assert [m["type"] for m in plain] == ["http.response.body"]
    sent = b"".join(body[0]["parts"]) if body[0]["type"] == BODY_PARTS else body[0]["body"]
    assert sent == plain[0]["body"] and dict(start["headers"])[b"content-length"] == b"%d" % len(sent)
    assert dict(plain_start["headers"])[b"content-length"] == b"%d" % len(sent)
    assert orjson.loads(sent)["data"][1]["index"] == 1
    assert [m["type"] for m in body] == [BODY_PARTS if encoding == "base64" else "http.response.body"]


@pytest.mark.anyio
async def test_a_failed_request_paid_for_upstream_shows_its_tokens_and_cost(upstream: FakeUpstream) -> None:
    # A split batch: the first chunk embedded (and billed), the second failed with no fallback. Budgets and the
    # metrics counted the tokens; the access line said nothing of them.
    upstream.script.extend([Fault("ok", model=PRIMARY_UP), Fault("status", 502, model=PRIMARY_UP)])
    config = routing_config(upstream, models={PRIMARY: {"max_inputs": 1, "price_per_million_tokens": 0.02}},
                            routing={"split_concurrency": 1})  # fmt: skip
    with capture_logs() as logs:
        async with running(config) as (c, _):
            r, _ = await timed_post(c, body_for(retry=0))
    assert r.status_code == 502
    (line,) = [e for e in logs if e["event"] == "request"]
    # No answer, so no usage of one: what was billed (as budgets and the tokens metric count it) and its cost.
    assert "tokens" not in line
    assert line["billed_tokens"] == tokens_of(TEXTS[0]) and line["cost_usd"] == pytest.approx(
        tokens_of(TEXTS[0]) * 0.02 / 1e6)  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["asyncio", "anyio"])
async def test_a_request_cancelled_mid_way_keeps_its_attempts_and_what_they_were_paid_for(
    upstream: FakeUpstream, host: str
) -> None:
    # A host's timeout (or the server's graceful shutdown running out) cancelled a split batch after its first
    # chunk was embedded: the access line said 0 attempts and nothing billed, the budget released the reservation.
    # An anyio cancel scope cancelled the wait for the cancelled chunks too: the embedded chunk was not billed. (The
    # chunk cancelled in flight with its request is not: an upstream that hangs would make such bills by the
    # thousand, see Router._estimated.)
    upstream.script.extend([Fault("ok", model=PRIMARY_UP), Fault("slow", delay=3, model=PRIMARY_UP)])
    config = routing_config(upstream, models={PRIMARY: {"max_inputs": 1, "price_per_million_tokens": 0.02}},
                            routing={"split_concurrency": 1})  # fmt: skip
    app = gateway(config)
    await app.startup()
    body = orjson.dumps({**body_for(retry=0), "timeout": {"call_timeout": 5000}})
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "query_string": b"", "root_path": "", "headers": [(b"authorization", f"Bearer {KEY}".encode()),
             (b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http"}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def bounded() -> None:  # as a host bounding its requests
        if host == "asyncio":
            await asyncio.wait_for(app(scope, receive, send), 0.5)
        else:
            with anyio.fail_after(0.5):
                await app(scope, receive, send)

    with capture_logs() as logs:
        with pytest.raises(TimeoutError):
            await bounded()
        await app.shutdown()
    assert sent[0]["status"] == 503
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["attempts"] == 2, line
    assert line["billed_tokens"] == tokens_of(TEXTS[0])
    assert line["cost_usd"] == pytest.approx(tokens_of(TEXTS[0]) * 0.02 / 1e6)


@pytest.mark.anyio
async def test_tokens_a_failed_model_was_paid_for_are_its_own_in_the_metrics_and_billed_in_the_access_line(
    upstream: FakeUpstream,
) -> None:
    # A split batch: the primary embedded the first chunk and failed on the second; the fallback embedded the whole
    # batch. The usage metrics put the primary's tokens and spend under the fallback's label (so per model,
    # tokens x price != spend), and the access line's `tokens` (the answer's usage) did not add up with the budgets.
    upstream.script.extend([Fault("ok", model=PRIMARY_UP), Fault("status", 502, model=PRIMARY_UP)])
    config = routing_config(upstream, models={PRIMARY: {"max_inputs": 1, "price_per_million_tokens": 0.02},
                                              FALLBACK: {"price_per_million_tokens": 1.3}},
                            routing={"split_concurrency": 1})  # fmt: skip
    with capture_logs() as logs:
        async with running(config) as (c, app):
            r, _ = await timed_post(c, body_for(retry=0, fallbacks=[FALLBACK]))
            samples = scrape(app.metrics.render()[0].decode())
    assert r.status_code == 200 and r.json()["model"] == FALLBACK
    answered = tokens_of(TEXTS[0]) + tokens_of(TEXTS[1])
    spent = tokens_of(TEXTS[0])  # the primary's chunk, not in the answer
    assert r.json()["usage"]["prompt_tokens"] == answered
    (line,) = [e for e in logs if e["event"] == "request"]
    assert (line["tokens"], line["billed_tokens"]) == (answered, answered + spent)
    assert line["cost_usd"] == pytest.approx((spent * 0.02 + answered * 1.3) / 1e6)
    key = {"key": "team-a"}
    assert value(samples, "embedgate_tokens_total", **key, model=PRIMARY) == spent
    assert value(samples, "embedgate_spend_usd_total", **key, model=PRIMARY) == pytest.approx(spent * 0.02 / 1e6)
    assert value(samples, "embedgate_tokens_total", **key, model=FALLBACK) == answered
    assert value(samples, "embedgate_spend_usd_total", **key, model=FALLBACK) == pytest.approx(answered * 1.3 / 1e6)


@pytest.mark.anyio
async def test_model_names_a_client_makes_up_share_one_metric_label(upstream: FakeUpstream) -> None:
    # "local/<anything>" routes by its prefix: each made-up name became a label set of the requests, attempts,
    # latency and tokens metrics, until their cap (10,000) folded every new series, real ones too, into "other".
    async with running(routing_config(upstream)) as (c, app):
        for i in range(30):
            r, _ = await timed_post(c, {"model": f"local/flood-{i}", "input": "x"})
            assert r.status_code == 200, r.text
        r, _ = await timed_post(c, {"model": PRIMARY, "input": "x"})
        scraped = app.metrics.render()[0].decode()
    assert "flood-" not in scraped
    (line,) = [ln for ln in scraped.splitlines() if ln.startswith("embedgate_requests_total{") and "local/*" in ln]
    assert line.endswith(" 30.0")
    assert f'model="{PRIMARY}"' in scraped  # a configured model keeps its own label


@pytest.mark.anyio
async def test_a_clients_typo_stays_its_404_wherever_it_was_named(upstream: FakeUpstream) -> None:
    # Held against its breaker, the same typo was a 503 with a Retry-After from its 3rd request (SDKs retry it);
    # through load_balancer it named `model`; as a fallback after a failed primary, the primary's 502 hid it.
    answer = b'{"error":{"message":"The model does not exist","type":"invalid_request_error","code":"model_not_found"}}'

    def not_found() -> Fault:
        return Fault("raw", 404, headers={"Content-Type": "application/json"}, body=answer)

    async with running(routing_config(upstream, routing={"breaker_failures": 2})) as (c, _):
        for _ in range(3):
            upstream.script.append(not_found())
            r, _ = await timed_post(c, {"model": "local/embed-smal", "input": TEXTS})
            assert (r.status_code, r.json()["error"]["param"]) == (404, "model"), r.text
        upstream.script.append(not_found())
        lb = {"type": "weight_based", "models": [{"model": "local/embed-smal", "weight": 1}]}
        r, _ = await timed_post(c, {"model": PRIMARY, "input": TEXTS, "load_balancer": lb})
        assert (r.status_code, r.json()["error"]["param"]) == (404, "load_balancer.models[0].model"), r.text
        upstream.script += [Fault("status", 500, model=PRIMARY_UP)] * 2 + [not_found()]
        r, _ = await timed_post(c, body_for(fallbacks=["local/fb-typo"]))
        assert (r.status_code, r.json()["error"]["param"]) == (404, "fallbacks[0].model"), r.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    "refusal",
    [
        {"error": {"message": "encoding_format 'base64' is not supported", "param": "encoding_format"}},
        {"detail": [{"loc": ["body", "encoding_format"], "msg": "Input should be 'float'", "type": "literal_error"}]},
        {"error": "Unsupported encoding format: base64"},
    ],
    ids=["openai", "fastapi", "message"],
)
async def test_an_upstream_that_refuses_base64_answers_is_asked_for_floats(upstream: FakeUpstream,
                                                                          refusal: dict[str, Any]) -> None:  # fmt: skip
    # The gateway asks every upstream for base64; a server that takes only floats answered 400 naming
    # encoding_format, a field the client never sent: the client got a 400 blaming its input, and no fallback.
    body = orjson.dumps(refusal)
    async with running(routing_config(upstream)) as (c, _):
        code = 422 if "detail" in refusal else 400
        upstream.script.append(Fault("raw", code, headers={"Content-Type": "application/json"}, body=body))
        for encoding in ("float", "base64"):
            r, _ = await timed_post(c, body_for(fallbacks=[FALLBACK], encoding_format=encoding))
            assert_served(r, PRIMARY, PRIMARY_UP)
            assert isinstance(r.json()["data"][0]["embedding"], list if encoding == "float" else str)
        sent = [call.body.get("encoding_format") for call in upstream.calls]
        assert sent == ["base64", None, None]  # refused, asked again for floats at once, and remembered
        # one refusing provider says nothing of another
        r, _ = await timed_post(c, body_for(retry=None) | {"model": FALLBACK})
        assert_served(r, FALLBACK, FALLBACK_UP)
        assert upstream.calls[-1].body["encoding_format"] == "base64"


@pytest.mark.anyio
async def test_an_input_refusal_is_not_taken_for_a_base64_one(upstream: FakeUpstream) -> None:
    refusal = orjson.dumps({"error": {"message": "input is too long for this base model", "param": "input"}})
    async with running(routing_config(upstream)) as (c, _):
        upstream.script.append(Fault("raw", 400, headers={"Content-Type": "application/json"}, body=refusal))
        r, _ = await timed_post(c, body_for(fallbacks=[FALLBACK]))
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
            400, "upstream_rejected_input", "input")  # fmt: skip
        r, _ = await timed_post(c, body_for())
        assert_served(r, PRIMARY, PRIMARY_UP)
        assert [call.body.get("encoding_format") for call in upstream.calls] == ["base64", "base64"]
