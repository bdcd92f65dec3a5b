"""A pooled HTTP/1.1 transport for httpx on asyncio protocols and httptools' C parser (llhttp, as in uvicorn).

Why not aiohttp underneath: an embedding call is one POST with a small JSON body and one whole JSON answer, and
aiohttp's client (session, connector, request and response objects, stream reader, payload writer) cost ~300 us
of CPU per call on this 2-core machine, the largest single part of a cache miss. Writing the request bytes to a
pooled connection and letting llhttp hand back status, headers and body costs a fraction of that
(``tests/benchmarks/transports.py`` measures all the candidates side by side).

What it does: keep-alive connections pooled per origin (``http``/``https``, most recently used first, closed after
``keepalive_s`` idle, when the server says ``Connection: close``, or when an answer came with bytes beyond its end),
at most ``max_connections`` open at once to each origin (callers beyond that wait for one), bodies by
``Content-Length``, chunked or until close; httpx decodes ``Content-Encoding`` as for any transport. A request is
sent once more, on a new connection, when a reused one closes before any byte of its answer came and within
``RESEND_WITHIN_S`` of the request going out: the server's idle timeout ended just as it went out (aiohttp's client
resends only idempotent requests; httpcore raises). What it leaves out, because no
embedding API needs it: HTTP/2, proxies, upgrades, ``Expect: 100-continue``, HEAD.

Timeouts: none of its own. The caller bounds each call (the adapters run it under ``deadline``); a call
cancelled mid-way closes its connection, since an answer may still be on its way. Errors keep httpx's types:
``ConnectError`` (no connection), ``WriteError``/``ReadError`` (the connection broke), ``RemoteProtocolError``
(not HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import ctypes
import ssl
import time
import zlib
from collections import deque
from contextvars import ContextVar
from typing import Any, Final

import httptools
import httpx

__all__ = ["EARLY_ANSWER_BYTES", "MAX_DECODED", "MAX_HEAD", "RESEND_WITHIN_S", "SENDING", "SENT", "UNKNOWN", "WAITING",
           "Http1Transport", "decoded", "decoded_answer"]  # fmt: skip

_Origin = tuple[bytes, bytes, int]  # scheme, host, port
#: How soon after a request went out on a reused connection its close must come for the request to be sent again:
#: the server's idle timeout ending as it went out closes it within a round trip.
RESEND_WITHIN_S: Final = 0.25
#: A request larger than this that got an error answer leaves its connection closed, not pooled: the upstream may have
#: answered before reading it all (a rate limiter's 429, a 413), and what it did not read may sit in the kernel's
#: buffers, where the next request on the connection would wait behind it until its timeout.
EARLY_ANSWER_BYTES: Final = 64 * 1024
#: An answer: status, headers as sent, body as sent (a bytearray when it came in several reads: see _Connection).
_Answer = tuple[int, list[tuple[bytes, bytes]], bytes | bytearray]

_SCRATCH: Final = 32 * 1024  # the buffer each read of what llhttp reads fills: a single-input answer fits whole
# The largest body read into a buffer of its announced length (allocated when the head arrives): 2,048 inputs of
# 3,072 dimensions in base64 are ~34 MB. A larger one is read by llhttp as it comes: an upstream's head alone never
# makes the gateway allocate more than this.
_MAX_BUFFERED: Final = 64 * 1024 * 1024
#: The largest answer body taken at all (as a decoded one, see the adapters' MAX_DECODED): a larger one is a
#: protocol error, never the gateway's memory filled by an upstream that does not stop.
MAX_BODY: Final = 256 * 1024 * 1024
#: The largest answer head (status line and headers): more is a protocol error. llhttp keeps a head's headers until
#: each is whole, so an upstream sending header lines without end grew the gateway's memory by gigabytes. Also the
#: most bytes of a chunked body's framing read without a chunk's data or end between them: a chunk line, its
#: extensions, the trailers (read, not kept: they grew the memory as the head's lines did).
MAX_HEAD: Final = 1024 * 1024
#: A chunk's data shorter than this is added to a buffer, not kept as an object of its own (~40 bytes each: an
#: upstream sending 2-byte chunks grew the gateway's memory by ~30x the body).
_SMALL_PIECE: Final = 512


def _pyapi_new_bytearray() -> Any:
    try:
        function = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # an interpreter without CPython's C API
        return None
    function.restype = ctypes.py_object
    function.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return function


_NEW_BYTEARRAY: Final[Any] = _pyapi_new_bytearray()


def body_buffer(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes, not zeroed: CPython's ``PyByteArray_FromStringAndSize(NULL, size)``.

    An answer's body buffer is filled whole by the socket before anything reads it (an answer that stops short
    drops it unread), so ``bytearray(size)``'s zeroing was a pass over 2.1 MB for a 256-input answer for nothing:
    ~40 us, 20% of the instructions of such a cache miss. Untouched, a large buffer's pages are not committed
    either until the socket fills them (an upstream announcing 64 MB and sending nothing costs no memory)."""
    if _NEW_BYTEARRAY is None:
        return bytearray(size)
    buffer: bytearray = _NEW_BYTEARRAY(None, size)
    return buffer


#: The most a compressed answer may decode to, on every path (direct, proxied, an injected client's): the largest
#: real answer, 2048 x 3072 floats as JSON, is ~80 MB.
MAX_DECODED: Final = 256 * 1024 * 1024
_ZLIB_CODINGS: Final = frozenset({"gzip", "deflate", "identity", ""})
_INFLATE_STEP: Final = 4 * 1024 * 1024  # decoded bytes made at a time
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS


#: Where one upstream call stands, for whoever set it around the call (the router, which bills a chunk it cut off only
#: if it went out): ``UNKNOWN`` as set (a transport that does not say), ``WAITING`` for a pooled connection or its
#: connect (nothing sent), ``SENT`` once the request's bytes go out on one. A second item, where the cell has one,
#: the adapter sets to 1 when it asked the call again for floats (its upstream refused base64 answers).
SENDING: ContextVar[list[int] | None] = ContextVar("embedgate_sending", default=None)
UNKNOWN: Final = 0
WAITING: Final = 1
SENT: Final = 2


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection: one exchange at a time, the answer parsed as it arrives.

    llhttp reads each answer as it comes, with one exception: once it has read the head of an answer whose body
    has a length (``Content-Length``, up to ``_MAX_BUFFERED``; a final status that has a body) and that body is
    still coming, the rest of the body goes straight into a buffer of its length, which the socket fills. A
    256-input answer (2.1 MB, in many reads) is then copied once on its way, by the kernel, where llhttp's
    callbacks copied each piece and a join copied them all again. An answer that comes in one read (a single
    input's) is llhttp's alone.
    """

    def __init__(self, origin: _Origin, loop: asyncio.AbstractEventLoop, max_body: int = MAX_BODY) -> None:
        self.origin = origin
        self._max_body = max_body
        self.loop = loop  # the connection's for its life (asyncio.get_running_loop() costs a getpid call)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.keep_alive = False
        self.exchanges = 0  # requests written on this connection, the one in flight included
        self.answered = False  # a byte of this exchange's answer came
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[_Answer] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes | bytearray] = []
        self._body_size = 0
        self._framing = 0  # bytes read after the head since a chunk's data or end (-1: one came in this read)
        self._until_close = False
        self._scratch = bytearray(_SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._length = -1  # the body's length, once llhttp read a head whose body can be read here
        self._into: memoryview | None = None  # the body's buffer while it fills
        self._filled = 0
        self._next_keep_alive = False
        self._head_size = 0  # bytes read of the answer's head so far; -1 once it is whole

    # --- the exchange -----------------------------------------------------------------------------------------

    async def exchange(self, data: bytes) -> _Answer:
        """Write one request and wait for its whole answer."""
        assert self.transport is not None and self._waiter is None
        waiter: asyncio.Future[_Answer] = self.loop.create_future()
        self._waiter = waiter
        self._status, self._headers, self._body, self._body_size = 0, [], [], 0
        self._framing = 0
        self._until_close = self.answered = False
        self._length, self._into = -1, None
        self._head_size = 0
        self.exchanges += 1
        try:
            self.transport.write(data)
        except (OSError, RuntimeError) as exc:
            self._waiter = None
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from exc
        try:
            return await waiter
        finally:
            self._waiter = None

    def still_writing(self) -> bool:
        """Whether bytes of the request wait in the transport's buffer, unsent (over TLS, in the one beneath it too:
        the TLS layer hands its records on at once, and reads 0 while megabytes wait there)."""
        transport = self.transport
        if transport is None:
            return False
        beneath = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        return transport.get_write_buffer_size() > 0 or (beneath is not None and beneath.get_write_buffer_size() > 0)

    @property
    def usable(self) -> bool:
        """Open, and not being closed."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        """Close now (an answer still on its way is dropped with the connection)."""
        self.closed = True
        self._drop_body()
        if self.transport is None:
            return
        if not self.loop.is_closed():
            self.transport.abort()
        else:
            # Opened under an event loop closed since (a test's, a TestClient's), which can no longer run the
            # transport's close: its socket, still open, is closed here (else when the collector gets to it).
            # asyncio's transports (over TLS, the one beneath); uvloop's close with their loop
            beneath = getattr(getattr(self.transport, "_ssl_protocol", None), "_transport", None) or self.transport
            sock = getattr(beneath, "_sock", None)
            if sock is not None:
                sock.close()

    def _fail(self, exc: Exception) -> None:
        self._drop_body()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _drop_body(self) -> None:
        """Let go of an answer's body read so far: the error of a failed exchange holds this connection (its
        traceback, through the router's retries), and a refused body may be up to ``max_body`` (256 MiB)."""
        self._body = []
        self._body_size = 0
        self._into = None

    def _answer(self, body: bytes | bytearray, keep_alive: bool) -> None:
        self._into = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # not for another answer after it (see on_message_begin)
            self.keep_alive = keep_alive
            waiter.set_result((self._status, self._headers, body))

    # --- asyncio.BufferedProtocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        into = self._into
        return into[self._filled :] if into is not None else self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        into = self._into
        if into is not None:  # the body's bytes, already in place
            self._filled += nbytes
            if self._filled == len(into):
                self._answer(into.obj, self._next_keep_alive)  # type: ignore[arg-type]
            return
        if self._waiter is None:  # bytes nobody asked for: this connection can no longer be trusted
            self.close()
            return
        self.answered = True
        if self._head_size >= 0:
            self._head_size += nbytes  # (the read may hold the body's start too: within one read's 32 KiB)
            if self._head_size > MAX_HEAD + _SCRATCH:
                self._fail(httpx.RemoteProtocolError(f"invalid HTTP answer: a head of more than {MAX_HEAD} bytes"))
                self.close()
                return
        try:
            self._parser.feed_data(self._scratch_view[:nbytes])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # the second is no subclass
            reason = "a protocol upgrade" if isinstance(exc, httptools.HttpParserUpgrade) else exc
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP answer: {reason}"))
            self.close()
            return
        if self._body_size > self._max_body:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP answer: a body of more than {self._max_body} bytes"))
            self.close()
            return
        if self._head_size < 0:  # (a chunked body's framing: its chunks' data and ends set -1)
            framing = self._framing
            self._framing = framing = 0 if framing < 0 else framing + nbytes
            if framing > MAX_HEAD + _SCRATCH:
                self._fail(httpx.RemoteProtocolError(
                    f"invalid HTTP answer: more than {MAX_HEAD} bytes of chunk framing or trailers"))  # fmt: skip
                self.close()
                return
        length = self._length
        if length >= 0 and self._into is None and not self._waiter.done():
            # A body of known length still coming: the rest goes straight into its buffer, and llhttp, which
            # waits for it, starts afresh with the next answer.
            self._parser = httptools.HttpResponseParser(self)
            body = body_buffer(length)
            filled = 0
            for piece in self._body:
                body[filled : filled + len(piece)] = piece
                filled += len(piece)
            self._body = []
            self._into, self._filled = memoryview(body), filled

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._into = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_close:  # a body without length or chunks ends with the connection
            body = b"".join(self._body)
            self._drop_body()
            waiter.set_result((self._status, self._headers, body))
        elif self._status:
            self._drop_body()
            waiter.set_exception(httpx.ReadError("the server closed the connection in the middle of its answer"))
        else:
            waiter.set_exception(httpx.ReadError("the server closed the connection without answering"))

    # --- httptools callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        waiter = self._waiter
        if waiter is not None and waiter.done():
            # More bytes after the answer (a body longer than its Content-Length, say): the next answer on this
            # connection could not be told from them, so it is not reused.
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_size >= 0:  # not a chunked body's trailer: never merged into the head (RFC 9110, 6.5.1)
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_size = -1
        self._framing = 0
        status = self._status = self._parser.get_status_code()
        length: bytes | None = None
        chunked = False
        for name, value in self._headers:
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                length = value  # llhttp refuses a second one, and anything but digits
            elif size == 17 and name.lower() == b"transfer-encoding":
                chunked = True
        self._until_close = length is None and not chunked
        if length is not None and not chunked and status >= 200 and status != 204 and status != 304:
            size = int(length)
            if size > self._max_body:  # refused as soon as it is announced (see buffer_updated)
                self._body_size = size
                return
            if size <= _MAX_BUFFERED:
                self._length = size
                self._next_keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        self._framing = -1
        pieces = self._body
        if len(body) >= _SMALL_PIECE:
            pieces.append(body)
        elif pieces and type(last := pieces[-1]) is bytearray:
            last += body
        else:
            pieces.append(bytearray(body))

    def on_chunk_complete(self) -> None:
        self._framing = -1

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer: the real one follows on the same connection
            # its lack of a length is no body read until the close: a drop now is a drop, not an empty answer
            self._status, self._headers, self._body, self._until_close = 0, [], [], False
            self._head_size = 0
            return
        self._until_close = False
        self._answer(b"".join(self._body), self._parser.should_keep_alive())


class Http1Transport(httpx.AsyncBaseTransport):
    """An httpx transport with its own HTTP/1.1 connection pool; see the module docstring."""

    def __init__(
        self,
        *,
        max_connections: int = 512,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self._limit = max_connections
        self._max_body = max_body
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        # Per origin (an upstream host): one slow or hung provider filling the pool made every other provider's
        # calls wait for its slots, time out and open their breakers.
        self._open: dict[_Origin, int] = {}  # connections open or being opened
        self._waiters: dict[_Origin, deque[asyncio.Future[None]]] = {}
        self._closed = False
        # Closes idle connections past keepalive_s. _acquire takes the most recently used one, so those left
        # idle under it by a burst were never looked at while traffic went on: the pool stayed at its peak.
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeper_loop: asyncio.AbstractEventLoop | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled connection and return the answer with its body read (see :data:`SENDING`)."""
        status, headers, content = await self.exchange(origin_of(request.url), await _serialize(request), request)
        body = content if type(content) is bytes else bytes(content)
        response = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body), request=request,
                                  extensions={"http_version": b"HTTP/1.1"})  # fmt: skip
        if header_value(headers, b"content-encoding") is not None:
            body = decoded_answer(status, headers, body)  # bounded: httpx's own decoders inflate a bomb whole
            plain = [(k, v) for k, v in headers if k.lower() not in (b"content-encoding", b"content-length")]
            response = httpx.Response(status, headers=plain, content=body, request=request,
                                      extensions={"http_version": b"HTTP/1.1"})  # fmt: skip
        else:
            # The body as it came, which is what read() would produce through its decoder and chunker objects
            # (~25 us a call): set as read() itself sets it.
            response._content = body
            response.is_stream_consumed = response.is_closed = True
        return response

    async def exchange(self, origin: _Origin, data: bytes, request: httpx.Request | None = None) -> _Answer:
        """Send a request's bytes (``data``: request line, headers, body) to ``origin`` (scheme, host, port) on a
        pooled connection; return the answer's status, its headers as sent and its body as sent (not decoded; a
        ``bytearray`` when it came in several reads).

        The adapters' way in with this transport: no ``httpx.Request`` or ``httpx.Response`` objects, whose
        Python made ~13% of a cache miss's instructions. Errors are those of ``handle_async_request``;
        ``request``, when given, is set on them.
        """
        state = SENDING.get()
        if state is not None:
            state[0] = WAITING
        conn = await self._acquire(origin, request)
        if state is not None:
            state[0] = SENT
        sent = time.monotonic()
        try:
            answer: _Answer | None = await conn.exchange(data)
        except BaseException as exc:
            self._failed(conn, exc, request)
            if (not isinstance(exc, (httpx.ReadError, httpx.WriteError)) or conn.exchanges == 1 or conn.answered
                    or time.monotonic() - sent > RESEND_WITHIN_S):  # fmt: skip
                raise
            answer = None
        if answer is None:
            # A kept-alive connection the server closed just as the request went out (its idle timeout ending
            # then): no byte of an answer came, so the request is sent once more, on a new connection. Only when
            # the close came at once: a server that held the request longer (a worker that crashed on it, a proxy's
            # own timeout) may have run it, and been paid for it; sent again, it would run twice.
            conn = await self._acquire(origin, request, fresh=True)
            try:
                answer = await conn.exchange(data)
            except BaseException as exc:
                self._failed(conn, exc, request)
                raise
        # Not a connection whose request is still going out (an upstream that answered before reading it all, a
        # rate limiter's early 429 say): the next request would wait behind bytes nobody reads (RFC 9112, 9.5). The
        # kernel's buffers hide a few MB of them, so neither after an error answer to a large request.
        if (conn.keep_alive and conn.usable and not self._closed and not conn.still_writing()
                and (answer[0] < 400 or len(data) <= EARLY_ANSWER_BYTES)):  # fmt: skip
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, []).append(conn)
            if self._sweeper is None or self._sweeper_loop is not conn.loop:  # (a timer of another loop never runs)
                self._sweeper_loop = conn.loop
                self._sweeper = conn.loop.call_later(self._keepalive_s, self._sweep)
            self._wake(origin)
        else:
            self._discard(conn)
        return answer

    async def _acquire(self, origin: _Origin, request: httpx.Request | None, *, fresh: bool = False) -> _Connection:
        while True:
            idle = self._idle.get(origin)
            now = time.monotonic()
            loop = asyncio.get_running_loop() if idle and not fresh else None
            while idle and not fresh:
                conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
                # Not one opened under another event loop (a test's, a host's TestClient's per request): the
                # request went out on it, and waiting for its answer failed (a 500, the upstream's call billed).
                if conn.usable and now - conn.idle_since < self._keepalive_s and conn.loop is loop:
                    return conn
                self._discard(conn)
            if self._open.get(origin, 0) < self._limit:
                return await self._connect(origin, request)
            waiter = asyncio.get_running_loop().create_future()
            waiters = self._waiters.setdefault(origin, deque())
            waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake(origin)  # woken, then cancelled: the free slot goes to the next caller waiting
                raise
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)

    async def _connect(self, origin: _Origin, request: httpx.Request | None) -> _Connection:
        scheme, host, port = origin
        self._open[origin] = self._open.get(origin, 0) + 1
        try:
            tls = self._ssl_context() if scheme == b"https" else None
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(
                lambda: _Connection(origin, loop, self._max_body),
                host.decode("ascii"),
                port,
                ssl=tls,
                server_hostname=host.decode("ascii") if tls else None,
            )
        except BaseException as exc:
            self._open[origin] -= 1
            self._wake(origin)
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
                raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
            raise
        return conn

    def _failed(self, conn: _Connection, exc: BaseException, request: httpx.Request | None) -> None:
        self._discard(conn)
        if request is not None and isinstance(exc, httpx.TransportError):
            exc.request = request  # raised by the connection, which never saw the request object

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:  # built on first https use: loading the CA bundle takes ~20 ms
            self._ssl = httpx.create_ssl_context()  # certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR
            self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open[conn.origin] -= 1
        self._wake(conn.origin)

    def _sweep(self) -> None:
        """Close the idle connections past keepalive_s; come back when the oldest left will be."""
        self._sweeper = None
        now = time.monotonic()
        oldest = now
        for idle in self._idle.values():
            # oldest first: connections are appended as they come back, and taken from the end
            while idle and now - idle[0].idle_since >= self._keepalive_s:
                self._discard(idle.pop(0))
            if idle:
                oldest = min(oldest, idle[0].idle_since)
        if any(self._idle.values()) and not self._closed and self._sweeper_loop is not None:
            self._sweeper = self._sweeper_loop.call_later(oldest + self._keepalive_s - now, self._sweep)

    def _wake(self, origin: _Origin) -> None:
        waiters = self._waiters.get(origin)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close every pooled connection (calls in flight close theirs when they end)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            while idle:
                self._discard(idle.pop())
        self._idle.clear()


def origin_of(url: httpx.URL) -> _Origin:
    """The pool's key for ``url``: scheme, host, port (the scheme's default when the URL names none)."""
    return (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))


def request_head(method: bytes, raw_path: bytes, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """A request's line and header lines as written on the wire (without the blank line that ends them)."""
    head = [method, b" ", raw_path, b" HTTP/1.1\r\n"]
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    return head


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) among raw pairs, whatever their case."""
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


async def _serialize(request: httpx.Request) -> bytes:
    """The request's bytes on the wire: request line, headers as given, body."""
    try:
        body: bytes | None = request.content
    except httpx.RequestNotRead:
        body = None  # read below: compiled, an await inside an except block loses track of the exception (mypyc)
    if body is None:
        body = await request.aread()
    headers = request.headers.raw
    chunked = any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in headers)
    if chunked:  # a stream of unknown length, now read: sent as one chunk
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    head = request_head(request.method.encode("ascii"), request.url.raw_path, headers)
    head += (b"\r\n", body)
    return b"".join(head)


def decoded_answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes | bytearray) -> bytes:
    """A compressed answer's body, decoded within ``MAX_DECODED``: an answer (2xx) that does not decode raises
    ``httpx.DecodingError``; an error answer's is empty then, as its status is what counts (a 429's Retry-After)."""
    try:
        return decoded(status, headers, body)
    except httpx.DecodingError:
        if 200 <= status < 300:
            raise
        return b""


def decoded(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes | bytearray, limit: int = MAX_DECODED
) -> bytes:
    """A compressed answer's body, at most ``limit`` bytes once decoded (a few KB of gzip can hold gigabytes
    of zeros): gzip and deflate (what the gateway asks for) decoded here in bounded steps, any other coding by
    httpx (br, zstd where installed), then measured."""
    # every Content-Encoding line, in order: two lines are one list (RFC 9110, 5.3)
    named = b",".join(v for k, v in headers if len(k) == 16 and k.lower() == b"content-encoding")
    codings = [c.strip().lower() for c in named.decode("latin-1").split(",")]
    data = bytes(body)
    if any(c not in _ZLIB_CODINGS for c in codings):
        data = httpx.Response(status, headers=headers, stream=httpx.ByteStream(data)).read()
        if len(data) > limit:
            raise httpx.DecodingError(f"more than {limit} bytes once decompressed")
        return data
    try:
        for coding in reversed(codings):  # the last coding applied is the first undone
            if coding == "gzip":
                data = _inflate(data, _GZIP_WBITS, limit)
            elif coding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send it
                try:
                    data = _inflate(data, zlib.MAX_WBITS, limit)
                except zlib.error:
                    data = _inflate(data, -zlib.MAX_WBITS, limit)
    except zlib.error as exc:
        raise httpx.DecodingError(f"not valid {coding}: {exc}") from None
    return data


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """``data`` decompressed (``wbits`` as zlib takes it), refused beyond ``limit`` bytes before they are all
    made. Every member of a gzip answer is decoded (RFC 1952: they concatenate; the first alone was taken); a
    stream that stops before its end is a ``zlib.error`` (it was taken as a shorter answer); an empty body is
    empty (servers send one with the header on an empty error answer)."""
    if not data:
        return b""
    pieces: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof:
            piece = inflater.decompress(data, _INFLATE_STEP)
            size += len(piece)
            if size > limit:
                raise httpx.DecodingError(f"more than {limit} bytes once decompressed")
            pieces.append(piece)
            data = inflater.unconsumed_tail
            if not piece and not data and not inflater.eof:  # all read, nothing more made: cut before its end
                raise zlib.error("the compressed data stops before its end")
        data = inflater.unused_data
        # another member follows; anything else after the stream (a newline, padding) is ignored, as gzip does
        if wbits != _GZIP_WBITS or not data.startswith(b"\x1f\x8b"):
            return b"".join(pieces)
