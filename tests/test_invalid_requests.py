"""Every bad request gets a 4xx in its route's error shape, naming the parameter, and nothing goes upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from embedgate import EmbeddingGateway, create_app
from embedgate.config import Config
from embedgate.errors import InvalidRequest
from embedgate.request import parse_request
from tests.conftest import KEY, OTHER_KEY, gateway
from tests.fake_upstream import FakeUpstream

OK = {"model": "local/embed-small", "input": "hello"}


DEEP = orjson.loads("[" * 300 + "]" * 300)  # orjson reads 1024 levels, writes 255
DEEPEST = b"[" * 1000 + b"]" * 1000  # as deep as orjson reads: Python's str() of it raises RecursionError


def body(**changes: Any) -> dict[str, Any]:
    out = dict(OK)
    for k, v in changes.items():
        if v is ...:
            out.pop(k, None)
        else:
            out[k] = v
    return out


# (case id, body (dict, or raw bytes), extra headers, status, param, code)
MM_TYPE = "input[0].content[0].type"
CASES: list[tuple[str, Any, dict[str, str], int, str | None, str | None]] = [
    ("not-json", b"{nope", {}, 400, None, "invalid_json"),
    ("json-array-body", b"[1, 2]", {}, 400, None, None),
    ("missing-model", body(model=...), {}, 400, "model", None),
    ("model-not-string", body(model=7), {}, 400, "model", None),
    ("model-empty", body(model=""), {}, 400, "model", None),
    ("missing-input", body(input=...), {}, 400, "input", None),
    ("input-empty-string", body(input=""), {}, 400, "input", None),
    ("input-empty-array", body(input=[]), {}, 400, "input", None),
    ("input-number", body(input=5), {}, 400, "input", None),
    ("input-null", body(input=None), {}, 400, "input", None),
    ("input-empty-item", body(input=["a", ""]), {}, 400, "input[1]", None),
    ("input-mixed-types", body(input=["a", 3]), {}, 400, "input[1]", None),
    ("input-negative-token", body(input=[1, -2]), {}, 400, "input[1]", None),
    ("input-fractional-token", body(input=[1, 2.5]), {}, 400, "input[1]", None),
    ("input-empty-token-array", body(input=[[1], []]), {}, 400, "input[1]", None),
    # Above 64 bits the JSON encoder stops: such an id used to fail as a 500 on its way upstream.
    (
        "input-huge-token",
        b'{"model": "local/embed-small", "input": [99999999999999999999999]}',
        {},
        400,
        "input[0]",
        None,
    ),
    # A lone UTF-16 surrogate is valid JSON syntax but no text: the error names where it is, escaped or raw.
    (
        "input-lone-surrogate",
        b'{"model": "local/embed-small", "input": ["ok", "a\\ud800b"]}',
        {},
        400,
        "input[1]",
        "invalid_request",
    ),
    (
        "name-lone-surrogate-raw",
        b'{"model": "local/embed-small", "input": "x", "orq": {"name": "\xed\xb0\x80"}}',
        {},
        400,
        "orq.name",
        "invalid_request",
    ),
    (
        "key-lone-surrogate",
        b'{"model": "local/embed-small", "input": "x", "identity": {"id": "u", "\\udc00": 1}}',
        {},
        400,
        "identity",
        "invalid_request",
    ),
    # ... also where the name is repeated later in the body (the last value wins, but the body is refused for the
    # first): it was "not valid JSON", naming nothing.
    (
        "input-lone-surrogate-name-repeated",
        b'{"model": "local/embed-small", "input": "\\ud800", "input": "ok"}',
        {},
        400,
        "input",
        "invalid_request",
    ),
    (
        "dimensions-out-of-range-name-repeated",
        b'{"model": "local/embed-small", "input": "x", "dimensions": 1e400, "dimensions": 8}',
        {},
        400,
        "dimensions",
        "invalid_request",
    ),
    ("input-huge-token-float", body(input=[[7, 1e20]]), {}, 400, "input[0][1]", None),
    # Beyond a double's range: orjson refuses the whole body; the error names the number's place all the same.
    (
        "dimensions-out-of-range",
        b'{"model": "local/embed-small", "input": "x", "dimensions": 1e400}',
        {},
        400,
        "dimensions",
        "invalid_request",
    ),
    (
        "input-token-out-of-range",
        b'{"model": "local/embed-small", "input": [[7, -2e999]]}',
        {},
        400,
        "input[0][1]",
        "invalid_request",
    ),
    (
        "input-token-5000-digits",  # beyond what int() reads (4,300 digits)
        b'{"model": "local/embed-small", "input": [1, 2' + b"0" * 5000 + b"]}",
        {},
        400,
        "input[1]",
        "invalid_request",
    ),
    (
        "input-token-400-digits",
        b'{"model": "local/embed-small", "input": [1' + b"0" * 400 + b"]}",
        {},
        400,
        "input[0]",
        "invalid_request",
    ),
    ("input-token-above-uint32", body(input=[2**32]), {}, 400, "input[0]", None),
    # Values nested beyond what orjson writes, quoted in their error: a 500 with a traceback logged, keyless.
    (
        "encoding-format-deepest",
        b'{"model": "local/embed-small", "input": "x", "encoding_format": ' + DEEPEST + b"}",
        {},
        400,
        "encoding_format",
        None,
    ),
    (
        "input-token-deepest",
        b'{"model": "local/embed-small", "input": [1, ' + DEEPEST + b"]}",
        {},
        400,
        "input[1]",
        None,
    ),
    (
        "cache-type-deepest",
        b'{"model": "local/embed-small", "input": "x", "cache": {"type": ' + DEEPEST + b"}}",
        {},
        400,
        "cache.type",
        None,
    ),
    ("input-bad-multimodal", body(input=[{"content": [{"type": "audio"}]}]), {}, 400, "input[0].content[0].type", None),
    # not a string (a list, an object): unhashable, it was a 500
    ("input-multimodal-type-list", body(input=[{"content": [{"type": [1]}]}]), {}, 400, MM_TYPE, None),
    ("input-multimodal-type-object", body(input=[{"content": [{"type": {"a": 1}}]}]), {}, 400, MM_TYPE, None),
    (
        "input-media-without-data",
        body(input=[{"content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}]),
        {},
        400,
        "input[0].content[0].input_audio.data",
        None,
    ),
    (
        "input-multimodal-no-provider",
        body(input=[{"content": [{"type": "text", "text": "hi"}]}]),
        {},
        400,
        "input",
        None,
    ),
    ("too-many-inputs", body(input=["x"] * 2049), {}, 400, "input", None),
    ("encoding-format", body(encoding_format="int8"), {}, 400, "encoding_format", None),
    ("dimensions-zero", body(dimensions=0), {}, 400, "dimensions", None),
    ("dimensions-fraction", body(dimensions=3.5), {}, 400, "dimensions", None),
    ("dimensions-string", body(dimensions="8"), {}, 400, "dimensions", None),
    ("user-not-string", body(user=5), {}, 400, "user", None),
    ("name-not-string", body(name=["x"]), {}, 400, "name", None),
    ("name-too-long", body(name="n" * 1025), {}, 400, "name", None),
    ("orq-name-too-long", body(orq={"name": "n" * 1025}), {}, 400, "orq.name", None),
    ("unknown-field", body(temperature=0.2), {}, 400, "temperature", "unknown_parameter"),
    ("cache-type", body(cache={"type": "semantic"}), {}, 400, "cache.type", None),
    ("cache-ttl-zero", body(cache={"type": "exact_match", "ttl": 0}), {}, 400, "cache.ttl", None),
    ("cache-ttl-inexact", body(cache={"type": "exact_match", "ttl": 1e300}), {}, 400, "cache.ttl", None),
    ("cache-unknown-key", body(cache={"type": "exact_match", "size": 1}), {}, 400, "cache.size", None),
    ("retry-count-high", body(retry={"count": 6, "on_codes": [500]}), {}, 400, "retry.count", None),
    ("retry-code-bad", body(retry={"count": 1, "on_codes": [700]}), {}, 400, "retry.on_codes[0]", None),
    ("orq-retry-count", body(orq={"retry": {"count": -1, "on_codes": []}}), {}, 400, "orq.retry.count", None),
    ("orq-unknown-key", body(orq={"colour": "red"}), {}, 400, "orq.colour", "unknown_parameter"),
    ("orq-not-object", body(orq="x"), {}, 400, "orq", None),
    ("fallbacks-not-list", body(fallbacks={"model": "x"}), {}, 400, "fallbacks", None),
    ("fallback-no-model", body(fallbacks=[{}]), {}, 400, "fallbacks[0].model", None),
    ("fallbacks-too-many", body(fallbacks=[{"model": "local/embed-small"}] * 11), {}, 400, "fallbacks", None),
    (
        "orq-fallbacks-too-many",
        body(orq={"fallbacks": [{"model": "local/embed-small"}] * 11}),
        {},
        400,
        "orq.fallbacks",
        None,
    ),
    (
        "fallback-unknown-model",
        body(fallbacks=[{"model": "nowhere/x"}]),
        {},
        404,
        "fallbacks[0].model",
        "model_not_found",
    ),
    ("fallback-codes", body(fallback_on_codes=["x"]), {}, 400, "fallback_on_codes[0]", None),
    ("timeout-missing", body(timeout={}), {}, 400, "timeout.call_timeout", None),
    ("timeout-negative", body(timeout={"call_timeout": -5}), {}, 400, "timeout.call_timeout", None),
    ("lb-type", body(load_balancer={"type": "round_robin", "models": []}), {}, 400, "load_balancer.type", None),
    # a model id names spans, log lines and metric labels: a 1 MB one made 1 MB access lines
    ("model-too-long", body(model="local/" + "m" * 251), {}, 400, "model", None),
    ("fallback-too-long", body(fallbacks=[{"model": "local/" + "m" * 251}]), {}, 400, "fallbacks[0].model", None),
    (
        "lb-weight",
        body(load_balancer={"type": "weight_based", "models": [{"model": "local/a", "weight": "x"}]}),
        {},
        400,
        "load_balancer.models[0].weight",
        None,
    ),
    (
        "lb-legacy-weight",
        body(orq={"load_balancer": [{"type": "weight_based", "model": "local/a", "weight": -1}]}),
        {},
        400,
        "orq.load_balancer[0].weight",
        None,
    ),
    (
        "lb-all-zero",
        body(load_balancer={"type": "weight_based", "models": [{"model": "local/a", "weight": 0}]}),
        {},
        400,
        "load_balancer.models",  # was load_balancer, the object the models are in
        None,
    ),
    ("lb-no-models", body(load_balancer={"type": "weight_based", "models": []}), {}, 400, "load_balancer.models", None),
    ("lb-legacy-empty", body(orq={"load_balancer": []}), {}, 400, "orq.load_balancer", None),
    ("identity-no-id", body(identity={"display_name": "x"}), {}, 400, "identity.id", None),
    ("identity-id-too-long", body(identity={"id": "u" * 257}), {}, 400, "identity.id", None),
    ("identity-too-large", body(identity={"id": "u", "metadata": [{"k": "v" * 9000}]}), {}, 400, "identity", None),
    # read 1024 levels deep but written at most 255: it was an uncaught TypeError, a plain-text 500
    ("identity-too-deep", body(identity={"id": "u", "metadata": [{"k": DEEP}]}), {}, 400, "identity.metadata", None),
    (
        "image-detail",
        body(input=[{"content": [{"type": "image_url", "image_url": {"url": "u", "detail": DEEP}}]}]),
        {},
        400,
        "input[0].content[0].image_url.detail",
        None,
    ),
    (
        "provider-quantizations-list",
        body(provider={"quantizations": [["fp8"]]}),
        {},
        400,
        "provider.quantizations[0]",
        None,
    ),
    ("contact-too-large", body(orq={"contact": {"id": "u", "tags": ["t" * 100] * 90}}), {}, 400, "orq.contact", None),
    ("identity-header-too-long", OK, {"x-orq-identity-id": "u" * 257}, 400, "x-orq-identity-id", None),
    ("contact-tags", body(orq={"contact": {"id": "c1", "tags": "vip"}}), {}, 400, "orq.contact.tags", None),
    ("identity-tag-number", body(identity={"id": "u", "tags": ["vip", 5]}), {}, 400, "identity.tags[1]", None),
    ("provider-sort", body(provider={"sort": "random"}), {}, 400, "provider.sort", None),
    ("provider-order-type", body(provider={"order": "local"}), {}, 400, "provider.order", None),
    ("provider-unknown-key", body(provider={"favourite": "local"}), {}, 400, "provider.favourite", None),
    # OpenRouter's own types for the keys that have no effect here (each was accepted whatever it held)
    ("provider-zdr-string", body(provider={"zdr": "yes"}), {}, 400, "provider.zdr", None),
    (
        "provider-require-parameters",
        body(provider={"require_parameters": "x"}),
        {},
        400,
        "provider.require_parameters",
        None,
    ),
    (
        "provider-distillable-number",
        body(provider={"enforce_distillable_text": 3}),
        {},
        400,
        "provider.enforce_distillable_text",
        None,
    ),
    (
        "provider-data-collection",
        body(provider={"data_collection": "maybe"}),
        {},
        400,
        "provider.data_collection",
        None,
    ),
    ("provider-quantizations-string", body(provider={"quantizations": "fp8"}), {}, 400, "provider.quantizations", None),
    (
        "provider-quantization-empty",
        body(provider={"quantizations": ["fp8", ""]}),
        {},
        400,
        "provider.quantizations[1]",
        None,
    ),
    ("provider-options-list", body(provider={"options": []}), {}, 400, "provider.options", None),
    # the options of one provider slug are an object, as OpenRouter types them (5 was taken)
    ("provider-options-slug", body(provider={"options": {"openai": 5}}), {}, 400, "provider.options.openai", None),
    # sort's object form: the bad value named by its path (was "provider.sort"), its keys and types checked
    ("provider-sort-by", body(provider={"sort": {"by": "fastest"}}), {}, 400, "provider.sort.by", None),
    (
        "provider-sort-key",
        body(provider={"sort": {"by": "price", "colour": "red"}}),
        {},
        400,
        "provider.sort.colour",
        None,
    ),
    ("provider-sort-partition", body(provider={"sort": {"partition": 7}}), {}, 400, "provider.sort.partition", None),
    # the rest of max_price: prices as the prompt's (each was taken whatever it held)
    (
        "provider-max-price-completion",
        body(provider={"max_price": {"completion": True}}),
        {},
        400,
        "provider.max_price.completion",
        None,
    ),
    (
        "provider-max-price-image",
        body(provider={"max_price": {"image": -5}}),
        {},
        400,
        "provider.max_price.image",
        None,
    ),
    (
        "provider-max-price-request",
        body(provider={"max_price": {"request": "abc"}}),
        {},
        400,
        "provider.max_price.request",
        None,
    ),
    (
        "provider-max-price-audio",
        body(provider={"max_price": {"audio": [1, 2]}}),
        {},
        400,
        "provider.max_price.audio",
        None,
    ),
    # a price was float()'d: true was 1.0, "nan" and -1 excluded every deployment (a 503)
    (
        "provider-max-price-bool",
        body(provider={"max_price": {"prompt": True}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    (
        "provider-max-price-nan",
        body(provider={"max_price": {"prompt": "nan"}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    (
        "provider-max-price-negative",
        body(provider={"max_price": {"prompt": -1}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    (
        "provider-max-price-word",
        body(provider={"max_price": {"prompt": "cheap"}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    # float() reads these; OpenRouter's numeric strings are plain decimals
    (
        "provider-max-price-underscore",
        body(provider={"max_price": {"prompt": "1_0"}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    (
        "provider-max-price-infinity-word",
        body(provider={"max_price": {"prompt": "infinity"}}),
        {},
        400,
        "provider.max_price.prompt",
        None,
    ),
    ("unknown-model", body(model="nowhere/x"), {}, 404, "model", "model_not_found"),
    ("provider-star-model", body(model="local/*"), {}, 404, "model", "model_not_found"),  # was sent upstream as "*"
    # checked after parsing, named as the client wrote them (they were named in their normalized form)
    ("cache-ttl-above-max", body(cache={"type": "exact_match", "ttl": 259201}), {}, 400, "cache.ttl", None),
    (
        "orq-cache-ttl-above-max",
        body(orq={"cache": {"type": "exact_match", "ttl": 259201}}),
        {},
        400,
        "orq.cache.ttl",
        None,
    ),
    (
        "orq-fallback-unknown-model",
        body(orq={"fallbacks": [{"model": "nowhere/x"}]}),
        {},
        404,
        "orq.fallbacks[0].model",
        "model_not_found",
    ),
    (
        "legacy-lb-unknown-model",
        body(load_balancer=[{"type": "weight_based", "model": "nowhere/x", "weight": 1}]),
        {},
        404,
        "load_balancer[0].model",
        "model_not_found",
    ),
    (
        "orq-lb-unknown-model",
        body(orq={"load_balancer": {"type": "weight_based", "models": [{"model": "nowhere/x", "weight": 1}]}}),
        {},
        404,
        "orq.load_balancer.models[0].model",
        "model_not_found",
    ),
    (
        "orq-fallback-not-granted",
        body(model="backup/x", orq={"fallbacks": [{"model": "local/embed-small"}]}),
        {"authorization": f"Bearer {OTHER_KEY}"},
        403,
        "orq.fallbacks[0].model",
        "model_not_allowed",
    ),
    ("no-key", OK, {"authorization": ""}, 401, "authorization", "invalid_api_key"),
    ("wrong-key", OK, {"authorization": "Bearer sk-nope"}, 401, "authorization", "invalid_api_key"),
    ("basic-auth", OK, {"authorization": "Basic abc"}, 401, "authorization", "invalid_api_key"),
    ("model-not-granted", OK, {"authorization": f"Bearer {OTHER_KEY}"}, 403, "model", "model_not_allowed"),
    ("not-json-content-type", OK, {"content-type": "text/plain"}, 415, "content-type", "unsupported_media_type"),
    # "json" somewhere in the header was enough
    ("json-in-a-parameter", OK, {"content-type": "text/plain; a=json"}, 415, "content-type", "unsupported_media_type"),
    ("json-lines", OK, {"content-type": "application/jsonlines"}, 415, "content-type", "unsupported_media_type"),
    ("compressed-body", OK, {"content-encoding": "gzip"}, 415, "content-encoding", "unsupported_media_type"),
    ("body-too-large", {"model": "local/embed-small", "input": "x" * 70000}, {}, 413, "body", "request_too_large"),
]
ROUTES = ["/v1/embeddings", "/v2/router/embeddings", "/api/v1/embeddings"]


@pytest.fixture
async def client(make_config: Callable[..., Config]) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway(make_config(server={"max_body_bytes": 65536}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        yield c
    await app.shutdown()


@pytest.mark.parametrize(("raw", "where"), [(b'{"model": "m\xff", "input": "x"}', "byte 0xff at offset 12"),
                                           (b"\xe9t\xe9", "byte 0xe9 at offset 0")])  # fmt: skip
def test_a_body_that_is_not_utf8_is_told_so(raw: bytes, where: str) -> None:
    # orjson's message read "str is not valid UTF-8: surrogates not allowed" for a Latin-1 byte: no surrogate in it
    from embedgate.errors import InvalidRequest
    from embedgate.request import parse_request

    with pytest.raises(InvalidRequest) as refused:
        parse_request(raw)
    assert str(refused.value) == f"The request body is not valid UTF-8 ({where}); JSON is sent as UTF-8"
    assert refused.value.code == "invalid_json"


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.anyio
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("case", "payload", "headers", "status", "param", "code"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
async def test_invalid_request(
    client: httpx.AsyncClient,
    upstream: FakeUpstream,
    route: str,
    case: str,
    payload: Any,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()  # stdlib: no depth limit
    sent = {"authorization": f"Bearer {KEY}", "content-type": "application/json", **headers}
    if not sent["authorization"]:
        del sent["authorization"]
    r = await client.post(route, content=content, headers=sent)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    if route == "/api/v1/embeddings":
        assert set(err) <= {"code", "message", "metadata"}
        assert err["code"] == status
        assert err["metadata"].get("param") == param
        if code:
            assert err["metadata"]["code"] == code
    else:
        assert set(err) >= {"message", "type", "param", "code"}
        assert err["param"] == param
        if route == "/v2/router/embeddings":
            assert isinstance(err["code"], str)
        if code:
            assert err["code"] == code
    if param:
        assert param.split(".")[0].split("[")[0] in err["message"] or status in (401, 403, 413, 415)
    # a 401 names the scheme its key goes in (RFC 9110, 15.5.2)
    assert r.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)
    assert "Traceback" not in r.text
    assert KEY not in r.text
    assert not upstream.calls, "nothing may be sent upstream for an invalid request"


@pytest.mark.anyio
@pytest.mark.parametrize("route", [*ROUTES, "/v1/models", "/admin/usage"])
async def test_two_different_authorization_headers_are_refused_not_one_picked(
    make_config: Callable[..., Config], route: str
) -> None:
    # The last one was taken: a proxy in front that adds its own key beside the client's decided whose it was.
    app = gateway(make_config(admin={"key": "adm-test-0123456789abcdef"}))
    two = [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer sk-test-someone-else")]
    # the same key twice (a proxy that repeats it) is one key, however its scheme is written
    same = [("authorization", f"Bearer {KEY}"), ("Authorization", f"bearer  {KEY}")]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        for headers in (two, same):
            r = await (
                c.post(route, json=OK, headers=headers) if "embeddings" in route else c.get(route, headers=headers)
            )
            if headers is same:
                assert r.status_code == (401 if route.startswith("/admin") else 200), r.text
                continue
            assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer"), r.text
            err = r.json()["error"]
            assert "Two different Authorization headers" in err["message"]
            assert (err["metadata"]["param"] if route == "/api/v1/embeddings" else err["param"]) == "authorization"
    await app.shutdown()


@pytest.mark.anyio
async def test_json_content_types_with_parameters_are_accepted(client: httpx.AsyncClient) -> None:
    for ctype in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json", None):
        headers = {"authorization": f"Bearer {KEY}"} | ({"content-type": ctype} if ctype else {})
        r = await client.post("/v1/embeddings", content=orjson.dumps(OK), headers=headers)
        assert r.status_code == 200, (ctype, r.text)


@pytest.mark.anyio
async def test_a_server_handing_a_body_that_is_not_bytes_gets_a_json_500(make_config: Callable[..., Config]) -> None:
    # Any unexpected error while reading the body escaped the gateway: a plain-text 500 and no access line.
    app = gateway(make_config())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": None, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/embeddings", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}  # fmt: skip
    await app(scope, receive, send)
    await app.shutdown()
    assert sent[0]["status"] == 500
    err = orjson.loads(sent[1]["body"])["error"]
    assert (err["code"], err["message"]) == (500, "Internal error in the gateway; see its logs for this request id")


@pytest.mark.anyio
async def test_a_request_cancelled_while_its_body_comes_is_a_503_in_its_shape(
    make_config: Callable[..., Config],
) -> None:
    # The server stopping (its graceful shutdown timed out) while a body was still coming: a plain-text 500 with
    # no request id, no access line, no span and no count in the metrics.
    app = gateway(make_config())
    sent: list[dict[str, Any]] = []
    first = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]

    async def receive() -> dict[str, Any]:
        if first:
            return first.pop()
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/router/embeddings", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"x-request-id", b"req-cut")]}  # fmt: skip
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # answered, then cancelled all the same
    scraped = app.metrics.render()[0].decode()
    await app.shutdown()
    assert sent[0]["status"] == 503 and (b"x-request-id", b"req-cut") in sent[0]["headers"]
    assert (b"retry-after", b"1") in sent[0]["headers"]
    err = orjson.loads(sent[1]["body"])["error"]
    assert err["code"] == "gateway_stopping" and "param" in err  # the orq shape
    assert 'route="orq",status="503"} 1.0' in scraped


@pytest.mark.anyio
async def test_a_refused_model_is_counted_under_its_name(make_config: Callable[..., Config]) -> None:
    # A 403 was counted with model="" (as a model that does not exist), while its access line named it.
    app = gateway(make_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.post("/v1/embeddings", json=OK, headers={"authorization": f"Bearer {OTHER_KEY}"})
        assert r.status_code == 403
        scraped = (await c.get("/metrics")).text
    await app.shutdown()
    assert f'model="{OK["model"]}",route="openai",status="403"}} 1.0' in scraped


def test_the_config_may_be_a_path_object(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("server: {path_prefix: /ai}\n")
    for app in (EmbeddingGateway(host_404, config=path), create_app(path)):
        assert app.config.server.path_prefix == "/ai"


@pytest.mark.anyio
async def test_unknown_fields_can_be_ignored(make_config: Callable[..., Config], upstream: FakeUpstream) -> None:
    app = gateway(make_config(server={"unknown_fields": "ignore"}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.post("/v1/embeddings", json=body(temperature=1), headers={"authorization": f"Bearer {KEY}"})
    await app.shutdown()
    assert r.status_code == 200
    assert "temperature" not in upstream.calls[0].body


@pytest.mark.anyio
async def test_integral_floats_are_integers(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    r = await client.post(
        "/v1/embeddings",
        json=body(dimensions=16.0, input=[[1.0, 2.0]], retry={"count": 1.0, "on_codes": [500.0]}),
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200, r.text
    assert upstream.calls[0].body["dimensions"] == 16
    assert upstream.calls[0].body["input"] == [[1, 2]]


def test_a_key_is_matched_by_its_sha256_and_never_kept_in_clear(make_config: Callable[..., Config]) -> None:
    """Matched keys were remembered by their text (to skip a sha256 a request): the process kept every client key
    in clear, the ones configured only as a sha256 too. A bogus key stays refused however often it comes."""
    import gc

    from embedgate.errors import Unauthorized
    from embedgate.pipeline import KeyIndex

    config = make_config()
    index = KeyIndex(config.keys)
    for i in range(3):
        with pytest.raises(Unauthorized):
            index.authenticate(f"Bearer sk-bogus-{i}")
    first = index.authenticate(f"Bearer {KEY}")
    assert index.authenticate(f"Bearer  {KEY} ") is first
    assert index.authenticate(f"bearer {OTHER_KEY}").id != first.id
    with pytest.raises(Unauthorized):
        index.authenticate(f"Bearer {KEY}x")
    seen: set[int] = set()
    found: list[str] = []
    todo: list[object] = [index]
    while todo:  # everything the index holds, however deep
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            if KEY in obj or OTHER_KEY in obj:
                found.append(obj)
        elif isinstance(obj, dict):  # (the garbage collector does not see a dict's str keys)
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif not isinstance(obj, type):
            todo.extend(gc.get_referents(obj))
    assert found == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'"dimensions": 1e300', "Invalid 'dimensions': must be <= 65536, got 1e+300"),
        (b'"dimensions": 0.0', "Invalid 'dimensions': must be >= 1, got 0.0"),
        (b'"retry": {"count": 99999999999999999999999}', "Invalid 'retry.count': must be <= 5, got 1e+23"),
        (
            b'"cache": {"type": "exact_match", "ttl": 1e300}',
            "Invalid 'cache.ttl': must be an integer within +-9007199254740992, got 1e+300",
        ),
    ],
)
async def test_a_number_out_of_range_is_quoted_as_parsed(client: httpx.AsyncClient, raw: bytes, message: str) -> None:
    """Not as its integer conversion: 1e300 used to come back as an integer of 301 digits."""
    content = b'{"model": "local/embed-small", "input": "hello", ' + raw + b"}"
    r = await client.post("/v1/embeddings", content=content,
                          headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message


@pytest.mark.anyio
async def test_an_identity_within_its_bounds_is_taken(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """256 characters of id and 8 KiB of profile as JSON are the limits, not below them."""
    meta = {"k": "v" * 8000}
    identity = {"id": "u" * 256, "metadata": [meta]}
    meta["k"] = "v" * (8000 - (len(orjson.dumps(identity)) - 8192))
    assert len(orjson.dumps(identity)) == 8192
    r = await client.post("/v1/embeddings", json=body(identity=identity), headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/embeddings", json=OK,
                          headers={"authorization": f"Bearer {KEY}", "x-orq-identity-id": "h" * 256})  # fmt: skip
    assert r.status_code == 200, r.text


@pytest.mark.anyio
async def test_ten_fallbacks_are_taken(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    r = await client.post("/v1/embeddings", json=body(fallbacks=[{"model": "local/embed-small"}] * 10),
                          headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 200, r.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"load_balancer": {}}, "got null"),  # was Python's None
        ({"encoding_format": True}, "got true"),
        ({"cache": {"type": "semantic"}}, 'got "semantic"'),
        ({"provider": {"sort": ["price"]}}, 'got ["price"]'),
    ],
)
async def test_a_value_in_a_message_is_quoted_as_the_client_wrote_it(
    client: httpx.AsyncClient, changes: dict[str, Any], shown: str
) -> None:
    r = await client.post("/v1/embeddings", json=body(**changes), headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith(shown)


async def host_404(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    "raw, names",
    [
        (b'{"model": "local/embed-small", "input": "", "name": "search"}', ("search", "local/embed-small")),
        (
            b'{"model": "local/embed-small", "input": "x", "orq": {"name": "legacy"}, "dimensions": 0}',
            ("legacy", "local/embed-small"),
        ),
        (b'{"model": 7, "input": "x", "name": "n"}', ("n", None)),
        (b"[1, 2]", (None, None)),
        (b"{nope", (None, None)),
    ],
)
def test_a_refused_body_carries_the_name_and_model_it_gives(raw: bytes, names: tuple[str | None, ...]) -> None:
    # Its trace is named after them: read again for that, an 8 MiB body was parsed twice (~0.35 s more, compiled)
    with pytest.raises(InvalidRequest) as refused:
        parse_request(raw)
    assert refused.value.names == names


@pytest.mark.parametrize("tokens", [True, False])
def test_an_input_past_the_hard_limit_says_which_limit(tokens: bool) -> None:
    # One array of token ids is one item: "at most 1000000 items" named the wrong limit for a long one.
    many: list[Any] = [7] * 1_000_001 if tokens else ["x"] * 1_000_001
    with pytest.raises(InvalidRequest) as refused:
        parse_request(orjson.dumps({"model": "local/embed-small", "input": many}))
    what = "token ids" if tokens else "items"
    assert refused.value.param == "input"
    assert refused.value.message == f"Invalid 'input': at most 1000000 {what}, got 1000001"
