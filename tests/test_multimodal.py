"""OpenRouter's multimodal input: forwarded unchanged to providers that accept it, cached per item."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest

from embedgate.config import Config
from tests.conftest import KEY, gateway
from tests.fake_upstream import FakeUpstream, Fault, expected_vector

ITEMS = [
    {"content": [{"type": "text", "text": "a red bicycle"}]},
    {
        "content": [
            {"type": "text", "text": "this photo"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        ]
    },
    # the media parts OpenRouter's SDK types besides images (they were 400s)
    {"content": [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]},
    {
        "content": [
            {"type": "input_video", "input_video": {"data": "https://x/v.mp4"}},
            {"type": "input_file", "input_file": {"data": "JVBERi0=", "format": "pdf"}},
        ]
    },
]


@pytest.mark.anyio
async def test_multimodal_input_goes_to_a_multimodal_provider(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    config = make_config(
        providers={"vision": {"type": "openai_compatible", "base_url": upstream.url, "multimodal": True}},
    )
    app = gateway(config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        for expected_cache in ("miss", "hit"):
            r = await c.post(
                "/api/v1/embeddings",
                json={"model": "vision/mm-embed", "input": ITEMS, "cache": {"type": "exact_match"}},
                headers={"authorization": f"Bearer {KEY}"},
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-embedgate-cache"] == expected_cache
            for item, d in zip(ITEMS, r.json()["data"], strict=True):
                np.testing.assert_array_equal(np.asarray(d["embedding"], "<f4"), expected_vector("mm-embed", item))
        # to a provider without multimodal: true, it is refused before anything is sent
        r = await c.post("/api/v1/embeddings", json={"model": "local/embed-small", "input": ITEMS},
                         headers={"authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 400
    await app.shutdown()
    assert len(upstream.calls) == 1
    assert upstream.calls[0].body["input"] == ITEMS  # forwarded exactly as the client sent it


@pytest.mark.anyio
async def test_a_text_only_fallback_does_not_hide_the_multimodal_models_failure(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # The primary's upstream 500 became a 400 "no deployment accepts multimodal input" blaming the client's input
    # (which SDKs never retry); a text-only primary with a multimodal fallback was refused outright.
    config = make_config(
        providers={"vision": {"type": "openai_compatible", "base_url": upstream.url, "multimodal": True}},
    )
    app = gateway(config)
    no_retry = {"count": 0, "on_codes": [500]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:

        async def post(model: str, fallback: str) -> httpx.Response:
            body = {"model": model, "input": ITEMS, "fallbacks": [{"model": fallback}], "retry": no_retry}
            return await c.post("/api/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})

        upstream.script.append(Fault("status", 500, model="mm-embed"))
        r = await post("vision/mm-embed", "local/embed-small")
        assert r.status_code == 502 and r.json()["error"]["code"] == 502, r.text
        r = await post("local/embed-small", "vision/mm-embed")
        assert r.status_code == 200 and r.json()["model"] == "vision/mm-embed"
        r = await post("local/embed-small", "local/embed-b")  # nothing can take it: the client's input is the cause
        assert r.status_code == 400 and "multimodal" in r.json()["error"]["message"]
        # the multimodal fallback only cooling down: 503 (was a 400 blaming the input, which SDKs never retry)
        app.router.breakers["vision/mm-embed"].open_until = app.router._clock() + 60  # type: ignore[union-attr]
        r = await post("local/embed-small", "vision/mm-embed")
        assert r.status_code == 503 and r.json()["error"]["metadata"]["code"] == "no_upstream_available", r.text
        # but excluded by the request's own provider preferences, it never could: the input's 400 stays
        body = {"model": "local/embed-small", "input": ITEMS, "fallbacks": [{"model": "vision/mm-embed"}],
                "provider": {"ignore": ["vision"]}}  # fmt: skip
        r = await c.post("/api/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and "multimodal" in r.json()["error"]["message"], r.text
    await app.shutdown()
    assert [c.body["model"] for c in upstream.calls] == ["mm-embed", "mm-embed"]


@pytest.mark.anyio
async def test_a_multimodal_model_excluded_by_preferences_is_a_404_not_the_inputs_fault(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # Its only (multimodal) provider does not take input_type, which the request requires: a 400 said no
    # deployment accepts multimodal input, blaming the input, where the preferences excluded the one that does.
    vision = {"type": "openai_compatible", "base_url": upstream.url, "multimodal": True, "accepts_input_type": False}
    app = gateway(make_config(providers={"vision": vision}))
    body = {"model": "vision/mm-embed", "input": ITEMS, "input_type": "q", "provider": {"require_parameters": True}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        r = await c.post("/api/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 404, r.text
        assert (r.json()["error"]["metadata"]["code"], r.json()["error"]["metadata"]["param"]) == (
            "no_allowed_providers",
            "provider",
        ), r.text
        body["provider"] = {}  # left out there instead: served
        r = await c.post("/api/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        assert "input_type" not in upstream.calls[-1].body
    await app.shutdown()


@pytest.mark.anyio
async def test_multimodal_input_with_input_type_is_cached_when_every_multimodal_deployment_takes_it(
    make_config: Callable[..., Config], upstream: FakeUpstream
) -> None:
    # A text-only deployment that leaves input_type out (it can serve no multimodal input) made the request's
    # sending of it look like it depended on the deployment: never cached.
    vision = {"type": "openai_compatible", "base_url": upstream.url, "multimodal": True}
    models = {"acme/mm": {"deployments": [{"provider": "backup", "upstream_model": "text-only"},
                                          {"provider": "vision", "upstream_model": "mm-embed"}]}}  # fmt: skip
    app = gateway(make_config(providers={"vision": vision}, models=models))
    body = {"model": "acme/mm", "input": ITEMS[1:2], "input_type": "q", "cache": {"type": "exact_match"}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as c:
        for expected in ("miss", "hit"):
            r = await c.post("/api/v1/embeddings", json=body, headers={"authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-embedgate-cache"] == expected
    await app.shutdown()
    assert [call.body["input_type"] for call in upstream.calls] == ["q"]
