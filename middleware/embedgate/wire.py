"""An OpenAI-format embeddings answer, read: the base64 vectors cut out of the body and decoded, the rest parsed as
JSON, every item checked. Sync code on every cache miss, compiled with mypyc (``embedgate._native``); the adapter
(``providers/openai.py``) turns :class:`MalformedAnswer` into its ``upstream_malformed`` error.
"""

from __future__ import annotations

from math import isfinite
from typing import Any, Final

import orjson
from numpy import dtype, frombuffer

from .vectors import VectorError, b64_to_bytes, bytes_to_b64, floats_to_bytes

__all__ = ["MalformedAnswer", "count", "cut_vectors", "read_answer", "take_cut", "usage_of"]

#: What :func:`read_answer` returns: vectors, their base64 texts, dimensions, prompt tokens (-1 where the upstream
#: gave no whole number from 0 to ``MAX_COUNT``: the router puts its estimate), total tokens (else the prompt's),
#: and the model the answer names (at most 256 characters; None if it names none).
Answer = tuple[list[bytes], list[bytes | memoryview | None], int, int, int, str | None]
#: The largest token count read from an answer (a 2048-item batch of 8k-token texts is ~16.8M).
MAX_COUNT: Final = 2**32 - 1


class MalformedAnswer(ValueError):
    """The answer is not one well-formed vector per input; the message says what is wrong."""


class DimensionsNotHonoured(MalformedAnswer):
    """Well-formed vectors, of another size than the request's ``dimensions``: the model does not take that
    parameter (many OpenAI-compatible servers ignore it). The client's parameter, not the deployment's fault."""


def read_answer(content: bytes | bytearray, n_items: int, dimensions: int | None) -> Answer:
    """The validated vectors of an answer to ``n_items`` inputs, in input order; :class:`MalformedAnswer` if not."""
    skeleton, cut, texts = cut_vectors(content)
    try:
        data = orjson.loads(skeleton)
    except orjson.JSONDecodeError:
        raise MalformedAnswer("not JSON") from None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise MalformedAnswer("no 'data' list")
    if len(items) != n_items:
        raise MalformedAnswer(f"{len(items)} vectors for {n_items} inputs")
    vectors: list[bytes | None] = [None] * n_items
    b64: list[bytes | memoryview | None] = [None] * n_items
    # One tight loop: a batch runs it once per item (orjson gives plain dict, int and str; bool is not an index).
    for position, item in enumerate(items):
        if type(item) is not dict:
            raise MalformedAnswer("a data item is not an object")
        index = item.get("index", position)
        if type(index) is not int:
            # A whole number written as a float (1.0: OpenRouter's schema types it a double) is that index.
            if type(index) is float and index.is_integer() and 0 <= index < n_items:
                index = int(index)
            else:
                shown = repr(index) if type(index) is float else f"of type {type(index).__name__}"  # (any text)
                raise MalformedAnswer(f"index {shown} is not one of 0 to {n_items - 1}")
        elif not 0 <= index < n_items:
            raise MalformedAnswer(f"index {index} out of range")
        if vectors[index] is not None:
            raise MalformedAnswer(f"index {index} appears twice")
        embedding = item.get("embedding")
        try:
            if type(embedding) is not str:
                vectors[index] = floats_to_bytes(embedding)
            elif embedding[:1] == _MARK:
                vectors[index], k = take_cut(cut, embedding)
                b64[index] = texts[k]
            else:  # a string left in the skeleton (whitespace before it, escapes): decoded, or its error told
                vectors[index] = b64_to_bytes(embedding)
        except VectorError as exc:
            raise MalformedAnswer(str(exc)) from None
    whole: list[bytes] = [v for v in vectors if v is not None]  # every slot is filled: n_items distinct indexes
    size = len(whole[0])
    if any(len(v) != size for v in whole):
        raise MalformedAnswer("vectors of different dimensions")
    dims = size // 4
    if dimensions is not None and dims != dimensions:
        raise DimensionsNotHonoured(f"{dims} dimensions where {dimensions} were asked for")
    # A NaN or an infinity would reach a float client as null, and the cache would keep it. One dot product over
    # all of them is finite exactly when they all are (and no value is beyond ~1e19, which no embedding reaches):
    # ~9k instructions a vector of 1536, half of numpy's isfinite and all (~17k); ~0.06 ms for 256 x 1536.
    values = frombuffer(whole[0] if len(whole) == 1 else b"".join(whole), _F32)
    if not isfinite(float(values.dot(values))):
        raise MalformedAnswer("a vector holds NaN or infinity (or a value beyond 1e19)")
    prompt, total = _usage(data)
    named = data.get("model")
    model = named[:4096] if type(named) is str and named else None  # (cut to 256 once scrubbed: see the adapter)
    return whole, b64, dims, prompt, total, model


def _usage(data: dict[str, Any]) -> tuple[int, int]:
    """An answer's prompt and total tokens (-1 where it gave no whole number)."""
    usage: Any = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    prompt = count(usage.get("prompt_tokens"))
    total = count(usage.get("total_tokens"))
    # an embedding's tokens are all prompt tokens: an upstream that gives only the total gave them
    return prompt if prompt >= 0 else total, total if total >= 0 else prompt


def usage_of(content: bytes | bytearray) -> int:
    """The prompt tokens an answer says it charged, -1 if it says none (for an answer refused after its parse:
    :class:`DimensionsNotHonoured`)."""
    try:
        data = orjson.loads(cut_vectors(content)[0])
    except orjson.JSONDecodeError:
        return -1
    return _usage(data)[0] if isinstance(data, dict) else -1


_F32: Final = dtype("<f4")
_KEY: Final = b'"embedding":"'
_MARK: Final = "#"  # never in a base64 string: a marker in the skeleton can only be one this module wrote


def cut_vectors(content: bytes | bytearray) -> tuple[bytes | bytearray, list[bytes | None], list[memoryview | None]]:
    """The answer with every base64 vector cut out and decoded: ``(skeleton, vectors, texts)``.

    A batch answer is ~2 MB of base64 strings; parsing it as JSON made a Python str of every vector (~1 ms for
    256 x 1536) only to decode it after. Here each ``"embedding":"<base64>"`` is found with ``bytes.find``,
    decoded from a view of the body, and replaced in the skeleton by ``"#<k>"``, ``k`` its place in
    ``vectors``; the skeleton, a few hundred bytes, is then parsed as JSON like the whole answer would be.
    A string is cut only when it decodes as a whole float32 vector: anything else (a JSON escape,
    a quote inside, bad base64) stays in the skeleton, where the JSON parse and the usual decoding judge it.
    An occurrence that is not a real ``embedding`` member (inside a key, say) is cut but never referenced.
    ``texts[k]`` is the base64 text of ``vectors[k]``, a view of ``content`` (None if not canonical).
    """
    find = content.find
    at = find(_KEY)
    if at < 0:
        return content, [], []
    view = memoryview(content)
    parts: list[bytes | memoryview] = []
    vectors: list[bytes | None] = []
    texts: list[memoryview | None] = []
    copied = 0  # content[:copied] is in parts
    width = -1  # the length of the last vector's text: the next one is most likely as long
    while at >= 0:
        start = at + len(_KEY)
        end = start + width
        raw: bytes | None = None
        if width > 0 and end < len(content) and content[end] == 0x22:  # '"' where the same length would end
            # No search for the quote: a shorter string would put its quote (not base64) inside the text, which
            # the decoding refuses; then the quote is searched for as usual.
            raw = _vector_or_none(view[start:end])
        if raw is None:
            end = find(b'"', start)
            if end < 0:
                break
            raw = _vector_or_none(view[start:end])
        text = view[start:end]
        if raw is not None:
            parts.append(view[copied:start])
            parts.append(b"#%d" % len(vectors))
            vectors.append(raw)
            # Passed on only if canonical: the bits a padded last group leaves unused may be set by a lenient
            # encoder, and a strict decoder would refuse that text (it decodes to the same bytes here).
            tail = len(raw) % 3
            texts.append(text if not tail or bytes_to_b64(raw[-tail:]) == text[-4:] else None)
            copied = end
            width = end - start
        at = find(_KEY, end)
    if not vectors:
        return content, [], []
    parts.append(view[copied:])
    return b"".join(parts), vectors, texts


def _vector_or_none(text: memoryview) -> bytes | None:
    try:
        return b64_to_bytes(text)
    except VectorError:
        return None


def take_cut(vectors: list[bytes | None], marker: str) -> tuple[bytes, int]:
    """The vector a ``"#<k>"`` marker of :func:`cut_vectors` stands for, and ``k``; each may be taken once."""
    digits = marker[1:]
    # ASCII digits only, and few: int() also takes other Unicode digits ("²" raised ValueError) and refuses more
    # than 4300 digits (ValueError too): an upstream's own "#..." string was a 500, not a malformed answer.
    k = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 18 else len(vectors)
    vector = vectors[k] if k < len(vectors) else None
    if vector is None:  # no such cut, or a second item naming it: the upstream wrote this "#..." string
        raise VectorError("invalid base64 embedding: not base64")
    vectors[k] = None
    return vector, k


def count(v: Any) -> int:
    """A token count as the upstream wrote it: a whole number from 0 to ``MAX_COUNT`` (``3.0`` too), else -1."""
    if type(v) is float and v.is_integer() and 0 <= v <= MAX_COUNT:
        return int(v)
    return v if type(v) is int and 0 <= v <= MAX_COUNT else -1
