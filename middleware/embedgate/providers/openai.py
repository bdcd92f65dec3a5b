"""The OpenAI wire format (``openai`` and ``openai_compatible`` providers): ``POST {base_url}/embeddings``.

Foreign errors are translated here and nowhere else: an httpx/aiohttp timeout becomes ``UpstreamTimeout``, a
refused or dropped connection and any non-2xx status become ``UpstreamError`` (carrying the upstream status and
``Retry-After`` for the router's retry decisions), and an answer that does not hold exactly one well-formed vector
per input becomes ``UpstreamError(code="upstream_malformed")``: never passed on to the client.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote, quote_plus, urlsplit

import httpx
import orjson
import structlog

from ..config import ProviderConfig
from ..errors import UpstreamError, UpstreamTimeout
from ..wire import DimensionsNotHonoured, MalformedAnswer, cut_vectors, read_answer, take_cut, usage_of
from .base import Embeddings, Sender, gen_ai_provider_name
from .deadline import deadline
from .http1 import SENDING, Http1Transport, decoded_answer, header_value, origin_of, request_head
from .proxies import proxy_secrets

__all__ = ["OpenAIAdapter", "cut_vectors", "take_cut"]

_MAX_MESSAGE: Final = 500
#: A key's first characters: echoed cut short in an error (at least this many, as long as they match), taken out too.
#: Fewer may be only the kind of key ("sk-proj-", "sk-ant-api03-"), which says nothing secret.
_PIECE: Final = 16
_MAX_MODEL: Final = 256  # the most of an answer's model name kept (a span attribute)

log = structlog.get_logger("embedgate.providers")


class OpenAIAdapter:
    """Calls an OpenAI-compatible ``/embeddings`` endpoint with the provider's own key (never the client's)."""

    def __init__(self, provider: ProviderConfig, send: Sender, others: Sequence[ProviderConfig] = ()) -> None:
        self.name = provider.name
        #: Whether calls ask for base64 answers (a third of the floats' text, read without parsing a number): until
        #: the upstream refuses them.
        self.base64 = True
        self._send = send
        # "/embeddings" goes on the path: a base_url's query (Azure's ?api-version=) stays the query.
        base = httpx.URL(provider.base_url)
        self._url = base.copy_with(path=base.path.rstrip("/") + "/embeddings")
        parts = urlsplit(provider.base_url)
        self.server_address = parts.hostname or ""
        self.server_port: int | None = parts.port or (443 if parts.scheme == "https" else 80)
        self.gen_ai_provider = gen_ai_provider_name(self.server_address) or provider.name
        self._secret = provider.api_key
        # The key as an error body may echo it (see _secret_forms). An error, and the answer's model name, are
        # scrubbed of the other providers' keys too (``others``): an upstream behind a shared proxy, or given
        # another's key by mistake, may quote them; and of the environment's proxy credentials (a proxy's error page
        # may quote its Proxy-Authorization).
        proxies = proxy_secrets()
        self._error_forms = _secret_forms([provider, *others], proxies)
        self._models: dict[str, str] = {}  # the model names answers gave, scrubbed (see _parse)
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
        self._headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in provider.headers]
        # Sending through embedgate's own transport (the default), the request goes as bytes: its line and fixed
        # headers written once here, no httpx.Request or httpx.Response per call. Any other transport or client
        # (an httpx.MockTransport, an injected AsyncClient, the proxy routes) gets httpx objects.
        owner = getattr(send, "__self__", None)
        self._direct: Http1Transport | None = owner if type(owner) is Http1Transport else None
        self._origin = origin_of(self._url)
        self._head = b"".join(request_head(b"POST", self._url.raw_path, self._headers))

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
        body: dict[str, Any] = {"model": upstream_model, "input": input}
        if self.base64:
            body["encoding_format"] = "base64"
        if dimensions is not None:
            body["dimensions"] = dimensions
        if user is not None:
            body["user"] = user
        if input_type is not None:
            body["input_type"] = input_type
        try:
            async with deadline(timeout_s):
                status, answer_headers, content = await self._exchange(orjson.dumps(body), headers)
                if status in _REFUSALS and "encoding_format" in body and _refuses_base64(*self._error(content)[:2]):
                    # A server that takes no base64 answers (its 400 or 422 names encoding_format, which the client
                    # did not send: it is ours): asked for floats from now on, this call at once, within its time.
                    if self.base64:  # (told once: the calls in flight at that moment are refused alike)
                        self.base64 = False
                        log.warning("upstream refuses base64 answers: asking it for floats", provider=self.name,
                                    status=status)  # fmt: skip
                    del body["encoding_format"]
                    told = SENDING.get()  # (its attempt span says floats)
                    if told is not None and len(told) > 1:
                        told[1] = 1
                    status, answer_headers, content = await self._exchange(orjson.dumps(body), headers)
        except (TimeoutError, httpx.TimeoutException) as exc:
            if isinstance(exc, httpx.TimeoutException) and not _is_timeout(exc):
                raise UpstreamError(f"{self.name}: connection failed ({_describe(exc)})") from None
            raise UpstreamTimeout(f"{self.name}: no answer within {timeout_s * 1000:.0f} ms") from None
        except httpx.DecodingError as exc:
            raise UpstreamError(f"{self.name} sent a malformed answer: its body could not be decoded ({exc})",
                                code="upstream_malformed") from None  # fmt: skip
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{self.name}: connection failed ({_describe(exc)})") from None
        if not 200 <= status < 300:  # any 2xx carries an answer (201 is NestJS's default for a POST)
            retry_after = header_value(answer_headers, b"retry-after")
            message, param, code = self._error(content)
            raise UpstreamError(
                f"{self.name} answered {status}: {message}",
                upstream_status=status,
                retry_after_s=_retry_after(retry_after.decode("latin-1") if retry_after is not None else None),
                # the field it names, where it is one the client sent and this call sent on
                upstream_param=param if param in _CLIENT_PARAMS and param in body else None,
                upstream_code=code,
            )
        return self._parse(content, n_items, dimensions)

    async def _exchange(self, payload: bytes, headers: dict[str, str] | None
                        ) -> tuple[int, Any, bytes | bytearray]:  # fmt: skip
        """One call: the upstream's status, headers (raw pairs) and body, decoded."""
        length = str(len(payload)).encode()
        direct = self._direct
        if direct is not None:  # the request's bytes straight to the transport: no httpx objects
            wire = [self._head, b"Content-Length: ", length, b"\r\n"]
            if headers:
                for k, v in headers.items():
                    wire += (k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n")
            wire += (b"\r\n", payload)
            status, answer_headers, content = await direct.exchange(self._origin, b"".join(wire))
            if header_value(answer_headers, b"content-encoding") is not None:
                content = decoded_answer(status, answer_headers, content)
            return status, answer_headers, content
        response = await self._send(self._request(length, headers, payload))
        return response.status_code, response.headers.raw, response.content

    def _request(self, length: bytes, headers: dict[str, str] | None, payload: bytes) -> httpx.Request:
        """The call as an httpx request, for a transport or client other than ``Http1Transport`` itself: the
        same headers in the same order as the bytes of the direct path."""
        send_headers = [*self._headers, (b"Content-Length", length)]
        if headers:
            send_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        request = httpx.Request("POST", self._url, headers=send_headers, stream=httpx.ByteStream(payload))
        request.read()  # so that ``request.content`` is there for any transport (one chunk: no copy)
        return request

    def _error(self, content: bytes | bytearray) -> tuple[str, str | None, str | None]:
        """The upstream's error message, short, and scrubbed of the providers' keys should it echo one; and the
        field its error names (OpenAI's ``{"error": {"param": ...}}``), if any."""
        forms = self._error_forms
        # Cut after the key is taken out, reading far enough that no piece of a key cut in two (no longer found)
        # can end up within the message: every key taken out before it shortens the text (to "[redacted]"), and
        # a byte is at least a quarter of a character. A piece starting at byte p stays at character
        # >= min(10 p / len, p / 4) >= _MAX_MESSAGE for p >= 50 len + 4 _MAX_MESSAGE.
        window = 51 * (len(forms[0]) if forms else 0) + 4 * _MAX_MESSAGE
        param: str | None = None
        code: str | None = None
        try:
            data = orjson.loads(content)
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
            named = err.get("param") if isinstance(err, dict) else None
            param = named if isinstance(named, str) else _detail_field(data, err)
            given = err.get("code") if isinstance(err, dict) else None
            code = given if isinstance(given, str) else None
            # any other JSON is shown re-written: its strings decoded, so an escaped key is found as well
            text = str(message) if message else orjson.dumps(data).decode()
        except orjson.JSONDecodeError:
            text = content[:window].decode("utf-8", "replace")
        return _scrubbed(text[:window], forms, pieces=True)[:_MAX_MESSAGE] or "(empty body)", param, code

    def _parse(self, content: bytes | bytearray, n_items: int, dimensions: int | None) -> Embeddings:
        try:
            vectors, b64, dims, prompt, total, model = read_answer(content, n_items, dimensions)
        except DimensionsNotHonoured as wrong_size:  # its own name: compiled, one name has one type (see _native)
            tokens = usage_of(content)  # (billed, within an answer's bounds: see the router)
            raise UpstreamError(
                f"{self.name} sent a malformed answer: {wrong_size} (does the model take 'dimensions'?)",
                code="upstream_malformed",
                rejects_input=True,
                served=True,
                served_tokens=tokens if tokens > 0 else None,
            ) from None
        except MalformedAnswer as exc:
            raise UpstreamError(f"{self.name} sent a malformed answer: {exc}", code="upstream_malformed") from None
        if model is not None:  # it becomes a span attribute: no echoed key in it (scrubbed whole, then cut)
            clean = self._models.get(model)
            if clean is None:
                clean = _scrubbed(model, self._error_forms, pieces=True)[:_MAX_MODEL] if self._error_forms else (
                    model[:_MAX_MODEL])  # fmt: skip
                if len(self._models) < 64:  # an upstream names one model, or a few: each scrubbed once
                    self._models[model] = clean
            model = clean
        return Embeddings(vectors=vectors, dimensions=dims, prompt_tokens=prompt, total_tokens=total, b64=b64,
                          model=model)  # fmt: skip


def _secret_forms(providers: Sequence[ProviderConfig], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The forms a body may echo the providers' keys in, longest first: as is, URL-encoded, JSON-escaped (a "/"
    written "\\/", as PHP's json_encode does; a JSON body's strings are read decoded, so its \\u escapes are covered
    too), base64-encoded alone and as ``Bearer <key>`` (a proxy's page quoting the request's head in base64). So may
    a value of a provider's own headers (Azure's api-key): those of 8 characters or more; and ``extra`` secrets
    (the proxies' credentials, whose ``user:password`` goes as a ``Basic`` base64 value)."""
    forms: list[str] = []
    for provider in providers:
        values = [value for _, value in provider.headers]
        # an Authorization header's credential is quoted without its scheme ("Incorrect API key provided: sk-...")
        values += [value.partition(" ")[2].strip() for name, value in provider.headers
                   if name.lower() in ("authorization", "proxy-authorization")]  # fmt: skip
        for key in (provider.api_key if len(provider.api_key) >= 4 else "", *[v for v in values if len(v) >= 8]):
            forms += _forms_of(key)
    for secret in extra:
        if len(secret) >= 4:
            forms += _forms_of(secret)
    return tuple(sorted({f for f in forms if f}, key=len, reverse=True))


def _forms_of(secret: str) -> list[str]:
    """One secret's forms (see _secret_forms)."""
    escaped = orjson.dumps(secret).decode()[1:-1]
    b64 = [base64.b64encode(text.encode()).decode() for text in (secret, f"Bearer {secret}")]
    return [secret, quote(secret, safe=""), quote(secret), quote_plus(secret), escaped, escaped.replace("/", "\\/"),
            *b64]  # fmt: skip


def _scrubbed(text: str, forms: tuple[str, ...], pieces: bool = False) -> str:
    """``text`` without any of ``forms`` (the keys' forms, longest first); with ``pieces``, nor any piece of one
    of :data:`_PIECE` characters or more that starts as it does (a message the upstream cut short mid-key)."""
    for form in forms:
        if form in text:
            text = text.replace(form, "[redacted]")
    if pieces:
        for form in forms:
            if len(form) <= _PIECE:
                continue
            head = form[:_PIECE]
            start = text.find(head)
            while start >= 0:
                end = start + _PIECE
                while end < len(text) and end - start < len(form) and text[end] == form[end - start]:
                    end += 1
                text = f"{text[:start]}[redacted]{text[end:]}"
                start = text.find(head, start + len("[redacted]"))
    return text


def _detail_field(data: Any, err: Any) -> str | None:
    """The field a FastAPI-style validation error names (``{"detail": [{"loc": ["body", "dimensions"], ...}]}``,
    as TEI, Jina or DeepInfra answer; Mistral nests it in ``message``): its first item's, if a name."""
    for holder in (data, err, data.get("message") if isinstance(data, dict) else None):
        detail = holder.get("detail") if isinstance(holder, dict) else None
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            loc = detail[0].get("loc")
            if isinstance(loc, list) and loc:
                field = loc[1] if loc[0] == "body" and len(loc) > 1 else loc[0]
                return field if isinstance(field, str) else None
    return None


#: The fields of the upstream call a client sends as they are: an error naming one names it to the client too.
_CLIENT_PARAMS: Final = frozenset({"input", "dimensions", "user", "input_type"})
#: The statuses of a server refusing a field of the call (a FastAPI app's validation: 422).
_REFUSALS: Final = frozenset({400, 422})


def _refuses_base64(message: str, param: str | None) -> bool:
    """Whether an upstream's refusal is of the base64 answers the call asked for (``encoding_format``, which only the
    gateway sets): its error names the field, or its message does."""
    if param == "encoding_format":
        return True
    text = message.lower()
    return "encoding_format" in text or "encoding format" in text


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: a number of seconds or an HTTP date (RFC 9110); None for
    anything else (a negative number, NaN, garbage), so the router's own backoff applies. The router caps it."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, as the RFC's dates are
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
        # A date already past is a negative wait, as "-5" is: the backoff applies (0 retried at once, no backoff).
        return seconds if seconds > 0.0 else None
    return seconds if seconds >= 0.0 else None  # NaN is not >= 0


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
