"""The OpenAI wire format (``openai`` and ``openai_compatible`` providers): ``POST {base_url}/embeddings``.

Foreign errors are translated here and nowhere else: an httpx/aiohttp timeout becomes ``UpstreamTimeout``, a
refused or dropped connection and any non-2xx status become ``UpstreamError`` (carrying the upstream status and
``Retry-After`` for the router's retry decisions), and an answer that does not hold exactly one well-formed vector
per input becomes ``UpstreamError(code="upstream_malformed")``: never passed on to the client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ..config import ProviderConfig
from ..errors import UpstreamError, UpstreamTimeout
from ..vectors import VectorError, b64_to_bytes, bytes_to_b64, floats_to_bytes
from .base import Embeddings, Sender
from .deadline import deadline

__all__ = ["OpenAIAdapter", "cut_vectors", "take_cut"]

_MAX_MESSAGE = 500


class OpenAIAdapter:
    """Calls an OpenAI-compatible ``/embeddings`` endpoint with the provider's own key (never the client's)."""

    def __init__(self, provider: ProviderConfig, send: Sender) -> None:
        self.name = provider.name
        self._send = send
        self._url = httpx.URL(provider.base_url + "/embeddings")
        self.server_address = urlsplit(provider.base_url).hostname or ""
        self._secret = provider.api_key
        # Every header but the body's length, as raw pairs: with ``stream=`` httpx adds none of its own and
        # normalizes nothing twice (measured: ~4x cheaper than ``content=`` with a header dict).
        self._headers: list[tuple[bytes, bytes]] = [
            (b"Host", self._url.netloc),
            (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json"),
            # As any HTTP client would: public APIs compress their answers (httpx decodes them).
            (b"Accept-Encoding", b"gzip, deflate"),
        ]
        if provider.api_key:
            self._headers.append((b"Authorization", f"Bearer {provider.api_key}".encode("latin-1")))

    async def embed(
        self,
        *,
        upstream_model: str,
        input: Any,
        n_items: int,
        dimensions: int | None,
        user: str | None,
        input_type: str | None,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> Embeddings:
        """Embed ``input`` (``n_items`` items) and return the validated vectors in input order."""
        body: dict[str, Any] = {"model": upstream_model, "input": input, "encoding_format": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        if user is not None:
            body["user"] = user
        if input_type is not None:
            body["input_type"] = input_type
        payload = orjson.dumps(body)
        send_headers = [*self._headers, (b"Content-Length", str(len(payload)).encode())]
        if headers:
            send_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        request = httpx.Request("POST", self._url, headers=send_headers, stream=httpx.ByteStream(payload))
        request.read()  # so that ``request.content`` is there for any transport (one chunk: no copy)
        try:
            async with deadline(timeout_s):
                response = await self._send(request)
                content = response.content
        except (TimeoutError, httpx.TimeoutException) as exc:
            if isinstance(exc, httpx.TimeoutException) and not _is_timeout(exc):
                raise UpstreamError(f"{self.name}: connection failed ({_describe(exc)})") from None
            raise UpstreamTimeout(f"{self.name}: no answer within {timeout_s * 1000:.0f} ms") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{self.name}: connection failed ({_describe(exc)})") from None
        if response.status_code != 200:
            raise UpstreamError(
                f"{self.name} answered {response.status_code}: {self._message(content)}",
                upstream_status=response.status_code,
                retry_after_s=_retry_after(response.headers.get("retry-after")),
            )
        return self._parse(content, n_items, dimensions)

    def _message(self, content: bytes) -> str:
        """The upstream's error message, short, and scrubbed of our provider key should it echo it."""
        try:
            data = orjson.loads(content)
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
            text = str(message) if message else content[:_MAX_MESSAGE].decode("utf-8", "replace")
        except orjson.JSONDecodeError:
            text = content[:_MAX_MESSAGE].decode("utf-8", "replace")
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "[redacted]")
        return text[:_MAX_MESSAGE] or "(empty body)"

    def _parse(self, content: bytes, n_items: int, dimensions: int | None) -> Embeddings:
        def malformed(why: str) -> UpstreamError:
            return UpstreamError(f"{self.name} sent a malformed answer: {why}", code="upstream_malformed")

        skeleton, cut, texts = cut_vectors(content)
        try:
            data = orjson.loads(skeleton)
        except orjson.JSONDecodeError:
            raise malformed("not JSON") from None
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise malformed("no 'data' list")
        if len(items) != n_items:
            raise malformed(f"{len(items)} vectors for {n_items} inputs")
        vectors: list[bytes | None] = [None] * n_items
        b64: list[bytes | memoryview | None] = [None] * n_items
        # One tight loop: a batch runs it once per item (orjson gives plain dict, int and str; bool is not an index).
        for position, item in enumerate(items):
            if type(item) is not dict:
                raise malformed("a data item is not an object")
            index = item.get("index", position)
            if type(index) is not int or not 0 <= index < n_items:
                raise malformed(f"index {index!r} out of range")
            if vectors[index] is not None:
                raise malformed(f"index {index} appears twice")
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
                raise malformed(str(exc)) from None
        size = len(vectors[0])  # type: ignore[arg-type]
        if any(len(v) != size for v in vectors):  # type: ignore[arg-type]
            raise malformed("vectors of different dimensions")
        dims = size // 4
        if dimensions is not None and dims != dimensions:
            raise malformed(f"{dims} dimensions where {dimensions} were asked for")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt = _count(usage.get("prompt_tokens"))
        total = _count(usage.get("total_tokens"), prompt)
        return Embeddings(vectors=vectors, dimensions=dims, prompt_tokens=prompt, total_tokens=total,  # type: ignore[arg-type]
                          b64=b64)  # fmt: skip


_KEY = b'"embedding":"'
_MARK = "#"  # never in a base64 string: a marker in the skeleton can only be one this module wrote


def cut_vectors(content: bytes) -> tuple[bytes, list[bytes | None], list[memoryview | None]]:
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
    while at >= 0:
        start = at + len(_KEY)
        end = find(b'"', start)
        if end < 0:
            break
        text = view[start:end]
        try:
            raw = b64_to_bytes(text)
        except VectorError:
            raw = None
        if raw is not None:
            parts.append(view[copied:start])
            parts.append(b"#%d" % len(vectors))
            vectors.append(raw)
            # Passed on only if canonical: the bits a padded last group leaves unused may be set by a lenient
            # encoder, and a strict decoder would refuse that text (it decodes to the same bytes here).
            tail = len(raw) % 3
            texts.append(text if not tail or bytes_to_b64(raw[-tail:]) == text[-4:] else None)
            copied = end
        at = find(_KEY, end)
    if not vectors:
        return content, [], []
    parts.append(view[copied:])
    return b"".join(parts), vectors, texts


def take_cut(vectors: list[bytes | None], marker: str) -> tuple[bytes, int]:
    """The vector a ``"#<k>"`` marker of :func:`cut_vectors` stands for, and ``k``; each may be taken once."""
    k = int(marker[1:]) if marker[1:].isdigit() else len(vectors)
    vector = vectors[k] if k < len(vectors) else None
    if vector is None:  # no such cut, or a second item naming it: the upstream wrote this "#..." string
        raise VectorError("invalid base64 embedding: not base64")
    vectors[k] = None
    return vector, k


def _count(v: Any, default: int = 0) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for APIs; the router's own backoff applies


def _is_timeout(exc: BaseException) -> bool:
    # Some transports (httpx-aiohttp) map every aiohttp ClientConnectionError, a dropped connection included, to
    # ConnectTimeout: only a real timeout underneath counts as one.
    cause = exc.__cause__
    if cause is None:
        return True
    return isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return type(cause).__name__
