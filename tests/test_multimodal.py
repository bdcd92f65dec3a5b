"""OpenRouter's multimodal input: forwarded unchanged to providers that accept it, cached per item."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import pytest

from embedgate.config import Config
from tests.conftest import KEY, gateway
from tests.fake_upstream import FakeUpstream, expected_vector

ITEMS = [
    {"content": [{"type": "text", "text": "a red bicycle"}]},
    {
        "content": [
            {"type": "text", "text": "this photo"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
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
