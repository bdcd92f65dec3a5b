"""How the OpenAI adapter reads an upstream's answer: the base64 vectors cut out of the body before the JSON
parse (``cut_vectors``) give exactly what a full parse gives, and anything unusual falls back to the full parse.

The adapter is called through its public ``embed`` with a sender that returns a fixed body, so every check
runs the same code a real upstream call does after the transport.
"""

from __future__ import annotations

import base64
import random

import httpx
import numpy as np
import orjson
import pytest

from embedgate.config import ProviderConfig
from embedgate.errors import UpstreamError
from embedgate.providers import Embeddings
from embedgate.providers.openai import OpenAIAdapter, cut_vectors

pytestmark = pytest.mark.anyio

DIMS = 8


def vec(i: int, dims: int = DIMS) -> bytes:
    return np.arange(i, i + dims, dtype="<f4").tobytes()


def b64(i: int, dims: int = DIMS) -> str:
    return base64.b64encode(vec(i, dims)).decode()


async def answered(body: bytes, n_items: int) -> Embeddings:
    async def send(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, request=request)

    adapter = OpenAIAdapter(ProviderConfig(name="up", type="openai_compatible", base_url="http://127.0.0.1:9"), send)
    return await adapter.embed(upstream_model="m", input=["x"] * n_items, n_items=n_items, dimensions=None,
                               user=None, input_type=None, timeout_s=5)  # fmt: skip


async def embed(body: bytes, n_items: int) -> list[bytes]:
    return (await answered(body, n_items)).vectors


def pair(first: str, second: str) -> bytes:
    """A two-item answer, written by hand (no serializer would write the odd ones)."""
    return b'{"data":[{"index":0,"embedding":%s},{"index":1,"embedding":%s}]}' % (first.encode(), second.encode())


def answer(items: list[dict[str, object]], **extra: object) -> bytes:
    return orjson.dumps({"object": "list", "data": items, "model": "m", "usage": {"prompt_tokens": 3}, **extra})


async def test_a_batch_is_cut_into_a_small_skeleton_and_read_back_in_index_order() -> None:
    order = list(range(256))
    random.Random(7).shuffle(order)
    body = answer([{"object": "embedding", "index": i, "embedding": b64(i, 1536)} for i in order])
    skeleton, cut, texts = cut_vectors(body)
    assert len(body) > 2_000_000 and len(skeleton) < 20_000  # the vectors are out of what the JSON parser sees
    assert sorted(v for v in cut if v is not None) == sorted(vec(i, 1536) for i in range(256))
    assert [bytes(t) for t in texts if t is not None] == [b64(i, 1536).encode() for i in order]
    result = await answered(body, 256)
    assert result.vectors == [vec(i, 1536) for i in range(256)]
    # the upstream's own base64 texts, in input order, to be passed on to base64 clients as they are
    assert [bytes(t) for t in result.b64 or [] if t is not None] == [b64(i, 1536).encode() for i in range(256)]


def test_vectors_of_other_lengths_are_cut_whole_where_the_last_length_is_guessed() -> None:
    # After the first vector, the next text's end is looked for where a text of the same length would end; a
    # shorter one, even with a quote just there (the end of the next value), or a longer one are cut all the same.
    first, short, long = b64(0), b64(1, 4), b64(2, 12)
    trap = "A" * (len(first) - len(short) - len('","y":"'))  # "y" ends where a text as long as first's would
    items = [f'{{"embedding":"{first}"}}', f'{{"embedding":"{short}","y":"{trap}"}}', f'{{"embedding":"{long}"}}',
             f'{{"embedding":"{first}"}}']  # fmt: skip
    body = ('{"data":[' + ",".join(items) + "]}").encode()
    skeleton, cut, texts = cut_vectors(body)
    assert cut == [vec(0), vec(1, 4), vec(2, 12), vec(0)]
    assert [bytes(t) for t in texts if t is not None] == [t.encode() for t in (first, short, long, first)]
    assert orjson.loads(skeleton)["data"][1] == {"embedding": "#1", "y": trap}


async def test_only_a_canonical_base64_text_is_kept_for_passing_on() -> None:
    canonical = b64(0)  # 32 bytes: a padded last group, whose unused bits a lenient encoder may set
    assert canonical.endswith("=")
    lenient = canonical[:-2] + chr(ord(canonical[-2]) + 1) + "="
    body = pair(f'"{canonical}"', f'"{lenient}"')
    result = await answered(body, 2)
    assert result.vectors == [vec(0), vec(0)]  # both decode to the same bytes
    assert result.b64 == [canonical.encode(), None]
    floats = pair(orjson.dumps(np.frombuffer(vec(0), "<f4").tolist()).decode(), f'"{canonical}"')
    assert (await answered(floats, 2)).b64 == [None, canonical.encode()]  # a float list has no text to pass on


@pytest.mark.parametrize(
    "body",
    [
        # whitespace after the colon: not cut, read by the JSON parse
        b'{"data":[{"index":0,"embedding": "%s"},{"index":1,"embedding":"%s"}]}' % (b64(0).encode(), b64(1).encode()),
        # an escaped "/" inside the base64 (valid JSON): left to the JSON parse, which unescapes it
        b'{"data":[{"index":0,"embedding":"%s"},{"index":1,"embedding":"%s"}]}'
        % (base64.b64encode(b"\xff\xff\x7f\x3f" * DIMS).replace(b"/", b"\\/"), b64(1).encode()),  # 0.99999994
        # float lists (a provider ignoring encoding_format) beside a base64 item
        b'{"data":[{"index":0,"embedding":%s},{"index":1,"embedding":"%s"}]}'
        % (orjson.dumps(np.frombuffer(vec(0), "<f4").tolist()), b64(1).encode()),
        # a key that contains the searched text: cut, never referenced, the real items still right
        b'{"x\\"embedding":"%s","data":[{"index":1,"embedding":"%s"},{"index":0,"embedding":"%s"}]}'
        % (b64(9).encode(), b64(1).encode(), b64(0).encode()),
    ],
    ids=["whitespace", "escaped-slash", "floats", "key-trap"],
)
async def test_unusual_but_valid_answers_read_as_a_full_parse_reads_them(body: bytes) -> None:
    expected = []
    for item in sorted(orjson.loads(body)["data"], key=lambda it: it["index"]):
        e = item["embedding"]
        expected.append(base64.b64decode(e) if isinstance(e, str) else np.asarray(e, "<f4").tobytes())
    assert await embed(body, 2) == expected


@pytest.mark.parametrize(
    ("body", "why"),
    [
        # the upstream itself writes "#0" (what a cut leaves behind) for a second item
        (pair(f'"{b64(0)}"', '"#0"'), "base64"),
        (pair(f'"{b64(0)}"', '"#7"'), "base64"),
        (pair(f'"{b64(0)}"', '"#\u00b2"'), "base64"),  # a digit to str.isdigit, not to int(): was a 500
        (pair(f'"{b64(0)}"', '"#' + "1" * 5000 + '"'), "base64"),  # more digits than int() reads: was a 500
        (pair(f'"{b64(0)}"', '"AB$D"'), "base64"),
        (pair(f'"{b64(0)}"', '"AAAA"'), "float32"),
        (pair(f'"{b64(0)}"', f'"{b64(1)}"')[:-2], "not JSON"),
        (pair(f'"{b64(0)}"', f'"{b64(1)}"').replace(b'"index":1', b'"index":0'), "appears twice"),
        (pair(f'"{b64(0)}"', f'"{b64(1, 4)}"'), "different dimensions"),
    ],
    ids=[
        "forged-marker",
        "marker-without-cut",
        "superscript-marker",
        "long-marker",
        "bad-base64",
        "not-float32",
        "cut-short",
        "index-twice",
        "dims",
    ],
)
async def test_malformed_answers_are_refused_as_upstream_malformed(body: bytes, why: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        await embed(body, 2)
    assert caught.value.code == "upstream_malformed"
    assert why in caught.value.message


_NAN_INF = base64.b64encode(np.array([np.nan, np.inf, -np.inf, 1.0] * (DIMS // 4), "<f4").tobytes()).decode()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (pair(f'"{b64(0)}"', f'"{_NAN_INF}"'), "NaN or infinity"),  # cut out and decoded
        (pair(f'"{b64(0)}"', f' "{_NAN_INF}"'), "NaN or infinity"),  # left to the JSON parse
        (pair(f'"{b64(0)}"', str([0.5] * (DIMS - 1) + [1e39])), "beyond float32"),  # inf once a float32
        (pair(f'"{b64(0)}"', "[0.5" + ",0.5" * (DIMS - 2) + ",null]"), "list of numbers"),
        (pair(f'"{b64(0)}"', '["0.5"' + ',"0.5"' * (DIMS - 1) + "]"), "list of numbers"),
        (pair(f'"{b64(0)}"', "[true" + ",false" * (DIMS - 1) + "]"), "list of numbers"),
        (pair(f'"{b64(0)}"', "[true" + ",0.5" * (DIMS - 2) + ",false]"), "list of numbers"),  # were 1.0 and 0.0
        (pair(f'"{b64(0)}"', "[1" + ",0.5" * (DIMS - 2) + ",0]"), None),  # integers are numbers
    ],
    ids=[
        "nan-inf-base64",
        "nan-inf-parsed",
        "float32-overflow",
        "null",
        "strings",
        "booleans",
        "some-booleans",
        "integers",
    ],
)
async def test_vectors_that_are_not_all_finite_numbers_are_refused(body: bytes, why: str | None) -> None:
    # A NaN reached a float client as null (and the cache kept it); strings and booleans were taken as numbers.
    if why is None:
        await embed(body, 2)
        return
    with pytest.raises(UpstreamError) as caught:
        await embed(body, 2)
    assert caught.value.code == "upstream_malformed"
    assert why in caught.value.message


@pytest.mark.parametrize(
    ("usage", "prompt", "total"),
    [
        (b'{"prompt_tokens":7,"total_tokens":9}', 7, 9),
        (b'{"prompt_tokens":7.0}', 7, 7),  # integral floats are counts; total falls back to prompt
        (b'{"prompt_tokens":4294967295}', 4294967295, 4294967295),
        (b"null", -1, -1),
        (b'{"total_tokens":5}', 5, 5),  # the total alone: an embedding's tokens are all prompt tokens
        (b'{"prompt_tokens":"12"}', -1, -1),
        (b'{"prompt_tokens":-5}', -1, -1),
        (b'{"prompt_tokens":3.7}', -1, -1),
        (b'{"prompt_tokens":true}', -1, -1),
        (b'{"prompt_tokens":4294967296}', -1, -1),
        (b'{"prompt_tokens":1e30}', -1, -1),
        (b'{"prompt_tokens":99999999999999999999999}', -1, -1),  # beyond 64 bits: was a 500 when answered
    ],
)
async def test_token_counts_are_whole_numbers_in_range_or_minus_one(usage: bytes, prompt: int, total: int) -> None:
    # -1 tells the router that the upstream gave no count it can charge: it puts its estimate instead.
    body = pair(f'"{b64(0)}"', f'"{b64(1)}"')[:-1] + b',"usage":' + usage + b"}"
    result = await answered(body, 2)
    assert (result.prompt_tokens, result.total_tokens) == (prompt, total)


async def test_an_index_written_as_a_whole_float_places_its_vector() -> None:
    # OpenRouter's schema types an answer's index as a double: 1.0 was refused as a malformed answer (a 502).
    body = answer([{"index": 1.0, "embedding": b64(1)}, {"index": 0.0, "embedding": b64(0)}])
    assert await embed(body, 2) == [vec(0), vec(1)]


@pytest.mark.parametrize("index", [0.5, 2.0, -1.0, float("nan"), True, "0", None, 2, -1])
async def test_an_index_that_is_no_place_of_the_batch_is_a_malformed_answer(index: object) -> None:
    body = answer([{"index": index, "embedding": b64(1)}, {"index": 0, "embedding": b64(0)}])
    with pytest.raises(UpstreamError) as raised:
        await embed(body, 2)
    assert raised.value.code == "upstream_malformed"
    assert "index" in raised.value.message
