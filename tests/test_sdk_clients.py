"""The real clients, unmodified, against a real running proxy and a real local fake upstream."""

from __future__ import annotations

import numpy as np
import pytest
from openai import OpenAI
from openrouter import OpenRouter
from orq_ai_sdk import Orq

from tests.conftest import KEY
from tests.fake_upstream import FakeUpstream, Fault, expected_vector

TEXTS = ["The food was delicious", "and the waiter", "was friendly", "très bien, 谢谢"]


def assert_vectors(got: list[list[float]], model: str, items: list[object]) -> None:
    assert len(got) == len(items)
    for vec, item in zip(got, items, strict=True):
        # float32 values survive the trip bit-exactly, whichever encoding carried them
        np.testing.assert_array_equal(np.asarray(vec, dtype="<f4"), expected_vector(model, item))


def test_openai_python_default_base64(proxy: str, upstream: FakeUpstream) -> None:
    with OpenAI(api_key=KEY, base_url=f"{proxy}/v1", max_retries=0) as client:
        res = client.embeddings.create(model="local/embed-small", input=TEXTS)
    assert res.model == "local/embed-small"
    assert [d.index for d in res.data] == [0, 1, 2, 3]
    assert_vectors([d.embedding for d in res.data], "embed-small", TEXTS)
    assert res.usage.prompt_tokens == sum(len(t.split()) for t in TEXTS)
    (call,) = upstream.calls
    assert call.body["encoding_format"] == "base64"
    assert call.headers["authorization"] == "Bearer provider-secret-local"  # never the client's key


def test_openai_python_float(proxy: str, upstream: FakeUpstream) -> None:
    with OpenAI(api_key=KEY, base_url=f"{proxy}/v1", max_retries=0) as client:
        raw = client.embeddings.with_raw_response.create(
            model="local/embed-small", input="one text", encoding_format="float"
        )
    assert raw.headers["x-embedgate-cache"] == "bypass"
    assert raw.headers["x-request-id"]
    res = raw.parse()
    assert isinstance(res.data[0].embedding[0], float)
    assert_vectors([res.data[0].embedding], "embed-small", ["one text"])


def test_openai_python_float_from_a_float_only_upstream(proxy: str, upstream: FakeUpstream) -> None:
    upstream.always_floats = True  # an upstream that ignores encoding_format: base64
    with OpenAI(api_key=KEY, base_url=f"{proxy}/v1", max_retries=0) as client:
        res = client.embeddings.create(model="local/embed-small", input=TEXTS)  # base64 to the client
    assert_vectors([d.embedding for d in res.data], "embed-small", TEXTS)


def test_openai_python_token_arrays(proxy: str, upstream: FakeUpstream) -> None:
    tokens = [[1, 2, 3], [40, 50]]
    with OpenAI(api_key=KEY, base_url=f"{proxy}/v1", max_retries=0) as client:
        res = client.embeddings.create(model="local/embed-small", input=tokens)
    assert_vectors([d.embedding for d in res.data], "embed-small", tokens)
    assert upstream.calls[0].body["input"] == tokens


def test_orq_sdk_deprecated_orq_block(proxy: str, upstream: FakeUpstream) -> None:
    # The primary fails; the fallback given only in the deprecated orq block must serve.
    upstream.script.append(Fault("status", 500, model="embed-small"))
    with Orq(api_key=KEY, server_url=proxy) as orq:
        res = orq.router.embeddings.create(
            input=TEXTS,
            model="local/embed-small",
            encoding_format="float",
            orq={
                "fallbacks": [{"model": "backup/embed-b"}],
                "retry": {"count": 0, "on_codes": [429]},
                "cache": {"ttl": 3600, "type": "exact_match"},
                "contact": {"id": "contact_01ARZ3NDEKTSV4RRFFQ69G5FAV", "display_name": "Jane Doe"},
                "load_balancer": {"type": "weight_based", "models": [{"model": "local/embed-small", "weight": 1.0}]},
                "timeout": {"call_timeout": 3000},
                "name": "orq-deprecated",
            },
        )
    assert res.model == "backup/embed-b"
    assert_vectors([d.embedding for d in res.data], "embed-b", TEXTS)
    assert [c.body["model"] for c in upstream.calls] == ["embed-small", "embed-b"]


def test_orq_sdk_top_level_fields(proxy: str, upstream: FakeUpstream) -> None:
    with Orq(api_key=KEY, server_url=proxy) as orq:
        res = orq.router.embeddings.create(
            input=TEXTS[:2],
            model="local/embed-small",
            encoding_format="base64",
            dimensions=16,
            name="top-level",
            retry={"count": 1, "on_codes": [500]},
            fallbacks=[{"model": "backup/embed-b"}],
            timeout={"call_timeout": 3000},
        )
    assert res.model == "local/embed-small"
    import base64

    got = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in res.data]
    for vec, text in zip(got, TEXTS[:2], strict=True):
        np.testing.assert_array_equal(vec, expected_vector("embed-small", text, 16))
    assert upstream.calls[0].body["dimensions"] == 16


def test_orq_sdk_strings_and_token_arrays_in_one_call(proxy: str, upstream: FakeUpstream) -> None:
    # Its input type is Union[str, List[Union[str, List[int]]]]: one list may hold both kinds.
    items: list[object] = ["a text", [11, 12, 13]]
    with Orq(api_key=KEY, server_url=proxy) as orq:
        res = orq.router.embeddings.create(input=items, model="local/embed-small")
    assert_vectors([d.embedding for d in res.data], "embed-small", items)
    assert len(upstream.calls) == 2  # one call of each kind


def test_orq_sdk_sees_its_own_error_shape(proxy: str, upstream: FakeUpstream) -> None:
    from orq_ai_sdk import models

    with Orq(api_key="sk-wrong", server_url=proxy) as orq, pytest.raises(models.APIErrorResponse) as info:
        orq.router.embeddings.create(input="x", model="local/embed-small")
    assert info.value.data.error.code == "invalid_api_key"
    assert info.value.data.error.param == "authorization"
    assert not upstream.calls


def test_openrouter_sdk(proxy: str, upstream: FakeUpstream) -> None:
    with OpenRouter(api_key=KEY, server_url=f"{proxy}/api/v1") as client:
        res = client.embeddings.generate(
            input=TEXTS, model="local/embed-small", provider={"order": ["local"], "allow_fallbacks": True}
        )
    assert res.model == "local/embed-small"
    assert res.id
    assert_vectors([d.embedding for d in res.data], "embed-small", TEXTS)  # type: ignore[misc]
    assert res.usage is not None and res.usage.cost == pytest.approx(res.usage.prompt_tokens * 0.02 / 1e6)


def test_openrouter_sdk_lists_the_embedding_models(proxy: str) -> None:
    # embeddings.list_models() (GET /api/v1/embeddings/models) was a 404 the SDK raised as an error.
    from openrouter import errors

    with OpenRouter(api_key=KEY, server_url=f"{proxy}/api/v1") as client:
        listed = client.embeddings.list_models()
        models = {m.id: m for m in listed.result.data}
        assert listed.result.total_count == len(models) and listed.next() is None  # one page
        assert {"local/embed-small", "local/multi", "backup/*"} <= set(models)
        small = models["local/embed-small"]
        assert small.pricing.prompt == "0.00000002"  # 0.02 USD per million tokens, per token
        assert small.architecture.output_modalities == ["embeddings"]
        assert models["local/multi"].pricing.prompt == "0"  # no price known
    with OpenRouter(api_key="sk-wrong", server_url=f"{proxy}/api/v1") as client, pytest.raises(errors.OpenRouterError):
        client.embeddings.list_models()


def test_openrouter_sdk_pages_through_the_embedding_models(proxy: str) -> None:
    # offset and limit were ignored: every page was the whole list, and the SDK's next() never ended.
    from openrouter import errors

    with OpenRouter(api_key=KEY, server_url=f"{proxy}/api/v1") as client:
        everything = [m.id for m in client.embeddings.list_models().result.data]
        page = client.embeddings.list_models(limit=1)
        paged: list[str] = []
        for _ in range(len(everything) + 2):  # bounded: one page per model, and the end
            if page is None:
                break
            assert page.result.total_count == len(everything)
            paged += [m.id for m in page.result.data]
            page = page.next()
        assert page is None and paged == everything
        for bad in ({"offset": -1}, {"limit": 0}, {"limit": 1001}):
            with pytest.raises(errors.OpenRouterError) as info:
                client.embeddings.list_models(**bad)  # type: ignore[arg-type]
            assert '"param":"' + next(iter(bad)) + '"' in info.value.body.replace(" ", "")


def test_openrouter_sdk_sees_its_own_error_shape(proxy: str, upstream: FakeUpstream) -> None:
    from openrouter import errors

    with (
        OpenRouter(api_key=KEY, server_url=f"{proxy}/api/v1") as client,
        pytest.raises(errors.BadRequestResponseError) as info,
    ):
        client.embeddings.generate(input=[], model="local/embed-small")
    assert info.value.data.error.code == 400
    assert "input" in info.value.data.error.message
    assert not upstream.calls


def test_openai_python_sees_its_own_error_shape(proxy: str, upstream: FakeUpstream) -> None:
    import openai

    with (
        OpenAI(api_key=KEY, base_url=f"{proxy}/v1", max_retries=0) as client,
        pytest.raises(openai.NotFoundError) as info,
    ):
        client.embeddings.create(model="nowhere/model", input="x")
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_the_clients_example_runs(proxy: str, upstream: FakeUpstream) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "clients.py"
    env = {**os.environ, "EMBEDGATE_URL": proxy, "EMBEDGATE_DEV_KEY": KEY, "EMBEDGATE_MODEL": "local/embed-small"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "openai-python: local/embed-small" in r.stdout
    assert "orq-ai-sdk: local/embed-small" in r.stdout
    assert "openrouter: local/embed-small" in r.stdout
    assert len(upstream.calls) == 3
